"""Frozen-encoder recipe: encode every training clip once, then train the decoder on the outputs.

On a CPU the encoder over 30 s windows dominates a Whisper step; when the encoder is frozen and the
audio is not augmented its output per clip never changes, so computing it once turns a step into
a decoder-only step. The cache lives in host memory (float16, [1500, d_model] per clip).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from jaxasr.audio.features import log_mel_numpy_batch
from jaxasr.data import sources as data_sources
from jaxasr.data import transforms as T
from jaxasr.training.evaluation import encode_features
from jaxasr.training.optimizer import param_paths


def encode_examples(model, examples: Sequence[dict], *, n_mels: int, batch_size: int = 16) -> list[dict]:
    """Raw examples -> examples with `encoded` in place of audio; bad ones stay skip markers."""
    decode = T.DecodeAudio()
    decoded = [decode.map(dict(ex)) for ex in examples]
    good = [i for i, ex in enumerate(decoded) if not T.skipped(ex)]
    encoded = {}
    for start in range(0, len(good), batch_size):  # log-mel per chunk: bounded host memory
        rows = good[start:start + batch_size]
        feats = log_mel_numpy_batch([decoded[i]["audio"] for i in rows], n_mels=n_mels)
        encoded.update(zip(rows, encode_features(model, feats, batch_size)))
    return [ex if T.skipped(ex) else
            {k: v for k, v in ex.items() if k not in ("audio", "audio_bytes")} | {"encoded": encoded[i]}
            for i, ex in enumerate(decoded)]


def check_encoder_frozen(freeze: Sequence[str], model) -> None:
    paths = jax.tree.leaves(param_paths(nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))))
    unfrozen = [p for p in paths if not any(re.search(f, "encoder/" + p) for f in freeze)]
    if unfrozen:
        raise ValueError(f"train.cache_encoder needs a frozen encoder (optimizer.freeze such as '^encoder/'); "
                         f"trainable: encoder/{unfrozen[0]} and {len(unfrozen) - 1} more")


def encoded_sources(model, data_cfg, *, n_mels: int, freeze: Sequence[str], process_index: int = 0,
                    process_count: int = 1) -> dict[str, data_sources.InMemorySource]:
    """An in-memory source of encoder outputs for every audio component of `data_cfg.train` (all rows: the pipeline
    takes this process's share of them as it does of any source)."""
    del process_index, process_count  # every process encodes the whole (small) set; see module doc
    check_encoder_frozen(freeze, model)
    augment = data_cfg.augment
    active = [k for k in ("speed", "noise", "gain", "spec_augment", "multiscale") if augment[k].enabled]
    if active:
        raise ValueError(f"train.cache_encoder computes the encoder once per clip, which rules out audio "
                         f"augmentation; turn off data.augment.{active[0]}.enabled")
    out = {}
    for name, ds_cfg in data_cfg.train.items():
        if ds_cfg.kind != "audio":
            continue
        source = data_sources.make_source(ds_cfg)
        out[name] = data_sources.InMemorySource(encode_examples(model, [source[i] for i in range(len(source))], n_mels=n_mels))
    return out
