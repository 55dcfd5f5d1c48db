"""Every benchmark in benchmarks/ runs, as a user runs it (`python -m benchmarks.NAME`), in
its tiny mode on the session's quickly trained fixtures: none can rot unnoticed again (one
once imported a class that had been renamed, and failed before it measured anything).

The benchmarks are found in the folder, so a new one without an entry in TINY fails here.
Speed is the benchmarks' business, not the tests': the budget is a bound for a run that
hangs, not a pace; what is checked is that each finished and printed its tables."""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import mcu_size
from tests.conftest import ROOT

# modules of benchmarks/ that are not benchmarks: the shared helpers, and parts of capacity,
# edge_head and unfamiliar
HELPERS = {"__init__", "common", "echo_servers", "hop_clients", "camera_search", "c_timing",
           "unfamiliar_compare", "unfamiliar_depth"}
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in HELPERS)
# A tiny run that starts a broker and two workers for each of its ten edges (about 50 s on 2
# busy cores): `-m slow` runs it; the default suite still imports it.
SLOW = {"adaptive"}
TIMEOUT_S = 300


def table(stdout: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with `header`."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def check_capacity(stdout: str) -> None:
    """It speaks today's wire to today's broker (it once read a message part wire v3 dropped,
    and its echo worker got no answer) and sends what the model's edge sends."""
    uplinks = {row[0]: row for row in table(stdout, "| uplink | bytes")}
    assert list(uplinks) == ["uint4 + static", "uint4 + none"]
    assert float(uplinks["uint4 + static"][1]) < float(uplinks["uint4 + none"][1])
    paths = table(stdout, "| path |")   # every path answered, ours with the echo worker
    assert [row[0] for row in paths] == [
        "direct DEALER-ROUTER", "minimal Python broker + echo worker",
        "our broker + echo worker", "our broker + 1 tail worker, uint4 + static",
        "our broker + 1 tail worker, uint4 + none"]
    assert all(float(row[4]) > 0 for row in paths)
    for row in table(stdout, "| uplink | cameras"):   # every request of every step answered
        sent = re.fullmatch(r"(\d+)/(\d+)", row[5])
        assert sent and sent[1] == sent[2], row
    capacities = {row[0]: int(row[1].split()[0]) for row in table(stdout, "| uplink | capacity")}
    assert capacities["uint4 + static"] > 0 and capacities["uint4 + none"] > 0


def check_faults(stdout: str) -> None:
    """Every frame of every fault got its one final answer."""
    rows = table(stdout, "| fault |")
    assert len(rows) == 4
    assert all(row[1] == row[3] for row in rows), rows   # frames sent == unique answers


def check_adaptive(stdout: str) -> None:
    for header in ("| edge | offload after", "| edge | offload, 2 workers", "| edge | B/s",
                   "| | shadows", "| model | exit ECE"):
        assert table(stdout, header), header


def pictures(folder: Path) -> Path:
    """Pictures of nothing like the classes: a checkerboard, noise, a colour gradient."""
    import cv2
    folder = folder / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    board = (np.indices((96, 128)).sum(0) // 16 % 2 * 255).astype(np.uint8)
    gradient = np.dstack([*np.meshgrid(np.arange(128), np.arange(96)), np.full((96, 128), 64)])
    for name, image in (("board", board), ("noise", rng.integers(0, 256, (96, 128, 3))),
                        ("gradient", gradient * 2)):
        cv2.imwrite(str(folder / f"{name}.png"), image.astype(np.uint8))
    return folder


def check_unfamiliar_photos(stdout: str) -> None:
    """Each picture once; the exit answers none it is flagged on, nor any it was not sure of."""
    rows = table(stdout, "| picture |")
    assert sorted(row[0] for row in rows) == ["board", "gradient", "noise"]
    for picture, _, _, before, _, flagged, now, tail in rows:
        assert now == ("yes" if before == "yes" and flagged == "no" else "no"), picture
        assert tail, picture
    assert "3 pictures: the exit answered" in stdout


def check_unfamiliar(stdout: str) -> None:
    """Every set of unfamiliar frames measured through the shipped rule: the exit answers no
    frame it would not answer on confidence alone, and at most what it is not flagged on; the
    method study and the layer table ran too."""
    rows = {row[0]: row for row in table(stdout, "| frames | n | AUROC edge")}
    assert list(rows) == ["known (familiar)", "held-out classes", "noise", "inverted", "rot90"]
    for name, row in rows.items():
        flagged, confident, answered = (float(cell.rstrip("%")) for cell in row[4:7])
        assert answered <= confident and answered <= 100 - flagged + 1e-9, row
        if name != "known (familiar)":
            assert 0 <= float(row[2]) <= 1 and 0 <= float(row[3]) <= 1, row
    for header in ("| thresholds | edge flags", "| score | AUROC held-out", "| layer | features"):
        assert table(stdout, header), header


def subsets(tmp_path: Path, idx_dir: Path) -> Path:
    """small_data's folder of subsets: the generated data as its first one."""
    (tmp_path / "subsets").mkdir()
    (tmp_path / "subsets" / "subset_101").symlink_to(idx_dir)
    return tmp_path / "subsets"


# name: (its arguments after --tiny, from fixtures and the test's tmp_path; the first line of
# a table it must print; a check of its output, or None). Fixtures are asked for by name, so
# a run trains only what it needs.
TINY = {
    "adaptive": (lambda f, tmp: ["--artifacts", f("artifacts"), "--data", f("idx_dir"),
                                 "--ece-dirs", f("artifacts")],
                 "| edge | offload after", check_adaptive),
    "bandwidth": (lambda f, tmp: ["--data", f("idx_dir"), "--runs", tmp / "runs"],
                  "| model | head params", None),
    "capacity": (lambda f, tmp: ["--artifacts", f("bottleneck_artifacts"), "--data", f("idx_dir")],
                 "| uplink | capacity", check_capacity),
    "coder": (lambda f, tmp: ["--artifacts", f("default_layout"), "--data", f("idx_dir")],
              "| step (batch 64) |", None),
    "compare_configs": (lambda f, tmp: ["--data", f("idx_dir"), "--out", tmp / "runs"],
                        "| config | head params", None),
    "conv_export": (lambda f, tmp: [f("conv_sparse"), "--data", f("idx_dir")],
                    "| head | export |", None),
    "decode_worst": (lambda f, tmp: [], "width message", None),
    "edge_head": (lambda f, tmp: ["--runs", tmp / "runs", "--data", f("idx_dir")],
                  "| head | MACs |", None),
    "faults": (lambda f, tmp: ["--artifacts", f("artifacts"), "--data", f("idx_dir")],
               "| fault |", check_faults),
    "mcu_size": (lambda f, tmp: ["--artifacts", f("default_layout")],
                 "| config | variant | flash KB", None),
    "offload": (lambda f, tmp: ["--artifacts", f("artifacts"), "--data", f("idx_dir")],
                "| dtype | codec |", None),
    "small_data": (lambda f, tmp: [subsets(tmp, f("idx_dir"))], "| config | splitexit", None),
    "soak": (lambda f, tmp: ["--artifacts", f("artifacts"), "--data", f("idx_dir")],
             "| process | RSS start", None),
    "sparse_conv": (lambda f, tmp: [], "| shape | batch |", None),
    "sparse_layer": (lambda f, tmp: [], "| head | thr |", None),
    "train_epoch": (lambda f, tmp: ["--data", f("idx_dir")], "| model | sparse kernels", None),
    "unfamiliar": (lambda f, tmp: ["--data", f("idx_dir"), "--compare", "--depth"],
                   "| frames | n | AUROC edge", check_unfamiliar),
    "unfamiliar_photos": (lambda f, tmp: [str(pictures(tmp)), "--artifacts", f("artifacts")],
                          "| picture |", check_unfamiliar_photos),
}


def run_benchmark(name: str, args: list) -> subprocess.CompletedProcess:
    """`python -m benchmarks.NAME ARGS` in a session of its own: on a timeout the servers it
    spawned go with it (no process outlives the test)."""
    proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *map(str, args)],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_every_benchmark_has_a_tiny_run():
    assert BENCHMARKS and set(BENCHMARKS) == set(TINY), \
        "a benchmark without a tiny run here (or one that is gone): update TINY"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_imports_as_a_package_module(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in BENCHMARKS])
def test_tiny_run_prints_its_table(name, request, tmp_path):
    if name == "mcu_size" and (why := mcu_size.missing()):
        pytest.skip(f"no Cortex-M4 build: {why}")
    arguments, header, check = TINY[name]
    done = run_benchmark(name, ["--tiny", *arguments(request.getfixturevalue, tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(line.startswith(header) for line in done.stdout.splitlines()), done.stdout[-3000:]
    if check:
        check(done.stdout)


@pytest.mark.parametrize("args, named", [
    (["--artifacts", "/nonexistent/model"], "/nonexistent/model"),
    (["--seconds", "0"], "--seconds"),
    (["--codec", "zstd"], "--codec"),
])
def test_a_capacity_user_error_is_one_line(args, named):
    done = run_benchmark("capacity", args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capacity: error: ") and named in lines[0], \
        done.stderr
