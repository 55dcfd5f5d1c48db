"""CurveZMQ: keys from `splitexit keys`, one allow-list folder per role on the broker;
clients with an unknown key get no service; plaintext only when asked for, and only on
loopback. (A key of one role refused at the other's socket: tests/test_hostile_peers.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from workers.config import BrokerConfig
from workers.broker import run_broker
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from pipeline.errors import ConfigError
from pipeline.protocol.security import Security, is_loopback
from tests.conftest import ROOT, free_port
from tests.test_cli import one_line_failure, splitexit
from tests.test_runtime import FRAMES
from workers.pool import ProcessGroup
from workers.config import WorkerConfig
from workers.tail_worker import run_worker


def test_keys_are_made_with_a_private_secret(keys):
    assert (keys / "edge.key").is_file()
    assert (keys / "edge.key_secret").stat().st_mode & 0o077 == 0  # secret stays private


def broker_security(keys) -> Security:
    return Security(secret=str(keys / "broker.key_secret"),
                    allow_edges=str(keys / "allow-edges"),
                    allow_workers=str(keys / "allow-workers"))


def run_system(artifacts, idx_dir, tmp_path, keys, worker_key, edge_key, observed):
    """Broker, one worker and one edge streaming 300 frames over ~3 s, over CURVE. The edge
    starts once the worker is confirmed by the broker or, for a worker with an unlisted key,
    once its handshake has failed."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = str(keys / "broker.key")
    broker_sec = broker_security(keys)
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


def test_loopback_means_every_address_libzmq_would_use_is_loopback():
    """libzmq reads tcp://SOURCE;HOST:PORT; a user@ or an interface name is not an address."""
    assert is_loopback("tcp://127.0.0.1:0;127.0.0.1:5555") and is_loopback("ipc:///tmp/b")
    for endpoint in ("tcp://127.0.0.1:0;10.0.0.5:1", "tcp://10.0.0.5:0;127.0.0.1:1",
                     "tcp://0.0.0.0@127.0.0.1:1", "tcp://user@localhost:1", "tcp://*:1",
                     "tcp://eth0:1", "tcp://127.0.0.1", "tcp://127.0.0.1:1;", "127.0.0.1:1",
                     "tcp://[::1]:x", "udp://127.0.0.1:1"):
        assert not is_loopback(endpoint), endpoint
    with pytest.raises(ConfigError, match="loopback only"):
        Security(insecure=True).check(["tcp://127.0.0.1:0;10.0.0.5:5555"], "edge")


def test_a_key_has_one_role_and_allow_lists_are_checked_at_start(keys, tmp_path):
    broker_security(keys).check(["tcp://0.0.0.0:1"], "broker")
    both = tmp_path / "workers"
    shutil.copytree(keys / "allow-workers", both)
    shutil.copy(keys / "edge.key", both)
    with pytest.raises(ConfigError, match="one role"):
        Security(secret=str(keys / "broker.key_secret"), allow_edges=str(keys / "allow-edges"),
                 allow_workers=str(both)).check(["tcp://0.0.0.0:1"], "broker")
    with pytest.raises(ConfigError, match="--allow-workers DIR"):
        Security(secret=str(keys / "broker.key_secret"),
                 allow_edges=str(keys / "allow-edges")).check(["tcp://0.0.0.0:1"], "broker")
    (both / "broken.key").write_text("not a key")
    with pytest.raises(ConfigError, match="broken.key"):
        Security(secret=str(keys / "broker.key_secret"), allow_edges=str(keys / "allow-edges"),
                 allow_workers=str(both)).check(["tcp://0.0.0.0:1"], "broker")


def test_the_old_allow_flag_and_a_key_in_both_folders_are_one_line_errors(keys, tmp_path):
    secret = str(keys / "broker.key_secret")
    r = splitexit("broker", "--broker-secret", secret, "--allow", str(keys / "allow-edges"))
    one_line_failure(r)
    assert "--allow-edges DIR" in r.stderr and "--allow-workers DIR" in r.stderr
    one_line_failure(splitexit("broker", "--broker-secret", secret, "--allow-edges",
                               str(keys / "allow-edges"), "--allow-workers",
                               str(keys / "allow-edges")))


WATCH_SECRET = """
import sys
from pipeline.protocol.security import create_keys
secret = sys.argv[1] + "/cam.key_secret"
modes = set()

def watch(event, args):
    # every operation Python audits (opens, writes' closes, chmods, ...) while keys are made
    if watching:
        import os, stat
        try:
            modes.add(stat.S_IMODE(os.stat(secret).st_mode))
        except FileNotFoundError:
            pass

watching = False
sys.addaudithook(watch)
watching = True
create_keys(sys.argv[1], "cam")
watching = False
print(sorted(modes))
"""


def test_a_secret_key_is_never_readable_by_others_and_never_silently_replaced(tmp_path):
    """Watched at every audited step while the pair is written (the old code wrote it 0644,
    then chmod 0600); a second `keys` for the same name fails without --force."""
    r = subprocess.run([sys.executable, "-c", WATCH_SECRET, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [0o600]
    secret = (tmp_path / "cam.key_secret").read_text()
    r = splitexit("keys", str(tmp_path), "--name", "cam")
    one_line_failure(r)
    assert "--force" in r.stderr and (tmp_path / "cam.key_secret").read_text() == secret
    r = splitexit("keys", str(tmp_path), "--name", "cam", "--force")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cam.key_secret").read_text() != secret
    assert (tmp_path / "cam.key_secret").stat().st_mode & 0o777 == 0o600
    one_line_failure(splitexit("keys", str(tmp_path), "--name", "../elsewhere"))
