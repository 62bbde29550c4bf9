"""Counting a jitted function's calls into the native CPU kernels (jaxasr.kernels.cpu)."""

from __future__ import annotations

import jax


def custom_calls(fn, *args, name: str = "jaxasr_matmul") -> int:
    """How many times fn, lowered for args, calls the FFI target `name` (gradients included)."""
    return jax.jit(fn).lower(*args).as_text().count(f"@{name}(")
