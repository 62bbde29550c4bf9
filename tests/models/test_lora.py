"""LoRA on jaxasr models: identity at init, layouts and logical axes, scan/loop and jit agreement,
merging, adapter state, dropout, and a train step that updates only the adapters."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxasr.models.layers import Dense
from jaxasr.models.lora import (FREEZE_BASE, LoraConfig, LoraDense, apply_lora, count_lora_params, load_lora_state,
                                lora_config_of, lora_modules, lora_state, merge_lora)
from jaxasr.models.state import flat_state
from jaxasr.models.whisper import Whisper, WhisperConfig

CFG = WhisperConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=16,
                    max_target_positions=16)
TARGETS = (r"self_attn/(q_proj|v_proj|out_proj)$", r"fc1$")
FEATURES = jax.random.normal(jax.random.key(1), (2, 80, 32))
TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])


@nnx.jit
def _forward(model, features, tokens):
    return model(features, tokens)


def forward(model):
    return np.asarray(_forward(model, FEATURES, TOKENS))


def randomize_b(model, seed=2, std=0.1):
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b[...] = std * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape)


def lora_whisper(cfg=CFG, **kw):
    model = Whisper(cfg, rngs=nnx.Rngs(0))
    return apply_lora(model, LoraConfig(targets=TARGETS, rank=4, alpha=8.0, **kw))


def test_apply_lora_is_identity_at_init_with_named_params_and_axes():
    base = Whisper(CFG, rngs=nnx.Rngs(0))
    ref = forward(base)
    model = apply_lora(Whisper(CFG, rngs=nnx.Rngs(0)), LoraConfig(targets=TARGETS, rank=4, alpha=8.0))
    np.testing.assert_array_equal(forward(model), ref)  # B = 0

    names = sorted(lora_modules(model))
    assert names == sorted(f"{side}/layers/{m}" for side in ("encoder", "decoder")
                           for m in ("self_attn/q_proj", "self_attn/v_proj", "self_attn/out_proj", "mlp/fc1"))
    q = model.decoder.layers.self_attn.q_proj
    out = model.encoder.layers.self_attn.out_proj
    assert isinstance(q, LoraDense) and isinstance(model.decoder.layers.encoder_attn.q_proj, Dense)
    assert not isinstance(model.decoder.layers.encoder_attn.q_proj, LoraDense)
    assert q.lora_a.shape == (2, 32, 4) and q.lora_b.shape == (2, 4, 2, 16)
    assert q.lora_a.out_sharding == ("layers", "embed", "lora_rank")
    assert q.lora_b.out_sharding == ("layers", "lora_rank", "heads", "kv")
    assert out.lora_a.shape == (2, 2, 16, 4) and out.lora_b.shape == (2, 4, 32)
    assert out.lora_a.out_sharding == ("layers", "heads", "kv", "lora_rank")
    assert not np.any(np.asarray(q.lora_b[...])) and np.any(np.asarray(q.lora_a[...]))

    # Base parameter paths are unchanged; adapters sit beside the kernels.
    base_paths = set(flat_state(base))
    lora_paths = {p for p in flat_state(model) if p[-1] in ("lora_a", "lora_b")}
    assert set(flat_state(model)) == base_paths | lora_paths
    assert ("decoder", "layers", "self_attn", "q_proj", "lora_a") in lora_paths
    # per adapted module and layer: r * (in + out)
    per_layer = 4 * ((32 + 32) * 2 + (32 + 32) + (32 + 48))
    assert count_lora_params(model) == 2 * 2 * per_layer
    assert lora_config_of(model).rank == 4 and lora_config_of(model).alpha == 8.0

    with pytest.raises(ValueError, match="match no Dense"):
        apply_lora(Whisper(CFG, rngs=nnx.Rngs(0)), LoraConfig(targets=(r"no_such_layer",)))


def test_lora_forward_matches_manual_delta_scan_and_merge():
    model = lora_whisper()
    randomize_b(model)
    ours = forward(model)
    base = forward(Whisper(CFG, rngs=nnx.Rngs(0)))
    assert np.abs(ours - base).max() > 1e-2  # the adapters do something

    # The same weights with kernels W + scale * A @ B (computed by hand) give the same logits.
    manual = Whisper(CFG, rngs=nnx.Rngs(0))
    for path, m in lora_modules(model).items():
        a, b = np.asarray(m.lora_a[...]), np.asarray(m.lora_b[...])
        delta = np.stack([(a[i].reshape(-1, 4) @ b[i].reshape(4, -1)).reshape(m.kernel.shape[1:])
                          for i in range(a.shape[0])])
        node = manual
        for name in path.split("/"):
            node = getattr(node, name)
        node.kernel[...] = node.kernel[...] + 2.0 * delta
    np.testing.assert_allclose(forward(manual), ours, atol=2e-5)

    # scan_layers (one traced layer) and the unrolled loop agree.
    scanned = lora_whisper(dataclasses.replace(CFG, scan_layers=True, remat_policy="full"))
    nnx.update(scanned, nnx.state(model))
    np.testing.assert_allclose(forward(scanned), ours, atol=2e-5)

    merge_lora(model)
    assert lora_modules(model) == {} and count_lora_params(model) == 0
    assert nnx.graphdef(model) == nnx.graphdef(Whisper(CFG, rngs=nnx.Rngs(0)))  # a plain Whisper again
    np.testing.assert_allclose(forward(model), ours, atol=2e-5)


def test_lora_state_saves_and_loads_adapters_only():
    model = lora_whisper()
    randomize_b(model)
    saved = nnx.to_pure_dict(lora_state(model))
    leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
    assert leaves and all(str(path[-1].key) in ("lora_a", "lora_b") for path, _ in leaves)

    other = lora_whisper(seed=7)
    assert not np.allclose(forward(other), forward(model))
    load_lora_state(other, saved)
    np.testing.assert_array_equal(forward(other), forward(model))


def test_lora_dropout_only_in_train_mode():
    model = lora_whisper(dropout=0.5)
    randomize_b(model, std=1.0)
    model.eval()
    a, b = forward(model), forward(model)
    np.testing.assert_array_equal(a, b)
    reference = lora_whisper()
    nnx.update(reference, lora_state(model))
    np.testing.assert_allclose(forward(reference), a, atol=1e-6)  # eval: no dropout at all
    model.train()
    assert np.abs(forward(model) - a).max() > 1e-3


def test_train_step_updates_only_adapters():
    from jaxasr.parallel.mesh import make_mesh
    from jaxasr.training.step import TrainStep

    model = lora_whisper()
    randomize_b(model)  # non-zero B, so that A gets gradients too
    before = {k: np.asarray(v) for k, v in flat_state(model).items()}
    step = TrainStep.create(model, optax.adam(1e-2), make_mesh((1, 1, -1), jax.devices()[:1]),
                            freeze=(FREEZE_BASE,))

    trainable = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(step.trainable))[0]
    assert {str(p[-1].key) for p, _ in trainable} == {"lora_a", "lora_b"}
    assert sum(x.size for _, x in trainable) == count_lora_params(model)
    opt_arrays = [x for x in jax.tree.leaves(step.opt_state) if x.ndim > 0]
    assert sum(x.size for x in opt_arrays) == 2 * count_lora_params(model)  # Adam's two moments, adapters only

    labels = jnp.array([[2, 3, 4, 5], [6, 7, 8, 9]])
    batch = {"features": FEATURES, "decoder_input_ids": TOKENS, "labels": labels,
             "loss_mask": jnp.ones((2, 4), jnp.float32), "is_text": jnp.zeros((2,), bool)}
    metrics = step(batch)
    assert np.isfinite(float(metrics["loss"]))
    after = {k: np.asarray(v) for k, v in flat_state(step.model()).items()}
    assert set(after) == set(before)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {k for k in before if k[-1] in ("lora_a", "lora_b")}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_train_step_dropout_masks_follow_the_step_index(dropout):
    """With LoRA dropout the step's masks come from (adapter key, step index): the same index
    gives the same loss (so a resumed run repeats an uninterrupted one), another index other
    masks; without dropout the index changes nothing. sgd(0) keeps the weights fixed."""
    from jaxasr.parallel.mesh import make_mesh
    from jaxasr.training.step import TrainStep

    model = lora_whisper(dropout=dropout)
    randomize_b(model, std=1.0)
    eval_logits = forward(model)
    step = TrainStep.create(model, optax.sgd(0.0), make_mesh((1, 1, -1), jax.devices()[:1]), freeze=(FREEZE_BASE,))
    batch = {"features": FEATURES, "decoder_input_ids": TOKENS, "labels": jnp.array([[2, 3, 4, 5], [6, 7, 8, 9]]),
             "loss_mask": jnp.ones((2, 4), jnp.float32), "is_text": jnp.zeros((2,), bool)}
    losses = [float(step(batch, index)["loss"]) for index in (3, 3, 4)]
    assert losses[0] == losses[1]
    assert (abs(losses[2] - losses[0]) > 1e-4) == (dropout > 0)
    np.testing.assert_array_equal(forward(step.model()), eval_logits)  # evaluation stays deterministic
