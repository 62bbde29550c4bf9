"""Train or adapt a model: `python -m jaxasr.train --config configs/demo.py --workdir runs/demo`.

    --config.key.sub=value   override any config field (unknown keys and wrong types fail at once)
Resumes from the latest checkpoint in --workdir. SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import sys

from jaxasr.configuration import ConfigError, parse_train_args


def main(argv=None) -> int:
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

    summary = train(config, workdir)
    print(_report(summary))
    return 0


def _report(summary: dict) -> str:
    lines = [f"{summary['stopped']} after {summary['steps']} steps; best checkpoint: step {summary['best_step']}"]
    zero, final = summary.get("zero_shot") or {}, summary.get("final") or {}
    names = sorted({k.split("/")[0] for k in {**zero, **final} if k.endswith("/wer")})
    if names:
        lines.append(f"{'eval set':<24}{'WER before':>12}{'WER after':>12}")
        for n in names:
            before, after = zero.get(f"{n}/wer"), final.get(f"{n}/wer")
            fmt = lambda v: f"{v:12.2f}" if v is not None else f"{'-':>12}"  # noqa: E731
            lines.append(f"{n:<24}{fmt(before)}{fmt(after)}")
    if summary.get("skipped"):
        lines.append("skipped examples: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["skipped"].items())))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
