"""The training loop: data -> sharded step -> eval -> WER into the schedule -> checkpoints.

`train(config, workdir)` is what `python -m jaxasr.train` runs. It resumes from the latest
complete checkpoint in `workdir` when there is one; the data iterator, optimizer and schedule
state come back with it, so a resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxasr.configuration import config_to_json, selection_sets, selection_wer
from jaxasr.convert.sources import load_checkpoint
from jaxasr.data import pipeline
from jaxasr.data.text import WhisperTargets
from jaxasr.models.lora import FREEZE_BASE, LoraConfig, apply_lora
from jaxasr.parallel import distributed
from jaxasr.parallel.mesh import global_batch, make_mesh, process_batch_size
from jaxasr.training import schedule
from jaxasr.training.checkpointing import Checkpoints
from jaxasr.training.encoder_cache import encoded_sources
from jaxasr.training.evaluation import Evaluator, make_eval_set
from jaxasr.training.metrics import MetricsWriter, ProgressBar, Throughput, measured_matmul_peak, mfu
from jaxasr.training.optimizer import build_optimizer, count_params, resolve_config
from jaxasr.training.step import BATCH_KEYS, TrainStep, trainable_filter

log = logging.getLogger("jaxasr.train")


def default_config() -> ml_collections.ConfigDict:
    """Every key a training config may set; config files start from this and change fields."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        init="bundled:tiny.en",  # HF dir or hub id, CTranslate2 dir, jaxasr model dir, bundled:tiny.en
        dtype="float32",  # compute dtype; parameters (master weights) stay param_dtype
        param_dtype="float32",
        scan_layers=False,
        remat_policy="none",
        attention_impl="",  # '' = automatic
        language="",  # '' = English for .en models; required for multilingual ones
        task="transcribe",
        # LoRA adapters on Dense layers whose 'a/b/c' path matches a target regex (e.g.
        # 'decoder/layers/(self_attn|encoder_attn)/(q_proj|v_proj)'); () = full fine-tuning. With
        # targets, only the adapters train (optimizer state for them alone).
        lora=dict(targets=(), rank=8, alpha=16.0, dropout=0.0),
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.distributed = distributed.default_config()
    c.data = pipeline.default_data_config()
    c.optimizer = dict(resolve_config({"peak_lr": 1e-5}))
    c.optimizer.freeze = ()
    c.optimizer.lr_multipliers = {}
    c.train = dict(
        steps=1000,
        log_every=10,
        eval_every=200,
        checkpoint_every=200,
        keep_checkpoints=2,
        async_checkpoints=True,
        label_smoothing=0.0,
        cache_encoder=False,  # frozen encoder: encode each training clip once, train the decoder on it
        zero_shot_eval=True,
        calibrate_lr=False,  # initial LR scale from the zero-shot WER of eval.best_set
        calibrate_reference_wer=20.0,
        progress_bar=True,
        peak_flops_per_device=0.0,  # MFU denominator; 0 = measure a large matmul at start
    )
    c.eval = dict(
        sets={},  # name -> dataset config as in data.train (source, path, ...)
        batch_size=16,
        best_set="",  # WER of this set picks the best checkpoint and drives the schedule ("a+b": their mean)
        max_examples=0,  # 0 = all
        max_new_tokens=128,
    )
    return c


def lora_config(config: ml_collections.ConfigDict) -> LoraConfig:
    lc = config.model.lora
    return LoraConfig(targets=tuple(lc.targets), rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, seed=config.seed)


def _runtime(model_cfg) -> dict[str, Any]:
    return dict(dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype, scan_layers=model_cfg.scan_layers,
                remat_policy=model_cfg.remat_policy, attention_impl=model_cfg.attention_impl or None)


class _Stop:
    """SIGTERM (preemption, scancel, kubectl delete) asks the loop to save and exit cleanly."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    selection = selection_sets(config.eval.best_set, list(config.eval.sets))  # a misspelled set fails first
    best_set = "+".join(selection)  # its "/wer" metric (a mean when several sets) picks and drives
    distributed.initialize(config.distributed)
    workdir = Path(workdir).absolute()
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config_to_json(config))
    stop = _Stop()

    mesh = make_mesh(dict(config.mesh))
    ckpt = load_checkpoint(config.model.init)
    model = ckpt.build(**_runtime(config.model))
    language = config.model.language or None
    targets = WhisperTargets(ckpt.tokenizer, ckpt.generation_config, language=language, task=config.model.task,
                             max_label_tokens=config.data.max_label_tokens)
    n_mels = model.cfg.num_mel_bins
    if primary:
        _save_model_info(ckpt, workdir)

    freeze = tuple(config.optimizer.freeze)
    if config.model.lora.targets:
        model = apply_lora(model, lora_config(config))
        freeze += (FREEZE_BASE,)
    _, trainable, _ = nnx.split(model, trainable_filter(freeze), ...)
    tx, policy = build_optimizer({**resolve_config(config.optimizer.to_dict()), "freeze": ()}, trainable)
    step_fn = TrainStep.create(model, tx, mesh, freeze=freeze, label_smoothing=config.train.label_smoothing)
    n_trainable = count_params(step_fn.trainable)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(step_fn.opt_state))
    log.info("trainable parameters: %d (frozen %d); optimizer state %.1f MB", n_trainable,
             count_params(step_fn.frozen), opt_bytes / 2**20)

    sets = []
    for name, ds_cfg in config.eval.sets.items():
        examples, _ = pipeline.load_eval_set(ds_cfg, process_index=jax.process_index(),
                                             process_count=jax.process_count(),
                                             max_examples=config.eval.max_examples or None)
        sets.append(make_eval_set(name, examples, n_mels))
    evaluator = Evaluator(sets, ckpt.tokenizer, ckpt.generation_config, batch_size=config.eval.batch_size,
                          language=language, max_new_tokens=config.eval.max_new_tokens)

    log.info("eval sets: %s", ", ".join(f"{s.name} ({len(s.texts)} clips)" for s in sets) or "none")
    overrides = None
    if config.train.cache_encoder:
        t0 = time.perf_counter()
        overrides = encoded_sources(step_fn.model(), config.data, n_mels=n_mels, freeze=freeze,
                                    process_index=jax.process_index(), process_count=jax.process_count())
        evaluator.encode_sets(step_fn.model())
        log.info("frozen encoder: encoded %d training and %d eval clips in %.0f s",
                 sum(len(o) for o in overrides.values()), sum(len(s.texts) for s in sets), time.perf_counter() - t0)
    data = pipeline.build_train_iter(config.data, targets, n_mels=n_mels, process_index=jax.process_index(),
                                     process_count=jax.process_count(), sources=overrides)
    process_batch_size(config.data.batch_size, mesh)  # validates divisibility early, with a clear message
    data_iter = iter(data)

    checkpoints = Checkpoints(workdir / "checkpoints", keep_last=config.train.keep_checkpoints,
                              best_metric=f"{best_set}/wer" if best_set else None,
                              async_save=config.train.async_checkpoints)
    writer = MetricsWriter(workdir, enabled=primary)
    skipped_total: Counter = Counter()
    history: dict[str, Any] = {}
    start = 0
    latest = checkpoints.latest_step()
    if latest is not None:
        restored = checkpoints.restore(latest, model=step_fn.model_dict(), opt_state=step_fn.opt_state,
                                       data_iter=data_iter)
        step_fn.load_model_dict(restored["model"])
        step_fn.opt_state = restored["opt_state"]
        meta = restored["meta"]
        skipped_total.update(meta.get("skipped", {}))
        history = meta.get("history", {})
        start = latest
        log.info("resumed from step %d", start)

    def evaluate(at_step: int) -> dict[str, float]:
        results, samples = evaluator.run(step_fn.model())
        flat = {f"{name}/{k}": float(v) for name, r in results.items() for k, v in r.items()}
        if len(selection) > 1:
            flat[f"{best_set}/wer"] = selection_wer({n: r["wer"] for n, r in results.items()}, selection)
        writer.write(at_step, {f"eval/{k}": v for k, v in flat.items()})
        for name, rows in samples.items():
            writer.write_text(at_step, f"eval/{name}", "\n".join(f"{i}\tREF: {r}\tHYP: {h}" for i, r, h in rows[:8]))
        log.info("step %d eval: %s", at_step, ", ".join(f"{n} WER {r['wer']:.2f}" for n, r in results.items()))
        history.setdefault("eval", []).append({"step": at_step, **flat})
        return flat

    if start == 0 and sets and config.train.zero_shot_eval:
        zero = evaluate(0)
        history["zero_shot"] = zero
        if config.train.calibrate_lr and best_set:
            step_fn.opt_state = schedule.calibrate(step_fn.opt_state, zero[f"{best_set}/wer"],
                                                   reference_wer=config.train.calibrate_reference_wer)

    saved = [latest]

    def save(at_step: int, metrics: dict[str, float] | None, force: bool = False) -> None:
        saved[0] = at_step
        meta = {"step": at_step, "skipped": dict(skipped_total), "history": history,
                "config": config_to_json(config)}
        checkpoints.save(at_step, model=step_fn.model_dict(), opt_state=step_fn.opt_state, data_iter=data_iter,
                         meta=meta, metrics=metrics, force=force)

    peak = config.train.peak_flops_per_device or measured_matmul_peak()
    bar = ProgressBar(config.train.steps, start, disable=not (primary and config.train.progress_bar))
    throughput = Throughput()
    last_eval: dict[str, float] | None = None
    step = start
    reason = "finished"
    while step < config.train.steps:
        batch = next(data_iter)
        skipped_total.update(batch.pop("skipped"))
        tokens = int(batch["loss_mask"].sum())
        local = distributed.pad_to_common_shapes({k: v for k, v in batch.items() if k in BATCH_KEYS})
        device_batch = global_batch(local, mesh)
        metrics = step_fn(device_batch, step)
        step += 1
        throughput.add(len(batch["labels"]) * jax.process_count(), tokens * jax.process_count())
        if step % config.train.log_every == 0 or step == config.train.steps:
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(scalars["loss"]):
                raise FloatingPointError(f"step {step}: loss is {scalars['loss']}; stopping before it reaches a "
                                         f"checkpoint (last good checkpoint: {checkpoints.latest_step()})")
            state = schedule.read(step_fn.opt_state)
            scalars.update(lr=state["lr"], lr_scale=state["scale"], **throughput.rates())
            flops = step_fn.flops(device_batch)
            if flops and scalars.get("step_seconds"):
                scalars["mfu"] = mfu(flops, scalars["step_seconds"], peak, jax.device_count())
            scalars.update({f"skipped/{k}": v for k, v in skipped_total.items()})
            writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
            bar.update(step, scalars["loss"], scalars["lr"], scalars.get("examples_per_s"))
        evaluated = False
        if sets and step % config.train.eval_every == 0:
            last_eval = evaluate(step)
            evaluated = True
            if best_set:
                step_fn.opt_state = schedule.observe(step_fn.opt_state, last_eval[f"{best_set}/wer"], policy)
        if evaluated or step % config.train.checkpoint_every == 0:
            save(step, last_eval if evaluated else None)
        if sets and best_set and schedule.read(step_fn.opt_state)["stop"]:
            reason = "early stop"
            break
        if distributed.any_process(stop.requested):  # one host's SIGTERM stops all at the same step
            reason = "SIGTERM"
            break
    bar.close()
    if saved[0] != step:
        save(step, None, force=True)
    checkpoints.wait()
    summary = {"steps": step, "stopped": reason, "trainable_params": n_trainable, "optimizer_bytes": opt_bytes,
               "skipped": dict(skipped_total), "best_step": checkpoints.best_step(), **history}
    if sets and reason != "SIGTERM" and (not last_eval or history.get("eval", [{}])[-1].get("step") != step):
        summary["final"] = evaluate(step)  # not after SIGTERM: a preemption notice leaves seconds
    elif last_eval:
        summary["final"] = last_eval
    if primary:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    checkpoints.close()
    writer.close()
    log.info("%s at step %d", reason, step)
    return summary


def _save_model_info(ckpt, workdir: Path) -> None:
    """The base model's configs and tokenizer, so that export needs only the workdir."""
    info = workdir / "model_info"
    info.mkdir(exist_ok=True)
    ckpt.tokenizer.save_pretrained(info)
    (info / "model_info.json").write_text(json.dumps({
        "hf_config": ckpt.hf_config, "generation_config": ckpt.generation_config,
        "preprocessor_config": ckpt.preprocessor_config, "source": ckpt.source}, indent=2))
