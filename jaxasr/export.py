"""Export a training run's checkpoint as a Hugging Face Whisper directory.

    python -m jaxasr.export --workdir runs/demo --best --out out/demo-hf
    python -m jaxasr.export --workdir runs/demo --step 400 --out out/step400-hf [--dtype float16]
    python -m jaxasr.export --workdir runs/lora --out out/lora-hf --peft        # base + PEFT adapter
    python -m jaxasr.export --workdir runs/lora --out out/lora-hf --merge-lora  # adapters folded in

A LoRA run exports merged weights unless --peft is given; then OUT holds the base model and
OUT/adapter the PEFT adapter (`PeftModel.from_pretrained(base, OUT/adapter)`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_collections
import numpy as np
from flax import nnx, traverse_util

from jaxasr.configuration import config_from_json
from jaxasr.convert.export import DTYPES, export_hf
from jaxasr.convert.peft import export_peft
from jaxasr.convert.sources import WhisperCheckpoint, load_tokenizer
from jaxasr.models.lora import apply_lora, lora_modules, merge_lora
from jaxasr.models.state import flat_state, load_flat_state
from jaxasr.models.whisper import Whisper, WhisperConfig
from jaxasr.training.checkpointing import Checkpoints
from jaxasr.training.trainer import lora_config


def restore_run(workdir: Path, step: int | None = None, best: bool = False):
    """(model with the checkpoint's weights (and adapters), base model info, run config, step)."""
    info = json.loads((workdir / "model_info" / "model_info.json").read_text())
    config: ml_collections.ConfigDict = config_from_json((workdir / "config.json").read_text())
    best_set = config.eval.best_set or next(iter(config.eval.sets), "")
    ckpts = Checkpoints(workdir / "checkpoints", best_metric=f"{best_set}/wer" if best_set else None)
    try:
        chosen = step if step is not None else ckpts.best_step() if best else ckpts.latest_step()
        if chosen is None:
            raise FileNotFoundError(f"{workdir}: no {'evaluated ' if best else ''}checkpoint to export")
        if chosen not in ckpts.manager.all_steps():
            raise FileNotFoundError(f"{workdir}: no checkpoint at step {chosen}; have {list(ckpts.manager.all_steps())}")
        weights, _ = ckpts.restore_model(chosen)
    finally:
        ckpts.close()
    cfg = WhisperConfig.from_hf(info["hf_config"])
    model = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    if config.model.lora.targets:
        model = apply_lora(model, lora_config(config))
    load_flat_state(model, traverse_util.flatten_dict(weights))
    return model, info, config, chosen


def _checkpoint(model, info: dict, tokenizer, source: str) -> WhisperCheckpoint:
    return WhisperCheckpoint(hf_config=info["hf_config"], generation_config=info["generation_config"],
                             params={k: np.asarray(v) for k, v in flat_state(model).items()}, tokenizer=tokenizer,
                             preprocessor_config=info["preprocessor_config"], source=source)


def checkpoint_from_workdir(workdir: Path, step: int | None = None, best: bool = False) -> tuple[WhisperCheckpoint, int]:
    """The checkpoint's model as a WhisperCheckpoint (LoRA adapters merged into the weights)."""
    model, info, _, chosen = restore_run(workdir, step, best)
    if lora_modules(model):
        model = merge_lora(model)
    return _checkpoint(model, info, load_tokenizer(workdir / "model_info"), f"{workdir}@{chosen}"), chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxasr.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="export this step (default: the latest)")
    which.add_argument("--best", action="store_true", help="export the step with the best eval WER")
    p.add_argument("--out", type=Path, required=True, help="Hugging Face output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--peft", action="store_true", help="LoRA run: base model in OUT, PEFT adapter in OUT/adapter")
    lora.add_argument("--merge-lora", action="store_true", help="LoRA run: fold the adapters into the weights (default)")
    args = p.parse_args(argv)
    try:
        model, info, _, step = restore_run(args.workdir, args.step, args.best)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.workdir / "model_info")
    source = f"{args.workdir}@{step}"
    if args.peft:
        if not lora_modules(model):
            print("error: --peft: this run has no LoRA adapters (model.lora.targets is empty)", file=sys.stderr)
            return 2
        base = {k: np.asarray(v) for k, v in flat_state(model).items() if not k[-1].startswith("lora_")}
        export_hf(WhisperCheckpoint(info["hf_config"], info["generation_config"], base, tokenizer,
                                    info["preprocessor_config"], source), args.out, dtype=args.dtype)
        export_peft(model, args.out / "adapter", base_model_name_or_path=str(args.out.absolute()), dtype=args.dtype)
        print(f"wrote {args.out} (base) and {args.out / 'adapter'} (PEFT adapter) from step {step} of {args.workdir}")
        return 0
    if lora_modules(model):
        model = merge_lora(model)
    export_hf(_checkpoint(model, info, tokenizer, source), args.out, dtype=args.dtype)
    print(f"wrote {args.out} from step {step} of {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
