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


def encode_examples(model, examples: Sequence[dict], *, n_mels: int, batch_size: int = 16, process_index: int = 0,
                    process_count: int = 1) -> list[dict]:
    """Raw examples -> examples with `encoded` in place of audio; bad ones stay skip markers.

    Every process returns all of them (the training pipeline may hand any row to any process), but
    with several processes each encodes only every `process_count`-th clip and the encodings are
    exchanged chunk by chunk, so the set is encoded once per job. All processes must pass the same
    examples: the decode (cheap, deterministic) tells each the same list of good clips.
    """
    decode = T.DecodeAudio()
    decoded = [decode.map(dict(ex)) for ex in examples]
    good = [i for i, ex in enumerate(decoded) if not T.skipped(ex)]
    shares = [good[p::process_count] for p in range(process_count)]  # process p's clips
    encoded = {}
    per_process = len(shares[0])  # the largest share
    for start in range(0, per_process, batch_size):  # the same number of chunks on every process
        chunks = [share[start:start + batch_size] for share in shares]
        audio = [decoded[i]["audio"] for i in chunks[process_index]]
        outputs = encode_features(model, log_mel_numpy_batch(audio, n_mels=n_mels), batch_size)  # bounded memory
        for chunk, chunk_outputs in zip(chunks, _exchange(outputs, [len(c) for c in chunks], batch_size)):
            encoded.update(zip(chunk, chunk_outputs))
    return [ex if T.skipped(ex) else
            {k: v for k, v in ex.items() if k not in ("audio", "audio_bytes")} | {"encoded": encoded[i]}
            for i, ex in enumerate(decoded)]


def _exchange(rows: np.ndarray, counts: list[int], batch_size: int) -> list[np.ndarray]:
    """Every process's `rows` (process p has `counts[p]` <= `batch_size`), on every process."""
    if len(counts) == 1:
        return [rows]
    from jax.experimental import multihost_utils

    padded = np.zeros((batch_size,) + rows.shape[1:], rows.dtype)
    padded[:len(rows)] = rows
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, batch_size, ...]
    return [gathered[p, :n] for p, n in enumerate(counts)]


def check_encoder_frozen(freeze: Sequence[str], model) -> None:
    paths = jax.tree.leaves(param_paths(nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))))
    unfrozen = [p for p in paths if not any(re.search(f, "encoder/" + p) for f in freeze)]
    if unfrozen:
        raise ValueError(f"train.cache_encoder needs a frozen encoder (optimizer.freeze such as '^encoder/'); "
                         f"trainable: encoder/{unfrozen[0]} and {len(unfrozen) - 1} more")


def encoded_sources(model, data_cfg, *, n_mels: int, freeze: Sequence[str], process_index: int = 0,
                    process_count: int = 1) -> dict[str, data_sources.InMemorySource]:
    """An in-memory source of encoder outputs for every audio component of `data_cfg.train` (all rows: the pipeline
    takes this process's share of them as it does of any source; the processes share the encoding)."""
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
        examples = [source[i] for i in range(len(source))]
        out[name] = data_sources.InMemorySource(encode_examples(model, examples, n_mels=n_mels,
                                                                process_index=process_index,
                                                                process_count=process_count))
    return out
