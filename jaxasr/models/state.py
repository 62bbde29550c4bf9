"""Model state as a flat {path: array} dict: the form converters and checkpoints exchange."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from flax import traverse_util

Path = tuple[str, ...]


def flat_state(model: nnx.Module) -> dict[Path, jax.Array]:
    """Every variable of the model (parameters and buffers) keyed by its path of names."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Variable))
    return {tuple(str(k) for k in path): v for path, v in traverse_util.flatten_dict(pure).items()}


def load_flat_state(model: nnx.Module, flat: dict[Path, np.ndarray]) -> None:
    """Replace the model's variables in place; paths and shapes must match exactly."""
    state = nnx.state(model, nnx.Variable)
    current = flat_state(model)
    missing, extra = set(current) - set(flat), set(flat) - set(current)
    if missing or extra:
        raise KeyError(f"state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    for path, value in flat.items():
        if tuple(value.shape) != tuple(current[path].shape):
            raise ValueError(f"{'/'.join(path)}: shape {tuple(value.shape)}, model expects {current[path].shape}")
    nested = traverse_util.unflatten_dict(
        {path: jax.numpy.asarray(value, dtype=current[path].dtype) for path, value in flat.items()}
    )
    nnx.replace_by_pure_dict(state, nested)
    nnx.update(model, state)
