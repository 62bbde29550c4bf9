"""Evaluation during training: jitted batched greedy decoding on named eval sets, WER and CER.

Each JAX process decodes its share of every set; edit counts (not rates) are summed across
processes, so the WER is that of the whole set and every process sees the same number (the
schedule state fed from it must stay identical everywhere).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxasr.audio.features import log_mel_numpy_batch
from jaxasr.decoding.generate import greedy_search, max_new_tokens_for
from jaxasr.decoding.prompt import DecodingRules, decoding_rules
from jaxasr.scoring import error_counts, normalizer, rates_from_counts

COUNT_KEYS = ("word_errors", "words", "char_errors", "chars", "utterances", "skipped")


@dataclasses.dataclass
class EvalSet:
    """This process's share of one eval set: log-mel features computed once, reference texts."""

    name: str
    features: np.ndarray  # [n, n_mels, 3000] float32, or encoder outputs [n, 1500, d_model]
    texts: list[str]
    ids: list[str]
    encoded: bool = False  # features are frozen-encoder outputs: decoding skips the encoder


def make_eval_set(name: str, examples: Sequence[Mapping[str, Any]], n_mels: int) -> EvalSet:
    audios = [np.asarray(e["audio"], np.float32) for e in examples]
    features = log_mel_numpy_batch(audios, n_mels=n_mels) if audios else np.zeros((0, n_mels, 3000), np.float32)
    return EvalSet(name, features, [e["text"] for e in examples], [str(e.get("id", i)) for i, e in enumerate(examples)])


class Evaluator:
    """Decodes eval sets with the current model; one compiled program per batch size."""

    def __init__(self, sets: Sequence[EvalSet], tokenizer, generation_config: dict, *, batch_size: int = 16,
                 language: str | None = None, max_new_tokens: int | None = None):
        self.sets = list(sets)
        self.tokenizer = tokenizer
        self.rules: DecodingRules = decoding_rules(generation_config, tokenizer.get_vocab(),
                                                   language=language or ("en" if generation_config.get(
                                                       "is_multilingual") else None))
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.normalize = normalizer(language or "en")

    def encode_sets(self, model) -> None:
        """Replace every set's log-mel features by the encoder's outputs, once: with a frozen
        encoder, later evaluations then only run the decoder."""
        for s in self.sets:
            if not s.encoded:
                s.features = encode_features(model, s.features, self.batch_size)
                s.encoded = True

    def transcribe(self, model, features: np.ndarray, encoded: bool = False) -> list[str]:
        max_new = max_new_tokens_for(model, self.rules, self.max_new_tokens)
        texts: list[str] = []
        for start in range(0, len(features), self.batch_size):
            chunk = features[start:start + self.batch_size]
            padded = np.zeros((self.batch_size,) + chunk.shape[1:], chunk.dtype)  # one shape: one compile
            padded[: len(chunk)] = chunk
            tokens = np.asarray(greedy_search(model, padded, self.rules, max_new, encoded))[: len(chunk)]
            texts.extend(self._text(row) for row in tokens)
        return texts

    def _text(self, tokens: np.ndarray) -> str:
        tokens = list(tokens)
        if self.rules.eot in tokens:
            tokens = tokens[: tokens.index(self.rules.eot)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def run(self, model) -> tuple[dict[str, dict[str, float]], dict[str, list[tuple[str, str, str]]]]:
        """({set: {wer, cer, utterances, skipped}}, {set: [(id, reference, hypothesis)] of this process})."""
        results, samples = {}, {}
        for s in self.sets:
            hyps = self.transcribe(model, s.features, s.encoded)
            counts = error_counts(s.texts, hyps, self.normalize) if s.texts else dict.fromkeys(COUNT_KEYS, 0)
            results[s.name] = rates_from_counts(_sum_over_processes(counts))
            samples[s.name] = list(zip(s.ids, s.texts, hyps))
        return results, samples


def encode_features(model, features: np.ndarray, batch_size: int) -> np.ndarray:
    """Encoder outputs (float16, to halve host memory) of log-mel features, in fixed-size batches."""
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        padded = np.zeros((batch_size,) + chunk.shape[1:], np.float32)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(_encode(model, padded), np.float16)[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float16)


@nnx.jit
def _encode(model, features):
    return model.encode(features)


def _sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    if jax.process_count() == 1:
        return counts
    from jax.experimental import multihost_utils

    local = np.asarray([counts[k] for k in COUNT_KEYS], np.int64)
    total = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(COUNT_KEYS)).sum(0)
    return {k: int(v) for k, v in zip(COUNT_KEYS, total)}
