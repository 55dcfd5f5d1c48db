"""splitexit's edge side and shared core: `model/` (training side), `protocol/` (what edge,
broker and workers agree on), `edge/` (sources, the in-flight table, the producer), and the
command line (`cli.py`, `up.py`).

The library's way in (README, "From Python"):

    from pipeline import Edge          # or AsyncEdge, for asyncio
    with Edge("runs/default") as edge:
        answer = edge.submit(image).result()
"""

from importlib import import_module as _import_module
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("splitexit")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

# Imported when first used, so that `import pipeline.protocol` (the workers) stays light.
_API = {"Edge": "pipeline.edge.blocking", "AsyncEdge": "pipeline.edge.producer",
        "LocalAnswer": "pipeline.edge.producer", "Outcome": "pipeline.edge.results",
        "Summary": "pipeline.edge.results", "EdgeConfig": "pipeline.edge.config"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(_import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
