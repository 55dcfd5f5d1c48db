"""splitexit's edge side and shared core: `model/` (training side), `protocol/` (what edge,
broker and workers agree on), `edge/` (sources, the in-flight table, the producer), and the
command line (`cli.py`, `up.py`).

The library's way in (README, "Python API"):

    from pipeline import Edge          # or AsyncEdge, for asyncio
    with Edge("runs/default") as edge:
        answer = edge.submit(image).result()
"""

import os as _os
from importlib import import_module as _import_module
from importlib import metadata as _metadata
from typing import TYPE_CHECKING

# OpenMP threads that finish a parallel region sleep instead of spinning. libgomp's default
# spins up to 300 000 pauses (milliseconds) per wait, on a core that its sibling thread or
# another process needs. Measured with 2 torch threads on this project's 2 shared cores
# (benchmarks/sparse_layer.py rows, 800->40 step at batch 256): beside another 2-thread
# torch process, nn.Linear 1.6-8.0 ms spinning against 1.5-1.8 ms passive (the native kernel
# 1.7-4.0 against 0.8-1.1 ms), and with several such processes 64 ms against 3.2-4.3 ms; on
# idle cores passive costs a wake-up per region: nn.Linear 0.5-0.8 against 0.8-1.2 ms, the
# native kernel 1.2x slower here and at 2048x2048. A spin bound (GOMP_SPINCOUNT=10000) kept the idle
# times but was 2x slower than passive beside another torch process. libgomp reads this once,
# when torch loads it, so it must be set before `import torch`: here, where every entry point
# (CLI, workers, library users) passes first. A value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = _metadata.version("splitexit")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

# Imported when first used, so that `import pipeline.protocol` (the workers) stays light. A
# type checker reads the imports below instead (they never run), so it sees the real classes
# rather than `Any`; tests/test_api.py checks that the two lists agree.
if TYPE_CHECKING:
    from pipeline.edge.blocking import Edge
    from pipeline.edge.config import EdgeConfig
    from pipeline.edge.async_edge import AsyncEdge, LocalAnswer
    from pipeline.edge.results import Outcome, Summary

_API = {"Edge": "pipeline.edge.blocking", "AsyncEdge": "pipeline.edge.async_edge",
        "LocalAnswer": "pipeline.edge.async_edge", "Outcome": "pipeline.edge.results",
        "Summary": "pipeline.edge.results", "EdgeConfig": "pipeline.edge.config"}
__all__ = ["__version__", "Edge", "AsyncEdge", "LocalAnswer", "Outcome", "Summary",
           "EdgeConfig"]   # spelled out for linters and type checkers


def __getattr__(name: str) -> object:
    if name in _API:
        return getattr(_import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
