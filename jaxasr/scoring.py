"""Word and character error rates after Whisper's text normalizers (jiwer does the alignment)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jiwer
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer


def normalizer(language: str | None = "en", spelling: dict[str, str] | None = None) -> Callable[[str], str]:
    """Whisper's English normalizer for English (contractions, numbers, spelling when a mapping is
    given); the basic one (case, punctuation, diacritics) for other languages."""
    if language in (None, "en", "english"):
        return EnglishTextNormalizer(spelling or {})
    return BasicTextNormalizer(remove_diacritics=False)


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], normalize: Callable[[str], str] | None = None
) -> dict[str, float]:
    """{'wer': ..., 'cer': ...} in percent over the whole set (not averaged per utterance).

    Pairs whose normalized reference is empty are left out (there is nothing to score them by) and
    counted in 'skipped'."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    normalize = normalize or normalizer("en")
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    kept = [(r, h) for r, h in pairs if r.strip()]
    if not kept:
        raise ValueError("no reference with any words left after normalization")
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    return {
        "wer": 100.0 * jiwer.wer(refs, hyps),
        "cer": 100.0 * jiwer.cer(refs, hyps),
        "utterances": len(kept),
        "skipped": len(pairs) - len(kept),
    }
