"""The distribution as a user gets it: a wheel installed into a fresh virtual environment,
run from a folder outside the checkout. It must find its own configs (importlib.resources),
train a shipped config by name and serve it with `up`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd, cwd: Path) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{cmd}: {r.stderr[-2000:]}"
    return r.stdout


def test_a_wheel_installed_outside_the_checkout_trains_and_serves(tmp_path, idx_dir):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: setuptools builds in the source tree, and a build/ left there from
    # an earlier build could carry stale files into the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        "runs", "build", "*.egg-info", "__pycache__", ".git", ".pytest_cache", ".hypothesis"))
    # No build isolation: setuptools comes from this environment (nothing downloaded).
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", tmp_path / "dist", source, cwd=elsewhere)
    [wheel] = (tmp_path / "dist").glob("splitexit-*.whl")
    with zipfile.ZipFile(wheel) as z:   # PEP 561: type checkers read the package's hints
        assert "pipeline/py.typed" in z.namelist()
    venv = tmp_path / "venv"   # torch, numpy, pyzmq ... from this environment's packages
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=elsewhere)
    python, splitexit = venv / "bin" / "python", venv / "bin" / "splitexit"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=elsewhere)
    where = run(python, "-c", "import pipeline; print(pipeline.__file__)", cwd=elsewhere)
    assert Path(where.strip()).is_relative_to(venv), where      # not the checkout's

    assert run(splitexit, "--version", cwd=elsewhere).strip() == \
        f"splitexit {wheel.name.split('-')[1]}"
    out = elsewhere / "runs" / "ps"
    run(splitexit, "train", "paper-sparse", "--epochs", "1", "--data", idx_dir, "--out", out,
        "--quiet", cwd=elsewhere)
    assert json.loads((out / "metrics.json").read_text())["model"] == "paper-sparse"
    run(splitexit, "export", out, "--out", elsewhere / "edge", cwd=elsewhere)   # C sources ship
    assert {p.name for p in (elsewhere / "edge").glob("*.c")} == {"splitexit_head.c",
                                                                  "edge_step.c"}
    run(splitexit, "up", "--artifacts", out, "--data", idx_dir, "--workers", "1",
        "--producers", "1", "--limit", "300", "--metrics-port", "0", "--hold", "0",
        "--frontend", f"tcp://127.0.0.1:{free_port()}",   # never the default ports: another
        "--backend", f"tcp://127.0.0.1:{free_port()}",    # program may hold them
        "--run-dir", elsewhere / "up", cwd=elsewhere)
    report = json.loads((elsewhere / "up" / "report.json").read_text())
    assert report["frames"] == 300 and report["unique_frames"] == 300
    assert report["paths"].get("offload", 0) > 0          # the tail answered, from the wheel
