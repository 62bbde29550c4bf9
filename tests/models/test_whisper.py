"""Parity of jaxasr's Whisper with transformers' PyTorch Whisper, and the model's invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxasr.convert.hf_whisper import hf_to_jaxasr, jaxasr_to_hf
from jaxasr.models.state import flat_state, load_flat_state
from jaxasr.models.whisper import PRESETS, KVCache, Whisper, WhisperConfig
from jaxasr.training.step import token_loss

TINY = dict(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=128, max_target_positions=40)


def reference(n_mels: int, seed: int = 0) -> transformers.WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    hf = transformers.WhisperConfig(num_mel_bins=n_mels, decoder_start_token_id=1, pad_token_id=0,
                                    eos_token_id=2, bos_token_id=2, **TINY)
    model = transformers.WhisperForConditionalGeneration(hf).eval()
    # Default init leaves biases and norms at 0/1: randomize every tensor so each mapping is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "model.encoder.embed_positions.weight":
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layer_norm.weight" in name else 0.0))
    return model


def ours(ref, **runtime) -> Whisper:
    cfg = WhisperConfig.from_hf(ref.config.to_dict(), **runtime)
    model = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    load_flat_state(model, hf_to_jaxasr({k: v.numpy() for k, v in ref.state_dict().items()}, cfg))
    return model


def inputs(n_mels: int, batch: int = 2, length: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((batch, n_mels, 3000)).astype(np.float32)
    tokens = rng.integers(0, TINY["vocab_size"], (batch, length))
    return features, tokens


def reference_logits(ref, features, tokens) -> np.ndarray:
    with torch.no_grad():
        return ref(input_features=torch.tensor(features), decoder_input_ids=torch.tensor(tokens)).logits.numpy()


forward = nnx.jit(lambda model, features, tokens: model(features, tokens))


@pytest.fixture(scope="module", params=[80, 128], ids=["80mel", "128mel"])
def ref_and_inputs(request):
    ref = reference(request.param)
    features, tokens = inputs(request.param)
    return ref, features, tokens, reference_logits(ref, features, tokens)


@pytest.mark.parametrize(
    "runtime",
    [dict(), dict(scan_layers=True), dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots"),
     dict(attention_impl="xla"), dict(attention_impl="blocked")],
    ids=["loop", "scan", "loop-remat", "scan-remat", "xla-attention", "blocked-attention"],
)
def test_logits_match_transformers(ref_and_inputs, runtime):
    ref, features, tokens, expected = ref_and_inputs
    got = np.asarray(forward(ours(ref, **runtime), jnp.asarray(features), jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= 1e-4


def test_scan_and_remat_switches_give_same_gradients():
    ref = reference(80)
    features, tokens = inputs(80, batch=1, length=5)

    def loss(model, f, t):
        return model(f, t).astype(jnp.float32).std()

    grads = []
    for runtime in (dict(), dict(scan_layers=True, remat_policy="full")):
        g = nnx.jit(nnx.grad(loss))(ours(ref, **runtime), jnp.asarray(features), jnp.asarray(tokens))
        grads.append(jax.tree.leaves(nnx.to_pure_dict(g)))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("runtime", [dict(), dict(attention_impl="xla")], ids=["cpu-attention", "xla-attention"])
def test_gradients_match_transformers(runtime):
    """Token cross-entropy gradients of every parameter equal PyTorch's autograd through
    transformers' model (fp32), with the encoder's 1500 frames on the CPU attention kernel
    (custom backward) and on XLA's attention."""
    ref = reference(80).train()
    features, tokens = inputs(80, batch=2, length=7)
    labels = np.roll(tokens, -1, axis=1)
    logits = ref(input_features=torch.tensor(features), decoder_input_ids=torch.tensor(tokens)).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(labels).flatten()).backward()
    expected = {name: p.grad.numpy() for name, p in ref.named_parameters() if p.grad is not None}

    def loss(model, f, t, y):
        return token_loss(model(f, t), y, jnp.ones(y.shape, jnp.float32))[0]  # the train step's loss

    model = ours(ref, **runtime)
    grads = flat_state(nnx.jit(nnx.grad(loss))(model, *map(jnp.asarray, (features, tokens, labels))))
    params = flat_state(model)
    got = jaxasr_to_hf({k: grads.get(k, np.zeros_like(v)) for k, v in params.items()}, model.cfg)
    assert set(expected) <= set(got) and len(expected) > 50
    for name, g in expected.items():
        scale = np.abs(g).max()
        assert np.abs(got[name] - g).max() <= 1e-4 * scale + 1e-7, name


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_cached_decoding_equals_full_forward(scan):
    """Feeding tokens one by one through the KV cache gives the full causal forward's logits."""
    ref = reference(80)
    model = ours(ref, scan_layers=scan)
    features, tokens = inputs(80, batch=2, length=6)
    expected = reference_logits(ref, features, tokens)

    @nnx.jit
    def incremental(model, features, tokens):
        cross = model.decoder.cross_kv(model.encode(features))
        cache = KVCache.zeros(model.cfg, tokens.shape[0], 16)
        logits, cache = model.decode(tokens[:, :2], cross_kv=cross, cache=cache, index=0)  # a 2-token prompt
        steps = [logits]
        for i in range(2, tokens.shape[1]):
            logits, cache = model.decode(tokens[:, i : i + 1], cross_kv=cross, cache=cache, index=i)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1)

    got = np.asarray(incremental(model, jnp.asarray(features), jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= 1e-4


def test_bfloat16_compute_stays_close():
    ref = reference(80)
    features, tokens = inputs(80)
    expected = reference_logits(ref, features, tokens)
    got = np.asarray(forward(ours(ref, dtype="bfloat16"), jnp.asarray(features), jnp.asarray(tokens)))
    assert got.dtype == jnp.bfloat16
    scale = np.abs(expected).max()
    assert np.abs(got.astype(np.float32) - expected).max() <= 0.1 * scale
    assert np.corrcoef(got.astype(np.float32).ravel(), expected.ravel())[0, 1] > 0.99


def test_every_parameter_has_logical_axes():
    cfg = WhisperConfig(**TINY)
    model = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        axes = var.get_metadata().get("out_sharding")
        name = "/".join(map(str, path))
        assert axes is not None and len(axes) == var.get_value().ndim, (name, axes, var.get_value().shape)
        assert (axes[0] == "layers") == ("layers" in path), name


def _hf_param_count(preset: dict) -> int:
    with torch.device("meta"):
        model = transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**preset))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_transformers_parameter_count(name):
    cfg = WhisperConfig.preset(name)
    model = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    ours_count = sum(int(np.prod(v.shape)) for v in flat_state(model).values())
    assert ours_count == _hf_param_count(PRESETS[name])


def test_state_dict_map_round_trips_every_tensor():
    ref = reference(128)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    cfg = WhisperConfig.from_hf(ref.config.to_dict())
    back = jaxasr_to_hf(hf_to_jaxasr(sd, cfg), cfg)
    assert set(back) == set(sd) - {"proj_out.weight"}
    for key, value in back.items():
        assert np.array_equal(value, sd[key]), key


def test_mapping_reports_missing_and_unexpected_tensors():
    ref = reference(80)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    cfg = WhisperConfig.from_hf(ref.config.to_dict())
    broken = dict(sd)
    del broken["model.decoder.layers.1.fc1.weight"]
    with pytest.raises(KeyError, match="layers.1.fc1.weight"):
        hf_to_jaxasr(broken, cfg)
    with pytest.raises(KeyError, match="unexpected"):
        hf_to_jaxasr({**sd, "model.encoder.extra.weight": np.zeros(1)}, cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="remat_policy"):
        WhisperConfig(remat_policy="sometimes")
    with pytest.raises(ValueError, match="divisible"):
        WhisperConfig(d_model=100, encoder_attention_heads=6)
    with pytest.raises(ValueError, match="unknown Whisper preset"):
        WhisperConfig.preset("huge")
    assert WhisperConfig.preset("large-v3-turbo").decoder_layers == 4
    assert WhisperConfig.preset("large-v3").num_mel_bins == 128
    assert not WhisperConfig.preset("tiny.en").is_multilingual
