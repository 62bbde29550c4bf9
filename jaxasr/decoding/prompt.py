"""Whisper's decoder prompt and token rules, derived from a generation config and its tokenizer.

Every special token id comes from the checkpoint's `generation_config.json` (or, failing that, the
tokenizer's vocabulary), never from literals, so multilingual, `.en` and v3 vocabularies all work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TASKS = ("transcribe", "translate")


@dataclasses.dataclass(frozen=True)
class DecodingRules:
    """What greedy and beam search need besides the model."""

    prompt: tuple[int, ...]  # <|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>
    eot: int
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]  # suppressed at the first generated position only
    max_length: int  # prompt + generated tokens, as generation_config.max_length


def special_token_ids(generation_config: dict[str, Any], vocab: dict[str, int]) -> dict[str, int]:
    """start-of-transcript, end-of-text and no-timestamps ids; the generation config wins."""

    def pick(key: str, token: str) -> int:
        value = generation_config.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is None:
            if token not in vocab:
                raise ValueError(f"generation config has no {key} and the tokenizer has no {token}")
            value = vocab[token]
        return int(value)

    return {
        "sot": pick("decoder_start_token_id", "<|startoftranscript|>"),
        "eot": pick("eos_token_id", "<|endoftext|>"),
        "no_timestamps": pick("no_timestamps_token_id", "<|notimestamps|>"),
    }


def language_ids(generation_config: dict[str, Any]) -> dict[str, int]:
    """{'en': 50259, ...} from `lang_to_id` ({'<|en|>': 50259, ...}); empty for English-only models."""
    return {tok.strip("<|>"): int(i) for tok, i in (generation_config.get("lang_to_id") or {}).items()}


def decoding_rules(
    generation_config: dict[str, Any],
    vocab: dict[str, int],
    *,
    language: str | None = None,
    task: str = "transcribe",
) -> DecodingRules:
    """The prompt for `language`/`task` and the suppression lists of the generation config.

    English-only checkpoints take no language or task token. For a multilingual one, `language`
    is required here (the transcriber detects it first when the user gives none).
    """
    ids = special_token_ids(generation_config, vocab)
    prompt = [ids["sot"]]
    if generation_config.get("is_multilingual"):
        langs = language_ids(generation_config)
        if language is None:
            raise ValueError("a multilingual model needs a language (or language detection) to build its prompt")
        code = language.strip("<|>").lower()
        if code not in langs:
            raise ValueError(f"unknown language {language!r}; this model knows {', '.join(sorted(langs))}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        prompt += [langs[code], int(generation_config["task_to_id"][task])]
    elif language not in (None, "en", "english"):
        raise ValueError(f"this is an English-only model; language={language!r} is not supported")
    prompt.append(ids["no_timestamps"])
    return DecodingRules(
        prompt=tuple(prompt),
        eot=ids["eot"],
        suppress_tokens=tuple(int(t) for t in generation_config.get("suppress_tokens") or ()),
        begin_suppress_tokens=tuple(int(t) for t in generation_config.get("begin_suppress_tokens") or ()),
        max_length=int(generation_config.get("max_length") or 448),
    )
