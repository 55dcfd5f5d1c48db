"""C sources built with the system compiler on first use, cached, loaded with ctypes.

Why plain C and ctypes: the kernels and coders read and write flat buffers and need no
Python or torch API, so one file builds in about a second with `cc` and loads anywhere. It
is built for the machine it runs on (`-march=native` where the compiler takes it), cached
by a hash of source, compiler and flags (`cache_dir()`), and replaced atomically, so
concurrent first users agree on one file.

When a library cannot be used -- no compiler, a failed build, or SPLITEXIT_NATIVE=0 --
`load` returns None and one line saying why; its caller runs the portable reference.
This module is torch-free: the static code's coder (coder.c, `coder()`) and the training
kernel (pipeline/model/ell_native.py) share it.
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
from typing import Callable

__all__ = ["load", "Library", "cache_dir", "coder", "coder_status", "DISABLE_ENV"]

DISABLE_ENV = "SPLITEXIT_NATIVE"  # "0": every native library falls back to its reference
BUILD_TIMEOUT_S = 120
CODER_SOURCE = Path(__file__).with_name("coder.c")
# Tried in order: the first that builds is used.
CODER_FLAGS = (["-O2", "-march=native"], ["-O2"])


def cache_dir() -> Path:
    """Where built libraries live: $SPLITEXIT_CACHE, else $XDG_CACHE_HOME/splitexit, else
    ~/.cache/splitexit."""
    if os.environ.get("SPLITEXIT_CACHE"):
        return Path(os.environ["SPLITEXIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitexit"


def cpu_model() -> str:
    """The CPU this process runs on, as the kernel reports it (model name and ISA flags: a VM
    may name a CPU generically, "AMD EPYC", while hiding some of its instructions)."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        import platform
        return f"{platform.machine()} {platform.processor()}"
    fields = dict(line.split(":", 1) for line in info if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return " ".join(fields.get(k, "") for k in ("model name", "flags", "Features", "CPU part"))


def _build(cc: str, source: Path, flag_sets, std: str) -> tuple[Path | None, str]:
    """Compile (or find in the cache) the shared library; (path, how) or (None, why not)."""
    text = source.read_bytes()
    errors = []
    for flags in flag_sets:
        args = [*flags, f"-std={std}", "-Wall", "-Werror", "-fPIC", "-shared"]
        # -march=native builds for this CPU: a cache shared with another CPU must not reuse it.
        cpu = cpu_model() if "-march=native" in flags else ""
        key = hashlib.sha256(text + cc.encode() + " ".join(args).encode()
                             + cpu.encode()).hexdigest()[:16]
        target = cache_dir() / f"{source.stem}-{key}.so"
        how = f"{Path(cc).name} {' '.join(flags)}"
        if target.exists():
            return target, how
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *args, "-o", tmp, str(source)], capture_output=True,
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
    return None, f"{Path(cc).name} could not build {source.name}: {errors[-1][0]}"


def load(source: Path, declare: Callable[[ctypes.CDLL], ctypes.CDLL], flag_sets,
         std: str, what: str, fallback: str) -> tuple[ctypes.CDLL | None, str]:
    """(the library built from `source` with `declare` applied, or None; one status line:
    `what (how it was built)`, or `fallback (why not)`)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"{fallback} ({DISABLE_ENV}=0)"
    if not source.is_file():
        return None, f"{fallback} ({source.name} is missing from this install)"
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        return None, f"{fallback} (no C compiler: install gcc or set CC for the {what})"
    path, how = _build(cc, source, flag_sets, std)
    if path is None:
        return None, f"{fallback} ({how})"
    try:
        return declare(ctypes.CDLL(str(path))), f"{what} ({how})"
    except OSError as e:
        return None, f"{fallback} (cannot load {path}: {e})"


def _declare_coder(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    head = [ctypes.c_char_p, i64, i64, i64, i64]   # data, len, frames, channels, symbols
    lib.huffman_decode.argtypes = [*head, p, p, p, p, p]
    lib.huffman_decode.restype = ctypes.c_int
    lib.rans_decode.argtypes = [*head, p, p, p]
    lib.rans_decode.restype = ctypes.c_int
    codes = [p, i64, i64, i64]                      # codes, frames, channels, symbols
    lib.huffman_encode.argtypes = [*codes, p, p, p, i64]   # code, length, out, cap
    lib.rans_encode.argtypes = [*codes, p, p, p, i64]      # freq, cum, out, cap
    tables = [p, p, p, p, p, p]     # code, length, freq, cum, rcp, cost
    lib.static_encode_smallest.argtypes = [*codes, *tables, p, i64, p]    # out, cap, is_rans
    # features, scales, levels, codes (out), frames, channels, symbols, tables, out, cap, is_rans
    lib.static_quantize_encode.argtypes = [p, p, i64, *codes, *tables, p, i64, p]
    # the device's form: one uint16 entry per (channel, symbol); its rANS costs
    lib.static_encode_compact.argtypes = [*codes, p, p, i64, p]         # entry, out, cap, is_rans
    lib.static_rans_cost.argtypes = lib.static_rans_cost_near.argtypes = [ctypes.c_uint32]
    lib.static_rans_cost.restype = lib.static_rans_cost_near.restype = ctypes.c_uint32
    for encoder in (lib.huffman_encode, lib.rans_encode, lib.static_encode_smallest,
                    lib.static_quantize_encode, lib.static_encode_compact):
        encoder.restype = i64
    return lib


class Library:
    """A C source built and loaded once per process, on first use (thread-safe); `status`
    says in one line what runs: the library, or its fallback and why."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], ctypes.CDLL], flag_sets,
                 std: str, what: str, fallback: str):
        self._args = (source, declare, flag_sets, std, what, fallback)
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, building it on first call; None: run the fallback."""
        if "lib" not in self._state:
            with self._lock:
                if "lib" not in self._state:
                    lib, status = load(*self._args)
                    self._state.update(lib=lib, status=status)
        return self._state["lib"]  # type: ignore[return-value]

    def status(self) -> str:
        self.get()
        return str(self._state["status"])


CODER = Library(CODER_SOURCE, _declare_coder, CODER_FLAGS, "c99", "native coder",
                "Python coder")


def coder() -> ctypes.CDLL | None:
    """The static code's C coders (coder.c), built on first call; None: use Python's."""
    return CODER.get()


def coder_status() -> str:
    """One line: which coders the static code runs, and why."""
    return CODER.status()
