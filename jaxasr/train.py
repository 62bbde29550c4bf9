"""Train or adapt a model: `python -m jaxasr.train --config configs/demo.py --workdir runs/demo`.

    --config.key.sub=value   override any config field (unknown keys and wrong types fail at once)
Resumes from the latest checkpoint in --workdir. SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import sys

from jaxasr.configuration import ConfigError, parse_train_args
from jaxasr.host_memory import retain_freed_memory


def main(argv=None) -> int:
    retain_freed_memory()  # before JAX starts its threads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Orbax warns through absl at every save without eval metrics (we track a best metric, and
    # only eval steps have one); that is expected here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        config, workdir, _ = parse_train_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxasr.training.trainer import train  # after argument errors: importing JAX takes seconds

    try:
        summary = train(config, workdir)
    except ConfigError as e:  # checks that need the config resolved (e.g. eval.best_set)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_report(summary))
    return 0


def _report(summary: dict) -> str:
    """WER before training, at the best checkpoint (what `jaxasr.export --best` writes) and at the end."""
    best_step = summary.get("best_step")
    lines = [f"{summary['stopped']} after {summary['steps']} steps; best checkpoint: step {best_step}"]
    evals = {e["step"]: e for e in summary.get("eval", [])}
    columns = [("before", summary.get("zero_shot") or {})]
    if best_step is not None and best_step in evals:
        columns.append((f"best (step {best_step})", evals[best_step]))
    columns.append((f"last (step {summary['steps']})", summary.get("final") or {}))
    names = sorted({k.split("/")[0] for _, col in columns for k in col if k.endswith("/wer")})
    if names:
        w = max(20, *(len(n) + 2 for n in names))
        lines.append(f"{'WER %':<{w}}" + "".join(f"{title:>20}" for title, _ in columns))
        for n in names:
            cells = [col.get(f"{n}/wer") for _, col in columns]
            lines.append(f"{n:<{w}}" + "".join(f"{v:20.2f}" if v is not None else f"{'-':>20}" for v in cells))
    if summary.get("skipped"):
        lines.append("skipped examples: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
