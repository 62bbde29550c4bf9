"""Transcript handling (`jaxasr.data.text`): decoding, Whisper targets against transformers, corruption."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxasr.data.errors import DataError
from jaxasr.data.text import WhisperTargets, corrupt_text, decode_text, encode_text_only

SENTENCES = [
    "The weather is lovely today, so we are going for a walk.",
    "Could you please close the window before you leave?",
    "Take the amoxicillin twice daily with food.",
    "Your blood pressure is a little high, so we will check it next week.",
    "The bank approved our mortgage application this morning.",
    "Good morning, and thank you for calling the clinic.",
    "If you feel dizzy or short of breath, call us right away.",
    "Please bring your insurance card and a list of your medicines.",
    "The pharmacy will send a reminder when your prescription is ready.",
    "Ça coûte 3,50 € — naïve café!",
]


@pytest.fixture(scope="module")
def tiny(tiny_en_checkpoint):
    return tiny_en_checkpoint.tokenizer, tiny_en_checkpoint.generation_config


# --------------------------------------------------------------------------- decode_text


def test_decode_text_cleans_whitespace_and_accepts_bytes():
    assert decode_text("  hello \t\n  world  ", "ex") == "hello world"
    assert decode_text("naïve café".encode(), "ex") == "naïve café"


@pytest.mark.parametrize("value", [b"\xff\xfe bad", b"caf\xe9"])
def test_decode_text_rejects_non_utf8(value):
    with pytest.raises(DataError, match="utt-17") as err:
        decode_text(value, "utt-17")
    assert err.value.reason == "text_not_utf8"


@pytest.mark.parametrize("value", ["", "   \n\t ", b"", b"  "])
def test_decode_text_rejects_empty(value):
    with pytest.raises(DataError, match="utt-3") as err:
        decode_text(value, "utt-3")
    assert err.value.reason == "text_empty"


# --------------------------------------------------------------------------- Whisper targets


def test_tokens_equal_transformers(tiny):
    tokenizer, generation_config = tiny
    targets = WhisperTargets(tokenizer, generation_config)
    for text in SENTENCES:
        out = targets.encode(text, "ex")
        tokens = np.concatenate([out["decoder_input_ids"], out["labels"][-1:]])
        # HF's tokenizer call adds its prefix tokens (SOT, notimestamps for tiny.en) and eot.
        expected = tokenizer(" " + text).input_ids
        assert tokens.tolist() == expected, text
        assert expected[: len(targets.prompt)] == list(tokenizer.prefix_tokens)


def test_labels_and_mask_align(tiny):
    tokenizer, generation_config = tiny
    targets = WhisperTargets(tokenizer, generation_config)
    text = SENTENCES[0]
    out = targets.encode(text, "ex")
    dec, labels, mask = out["decoder_input_ids"], out["labels"], out["loss_mask"]
    assert dec.dtype == np.int32 and labels.dtype == np.int32
    assert dec.shape == labels.shape == mask.shape
    np.testing.assert_array_equal(labels[:-1], dec[1:])  # labels are inputs shifted by one
    assert dec.tolist()[: len(targets.prompt)] == list(targets.prompt)
    text_ids = targets.encode_text_only(text)
    assert text_ids.dtype == np.int32
    # Loss only on the text and eot; no prompt token is ever a scored label.
    np.testing.assert_array_equal(labels[mask > 0], np.concatenate([text_ids, [targets.eot]]))
    assert not np.isin(labels[mask > 0][:-1], targets.prompt).any()
    assert mask.tolist() == [0.0] * (len(targets.prompt) - 1) + [1.0] * (len(text_ids) + 1)


def test_multilingual_prompt_is_masked(tiny):
    tokenizer, generation_config = tiny
    config = dict(generation_config, is_multilingual=True, lang_to_id={"<|en|>": 50259, "<|de|>": 50261},
                  task_to_id={"transcribe": 50359, "translate": 50358})
    targets = WhisperTargets(tokenizer, config, language="de", task="translate")
    out = targets.encode("hello", "ex")
    assert out["decoder_input_ids"].tolist()[:4] == [50257, 50261, 50358, 50362]
    assert out["loss_mask"].tolist()[:4] == [0.0, 0.0, 0.0, 1.0]  # label at index 2 is notimestamps


def test_label_too_long_is_raised_not_truncated(tiny):
    tokenizer, generation_config = tiny
    text = SENTENCES[3]
    n = len(WhisperTargets(tokenizer, generation_config).encode(text)["labels"])
    assert len(WhisperTargets(tokenizer, generation_config, max_label_tokens=n).encode(text)["labels"]) == n
    with pytest.raises(DataError, match=rf"utt-9.*\b{n}\b.*\b{n - 1}\b") as err:
        WhisperTargets(tokenizer, generation_config, max_label_tokens=n - 1).encode(text, "utt-9")
    assert err.value.reason == "label_too_long"


def test_default_budget_is_max_length(tiny):
    tokenizer, generation_config = tiny
    targets = WhisperTargets(tokenizer, generation_config)
    assert targets.max_label_tokens == generation_config["max_length"] == 448
    with pytest.raises(DataError) as err:
        targets.encode("word " * 500, "long")
    assert err.value.reason == "label_too_long"


def test_special_token_text_stays_text(tiny):
    tokenizer, generation_config = tiny
    targets = WhisperTargets(tokenizer, generation_config)
    labels = targets.encode("a <|endoftext|> b")["labels"]
    assert (labels == targets.eot).sum() == 1 and labels[-1] == targets.eot
    # The Rust backend called directly reads it as the transformers wrapper does when asked to.
    expected = tokenizer.encode(" a <|endoftext|> b", add_special_tokens=False, split_special_tokens=True)
    assert targets.encode_text_only("a <|endoftext|> b").tolist() == expected


def test_encode_reports_bad_text(tiny):
    targets = WhisperTargets(*tiny)
    with pytest.raises(DataError) as err:
        targets.encode(b"\x80\x81", "utt-1")
    assert err.value.reason == "text_not_utf8"
    with pytest.raises(DataError) as err:
        targets.encode_text_only("  ", "utt-2")
    assert err.value.reason == "text_empty"


def test_encode_text_only_leading_space(tiny):
    tokenizer, _ = tiny
    assert encode_text_only(tokenizer, "hello world").tolist() == tokenizer.encode("hello world",
                                                                                   add_special_tokens=False)
    spaced = encode_text_only(tokenizer, "hello world", leading_space=True).tolist()
    assert spaced == tokenizer.encode(" hello world", add_special_tokens=False) and spaced[0] != 31373


# --------------------------------------------------------------------------- corruption


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def test_corruption_counts_and_rates():
    touched_words = total_words = subst_letters = touched_letters = 0
    position_hits = np.zeros(len(SENTENCES[3].split()))
    for seed in range(200):
        for text in SENTENCES:
            out = corrupt_text(text, seed, dup_prob=0.0)
            words, new = text.split(" "), out.split(" ")
            assert len(words) == len(new) and [len(w) for w in words] == [len(w) for w in new]
            hit = [a != b for a, b in zip(words, new)]
            n_words = sum(any(c.isalpha() for c in w) for w in words)
            assert sum(hit) == max(1, _round(0.15 * n_words)), (seed, text, out)
            touched_words += sum(hit)
            total_words += n_words
            for a, b in zip(words, new):
                if a != b:
                    n_letters = sum(c.isalpha() for c in a)
                    changed = sum(x != y for x, y in zip(a, b))
                    assert changed == max(1, _round(0.3 * n_letters)), (a, b)
                    assert all(x == y for x, y in zip(a, b) if not x.isalpha())
                    subst_letters += changed
                    touched_letters += n_letters
            if text == SENTENCES[3]:
                position_hits += hit
    assert touched_words / total_words == pytest.approx(0.15, abs=0.03)
    assert subst_letters / touched_letters == pytest.approx(0.3, abs=0.05)
    # Words are chosen uniformly: each of the 14 positions is hit about 2/14 of the time.
    assert position_hits.min() > 0.07 * 200 and position_hits.max() < 0.22 * 200


def test_duplication_rate():
    isolated = duplicated = extras = 0
    for seed in range(100):
        for text in SENTENCES:
            out = corrupt_text(text, seed, word_fraction=0.0, dup_prob=0.1, max_extra=3)
            runs_in = [(c, len(list(g))) for c, g in itertools.groupby(text)]
            runs_out = [(c, len(list(g))) for c, g in itertools.groupby(out)]
            assert [c for c, _ in runs_in] == [c for c, _ in runs_out]  # only repeats, nothing substituted
            for (c, n_in), (_, n_out) in zip(runs_in, runs_out):
                if not c.isalpha():
                    assert n_out == n_in
                elif n_in == 1:  # a single letter: its extra copies are unambiguous
                    isolated += 1
                    assert 0 <= n_out - 1 <= 3
                    duplicated += n_out > 1
                    extras += n_out - 1
    assert duplicated / isolated == pytest.approx(0.1, abs=0.015)
    assert extras / duplicated == pytest.approx(2.0, abs=0.15)  # uniform over 1..3 extra copies


def test_corruption_is_deterministic_and_seeded():
    text = SENTENCES[0]
    assert corrupt_text(text, 7) == corrupt_text(text, 7)
    outs = {corrupt_text(text, seed) for seed in range(30)}
    assert len(outs) >= 28
    assert text not in outs
    assert corrupt_text(text, 7, word_fraction=0.0, dup_prob=0.0) == text


def test_corruption_preserves_case():
    text = "McDonald told NASA, OpenAI and Éric: ok!"
    for seed in range(20):
        out = corrupt_text(text, seed, word_fraction=1.0, char_fraction=1.0, dup_prob=0.0)
        assert len(out) == len(text)
        for a, b in zip(text, out):
            if a.isalpha():
                assert b.lower() != a.lower() and b.lower() in "abcdefghijklmnopqrstuvwxyz"
                assert b.isupper() == a.isupper()
            else:
                assert b == a


def test_corruption_edge_cases():
    assert corrupt_text("", 0) == ""
    assert corrupt_text("123 -- 45", 0, dup_prob=0.5) == "123 -- 45"  # no letters, no words
    assert corrupt_text("a", 0, dup_prob=0.0) != "a"  # one word: at least one word, one letter
    with pytest.raises(ValueError, match="dup_prob"):
        corrupt_text("abc", 0, dup_prob=1.5)


def test_corruption_rounds_half_up():
    # 0.5 * 5 = 2.5 rounds to 3 (Python's round() would give 2).
    out = corrupt_text("abcde", 0, word_fraction=1.0, char_fraction=0.5, dup_prob=0.0)
    assert sum(a != b for a, b in zip("abcde", out)) == 3
    out = corrupt_text("ab cd ef gh ij", 0, word_fraction=0.5, char_fraction=1.0, dup_prob=0.0)
    assert sum(a != b for a, b in zip("ab cd ef gh ij".split(), out.split())) == 3
