"""build_optimizer: decay by name, per-path multipliers, freezing, accumulation, clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from jaxasr.training import schedule as S
from jaxasr.training.optimizer import build_optimizer, count_params, param_paths


def make_params():
    """Stacked layers (leading axis 2), so biases and norm scales are 2-D."""
    r = np.random.default_rng(0)
    a = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "encoder": {
            "layers": {
                "self_attn": {"q_proj": {"kernel": a(2, 3, 3), "bias": a(2, 3)}},
                "final_layer_norm": {"scale": a(2, 3), "bias": a(2, 3)},
            }
        },
        "decoder": {
            "embed_tokens": {"embedding": a(5, 3)},
            "layers": {"mlp": {"fc1": {"kernel": a(2, 3, 4), "bias": a(2, 4)}}},
        },
    }


def flat(tree):
    return dict(zip(jax.tree.leaves(param_paths(tree)), jax.tree.leaves(tree)))


def step(tx, grads, state, params):
    updates, state = jax.jit(tx.update)(grads, state, params)
    return optax.apply_updates(params, updates), updates, state


def ones(params, value=1.0):
    return jax.tree.map(lambda x: jnp.full_like(x, value), params)


def test_param_paths_and_count():
    params = make_params()
    paths = set(jax.tree.leaves(param_paths(params)))
    assert "encoder/layers/self_attn/q_proj/kernel" in paths
    assert "decoder/embed_tokens/embedding" in paths
    assert count_params(params) == 18 + 6 + 6 + 6 + 15 + 24 + 8
    assert count_params(params, ["^encoder/"]) == 15 + 24 + 8


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion", "adafactor"])
def test_weight_decay_only_on_kernels_and_embeddings(name):
    params = make_params()
    tx, _ = build_optimizer({"name": name, "peak_lr": 0.1, "weight_decay": 0.5}, params)
    new, _, _ = step(tx, ones(params, 0.0), tx.init(params), params)
    for path, (old, upd) in zip(flat(params), zip(flat(params).values(), flat(new).values())):
        if path.endswith(("kernel", "embedding")):
            if name in ("adamw", "sgd"):  # decay exactly lr * wd * param
                np.testing.assert_allclose(upd, old * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=path)
            else:
                assert float(jnp.sum(jnp.abs(upd))) < float(jnp.sum(jnp.abs(old))), path
        else:
            np.testing.assert_array_equal(upd, old, err_msg=path)


def test_multipliers_scale_updates_per_path():
    params = make_params()
    cfg = {"name": "sgd", "peak_lr": 1.0, "lr_multipliers": {"^encoder/": 0.1, "kernel$": 0.5}}
    tx, _ = build_optimizer(cfg, params)
    _, updates, _ = step(tx, ones(params), tx.init(params), params)
    u = {k: float(v.reshape(-1)[0]) for k, v in flat(updates).items()}
    assert u["decoder/layers/mlp/fc1/bias"] == pytest.approx(-1.0)
    assert u["decoder/layers/mlp/fc1/kernel"] == pytest.approx(-0.5)
    assert u["encoder/layers/final_layer_norm/scale"] == pytest.approx(-0.1)
    assert u["encoder/layers/self_attn/q_proj/kernel"] == pytest.approx(-0.05)  # both match: product


def test_freeze_gives_zero_updates_and_no_state():
    params = make_params()
    tx, _ = build_optimizer({"peak_lr": 0.1, "freeze": ["^encoder/"], "weight_decay": 0.1}, params)
    state = tx.init(params)
    new, updates, state = step(tx, ones(params), state, params)
    for path, upd in flat(updates).items():
        assert bool(jnp.all(upd == 0)) == path.startswith("encoder/"), path
    np.testing.assert_array_equal(new["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"],
                                  params["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"])
    adam = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moments in (adam[0].mu, adam[0].nu):
        assert isinstance(moments["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"], optax.MaskedNode)
        assert isinstance(moments["encoder"]["layers"]["final_layer_norm"]["scale"], optax.MaskedNode)
        assert moments["decoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 3, 4)
    # No array in the whole state is sized like a frozen leaf alone (no moments, no buffers).
    n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert n_state == 2 * count_params(params, ["^encoder/"])


def test_freeze_with_accumulation_keeps_no_buffers_for_frozen():
    params = make_params()
    tx, _ = build_optimizer({"name": "sgd", "peak_lr": 0.1, "freeze": ["^encoder/"], "grad_accum_steps": 3}, params)
    state = tx.init(params)
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0) == count_params(params, ["^encoder/"])


def test_grad_accumulation_equals_one_big_batch():
    params = make_params()
    g1, g2 = ones(params, 1.0), jax.tree.map(lambda x: x * 3.0, params)
    accum, _ = build_optimizer({"name": "sgd", "peak_lr": 0.1, "grad_accum_steps": 2, "clip_norm": 5.0}, params)
    big, _ = build_optimizer({"name": "sgd", "peak_lr": 0.1, "clip_norm": 5.0}, params)

    state = accum.init(params)
    mid, updates, state = step(accum, g1, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert S.read(state)["count"] == 0  # the schedule counts optimizer steps, not micro-steps
    out, _, state = step(accum, g2, state, mid)
    assert S.read(state)["count"] == 1

    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _, _ = step(big, mean, big.init(params), params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_global_norm_clipping_ignores_frozen_grads():
    params = make_params()
    tx, _ = build_optimizer({"name": "sgd", "peak_lr": 1.0, "clip_norm": 1.0, "freeze": ["^encoder/"]}, params)
    grads = ones(params, 10.0)
    grads["encoder"] = jax.tree.map(lambda x: x * 1e6, grads["encoder"])  # frozen: must not shrink the rest
    _, updates, _ = step(tx, grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    dec = float(optax.tree.norm(updates["decoder"]))
    assert dec == pytest.approx(1.0, rel=1e-5)

    tx, _ = build_optimizer({"name": "sgd", "peak_lr": 1.0, "clip_norm": 1e3}, params)
    _, updates, _ = step(tx, ones(params, 0.01), tx.init(params), params)  # under the limit: unchanged
    assert all(bool(jnp.allclose(u, -0.01)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion", "adafactor"])
def test_every_optimizer_has_one_wer_state_and_observe_changes_the_step(name):
    params = make_params()
    cfg = ml_collections.ConfigDict(
        {"name": name, "peak_lr": 0.01, "warmup_steps": 2, "decay": "cosine", "total_steps": 10,
         "freeze": ["final_layer_norm"], "grad_accum_steps": 2, "clip_norm": 1.0,
         "lr_multipliers": {"^encoder/": 0.1}, "wer_patience": 1, "wer_factor": 0.25}
    )
    tx, policy = build_optimizer(cfg, params)
    assert policy == S.WerPolicy(patience=1, factor=0.25)
    state = tx.init(params)
    S.find_wer_state(state)
    state = S.observe(S.observe(state, 20.0, policy), 30.0, policy)
    assert S.read(state)["scale"] == 0.25
    for _ in range(4):
        params, _, state = step(tx, ones(params), state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert S.read(state)["count"] == 2


def test_config_forms_and_errors():
    params = make_params()

    @dataclasses.dataclass
    class Cfg:
        name: str = "adam"
        peak_lr: float = 1e-3
        wer_threshold: float = 0.5

    _, policy = build_optimizer(Cfg(), params)
    assert policy.threshold == 0.5
    with pytest.raises(ValueError, match="unknown"):
        build_optimizer({"peak_lr": 1e-3, "weight_decy": 0.1}, params)
    with pytest.raises(ValueError, match="peak_lr"):
        build_optimizer({}, params)
    with pytest.raises(ValueError, match="name"):
        build_optimizer({"peak_lr": 1e-3, "name": "rmsprop"}, params)
    with pytest.raises(ValueError, match="matches no parameter"):
        build_optimizer({"peak_lr": 1e-3, "freeze": ["^encodr/"]}, params)
    with pytest.raises(ValueError, match="matches no parameter"):
        build_optimizer({"peak_lr": 1e-3, "lr_multipliers": {"^encodr/": 0.1}}, params)


def test_nnx_state_params():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(3, 3, rngs=rngs)
            self.final_layer_norm = nnx.LayerNorm(3, rngs=rngs)

    params = nnx.state(Block(nnx.Rngs(0)), nnx.Param)
    assert sorted(jax.tree.leaves(param_paths(params))) == [
        "final_layer_norm/bias", "final_layer_norm/scale", "q_proj/bias", "q_proj/kernel"]
    tx, _ = build_optimizer({"peak_lr": 0.1, "weight_decay": 0.5, "freeze": ["^final_layer_norm/"]}, params)
    new, updates, _ = step(tx, ones(params, 0.0), tx.init(params), params)
    np.testing.assert_allclose(new["q_proj"]["kernel"][...], params["q_proj"]["kernel"][...] * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["q_proj"]["bias"][...], params["q_proj"]["bias"][...])
    assert float(jnp.abs(updates["final_layer_norm"]["scale"][...]).sum()) == 0.0
