"""Tests that need a fresh JAX (a simulated device count, fixed when jax is imported) run Python
in a child process and read one JSON line back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def start_python(args: list[str], cwd=None) -> subprocess.Popen:
    """`python ARGS` without this process's XLA_FLAGS / JAX_PLATFORMS (the child sets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def json_result(proc: subprocess.Popen, what: str, timeout: float = 600) -> dict:
    """The last stdout line of `proc` as JSON; a failure or timeout fails the test with its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{err[-6000:]}")
    return json.loads(out.strip().splitlines()[-1])
