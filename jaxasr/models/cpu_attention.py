"""Unmasked attention kernels for XLA:CPU (Whisper's encoder: 1500 frames attending to 1500).

XLA:CPU does not fuse a matmul with the softmax around it, so `jax.nn.dot_product_attention`
writes the whole [batch, heads, T, T] score matrix to memory and reads it back several times; on
a CPU that traffic, not the FLOPs, sets the time. Both kernels here loop over pieces small enough
to stay in cache and give the same numbers (fp32 accumulation):

- `per_head_attention`: two heads of one batch element and a block of queries at a time, with a
  flash-attention style backward (`jax.custom_vjp`: scores recomputed per block from the saved
  log-sum-exp, no [T, T] residual kept). Measured on the 2-core CPU, batch 8 x 6 heads x 1500:
  forward 0.31 s vs 0.83 s for `blocked_attention` and 1.27 s for XLA's; forward + backward
  1.10 s vs 2.24 s and 3.47 s (one pair per iteration; two pairs, whose batched matmuls keep both
  cores busier, took whisper tiny's train step from 12.9 s to 10.7 s in tools/bench_train.py).
  Each iteration slices its heads straight out of the [B, T, H, D] layout the projections write;
  transposing whole tensors to head-major first (the earlier version) was no faster standalone
  and up to 10% slower inside the encoder in interleaved A/Bs (the machine's noise is of the same
  order, so: not slower). Its loop runs over the batch and heads, which a mesh may shard, so it is
  the single-device kernel.
- `blocked_attention`: a block of queries at a time for all (batch, head) pairs; the loop runs
  over an unsharded axis, so it partitions like the plain attention on a device mesh.
- `native_attention`: the same algorithm, forward and backward, as native kernels
  (`jaxasr.kernels.cpu`: OpenBLAS matmuls around an in-cache softmax, per block of queries),
  for float32 on one CPU device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxasr.kernels import cpu as cpu_kernels

QUERY_BLOCK = 150  # blocked_attention: queries per block
HEAD_QUERY_BLOCK = 750  # per_head_attention: queries per block of one head ([750, T] scores; the last may be shorter)
HEADS_PER_STEP = 2  # per_head_attention: heads per loop iteration (batched matmuls; 1 if heads is odd)


def blocked_attention(q, k, v, scale):
    """Attention of q, k, v [batch, T, heads, head_dim], one block of queries at a time."""
    batch, length, heads, dim = q.shape
    n_blocks = -(-length // QUERY_BLOCK)
    pad = n_blocks * QUERY_BLOCK - length
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pad), (0, 0), (0, 0)))
    qh = qh.reshape(batch, n_blocks, QUERY_BLOCK, heads, dim).transpose(1, 0, 3, 2, 4)  # [n, B, H, c, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, T, D]

    def block(qb):
        scores = jnp.einsum("bhqd,bhkd->bhqk", qb, kh, preferred_element_type=jnp.float32)
        probs = jnp.exp(scores - scores.max(-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
        return (out / probs.sum(-1, keepdims=True)).astype(q.dtype)

    out = jax.lax.map(block, qh)  # [n, B, H, c, D]
    return out.transpose(1, 0, 3, 2, 4).reshape(batch, n_blocks * QUERY_BLOCK, heads, dim)[:, :length]


def per_head_attention(q, k, v, scale):
    """Attention of q, k, v [batch, T, heads, head_dim], one (batch, head pair) at a time (fp32 inside)."""
    dtype = q.dtype
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return _attention_by_head(q * jnp.float32(scale), k, v).astype(dtype)


def _heads_per_step(heads: int) -> int:
    return HEADS_PER_STEP if heads % HEADS_PER_STEP == 0 else 1


def _pair_loop(arrays, outputs, body):
    """Run `body(slices) -> results` for each (batch, group of heads) of the [B, T, H, ...] `arrays`,
    writing the results into `outputs` (zeros of the same layouts) at the same place: one small
    strided copy per iteration instead of whole-tensor transposes to head-major."""
    batch, length, heads = arrays[0].shape[:3]
    g = _heads_per_step(heads)
    groups = heads // g

    def step(i, outs):
        b, h = i // groups, (i % groups) * g

        def take(x):  # [B, T, H, ...] -> [g, T, ...]
            piece = jax.lax.dynamic_slice(x, (b, 0, h) + (0,) * (x.ndim - 3), (1, length, g) + x.shape[3:])[0]
            return jnp.swapaxes(piece, 0, 1)

        results = body(*(take(x) for x in arrays))
        return tuple(jax.lax.dynamic_update_slice(o, jnp.swapaxes(r, 0, 1)[None], (b, 0, h) + (0,) * (o.ndim - 3))
                     for o, r in zip(outs, results))

    return jax.lax.fori_loop(0, batch * groups, step, tuple(outputs))


def _blocks(length: int) -> list[slice]:
    return [slice(s, min(s + HEAD_QUERY_BLOCK, length)) for s in range(0, length, HEAD_QUERY_BLOCK)]


@jax.custom_vjp
def _attention_by_head(q, k, v):
    """softmax(q k^T) v per head: q (pre-scaled), k, v [B, T, H, D] float32."""
    return _forward(q, k, v)[0]


def _forward(q, k, v):
    def pair(qh, kh, vh):  # [g, T, D] each
        outs, lses = [], []
        for blk in _blocks(qh.shape[1]):
            s = qh[:, blk] @ jnp.swapaxes(kh, 1, 2)
            m = s.max(-1, keepdims=True)
            p = jnp.exp(s - m)
            total = p.sum(-1, keepdims=True)
            outs.append((p @ vh) / total)
            lses.append((m + jnp.log(total))[..., 0])
        return jnp.concatenate(outs, 1), jnp.concatenate(lses, 1)

    out, lse = _pair_loop((q, k, v), (jnp.zeros_like(q), jnp.zeros(q.shape[:3], q.dtype)), pair)
    return out, (q, k, v, out, lse)


def _backward(residuals, d_out):
    q, k, v, out, lse = residuals
    delta = jnp.sum(d_out * out, axis=-1)  # [B, T, H]: rowsum(dO * O), the softmax backward's shift

    def pair(qh, kh, vh, doh, lh, dh):
        dqs, dk, dv = [], jnp.zeros_like(kh), jnp.zeros_like(vh)
        for blk in _blocks(qh.shape[1]):
            qb, dob = qh[:, blk], doh[:, blk]
            p = jnp.exp(qb @ jnp.swapaxes(kh, 1, 2) - lh[:, blk, None])  # probabilities, recomputed
            ds = p * (dob @ jnp.swapaxes(vh, 1, 2) - dh[:, blk, None])
            dk = dk + jnp.swapaxes(ds, 1, 2) @ qb
            dv = dv + jnp.swapaxes(p, 1, 2) @ dob
            dqs.append(ds @ kh)
        return jnp.concatenate(dqs, 1), dk, dv

    return _pair_loop((q, k, v, d_out, lse, delta), (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)), pair)


_attention_by_head.defvjp(_forward, _backward)


def native_attention(q, k, v, scale):
    """Attention of float32 q, k, v [batch, T, heads, head_dim] with the native CPU kernels (see
    `jaxasr.kernels.cpu.applies`)."""
    return _native_by_head(q * jnp.float32(scale), k, v)


@jax.custom_vjp
def _native_by_head(q, k, v):
    return cpu_kernels.attention(q, k, v)[0]


def _native_forward(q, k, v):
    out, lse = cpu_kernels.attention(q, k, v)
    return out, (q, k, v, out, lse)


def _native_backward(residuals, d_out):
    return cpu_kernels.attention_backward(*residuals, d_out)


_native_by_head.defvjp(_native_forward, _native_backward)
