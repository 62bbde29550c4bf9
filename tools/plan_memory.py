"""Per-device memory of a Whisper train step, from its ahead-of-time compilation (never run).

    python tools/plan_memory.py --model large-v3 --mesh 1,8,1 --batch 16 --label-len 128 \
        [--remat none|full|dots|dots_no_batch] [--scan] [--dtype bfloat16] [--param-dtype float32] \
        [--freeze '^encoder/' ...] [--encoded] [--optimizer adamw|adam|sgd|adafactor|lion] \
        [--devices 8] [--no-compile] [--json]

`--mesh` is data,fsdp,tensor (one size may be -1). `--devices N` simulates N host (CPU) devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, `JAX_PLATFORMS=cpu`, set before jax is
imported): the figures are then XLA:CPU's. Without it the mesh is built over this machine's
devices. No weights are allocated: parameters and optimizer state are shapes with shardings
(`TrainStep.abstract`), so large-v3 on 8 devices plans on a host that could not hold it.
The logic lives in `jaxasr.training.memory` (`plan`, `format_plan`).

Cost on a CPU host (large-v3, 8 simulated devices): with `--scan` one run takes about 25 s of
CPU and 0.7 GiB of host memory; unrolled (no `--scan`) XLA compiles 64 layers' bodies: many
CPU-minutes and 7-13 GiB of host memory. Parameter and optimizer figures do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="large-v3", help="Whisper preset (tiny, base, ..., large-v3)")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes")
    ap.add_argument("--batch", type=int, default=16, help="global batch size")
    ap.add_argument("--label-len", type=int, default=128, help="decoder tokens per example")
    ap.add_argument("--remat", default="none", help="remat policy (jaxasr.models.whisper.REMAT_POLICIES)")
    ap.add_argument("--scan", action="store_true", help="nnx.scan over layers")
    ap.add_argument("--dtype", default="float32", help="compute dtype")
    ap.add_argument("--param-dtype", default="float32", help="parameter dtype")
    ap.add_argument("--freeze", action="append", default=[], help="regex of frozen parameter paths (repeatable)")
    ap.add_argument("--encoded", action="store_true", help="precomputed encoder outputs instead of features")
    ap.add_argument("--optimizer", default="adamw", help="build_optimizer name")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--devices", type=int, default=None, help="simulate this many host (CPU) devices")
    ap.add_argument("--no-compile", action="store_true", help="only the exact parameter/optimizer figures")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON after the table")
    args = ap.parse_args(argv)

    if args.devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={args.devices}"])
        os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules and args.devices:
        raise RuntimeError("--devices must be set before jax is imported")

    from jaxasr.training.memory import format_plan, plan

    result = plan(args.model, args.mesh, args.batch, args.label_len, remat=args.remat, scan=args.scan,
                  dtype=args.dtype, param_dtype=args.param_dtype, freeze=args.freeze,
                  optimizer={"name": args.optimizer, "peak_lr": 1e-5}, label_smoothing=args.label_smoothing,
                  encoded=args.encoded, compile=not args.no_compile)
    print(format_plan(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
