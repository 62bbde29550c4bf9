"""Evaluation during training: jitted batched greedy decoding on named eval sets, WER and CER.

Each JAX process decodes its share of every set; edit counts (not rates) are summed across
processes, so the WER is that of the whole set and every process sees the same number (the
schedule state fed from it must stay identical everywhere). With several processes a decoding
batch is a global array of every process's rows (`_map_batches`): jitted programs span all
processes' devices, so a host-local NumPy input would be taken for the same value everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxasr.audio.features import log_mel_numpy_batch
from jaxasr.decoding.generate import greedy_search, max_new_tokens_for
from jaxasr.decoding.prompt import DecodingRules, decoding_rules
from jaxasr.parallel.mesh import BATCH_AXES
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
        tokens = _map_batches(lambda x: greedy_search(model, x, self.rules, max_new, encoded), model, features,
                              self.batch_size, features.dtype)
        return [self._text(row) for row in tokens] if tokens is not None else []

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
    out = _map_batches(lambda x: _encode(model, x), model, features, batch_size, np.float32, np.float16)
    return out if out is not None else np.zeros((0,), np.float16)


def _map_batches(fn: Callable[[Any], jax.Array], model, features: np.ndarray, batch_size: int, in_dtype,
                 out_dtype=None) -> np.ndarray | None:
    """`fn` over fixed-size chunks of `features` (zero-padded: one shape, one compile) -> the output rows
    of `features`, as NumPy (None when there were no chunks).

    With several processes each passes its own rows: a chunk is the global array of every process's
    chunk (sharded like a training batch on the model's mesh), every process runs as many chunks as
    the process with the most rows needs (the programs are collective), and gets its own rows back.
    """
    n = len(features)
    if jax.process_count() == 1:
        rows, chunks = batch_size, -(-n // batch_size)
        to_global = to_local = lambda x: x  # noqa: E731
    else:
        from jax.experimental import multihost_utils

        mesh = _mesh_of(model)
        local_shards = max(1, math.prod(mesh.shape[a] for a in BATCH_AXES) // jax.process_count())
        rows = -(-batch_size // local_shards) * local_shards  # this process's rows must fill its devices evenly
        most = int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))
        chunks = -(-most // rows)
        spec = lambda ndim: P(BATCH_AXES, *[None] * (ndim - 1))  # noqa: E731
        to_global = lambda x: multihost_utils.host_local_array_to_global_array(x, mesh, spec(x.ndim))  # noqa: E731
        to_local = lambda y: multihost_utils.global_array_to_host_local_array(y, mesh, spec(y.ndim))  # noqa: E731
    out = []
    for c in range(chunks):
        chunk = features[c * rows:(c + 1) * rows]
        padded = np.zeros((rows,) + features.shape[1:], in_dtype)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(to_local(fn(to_global(padded))), out_dtype)[: len(chunk)])
    return np.concatenate(out) if out else None


def _mesh_of(model) -> jax.sharding.Mesh:
    """The mesh the model's parameters live on (several processes: every model is placed on one)."""
    for x in jax.tree.leaves(nnx.state(model)):
        if isinstance(getattr(x, "sharding", None), NamedSharding):
            return x.sharding.mesh
    raise ValueError("with several JAX processes the model's arrays must be placed on a mesh (NamedSharding)")


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
