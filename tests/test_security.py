"""CurveZMQ: keys from `splitexit keys`, an allow-list folder on the broker; clients with an
unknown key get no service; plaintext only when asked for, and only on loopback."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from workers.config import BrokerConfig
from workers.broker import run_broker
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from pipeline.errors import ConfigError
from pipeline.protocol.security import Security, is_loopback
from tests.conftest import free_port
from tests.test_runtime import FRAMES
from workers.pool import ProcessGroup
from workers.config import WorkerConfig
from workers.tail_worker import run_worker


def test_keys_are_made_with_a_private_secret(keys):
    assert (keys / "edge.key").is_file()
    assert (keys / "edge.key_secret").stat().st_mode & 0o077 == 0  # secret stays private


def run_system(artifacts, idx_dir, tmp_path, keys, worker_key, edge_key, observed):
    """Broker, one worker and one edge streaming 300 frames over ~3 s, over CURVE. The edge
    starts once the worker is confirmed by the broker or, for a worker with an unlisted key,
    once its handshake has failed."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = str(keys / "broker.key")
    broker_sec = Security(secret=str(keys / "broker.key_secret"), allow=str(keys / "allow"))
    group = ProcessGroup()
    results = tmp_path / f"r-{time.monotonic_ns()}.jsonl"
    try:
        group.start("broker", run_broker, BrokerConfig(front, back, security=broker_sec))
        group.start("w0", run_worker, str(artifacts), WorkerConfig(
            back, security=Security(secret=str(keys / f"{worker_key}.key_secret"),
                                    server=server)), "w0")
        if worker_key == "stranger":
            observed.wait_for("splitexit_handshake_failures_total", 1, role="worker")
        else:
            observed.ready("worker")
        edge = group.start("edge", run_producer, str(artifacts), EdgeConfig(
            front, 500.0, results=str(results), security=Security(
                secret=str(keys / f"{edge_key}.key_secret"), server=server)),
            "dataset", 100.0, None, str(idx_dir))
        if edge_key == "stranger":
            observed.wait_for("splitexit_handshake_failures_total", 1, [edge], role="edge")
        group.wait([edge])
    finally:
        group.stop()
    return [json.loads(line) for line in results.read_text().splitlines()]


def test_allowed_keys_get_service_over_curve(artifacts, idx_dir, tmp_path, keys, observed):
    outcomes = run_system(artifacts, idx_dir, tmp_path, keys, "worker", "edge", observed)
    paths = Counter(o["path"] for o in outcomes)
    assert len(outcomes) == FRAMES and paths["offload"] > 0 and paths["fallback"] == 0


def test_an_edge_with_an_unknown_key_gets_no_service(artifacts, idx_dir, tmp_path, keys,
                                                     capfd, observed):
    outcomes = run_system(artifacts, idx_dir, tmp_path, keys, "worker", "stranger", observed)
    assert len(outcomes) == FRAMES  # still one (local) answer per frame
    assert not [o for o in outcomes if o["path"] == "offload"]
    # no connected peer: the send queue refuses at once ("unreachable"), or the deadline ends it
    assert {o["reason"] for o in outcomes if o["path"] == "fallback"} <= {"deadline",
                                                                           "unreachable"}
    assert "CURVE handshake with the broker failed" in capfd.readouterr().err


def test_a_worker_with_an_unknown_key_gets_no_work(artifacts, idx_dir, tmp_path, keys, capfd,
                                                   observed):
    outcomes = run_system(artifacts, idx_dir, tmp_path, keys, "stranger", "edge", observed)
    assert len(outcomes) == FRAMES
    assert not [o for o in outcomes if o["path"] == "offload"]
    assert "worker w0: CURVE handshake with the broker failed" in capfd.readouterr().err


def test_plaintext_only_when_asked_and_only_on_loopback(keys):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1")
    assert is_loopback("tcp://[::1]:5555") and not is_loopback("tcp://10.0.0.2:5555")
    Security(insecure=True).check(["tcp://127.0.0.1:5555"], "edge")
    with pytest.raises(ConfigError, match="loopback only"):
        Security(insecure=True).check(["tcp://0.0.0.0:5555"], "broker")
    with pytest.raises(ConfigError, match="no CURVE keys"):
        Security().check(["tcp://127.0.0.1:5555"], "edge")
    with pytest.raises(ConfigError, match="--curve-server"):
        Security(secret=str(keys / "edge.key_secret")).check(["tcp://10.0.0.2:1"], "edge")
    with pytest.raises(ConfigError, match="holds no secret key"):
        Security(secret=str(keys / "edge.key"), server=str(keys / "broker.key")).check(
            ["tcp://10.0.0.2:1"], "edge")
    # CURVE may cross hosts
    Security(secret=str(keys / "edge.key_secret"), server=str(keys / "broker.key")).check(
        ["tcp://10.0.0.2:5555"], "edge")
