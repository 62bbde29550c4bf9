"""Word and character error rates after Whisper's text normalizers (jiwer does the alignment)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import jiwer
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer


SPELLING_FILE = Path(__file__).parent / "third_party" / "openai_whisper" / "english.json"


@lru_cache
def english_spelling() -> dict[str, str]:
    """Whisper's British-to-American spelling map (what HF Whisper repos ship as normalizer.json)."""
    return json.loads(SPELLING_FILE.read_text(encoding="utf-8"))


def normalizer(language: str | None = "en", spelling: dict[str, str] | None = None) -> Callable[[str], str]:
    """Whisper's English normalizer for English (contractions, numbers, British-to-American
    spelling: Whisper's own map unless `spelling` gives another), as Whisper's published WERs are
    computed; the basic one (case, punctuation, diacritics) for other languages."""
    if language in (None, "en", "english"):
        return EnglishTextNormalizer(english_spelling() if spelling is None else spelling)
    return BasicTextNormalizer(remove_diacritics=False)


def error_counts(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Callable[[str], str] | None = None
) -> dict[str, int]:
    """Edit counts of a set (or of one process's share of it): summing them over shards and then
    calling `rates_from_counts` gives exactly the WER/CER of the whole set.

    Pairs whose normalized reference is empty are left out (there is nothing to score them by) and
    counted in 'skipped'."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    normalize = normalize or normalizer("en")
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    kept = [(r, h) for r, h in pairs if r.strip()]
    counts = {"word_errors": 0, "words": 0, "char_errors": 0, "chars": 0, "utterances": len(kept),
              "skipped": len(pairs) - len(kept)}
    if kept:
        refs, hyps = [r for r, _ in kept], [h for _, h in kept]
        w = jiwer.process_words(refs, hyps)
        c = jiwer.process_characters(refs, hyps)
        counts["word_errors"] = w.substitutions + w.deletions + w.insertions
        counts["words"] = w.substitutions + w.deletions + w.hits
        counts["char_errors"] = c.substitutions + c.deletions + c.insertions
        counts["chars"] = c.substitutions + c.deletions + c.hits
    return counts


def rates_from_counts(counts: dict[str, int]) -> dict[str, float]:
    """{'wer', 'cer'} in percent (plus the utterance counts) from summed `error_counts`."""
    if not counts["words"]:
        raise ValueError("no reference with any words left after normalization")
    return {
        "wer": 100.0 * counts["word_errors"] / counts["words"],
        "cer": 100.0 * counts["char_errors"] / max(counts["chars"], 1),
        "utterances": counts["utterances"],
        "skipped": counts["skipped"],
    }


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Callable[[str], str] | None = None
) -> dict[str, float]:
    """{'wer': ..., 'cer': ...} in percent over the whole set (not averaged per utterance)."""
    return rates_from_counts(error_counts(references, hypotheses, normalize))
