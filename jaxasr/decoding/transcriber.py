"""Audio in, text out: windows, log-mel on the host, batched jitted search, detokenization.

Clips longer than 30 s are cut into windows of at most 30 s at the quietest point of the last
few seconds of each window (so a cut rarely splits a word) and the windows' texts are joined.
Batches are padded to power-of-two sizes up to `batch_size`, so each size compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxasr.audio.features import N_SAMPLES, SAMPLE_RATE, log_mel_numpy_batch
from jaxasr.convert.sources import WhisperCheckpoint
from jaxasr.decoding.generate import (
    beam_search,
    detect_language,
    greedy_search,
    greedy_search_shrinking,
    max_new_tokens_for,
)
from jaxasr.decoding.prompt import DecodingRules, decoding_rules, language_ids, special_token_ids

SEARCH_SECONDS = 5.0  # how far back from a window's end to look for a quiet cut
QUIET_FRAME = 1600  # 0.1 s: the unit of loudness when looking for the cut


def split_windows(audio: np.ndarray, window: int = N_SAMPLES, search: int = int(SEARCH_SECONDS * SAMPLE_RATE)):
    """Consecutive pieces of at most `window` samples; each cut at the quietest 0.1 s frame
    within the last `search` samples of its window."""
    pieces, start = [], 0
    while len(audio) - start > window:
        lo = start + window - search
        region = audio[lo : start + window]
        n = len(region) // QUIET_FRAME
        energy = np.square(region[: n * QUIET_FRAME].reshape(n, QUIET_FRAME)).mean(axis=1)
        cut = lo + (int(np.argmin(energy)) + 1) * QUIET_FRAME
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    return pieces


def _bucket(n: int, batch_size: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return min(size, batch_size)


@dataclasses.dataclass
class Transcriber:
    """Transcribes 16 kHz mono float32 arrays with a Whisper checkpoint."""

    checkpoint: WhisperCheckpoint
    batch_size: int = 16
    beam_size: int = 1
    language: str | None = None  # None: English for .en models, detected per window otherwise
    task: str = "transcribe"
    max_new_tokens: int | None = None
    dtype: str = "float32"
    # greedy: decode the rows still running in a smaller batch once half of them have ended
    # (`greedy_search_shrinking`); False: one program for the whole batch (`greedy_search`)
    shrink_batch: bool = True

    def __post_init__(self):
        self.model = self.checkpoint.build(dtype=self.dtype)
        self.tokenizer = self.checkpoint.tokenizer
        self._vocab = self.tokenizer.get_vocab()
        self._gen = self.checkpoint.generation_config
        self._multilingual = bool(self._gen.get("is_multilingual"))

    def rules(self, language: str | None = None) -> DecodingRules:
        return decoding_rules(self._gen, self._vocab, language=language, task=self.task)

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        """One text per clip, in order."""
        owners, windows = [], []
        for i, audio in enumerate(audios):
            for piece in split_windows(np.asarray(audio, np.float32)):
                owners.append(i)
                windows.append(piece)
        texts = self.transcribe_windows(windows)
        joined = [[] for _ in audios]
        for owner, text in zip(owners, texts):
            if text:
                joined[owner].append(text)
        return [" ".join(parts) for parts in joined]

    def transcribe_windows(self, windows: Sequence[np.ndarray]) -> list[str]:
        """Texts of clips of at most 30 s each."""
        out: list[str] = [""] * len(windows)
        for start in range(0, len(windows), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(windows))))
            features = self._features([windows[i] for i in idx])
            for lang, rows in self._by_language(features).items():
                tokens = self._search(features[rows], self.rules(lang))
                for row, toks in zip(rows, tokens):
                    out[idx[row]] = self.decode_tokens(toks)
        return out

    def decode_tokens(self, tokens: np.ndarray) -> str:
        eot = special_token_ids(self._gen, self._vocab)["eot"]
        tokens = list(tokens)
        if eot in tokens:
            tokens = tokens[: tokens.index(eot)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _features(self, clips: list[np.ndarray]) -> np.ndarray:
        return log_mel_numpy_batch(clips, n_mels=self.model.cfg.num_mel_bins)

    def _by_language(self, features: np.ndarray) -> dict[str | None, list[int]]:
        """Rows grouped by prompt language: the given one, none (.en), or detected per window."""
        if not self._multilingual or self.language is not None:
            return {self.language: list(range(len(features)))}
        langs = language_ids(self._gen)
        by_token = {tok: code for code, tok in langs.items()}
        sot = special_token_ids(self._gen, self._vocab)["sot"]
        detected = np.asarray(detect_language(self.model, self._pad(features), sot, tuple(langs.values())))
        groups: dict[str | None, list[int]] = {}
        for row in range(len(features)):
            groups.setdefault(by_token[int(detected[row])], []).append(row)
        return groups

    def _pad(self, features: np.ndarray) -> jnp.ndarray:
        size = _bucket(len(features), self.batch_size)
        pad = np.zeros((size - len(features),) + features.shape[1:], features.dtype)
        return jnp.asarray(np.concatenate([features, pad]))

    def _search(self, features: np.ndarray, rules: DecodingRules) -> np.ndarray:
        max_new = max_new_tokens_for(self.model, rules, self.max_new_tokens)
        padded = self._pad(features)
        if self.beam_size > 1:
            tokens = beam_search(self.model, padded, rules, max_new, self.beam_size)
        elif self.shrink_batch:
            tokens = greedy_search_shrinking(self.model, padded, rules, max_new, valid=len(features))
        else:
            tokens = greedy_search(self.model, padded, rules, max_new)
        return np.asarray(tokens)[: len(features)]

