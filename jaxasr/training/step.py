"""The jitted train step: forward, label-smoothed cross-entropy, gradients, Optax update.

The model is split once into (graphdef, trainable, frozen, rest): gradients are taken only with
respect to `trainable`, so frozen parameters (an encoder, a base model under LoRA) cost no
backward pass and no optimizer state. Shardings are explicit on both sides of the jit.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxasr.kernels import cpu as cpu_kernels
from jaxasr.models.lora import fold_dropout_keys
from jaxasr.parallel.mesh import LOGICAL_RULES, batch_sharding, opt_state_shardings, replicated, state_shardings
from jaxasr.training.metrics import step_flops
from jaxasr.training.optimizer import path_str

# Batch keys the step reads; the host pipeline may send more (they are dropped before the device).
BATCH_KEYS = ("features", "encoded", "decoder_input_ids", "labels", "loss_mask", "is_text")


def trainable_filter(freeze: Sequence[str]) -> Callable:
    """nnx filter: a Param whose 'a/b/c' path matches none of the `freeze` regexes."""
    patterns = [re.compile(p) for p in freeze]

    def keep(path, var) -> bool:
        return isinstance(var, nnx.Param) and not any(p.search(path_str(path)) for p in patterns)

    return keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float):
    """Per token: (label-smoothed loss, NLL, 1.0 where the label's logit is the largest), float32,
    without materializing log-probabilities.

    Autodiff through log_softmax writes several [batch, len, vocab] arrays (log-probabilities, a
    broadcast for the gathered label, their sum) and reads them back; the backward here is one
    fused pass, softmax - target, which matters with 50k-150k vocabularies. On the native CPU
    kernels both passes are a row at a time in cache (XLA's sum of exponentials over whisper's
    51865-word vocabulary ran at ~0.5 G elements/s). Top-1 accuracy counts a tie as correct: a
    comparison with the row's max, which the log-sum-exp needs anyway, not an argmax pass."""
    return _cross_entropy_fwd(logits, labels, label_smoothing)[0]


def _native_loss(logits: jax.Array) -> bool:
    return logits.dtype == jnp.float32 and logits.shape[-1] >= 1024 and cpu_kernels.applies(logits)


def _cross_entropy_fwd(logits, labels, label_smoothing):
    if _native_loss(logits):
        stats = cpu_kernels.cross_entropy_stats(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        lse, label_logit, correct, mean = (t.reshape(labels.shape) for t in stats)
    else:
        x = logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(x, axis=-1)
        label_logit = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
        correct = (label_logit >= x.max(-1)).astype(jnp.float32)
        mean = x.mean(-1) if label_smoothing else None
    nll = lse - label_logit
    loss = nll if not label_smoothing else (1 - label_smoothing) * nll + label_smoothing * (lse - mean)
    return (loss, nll, correct), (logits, labels, lse)


def _cross_entropy_bwd(label_smoothing, residuals, cotangents):
    logits, labels, lse = residuals
    g_loss, g_nll, _ = cotangents  # accuracy carries no gradient
    g_target = (1 - label_smoothing) * g_loss + g_nll  # weight of -log p(label)
    g_smooth = label_smoothing * g_loss  # weight of the mean over the vocabulary of -log p
    if _native_loss(logits):
        grad = cpu_kernels.cross_entropy_grad(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              lse.reshape(-1), g_target.reshape(-1), g_smooth.reshape(-1))
        return grad.reshape(logits.shape), None
    x = logits.astype(jnp.float32)
    probs = jnp.exp(x - lse[..., None])
    target = (jnp.arange(x.shape[-1]) == labels[..., None]).astype(jnp.float32)
    grad = g_target[..., None] * (probs - target)
    if label_smoothing:
        grad = grad + g_smooth[..., None] * (probs - 1.0 / x.shape[-1])
    return grad.astype(logits.dtype), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, label_smoothing: float = 0.0):
    """(mean loss over masked tokens, metrics). Label smoothing as Hugging Face's LabelSmoother:
    (1 - eps) * NLL + eps * mean over the vocabulary of -log p."""
    per_token, nll, correct = _cross_entropy(logits, labels, float(label_smoothing))
    tokens = mask.sum()
    denom = jnp.maximum(tokens, 1.0)
    loss = (per_token * mask).sum() / denom
    return loss, {"loss": loss, "nll": (nll * mask).sum() / denom, "accuracy": (correct * mask).sum() / denom,
                  "tokens": tokens}


def model_loss(model, batch: dict[str, jax.Array], label_smoothing: float):
    """Whisper's loss on a batch. Rows flagged text-only carry no audio; Whisper skips them (a
    speech LLM places their tokens where audio embeddings go)."""
    if "encoded" in batch:  # precomputed encoder outputs (frozen-encoder recipes)
        logits, _ = model.decode(batch["decoder_input_ids"], batch["encoded"])
    else:
        logits = model(batch["features"], batch["decoder_input_ids"])
    mask = batch["loss_mask"] * (~batch["is_text"])[:, None].astype(jnp.float32)
    return token_loss(logits, batch["labels"], mask, label_smoothing)


@dataclasses.dataclass
class TrainStep:
    """Holds the split model, the optimizer and their shardings; `__call__` runs one step."""

    graphdef: Any
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    tx: optax.GradientTransformation
    mesh: Mesh
    label_smoothing: float = 0.0

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
               freeze: Sequence[str] = (), label_smoothing: float = 0.0, rules=LOGICAL_RULES) -> TrainStep:
        """Place the model on the mesh by its logical axes and initialize the optimizer there."""
        graphdef, trainable, frozen = nnx.split(model, trainable_filter(freeze), ...)
        t_sh, f_sh, opt_shapes, o_sh = _placements(trainable, frozen, tx, mesh, rules)
        trainable = jax.device_put(trainable, t_sh)
        frozen = jax.device_put(frozen, f_sh)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
        step = cls(graphdef, trainable, frozen, opt_state, tx, mesh, label_smoothing)
        step._rules = rules
        step._compile()
        return step

    @classmethod
    def abstract(cls, model: nnx.Module | Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                 *, freeze: Sequence[str] = (), label_smoothing: float = 0.0, rules=LOGICAL_RULES) -> TrainStep:
        """`create` without allocating anything: parameters and optimizer state are
        `jax.ShapeDtypeStruct`s carrying the shardings `create` would give them, so the very same
        jitted step can be lowered and compiled (`lower(batch_shapes).compile()`) for memory and
        FLOP analysis of models that do not fit this host. `model` is a module (abstract, e.g.
        from `nnx.eval_shape`, or concrete: only shapes are read) or a constructor, which is run
        under `nnx.eval_shape`. The result cannot be called."""
        if not isinstance(model, nnx.Module):
            model = nnx.eval_shape(model)
        graphdef, trainable, frozen = nnx.split(model, trainable_filter(freeze), ...)
        t_sh, f_sh, opt_shapes, o_sh = _placements(trainable, frozen, tx, mesh, rules)
        step = cls(graphdef, _with_shardings(trainable, t_sh), _with_shardings(frozen, f_sh),
                   _with_shardings(opt_shapes, o_sh), tx, mesh, label_smoothing)
        step._rules = rules
        step._compile()
        return step

    def _compile(self) -> None:
        shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
        self.shardings = (shard(self.trainable), shard(self.frozen), shard(self.opt_state))
        graphdef, tx, ls = self.graphdef, self.tx, self.label_smoothing

        def step(trainable, frozen, opt_state, batch, index):
            def loss_fn(trainable):
                model = nnx.merge(graphdef, trainable, frozen, copy=True)  # frozen arrays come from the outer trace
                model.train()  # dropout on (LoRA's), in this copy only: evaluation stays deterministic
                fold_dropout_keys(model, index)
                return model_loss(model, batch, ls)

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            metrics["grad_norm"] = optax.tree.norm(grads)
            return trainable, opt_state, metrics

        t, f, o = self.shardings
        self._flops: dict[tuple, float | None] = {}
        self._step = jax.jit(step, in_shardings=(t, f, o, None, None), out_shardings=(t, o, replicated(self.mesh)),
                             donate_argnums=(0, 2))

    def batch_shardings(self, batch: dict[str, Any]) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}

    def __call__(self, batch: dict[str, jax.Array], index: int = 0) -> dict[str, jax.Array]:
        """One step on `batch`; `index` (the step number) draws the LoRA dropout masks, if any."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self._rules):
            self.trainable, self.opt_state, metrics = self._step(self.trainable, self.frozen, self.opt_state, batch,
                                                                 jnp.uint32(index))
        return metrics

    def flops(self, batch: dict[str, jax.Array]) -> float | None:
        """XLA's FLOP estimate of one step on batches shaped like `batch` (whole program, all
        devices: taken before partitioning), cached per shape. None where XLA does not say."""
        key = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if key not in self._flops:
            self._flops[key] = step_flops(self.lower(batch))
        return self._flops[key]

    def lower(self, batch_shapes: dict[str, jax.ShapeDtypeStruct]):
        """Ahead-of-time lowering for memory and FLOP analysis (no data needed)."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self._rules):
            return self._step.lower(self.trainable, self.frozen, self.opt_state, batch_shapes,
                                    jax.ShapeDtypeStruct((), jnp.uint32))

    def model_dict(self) -> dict:
        """All variables (trainable and frozen) as one nested dict of arrays: the checkpoint's model item."""
        return nnx.to_pure_dict(nnx.merge_state(self.trainable, self.frozen))

    def load_model_dict(self, pure: dict) -> None:
        """Inverse of `model_dict` (arrays keep the shardings they were restored with)."""
        for state in (self.trainable, self.frozen):
            nnx.replace_by_pure_dict(state, _subset(pure, nnx.to_pure_dict(state)))

    def model(self) -> nnx.Module:
        """The current model (a view over the trained state, for evaluation and export)."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def _placements(trainable: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation, mesh: Mesh, rules):
    """(trainable shardings, frozen shardings, optimizer state shapes, optimizer state shardings):
    parameters by their logical axes, optimizer moments like their parameters."""
    t_sh = state_shardings(trainable, mesh, rules)
    f_sh = state_shardings(frozen, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, trainable)
    return t_sh, f_sh, opt_shapes, opt_state_shardings(tx, opt_shapes, t_sh, mesh, trainable)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    """`tree` (arrays or shapes) as `jax.ShapeDtypeStruct`s placed by `shardings` (same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _subset(pure: dict, like: dict) -> dict:
    """The entries of `pure` at the paths present in `like`."""
    return {k: _subset(pure[k], v) if isinstance(v, dict) else pure[k] for k, v in like.items()}
