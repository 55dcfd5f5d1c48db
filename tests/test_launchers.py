"""Launchers own their metrics: each serves /metrics and /ready from a folder of its own,
never wipes another's, and a launcher refused for a taken port touches nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from monitoring.exposition import LOCK_FILE, MetricsError, claim_metrics_dir
from monitoring.top import scrape
from tests.conftest import ROOT, free_port
from tests.test_cli import one_line_failure
from workers.pool import START_TIMEOUT_S, wait_until

FRAMES = "splitexit_edge_frames_total"


def edge_launcher(artifacts, idx_dir, cwd, port, producer_id, *extra, wait=False):
    """`splitexit edge` replaying slowly, with no broker: every frame is answered locally."""
    cmd = [sys.executable, "-m", "pipeline.cli", "edge", "--artifacts", str(artifacts),
           "--insecure", "--broker", f"tcp://127.0.0.1:{free_port()}", "--data", str(idx_dir),
           "--fps", "20", "--producer-id", str(producer_id), "--metrics-port", str(port),
           *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # run from cwd, a folder of the test's own
    if wait:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S, env=env)
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)


def frames(port, producer) -> float:
    return scrape([f"http://127.0.0.1:{port}/metrics"]).total(FRAMES, producer=producer)


def test_two_launchers_keep_their_own_series_and_a_refused_one_touches_nothing(
        artifacts, idx_dir, tmp_path):
    p1, p2 = free_port(), free_port()
    first = edge_launcher(artifacts, idx_dir, tmp_path, p1, 0)
    second = None
    try:
        wait_until(lambda: frames(p1, "0") >= 5, START_TIMEOUT_S, "first launcher's frames",
                   [first])
        second = edge_launcher(artifacts, idx_dir, tmp_path, p2, 7)
        wait_until(lambda: frames(p2, "7") >= 5, START_TIMEOUT_S, "second launcher's frames",
                   [second])
        seen = frames(p1, "0")
        folder = tmp_path / "runs" / f"metrics-{p1}"
        files = sorted(p.name for p in folder.iterdir())
        assert (tmp_path / "runs" / f"metrics-{p2}").is_dir() and LOCK_FILE in files

        # a third launcher on the first one's port, and on its folder: refused, nothing touched
        refused = edge_launcher(artifacts, idx_dir, tmp_path, p1, 9, "--metrics-dir",
                                str(folder), wait=True)
        one_line_failure(refused)
        assert f"127.0.0.1:{p1}" in refused.stderr
        assert sorted(p.name for p in folder.iterdir()) == files
        # ... and on a free port but the first one's folder: refused, the folder is in use
        taken = edge_launcher(artifacts, idx_dir, tmp_path, free_port(), 9, "--metrics-dir",
                              str(folder), wait=True)
        one_line_failure(taken)
        assert "belongs to a running launcher" in taken.stderr
        assert sorted(p.name for p in folder.iterdir()) == files

        assert frames(p1, "0") >= seen > 0  # the first launcher lost nothing
        assert frames(p2, "0") == 0 and frames(p1, "7") == 0  # and nobody mixed series
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.terminate()
                proc.wait(60)


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    with pytest.raises(MetricsError, match="not splitexit metric files"):
        claim_metrics_dir(tmp_path)
    assert precious.read_text() == "mine" and not (tmp_path / LOCK_FILE).exists()


def test_a_foreign_db_file_survives(tmp_path):
    """Finding 8 of #25: any *.db counted as a metric file, and a SQLite inventory.db
    was deleted; only prometheus-client's own names (counter_PID.db, ...) are."""
    inventory = tmp_path / "inventory.db"
    inventory.write_bytes(b"SQLite format 3\x00")
    (tmp_path / "counter_1234.db").write_bytes(b"stale")
    with pytest.raises(MetricsError, match="inventory.db"):
        claim_metrics_dir(tmp_path)
    assert inventory.read_bytes() == b"SQLite format 3\x00"
    assert (tmp_path / "counter_1234.db").exists() and not (tmp_path / LOCK_FILE).exists()


def test_stale_metric_files_of_a_finished_launcher_are_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    (tmp_path / "counter_1234.db").write_bytes(b"stale")
    (tmp_path / LOCK_FILE).write_text("999999999\n")  # a launcher that is gone
    assert claim_metrics_dir(tmp_path) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
