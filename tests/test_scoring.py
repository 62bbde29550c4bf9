"""WER/CER scoring: Whisper's English normalizer with its spelling map, and summing shard counts."""

from __future__ import annotations

import pytest

from jaxasr.scoring import english_spelling, error_counts, error_rates, normalizer, rates_from_counts


def test_english_normalizer_maps_british_spelling_like_whisper():
    assert len(english_spelling()) > 1700  # Whisper's full map, shipped with the package
    norm = normalizer("en")
    assert norm("The colour of my favourite centre; I analysed the programme.") == \
        "the color of my favorite center i analyzed the program"
    assert normalizer("en", spelling={})("colour") == "colour"  # an explicit map replaces Whisper's


def test_spelling_variants_are_not_errors():
    rates = error_rates(["Take the amoxicillin, flavoured syrup, at the centre."],
                        ["take the amoxicillin flavored syrup at the center"])
    assert rates["wer"] == 0.0 and rates["cer"] == 0.0


def test_shard_counts_sum_to_the_whole_set():
    refs = ["red green blue", "cyan magenta", "black"]
    hyps = ["red grin blue", "cyan", "black white"]
    whole = rates_from_counts(error_counts(refs, hyps))
    parts = [error_counts(refs[:2], hyps[:2]), error_counts(refs[2:], hyps[2:])]
    summed = rates_from_counts({k: sum(p[k] for p in parts) for k in parts[0]})
    assert summed == pytest.approx(whole)
    assert whole["wer"] == pytest.approx(100 * 3 / 6)  # one substitution, one deletion, one insertion
