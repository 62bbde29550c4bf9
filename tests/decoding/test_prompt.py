"""Decoder prompts and token rules (`jaxasr.decoding.prompt`), and how greedy search applies them."""

from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from jaxasr.decoding.generate import beam_search, greedy_search, max_new_tokens_for
from jaxasr.decoding.prompt import DecodingRules, decoding_rules, language_ids, special_token_ids
from jaxasr.models.state import flat_state, load_flat_state
from jaxasr.models.whisper import Whisper, WhisperConfig

# --------------------------------------------------------------------------- generation configs

# Whisper tiny.en's generation_config.json (as the bundled checkpoint gives it), trimmed.
EN_SUPPRESS = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 357, 366,
               438, 532, 685, 705, 796, 930, 1058, 1220, 1267, 1279, 1303, 1343, 1377, 1391, 1635, 1782, 1875, 2162,
               2361, 2488, 3467, 4008, 4211, 4600, 4808, 5299, 5855, 6329, 7203, 9609, 9959, 10563, 10786, 11420,
               11709, 11907, 13163, 13697, 13700, 14808, 15306, 16410, 16791, 17992, 19203, 19510, 20724, 22305,
               22935, 27007, 30109, 30420, 33409, 34949, 40283, 40493, 40549, 47282, 49146, 50257, 50357, 50358,
               50359, 50360, 50361]
EN_CONFIG = {
    "decoder_start_token_id": 50257, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256,
    "max_length": 448, "suppress_tokens": EN_SUPPRESS, "begin_suppress_tokens": [220, 50256],
    "no_timestamps_token_id": 50362, "prev_sot_token_id": 50360, "max_initial_timestamp_index": 50,
    "is_multilingual": False,
}
EN_VOCAB = {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|startofprev|>": 50360,
            "<|nocaptions|>": 50361, "<|notimestamps|>": 50362, "Hello": 15496}

# A multilingual (v2: 99 languages) generation config, as openai/whisper-tiny ... large-v2 ship it.
LANGS = list(LANGUAGES)[:99]  # en, zh, de, es, ru, ko, fr, ja, ... (v3 adds yue)
ML_LANG_TO_ID = {f"<|{code}|>": 50259 + i for i, code in enumerate(LANGS)}
ML_SUPPRESS = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 359, 503,
               522, 542, 873, 893, 902, 918, 922, 931, 1350, 1853, 1982, 2460, 2627, 3246, 3253, 3268, 3536, 3846,
               3961, 4183, 4667, 6585, 6647, 7273, 9061, 9383, 10428, 10929, 11938, 12033, 12331, 12562, 13793,
               14157, 14635, 15265, 15618, 16553, 16604, 18362, 18956, 20075, 21675, 22520, 26130, 26161, 26435,
               28279, 29464, 31650, 32302, 32470, 36865, 42863, 47425, 49870, 50254, 50258, 50358, 50359, 50360,
               50361, 50362]
ML_CONFIG = {
    "alignment_heads": [[2, 2], [3, 0], [3, 2], [3, 3], [3, 4], [3, 5]],
    "begin_suppress_tokens": [220, 50257],
    "bos_token_id": 50257,
    "decoder_start_token_id": 50258,
    "eos_token_id": 50257,
    "forced_decoder_ids": [[1, None], [2, 50359]],
    "is_multilingual": True,
    "lang_to_id": ML_LANG_TO_ID,
    "max_initial_timestamp_index": 50,
    "max_length": 448,
    "no_timestamps_token_id": 50363,
    "pad_token_id": 50257,
    "prev_sot_token_id": 50361,
    "return_timestamps": False,
    "suppress_tokens": ML_SUPPRESS,
    "task_to_id": {"transcribe": 50359, "translate": 50358},
}
ML_VOCAB = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, **ML_LANG_TO_ID, "<|translate|>": 50358,
            "<|transcribe|>": 50359, "<|startoflm|>": 50360, "<|startofprev|>": 50361, "<|nospeech|>": 50362,
            "<|notimestamps|>": 50363}


def test_language_table_is_the_multilingual_one():
    assert ML_LANG_TO_ID["<|en|>"] == 50259 and ML_LANG_TO_ID["<|de|>"] == 50261
    assert ML_LANG_TO_ID["<|fr|>"] == 50265 and ML_LANG_TO_ID["<|ja|>"] == 50266
    assert max(ML_LANG_TO_ID.values()) == 50357  # the last language sits right before <|translate|>


# --------------------------------------------------------------------------- English-only


@pytest.mark.parametrize("language", [None, "en", "english"])
def test_english_only_rules(language):
    rules = decoding_rules(EN_CONFIG, EN_VOCAB, language=language)
    assert rules == DecodingRules(
        prompt=(50257, 50362),  # <|startoftranscript|> <|notimestamps|>: no language or task token
        eot=50256,
        suppress_tokens=tuple(EN_SUPPRESS),
        begin_suppress_tokens=(220, 50256),
        max_length=448,
    )


def test_english_only_rules_of_the_bundled_checkpoint(tiny_en_checkpoint):
    vocab = tiny_en_checkpoint.tokenizer.get_vocab()
    rules = decoding_rules(tiny_en_checkpoint.generation_config, vocab)
    assert rules == decoding_rules(EN_CONFIG, EN_VOCAB)
    # The ids of the generation config are the tokenizer's.
    assert rules.prompt == (vocab["<|startoftranscript|>"], vocab["<|notimestamps|>"])
    assert rules.eot == vocab["<|endoftext|>"]
    assert vocab["Hello"] == EN_VOCAB["Hello"]


@pytest.mark.parametrize("language", ["de", "fr", "zh", "<|de|>"])
def test_english_only_rejects_other_languages(language):
    with pytest.raises(ValueError, match="English-only") as e:
        decoding_rules(EN_CONFIG, EN_VOCAB, language=language)
    assert repr(language) in str(e.value)


# --------------------------------------------------------------------------- multilingual


@pytest.mark.parametrize(
    ("language", "task", "prompt"),
    [
        ("en", "transcribe", (50258, 50259, 50359, 50363)),
        ("de", "transcribe", (50258, 50261, 50359, 50363)),
        ("fr", "translate", (50258, 50265, 50358, 50363)),
        ("<|ja|>", "transcribe", (50258, 50266, 50359, 50363)),  # token spelling accepted
        ("DE", "translate", (50258, 50261, 50358, 50363)),  # case-insensitive
        ("su", "transcribe", (50258, 50357, 50359, 50363)),  # the last v2 language
    ],
)
def test_multilingual_prompt(language, task, prompt):
    rules = decoding_rules(ML_CONFIG, ML_VOCAB, language=language, task=task)
    assert rules.prompt == prompt  # <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>
    assert rules.eot == 50257
    assert rules.suppress_tokens == tuple(ML_SUPPRESS)
    assert rules.begin_suppress_tokens == (220, 50257)
    assert rules.max_length == 448


@pytest.fixture(scope="module")
def hf_multilingual():
    """A random, very small multilingual transformers Whisper (only its prompt logic is used)."""
    import torch

    config = transformers.WhisperConfig(vocab_size=51865, d_model=16, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                        decoder_ffn_dim=16, max_source_positions=8, num_mel_bins=8)
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval(), torch.zeros(1, 8, 16)


@pytest.mark.parametrize(("language", "task"), [("en", "transcribe"), ("de", "transcribe"), ("fr", "translate"),
                                                ("ja", "translate"), ("su", "transcribe")])
def test_multilingual_prompt_matches_transformers(hf_multilingual, language, task):
    """transformers' `generate` with the same generation config starts with the same prompt."""
    model, features = hf_multilingual
    out = model.generate(features, generation_config=transformers.GenerationConfig.from_dict(ML_CONFIG),
                         language=language, task=task, max_new_tokens=1, return_dict_in_generate=True)
    prompt = decoding_rules(ML_CONFIG, ML_VOCAB, language=language, task=task).prompt
    assert tuple(out.sequences[0, : len(prompt)].tolist()) == prompt


def test_multilingual_needs_a_language():
    with pytest.raises(ValueError, match="needs a language"):
        decoding_rules(ML_CONFIG, ML_VOCAB)


@pytest.mark.parametrize("language", ["xx", "klingon", "<|xx|>"])
def test_multilingual_unknown_language(language):
    with pytest.raises(ValueError, match="unknown language") as e:
        decoding_rules(ML_CONFIG, ML_VOCAB, language=language)
    assert repr(language) in str(e.value)
    assert "de, el, en" in str(e.value)  # lists what the model knows


@pytest.mark.parametrize("task", ["summarize", ""])
def test_multilingual_unknown_task(task):
    with pytest.raises(ValueError, match="unknown task") as e:
        decoding_rules(ML_CONFIG, ML_VOCAB, language="de", task=task)
    assert repr(task) in str(e.value)


def test_language_ids():
    ids = language_ids(ML_CONFIG)
    assert len(ids) == 99 and ids["en"] == 50259 and ids["su"] == 50357
    assert language_ids(EN_CONFIG) == {}


# --------------------------------------------------------------------------- special tokens


def test_special_token_ids_prefer_the_generation_config():
    vocab = {**ML_VOCAB, "<|endoftext|>": 1, "<|startoftranscript|>": 2, "<|notimestamps|>": 3}
    assert special_token_ids(ML_CONFIG, vocab) == {"sot": 50258, "eot": 50257, "no_timestamps": 50363}


def test_special_token_ids_fall_back_to_the_vocabulary():
    config = {k: v for k, v in EN_CONFIG.items()
              if k not in ("decoder_start_token_id", "eos_token_id", "no_timestamps_token_id")}
    assert special_token_ids(config, EN_VOCAB) == {"sot": 50257, "eot": 50256, "no_timestamps": 50362}
    assert decoding_rules(config, EN_VOCAB) == decoding_rules(EN_CONFIG, EN_VOCAB)


def test_special_token_ids_list_valued_eos():
    assert special_token_ids({**EN_CONFIG, "eos_token_id": [50256, 50257]}, EN_VOCAB)["eot"] == 50256


def test_special_token_missing_everywhere():
    config = {k: v for k, v in EN_CONFIG.items() if k != "no_timestamps_token_id"}
    vocab = {k: v for k, v in EN_VOCAB.items() if k != "<|notimestamps|>"}
    with pytest.raises(ValueError, match="no_timestamps_token_id.*<\\|notimestamps\\|>"):
        decoding_rules(config, vocab)


def test_defaults_for_missing_lists_and_length():
    config = {k: v for k, v in EN_CONFIG.items() if k not in ("suppress_tokens", "begin_suppress_tokens", "max_length")}
    rules = decoding_rules(config, EN_VOCAB)
    assert rules.suppress_tokens == () and rules.begin_suppress_tokens == ()
    assert rules.max_length == 448
    assert decoding_rules({**config, "suppress_tokens": None}, EN_VOCAB).suppress_tokens == ()


def test_rules_are_hashable_static_arguments():
    # greedy_search / beam_search take the rules as a static jit argument: equal rules built twice
    # must hash equal, or every call would compile again.
    a, b = decoding_rules(ML_CONFIG, ML_VOCAB, language="de"), decoding_rules(ML_CONFIG, ML_VOCAB, language="de")
    assert a == b and hash(a) == hash(b)
    assert a != decoding_rules(ML_CONFIG, ML_VOCAB, language="fr")
    assert all(isinstance(t, int) for t in a.prompt + a.suppress_tokens + a.begin_suppress_tokens)


def test_max_new_tokens_for():
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(max_target_positions=448))
    rules = decoding_rules(ML_CONFIG, ML_VOCAB, language="de")  # 4 prompt tokens
    assert max_new_tokens_for(model, rules) == 444
    assert max_new_tokens_for(model, rules, 10) == 10
    assert max_new_tokens_for(model, rules, 10_000) == 444
    assert max_new_tokens_for(model, rules, 0) == 1
    short = types.SimpleNamespace(cfg=types.SimpleNamespace(max_target_positions=32))
    assert max_new_tokens_for(short, rules) == 28
    assert max_new_tokens_for(model, dataclasses.replace(rules, max_length=20)) == 16


# --------------------------------------------------------------------------- greedy search on a tiny random model

TINY = WhisperConfig(vocab_size=48, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=2,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_source_positions=8, max_target_positions=16)
MAX_NEW = 8


@pytest.fixture(scope="module")
def tiny_model():
    """A random tiny Whisper (built abstractly and filled with random weights: no init to compile)."""
    model = nnx.eval_shape(lambda: Whisper(TINY, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    flat = {path: rng.normal(0.0, 0.5, a.shape).astype(np.float32) for path, a in flat_state(model).items()}
    emb = flat["decoder", "embed_tokens", "embedding"]  # equal norms: no token wins everywhere
    flat["decoder", "embed_tokens", "embedding"] = 3.0 * emb / np.linalg.norm(emb, axis=1, keepdims=True)
    load_flat_state(model, flat)
    features = rng.normal(size=(3, TINY.num_mel_bins, TINY.n_audio_frames)).astype(np.float32)
    return model, features


@nnx.jit
def _forward(model, features, tokens):
    return model(features, tokens)


def reference_greedy(model, features, rules: DecodingRules, max_new: int) -> np.ndarray:
    """Greedy decoding by full teacher-forced forwards (no cache), masks applied as in HF.
    Sequences are padded to a fixed length (one compile): causal attention ignores the padding."""
    batch, start = len(features), len(rules.prompt)
    seqs = np.full((batch, start + max_new), rules.eot, np.int32)
    seqs[:, :start] = rules.prompt
    out = np.full((batch, max_new), rules.eot)
    done = np.zeros(batch, bool)
    for step in range(max_new):
        logits = np.array(_forward(model, jnp.asarray(features), jnp.asarray(seqs))[:, start + step - 1])
        logits[:, list(rules.suppress_tokens)] = -np.inf
        if step == 0:
            logits[:, list(rules.begin_suppress_tokens)] = -np.inf
        nxt = np.where(done, rules.eot, logits.argmax(-1))
        out[:, step] = nxt
        done |= nxt == rules.eot
        seqs[:, start + step] = nxt
    return out


def test_greedy_suppression_and_end_of_text(tiny_model):
    """greedy_search against a cache-free reference loop, with suppress_tokens,
    begin_suppress_tokens and an end-of-text that one row produces early."""
    model, features = tiny_model
    plain = DecodingRules(prompt=(45, 46), eot=47, suppress_tokens=(), begin_suppress_tokens=(), max_length=16)
    free = reference_greedy(model, features, plain, MAX_NEW)  # (greedy_search compiles once, below)

    # Suppress the most common generated token always and row 1's first token at the first step.
    # Then make end-of-text a token that row 0 produces under these rules but that no other row
    # starts with: row 0 ends early, the others go on (the reference loop says where rows go).
    values, counts = np.unique(free, return_counts=True)
    suppress = (int(values[np.argmax(counts)]),)
    begin = tuple({int(free[1, 0])} - set(suppress)) or (int(free[0, 0]),)
    probe = DecodingRules(prompt=(45, 46), eot=47, suppress_tokens=suppress, begin_suppress_tokens=begin,
                          max_length=16)
    probed = reference_greedy(model, features, probe, MAX_NEW)
    eot = next((int(t) for t in probed[0] if t not in probed[1:, 0]), None)
    assert eot is not None, f"no usable end-of-text in {probed}"
    rules = dataclasses.replace(probe, eot=eot)
    out = np.asarray(greedy_search(model, jnp.asarray(features), rules, MAX_NEW))
    print(f"\nno rules:\n{free}\nsuppress {suppress}, begin {begin}, eot {eot}:\n{out}")
    np.testing.assert_array_equal(out, reference_greedy(model, features, rules, MAX_NEW))
    assert not set(out.ravel()) & set(suppress)
    assert not set(out[:, 0]) & set(begin)
    assert eot in out[0]
    for row in out:  # once ended, only end-of-text follows
        ends = np.flatnonzero(row == eot)
        if len(ends):
            assert (row[ends[0]:] == eot).all()
    assert (out[1:, 0] != eot).all()  # the other rows went on


def test_scanned_layers_decode_like_unrolled_ones(tiny_model):
    """A model configured for scanned, rematerialized layers decodes (greedy and beam search, whose
    loops run the layers unrolled) to the unrolled model's tokens; nnx.scan inside the token loop
    used to fail on modules from the enclosing jit."""
    model, features = tiny_model
    scanned = nnx.eval_shape(lambda: Whisper(dataclasses.replace(TINY, scan_layers=True, remat_policy="full"), rngs=nnx.Rngs(0)))
    load_flat_state(scanned, flat_state(model))
    rules = DecodingRules(prompt=(45, 46), eot=47, suppress_tokens=(), begin_suppress_tokens=(), max_length=16)
    x = jnp.asarray(features)
    for search in (lambda m: greedy_search(m, x, rules, MAX_NEW), lambda m: beam_search(m, x, rules, MAX_NEW, 3)):
        unrolled = np.asarray(search(model))
        np.testing.assert_array_equal(np.asarray(search(scanned)), unrolled)
        assert (unrolled != rules.eot).any()  # real tokens were compared
