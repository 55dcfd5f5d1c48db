"""splitexit's edge side and shared core: `model/` (training side), `protocol/` (what edge,
broker and workers agree on), `edge/` (sources, the in-flight table, the producer), and the
command line (`cli.py`, `up.py`)."""
