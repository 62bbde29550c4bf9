"""Write a Whisper checkpoint as a Hugging Face directory that transformers loads:
config.json, generation_config.json, model.safetensors, tokenizer and preprocessor files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxasr.convert import hf_whisper, native
from jaxasr.convert.sources import WhisperCheckpoint

DTYPES = {"float32": np.float32, "float16": np.float16}


def export_hf(ckpt: WhisperCheckpoint, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Hugging Face directory for `WhisperForConditionalGeneration` / `WhisperProcessor.from_pretrained`."""
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ckpt.config()
    state_dict = {k: v.astype(DTYPES[dtype]) for k, v in hf_whisper.jaxasr_to_hf(ckpt.params, cfg).items()}
    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})

    hf_config = WhisperConfig(**{**ckpt.hf_config, **cfg.hf_fields()})
    hf_config.architectures = ["WhisperForConditionalGeneration"]
    hf_config.dtype = dtype
    hf_config.save_pretrained(out)
    GenerationConfig.from_dict(ckpt.generation_config).save_pretrained(out)
    ckpt.tokenizer.save_pretrained(out)
    if ckpt.preprocessor_config is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(ckpt.preprocessor_config, indent=2))
    else:
        WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(out)
    return out


def save_native(ckpt: WhisperCheckpoint, out_dir: str | Path) -> Path:
    """The checkpoint as a jaxasr model directory (Orbax parameters)."""
    meta = dict(hf_config=ckpt.hf_config, generation_config=ckpt.generation_config,
                preprocessor_config=ckpt.preprocessor_config)
    return native.save(out_dir, meta, ckpt.params, ckpt.tokenizer)
