"""Train one LoRA expert per language or domain from one config (arXiv 2506.21555).

    python tools/train_lora_experts.py --config configs/experts_demo.py --workdir runs/experts
    python tools/train_lora_experts.py --config configs/experts_demo.py --workdir runs/experts --only pharmacy
    --config.key.sub=value   override a shared field (as in `python -m jaxasr.train`)

The config is a training config plus `experts = {name: {overrides}}` (nested dicts, e.g.
{"data": {"train": {...}}, "eval": {"sets": {...}}}); each expert trains into WORKDIR/<name> with
the shared model, LoRA and optimizer, one after the other (each resumes like any run). Combine the
experts with `jaxasr.merging.lora_experts` (weighted_sum, learn_weights, merge_experts, distillation).
"""

from __future__ import annotations

import json
import logging
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        if i + 1 >= len(argv):
            print("error: --only needs NAME[,NAME...]", file=sys.stderr)
            return 2
        only = [n for n in argv[i + 1].split(",") if n]
        del argv[i:i + 2]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from jaxasr.configuration import ConfigError, parse_train_args

    try:
        config, workdir, _ = parse_train_args(argv, prog="python tools/train_lora_experts.py")
        from jaxasr.merging.lora_experts import expert_config, expert_names, train_experts

        for name in only or expert_names(config):
            expert_config(config, name)  # every config error before any training
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summaries = train_experts(config, workdir, only=only)
    for name, s in summaries.items():
        final = {k: round(v, 2) for k, v in (s.get("final") or {}).items() if k.endswith("/wer")}
        print(f"{name}: {s['stopped']} after {s['steps']} steps -> {workdir / name}" + (f"; {json.dumps(final)}" if final else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
