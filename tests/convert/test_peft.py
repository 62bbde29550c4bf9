"""LoRA Whisper -> PEFT adapter: PyTorch `peft.PeftModel` on the exported HF Whisper gives jaxasr's
logits, merged or not; and the adapter imports back into jaxasr."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from jaxasr.convert.export import export_hf
from jaxasr.convert.peft import export_peft, import_peft
from jaxasr.convert.sources import WhisperCheckpoint, bundled_model_dir, load_tokenizer
from jaxasr.models.lora import LoraConfig, apply_lora, lora_modules, merge_lora
from jaxasr.models.state import flat_state
from jaxasr.models.whisper import Whisper, WhisperConfig

peft = pytest.importorskip("peft")

CFG = WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_source_positions=32,
                    max_target_positions=32)
TOKENS = np.array([[50257, 50362, 440, 1049, 11], [50257, 50362, 1002, 318, 257]])
FEATURES = np.random.default_rng(0).standard_normal((2, 80, 64)).astype(np.float32)
SPECIAL = dict(decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_model_dir("tiny.en"))


def checkpoint(model, tokenizer) -> WhisperCheckpoint:
    params = {k: np.asarray(v) for k, v in flat_state(model).items() if k[-1] not in ("lora_a", "lora_b")}
    return WhisperCheckpoint(hf_config={**SPECIAL, **CFG.hf_fields()}, generation_config=dict(SPECIAL),
                             params=params, tokenizer=tokenizer, source="tiny-random")


def lora_model(targets, seed=0):
    model = apply_lora(Whisper(CFG, rngs=nnx.Rngs(0)), LoraConfig(targets=targets, rank=4, alpha=8.0, seed=seed))
    for i, m in enumerate(lora_modules(model).values()):  # non-zero B: zero would make the test vacuous
        m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(100 + i), m.lora_b.shape)
    return model


@nnx.jit
def _forward(model, features, tokens):
    return model(features, tokens)


def ours(model):
    return np.asarray(_forward(model, jnp.asarray(FEATURES), jnp.asarray(TOKENS)))


def torch_logits(model):
    with torch.no_grad():
        return model(input_features=torch.tensor(FEATURES), decoder_input_ids=torch.tensor(TOKENS)).logits.numpy()


def test_peft_loads_exported_adapter_with_jaxasr_logits_merged_or_not(tmp_path, tokenizer):
    # q/v/out_proj of self-attention (out_proj: a multi-dim [heads, kv] input) and fc1, encoder and decoder.
    model = lora_model((r"self_attn/(q_proj|v_proj|out_proj)$", r"fc1$"))
    base_dir = export_hf(checkpoint(model, tokenizer), tmp_path / "hf")
    adapter_dir = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))

    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["base_model_name_or_path"] == str(base_dir)
    # encoder_attn is not adapted, so short names would over-select: full module names instead.
    assert "model.decoder.layers.1.self_attn.out_proj" in conf["target_modules"]
    assert not any("encoder_attn" in t for t in conf["target_modules"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 4 * (2 + 2)  # (A, B) x 4 modules x (2 encoder + 2 decoder layers)
    assert tensors["base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert tensors["base_model.model.model.encoder.layers.1.fc1.lora_B.weight"].shape == (96, 4)

    base = transformers.WhisperForConditionalGeneration.from_pretrained(base_dir).eval()
    base_logits = torch_logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    n_lora = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert n_lora == 4 * (2 + 2)
    with_lora = ours(model)
    theirs = torch_logits(peft_model)
    assert np.abs(theirs - base_logits).max() > 1e-2  # the adapter changes the logits
    assert np.abs(with_lora - theirs).max() <= 1e-4

    merged_torch = torch_logits(peft_model.merge_and_unload())
    merge_lora(model)
    merged = ours(model)
    assert np.abs(merged - merged_torch).max() <= 1e-4
    assert np.abs(merged - theirs).max() <= 1e-4

    # The merged jaxasr model exported as a plain HF Whisper gives the same logits too.
    merged_dir = export_hf(checkpoint(model, tokenizer), tmp_path / "merged")
    exported = transformers.WhisperForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert np.abs(torch_logits(exported) - theirs).max() <= 1e-4


def test_short_target_names_and_import_back(tmp_path):
    model = lora_model((r"(q_proj|v_proj)$",))  # every q/v projection, encoder_attn included
    adapter_dir = export_peft(model, tmp_path / "adapter")
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q_proj", "v_proj"]
    assert len(load_file(str(adapter_dir / "adapter_model.safetensors"))) == 2 * 2 * (2 + 2 * 2)

    back = import_peft(Whisper(CFG, rngs=nnx.Rngs(0)), adapter_dir)
    assert sorted(lora_modules(back)) == sorted(lora_modules(model))
    for path, m in lora_modules(model).items():
        n = lora_modules(back)[path]
        np.testing.assert_array_equal(np.asarray(n.lora_a[...]), np.asarray(m.lora_a[...]))
        np.testing.assert_array_equal(np.asarray(n.lora_b[...]), np.asarray(m.lora_b[...]))
    np.testing.assert_array_equal(ours(back), ours(model))
