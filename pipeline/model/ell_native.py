"""The native ELL training kernel: ell_kernel.c, built with the system C compiler on first use.

Why not a torch C++ extension: the kernel needs no torch API (it reads and writes float
buffers), so a plain C file builds in about a second with `cc`, where a torch extension
compiles torch's headers for a minute and needs ninja. It is built for the machine it runs
on (`-march=native`), cached by a hash of source, compiler and flags, and loaded with ctypes.

When it cannot be used -- no compiler, a failed build, or SPLITEXIT_NATIVE=0 -- `library()`
returns None, `status()` says why in one line, and SparseLinear runs its PyTorch kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["library", "status", "cache_dir", "DISABLE_ENV"]

SOURCE = Path(__file__).with_name("ell_kernel.c")
DISABLE_ENV = "SPLITEXIT_NATIVE"  # "0" runs the PyTorch kernels
# Tried in order: the first that builds is used (a compiler without -march=native or
# without OpenMP still gets a working kernel, single-threaded in the last case).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where built kernels live: $SPLITEXIT_CACHE, else $XDG_CACHE_HOME/splitexit, else ~/.cache."""
    if os.environ.get("SPLITEXIT_CACHE"):
        return Path(os.environ["SPLITEXIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitexit"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _build(cc: str) -> tuple[Path | None, str]:
    """Compile (or find in the cache) the shared library; (path, how) or (None, why not)."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        args = [*flags, "-std=gnu11", "-Wall", "-Werror", "-fPIC", "-shared"]
        key = hashlib.sha256(source + cc.encode() + " ".join(args).encode()).hexdigest()[:16]
        target = cache_dir() / f"ell_kernel-{key}.so"
        how = f"{Path(cc).name} {' '.join(flags)}"
        if target.exists():
            return target, how
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *args, "-o", tmp, str(SOURCE)], capture_output=True,
                                  text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders agree on one file
                return target, how
            errors.append(done.stderr.strip().splitlines()[-1:] or ["failed"])
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append([str(e)])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, f"{Path(cc).name} could not build {SOURCE.name}: {errors[-1][0]}"


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ell_forward.argtypes = [p, i64, i64, i64, i64, p, p, p, p, ctypes.c_int]
    lib.ell_forward.restype = ctypes.c_int
    lib.ell_backward.argtypes = [p, p, i64, i64, i64, i64, p, i64, p, p, p, p, ctypes.c_int]
    lib.ell_backward.restype = ctypes.c_int
    return lib


def _load() -> None:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _state.update(lib=None, status=f"PyTorch kernels ({DISABLE_ENV}=0)")
        return
    cc = _compiler()
    if cc is None:
        _state.update(lib=None, status="PyTorch kernels (no C compiler: install gcc or set CC "
                                       "for the native ELL kernel)")
        return
    path, how = _build(cc)
    if path is None:
        _state.update(lib=None, status=f"PyTorch kernels ({how})")
        return
    try:
        _state.update(lib=_declare(ctypes.CDLL(str(path))), status=f"native ELL kernel ({how})")
    except OSError as e:
        _state.update(lib=None, status=f"PyTorch kernels (cannot load {path}: {e})")


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None when the fallback must run."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _load()
    return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """One line: which kernels SparseLinear trains with, and why."""
    library()
    return str(_state["status"])
