"""The two-domain merging experiment: Whisper tiny.en fine-tuned separately on pharmacy and on
banking speech, the two experts merged four ways, compared with each expert and with joint
fine-tuning on both domains: WER per domain (test sets) plus a general set (forgetting).

    make merge-demo                       # or: python tools/merge_demo.py [--workdir runs/merge_demo]
    python tools/merge_demo.py --methods tsv_m ties --alphas 0.5,1.0

Steps, each skipped when its output exists (rerun to resume):
1. synthesize the sets under build/demo/ from configs/demo_text/ (the voices of `make demo`);
2. train `configs/demo.py:pharmacy`, `:banking` and `:joint` into WORKDIR/<name>
   (`python -m jaxasr.train`; frozen encoder, decoder fine-tuned);
3. merge the experts' best checkpoints into the base (`python -m jaxasr.merge --config
   configs/merge/demo.py:<method>`), alpha chosen by the mean dev WER of both domains;
4. decode every model on the test sets; the table goes to stdout, WORKDIR/results.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "build/demo"
TEXT = ROOT / "configs/demo_text"
# name -> seed; the voices and seeds of the Makefile's demo-data, so `make demo`'s sets are reused
SETS = {"pharmacy_train": 1, "pharmacy_dev": 2, "pharmacy_test": 3, "general_test": 4,
        "banking_train": 5, "banking_dev": 6, "banking_test": 7}
VOICES = ["en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb+f2"]
RUNS = ("pharmacy", "banking", "joint")
METHODS = ("tsv_m", "boosted_tsv_m", "ties", "soup")
TEST_SETS = ("pharmacy_test", "banking_test", "general_test")

log = logging.getLogger("merge_demo")


def run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    log.info("done in %.0f s", time.perf_counter() - t0)


def synthesize() -> None:
    for name, seed in SETS.items():
        if not (DATA / name / "arrayrecord").is_dir():
            run([sys.executable, "tools/synthesize.py", str(DATA / name), "--text", str(TEXT / f"{name}.txt"),
                 "--seed", str(seed), "--workers", "2", "--arrayrecord", "--voices", *VOICES])


def train(workdir: Path) -> None:
    for name in RUNS:
        if not (workdir / name / "summary.json").exists():  # written when a run finishes
            run([sys.executable, "-m", "jaxasr.train", "--config", f"configs/demo.py:{name}",
                 "--workdir", str(workdir / name)])


def merge(workdir: Path, methods: list[str], alphas: str | None) -> None:
    for method in methods:
        out = workdir / "merged" / method
        if (out / "jaxasr").is_dir():
            continue
        run([sys.executable, "-m", "jaxasr.merge", "--config", f"configs/merge/demo.py:{method}",
             *(f"--config.experts.{d}=workdir:{workdir / d}@best" for d in ("pharmacy", "banking")),
             f"--config.out={out}", *([f"--config.alphas=({alphas},)"] if alphas else [])])


def evaluate(workdir: Path, methods: list[str]) -> dict[str, dict]:
    """{model: {"wer": {set: %}, ...}} for the base, the runs' best checkpoints and the merges."""
    import numpy as np

    from jaxasr.convert.sources import load_checkpoint
    from jaxasr.data import pipeline
    from jaxasr.data.pipeline import dataset_config
    from jaxasr.merging.runner import load_any
    from jaxasr.models.state import load_flat_state
    from jaxasr.training.evaluation import Evaluator, make_eval_set

    base = load_checkpoint("bundled:tiny.en")
    models = {"base (zero-shot)": base.params}
    models |= {f"{name} fine-tune" if name == "joint" else f"{name} expert":
               load_any(f"workdir:{workdir / name}@best").params for name in RUNS}
    alphas = {}
    for method in methods:
        out = workdir / "merged" / method
        models[f"merge: {method}"] = load_checkpoint(out / "jaxasr").params
        alphas[f"merge: {method}"] = json.loads((out / "alpha_grid.json").read_text())["best_alpha"]

    model = base.build()
    sets = []
    for name in TEST_SETS:
        examples, _ = pipeline.load_eval_set(dataset_config(source="arrayrecord", path=str(DATA / name / "arrayrecord")))
        sets.append(make_eval_set(name, examples, model.cfg.num_mel_bins))
    evaluator = Evaluator(sets, base.tokenizer, base.generation_config, batch_size=16, max_new_tokens=64)
    encoder = [p for p in base.params if p[0] == "encoder"]
    if all(np.array_equal(m[p], base.params[p]) for m in models.values() for p in encoder):
        evaluator.encode_sets(model)  # every model kept the base's encoder: encode each clip once
    results = {}
    for name, params in models.items():
        load_flat_state(model, params)
        r, _ = evaluator.run(model)
        results[name] = {"wer": {s: float(r[s]["wer"]) for s in TEST_SETS},
                         "cer": {s: float(r[s]["cer"]) for s in TEST_SETS}, "alpha": alphas.get(name)}
        log.info("%s: %s", name, ", ".join(f"{s} {v:.2f}" for s, v in results[name]["wer"].items()))
    return results


def table(results: dict[str, dict]) -> str:
    head = "| model | alpha | " + " | ".join(TEST_SETS) + " | mean of domains |"
    lines = [head, "|" + "---|" * (len(TEST_SETS) + 3)]
    for name, r in results.items():
        w = r["wer"]
        mean = (w["pharmacy_test"] + w["banking_test"]) / 2
        alpha = f"{r['alpha']:g}" if r["alpha"] is not None else ""
        lines.append(f"| {name} | {alpha} | " + " | ".join(f"{w[s]:.2f}" for s in TEST_SETS) + f" | {mean:.2f} |")
    return "\n".join(lines) + "\n\nWER % (Whisper English normalizer); best checkpoints chosen on dev sets."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs/merge_demo")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--alphas", default=None, help="comma-separated alpha grid (default: configs/merge/demo.py's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax._src", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workdir = args.workdir.absolute()
    t0 = time.perf_counter()
    synthesize()
    train(workdir)
    merge(workdir, args.methods, args.alphas)
    results = evaluate(workdir, args.methods)
    text = table(results)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "results.md").write_text(text + "\n")
    print(text)
    log.info("merge demo: %.1f min", (time.perf_counter() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
