"""Hugging Face `WhisperForConditionalGeneration` state dict <-> jaxasr Whisper parameters.

A pure key and layout map over NumPy arrays: it never runs a model. HF stores `nn.Linear` weights
as [out, in] and one tensor per layer; jaxasr stores kernels as [in..., out...] (attention heads
split out) stacked over a leading layer axis.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxasr.models.whisper import WhisperConfig

Path = tuple[str, ...]

# How a tensor's layout differs between the two sides.
_LINEAR, _BIAS, _CONV, _COPY = "linear", "bias", "conv", "copy"


def _attention(prefix: Path, hf: str) -> Iterator[tuple[Path, str, str]]:
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        yield prefix + (proj, "kernel"), f"{hf}.{proj}.weight", _LINEAR
        if proj != "k_proj":  # Whisper's key projection has no bias
            yield prefix + (proj, "bias"), f"{hf}.{proj}.bias", _COPY if proj == "out_proj" else _BIAS


def _norm(prefix: Path, hf: str) -> Iterator[tuple[Path, str, str]]:
    yield prefix + ("scale",), f"{hf}.weight", _COPY
    yield prefix + ("bias",), f"{hf}.bias", _COPY


def _layer(side: str) -> Iterator[tuple[Path, str, str]]:
    """Per-layer entries; HF keys have `{i}` for the layer index."""
    hf = f"model.{side}.layers.{{i}}"
    yield from _attention(("self_attn",), f"{hf}.self_attn")
    yield from _norm(("self_attn_layer_norm",), f"{hf}.self_attn_layer_norm")
    if side == "decoder":
        yield from _attention(("encoder_attn",), f"{hf}.encoder_attn")
        yield from _norm(("encoder_attn_layer_norm",), f"{hf}.encoder_attn_layer_norm")
    for fc in ("fc1", "fc2"):
        yield ("mlp", fc, "kernel"), f"{hf}.{fc}.weight", _LINEAR
        yield ("mlp", fc, "bias"), f"{hf}.{fc}.bias", _COPY
    yield from _norm(("final_layer_norm",), f"{hf}.final_layer_norm")


def param_table(cfg: WhisperConfig) -> Iterator[tuple[Path, str, str, int]]:
    """(jaxasr path, HF key, kind, number of stacked layers or 0)."""
    for conv in ("conv1", "conv2"):
        yield ("encoder", conv, "kernel"), f"model.encoder.{conv}.weight", _CONV, 0
        yield ("encoder", conv, "bias"), f"model.encoder.{conv}.bias", _COPY, 0
    yield ("encoder", "embed_positions"), "model.encoder.embed_positions.weight", _COPY, 0
    for path, key, kind in _layer("encoder"):
        yield ("encoder", "layers") + path, key, kind, cfg.encoder_layers
    for path, key, kind in _norm(("encoder", "layer_norm"), "model.encoder.layer_norm"):
        yield path, key, kind, 0
    yield ("decoder", "embed_tokens", "embedding"), "model.decoder.embed_tokens.weight", _COPY, 0
    yield ("decoder", "embed_positions", "embedding"), "model.decoder.embed_positions.weight", _COPY, 0
    for path, key, kind in _layer("decoder"):
        yield ("decoder", "layers") + path, key, kind, cfg.decoder_layers
    for path, key, kind in _norm(("decoder", "layer_norm"), "model.decoder.layer_norm"):
        yield path, key, kind, 0


def _head_shapes(cfg: WhisperConfig, path: Path) -> tuple[int, int]:
    heads = cfg.encoder_attention_heads if path[0] == "encoder" else cfg.decoder_attention_heads
    return heads, cfg.d_model // heads


def _to_jaxasr(x: np.ndarray, kind: str, path: Path, cfg: WhisperConfig) -> np.ndarray:
    if kind == _CONV:  # torch Conv1d [out, in, width] -> [width, in, out]
        return x.transpose(2, 1, 0)
    if kind == _LINEAR:
        x = x.T
        if path[-2] == "out_proj":
            return x.reshape(*_head_shapes(cfg, path), x.shape[1])
        if path[-2] in ("q_proj", "k_proj", "v_proj"):
            return x.reshape(x.shape[0], *_head_shapes(cfg, path))
        return x
    if kind == _BIAS:
        return x.reshape(_head_shapes(cfg, path))
    return x


def _to_hf(x: np.ndarray, kind: str, path: Path) -> np.ndarray:
    if kind == _CONV:
        return x.transpose(2, 1, 0)
    if kind == _LINEAR:
        n_in = 2 if path[-2] == "out_proj" else 1
        return x.reshape(int(np.prod(x.shape[:n_in])), -1).T
    if kind == _BIAS:
        return x.reshape(-1)
    return x


def hf_to_jaxasr(state_dict: dict[str, np.ndarray], cfg: WhisperConfig) -> dict[Path, np.ndarray]:
    """HF state dict -> flat {jaxasr path: array}. Missing keys are an error; `proj_out.weight` is
    accepted only when it equals the token embedding (Whisper ties them)."""
    flat: dict[Path, np.ndarray] = {}
    used = set()
    missing = []
    for path, key, kind, n in param_table(cfg):
        keys = [key.format(i=i) for i in range(n)] if n else [key]
        if any(k not in state_dict for k in keys):
            missing += [k for k in keys if k not in state_dict]
            continue
        arrays = [_to_jaxasr(np.asarray(state_dict[k]), kind, path, cfg) for k in keys]
        flat[path] = np.stack(arrays) if n else arrays[0]
        used.update(keys)
    if missing:
        raise KeyError(f"Whisper checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    extra = sorted(set(state_dict) - used - {"proj_out.weight"})
    if extra:
        raise KeyError(f"Whisper checkpoint has {len(extra)} unexpected tensors, e.g. {extra[:3]}")
    if "proj_out.weight" in state_dict and not np.array_equal(
        state_dict["proj_out.weight"], state_dict["model.decoder.embed_tokens.weight"]
    ):
        raise ValueError("proj_out.weight differs from the token embedding; jaxasr ties them as Whisper does")
    return flat


def jaxasr_to_hf(flat: dict[Path, np.ndarray], cfg: WhisperConfig) -> dict[str, np.ndarray]:
    """Flat {jaxasr path: array} -> HF state dict (without the tied `proj_out.weight`)."""
    out: dict[str, np.ndarray] = {}
    for path, key, kind, n in param_table(cfg):
        x = np.asarray(flat[path])
        if n:
            for i in range(n):
                out[key.format(i=i)] = np.ascontiguousarray(_to_hf(x[i], kind, path))
        else:
            out[key] = np.ascontiguousarray(_to_hf(x, kind, path))
    return out
