"""Export a training run's checkpoint as a Hugging Face Whisper directory.

    python -m jaxasr.export --workdir runs/demo --best --out out/demo-hf
    python -m jaxasr.export --workdir runs/demo --step 400 --out out/step400-hf [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flax import traverse_util

from jaxasr.convert.export import DTYPES, export_hf
from jaxasr.convert.sources import WhisperCheckpoint, load_tokenizer
from jaxasr.training.checkpointing import Checkpoints


def checkpoint_from_workdir(workdir: Path, step: int | None = None, best: bool = False) -> tuple[WhisperCheckpoint, int]:
    """The model of one checkpoint of `workdir` (latest by default) with the base model's configs."""
    info = json.loads((workdir / "model_info" / "model_info.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    best_set = config["eval"]["best_set"] or next(iter(config["eval"]["sets"]), "")
    ckpts = Checkpoints(workdir / "checkpoints", best_metric=f"{best_set}/wer" if best_set else None)
    try:
        chosen = step if step is not None else ckpts.best_step() if best else ckpts.latest_step()
        if chosen is None:
            raise FileNotFoundError(f"{workdir}: no {'evaluated ' if best else ''}checkpoint to export")
        if chosen not in ckpts.manager.all_steps():
            raise FileNotFoundError(f"{workdir}: no checkpoint at step {chosen}; have {list(ckpts.manager.all_steps())}")
        model, _ = ckpts.restore_model(chosen)
    finally:
        ckpts.close()
    params = {k: v for k, v in traverse_util.flatten_dict(model).items()}
    ckpt = WhisperCheckpoint(hf_config=info["hf_config"], generation_config=info["generation_config"],
                             params=params, tokenizer=load_tokenizer(workdir / "model_info"),
                             preprocessor_config=info["preprocessor_config"], source=f"{workdir}@{chosen}")
    return ckpt, chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxasr.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="export this step (default: the latest)")
    which.add_argument("--best", action="store_true", help="export the step with the best eval WER")
    p.add_argument("--out", type=Path, required=True, help="Hugging Face output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    try:
        ckpt, step = checkpoint_from_workdir(args.workdir, args.step, args.best)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    export_hf(ckpt, args.out, dtype=args.dtype)
    print(f"wrote {args.out} from step {step} of {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
