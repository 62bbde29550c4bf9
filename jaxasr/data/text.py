"""Transcripts on the host: decoding, Whisper decoder targets, text-only ids, and corruption.

Everything here is numpy/Python and runs inside Grain workers. Bad examples raise `DataError`
with a reason code so the pipeline can count and skip them; labels are never truncated.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxasr.data.errors import DataError
from jaxasr.decoding.prompt import decoding_rules

_WHITESPACE = re.compile(r"\s+")


def decode_text(value: str | bytes, name: str) -> str:
    """`value` as a clean string: UTF-8 checked, stripped, runs of whitespace collapsed to one space."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError("text_not_utf8", f"{name}: transcript is not valid UTF-8 ({err})") from None
    text = _WHITESPACE.sub(" ", value).strip()
    if not text:
        raise DataError("text_empty", f"{name}: transcript is empty")
    return text


def encode_text_only(tokenizer: Any, text: str | bytes, name: str = "text", *,
                     leading_space: bool = False) -> np.ndarray:
    """Token ids of `text` alone (no special tokens), int32; for text-only examples of a speech-LLM.

    `leading_space` suits byte-level BPE vocabularies (Whisper, GPT-2) where a word's id depends
    on the space before it; SentencePiece tokenizers add their own prefix space.
    """
    text = decode_text(text, name)
    # split_special_tokens: a transcript that happens to contain "<|endoftext|>" stays plain text
    # instead of injecting a control token into the labels.
    ids = tokenizer.encode((" " + text) if leading_space else text, add_special_tokens=False,
                           split_special_tokens=True)
    return np.asarray(ids, np.int32)


def _plain_text_tokenizer(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's Rust backend that reads special-token strings as plain text
    (what `split_special_tokens=True` asks of the wrapper), or None for other tokenizers. Called
    directly it takes 0.1 ms a transcript where the transformers wrapper took 0.16-0.3."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers

    plain = tokenizers.Tokenizer.from_str(backend.to_str())
    plain.encode_special_tokens = True
    return plain


class WhisperTargets:
    """Turns a transcript into Whisper decoder inputs, labels and a loss mask.

    tokens = prompt (SOT [lang task] notimestamps) + ids(" " + text) + [eot];
    decoder_input_ids = tokens[:-1], labels = tokens[1:], and the loss mask is 0 where the label is
    still part of the prompt (the model is given it at inference, so it is not learned).
    """

    def __init__(self, tokenizer: Any, generation_config: dict[str, Any], language: str | None = None,
                 task: str = "transcribe", max_label_tokens: int | None = None):
        self.tokenizer = tokenizer
        self._plain_text = _plain_text_tokenizer(tokenizer)
        rules = decoding_rules(generation_config, tokenizer.get_vocab(), language=language, task=task)
        self.prompt = rules.prompt
        self.eot = rules.eot
        # Default budget: the decoder's positions (generation_config.max_length, 448 for Whisper).
        self.max_label_tokens = int(max_label_tokens if max_label_tokens is not None else rules.max_length)
        if self.max_label_tokens < len(self.prompt):
            raise ValueError(f"max_label_tokens={self.max_label_tokens} is shorter than the prompt "
                             f"({len(self.prompt)} tokens)")

    def encode_text_only(self, text: str | bytes, name: str = "text") -> np.ndarray:
        """Text token ids as in `encode` (leading space), without prompt or eot; int32."""
        if self._plain_text is None:
            return encode_text_only(self.tokenizer, text, name, leading_space=True)
        ids = self._plain_text.encode(" " + decode_text(text, name), add_special_tokens=False).ids
        return np.asarray(ids, np.int32)

    def encode(self, text: str | bytes, name: str = "text") -> dict[str, np.ndarray]:
        """decoder_input_ids, labels (int32) and loss_mask (float32), all of one length n."""
        text_ids = self.encode_text_only(text, name)
        tokens = np.concatenate([np.asarray(self.prompt, np.int32), text_ids, np.asarray([self.eot], np.int32)])
        n = len(tokens) - 1
        if n > self.max_label_tokens:
            raise DataError("label_too_long", f"{name}: {n} decoder tokens ({len(text_ids)} text tokens) exceed "
                                              f"max_label_tokens={self.max_label_tokens}")
        loss_mask = np.ones(n, np.float32)
        loss_mask[: len(self.prompt) - 1] = 0.0  # labels[i] = tokens[i + 1] is a prompt token for i < P - 1
        return {"decoder_input_ids": tokens[:-1], "labels": tokens[1:], "loss_mask": loss_mask}


_LOWER = "abcdefghijklmnopqrstuvwxyz"
_TOKENS = re.compile(r"(\s+)")  # split keeping the separators, so spacing survives corruption


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding (round(2.5) == 2); the recipe means ordinary rounding.
    return int(np.floor(x + 0.5))


def corrupt_text(text: str, seed: int, *, word_fraction: float = 0.15, char_fraction: float = 0.3,
                 dup_prob: float = 0.1, max_extra: int = 3) -> str:
    """A misspelt copy of `text` for text-only domain adaptation (arXiv 2604.06487).

    Picks round(word_fraction * n_words) words (at least 1 when word_fraction > 0 and the text has a
    word; a word is a whitespace-separated token holding a letter), substitutes
    round(char_fraction * n_letters) of each one's letters (at least 1 when char_fraction > 0) with a
    different random lowercase letter in the original letter's case, then repeats every letter of
    the text 1..max_extra extra times with probability dup_prob. Same seed, same output.
    """
    for key, value in (("word_fraction", word_fraction), ("char_fraction", char_fraction), ("dup_prob", dup_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {value}")
    if max_extra < 1:
        raise ValueError(f"max_extra must be at least 1, got {max_extra}")
    rng = np.random.default_rng(seed)
    pieces = _TOKENS.split(text)
    words = [i for i, piece in enumerate(pieces) if any(c.isalpha() for c in piece)]

    n_pick = min(len(words), _round_half_up(word_fraction * len(words)))
    if word_fraction > 0 and words:
        n_pick = max(n_pick, 1)
    for w in sorted(rng.choice(len(words), size=n_pick, replace=False)):
        chars = list(pieces[words[w]])
        letters = [i for i, c in enumerate(chars) if c.isalpha()]
        n_sub = min(len(letters), _round_half_up(char_fraction * len(letters)))
        if char_fraction > 0:
            n_sub = max(n_sub, 1)
        for i in sorted(rng.choice(letters, size=n_sub, replace=False)):
            original = chars[i]
            k = _LOWER.find(original.lower())
            # An offset of 1..25 from the original index can never land on the same letter.
            new = _LOWER[(k + 1 + rng.integers(25)) % 26] if k >= 0 else _LOWER[rng.integers(26)]
            chars[i] = new.upper() if original.isupper() else new
        pieces[words[w]] = "".join(chars)

    out = "".join(pieces)
    if dup_prob == 0:
        return out
    # One draw per character (letters or not) keeps the stream layout independent of content.
    dup = rng.random(len(out)) < dup_prob
    extra = rng.integers(1, max_extra + 1, size=len(out))
    return "".join(c * (1 + int(e)) if d and c.isalpha() else c for c, d, e in zip(out, dup, extra))
