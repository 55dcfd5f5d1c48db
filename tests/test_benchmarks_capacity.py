"""benchmarks/capacity.py at a tiny size, as a user runs it: it must keep speaking today's wire
to today's broker (it once read a message part wire v3 dropped, and its echo worker got no
answer), send what the model's edge sends, and answer a user error in one line.

Speed is the benchmark's business, not the test's: the budget here is generous, so a busy
machine slows the run down without failing it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "capacity.py")
TIMEOUT_S = 300   # a bound for a run that hangs, not a pace


def capacity(*args: str) -> subprocess.CompletedProcess:
    """Run the benchmark in a session of its own: on a timeout the servers it spawned go with
    it (no process outlives the test)."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


def test_capacity_serves_the_edges_own_uplink_beside_codec_none(bottleneck_artifacts, idx_dir):
    done = capacity("--artifacts", str(bottleneck_artifacts), "--data", str(idx_dir),
                    "--seconds", "0.3", "--low-rate-requests", "20", "--workers", "1",
                    "--start-cameras", "5", "--max-cameras", "10", "--budget-ms", "2000")
    assert done.returncode == 0, done.stderr[-3000:]
    # what the edge sends (a 4-bit uplink and its static code), and codec none beside it
    uplinks = {row[0]: row for row in table(done.stdout, "| uplink | bytes")}
    assert list(uplinks) == ["uint4 + static", "uint4 + none"]
    assert float(uplinks["uint4 + static"][1]) < float(uplinks["uint4 + none"][1])
    # every path of the hop table answered, ours with the echo worker among them
    paths = table(done.stdout, "| path |")
    assert [row[0] for row in paths] == [
        "direct DEALER-ROUTER", "minimal Python broker + echo worker",
        "our broker + echo worker", "our broker + 1 tail worker, uint4 + static",
        "our broker + 1 tail worker, uint4 + none"]
    assert all(float(row[4]) > 0 for row in paths)
    # every request of every camera step answered, and both uplinks served cameras
    for row in table(done.stdout, "| uplink | cameras"):
        sent = re.fullmatch(r"(\d+)/(\d+)", row[5])
        assert sent and sent[1] == sent[2], row
    capacities = {row[0]: int(row[1].split()[0])
                  for row in table(done.stdout, "| uplink | capacity")}
    assert capacities["uint4 + static"] > 0 and capacities["uint4 + none"] > 0


@pytest.mark.parametrize("args, named", [
    (["--artifacts", "/nonexistent/model"], "/nonexistent/model"),
    (["--seconds", "0"], "--seconds"),
    (["--codec", "zstd"], "--codec"),
])
def test_a_user_error_is_one_line(args, named):
    done = capacity(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capacity: error: ") and named in lines[0], \
        done.stderr
