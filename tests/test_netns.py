"""Two hosts on one machine: edges in one network namespace, broker and workers in another,
joined by a veth pair this test creates (CURVE across it, as between real hosts). The link
goes down and up mid-stream; then it is throttled with an htb class. Every frame still gets
exactly one answer; deadlines turn the outage and the slow link into counted fallbacks. The
link is cut once answers are seen flowing, and restored once the cut is seen in fallbacks.

Needs root and iproute2 (ip, tc); skipped with the reason otherwise (CI runs as root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections import Counter

import pytest

from tests.conftest import ROOT, Observed
from workers.pool import START_TIMEOUT_S, wait_until
from tests.test_runtime import FRAMES

EDGE_IP, SERVER_IP = "10.231.0.1", "10.231.0.2"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root and iproute2 (ip, tc) to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    edge_ns, server_ns = f"se-edge-{tag}", f"se-srv-{tag}"
    edge_if, server_if = f"ve{tag}", f"vs{tag}"
    sh("ip", "netns", "add", edge_ns)
    sh("ip", "netns", "add", server_ns)
    try:
        sh("ip", "link", "add", edge_if, "type", "veth", "peer", "name", server_if)
        sh("ip", "link", "set", edge_if, "netns", edge_ns)
        sh("ip", "link", "set", server_if, "netns", server_ns)
        for ns, dev, ip in ((edge_ns, edge_if, EDGE_IP), (server_ns, server_if, SERVER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield edge_ns, server_ns, edge_if
    finally:
        for ns in (edge_ns, server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pipeline.cli",
                             *args], cwd=ROOT, **kw)


def start_server(server_ns, artifacts, keys, metrics_dir):
    return in_ns(server_ns, "workers", "-n", "2", "--artifacts", str(artifacts),
                 "--frontend", f"tcp://{SERVER_IP}:5555", "--backend", "tcp://127.0.0.1:5556",
                 "--broker-secret", str(keys / "broker.key_secret"), "--allow-edges",
                 str(keys / "allow-edges"), "--allow-workers", str(keys / "allow-workers"),
                 "--curve-secret", str(keys / "worker.key_secret"),
                 "--curve-server", str(keys / "broker.key"), "--metrics-port", "0",
                 "--metrics-dir", str(metrics_dir),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_edge(edge_ns, artifacts, keys, idx_dir, results, fps, deadline_ms, metrics_dir):
    return in_ns(edge_ns, "edge", "--artifacts", str(artifacts), "--broker",
                 f"tcp://{SERVER_IP}:5555", "--curve-secret", str(keys / "edge.key_secret"),
                 "--curve-server", str(keys / "broker.key"), "--source", "dataset",
                 "--data", str(idx_dir), "--fps", str(fps), "--deadline-ms", str(deadline_ms),
                 "--max-pack", "1", "--results", str(results), "--metrics-port", "0",
                 "--metrics-dir", str(metrics_dir),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stream(hosts, artifacts, keys, idx_dir, tmp_path, fps, deadline_ms, during=None):
    """Server pool in one namespace, an edge replay in the other; `during(edge, metrics)`
    runs while the edge streams. The two launchers' metric folders lie on the shared disk,
    so this test reads them although their ports are in other namespaces.
    Returns (final answers, the edge's metrics)."""
    edge_ns, server_ns, _ = hosts
    server_metrics, edge_metrics = tmp_path / "server-metrics", tmp_path / "edge-metrics"
    results = tmp_path / "results"
    server = start_server(server_ns, artifacts, keys, server_metrics)
    try:
        wait_until(lambda: server_metrics.is_dir() and Observed(server_metrics).total(
            "splitexit_ready", role="worker") >= 2, START_TIMEOUT_S,
            "two workers confirmed by the broker", [server])
        edge = start_edge(edge_ns, artifacts, keys, idx_dir, results, fps, deadline_ms,
                          edge_metrics)
        wait_until(edge_metrics.is_dir, START_TIMEOUT_S, "the edge launcher's metrics", [edge])
        metrics = Observed(edge_metrics)
        if during:
            during(edge, metrics)
        _, err = edge.communicate(timeout=START_TIMEOUT_S)
        assert edge.returncode == 0, err
    finally:
        server.terminate()
        server.wait(15)
    return outcomes(results), metrics


def outcomes(results):
    return [json.loads(line) for path in results.glob("*.jsonl")
            for line in path.read_text().splitlines()]


def report(name: str, done: list, metrics: Observed) -> None:
    """The figures the fault issue asks for (visible with pytest -s)."""
    duplicates = metrics.total("splitexit_edge_duplicate_answers_total")
    print(f"\n{name}: frames sent {FRAMES}, final answers {len(done)}, unique "
          f"{len({o['frame'] for o in done})}, offloaded "
          f"{sum(o['path'] == 'offload' for o in done)}, fallbacks "
          f"{dict(Counter(o['reason'] for o in done if o['reason']))}, duplicates discarded "
          f"{duplicates:.0f}")


def test_cut_link_then_restored(hosts, artifacts, keys, idx_dir, tmp_path):
    edge_ns, _, edge_if = hosts
    offloaded = "splitexit_edge_frames_total"

    def cut_link(edge, metrics):
        metrics.wait_for(offloaded, 20, [edge], path="offload")  # service is flowing
        sh("ip", "-n", edge_ns, "link", "set", edge_if, "down")
        metrics.wait_for("splitexit_edge_fallbacks_total", 5, [edge])  # the cut is felt
        cut.append(metrics.total(offloaded, path="offload"))
        sh("ip", "-n", edge_ns, "link", "set", edge_if, "up")
        metrics.wait_for(offloaded, cut[0] + 10, [edge], path="offload")  # and it resumes

    # 300 frames over 7.5 s, the link down from about 0.5 s of service to 5 fallbacks
    cut: list[float] = []
    done, metrics = stream(hosts, artifacts, keys, idx_dir, tmp_path, 40, 300,
                           during=cut_link)
    report("link down mid-stream", done, metrics)
    assert sorted(o["frame"] for o in done) == list(range(FRAMES))
    paths = Counter(o["path"] for o in done)
    assert paths["fallback"] >= 5 and paths["offload"] >= cut[0] + 10
    last_offload = max(o["capture_ts"] for o in done if o["path"] == "offload")
    last_fallback = max(o["capture_ts"] for o in done if o["path"] == "fallback")
    assert last_offload > last_fallback, "service did not resume after the link came back"


def test_a_slow_link_turns_into_deadline_fallbacks(hosts, artifacts, keys, idx_dir, tmp_path):
    edge_ns, _, edge_if = hosts
    # 8 kbit/s uplink: ~1 KB/s against ~50 requests/s of ~75 B (+TCP): the queue grows
    sh("tc", "-n", edge_ns, "qdisc", "add", "dev", edge_if, "root", "handle", "1:", "htb",
       "default", "10")
    sh("tc", "-n", edge_ns, "class", "add", "dev", edge_if, "parent", "1:", "classid", "1:10",
       "htb", "rate", "8kbit", "ceil", "8kbit")
    done, metrics = stream(hosts, artifacts, keys, idx_dir, tmp_path, 100, 200)
    report("uplink throttled to 8 kbit/s", done, metrics)
    assert sorted(o["frame"] for o in done) == list(range(FRAMES))
    reasons = Counter(o["reason"] for o in done if o["path"] == "fallback")
    assert reasons["deadline"] > 20, reasons
    assert all(o["latency_ms"] < 200 + 100 for o in done if o["path"] == "fallback")
