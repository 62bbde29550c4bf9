"""WER-driven schedule: scripted WER sequences, calibration, warmup, state plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxasr.training import schedule as S

PARAMS = {"w": jnp.ones((2, 3)), "b": jnp.zeros((3,))}


def _state(tx=None, params=PARAMS):
    tx = tx or S.scale_by_wer_schedule(1.0)
    return tx.init(params)


def _run(wers, policy, state=None):
    state = _state() if state is None else state
    out = []
    for w in wers:
        state = S.observe(state, w, policy)
        r = S.read(state)
        out.append((r["scale"], r["best_wer"], r["bad_evals"], r["stop"]))
    return state, out


def test_plateau_decay_scripted_sequence():
    policy = S.WerPolicy(threshold=0.1, patience=2, factor=0.5, min_scale=0.0)
    _, out = _run([30, 25, 25.05, 24.99, 26, 27], policy)
    scale, best, bad, _ = zip(*out)
    assert scale == (1.0, 1.0, 1.0, 0.5, 0.5, 0.25)
    # 24.99 beats 25 by less than the threshold: not an improvement, best stays 25.
    np.testing.assert_allclose(best, [30, 25, 25, 25, 25, 25], rtol=0, atol=1e-6)
    assert bad == (0, 0, 1, 0, 1, 0)


def test_scale_floor():
    policy = S.WerPolicy(threshold=0.0, patience=1, factor=0.5, min_scale=0.3)
    _, out = _run([20, 21, 21, 21, 21], policy)
    np.testing.assert_allclose([o[0] for o in out], [1.0, 0.5, 0.3, 0.3, 0.3], rtol=1e-6)


def test_early_stop_fires_exactly_and_is_separate_from_decay():
    # Steps of 0.2 beat the decay threshold (0.1) every time, but early stop wants more than
    # 0.5 below its own reference (30, then 29.4): three evals after 29.4 it fires, while
    # the decay counter has only just moved.
    policy = S.WerPolicy(threshold=0.1, patience=2, early_stop_patience=3, early_stop_delta=0.5)
    state, out = _run([30, 29.8, 29.6, 29.4, 29.2, 29.0, 28.95, 20.0], policy)
    assert [o[3] for o in out] == [False] * 6 + [True, True]  # sticky after firing
    assert [o[0] for o in out] == [1.0] * 8
    assert [o[2] for o in out] == [0] * 6 + [1, 0]
    assert S.read(state)["num_evals"] == 8


def test_no_early_stop_without_patience():
    _, out = _run([30] + [40] * 20, S.WerPolicy(patience=1, min_scale=0.0))
    assert not any(o[3] for o in out)


@pytest.mark.parametrize(
    "wer, scale", [(20.0, 1.0), (5.0, 0.5), (80.0, 2.0), (1.25, 0.25), (0.0, 0.25), (500.0, 2.0), (45.0, 1.5)]
)
def test_calibrate(wer, scale):
    state = S.calibrate(_state(), wer)
    r = S.read(state)
    assert r["scale"] == pytest.approx(scale, rel=1e-6)
    assert r["best_wer"] == pytest.approx(wer)
    assert r["lr"] == pytest.approx(scale)


def test_calibrated_best_is_the_wer_to_beat():
    state = S.calibrate(_state(), 20.0, reference_wer=10.0, power=1.0, hi=4.0)
    assert S.read(state)["scale"] == pytest.approx(2.0)
    state = S.observe(state, 19.95, S.WerPolicy(threshold=0.1, patience=2))
    assert S.read(state)["bad_evals"] == 1
    assert S.read(state)["best_wer"] == pytest.approx(20.0)


def test_lr_schedule_values():
    cos = S.lr_schedule(1.0, warmup_steps=4, decay="cosine", total_steps=12)
    lin = S.lr_schedule(2.0, warmup_steps=4, decay="linear", total_steps=12)
    const = S.lr_schedule(3.0, warmup_steps=0)
    np.testing.assert_allclose([cos(c) for c in (0, 1, 2, 3, 4, 8, 12, 20)], [0, 0.25, 0.5, 0.75, 1, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose([lin(c) for c in (2, 4, 6, 8, 12, 99)], [1.0, 2.0, 1.5, 1.0, 0.0, 0.0], atol=1e-6)
    assert float(const(0)) == 3.0 and float(const(10**6)) == 3.0
    with pytest.raises(ValueError):
        S.lr_schedule(1.0, warmup_steps=10, decay="cosine", total_steps=10)
    with pytest.raises(ValueError):
        S.lr_schedule(1.0, decay="exponential")


def test_updates_are_minus_lr_times_scale():
    tx = S.scale_by_wer_schedule(0.5, warmup_steps=2)
    state = tx.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    seen = []
    for i in range(4):
        if i == 2:
            state = S.observe(S.calibrate(state, 80.0), 10.0, S.WerPolicy())  # scale 2
        assert S.read(state)["count"] == i
        expected_lr = S.current_lr(state)
        updates, state = tx.update(grads, state)
        seen.append(float(updates["w"][0, 0]))
        assert float(updates["w"][0, 0]) == pytest.approx(-expected_lr)
    np.testing.assert_allclose(seen, [0.0, -0.25, -1.0, -1.0], rtol=1e-6)


def _find(state):
    return S.find_wer_state(state)


@pytest.mark.parametrize("wrap", ["chain", "multisteps", "partition", "inject", "all"])
def test_observe_finds_state_in_wrapped_transforms(wrap):
    sched = S.scale_by_wer_schedule(1.0)
    if wrap == "chain":
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), sched)
    elif wrap == "multisteps":
        tx = optax.MultiSteps(optax.chain(optax.scale_by_adam(), sched), 2).gradient_transformation()
    elif wrap == "partition":
        labels = {"w": "train", "b": "frozen"}
        tx = optax.partition({"train": optax.chain(optax.trace(0.9), sched), "frozen": optax.set_to_zero()}, labels)
    elif wrap == "inject":
        tx = optax.inject_hyperparams(lambda decay: optax.chain(optax.trace(decay), sched))(decay=0.9)
    else:
        inner = optax.MultiSteps(optax.chain(optax.scale_by_adam(), sched), 2).gradient_transformation()
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.partition({"t": inner, "f": optax.set_to_zero()}, {"w": "t", "b": "f"}),
        )
    state = tx.init(PARAMS)
    policy = S.WerPolicy(threshold=0.1, patience=1, factor=0.5)
    state = S.observe(state, 30.0, policy)
    state = S.observe(state, 31.0, policy)
    assert S.read(state)["scale"] == 0.5
    assert float(_find(state).best_wer) == 30.0
    # The rest of the tree is untouched and still usable.
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(PARAMS))


def test_needs_exactly_one_state():
    with pytest.raises(ValueError, match="found 0"):
        S.observe(optax.adam(1e-3).init(PARAMS), 10.0, S.WerPolicy())
    two = optax.chain(S.scale_by_wer_schedule(1.0), S.scale_by_wer_schedule(1.0)).init(PARAMS)
    with pytest.raises(ValueError, match="found 2"):
        S.read(two)


def test_jitted_update_is_not_retraced_after_observe():
    tx = optax.chain(optax.scale_by_adam(), S.scale_by_wer_schedule(1e-2, warmup_steps=3))
    traces = []

    @jax.jit
    def step(grads, state, params):
        traces.append(1)  # runs only while tracing
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = PARAMS, tx.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    policy = S.WerPolicy(threshold=0.1, patience=1, early_stop_patience=1)
    params, state = step(grads, state, params)
    state = S.calibrate(state, 35.0)
    params, state = step(grads, state, params)
    for wer in (30.0, 31.0, 32.0):
        state = S.observe(state, wer, policy)
        params, state = step(grads, state, params)
    assert len(traces) == 1
    assert S.read(state)["stop"] and S.read(state)["scale"] < 1.0


def test_observe_is_jittable_and_matches_eager():
    policy = S.WerPolicy(threshold=0.1, patience=2, early_stop_patience=2)
    eager = jitted = _state()
    jobserve = jax.jit(S.observe, static_argnums=2)
    for w in (30.0, 29.0, 29.5, 29.6, 29.7):
        eager = S.observe(eager, w, policy)
        jitted = jobserve(jitted, jnp.float32(w), policy)
    assert S.read(eager) == S.read(jitted)


def test_state_round_trips_through_numpy():
    tx = optax.chain(optax.scale_by_adam(), S.scale_by_wer_schedule(1.0, warmup_steps=2))
    state = tx.init(PARAMS)
    _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    state = S.observe(S.calibrate(state, 40.0), 30.0, S.WerPolicy())
    saved = jax.tree.map(np.asarray, state)  # what a checkpointer stores
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(saved))
    restored = jax.tree.map(jnp.asarray, saved)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert S.read(restored) == S.read(state)
    wer_state = _find(restored)
    assert [x.dtype for x in wer_state] == [x.dtype for x in _find(tx.init(PARAMS))]
    # And observe / update continue from the restored (or still-numpy) state.
    assert S.read(S.observe(saved, 20.0, S.WerPolicy()))["best_wer"] == 20.0
    tx.update(jax.tree.map(jnp.ones_like, PARAMS), restored, PARAMS)


def test_policy_validation():
    for bad in (dict(patience=0), dict(factor=0.0), dict(factor=1.5), dict(min_scale=-1), dict(early_stop_patience=0)):
        with pytest.raises(ValueError):
            S.WerPolicy(**bad)


def test_observe_keeps_shardings():
    # A train step jitted with explicit in_shardings rejects a committed array laid out
    # differently, so the new scalars must keep the old placement.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(_state(), replicated)
    state = S.calibrate(S.observe(state, 12.0, S.WerPolicy()), 30.0)
    assert all(x.sharding == replicated for x in jax.tree.leaves(state))
