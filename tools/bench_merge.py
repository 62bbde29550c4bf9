"""Benchmark model merging on CPU: jaxasr's merge_deltas against mergekit (TIES) and PyTorch (TSV-M).

    python tools/bench_merge.py [--preset small] [--tasks 4 8] [--methods tsv_m ties] [--density 0.2]
                                [--fraction 1.0] [--include REGEX] [--exclude REGEX]
                                [--repeats 2] [--seed 0] [--skip-check]

Inputs: random float32 task vectors with the parameter shapes of a Whisper preset (`--preset`,
whisper-small by default: 241.7M parameters per task vector), laid out per layer as a Hugging Face
checkpoint has them (what mergekit merges, and what "per-layer" TSV-M decomposes): every attention
projection a 2-D (d_model, d_model) matrix, fc1/fc2 (ffn, d_model) / (d_model, ffn), the token and
position embeddings 2-D, biases and norms 1-D, the convolutions 3-D. Entries are N(0, 0.01^2), each
weight of each task drawn from its own seeded generator; the `max(--tasks)` task vectors are made
once and the smaller task counts use the first T of them (T=8 of whisper-small is ~7.7 GB).
`--fraction F` keeps every round(1/F)-th weight in name order (a mix of all kinds of weight) and
`--include`/`--exclude` filter weights by a regular expression on their names (e.g.
`--include decoder`); the header says exactly which weights and how many parameters were merged.

Systems, all in this one process, on the same task vectors:
  jaxasr           merge_deltas(method, task_vectors): numpy trees in, numpy trees out (stacking
                   per shape group, host->device and back included); one jitted vmapped kernel per
                   shape group. The first call on the same shapes compiles; it is timed on its own
                   ("warm-up s"; compile ~ warm-up - best).
  mergekit TIES    mergekit's registry "ties" method, one TensorGroup per weight (zero base, the task
                   vectors as experts), density and weights 1 per task: the same TIES as jaxasr's.
  torch TSV-M      written here, per weight: thin SVD of each task's matrix (torch.linalg.svd,
                   full_matrices=False), keep the top floor(min(m,n)/T) triplets, concatenate the U
                   and the V blocks, replace each by its polar factor (again via SVD) and recombine,
                   U_perp diag(sigma) V_perp^T; weights that are not 2-D are averaged (as jaxasr does).
Before timing, one 2-D weight is merged by both sides and the relative Frobenius difference printed
(TSV-M: jaxasr vs torch; TIES: jaxasr vs mergekit), which must be below 1e-4.

Threads: OMP/MKL/OpenBLAS and torch intra-op use the cores this process may run on; XLA:CPU uses
its default pool (all cores). Freed heap memory is retained for all systems (jaxasr.host_memory, as
the merge CLI does); JAXASR_RETAIN_FREED_MEMORY=0 measures glibc's defaults. Each system first runs
once (warm-up), then `--repeats` timed runs round-robin over every (method, T, system), so load from
other processes on a shared host falls on all alike; the best run counts. Ratios (peer seconds /
jaxasr seconds) print last.
"""

from __future__ import annotations

import os

from jaxasr.host_memory import retain_freed_memory

# For every system alike, as the merge CLI does: before any thread allocates.
RETAINED = retain_freed_memory()
try:
    N_THREADS = len(os.sched_getaffinity(0))
except AttributeError:  # not Linux
    N_THREADS = os.cpu_count() or 1
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, str(N_THREADS))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

SCALE = 0.01  # task vectors are small next to the weights; the scale does not change the timings
PARITY_TOL = 1e-4


# --------------------------------------------------------------------------- shapes and inputs


def hf_shapes(preset: str) -> list[tuple[str, tuple[int, ...]]]:
    """(HF-style name, shape) of every weight of a Whisper preset, one entry per layer, as a
    Hugging Face checkpoint lays them out (linear weights (out, in), conv (out, in, width))."""
    from flax import nnx

    from jaxasr.convert import hf_whisper
    from jaxasr.models.state import flat_state
    from jaxasr.models.whisper import Whisper, WhisperConfig

    cfg = WhisperConfig.preset(preset)
    native = flat_state(nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0))))
    out = []
    for path, key, kind, layers in hf_whisper.param_table(cfg):
        shape = tuple(native[path].shape)
        if layers:
            assert shape[0] == layers, (path, shape)
            shape = shape[1:]
        if kind == hf_whisper._LINEAR:
            if path[-2] == "out_proj":  # (heads, head_dim, d) -> (d, heads * head_dim)
                shape = (shape[-1], math.prod(shape[:-1]))
            else:  # (in, heads, head_dim) or (in, out) -> (out, in)
                shape = (math.prod(shape[1:]), shape[0])
        elif kind == hf_whisper._BIAS:
            shape = (math.prod(shape),)
        elif kind == hf_whisper._CONV:  # (width, in, out) -> (out, in, width)
            shape = shape[::-1]
        for i in range(layers or 1):
            out.append((key.format(i=f"{i:02d}"), shape))  # zero-padded: name order interleaves layers
    total = sum(math.prod(v.shape) for v in native.values())
    assert sum(math.prod(s) for _, s in out) == total, "per-layer layout lost parameters"
    return sorted(out)


def select(shapes, fraction: float, include: str | None, exclude: str | None):
    picked = [(n, s) for n, s in shapes
              if (include is None or re.search(include, n)) and (exclude is None or not re.search(exclude, n))]
    step = max(1, round(1 / fraction))
    return picked[::step]


def make_task_vectors(shapes, num_tasks: int, seed: int) -> list[dict[str, np.ndarray]]:
    """num_tasks trees {name: float32 array}; weight i of task t from default_rng([seed, i, t])."""
    tvs: list[dict[str, np.ndarray]] = [{} for _ in range(num_tasks)]
    for i, (name, shape) in enumerate(shapes):
        for t in range(num_tasks):
            x = np.random.default_rng([seed, i, t]).standard_normal(shape, dtype=np.float32)
            x *= SCALE
            tvs[t][name] = x
    return tvs


# --------------------------------------------------------------------------- peers


def torch_tsv_m_one(xs):
    """TSV-M of one weight from its per-task torch tensors (the reference algorithm, per layer)."""
    import torch

    if xs[0].ndim != 2:
        return torch.stack(xs).mean(0)
    t = len(xs)
    m, n = xs[0].shape
    k = min(m, n) // t
    if k == 0:
        return torch.zeros_like(xs[0])
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    pu, _, qu = torch.linalg.svd(u_cat, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v_cat, full_matrices=False)
    return ((pu @ qu) * s_cat) @ (pv @ qv)


def torch_tsv_m(tensors: list[dict], names: Sequence[str]) -> dict:
    import torch

    with torch.inference_mode():
        return {n: torch_tsv_m_one([tv[n] for tv in tensors]).numpy() for n in names}


def mergekit_ties(tensors: list[dict], zeros: dict, names: Sequence[str], density: float) -> dict:
    """mergekit's TIES, one TensorGroup per weight: base = zeros, experts = the task vectors."""
    import torch
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get("ties")
    t = len(tensors)
    params = {"weight": {i: 1.0 for i in range(1, t + 1)}, "density": {i: density for i in range(1, t + 1)}}
    out = {}
    with torch.inference_mode():
        for n in names:
            group = TensorGroup.from_tensors([zeros[n], *(tv[n] for tv in tensors)], base_index=0)
            out[n] = method([group], parameters=params)[0].numpy()
    return out


def jaxasr_merge(method: str, tvs: list[dict], density: float) -> dict:
    from jaxasr.merging import merge_deltas

    params = {"density": density} if method == "ties" else {}
    return merge_deltas(method, tvs, **params)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Case:
    method: str
    tasks: int
    system: str
    run: Callable[[], object]
    warmup_s: float = float("nan")
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.times)


def measure(cases: list[Case], repeats: int) -> None:
    """One warm-up call per case, then `repeats` timed calls round-robin over all cases."""
    for c in cases:
        start = time.perf_counter()
        c.run()
        c.warmup_s = time.perf_counter() - start
        print(f"  warm-up {c.method:6s} T={c.tasks} {c.system:14s} {c.warmup_s:8.2f} s", flush=True)
    for r in range(repeats):
        for c in cases:
            start = time.perf_counter()
            c.run()
            c.times.append(time.perf_counter() - start)
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{c.system}/{c.method}/T{c.tasks} {c.times[-1]:.2f}s"
                                                       for c in cases), flush=True)


# --------------------------------------------------------------------------- main


def parity(check_name, tvs, tensors, zeros, tasks, methods, density) -> bool:
    ok = True
    for t in tasks:
        sub = [{check_name: tv[check_name]} for tv in tvs[:t]]
        sub_t = [{check_name: tv[check_name]} for tv in tensors[:t]]
        if "tsv_m" in methods:
            d = rel_diff(jaxasr_merge("tsv_m", sub, density)[check_name], torch_tsv_m(sub_t, [check_name])[check_name])
            ok &= d < PARITY_TOL
            print(f"check tsv_m T={t} {check_name} {tvs[0][check_name].shape}: "
                  f"|jaxasr - torch| / |torch| = {d:.2e} ({'ok' if d < PARITY_TOL else 'FAIL'} < {PARITY_TOL:g})")
        if "ties" in methods:
            d = rel_diff(jaxasr_merge("ties", sub, density)[check_name],
                         mergekit_ties(sub_t, zeros, [check_name], density)[check_name])
            ok &= d < PARITY_TOL
            print(f"check ties  T={t} {check_name} {tvs[0][check_name].shape}: "
                  f"|jaxasr - mergekit| / |mergekit| = {d:.2e} ({'ok' if d < PARITY_TOL else 'FAIL'} < {PARITY_TOL:g})")
    return ok


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="Whisper preset whose shapes the task vectors take")
    p.add_argument("--tasks", type=int, nargs="+", default=[4, 8], help="numbers of task vectors")
    p.add_argument("--methods", nargs="+", choices=["tsv_m", "ties"], default=["tsv_m", "ties"])
    p.add_argument("--density", type=float, default=0.2, help="TIES density (every task)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="merge every round(1/F)-th weight (name order) of those selected")
    p.add_argument("--include", default=None, help="only weights whose HF name matches this regex")
    p.add_argument("--exclude", default=None, help="drop weights whose HF name matches this regex")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per system after the warm-up; best counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-check", action="store_true", help="skip the one-weight parity check")
    args = p.parse_args(argv)
    if not 0 < args.fraction <= 1 or args.repeats < 1 or min(args.tasks) < 1:
        p.error("--fraction must be in (0, 1], --repeats and --tasks positive")

    import torch

    torch.set_num_threads(N_THREADS)
    import jax
    import importlib.metadata

    all_shapes = hf_shapes(args.preset)
    shapes = select(all_shapes, args.fraction, args.include, args.exclude)
    if not shapes:
        p.error("no weights selected")
    names = [n for n, _ in shapes]
    n_params = sum(math.prod(s) for _, s in shapes)
    n_all = sum(math.prod(s) for _, s in all_shapes)
    t_max = max(args.tasks)

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"mergekit {importlib.metadata.version('mergekit')}; threads: torch intra-op {torch.get_num_threads()}, "
          f"OMP/MKL/OPENBLAS {os.environ['OMP_NUM_THREADS']}, XLA:CPU default pool (cores: {N_THREADS}); "
          f"freed heap memory retained: {RETAINED}")
    print(f"whisper-{args.preset} shapes, per-layer HF layout: {len(shapes)} of {len(all_shapes)} weights, "
          f"{n_params / 1e6:.1f}M of {n_all / 1e6:.1f}M parameters ({100 * n_params / n_all:.1f}%) per task vector"
          f" (fraction {args.fraction:g}, include {args.include!r}, exclude {args.exclude!r})")
    kinds = Counter(s for _, s in shapes)
    print("  shapes (count x shape): " + ", ".join(f"{c}x{s}" for s, c in sorted(kinds.items(), key=lambda x: -x[1])))
    if len(shapes) <= 12:
        print("  weights: " + ", ".join(names))
    else:
        print(f"  weights: {', '.join(names[:6])}, ..., {', '.join(names[-3:])}")

    start = time.perf_counter()
    tvs = make_task_vectors(shapes, t_max, args.seed)
    print(f"{t_max} random task vectors (N(0, {SCALE:g}^2), float32, {t_max * n_params * 4 / 2**30:.2f} GiB) "
          f"made in {time.perf_counter() - start:.1f} s; T < {t_max} uses the first T")
    tensors = [{n: torch.from_numpy(x) for n, x in tv.items()} for tv in tvs]  # shared memory, no copy
    zeros = {n: torch.zeros(s) for n, s in shapes} if "ties" in args.methods else {}

    if not args.skip_check:
        two_d = [n for n, s in shapes if len(s) == 2]
        check_name = min(two_d, key=lambda n: (math.prod(tvs[0][n].shape) < 768 * 768, math.prod(tvs[0][n].shape)),
                         default=None)
        if check_name is None:
            print("check skipped: no 2-D weight selected")
        elif not parity(check_name, tvs, tensors, zeros, args.tasks, args.methods, args.density):
            raise SystemExit("parity check failed")

    cases: list[Case] = []
    for method in args.methods:
        for t in args.tasks:
            sub, sub_t = tvs[:t], tensors[:t]
            cases.append(Case(method, t, "jaxasr", lambda m=method, s=sub: jaxasr_merge(m, s, args.density)))
            if method == "ties":
                cases.append(Case(method, t, "mergekit",
                                  lambda s=sub_t: mergekit_ties(s, zeros, names, args.density)))
            else:
                cases.append(Case(method, t, "torch", lambda s=sub_t: torch_tsv_m(s, names)))
    print(f"\ntiming: a warm-up call of each, then best of {args.repeats} interleaved")
    measure(cases, args.repeats)

    header = f"{'method':7s} {'T':>2s} {'system':9s} {'best s':>8s} {'median s':>8s} {'warm-up s':>9s} " \
             f"{'compile s':>9s} {'ratio':>6s}"
    print("\n" + header)
    print("-" * len(header))
    ratios = []
    for jx, peer in zip(cases[::2], cases[1::2]):
        ratio = peer.best / jx.best
        ratios.append((jx.method, jx.tasks, peer.system, ratio))
        for c in (jx, peer):
            compile_s = f"{max(c.warmup_s - c.best, 0):9.2f}" if c.system == "jaxasr" else f"{'':9s}"
            print(f"{c.method:7s} {c.tasks:2d} {c.system:9s} {c.best:8.2f} {float(np.median(c.times)):8.2f} "
                  f"{c.warmup_s:9.2f} {compile_s} {(f'{ratio:5.2f}x' if c is peer else ''):>6s}")
    print("(best/median of the timed runs; warm-up: first call on the same shapes; compile: warm-up - best, "
          "jaxasr only; ratio: peer seconds / jaxasr seconds)")
    print()
    for method, t, system, ratio in ratios:
        print(f"ratio {method} T={t}: {system} / jaxasr = {ratio:.2f}x")


if __name__ == "__main__":
    main()
