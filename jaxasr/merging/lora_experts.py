"""LoRA experts (arXiv 2506.21555): one LoRA per language or domain, then one model from all of them.

    summaries = train_experts(config, "runs/experts")        # workdir/<name> per expert, same LoRA
    experts = load_experts("runs/experts")                    # {name: model with its adapters}
    a, b = experts["pharmacy"], experts["general"]

    model = weighted_sum([a, b], domain_weights(0, 2))        # (a) known domain id: that expert
    w = learn_weights([a, b], dev_batches).weights            #     or weights learned on dev data
    model = weighted_sum([a, b], w)
    model = merge_experts("tsv_m", [a, b])                    # (b) any `jaxasr.merging` method
    step = make_distill_step(init_student(a), [a, b], optax.adam(1e-3))   # (c) one student LoRA
    for batch in batches: step(batch)                         #     teacher = expert of batch["component"]
    student = step.model()                                    #     needs no domain id at inference

Every combination works on the adapters' dense deltas, one per adapted `Dense`:
delta = scale * A @ B in the kernel's own layout (`LoraDense.delta()`), so a combined model is the
shared base with `kernel + sum_i w_i delta_i` (a plain model, no adapters). All experts must share
the base weights and the adapted layers (one config: the same `model.init` and `model.lora`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxasr.merging.methods import METHODS, merge_deltas
from jaxasr.models.lora import (LoraDense, _dense_modules, _plain_dense, _set_module, apply_lora,
                                layer_matrix_shape, lora_config_of, lora_modules)
from jaxasr.training.step import token_loss

log = logging.getLogger("jaxasr.experts")

Deltas = dict[str, Any]  # {'a/b/c' module path of an adapted Dense: delta in its kernel's layout}

# Config sections that name datasets: an expert's override replaces them whole instead of being
# merged key by key (otherwise the shared config's components would stay in every expert's mix).
REPLACED_SECTIONS = ("data.train", "eval.sets")


# --------------------------------------------------------------------------- training the experts
def expert_names(config: ml_collections.ConfigDict) -> list[str]:
    """The experts in index order (ConfigDict sorts its keys): expert i is weight i, teacher i."""
    if "experts" not in config or not config.experts:
        raise ValueError("config.experts is empty: give {name: {overrides}} for each expert")
    return list(config.experts.keys())


def _apply_override(target: dict, override: Mapping, prefix: str = "") -> None:
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in target:
            raise ValueError(f"expert override {path!r}: no such config field")
        if isinstance(value, Mapping) and isinstance(target[key], dict) and path not in REPLACED_SECTIONS:
            _apply_override(target[key], value, f"{path}.")
        else:
            target[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)


def expert_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The training config of expert `name`: the shared config without `experts`, with that
    expert's overrides (nested dicts; `data.train` and `eval.sets` are replaced whole). Overrides
    of `model.*` are refused: every expert has the same base and the same LoRA targets and rank,
    which is what combining their deltas needs."""
    names = expert_names(config)
    if name not in names:
        raise ValueError(f"unknown expert {name!r}; config.experts has {names}")
    if not config.model.lora.targets:
        raise ValueError("LoRA experts need model.lora.targets (the adapted layers)")
    full = config.to_dict()
    override = full.pop("experts")[name] or {}
    if "model" in override:
        raise ValueError(f"expert {name!r} overrides model.*: all experts must share the base model and LoRA")
    _apply_override(full, override)
    return ml_collections.ConfigDict(full)


def train_experts(config: ml_collections.ConfigDict, workdir: str | Path,
                  only: Sequence[str] | None = None) -> dict[str, dict]:
    """Train one LoRA run per expert into `workdir/<name>`, one after the other (each resumes
    from its own checkpoints like any run). Returns {name: the trainer's summary}."""
    from jaxasr.training.trainer import train  # heavy import, and keeps this module light for tests

    workdir = Path(workdir)
    names = expert_names(config)
    chosen = list(only) if only else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ValueError(f"unknown experts {unknown}; config.experts has {names}")
    configs = {name: expert_config(config, name) for name in chosen}  # all errors before any training
    summaries = {}
    for name in chosen:
        log.info("training expert %r into %s", name, workdir / name)
        summaries[name] = train(configs[name], workdir / name)
    return summaries


def distill_data_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, np.ndarray, list[str]]:
    """(data config mixing every expert's `data.train` components, teacher_index, expert names):
    train the student on this mixture with `make_distill_step(..., teacher_index=teacher_index)`,
    so each row's teacher is the expert whose data it came from (batch['component'] ids follow
    `pipeline.component_names`, i.e. sorted component names)."""
    names = expert_names(config)
    train, owner = {}, {}
    for name in names:
        for component, ds in expert_config(config, name).data.train.to_dict().items():
            if component in owner:
                raise ValueError(f"data component {component!r} is in experts {owner[component]!r} and {name!r}")
            train[component], owner[component] = ds, name
    data = ml_collections.ConfigDict({**config.data.to_dict(), "train": train})
    order = sorted(train)  # == pipeline.component_names(data)
    return data, np.asarray([names.index(owner[c]) for c in order], np.int32), names


def load_experts(workdir: str | Path, names: Sequence[str] | None = None, *, best: bool = False) -> dict[str, nnx.Module]:
    """{name: model with its adapters} from `train_experts`' runs (latest or best checkpoint)."""
    from jaxasr.export import restore_run

    workdir = Path(workdir)
    if names is None:
        names = sorted(p.name for p in workdir.iterdir() if (p / "checkpoints").is_dir())
    return {name: restore_run(workdir / name, best=best)[0] for name in names}


# --------------------------------------------------------------------------- deltas and the base
def module_at(model: nnx.Module, path: str) -> nnx.Module:
    m = model
    for part in path.split("/"):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def adapter_deltas(model: nnx.Module) -> Deltas:
    """{module path: scale * A @ B} of every adapted layer (float32)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    return {p: m.delta().astype(jnp.float32) for p, m in mods.items()}


def strip_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with plain `Dense` layers in place of its adapters (the base weights,
    adapters dropped, not folded in)."""
    out = nnx.clone(model)
    for path, m in _dense_modules(out, LoraDense):
        _set_module(out, path, _plain_dense(m))
    return out


def _base_and_deltas(experts: Sequence[Any], base: nnx.Module | None) -> tuple[nnx.Module, list[Deltas]]:
    """Experts given as LoRA models or as delta dicts (then `base` is required)."""
    if not experts:
        raise ValueError("no experts given")
    deltas = [e if isinstance(e, Mapping) else adapter_deltas(e) for e in experts]
    if base is None:
        first = next((e for e in experts if isinstance(e, nnx.Module)), None)
        if first is None:
            raise ValueError("experts given as deltas: pass the base model")
        base = strip_lora(first)
    elif lora_modules(base):
        base = strip_lora(base)
    keys = set(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if set(d) != keys:
            raise ValueError(f"expert {i} adapts {sorted(set(d) ^ keys)[:3]} differently from expert 0: "
                             "experts must share the LoRA targets")
    for p, d in deltas[0].items():
        kernel = module_at(base, p).kernel
        for i, e in enumerate(deltas):
            if tuple(e[p].shape) != tuple(kernel.shape):
                raise ValueError(f"{p}: delta of expert {i} is {tuple(e[p].shape)}, kernel is {tuple(kernel.shape)}")
    return base, deltas


def apply_deltas(base: nnx.Module, delta: Deltas, alpha: float = 1.0) -> nnx.Module:
    """A copy of the plain `base` with `kernel + alpha * delta` at each path."""
    out = nnx.clone(base)
    for p, d in delta.items():
        k = module_at(out, p).kernel
        k[...] = (k[...].astype(jnp.float32) + alpha * jnp.asarray(d, jnp.float32)).astype(k.dtype)
    return out


def domain_weights(domain_id: int, num_experts: int) -> np.ndarray:
    """One-hot weights: the expert of a known language/domain id."""
    if not 0 <= domain_id < num_experts:
        raise ValueError(f"domain id {domain_id} out of range for {num_experts} experts")
    return np.eye(num_experts, dtype=np.float32)[domain_id]


# --------------------------------------------------------------------------- (a) weighted sum
def weighted_delta(deltas: Sequence[Deltas], weights) -> Deltas:
    w = np.asarray(weights, np.float32)
    if w.shape != (len(deltas),):
        raise ValueError(f"{len(deltas)} experts but weights of shape {w.shape}")
    return {p: sum(float(wi) * jnp.asarray(d[p], jnp.float32) for wi, d in zip(w, deltas)) for p in deltas[0]}


def weighted_sum(experts: Sequence[Any], weights, *, base: nnx.Module | None = None) -> nnx.Module:
    """base + sum_i w_i delta_i as a plain model. `experts`: LoRA models (sharing one base) or
    delta dicts with `base`; `weights`: e.g. `domain_weights(id, n)` or `learn_weights(...).weights`."""
    base, deltas = _base_and_deltas(experts, base)
    return apply_deltas(base, weighted_delta(deltas, weights))


def _logits(model, batch):
    if "encoded" in batch:
        logits, _ = model.decode(batch["decoder_input_ids"], batch["encoded"])
        return logits
    return model(batch["features"], batch["decoder_input_ids"])


def _mask(batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    if "is_text" in batch:
        mask = mask * (~batch["is_text"])[:, None].astype(jnp.float32)
    return mask


@dataclasses.dataclass
class LearnedWeights:
    weights: np.ndarray  # on the simplex, one per expert
    losses: list[float]  # dev loss at each step (before its update)


def learn_weights(experts: Sequence[Any], batches: Sequence[Mapping[str, Any]], *, base: nnx.Module | None = None,
                  steps: int = 30, learning_rate: float = 0.1, init=None) -> LearnedWeights:
    """Weights on the simplex (w = softmax(theta)) minimising the dev loss of base + sum_i w_i delta_i.

    Adam on theta, one dev batch per step (cycling through `batches`: dicts with features or
    encoded, decoder_input_ids, labels, loss_mask[, is_text]); the base and the deltas are fixed,
    and the step is jitted (the merged kernels are rebuilt from theta inside it)."""
    base, deltas = _base_and_deltas(experts, base)
    t = len(deltas)
    graphdef, state = nnx.split(base)
    stacked = {p: jnp.stack([jnp.asarray(d[p], jnp.float32) for d in deltas]) for p in deltas[0]}
    theta = jnp.log(jnp.asarray(init, jnp.float32)) if init is not None else jnp.zeros((t,), jnp.float32)
    tx = optax.adam(learning_rate)
    opt_state = tx.init(theta)

    def loss_fn(theta, state, stacked, batch):
        w = jax.nn.softmax(theta)
        model = nnx.merge(graphdef, state, copy=True)
        for p, d in stacked.items():
            k = module_at(model, p).kernel
            k[...] = (k[...].astype(jnp.float32) + jnp.tensordot(w, d, axes=1)).astype(k.dtype)
        return token_loss(_logits(model, batch), batch["labels"], _mask(batch))[0]

    @jax.jit
    def step(theta, opt_state, state, stacked, batch):
        loss, grad = jax.value_and_grad(loss_fn)(theta, state, stacked, batch)
        updates, opt_state = tx.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss

    dev = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    if not dev:
        raise ValueError("no dev batches")
    losses = []
    for i in range(steps):
        theta, opt_state, loss = step(theta, opt_state, state, stacked, dev[i % len(dev)])
        losses.append(float(loss))
    weights = np.asarray(jax.nn.softmax(theta))
    log.info("learned expert weights %s (dev loss %.4f -> %.4f)", np.round(weights, 3), losses[0], losses[-1])
    return LearnedWeights(weights, losses)


# --------------------------------------------------------------------------- (b) merging methods
def merge_experts(method: str, experts: Sequence[Any], *, base: nnx.Module | None = None, alpha: float = 1.0,
                  **params) -> nnx.Module:
    """base + alpha * merge_deltas(method, deltas, ...) as a plain model: any `jaxasr.merging`
    method over the experts' adapter deltas (`params` as `merge_deltas` takes them, e.g.
    density=0.2, or key=... for DARE)."""
    base, deltas = _base_and_deltas(experts, base)
    # per layer and 2-D: our kernels stack layers and split heads, while the SVD methods (and
    # their references) decompose each layer's [in, out] matrix
    shapes = {p: layer_matrix_shape(module_at(base, p)) for p in deltas[0]}

    def per_layer(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {f"{p}#{i}": m for p in shapes for i, m in enumerate(np.asarray(tree[p], np.float32).reshape(shapes[p]))}

    kernels = None
    if METHODS[method].uses_base:
        kernels = per_layer({p: module_at(base, p).kernel[...] for p in shapes})
    merged = merge_deltas(method, [per_layer(d) for d in deltas], base=kernels, **params)
    delta = {p: np.stack([merged[f"{p}#{i}"] for i in range(shapes[p][0])]).reshape(deltas[0][p].shape)
             for p in shapes}
    return apply_deltas(base, delta, alpha)


# --------------------------------------------------------------------------- (c) distillation
def distill_loss(student_logits, teacher_logits, labels, mask, temperature: float = 1.0, kl_weight: float = 1.0,
                 label_smoothing: float = 0.0):
    """(kl_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + CE(student, labels), metrics).

    KL is summed over the vocabulary and averaged over the masked tokens, CE as `token_loss`
    (masked mean, optional label smoothing). The teacher gets no gradient."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    t = jnp.float32(temperature)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    per_token = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    mask = mask.astype(jnp.float32)
    kl = (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    ce, metrics = token_loss(student_logits, labels, mask, label_smoothing)
    loss = kl_weight * t * t * kl + ce
    return loss, {**metrics, "loss": loss, "ce": ce, "kl": kl}


def init_student(expert: nnx.Module, *, seed: int = 0, base: nnx.Module | None = None) -> nnx.Module:
    """A fresh LoRA (random A, zero B: the base's outputs) with the experts' targets, rank and alpha."""
    cfg = dataclasses.replace(lora_config_of(expert), seed=seed, dropout=0.0)
    return apply_lora(strip_lora(base if base is not None else expert), cfg)


@dataclasses.dataclass
class DistillStep:
    """A student LoRA trained on the frozen experts' token posteriors (`make_distill_step`)."""

    graphdef: Any
    student: nnx.State  # the student's adapters (trained)
    rest: nnx.State  # the shared base (frozen)
    teachers: list  # the experts' adapters (frozen)
    teacher_index: jax.Array  # component id -> expert index
    opt_state: Any
    tx: optax.GradientTransformation
    temperature: float
    kl_weight: float
    label_smoothing: float

    def __post_init__(self):
        graphdef, temperature, kl_weight, ls, tx = (self.graphdef, self.temperature, self.kl_weight,
                                                    self.label_smoothing, self.tx)

        def teacher_logits(rest, teachers, teacher_index, batch):
            every = jnp.stack([_logits(nnx.merge(graphdef, lora, rest, copy=True), batch) for lora in teachers])
            which = teacher_index[batch["component"]]  # [batch]
            return jnp.take_along_axis(every, which[None, :, None, None], axis=0)[0]

        def loss_fn(student, rest, teacher, batch):
            logits = _logits(nnx.merge(graphdef, student, rest, copy=True), batch)
            return distill_loss(logits, teacher, batch["labels"], _mask(batch), temperature, kl_weight, ls)

        def step(student, opt_state, rest, teachers, teacher_index, batch):
            teacher = jax.lax.stop_gradient(teacher_logits(rest, teachers, teacher_index, batch))
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(student, rest, teacher, batch)
            updates, opt_state = tx.update(grads, opt_state, student)
            metrics["grad_norm"] = optax.tree.norm(grads)
            return optax.apply_updates(student, updates), opt_state, metrics

        def evaluate(student, rest, teachers, teacher_index, batch):
            teacher = teacher_logits(rest, teachers, teacher_index, batch)
            return loss_fn(student, rest, teacher, batch)[1]

        self._step = jax.jit(step, donate_argnums=(1,))
        self._eval = jax.jit(evaluate)

    @staticmethod
    def _batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        keep = ("features", "encoded", "decoder_input_ids", "labels", "loss_mask", "is_text", "component")
        if "component" not in batch:
            raise ValueError("distillation batches need 'component' (the domain id of each row) to pick its teacher")
        return {k: jnp.asarray(v) for k, v in batch.items() if k in keep}

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        self.student, self.opt_state, metrics = self._step(self.student, self.opt_state, self.rest, self.teachers,
                                                           self.teacher_index, self._batch(batch))
        return metrics

    def evaluate(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """The distillation metrics (loss, kl, ce, ...) of the current student on `batch`, no update."""
        return self._eval(self.student, self.rest, self.teachers, self.teacher_index, self._batch(batch))

    def model(self) -> nnx.Module:
        """The student (base + its adapters): run it without any domain id; `merge_lora` folds it."""
        return nnx.merge(self.graphdef, self.student, self.rest, copy=True)


def make_distill_step(student: nnx.Module, experts: Sequence[nnx.Module], tx: optax.GradientTransformation, *,
                      temperature: float = 1.0, kl_weight: float = 1.0, label_smoothing: float = 0.0,
                      teacher_index: Sequence[int] | None = None) -> DistillStep:
    """A jitted distillation step: the student LoRA (e.g. `init_student(experts[0])`) learns
    kl_weight * T^2 * KL(teacher || student) + CE on each batch, where the teacher of a row is the
    expert `teacher_index[batch['component'][row]]` (default: component id = expert index). The
    base weights are the student's, frozen; the experts must have the student's adapted layers
    (their adapters alone are used, on the student's base)."""
    if not experts:
        raise ValueError("no experts given")
    graphdef, lora, rest = nnx.split(student, nnx.LoRAParam, ...)
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(lora))
    teachers = []
    for i, e in enumerate(experts):
        t = nnx.state(e, nnx.LoRAParam)
        if jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(t)) != shapes:
            raise ValueError(f"expert {i} has other adapted layers or ranks than the student")
        teachers.append(t)
    index = jnp.asarray(np.arange(len(experts)) if teacher_index is None else np.asarray(teacher_index), jnp.int32)
    if int(index.max()) >= len(experts) or int(index.min()) < 0:
        raise ValueError(f"teacher_index {list(np.asarray(index))} out of range for {len(experts)} experts")
    return DistillStep(graphdef, lora, rest, teachers, index, tx.init(lora), tx, float(temperature),
                       float(kl_weight), float(label_smoothing))


__all__ = [
    "DistillStep", "LearnedWeights", "REPLACED_SECTIONS", "adapter_deltas", "apply_deltas", "distill_data_config",
    "distill_loss",
    "domain_weights", "expert_config", "expert_names", "init_student", "learn_weights", "load_experts",
    "make_distill_step", "merge_experts", "strip_lora", "train_experts", "weighted_delta", "weighted_sum",
]
