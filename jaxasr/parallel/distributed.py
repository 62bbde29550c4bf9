"""Multi-controller setup: one JAX process per host, joined through `jax.distributed`.

`initialize(cfg)` is a no-op for a single process. With `auto=True` JAX finds the coordinator
itself (Cloud TPU pods, SLURM, Open MPI, Kubernetes JobSet); otherwise the coordinator address,
process count and id come from the config or from JAXASR_COORDINATOR / JAXASR_NUM_PROCESSES /
JAXASR_PROCESS_ID in the environment (what `launch/local.sh` sets).
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        auto=False,  # let JAX detect the cluster (TPU pod, SLURM, MPI, JobSet)
        coordinator_address="",  # host:port of process 0
        num_processes=0,  # 0: from the environment, or single process
        process_id=-1,
        initialization_timeout=300,  # seconds to wait for all processes to join
        heartbeat_timeout=60,  # seconds without a heartbeat before the others give up
    ))


def _setting(cfg, key: str, env: str, default):
    value = cfg.get(key, default) if cfg is not None else default
    if value in (None, "", 0, -1) and env in os.environ:
        return type(default)(os.environ[env])
    return value


def initialize(cfg: ml_collections.ConfigDict | None) -> None:
    """Join the job's other processes (once per process, before any other JAX call).

    With `auto`, settings given in the config or the environment win and JAX detects the rest
    (a JobSet manifest can name the coordinator through its headless service while a TPU pod
    or SLURM job needs nothing). If a process dies, the others stop with an error after
    `heartbeat_timeout` seconds instead of waiting for it forever.
    """
    if jax.distributed.is_initialized():
        return
    num = int(_setting(cfg, "num_processes", "JAXASR_NUM_PROCESSES", 0))
    address = _setting(cfg, "coordinator_address", "JAXASR_COORDINATOR", "")
    pid = int(_setting(cfg, "process_id", "JAXASR_PROCESS_ID", -1))
    timeouts = dict(initialization_timeout=int(cfg.get("initialization_timeout", 300)) if cfg is not None else 300,
                    heartbeat_timeout_seconds=int(cfg.get("heartbeat_timeout", 60)) if cfg is not None else 60)
    if cfg is not None and cfg.get("auto"):
        jax.distributed.initialize(coordinator_address=address or None, num_processes=num or None,
                                   process_id=pid if pid >= 0 else None, **timeouts)
    else:
        if num <= 1:
            return
        if not address or pid < 0:
            raise ValueError(f"{num} processes need distributed.coordinator_address and distributed.process_id "
                             "(or JAXASR_COORDINATOR and JAXASR_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid, **timeouts)
    log.info("process %d of %d joined (coordinator %s), %d local of %d devices", jax.process_index(),
             jax.process_count(), address or "found by JAX", jax.local_device_count(), jax.device_count())


def pad_to_common_shapes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-pad dim 1 of every array (labels, masks, text tokens) to the longest of any process.

    Each process pads its rows to a length bucket chosen from its own rows, but the processes'
    rows are joined into one global array, which needs the same shape from all of them. The padding
    is masked (loss_mask, text_mask are 0 there), so the loss does not change. One small all-gather
    per batch; a no-op for a single process.
    """
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils

    keys = sorted(k for k, v in batch.items() if np.ndim(v) >= 2)
    local = np.asarray([batch[k].shape[1] for k in keys], np.int64)
    longest = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys)).max(0)
    out = dict(batch)
    for k, n in zip(keys, longest):
        v = batch[k]
        if v.shape[1] < n:
            out[k] = np.pad(v, [(0, 0), (0, int(n) - v.shape[1])] + [(0, 0)] * (v.ndim - 2))
    return out


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any of them.

    Decisions that lead to collective work (stop and save on SIGTERM) must be taken at the same
    step everywhere, though a signal reaches the hosts at different times (or only one of them).
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(int(flag), np.int32))).any())
