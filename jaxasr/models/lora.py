"""LoRA adapters on chosen `Dense` layers of any jaxasr model, chosen by module-path regexes.

    model = apply_lora(model, LoraConfig(targets=(r"self_attn/(q|v)_proj$",), rank=8, alpha=16))
    step = TrainStep.create(model, tx, mesh, freeze=FREEZE_BASE)    # optimizer state for adapters only
    save(lora_state(model)); merge_lora(model)                      # adapters alone; folded into the base

Why a small wrapper and not `nnx.LoRA`/`nnx.LoRALinear` or qwix: flax's LoRA expects 2-D
[in, out] kernels and one module per layer, while our `Dense` kernels keep several input/output
dims (q_proj [embed, heads, kv], out_proj [heads, kv, embed]) and encoder/decoder layers are stored
stacked on a leading `layers` axis (one module for all layers, see `models/whisper.py`). Reshaping
those into flax's layout would change parameter names and shardings and would need an unstack per
layer; qwix is not installed and its LoRA also targets 2-D matmuls. So `LoraDense` is our `Dense`
plus two `nnx.LoRAParam`s in the kernel's own layout:

    lora_a [layers?, *in_shape, rank]     ("layers"?, *in_axes,  "lora_rank")   random (PEFT's init)
    lora_b [layers?, rank, *out_shape]    ("layers"?, "lora_rank", *out_axes)   zeros
    y = x @ W + b + dropout(x) @ A @ B * alpha / rank

The base `kernel`/`bias` keep their paths (`.../q_proj/kernel`), so checkpoints and the HF
mapping of the base are unchanged, and the adapters sit beside them (`.../q_proj/lora_a`), which
a freeze regex can select (`FREEZE_BASE` freezes everything else). `nnx.LoRAParam` is an
`nnx.Param`, so optimizers built with `wrt=nnx.Param` train them; `nnx.state(model, nnx.LoRAParam)`
is the adapter state.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxasr.models.layers import Dense

RANK_AXIS = "lora_rank"  # the logical name of the rank dim (a rule in `parallel/mesh.py`)
STACK_AXIS = "layers"  # leading dims of stacked layers carry this logical name

# A `freeze` regex for `TrainStep`: every parameter except the adapters.
FREEZE_BASE = r"^(?!.*(^|/)lora_[ab]$)"


class LoraDropoutKey(nnx.Variable):
    """Raw PRNG key data [layers?, 2] of a module's LoRA dropout (not trained)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`targets`: regexes searched in the 'a/b/c' module paths of `Dense` layers (e.g.
    'decoder/layers/self_attn/q_proj'); a layer matching any of them is adapted."""

    targets: tuple[str, ...] = (r"(q_proj|v_proj)$",)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _axes(var: nnx.Variable) -> tuple:
    axes = var.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * var.ndim


def _n_stacked(kernel: nnx.Variable) -> int:
    """Leading dims of a kernel that stack layers (named 'layers' by `nnx.vmap`'s metadata)."""
    n = 0
    for name in _axes(kernel):
        if name != STACK_AXIS:
            break
        n += 1
    return n


class LoraDense(Dense):
    """A `Dense` with a low-rank update; shares the wrapped layer's `kernel` and `bias` variables."""

    def __init__(self, base: Dense, cfg: LoraConfig, seed: Sequence[int]):
        self.kernel, self.bias, self.n_in, self.dtype = base.kernel, base.bias, base.n_in, base.dtype
        axes = _axes(base.kernel)
        lead = _n_stacked(base.kernel)
        shape = tuple(base.kernel.shape)
        lead_shape, in_shape, out_shape = shape[:lead], shape[lead:lead + base.n_in], shape[lead + base.n_in:]
        lead_axes, in_axes, out_axes = axes[:lead], axes[lead:lead + base.n_in], axes[lead + base.n_in:]
        dtype = base.kernel.dtype
        # PEFT's default: kaiming_uniform(a=sqrt(5)) on A [r, fan_in] = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        # Drawn with NumPy on the host: no per-shape compilation, and A is small (rank columns).
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jnp.asarray(rng.uniform(-bound, bound, lead_shape + in_shape + (cfg.rank,)).astype(dtype))
        self.lora_a = nnx.LoRAParam(a, out_sharding=lead_axes + in_axes + (RANK_AXIS,), eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros(lead_shape + (cfg.rank,) + out_shape, dtype),
                                    out_sharding=lead_axes + (RANK_AXIS,) + out_axes, eager_sharding=False)
        self.rank, self.alpha, self.dropout = cfg.rank, float(cfg.alpha), float(cfg.dropout)
        self.deterministic = True  # `model.train()` turns dropout on, `model.eval()` off
        if cfg.dropout > 0:
            root = jax.random.key((seed[0] * 1_000_003 + seed[-1]) % (2**31 - 1))
            keys = jax.random.split(root, math.prod(lead_shape) or 1)
            data = jax.random.key_data(keys).reshape(lead_shape + (-1,))
            self.lora_dropout_key = LoraDropoutKey(data, out_sharding=lead_axes + (None,), eager_sharding=False)
        else:
            self.lora_dropout_key = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> jax.Array:
        """scale * A @ B in the kernel's layout (with its stacked dims)."""
        a, b = self.lora_a[...], self.lora_b[...]
        lead = a.ndim - self.n_in - 1
        a2 = a.reshape(a.shape[:lead] + (-1, self.rank))
        b2 = b.reshape(b.shape[:lead + 1] + (-1,))
        return (jnp.matmul(a2, b2) * self.scale).reshape(self.kernel.shape).astype(self.kernel.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        h = x.astype(self.dtype)
        if self.dropout > 0 and not self.deterministic:
            key = jax.random.wrap_key_data(self.lora_dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(self.dtype)
        contract = tuple(range(h.ndim - self.n_in, h.ndim))
        a = self.lora_a[...].astype(self.dtype)
        h = jax.lax.dot_general(h, a, ((contract, tuple(range(self.n_in))), ((), ())))
        h = jax.lax.dot_general(h, self.lora_b[...].astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return y + (h * jnp.asarray(self.scale, self.dtype)).astype(y.dtype)


def fold_dropout_keys(model: nnx.Module, step: jax.Array) -> None:
    """Fold `step` into every adapter's dropout key (in the train step's own copy of the model), so
    each step draws new masks and a run resumed from a checkpoint draws the very masks of an
    uninterrupted one. Dropout itself is on only in train mode (`model.train()`)."""
    for _, m in _dense_modules(model, LoraDense):
        if m.dropout > 0:
            data = m.lora_dropout_key[...]
            keys = jax.random.wrap_key_data(data.reshape(-1, data.shape[-1]))
            keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
            m.lora_dropout_key[...] = jax.random.key_data(keys).reshape(data.shape)


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _dense_modules(model: nnx.Module, cls=Dense) -> list[tuple[tuple, Dense]]:
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, cls) and len(p) > 0]


def _set_module(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent = model
    for name in path[:-1]:
        parent = parent[name] if isinstance(name, int) else getattr(parent, name)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


def apply_lora(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
    """Wrap every `Dense` whose module path matches `cfg.targets` in a `LoraDense` (in place; the
    model is also returned). B starts at zero, so the model's outputs are unchanged."""
    patterns = [re.compile(p) for p in cfg.targets]
    chosen = [(p, m) for p, m in _dense_modules(model)
              if not isinstance(m, LoraDense) and any(r.search(_path_str(p)) for r in patterns)]
    if not chosen:
        names = [_path_str(p) for p, _ in _dense_modules(model)][:8]
        raise ValueError(f"LoRA targets {cfg.targets} match no Dense layer; some layer paths: {names}")
    for path, module in chosen:
        # A seed per module from its path, so adding a target does not change the others' init.
        _set_module(model, path, LoraDense(module, cfg, (cfg.seed, zlib.crc32(_path_str(path).encode()))))
    return model


def layer_matrix_shape(dense: nnx.Module) -> tuple[int, int, int]:
    """(stacked layers, inputs, outputs) of a Dense/LoraDense kernel: its per-layer 2-D matrices
    (what per-matrix methods such as SVD-based merging decompose) are `kernel.reshape(shape)[i]`."""
    lead = _n_stacked(dense.kernel)
    shape = tuple(dense.kernel.shape)
    return (math.prod(shape[:lead]), math.prod(shape[lead:lead + dense.n_in]), math.prod(shape[lead + dense.n_in:]))


def lora_modules(model: nnx.Module) -> dict[str, LoraDense]:
    """{'a/b/c' module path: LoraDense} of the adapted layers."""
    return {_path_str(p): m for p, m in _dense_modules(model, LoraDense)}


def _plain_dense(m: LoraDense) -> Dense:
    """A plain `Dense` holding `m`'s kernel and bias variables (built abstractly: no random init)."""
    lead = _n_stacked(m.kernel)
    shape, axes = tuple(m.kernel.shape), _axes(m.kernel)
    in_shape, out_shape = shape[lead:lead + m.n_in], shape[lead + m.n_in:]
    dense = nnx.eval_shape(lambda: Dense(in_shape, out_shape, axes[lead:], use_bias=m.bias is not None,
                                         dtype=m.dtype, param_dtype=m.kernel.dtype, rngs=nnx.Rngs(0)))
    dense.kernel, dense.bias = m.kernel, m.bias
    return dense


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold scale * A @ B into each adapted kernel and put plain `Dense` layers back (in place)."""
    for path, m in _dense_modules(model, LoraDense):
        m.kernel[...] = m.kernel[...] + m.delta()
        _set_module(model, path, _plain_dense(m))
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapters alone (`lora_a`, `lora_b` of every adapted layer), for saving."""
    return nnx.state(model, nnx.LoRAParam)


def load_lora_state(model: nnx.Module, state: nnx.State | dict) -> None:
    """Set the adapters from `lora_state` output (an `nnx.State` or its pure dict)."""
    current = lora_state(model)
    if not isinstance(state, nnx.State):
        nnx.replace_by_pure_dict(current, state)
        state = current
    nnx.update(model, state)


def count_lora_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(lora_state(model)))


def lora_config_of(model: nnx.Module) -> LoraConfig:
    """The (single) rank/alpha/dropout of a model's adapters, with their module paths as targets."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    kinds = {(m.rank, m.alpha, m.dropout) for m in mods.values()}
    if len(kinds) > 1:
        raise ValueError(f"adapters differ in (rank, alpha, dropout): {sorted(kinds)}")
    rank, alpha, dropout = kinds.pop()
    return LoraConfig(targets=tuple(f"^{re.escape(p)}$" for p in mods), rank=rank, alpha=alpha, dropout=dropout)
