"""jaxasr LoRA adapters of a Whisper <-> a PEFT adapter directory for the exported HF Whisper.

A PEFT LoRA adapter is `adapter_config.json` plus `adapter_model.safetensors` with, for every
adapted `nn.Linear` (weight [out, in]), `base_model.model.<module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]; PEFT adds `lora_B @ lora_A * lora_alpha / r` to the weight. jaxasr keeps
`lora_a` [layers, *in_shape, r] and `lora_b` [layers, r, *out_shape] beside each kernel (see
`jaxasr.models.lora`); the flattening of the multi-dim in/out shapes is the one
`jaxasr.convert.hf_whisper` uses for the kernels, so the two deltas are the same matrix.

Load the export in PyTorch with
`peft.PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(hf_dir), adapter_dir)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxasr.convert import hf_whisper
from jaxasr.models import lora
from jaxasr.models.whisper import WhisperConfig

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> WhisperForConditionalGeneration
DTYPES = {"float32": np.float32, "float16": np.float16}

def linear_modules(cfg: WhisperConfig) -> dict[str, tuple[str, int | None]]:
    """{HF module name (`model.decoder.layers.0.self_attn.q_proj`): (jaxasr module path, layer or None)}
    for every linear layer of a Whisper, from `hf_whisper.param_table`."""
    out = {}
    for path, key, kind, n in hf_whisper.param_table(cfg):
        if kind != hf_whisper._LINEAR:
            continue
        module, hf = "/".join(path[:-1]), key.removesuffix(".weight")
        for i in range(n) if n else [None]:
            out[hf.format(i=i)] = (module, i)
    return out


def _by_module(cfg: WhisperConfig) -> dict[str, list[str]]:
    """{jaxasr module path: its HF module names: one per stacked layer, or one for an unstacked layer}."""
    out: dict[str, list[str]] = {}
    for hf, (module, _) in linear_modules(cfg).items():
        out.setdefault(module, []).append(hf)
    return out


def _stacked(module: str, cfg: WhisperConfig) -> bool:
    return any(n for path, _, kind, n in hf_whisper.param_table(cfg)
               if kind == hf_whisper._LINEAR and "/".join(path[:-1]) == module)


def peft_tensors(adapters: dict[str, tuple[np.ndarray, np.ndarray]], cfg: WhisperConfig) -> dict[str, np.ndarray]:
    """{jaxasr module path: (lora_a, lora_b)} -> PEFT's {key: tensor} (layers unstacked, [r, in] / [out, r])."""
    table = _by_module(cfg)
    out = {}
    for module, (a, b) in adapters.items():
        if module not in table:
            raise KeyError(f"{module} is not a linear layer of the Hugging Face Whisper")
        names, a, b = table[module], np.asarray(a), np.asarray(b)
        layers = zip(names, a, b) if _stacked(module, cfg) else [(names[0], a, b)]
        for hf, ai, bi in layers:
            r = ai.shape[-1]
            out[f"{PREFIX}{hf}.lora_A.weight"] = np.ascontiguousarray(ai.reshape(-1, r).T)
            out[f"{PREFIX}{hf}.lora_B.weight"] = np.ascontiguousarray(bi.reshape(r, -1).T)
    return out


def _target_modules(adapted: set[str], cfg: WhisperConfig) -> list[str]:
    """PEFT `target_modules`: the short names (`q_proj`) when they select exactly the adapted HF
    modules, else the full module names (PEFT matches a list entry by name or dotted suffix)."""
    leaves = {m.rsplit(".", 1)[-1] for m in adapted}
    selected = {m for m in linear_modules(cfg) if m.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == adapted else sorted(adapted)


def adapter_config(cfg: lora.LoraConfig, target_modules: list[str], base_model_name_or_path: str = "") -> dict:
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft(model: nnx.Module, out_dir: str | Path, *, base_model_name_or_path: str = "",
                dtype: str = "float32") -> Path:
    """Write the adapters of a LoRA Whisper (`jaxasr.models.lora.apply_lora`) as a PEFT adapter dir."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    mods = lora.lora_modules(model)
    lcfg = lora.lora_config_of(model)
    adapters = {p: (np.asarray(m.lora_a[...]), np.asarray(m.lora_b[...])) for p, m in mods.items()}
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in peft_tensors(adapters, model.cfg).items()}
    adapted = {k[len(PREFIX):].removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = adapter_config(lcfg, _target_modules(adapted, model.cfg), base_model_name_or_path)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def import_peft(model: nnx.Module, adapter_dir: str | Path, *, seed: int = 0) -> nnx.Module:
    """Add the LoRA adapters of a PEFT directory to a (base) jaxasr Whisper, in place."""
    adapter_dir = Path(adapter_dir)
    conf = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {conf.get('peft_type')!r}, only LORA is supported")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if conf.get(field):
            raise ValueError(f"{adapter_dir}: {field}=true is not supported")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-module rank_pattern/alpha_pattern are not supported")
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise KeyError(f"{adapter_dir}: unexpected tensor {key!r}")
        found.setdefault(match.group(1), {})[match.group(2)] = value
    table, by_module = linear_modules(model.cfg), _by_module(model.cfg)
    unknown = sorted(set(found) - set(table))
    if unknown:
        raise KeyError(f"{adapter_dir}: adapters on modules jaxasr's Whisper lacks, e.g. {unknown[:3]}")
    modules = sorted({table[hf][0] for hf in found})
    for module in modules:
        missing = [hf for hf in by_module[module] if hf not in found]
        if missing:
            raise ValueError(f"{adapter_dir}: adapters on some layers only (no {missing[0]}); jaxasr adapts "
                             "every layer of a stacked module")
    cfg = lora.LoraConfig(targets=tuple(f"^{re.escape(m)}$" for m in modules), rank=int(conf["r"]),
                          alpha=float(conf["lora_alpha"]), dropout=float(conf.get("lora_dropout", 0.0)), seed=seed)
    lora.apply_lora(model, cfg)
    mods = lora.lora_modules(model)
    for module in modules:
        m, names = mods[module], by_module[module]
        lead = m.lora_a.ndim - m.n_in - 1
        a = [found[hf]["A"].T.reshape(m.lora_a.shape[lead:]) for hf in names]
        b = [found[hf]["B"].T.reshape(m.lora_b.shape[lead:]) for hf in names]
        a, b = (np.stack(a), np.stack(b)) if lead else (a[0], b[0])
        m.lora_a[...] = np.asarray(a, m.lora_a.dtype)
        m.lora_b[...] = np.asarray(b, m.lora_b.dtype)
    return model
