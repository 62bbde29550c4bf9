"""Whisper (encoder-decoder ASR) in Flax NNX, numerically equal to transformers' PyTorch Whisper.

Layout: the encoder and decoder layers are stored stacked (a leading `layers` axis on every layer
parameter) whether or not they run under `nnx.scan`, so checkpoints and conversion never depend on
the `scan_layers` / `remat_policy` switches. Parameter names follow Hugging Face's module names
(`self_attn.q_proj`, `fc1`, ...); the key and layout map lives in `jaxasr.convert.hf_whisper`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxasr.kernels import cpu as cpu_kernels
from jaxasr.models import cpu_attention
from jaxasr.models.layers import (
    Buffer,
    Conv1d,
    Dense,
    Embed,
    LayerNorm,
    constrain,
    dense_gelu,
    dense_heads_together,
    dense_together,
)

# --------------------------------------------------------------------------- config

# Architecture sizes of the released checkpoints (Hugging Face `WhisperConfig` fields).
_SIZES = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                 decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                 decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                  decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "medium": dict(d_model=1024, encoder_layers=24, decoder_layers=24, encoder_attention_heads=16,
                   decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    "large": dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                  decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120),
}
_VOCAB_EN, _VOCAB_MULTI, _VOCAB_V3 = 51864, 51865, 51866

PRESETS: dict[str, dict[str, Any]] = {
    **{name: dict(_SIZES[name], vocab_size=_VOCAB_MULTI) for name in ("tiny", "base", "small", "medium")},
    **{f"{name}.en": dict(_SIZES[name], vocab_size=_VOCAB_EN) for name in ("tiny", "base", "small", "medium")},
    "large": dict(_SIZES["large"], vocab_size=_VOCAB_MULTI),
    "large-v2": dict(_SIZES["large"], vocab_size=_VOCAB_MULTI),
    "large-v3": dict(_SIZES["large"], vocab_size=_VOCAB_V3, num_mel_bins=128),
    "large-v3-turbo": dict(_SIZES["large"], vocab_size=_VOCAB_V3, num_mel_bins=128, decoder_layers=4),
}

# Fields shared with transformers.WhisperConfig (the rest are jaxasr runtime switches).
HF_FIELDS = (
    "vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
    "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
    "max_source_positions", "max_target_positions", "scale_embedding",
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    vocab_size: int = _VOCAB_MULTI
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    max_target_positions: int = 448
    scale_embedding: bool = False
    # Runtime switches: none of them changes the parameters.
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"  # a key of REMAT_POLICIES
    # None: jax.nn.dot_product_attention, blocked for long attention on CPU; or "xla", "cudnn", "blocked".
    attention_impl: str | None = None

    def __post_init__(self):
        if self.attention_impl not in (None, "xla", "cudnn", "blocked"):
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected None, 'xla', 'cudnn' or 'blocked'")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {sorted(REMAT_POLICIES)}")
        for name, heads in (("encoder", self.encoder_attention_heads), ("decoder", self.decoder_attention_heads)):
            if self.d_model % heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by {name}_attention_heads={heads}")

    @classmethod
    def preset(cls, name: str, **overrides) -> WhisperConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown Whisper preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> WhisperConfig:
        """From a Hugging Face `config.json` dict (unknown keys are ignored)."""
        return cls(**{k: hf[k] for k in HF_FIELDS if k in hf}, **overrides)

    def hf_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HF_FIELDS}

    @property
    def is_multilingual(self) -> bool:
        return self.vocab_size >= _VOCAB_MULTI

    @property
    def n_audio_frames(self) -> int:
        """Mel frames per window: the encoder downsamples by 2 to `max_source_positions`."""
        return 2 * self.max_source_positions


# --------------------------------------------------------------------------- attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Decoder self-attention cache: per layer, head-major [batch, heads, max_len, head_dim] buffers.

    Head-major, like the cross-attention keys/values: the per-step attention then reads them
    without a transpose, which on CPU otherwise costs more than the attention itself. One buffer
    per layer (decoding always runs the layers unrolled, see `WhisperDecoder.decoding_layers`),
    each updated in place: reading a layer back out of an updated [layers, ...] stack copied it,
    and per-layer buffers took a tiny.en decoding step (batch 16, 448-token cache) on the 2-core
    CPU from 35.6 to 29.9 ms."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, cfg: WhisperConfig, batch: int, max_len: int) -> KVCache:
        heads = cfg.decoder_attention_heads
        shape = (batch, heads, max_len, cfg.d_model // heads)
        per_layer_zeros = lambda: tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.decoder_layers))  # noqa: E731
        return cls(per_layer_zeros(), per_layer_zeros())

    def take_rows(self, rows: jax.Array) -> KVCache:
        """The cache of batch rows `rows` (beam search reorders its beams with this)."""
        return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), self)

    def update(self, layer: int, index, k: jax.Array, v: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
        """Write k, v [batch, heads, len, head_dim] of `layer` at positions index..; returns the new
        cache and that layer's whole buffers."""
        k_l = jax.lax.dynamic_update_slice(self.k[layer], k.astype(self.k[layer].dtype), (0, 0, index, 0))
        v_l = jax.lax.dynamic_update_slice(self.v[layer], v.astype(self.v[layer].dtype), (0, 0, index, 0))
        swap = lambda t, a: t[:layer] + (a,) + t[layer + 1:]  # noqa: E731
        return KVCache(swap(self.k, k_l), swap(self.v, v_l)), k_l, v_l


def _attend(q, k, v, cfg: WhisperConfig, *, is_causal=False, mask=None):
    """Scaled dot-product attention over [batch, length, heads, head_dim].

    `jax.nn.dot_product_attention` (XLA, or cuDNN when `attention_impl="cudnn"`), except for long
    unmasked attention on the CPU backend by default: there the XLA path materializes the whole
    [batch, heads, T, T] score matrix, and the cache-sized loops of `cpu_attention` are 2-4x
    faster (Whisper's encoder); one device: the native kernels where they apply, else per
    (batch, head), several: per query block.
    `attention_impl="blocked"` asks for the query-block loop wherever attention is unmasked.
    """
    scale = q.shape[-1] ** -0.5
    impl = cfg.attention_impl
    if mask is None and not is_causal:  # the CPU loops have no masking
        if impl == "blocked":
            return cpu_attention.blocked_attention(q, k, v, scale)
        if impl is None and q.shape[1] >= 2 * cpu_attention.QUERY_BLOCK and jax.default_backend() == "cpu":
            if cpu_kernels.applies(q, k, v):  # float32, one device, the native kernels built
                return cpu_attention.native_attention(q, k, v, scale)
            if jax.device_count() == 1:
                return cpu_attention.per_head_attention(q, k, v, scale)
            return cpu_attention.blocked_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale,
                                        implementation=None if impl == "blocked" else impl)


def _attend_head_major(q, kh, vh, mask=None):
    """Attention of q [batch, len, heads, head_dim] over head-major keys/values [batch, heads, T,
    head_dim] (decoder caches and cross-attention); `mask` [len, T] marks the keys each query sees."""
    if 1 < q.shape[1] <= 8 and jax.default_backend() == "cpu":
        # The prompt's few queries one at a time: XLA:CPU's batched matmul with a few rows was 4x
        # slower than with one (3 queries over 1500 frames: 28 ms vs 6.7 ms per layer).
        return jnp.concatenate([_attend_head_major(q[:, i:i + 1], kh, vh, None if mask is None else mask[i:i + 1])
                                for i in range(q.shape[1])], axis=1)
    scores = jnp.einsum("bshd,bhtd->bhst", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), kh,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    return jnp.einsum("bhst,bhtd->bshd", probs, vh, preferred_element_type=jnp.float32).astype(q.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: WhisperConfig, num_heads: int, *, rngs: nnx.Rngs):
        d, hd = cfg.d_model, cfg.d_model // num_heads
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        in_axes, out_axes = ("embed", "heads", "kv"), ("heads", "kv", "embed")
        self.q_proj = Dense((d,), (num_heads, hd), in_axes, **kw)
        self.k_proj = Dense((d,), (num_heads, hd), in_axes, use_bias=False, **kw)  # Whisper has no key bias
        self.v_proj = Dense((d,), (num_heads, hd), in_axes, **kw)
        self.out_proj = Dense((num_heads, hd), (d,), out_axes, **kw)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values [batch, length, heads, head_dim]."""
        return tuple(dense_together([self.k_proj, self.v_proj], x))

    def __call__(self, x, k, v, cfg: WhisperConfig, *, is_causal=False, mask=None) -> jax.Array:
        out = _attend(self.q_proj(x), k, v, cfg, is_causal=is_causal, mask=mask)
        return self.out_proj(out)

    def self_attend(self, x, cfg: WhisperConfig) -> jax.Array:
        """Unmasked self-attention over x (the encoder's)."""
        q, k, v = dense_together([self.q_proj, self.k_proj, self.v_proj], x)
        return self.out_proj(_attend(q, k, v, cfg))

    def attend_head_major(self, x, kh, vh, mask=None) -> jax.Array:
        """Attention over head-major keys/values [batch, heads, T, head_dim] (caches)."""
        return self.out_proj(_attend_head_major(self.q_proj(x), kh, vh, mask))


class MLP(nnx.Module):
    def __init__(self, cfg: WhisperConfig, ffn_dim: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = Dense((cfg.d_model,), (ffn_dim,), ("embed", "mlp"), **kw)
        self.fc2 = Dense((ffn_dim,), (cfg.d_model,), ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(dense_gelu(self.fc1, x))


# --------------------------------------------------------------------------- layers


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.self_attn = Attention(cfg, cfg.encoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, **kw)
        self.mlp = MLP(cfg, cfg.encoder_ffn_dim, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.d_model, **kw)

    def __call__(self, x, cfg: WhisperConfig):
        x = x + self.self_attn.self_attend(self.self_attn_layer_norm(x), cfg)
        x = x + self.mlp(self.final_layer_norm(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.self_attn = Attention(cfg, cfg.decoder_attention_heads, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, **kw)
        self.encoder_attn = Attention(cfg, cfg.decoder_attention_heads, rngs=rngs)
        self.encoder_attn_layer_norm = LayerNorm(cfg.d_model, **kw)
        self.mlp = MLP(cfg, cfg.decoder_ffn_dim, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.d_model, **kw)

    def __call__(self, x, cross_k, cross_v, cfg: WhisperConfig, cache=None, layer=None, index=None):
        """One decoder layer. Without a cache, causal self-attention over x; with one, x holds the
        tokens at positions index.. and their keys/values are written into `cache` at `layer`."""
        h = self.self_attn_layer_norm(x)
        k, v = self.self_attn.kv(h)
        if cache is None:
            x = x + self.self_attn(h, k, v, cfg, is_causal=True)
        else:
            cache, k_all, v_all = cache.update(layer, index, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
            # Query t (at position index + t) sees cached keys at positions <= index + t.
            mask = jnp.arange(k_all.shape[2])[None, :] <= index + jnp.arange(x.shape[1])[:, None]
            x = x + self.self_attn.attend_head_major(h, k_all, v_all, mask)
        x = x + self.encoder_attn.attend_head_major(self.encoder_attn_layer_norm(x), cross_k, cross_v)
        x = x + self.mlp(self.final_layer_norm(x))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), cache


def _stacked(make, n: int, rngs: nnx.Rngs):
    """n layers with their parameters stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(rngs)

    return build(rngs)


def _run_stack(layers: nnx.Module | list[nnx.Module], n: int, cfg: WhisperConfig, body, carry, xs):
    """Apply body(layer, carry, x_i, i) -> carry over stacked layers: `nnx.scan` or a plain loop.

    Both paths run the same body (rematerialized when `cfg.remat_policy` asks), so they give the
    same numbers; scan compiles one layer, the loop unrolls them. `layers` may also be the list
    that `unstack` gives: decoding runs that as a plain loop (no remat: there is no gradient).
    """
    if isinstance(layers, list):
        return _loop(layers, body, carry, xs)
    policy = REMAT_POLICIES[cfg.remat_policy]
    if policy is not None:
        body = nnx.remat(body, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        def step(layer, carry, x_and_i):
            return body(layer, carry, *x_and_i), None

        scan = nnx.scan(step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers"})
        carry, _ = scan(layers, carry, (xs, jnp.arange(n)))
        return carry
    return _loop(unstack(layers, n), body, carry, xs)


def _loop(layers: list[nnx.Module], body, carry, xs):
    """The unrolled layer loop; `xs` per layer: a list, or a tree of [layers, ...] arrays."""
    for i, layer in enumerate(layers):
        carry = body(layer, carry, xs[i] if isinstance(xs, list) else jax.tree.map(lambda a: a[i], xs), i)
    return carry


def unstack(layers: nnx.Module, n: int) -> list[nnx.Module]:
    """The n layers of a stacked module as separate modules (their parameters sliced out)."""
    graphdef, state = nnx.split(layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(n)]


# --------------------------------------------------------------------------- model


class WhisperEncoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, 3, padding=1, axes=("conv_width", "mel", "embed"), **kw)
        self.conv2 = Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, padding=1,
                            axes=("conv_width", "conv_in", "embed"), **kw)
        self.embed_positions = Buffer(sinusoids(cfg.max_source_positions, cfg.d_model).astype(cfg.param_dtype),
                                      out_sharding=("positions", "embed"), eager_sharding=False)
        self.layers = _stacked(lambda r: EncoderLayer(cfg, rngs=r), cfg.encoder_layers, rngs)
        self.layer_norm = LayerNorm(cfg.d_model, **kw)
        self.cfg = cfg

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [batch, n_mels, frames] (as WhisperFeatureExtractor gives them) -> [batch, frames/2, d]."""
        cfg = self.cfg
        if features.shape[1:] != (cfg.num_mel_bins, cfg.n_audio_frames):
            raise ValueError(f"Whisper expects features [batch, {cfg.num_mel_bins}, {cfg.n_audio_frames}], "
                             f"got {features.shape}")
        x = jax.nn.gelu(self.conv1(features.transpose(0, 2, 1)), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        x = x + self.embed_positions[...].astype(x.dtype)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        def body(layer, x, _, __):
            return layer(x, cfg)

        x = _run_stack(self.layers, cfg.encoder_layers, cfg, body, x, None)
        return self.layer_norm(x)


class WhisperDecoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.d_model, **kw)
        self.embed_positions = Embed(cfg.max_target_positions, cfg.d_model, axes=("positions", "embed"), **kw)
        self.layers = _stacked(lambda r: DecoderLayer(cfg, rngs=r), cfg.decoder_layers, rngs)
        self.layer_norm = LayerNorm(cfg.d_model, **kw)
        self.cfg = cfg

    def decoding_layers(self) -> list[DecoderLayer]:
        """The layers one module each, as token-by-token decoding runs them whatever `scan_layers`
        says: sliced once, before the token loop (inside it XLA copied every layer's weights out of
        the stack at each step), and nnx's scan and remat cannot take modules from the jit around
        the loop (decoding with `scan_layers` failed there); nothing is differentiated anyway."""
        return unstack(self.layers, self.cfg.decoder_layers)

    def cross_kv(self, encoded: jax.Array, layers=None):
        """Cross-attention keys and values, head-major [batch, heads, frames, head_dim]: computed
        once per utterance for decoding. A list of (k, v) per layer when the layers are unrolled
        (one projection per layer: slicing a stacked result copied the whole stack per layer);
        stacked [layers, ...] under scan, which consumes them that way."""

        def project(layer, enc):
            k, v = layer.encoder_attn.kv(enc)
            return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

        if layers is None:
            layers = self.layers if self.cfg.scan_layers else self.decoding_layers()
        if isinstance(layers, list):  # all layers' projections of `encoded` together (one matmul natively)
            kv = dense_heads_together(
                [p for layer in layers for p in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)], encoded)
            return list(zip(kv[::2], kv[1::2]))
        return nnx.vmap(project, in_axes=(0, None), out_axes=0)(layers, encoded)

    def __call__(self, tokens, cross_kv, cache: KVCache | None = None, index=0, layers=None):
        """tokens [batch, len] at positions index.. -> (logits [batch, len, vocab], updated cache).

        `cross_kv`: from `cross_kv`; `layers`: `decoding_layers()` when called in a loop (the default
        with a cache)."""
        cfg = self.cfg
        positions = index + jnp.arange(tokens.shape[1])
        scale = cfg.d_model**0.5 if cfg.scale_embedding else 1.0
        x = self.embed_tokens(tokens) * scale + self.embed_positions(positions)[None]

        def body(layer, carry, kv, i):
            x, cache = carry
            return layer(x, kv[0], kv[1], cfg, cache, i, index)

        if layers is None:
            layers = self.decoding_layers() if cache is not None else self.layers
        x, cache = _run_stack(layers, cfg.decoder_layers, cfg, body, (x, cache), cross_kv)
        x = self.layer_norm(x)
        logits = self.embed_tokens.attend(x)  # Whisper ties the output projection to the embedding
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab")), cache


class Whisper(nnx.Module):
    """Whisper encoder-decoder. `__call__` is the training forward; decoding uses `encode`,
    `decoder.cross_kv` and `decode` with a `KVCache` (see `jaxasr.decoding.generate`)."""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        self.encoder = WhisperEncoder(cfg, rngs=rngs)
        self.decoder = WhisperDecoder(cfg, rngs=rngs)
        self.cfg = cfg

    def encode(self, features: jax.Array) -> jax.Array:
        return self.encoder(features)

    def decode(self, tokens, encoded=None, *, cross_kv=None, cache: KVCache | None = None, index=0, layers=None):
        if cross_kv is None:
            cross_kv = self.decoder.cross_kv(encoded, layers)
        return self.decoder(tokens, cross_kv, cache=cache, index=index, layers=layers)

    def __call__(self, features: jax.Array, decoder_input_ids: jax.Array) -> jax.Array:
        logits, _ = self.decode(decoder_input_ids, self.encode(features))
        return logits


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
    """Whisper's sinusoidal position table (the encoder's fixed position embedding)."""
    log_inc = jnp.log(max_timescale) / (channels // 2 - 1)
    inv = jnp.exp(-log_inc * jnp.arange(channels // 2, dtype=jnp.float32))
    t = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.concatenate([jnp.sin(t), jnp.cos(t)], axis=1)
