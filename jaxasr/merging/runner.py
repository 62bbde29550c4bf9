"""Merge Whisper checkpoints from a config, pick the scale alpha by dev WER, write the result.

    config = load_config("configs/merge/demo.py", ["alphas=(0.5, 1.0)"])
    summary = run_merge(config)     # -> {"best_alpha", "rows", "out", ...}

The merged delta is computed once (`merge_deltas` over the experts' task vectors); every alpha of
`config.alphas` then gives `base + alpha * delta`, decoded on every set of `config.eval.sets`
(jitted greedy search, compiled once: all alphas share one model structure). The alpha with the
lowest WER on `config.eval.best_set` (or the mean WER of its '+'-joined sets) is kept and written
as a jaxasr model directory (`out/jaxasr`) and a Hugging Face directory (`out/hf`); the grid goes
to `out/alpha_grid.tsv` and `.json`.

A checkpoint is anything `jaxasr.convert.sources.load_checkpoint` reads (a Hugging Face directory or
hub id, a CTranslate2 directory, a jaxasr model directory, `bundled:tiny.en`), or a training run:
`workdir:runs/demo` (latest checkpoint), `workdir:runs/demo@best`, `workdir:runs/demo@400`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxasr.configuration import (ConfigError, config_to_json, load_config, selection_sets, selection_wer,
                                  split_overrides)
from jaxasr.merging.methods import DEFAULT_MAX_GROUP_BYTES, METHODS

log = logging.getLogger(__name__)

WORKDIR_PREFIX = "workdir:"
GRID_TSV = "alpha_grid.tsv"
GRID_JSON = "alpha_grid.json"
ENCODER_PREFIX = "model.encoder."  # Hugging Face names of the encoder's parameters


def default_config() -> ml_collections.ConfigDict:
    """The fields a merge config sets; `configs/merge/*.py` start from this."""
    c = ml_collections.ConfigDict()
    c.base = ""  # checkpoint the task vectors are taken against
    c.experts = {}  # name -> checkpoint
    c.method = "tsv_m"  # a key of jaxasr.merging.METHODS
    c.params = {}  # the method's parameters (density, beta, weights, ...)
    c.alphas = (0.3, 0.5, 0.7, 1.0)  # merged = base + alpha * delta; exactly one when there are no eval sets
    c.eval = dict(
        sets={},  # name -> dataset config as in training (jaxasr.data.pipeline.dataset_config)
        best_set="",  # its WER picks alpha (default: the first set; "a+b": their mean WER)
        batch_size=16,
        max_new_tokens=128,
        max_examples=0,  # 0 = all
        language="",  # "" = the checkpoint's default (English for multilingual models)
    )
    c.out = ""  # output directory: alpha_grid.tsv/.json, jaxasr/, hf/
    c.hf_dtype = "float32"  # dtype of the Hugging Face export (float32 or float16)
    c.max_group_bytes = DEFAULT_MAX_GROUP_BYTES  # merge memory: stacked input per jitted call
    # this process's devices, as training's mesh (one size may be -1); each group of weights is
    # split over all of them (whole weights per device: no SVD is split)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.seed = 0  # PRNG seed of the random methods (dare_*)
    return c


# --------------------------------------------------------------------------- arguments
class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def parse_args(argv: Sequence[str], *, prog: str = "python -m jaxasr.merge") -> ml_collections.ConfigDict:
    """`--config FILE[:arg] [--config.a.b=v | --config.a.b v ...]` -> the loaded, overridden config."""
    overrides, rest = split_overrides(argv)
    parser = _ArgumentParser(prog=prog, allow_abbrev=False)
    parser.add_argument("--config", help="merge config file, optionally file.py:arg (required)")
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        close = difflib.get_close_matches(unknown[0].split("=", 1)[0], ["--config", "--config.<key>"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unrecognized argument {unknown[0]!r}{hint}")
    if args.config is None:
        raise ConfigError("missing required flag --config")
    return load_config(args.config, overrides)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fail fast (before any checkpoint is read) on a config that cannot run."""
    if not config.base:
        raise ConfigError("config.base: no base checkpoint given")
    if not config.experts:
        raise ConfigError("config.experts: no expert checkpoints given")
    if config.method not in METHODS:
        close = difflib.get_close_matches(config.method, list(METHODS), n=3)
        hint = "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
        raise ConfigError(f"config.method: unknown merging method {config.method!r}{hint} "
                          f"(one of {', '.join(sorted(METHODS))})")
    allowed = METHODS[config.method].defaults
    unknown = sorted(set(config.params) - set(allowed))
    if unknown:
        raise ConfigError(f"config.params: {config.method} takes {sorted(allowed) or 'no parameters'}, "
                          f"not {unknown}")
    alphas = tuple(config.alphas)
    if not alphas or not all(isinstance(a, (int, float)) and math.isfinite(a) for a in alphas):
        raise ConfigError(f"config.alphas: need finite numbers, got {alphas!r}")
    sets = dict(config.eval.sets)
    if sets:
        selection_sets(config.eval.best_set, list(sets))
    elif len(alphas) != 1:
        raise ConfigError(f"config.alphas: without eval sets there is nothing to choose alpha by; give exactly "
                          f"one alpha, not {alphas}")
    if not config.out:
        raise ConfigError("config.out: no output directory given")


def merge_mesh(config: ml_collections.ConfigDict):
    """The mesh of `config.mesh` over this process's devices (None with one device): merging
    pulls every group back to the host, so it stays within the process."""
    import jax

    from jaxasr.parallel.mesh import make_mesh

    try:
        mesh = make_mesh(dict(config.mesh), jax.local_devices())
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config.mesh: {e}") from None
    return mesh if mesh.size > 1 else None


# --------------------------------------------------------------------------- checkpoints
def load_any(source: str):
    """A `WhisperCheckpoint` from a checkpoint source or a training run (`workdir:DIR[@best|@STEP]`)."""
    if source.startswith(WORKDIR_PREFIX):
        from jaxasr.export import checkpoint_from_workdir  # imports the trainer: only when asked for

        spec = source[len(WORKDIR_PREFIX):]
        workdir, _, which = spec.rpartition("@") if "@" in spec else (spec, "", "")
        if which and which != "best" and not which.isdigit():
            raise ConfigError(f"{source}: expected workdir:DIR, workdir:DIR@best or workdir:DIR@STEP")
        step = int(which) if which.isdigit() else None
        ckpt, _ = checkpoint_from_workdir(Path(workdir), step=step, best=which == "best")
        ckpt.source = source
        return ckpt
    from jaxasr.convert.sources import load_checkpoint

    return load_checkpoint(source)


def check_architecture(base: Mapping[tuple[str, ...], Any], expert: Mapping[tuple[str, ...], Any],
                       name: str) -> None:
    """ValueError naming the expert and the first parameter where it differs from the base."""
    missing, extra = sorted(set(base) - set(expert)), sorted(set(expert) - set(base))
    if missing or extra:
        what = (f"lacks {'/'.join(missing[0])}" if missing else "") + (" and " if missing and extra else "") + \
               (f"has {'/'.join(extra[0])}, which the base does not" if extra else "")
        raise ValueError(f"expert {name!r} does not have the base's architecture: it {what} "
                         f"({len(missing)} parameters missing, {len(extra)} extra)")
    for path in sorted(base):
        if np.shape(base[path]) != np.shape(expert[path]):
            raise ValueError(f"expert {name!r} does not have the base's architecture: {'/'.join(path)} has "
                             f"shape {np.shape(expert[path])}, the base {np.shape(base[path])}")


# --------------------------------------------------------------------------- the run
def format_table(rows: Sequence[Mapping[str, Any]], set_names: Sequence[str], best_alpha: float | None,
                 best_set: str) -> str:
    """alpha x set WER table; the chosen alpha marked with '*'."""
    width = max([12] + [len(n) + 2 for n in set_names])
    chosen = best_set.split("+")
    lines = [f"{'alpha':>8}" + "".join(f"{n + ('*' if n in chosen else ''):>{width}}" for n in set_names)]
    for row in rows:
        mark = " *" if row["alpha"] == best_alpha else ""
        lines.append(f"{row['alpha']:>8.2f}" + "".join(f"{row['wer'][n]:>{width}.2f}" for n in set_names) + mark)
    what = f"{best_set} WER" if len(chosen) == 1 else f"mean WER of {', '.join(chosen)}"
    lines.append(f"WER %; * marks the alpha kept (lowest {what}) and the sets that chose it")
    return "\n".join(lines)


def _write_grid(out: Path, summary: dict, set_names: Sequence[str]) -> None:
    with open(out / GRID_TSV, "w") as f:
        f.write("\t".join(["alpha", *(f"{n}/wer" for n in set_names), *(f"{n}/cer" for n in set_names), "best"]) + "\n")
        for row in summary["rows"]:
            cells = [f"{row['alpha']:g}", *(f"{row['wer'][n]:.4f}" for n in set_names),
                     *(f"{row['cer'][n]:.4f}" for n in set_names), str(int(row["alpha"] == summary["best_alpha"]))]
            f.write("\t".join(cells) + "\n")
    (out / GRID_JSON).write_text(json.dumps(summary, indent=2))


def run_merge(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Load, check, merge once, evaluate every alpha, write the best. Returns the grid summary:
    {method, params, best_set, best_alpha, rows: [{alpha, wer: {set: %}, cer: {set: %}}], out, ...}."""
    import jax

    from jaxasr.convert.export import export_hf, save_native
    from jaxasr.convert.sources import WhisperCheckpoint
    from jaxasr.data import pipeline
    from jaxasr.convert import hf_whisper
    from jaxasr.merging.methods import merge_deltas
    from jaxasr.merging.task_vectors import apply_delta, task_vectors
    from jaxasr.models.state import load_flat_state
    from jaxasr.training.evaluation import Evaluator, make_eval_set

    check_config(config)
    mesh = merge_mesh(config)  # before any checkpoint is read: a bad mesh fails fast too
    out = Path(config.out).expanduser()
    t0 = time.perf_counter()
    base = load_any(config.base)
    names = list(config.experts)
    experts = []
    for name in names:
        ckpt = load_any(config.experts[name])
        check_architecture(base.params, ckpt.params, name)
        experts.append(ckpt.params)
    log.info("loaded base %s and %d experts in %.1f s", config.base, len(experts), time.perf_counter() - t0)

    # Merge in Hugging Face's per-layer layout: jaxasr stacks layers and splits heads, while the
    # SVD methods (TSV-M, Iso-C...) work on each layer's 2-D [out, in] matrix, as their
    # references do; non-2-D leaves would otherwise be averaged whole.
    cfg = base.config()
    base_hf = hf_whisper.jaxasr_to_hf(base.params, cfg)
    experts = [hf_whisper.jaxasr_to_hf(e, cfg) for e in experts]
    t0 = time.perf_counter()
    params = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(config.params).items()}
    key = jax.random.key(config.seed) if METHODS[config.method].random else None
    delta = merge_deltas(config.method, task_vectors(experts, base_hf), base=base_hf, key=key,
                         max_group_bytes=int(config.max_group_bytes), mesh=mesh, **params)
    del experts
    merge_seconds = time.perf_counter() - t0
    log.info("%s merge of %d task vectors in %.1f s", config.method, len(names), merge_seconds)

    alphas = [float(a) for a in config.alphas]
    set_names = list(config.eval.sets)
    selection = selection_sets(config.eval.best_set, set_names)
    best_set = "+".join(selection)
    rows = []
    if set_names:
        model = base.build()
        language = config.eval.language or None
        sets = []
        for name in set_names:
            examples, _ = pipeline.load_eval_set(config.eval.sets[name], max_examples=config.eval.max_examples or None)
            sets.append(make_eval_set(name, examples, model.cfg.num_mel_bins))
        evaluator = Evaluator(sets, base.tokenizer, base.generation_config, batch_size=config.eval.batch_size,
                              language=language, max_new_tokens=config.eval.max_new_tokens)
        if not any(np.any(delta[k]) for k in delta if k.startswith(ENCODER_PREFIX)):
            # experts that froze the encoder (the CPU recipe): every alpha has the base's encoder,
            # so each eval clip is encoded once and each alpha only runs the decoder
            t0 = time.perf_counter()
            evaluator.encode_sets(model)
            log.info("merged encoder equals the base's: encoded the eval sets once (%.1f s)", time.perf_counter() - t0)
        for alpha in alphas:
            t0 = time.perf_counter()
            load_flat_state(model, hf_whisper.hf_to_jaxasr(apply_delta(base_hf, delta, alpha), cfg))
            results, _ = evaluator.run(model)
            rows.append({"alpha": alpha, "wer": {n: float(results[n]["wer"]) for n in set_names},
                         "cer": {n: float(results[n]["cer"]) for n in set_names}})
            log.info("alpha %g: %s (%.1f s)", alpha, ", ".join(f"{n} WER {rows[-1]['wer'][n]:.2f}" for n in set_names),
                     time.perf_counter() - t0)
        best_alpha = min(rows, key=lambda r: selection_wer(r["wer"], selection))["alpha"]  # ties: the first listed
    else:
        best_alpha = alphas[0]

    merged = hf_whisper.hf_to_jaxasr(apply_delta(base_hf, delta, best_alpha), cfg)
    ckpt = WhisperCheckpoint(base.hf_config, base.generation_config, merged, base.tokenizer,
                             base.preprocessor_config, source=f"merge:{config.method}@alpha={best_alpha:g}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": config.method, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
               "base": config.base, "experts": dict(config.experts), "alphas": alphas, "sets": set_names,
               "best_set": best_set, "best_alpha": best_alpha, "rows": rows, "merge_seconds": merge_seconds,
               "out": {"jaxasr": str(out / "jaxasr"), "hf": str(out / "hf")}}
    _write_grid(out, summary, set_names)
    (out / "merge_config.json").write_text(config_to_json(config))
    save_native(ckpt, out / "jaxasr")
    export_hf(ckpt, out / "hf", dtype=config.hf_dtype)
    summary["table"] = format_table(rows, set_names, best_alpha, best_set) if rows else ""
    return summary


def main(argv: Sequence[str]) -> int:
    """The CLI's body (see jaxasr/merge.py): 0 on success, 2 on a config or checkpoint error."""
    import sys

    try:
        summary = run_merge(parse_args(argv))  # checks the config before reading checkpoints
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["table"]:
        print(summary["table"])
    print(f"kept alpha {summary['best_alpha']:g}: wrote {summary['out']['jaxasr']} and {summary['out']['hf']}"
          + (f"; grid in {Path(config.out) / GRID_TSV}" if summary["rows"] else ""))
    return 0
