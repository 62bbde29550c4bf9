"""Optimizer from config: base rule, weight decay by name, per-path multipliers, freezing.

`build_optimizer(cfg, params) -> (tx, wer_policy)`. ``cfg`` is an ml_collections
ConfigDict, a dataclass, a mapping or None; unknown fields are an error (a typo would
otherwise be silently ignored). Fields:

- ``name``: ``'adamw'`` (default; decoupled weight decay), ``'adam'`` (weight decay as L2
  added to the gradients before the moments), ``'sgd'`` (L2, with ``momentum``),
  ``'adafactor'`` (factored second moment, block-RMS clipping at 1, decoupled decay) or
  ``'lion'`` (decoupled decay).
- ``peak_lr`` (required), ``warmup_steps`` (0), ``decay`` (``'constant'``, ``'cosine'``,
  ``'linear'``), ``total_steps`` (needed by cosine/linear): the base schedule of
  `jaxasr.training.schedule.scale_by_wer_schedule`. Steps are optimizer steps, so with
  gradient accumulation one step is ``grad_accum_steps`` micro-batches.
- ``b1`` (0.9), ``b2`` (0.999), ``eps`` (1e-8): Adam moments; Lion uses ``b1``, ``b2``
  (set ``b2=0.99`` for Lion's usual value); Adafactor uses none of them (decay rate 0.8).
  ``momentum`` (0.0): SGD only.
- ``weight_decay`` (0.0), ``weight_decay_pattern`` (``r'(^|/)(kernel|embedding|lora_a|lora_b)$'``):
  decay only leaves whose path matches. By name, not ndim: stacked layers make biases
  and norm scales 2-D.
- ``clip_norm`` (None): clip the global norm of the trainable gradients.
- ``lr_multipliers`` ({}): ``{regex: factor}``; a leaf's update is multiplied by the
  factor of every pattern its path matches (a product, because ConfigDict does not keep
  key order), e.g. ``{'^encoder/': 0.1}``.
- ``freeze`` ([]): regexes; matching leaves get zero updates and no optimizer state.
- ``grad_accum_steps`` (1): average gradients over this many calls (`optax.MultiSteps`).
- ``wer_threshold``, ``wer_patience``, ``wer_factor``, ``wer_min_scale``,
  ``early_stop_patience``, ``early_stop_delta``: the `WerPolicy` returned beside ``tx``.

Paths are ``'/'``-joined keys, e.g. ``encoder/layers/self_attn/q_proj/kernel``
(`param_paths`). Every regex (``re.search``) must match at least one path.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxasr.training.schedule import WerPolicy, scale_by_wer_schedule

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion")

DEFAULTS: dict[str, Any] = {
    "name": "adamw",
    "peak_lr": None,
    "warmup_steps": 0,
    "decay": "constant",
    "total_steps": None,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "weight_decay_pattern": r"(^|/)(kernel|embedding|lora_a|lora_b)$",
    "clip_norm": None,
    "lr_multipliers": {},
    "freeze": [],
    "grad_accum_steps": 1,
    "wer_threshold": WerPolicy.threshold,
    "wer_patience": WerPolicy.patience,
    "wer_factor": WerPolicy.factor,
    "wer_min_scale": WerPolicy.min_scale,
    "early_stop_patience": WerPolicy.early_stop_patience,
    "early_stop_delta": WerPolicy.early_stop_delta,
}

# ----------------------------------------------------------------------------- paths


def _key_name(key) -> str | None:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        # nnx.Variable flattens to its array under a 'value' attribute: not part of the name.
        return None if key.name in ("value", "raw_value") else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path) -> str:
    """``(DictKey('encoder'), DictKey('layers'), ...) -> 'encoder/layers/...'``."""
    return "/".join(n for n in map(_key_name, path) if n is not None)


def param_paths(params):
    """A tree like ``params`` with each array replaced by its ``'a/b/c'`` path."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), params)


def _matches(patterns, path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def count_params(params, freeze=()) -> int:
    """Number of scalars in ``params``, leaving out leaves whose path matches ``freeze``."""
    sizes = jax.tree_util.tree_map_with_path(
        lambda p, x: 0 if _matches(freeze, path_str(p)) else int(np.prod(np.shape(x))), params
    )
    return int(sum(jax.tree.leaves(sizes)))


# ----------------------------------------------------------------------------- config


def _as_dict(cfg) -> dict[str, Any]:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"optimizer config must be a ConfigDict, dataclass or mapping, got {type(cfg).__name__}")


def resolve_config(cfg) -> dict[str, Any]:
    """``cfg`` merged over `DEFAULTS`, checked."""
    given = {k: v for k, v in _as_dict(cfg).items() if v is not None or k not in DEFAULTS}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown optimizer config fields {unknown}; known: {sorted(DEFAULTS)}")
    c = {**DEFAULTS, **given}
    if c["name"] not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {c['name']!r}")
    if c["peak_lr"] is None:
        raise ValueError("optimizer config needs peak_lr")
    if int(c["grad_accum_steps"]) < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {c['grad_accum_steps']}")
    if isinstance(c["freeze"], str):
        c["freeze"] = [c["freeze"]]
    c["freeze"] = list(c["freeze"])
    c["lr_multipliers"] = {str(k): float(v) for k, v in dict(c["lr_multipliers"]).items()}
    return c


def wer_policy_from_config(cfg) -> WerPolicy:
    """The `WerPolicy` described by the ``wer_*`` and ``early_stop_*`` fields of ``cfg``."""
    return _wer_policy(resolve_config(cfg))


def _wer_policy(c: dict[str, Any]) -> WerPolicy:
    return WerPolicy(
        threshold=float(c["wer_threshold"]),
        patience=int(c["wer_patience"]),
        factor=float(c["wer_factor"]),
        min_scale=float(c["wer_min_scale"]),
        early_stop_patience=None if c["early_stop_patience"] is None else int(c["early_stop_patience"]),
        early_stop_delta=float(c["early_stop_delta"]),
    )


# ----------------------------------------------------------------------------- transforms


def _by_path(fn):
    """Mask/label callable: ``fn(path_str)`` at every array of a params/updates tree.

    A callable (rather than a tree built from ``params``) so that it also applies to the
    masked trees `optax.partition` passes down, where frozen leaves are `optax.MaskedNode`.
    """
    return lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), tree)


def scale_by_path(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each update by the product of the factors whose regex matches its path."""
    multipliers = dict(multipliers)

    def factor(path: str) -> float:
        return float(np.prod([f for p, f in multipliers.items() if re.search(p, path)] or [1.0]))

    def update_fn(updates, state, params=None):
        del params
        # Factors are resolved from paths at trace time; leaves with factor 1 are untouched.
        def scale(p, u):
            f = factor(path_str(p))
            return u if f == 1.0 else u * np.asarray(f, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_patterns(paths: list[str], patterns, what: str):
    for pattern in patterns:
        if not any(re.search(pattern, p) for p in paths):
            raise ValueError(f"{what} pattern {pattern!r} matches no parameter (e.g. {paths[:3]})")


def build_optimizer(cfg, params) -> tuple[optax.GradientTransformation, WerPolicy]:
    """The optax transformation for ``params`` and the WER policy for `schedule.observe`."""
    c = resolve_config(cfg)
    paths = jax.tree.leaves(param_paths(params))
    _check_patterns(paths, c["lr_multipliers"], "lr_multipliers")
    _check_patterns(paths, c["freeze"], "freeze")
    if c["freeze"] and all(_matches(c["freeze"], p) for p in paths):
        raise ValueError("freeze matches every parameter: nothing to train")
    if c["weight_decay"]:
        _check_patterns(paths, [c["weight_decay_pattern"]], "weight_decay_pattern")

    wd = float(c["weight_decay"])
    decay_mask = _by_path(lambda p: re.search(c["weight_decay_pattern"], p) is not None)
    decayed = [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []

    name = c["name"]
    if name == "adamw":
        rule = [optax.scale_by_adam(c["b1"], c["b2"], c["eps"]), *decayed]
    elif name == "adam":
        rule = [*decayed, optax.scale_by_adam(c["b1"], c["b2"], c["eps"])]
    elif name == "sgd":
        rule = [*decayed, *([optax.trace(c["momentum"])] if c["momentum"] else [])]
    elif name == "lion":
        rule = [optax.scale_by_lion(c["b1"], c["b2"]), *decayed]
    else:  # adafactor
        rule = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0), *decayed]

    tx = optax.chain(
        *([optax.clip_by_global_norm(c["clip_norm"])] if c["clip_norm"] else []),
        *rule,
        *([scale_by_path(c["lr_multipliers"])] if c["lr_multipliers"] else []),
        scale_by_wer_schedule(
            c["peak_lr"], warmup_steps=int(c["warmup_steps"]), decay=c["decay"], total_steps=c["total_steps"]
        ),
    )
    if int(c["grad_accum_steps"]) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(c["grad_accum_steps"])).gradient_transformation()
    if c["freeze"]:
        # Outside MultiSteps, so that frozen leaves are MaskedNode everywhere below: no
        # moments, no accumulation buffers, and the norm clip sees only trainable gradients.
        labels = _by_path(lambda p: "frozen" if _matches(c["freeze"], p) else "train")
        tx = optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, _wer_policy(c)
