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
    """Join the job's other processes (once per process, before any other JAX call)."""
    if jax.distributed.is_initialized():
        return
    if cfg is not None and cfg.get("auto"):
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout)
        return
    num = int(_setting(cfg, "num_processes", "JAXASR_NUM_PROCESSES", 0))
    if num <= 1:
        return
    address = _setting(cfg, "coordinator_address", "JAXASR_COORDINATOR", "")
    pid = int(_setting(cfg, "process_id", "JAXASR_PROCESS_ID", -1))
    if not address or pid < 0:
        raise ValueError(f"{num} processes need distributed.coordinator_address and distributed.process_id "
                         "(or JAXASR_COORDINATOR and JAXASR_PROCESS_ID)")
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num, process_id=pid,
        initialization_timeout=cfg.get("initialization_timeout", 300) if cfg is not None else 300,
        heartbeat_timeout_seconds=cfg.get("heartbeat_timeout", 60) if cfg is not None else 60)
    log.info("process %d of %d joined %s", pid, num, address)
