"""The layering stated in pyproject.toml ([tool.importlinter]) holds: `lint-imports` passes on
the tree, and fails when one forbidden import is planted in a copy of it, so a contract that
stopped matching anything would be noticed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "workers", "monitoring")
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports with the contracts of cwd's pyproject.toml, on the packages under cwd."""
    return subprocess.run([LINT, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_the_layering_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


# (module to plant the line in: a new one, or an existing one it is appended to; the line;
# the contract that must catch it)
PLANTED = [
    ("pipeline/edge/_planted.py", "import torch", "never torch"),
    ("pipeline/edge/_planted.py", "from pipeline.model import config", "nothing of the model"),
    ("pipeline/edge/_planted.py", "from pipeline import options", "the workers or the CLI"),
    ("monitoring/_planted.py", "from pipeline.protocol import wire", "Monitoring imports"),
    ("workers/broker.py", "import torch", "The broker never imports torch"),
    ("workers/scheduler.py", "from pipeline.model import artifacts", "The broker never"),
    ("pipeline/protocol/_planted.py", "import torch", "Protocol and the floor import no torch"),
    ("pipeline/floor/_planted.py", "import torch", "Protocol and the floor import no torch"),
    ("pipeline/floor/_planted.py", "from pipeline.edge import numpy_head", "Layers"),
    ("pipeline/model/_planted.py", "from pipeline.edge import numpy_head", "Layers"),
    ("pipeline/floor/_planted.py", "from pipeline.protocol import wire", "Layers"),
    ("pipeline/protocol/_planted.py", "from pipeline.edge import numpy_head", "Layers"),
    ("pipeline/edge/_planted.py", "from pipeline.export import export_c", "Layers"),
    ("pipeline/export/_planted.py", "from workers import broker", "Layers"),
    ("pipeline/export/_planted.py", "import torch", "The exporters import"),
    ("pipeline/export/_planted.py", "from pipeline.model import config", "The exporters import"),
    ("workers/_planted.py", "from pipeline import cli", "Layers"),
    # floor.data imports floor.splits: splits importing data back closes a cycle
    ("pipeline/floor/splits.py", "from pipeline.floor import data", "No import cycles"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the packages' sources and pyproject.toml, to plant imports in."""
    root = tmp_path_factory.mktemp("tree")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, root / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def test_the_copy_passes_before_anything_is_planted(tree):
    """The copy, not the checkout, is what lint-imports reads from there (the planted
    module's name in its report below says so too)."""
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path, line, contract", PLANTED)
def test_a_planted_import_breaks_its_contract(tree, path, line, contract):
    module = tree / path
    before = module.read_text() if module.exists() else None
    module.write_text((before or "") + f"\n{line}  # noqa: E402\n")
    try:
        done = lint(tree)
    finally:
        if before is None:
            module.unlink()
        else:
            module.write_text(before)
    assert done.returncode != 0, done.stdout
    broken = [row for row in done.stdout.splitlines() if row.endswith(" BROKEN")]
    assert [row for row in broken if contract in row], done.stdout
    name = ".".join(Path(path).with_suffix("").parts)
    assert name.rsplit(".", 1)[-1] in done.stdout, done.stdout


@pytest.mark.parametrize("module", ["pipeline.edge.producer", "pipeline.edge.async_edge",
                                    "pipeline.edge.blocking",
                                    "pipeline.edge.sources", "pipeline.export.export_c",
                                    "workers.broker"])
def test_the_edge_and_the_broker_load_no_torch(module):
    """What lint-imports cannot see: imports made at run time (pipeline's lazy API)."""
    code = (f"import sys, pipeline, {module}\n"
            f"pipeline.Edge, pipeline.AsyncEdge, pipeline.EdgeConfig\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
