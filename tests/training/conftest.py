"""Fixtures for trainer tests: a small random Whisper with tiny.en's vocabulary and real speech
in ArrayRecord shards, so that a whole training run takes seconds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jaxasr.convert.export import save_native
from jaxasr.convert.sources import WhisperCheckpoint
from jaxasr.data.records import write_shards
from jaxasr.models.state import flat_state
from jaxasr.models.whisper import Whisper, WhisperConfig

SMALL = dict(d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=128, decoder_ffn_dim=128, max_target_positions=96)


@pytest.fixture(scope="session")
def small_whisper_dir(tiny_en_checkpoint, tmp_path_factory) -> Path:
    """A randomly initialized 2-layer Whisper that uses tiny.en's tokenizer and generation config."""
    base = tiny_en_checkpoint
    cfg = dataclasses.replace(base.config(), **SMALL)
    model = Whisper(cfg, rngs=nnx.Rngs(0))
    params = {k: np.asarray(v) for k, v in flat_state(model).items()}
    ckpt = WhisperCheckpoint(hf_config={**base.hf_config, **cfg.hf_fields()},
                             generation_config=base.generation_config, params=params, tokenizer=base.tokenizer,
                             preprocessor_config=base.preprocessor_config, source="small-random")
    return save_native(ckpt, tmp_path_factory.mktemp("small_whisper"))


@pytest.fixture(scope="session")
def speech_records(speech_clips, tmp_path_factory) -> Path:
    """The 12 synthesized clips as one ArrayRecord shard (FLAC)."""
    out = tmp_path_factory.mktemp("speech_records")
    write_shards(({"id": c.path.stem, "audio_bytes": c.path.read_bytes(), "text": c.text} for c in speech_clips),
                 out, num_shards=1)
    return out
