"""retain_freed_memory: repeated XLA:CPU calls stop page-faulting their buffers back in."""

import sys

import pytest

from tests.subprocesses import json_result, start_python

CHILD = """
import json, resource, sys
from jaxasr.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "on" else False
import jax, jax.numpy as jnp
x = jnp.ones((8192, 2048), jnp.float32)  # 64 MiB: above every glibc mmap threshold
double = jax.jit(lambda a: a * 2.0)
for _ in range(20):  # warm up: compile; the heap grows for a while (freed blocks get split by small ones)
    double(x).block_until_ready()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retained_memory_is_reused_without_page_faults():
    on = json_result(start_python(["-c", CHILD, "on"]), "retain on", timeout=300)
    off = json_result(start_python(["-c", CHILD, "off"]), "retain off", timeout=300)
    assert on["applied"] and not off["applied"]
    pages = 64 * 2**20 // 4096
    assert min(off["faults"]) > 0.9 * pages  # glibc maps the 64 MiB output afresh at every call
    reused = sum(f < 0.05 * pages for f in on["faults"])
    assert reused >= len(on["faults"]) // 2, on["faults"]  # reused (an odd call may still grow the heap)
