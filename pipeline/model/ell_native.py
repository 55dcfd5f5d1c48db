"""The native ELL training kernel: ell_kernel.c, built with the system C compiler on first use.

Why not a torch C++ extension: the kernel needs no torch API (it reads and writes float
buffers), so a plain C file builds in about a second with `cc`, where a torch extension
compiles torch's headers for a minute and needs ninja. It is built for the machine it runs
on (`-march=native`), cached by a hash of source, compiler and flags, and loaded with ctypes
(pipeline.floor.native builds it, as it builds the uplink's coder).

When it cannot be used -- no compiler, a failed build, or SPLITEXIT_NATIVE=0 -- `library()`
returns None, `status()` says why in one line, and SparseLinear runs its PyTorch kernels.
When it can, SparseLinear still times it against them per shape (kernel_choice.py) and runs
whichever is faster on this machine; SPLITEXIT_NATIVE=1 skips the timing and runs it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from pipeline.floor import native
from pipeline.floor.native import DISABLE_ENV, cache_dir

__all__ = ["library", "status", "cache_dir", "DISABLE_ENV"]

SOURCE = Path(__file__).with_name("ell_kernel.c")
# Tried in order: the first that builds is used (a compiler without -march=native or
# without OpenMP still gets a working kernel, single-threaded in the last case).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ell_forward.argtypes = [p, i64, i64, i64, i64, p, p, p, p, ctypes.c_int]
    lib.ell_forward.restype = ctypes.c_int
    lib.ell_backward.argtypes = [p, p, i64, i64, i64, i64, p, i64, p, p, p, p, ctypes.c_int]
    lib.ell_backward.restype = ctypes.c_int
    return lib


KERNEL = native.Library(SOURCE, _declare, FLAG_SETS, "gnu11", "native ELL kernel",
                        "PyTorch kernels")


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None when the fallback must run."""
    return KERNEL.get()


def status() -> str:
    """One line: which kernels SparseLinear trains with, and why."""
    return KERNEL.status()
