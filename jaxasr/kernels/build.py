"""Compile a C++ source of this package into a shared library, once per machine, and cache it.

No JAX here: the host data pipeline's audio kernels build with this too, in worker processes.
The cache key holds everything the binary depends on (source, flags, compiler, the caller's own
parts such as library versions, and the CPU, since the flags include -march=native), so a change
to any of them builds afresh instead of loading a stale library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-ffast-math", "-std=c++17", "-shared", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("JAXASR_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxasr", "kernels")
    return Path(root)


def compiler() -> str | None:
    """The C++ compiler to use ($CXX, else c++ or g++ on the PATH), or None."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_signature() -> str:
    """The CPU's model and instruction-set flags: a library built with -march=native is only
    valid on CPUs that have them, so they are part of the cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def build_library(source: Path, cxx: str, *, args: Sequence[str] = (), key: Sequence[str] = ()) -> Path:
    """`source` compiled with `cxx`, FLAGS and `args` (include, link options) into the cache;
    `key` adds what else the result depends on (versions of linked libraries). Raises
    RuntimeError with the compiler's message when the build fails."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256("\0".join([source.read_text(), " ".join(FLAGS), " ".join(args), version,
                                       *key, _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        pass
    cmd = [cxx, *FLAGS, str(source), "-o", tmp.name, *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)}\n{result.stderr[-2000:]}")
        os.replace(tmp.name, out)  # atomic: concurrent builders (test workers) never see half a file
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return out


def load_library(source: Path, *, what: str, switch: str, fallback: str,
                 build_args: Callable[[], tuple[Sequence[str], Sequence[str]]] = lambda: ((), ())
                 ) -> ctypes.CDLL | None:
    """`source` built (or found in the cache) and loaded; None where the environment variable
    `switch` is "0", or, with a warning naming `what` and the reason, when there is no compiler
    or the build fails (the caller then uses `fallback`). `build_args` gives (args, key) for
    `build_library`; it may raise too (a missing library to link)."""
    if os.environ.get(switch, "1") == "0":
        return None
    cxx = compiler()
    if cxx is None:
        log.warning("%s: no C++ compiler found (set CXX); using %s", what, fallback)
        return None
    try:
        args, key = build_args()
        return ctypes.CDLL(str(build_library(source, cxx, args=args, key=key)))
    except Exception as e:  # noqa: BLE001: any build or load failure means "use the fallback"
        log.warning("%s could not be built, using %s: %s", what, fallback, e)
        return None
