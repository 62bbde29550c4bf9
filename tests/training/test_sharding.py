"""Sharded training gives the single-device numbers: DP, FSDP, TP and DP x FSDP x TP on 8
simulated CPU devices, and layer scan with full rematerialization, against 1 device.

Acceptance: the same config gives the same losses (and gradient norms) on 1 device and on 8
simulated devices, relative difference <= 1e-5 over 5 steps. The runs live in
`sharded_losses.py`, started as subprocesses because the number of simulated devices is fixed
when jax is imported; it also checks that the parameters and Adam moments really are split
over fsdp / tensor (a comparison of unsharded runs would prove nothing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.subprocesses import json_result, start_python

SCRIPT = Path(__file__).with_name("sharded_losses.py")
RTOL = 1e-5
STEPS = 5

# name -> "data,fsdp,tensor[,scan]" on 8 devices. The tiny config has 8 heads, MLP 128,
# vocabulary 96 and d_model 64, so every axis size here divides the dims it splits.
MESHES_8 = {
    "dp": "8,1,1",
    "fsdp": "1,8,1",
    "tp": "1,1,8",
    "dp_fsdp_tp": "2,2,2",
    "dp_fsdp_tp_scan_remat": "2,2,2,scan",  # scan_layers=True, remat_policy='full'
}


def _start(devices: int, meshes: dict[str, str]):
    return start_python([str(SCRIPT), str(devices), *(f"{name}={shape}" for name, shape in meshes.items())])


@pytest.fixture(scope="module")
def runs() -> tuple[dict, dict]:
    # Both processes at once: each is mostly single-threaded XLA compilation.
    multi = _start(8, MESHES_8)
    single = _start(1, {"single": "1,1,1"})
    reference = json_result(single, "1-device run")["single"]
    return reference, json_result(multi, "8-device runs")


def _rel(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


@pytest.mark.parametrize("name", list(MESHES_8))
def test_sharded_training_matches_single_device(runs, name):
    reference, results = runs
    run = results[name]
    assert run["mesh"] == dict(zip(("data", "fsdp", "tensor"), map(int, MESHES_8[name].split(",")[:3])))
    assert run["optimizer"] == reference["optimizer"]
    if run["mesh"]["fsdp"] > 1 or run["mesh"]["tensor"] > 1:
        assert "sharding" in run, "sharding of the parameters was not checked"
    for key in ("losses", "grad_norms"):
        got, want = run[key], reference[key]
        assert len(got) == len(want) == STEPS
        rel = _rel(got, want)
        assert max(rel) <= RTOL, f"{name} {key}: {got} vs 1 device {want} (relative difference {rel})"
