"""jaxasr's own model directory: Orbax parameters plus the configs and tokenizer to use them.

    out/jaxasr_model.json   {"format": ..., "hf_config": ..., "generation_config": ..., "preprocessor_config": ...}
    out/params/             Orbax checkpoint of the parameter tree (nested by module path)
    out/tokenizer*.json ... the tokenizer, as `save_pretrained` writes it
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

META_FILE = "jaxasr_model.json"
FORMAT = "jaxasr-whisper-v1"


def is_native_dir(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / "params").is_dir()


def save(path: str | Path, meta: dict[str, Any], params: dict[tuple[str, ...], Any], tokenizer) -> Path:
    """Write a model directory; the parameters go through Orbax (atomic: a partial write is never read)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    nested = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in params.items()})
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "params", nested, force=True)
    tokenizer.save_pretrained(path)
    (path / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    return path


def load(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], np.ndarray]]:
    path = Path(path).absolute()
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
    with ocp.StandardCheckpointer() as checkpointer:
        nested = checkpointer.restore(path / "params")
    flat = {tuple(k): np.asarray(v) for k, v in traverse_util.flatten_dict(nested).items()}
    return meta, flat
