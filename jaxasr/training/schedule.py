"""Learning-rate schedule driven by evaluation WER, as an Optax transformation.

`scale_by_wer_schedule` is the last element of an `optax.chain`: it multiplies the
updates by ``-lr(count) * scale``, where ``lr`` is a linear warmup from 0 followed by a
constant, cosine or linear decay, and ``scale`` is a multiplier the trainer moves from
evaluation results. All of it lives in `WerScheduleState`, a tuple of jnp scalars inside
the optimizer state, so it is checkpointed with the optimizer and changing it never
recompiles the jitted train step (the shapes and dtypes stay the same).

Between steps the trainer calls pure functions on the whole optimizer state:

- `calibrate(opt_state, zero_shot_wer)` once before training: the initial scale from the
  zero-shot WER (a model already good on the domain gets a smaller step, which limits
  forgetting; one far from it gets a bigger step), and ``best_wer`` = zero-shot WER.
- `observe(opt_state, wer, policy)` after each evaluation: plateau decay of the scale
  (threshold in absolute WER points, patience, factor, floor) and the early-stop flag.
- `read(opt_state)` for logging.

They find the `WerScheduleState` wherever it sits in the state tree (chain, partition /
multi_transform, MultiSteps, inject_hyperparams, ...); there must be exactly one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

DECAYS = ("constant", "cosine", "linear")


class WerScheduleState(NamedTuple):
    """Schedule state; every field is a jnp scalar."""

    count: jax.Array  # int32: optimizer steps taken (gradient steps, not micro-steps)
    scale: jax.Array  # f32: multiplier on the base learning rate
    best_wer: jax.Array  # f32: best WER seen, +inf before the first eval
    bad_evals: jax.Array  # int32: evals since the last improvement (decay counter)
    num_evals: jax.Array  # int32: evals observed
    stop: jax.Array  # bool: early stop requested (sticky)
    # Early stop keeps its own reference and counter: its delta can differ from the decay
    # threshold, and the decay counter is reset on every decay.
    es_best_wer: jax.Array  # f32: best WER among improvements of more than early_stop_delta
    es_bad_evals: jax.Array  # int32: evals since that reference last moved
    # lr(count) before scaling, kept so that `read` needs nothing but the state.
    base_lr: jax.Array  # f32


@dataclass(frozen=True)
class WerPolicy:
    """How `observe` reacts to an evaluation WER (all WER values in points, e.g. 12.3).

    An eval improves when ``wer < best_wer - threshold``. After ``patience`` evals in a
    row without improvement the scale becomes ``max(scale * factor, min_scale)``. Early
    stop is requested after ``early_stop_patience`` evals without a WER below
    ``es_best - early_stop_delta`` (``None``: never).
    """

    threshold: float = 0.1
    patience: int = 3
    factor: float = 0.5
    min_scale: float = 0.05
    early_stop_patience: int | None = None
    early_stop_delta: float = 0.0

    def __post_init__(self):
        if self.threshold < 0 or self.early_stop_delta < 0:
            raise ValueError("threshold and early_stop_delta must be >= 0")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not 0.0 < self.factor <= 1.0:
            raise ValueError(f"factor must be in (0, 1], got {self.factor}")
        if self.min_scale < 0:
            raise ValueError(f"min_scale must be >= 0, got {self.min_scale}")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ValueError(f"early_stop_patience must be >= 1 or None, got {self.early_stop_patience}")


def lr_schedule(
    peak_lr: float, *, warmup_steps: int = 0, decay: str = "constant", total_steps: int | None = None
) -> Callable[[jax.Array], jax.Array]:
    """Base schedule ``count -> lr``: linear warmup from 0 to ``peak_lr``, then ``decay``.

    The value at ``count`` is the rate of the update that takes the step count from
    ``count`` to ``count + 1`` (Optax convention), so the first update of a warmup has
    rate 0. Cosine and linear decay reach 0 at ``total_steps`` and stay there.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"decay={decay!r} needs total_steps > warmup_steps, got {total_steps}")
    peak = float(peak_lr)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(step / warmup_steps, 1.0) if warmup_steps > 0 else jnp.float32(1.0)
        if decay == "constant":
            rest = jnp.float32(1.0)
        else:
            progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
            rest = 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) if decay == "cosine" else 1.0 - progress
        # Both factors are 1 outside their phase, so the product is the piecewise schedule.
        return jnp.asarray(peak * warm * rest, jnp.float32)

    return schedule


def scale_by_wer_schedule(
    peak_lr: float, *, warmup_steps: int = 0, decay: str = "constant", total_steps: int | None = None
) -> optax.GradientTransformation:
    """Multiply updates by ``-lr(count) * scale``; use as the last element of a chain."""
    schedule = lr_schedule(peak_lr, warmup_steps=warmup_steps, decay=decay, total_steps=total_steps)

    def init_fn(params):
        del params
        count = jnp.zeros([], jnp.int32)
        return WerScheduleState(
            count=count,
            scale=jnp.ones([], jnp.float32),
            best_wer=jnp.full([], jnp.inf, jnp.float32),
            bad_evals=jnp.zeros([], jnp.int32),
            num_evals=jnp.zeros([], jnp.int32),
            stop=jnp.zeros([], jnp.bool_),
            es_best_wer=jnp.full([], jnp.inf, jnp.float32),
            es_bad_evals=jnp.zeros([], jnp.int32),
            base_lr=schedule(count),
        )

    def update_fn(updates, state, params=None):
        del params
        step_size = -schedule(state.count) * state.scale
        updates = jax.tree.map(lambda u: jnp.asarray(step_size, u.dtype) * u, updates)
        count = optax.safe_increment(state.count)
        return updates, state._replace(count=count, base_lr=schedule(count))

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- state access


def _is_wer_state(x) -> bool:
    return isinstance(x, WerScheduleState)


def find_wer_state(opt_state) -> WerScheduleState:
    """The one `WerScheduleState` inside an optimizer state tree."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_wer_state) if _is_wer_state(x)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one WerScheduleState in the optimizer state, found {len(found)}; "
            "put scale_by_wer_schedule once in the chain"
        )
    return found[0]


def _keep_placement(new, old):
    """``new`` with ``old``'s dtype and, for concrete arrays, its sharding.

    Same dtype (and no weak type) keeps the jit cache key; same sharding keeps a
    replicated scalar replicated, so a jitted step does not recompile for a new layout.
    """
    new = jnp.asarray(new, dtype=old.dtype)
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) and not isinstance(new, jax.core.Tracer):
        new = jax.device_put(new, old.sharding)
    return new


def _replace_wer_state(opt_state, fn: Callable[[WerScheduleState], WerScheduleState]):
    find_wer_state(opt_state)  # exactly one, or a clear error

    def apply(node):
        if not _is_wer_state(node):
            return node
        new = fn(node)
        return WerScheduleState(*(_keep_placement(n, o) for n, o in zip(new, node)))

    return jax.tree.map(apply, opt_state, is_leaf=_is_wer_state)


def observe(opt_state, wer, policy: WerPolicy):
    """Record one evaluation WER; returns the optimizer state with the schedule updated.

    Pure and jittable (``policy`` is static); works on concrete or traced values.
    """
    policy = policy if isinstance(policy, WerPolicy) else WerPolicy(**policy)

    def step(s: WerScheduleState) -> WerScheduleState:
        w = jnp.asarray(wer, jnp.float32)
        improved = w < s.best_wer - policy.threshold
        bad = jnp.where(improved, 0, s.bad_evals + 1)
        decay_now = bad >= policy.patience
        scale = jnp.where(decay_now, jnp.maximum(s.scale * policy.factor, policy.min_scale), s.scale)
        s = s._replace(
            best_wer=jnp.where(improved, w, s.best_wer),
            bad_evals=jnp.where(decay_now, 0, bad),
            scale=scale,
            num_evals=s.num_evals + 1,
        )
        if policy.early_stop_patience is None:
            return s
        es_improved = w < s.es_best_wer - policy.early_stop_delta
        es_bad = jnp.where(es_improved, 0, s.es_bad_evals + 1)
        return s._replace(
            es_best_wer=jnp.where(es_improved, w, s.es_best_wer),
            es_bad_evals=es_bad,
            stop=jnp.logical_or(s.stop, es_bad >= policy.early_stop_patience),
        )

    return _replace_wer_state(opt_state, step)


def calibration_scale(zero_shot_wer, *, reference_wer=20.0, power=0.5, lo=0.25, hi=2.0):
    """``clip((zero_shot_wer / reference_wer) ** power, lo, hi)``."""
    if reference_wer <= 0 or not 0 < lo <= hi:
        raise ValueError("need reference_wer > 0 and 0 < lo <= hi")
    ratio = jnp.maximum(jnp.asarray(zero_shot_wer, jnp.float32), 0.0) / reference_wer
    return jnp.clip(ratio**power, lo, hi)


def calibrate(opt_state, zero_shot_wer, *, reference_wer=20.0, power=0.5, lo=0.25, hi=2.0):
    """Set the initial scale from the zero-shot WER and make it the WER to beat."""
    scale = calibration_scale(zero_shot_wer, reference_wer=reference_wer, power=power, lo=lo, hi=hi)
    w = jnp.asarray(zero_shot_wer, jnp.float32)
    return _replace_wer_state(opt_state, lambda s: s._replace(scale=scale, best_wer=w, es_best_wer=w))


def current_lr(opt_state) -> float:
    """Learning rate the next update will use (base schedule at the current count times scale)."""
    s = find_wer_state(opt_state)
    return float(s.base_lr) * float(s.scale)


def read(opt_state) -> dict[str, Any]:
    """Python values for logging: lr, scale, best_wer, bad_evals, num_evals, stop, count."""
    s = find_wer_state(opt_state)
    return {
        "lr": float(s.base_lr) * float(s.scale),
        "scale": float(s.scale),
        "best_wer": float(s.best_wer),
        "bad_evals": int(s.bad_evals),
        "num_evals": int(s.num_evals),
        "stop": bool(s.stop),
        "count": int(s.count),
    }
