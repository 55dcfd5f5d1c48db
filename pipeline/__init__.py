"""splitexit's edge side and shared core: `model/` (training side), `protocol/` (what edge,
broker and workers agree on), `edge/` (sources, the in-flight table, the producer), and the
command line (`cli.py`, `up.py`)."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("splitexit")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
