"""Orbax checkpoints of a training run: keep the last N and the best by one eval set's WER.

One step directory holds four items:
    model/      every variable of the model (trainable and frozen), nested by module path
    opt_state/  the Optax state (moments, schedule state: scale, best WER, patience)
    data/       the Grain iterator state, one JSON file per JAX process
    meta/       step, eval metrics, totals of skipped examples, the config as JSON

Saves are asynchronous; Orbax writes into a temporary directory and renames it when complete, so
a run killed mid-save leaves no directory that `latest_step` would pick up (and the temporary one
is cleaned up at the next start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

ITEMS = ("model", "opt_state", "data", "meta")


def _abstract(tree: Any) -> Any:
    """Shape, dtype and sharding of each array: the restore target (arrays land where they belong)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    def __init__(self, directory: str | Path, *, keep_last: int = 2, best_metric: str | None = None,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep_last)]
        if best_metric:
            # BestN keeps the top of an ascending sort; reverse=True puts the lowest WER there.
            policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
            # Orbax writes a step's metrics only when it tracks a best metric.
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode="min",
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest `best_metric` among the kept checkpoints that have metrics."""
        return self.manager.best_step() if self.best_metric else None

    def save(self, step: int, *, model: dict, opt_state: Any, data_iter: Any, meta: dict,
             metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, *, model: dict, opt_state: Any, data_iter: Any) -> dict[str, Any]:
        """Restore into the shapes/shardings of `model` and `opt_state` and into `data_iter`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(model)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            data=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ))
        return {k: restored[k] for k in ITEMS}

    def restore_model(self, step: int) -> tuple[dict, dict]:
        """(model variables as NumPy-backed arrays, meta) without the optimizer: for export."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return restored["model"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
