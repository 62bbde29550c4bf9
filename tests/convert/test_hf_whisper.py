"""Hugging Face <-> jaxasr: loading directories, exporting them back bit-exact, jaxasr model dirs."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxasr.convert.__main__ import main as convert_main
from jaxasr.convert.export import export_hf, save_native
from jaxasr.convert.sources import bundled_model_dir, load_checkpoint, load_tokenizer

SIZES = dict(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_model_dir("tiny.en"))


def save_reference(path, tokenizer, *, safe: bool = True, n_mels: int = 80):
    torch.manual_seed(1)
    cfg = transformers.WhisperConfig(num_mel_bins=n_mels, decoder_start_token_id=50257, eos_token_id=50256,
                                     pad_token_id=50256, bos_token_id=50256, **SIZES)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.suppress_tokens = [1, 2, 7]
    model.generation_config.begin_suppress_tokens = [220, 50256]
    model.generation_config.no_timestamps_token_id = 50362
    model.save_pretrained(path)
    if not safe:  # an older checkpoint: pickled PyTorch weights instead of safetensors
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    transformers.WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(path)
    return model


def logits(model, features, tokens):
    with torch.no_grad():
        return model(input_features=torch.tensor(features), decoder_input_ids=torch.tensor(tokens)).logits.numpy()


def test_hf_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, tokenizer):
    src, out = tmp_path / "src", tmp_path / "out"
    ref = save_reference(src, tokenizer, n_mels=128)
    ckpt = load_checkpoint(src)
    export_hf(ckpt, out)

    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    original.pop("proj_out.weight", None)  # tied to the token embedding; neither side needs it stored
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key

    reloaded = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = transformers.WhisperProcessor.from_pretrained(out)
    assert processor.feature_extractor.feature_size == 128
    assert reloaded.generation_config.suppress_tokens == [1, 2, 7]
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, 128, 3000)).astype(np.float32)
    tokens = np.array([[50257, 50362, 440, 1049]])
    np.testing.assert_array_equal(logits(reloaded, features, tokens), logits(ref, features, tokens))

    model = ckpt.build()
    ours = np.asarray(nnx.jit(lambda m, f, t: m(f, t))(model, jnp.asarray(features), jnp.asarray(tokens)))
    assert np.abs(ours - logits(ref, features, tokens)).max() <= 1e-4


def test_pytorch_bin_and_native_dir_load_the_same_weights(tmp_path, tokenizer):
    save_reference(tmp_path / "bin", tokenizer, safe=False)
    save_reference(tmp_path / "st", tokenizer)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    from_bin, from_st = load_checkpoint(tmp_path / "bin"), load_checkpoint(tmp_path / "st")
    save_native(from_st, tmp_path / "native")
    from_native = load_checkpoint(tmp_path / "native")
    for key, value in from_st.params.items():
        assert np.array_equal(from_bin.params[key], value), key
        assert np.array_equal(from_native.params[key], value), key
    assert from_native.generation_config == from_st.generation_config
    assert from_native.tokenizer.get_vocab() == from_st.tokenizer.get_vocab()


def test_convert_cli_writes_a_directory_transformers_loads(tmp_path, tokenizer, capsys):
    save_reference(tmp_path / "src", tokenizer)
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "native"), "--to", "jaxasr"]) == 0
    assert convert_main([str(tmp_path / "native"), str(tmp_path / "hf16"), "--dtype", "float16"]) == 0
    config = json.loads((tmp_path / "hf16" / "config.json").read_text())
    assert config["architectures"] == ["WhisperForConditionalGeneration"] and config["dtype"] == "float16"
    exported = load_file(str(tmp_path / "hf16" / "model.safetensors"))
    assert all(v.dtype == np.float16 for v in exported.values())
    transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf16")
    assert "wrote" in capsys.readouterr().out


def test_bad_sources_name_the_problem(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing: no such model directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face, CTranslate2 or jaxasr"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not 'whisper'"):
        load_checkpoint(tmp_path / "llama")
    with pytest.raises(ValueError, match="unknown bundled model"):
        load_checkpoint("bundled:large-v9")


def test_hub_ids_download_metadata_and_safetensors_only(tmp_path, tokenizer, monkeypatch):
    """The hub path without a network: huggingface_hub is stubbed with a local snapshot."""
    import huggingface_hub

    save_reference(tmp_path / "snapshot", tokenizer)
    calls = {}

    def snapshot_download(repo_id, allow_patterns):
        calls["snapshot"] = (repo_id, allow_patterns)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id: ["config.json", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ckpt = load_checkpoint("openai/whisper-test")
    repo_id, patterns = calls["snapshot"]
    assert repo_id == "openai/whisper-test"
    assert "model.safetensors" in patterns and "pytorch_model.bin" not in patterns
    assert ckpt.config().d_model == SIZES["d_model"]
