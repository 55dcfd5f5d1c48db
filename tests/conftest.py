"""Shared fixtures: small generated IDX data sets and a tiny config, so the default suite
neither needs the Debian package nor minutes of training; and the one way tests wait on
other processes: on what their metrics say (`Observed`), never on a sleep. Two rules hold
for every test: it leaves no process running (`leaves_no_process`), and it never needs a
fixed port (`default_ports_taken` holds the defaults for the whole session)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from monitoring.exposition import METRICS_PORTS, MULTIPROC_ENV, multiprocess_registry, total
from pipeline.floor.data import write_idx
from pipeline.protocol.endpoints import BACKEND, FRONTEND
from workers.pool import START_TIMEOUT_S, STOP_TIMEOUT_S, NotReady, wait_until

ROOT = Path(__file__).resolve().parent.parent

# Every process this test run starts carries this mark in its environment (set here, at
# import, before any test runs: children, grandchildren and orphans re-parented to init all
# inherit it), so what a test leaves behind is found in /proc whoever its parent is now.
RUN_MARK = "SPLITEXIT_TEST_RUN"
os.environ[RUN_MARK] = f"{os.getpid()}-{uuid.uuid4().hex}"
# A process found after a test may be finishing a SIGTERM: it gets this long to leave.
LEFTOVER_GRACE_S = 2 * STOP_TIMEOUT_S
PROMETHEUS_PORT = 9090


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


def leftover_processes() -> dict[int, str]:
    """{pid: command line} of live processes marked with this run's RUN_MARK, other than
    pytest, its ancestors and pytest's own multiprocessing resource tracker (started once,
    by the first ProcessGroup a test makes in-process; it lives as long as pytest)."""
    me = os.getpid()
    skip = _ancestors(me)
    needle = f"\0{RUN_MARK}={os.environ[RUN_MARK]}\0".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            if needle not in b"\0" + (entry / "environ").read_bytes() + b"\0":
                continue
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError):
            continue   # gone meanwhile, or not ours to read
        if state in "ZX" or (int(ppid) == me and "multiprocessing.resource_tracker" in cmdline):
            continue
        found[int(entry.name)] = cmdline
    return found


@pytest.fixture(autouse=True)
def leaves_no_process():
    """A test fails (an error at its teardown) if a process it started is still running
    LEFTOVER_GRACE_S after it ended; those processes are killed and named."""
    yield
    if not leftover_processes():
        return
    try:
        wait_until(lambda: not leftover_processes(), LEFTOVER_GRACE_S, "leftovers to exit")
        return
    except NotReady:
        left = leftover_processes()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    pytest.fail(f"the test left {len(left)} process(es) running (killed now): "
                + "; ".join(f"{pid}: {cmd[:200]}" for pid, cmd in left.items()), pytrace=False)


def _port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


DEFAULT_PORTS = sorted({_port_of(FRONTEND), _port_of(BACKEND), *METRICS_PORTS.values(),
                        PROMETHEUS_PORT})


@pytest.fixture(scope="session", autouse=True)
def default_ports_taken():
    """Every default port (the broker's two, each command's metrics port, Prometheus') is
    bound by this process for the whole session, as another program on the machine might:
    a test that forgets to ask for a free port fails with "address in use", and a connect to
    one is refused. Bound, not listening, so no connection hangs on it. A port someone else
    holds already is taken anyway."""
    held = []
    for port in DEFAULT_PORTS:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            held.append(s)
        except OSError:
            s.close()
    yield [s.getsockname()[1] for s in held]
    for s in held:
        s.close()

TINY_CONFIG = """
[model]
name = "tiny"
input_size = 784
input_pad = 800
widths = [800, 40, 20, 10]
fan_out = [2, 10, 10]
split = 1
seed = 0

[train]
epochs = 2
batch_size = 64
val_fraction = 0.05        # 100 of the 2 000 generated training images
val_min = 50
seed = 0

[calibrate]
policy = "offload"
target_offload = 0.3
"""


def make_idx_dataset(folder: Path, n_train: int = 2000, n_test: int = 300, seed: int = 0,
                     gz: bool = True) -> Path:
    """Ten classes, each a random 28x28 prototype plus noise: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        noise = rng.normal(0, 50, size=(n, 28, 28))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
    return folder


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    return make_idx_dataset(tmp_path_factory.mktemp("idx"))


@pytest.fixture
def tiny_config_path(tmp_path, idx_dir) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG + f'\n[data]\ndir = "{idx_dir}"\n')
    return path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out below the kernel's ephemeral range, each once per session, from a start of
# this process's own (two suites at once rarely meet).
_PORT_LOW, _PORT_HIGH = 10000, _ephemeral_low()
_start = _PORT_LOW + os.getpid() * 7919 % (_PORT_HIGH - _PORT_LOW)
_next_ports = itertools.cycle([*range(_start, _PORT_HIGH), *range(_PORT_LOW, _start)])


def free_port() -> int:
    """A loopback port nobody listens on right now, and that the kernel will not give away:
    a port from bind(0) comes from the ephemeral range, which is also where the next outgoing
    connection (a ZeroMQ connect, a scrape) gets its own port, and under load one did take a
    port before the broker it was meant for bound it."""
    for port in _next_ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue   # in use (or lingering): the next one
            return port


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, idx_dir) -> Path:
    """A tiny model trained on the generated data; its exit offloads about half the frames."""
    from pipeline.model.config import load_config
    from pipeline.model.train import run

    out = tmp_path_factory.mktemp("art")
    cfg = load_config("paper-sparse", ["train.epochs=2", "train.val_fraction=0.1",
                                       "calibrate.target_offload=0.5", f"data.dir='{idx_dir}'"])
    run(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def bottleneck_artifacts(tmp_path_factory, idx_dir) -> Path:
    """A head whose exit reads its 40-wide layer, then an 8-wide bottleneck trained to be
    sent as 4-bit codes: the exit runs on every frame, the bottleneck only for offloads."""
    return train_bottleneck(tmp_path_factory.mktemp("bottleneck"), idx_dir, "bottleneck",
                            [800, 40, 8, 20, 10], [2, 2, 20, 10], epochs=2)


def train_bottleneck(out: Path, idx_dir: Path, name: str, widths: list[int],
                     fan_out: list[int], epochs: int) -> Path:
    """A paper-sparse head with its exit on layer 1 and its split on layer 2, a 4-bit uplink."""
    from pipeline.model.config import load_config
    from pipeline.model.train import run

    cfg = load_config("paper-sparse", [
        f"model.name='{name}'", f"model.widths={widths}", f"model.fan_out={fan_out}",
        "model.split=2", "model.exit_at=1", "model.uplink_bits=4", f"train.epochs={epochs}",
        "train.val_fraction=0.1", "calibrate.target_offload=0.5", f"data.dir='{idx_dir}'"])
    run(cfg, out, progress=False)
    return out


@pytest.fixture(scope="session")
def fashion_default(tmp_path_factory) -> Path:
    """The recommended default trained on the real Fashion-MNIST for 10 epochs (seconds with
    the native kernel); skips where Debian's dataset-fashion-mnist is not installed."""
    from pipeline.model.config import FASHION_MNIST_DIR, load_config
    from pipeline.model.train import run

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("fashion-default")
    run(load_config("default", ["train.epochs=10"]), out, progress=False)
    return out


@pytest.fixture(scope="session")
def default_layout(tmp_path_factory, idx_dir) -> Path:
    """The shipped default's layout -- 400 features sent as 4-bit codes, so a static code of
    400 x 16 symbols -- trained one epoch on the generated data (seconds): what its export
    weighs depends on the shapes, not on the weights."""
    from pipeline.model.config import load_config
    from pipeline.model.train import run

    out = tmp_path_factory.mktemp("default-layout")
    run(load_config("default", ["train.epochs=1", "train.val_fraction=0.1",
                                f"data.dir='{idx_dir}'"]), out, progress=False)
    return out


@pytest.fixture(scope="session")
def conv_sparse(tmp_path_factory, idx_dir) -> Path:
    """The shipped conv-sparse layout trained one epoch on the generated data (seconds): a conv
    head with trained weights and a calibrated threshold, for the exports. Its exit is pooled
    to 2x2 (256 inputs, not 3136) so that the int8 export's calibration stays quick."""
    from pipeline.model.config import load_config
    from pipeline.model.train import run

    out = tmp_path_factory.mktemp("conv-sparse")
    run(load_config("conv-sparse", ["train.epochs=1", "train.val_fraction=0.1", "model.exit_pool=2",
                                    f"data.dir='{idx_dir}'"]), out, progress=False)
    return out


@pytest.fixture(scope="session")
def dense_twin(tmp_path_factory, idx_dir) -> Path:
    """The paper's dense twin, one epoch on the generated data: exports compare like for like."""
    from pipeline.model.config import load_config
    from pipeline.model.train import run

    out = tmp_path_factory.mktemp("dense")
    run(load_config("paper-dense", ["train.epochs=1", "train.val_fraction=0.1",
                                    f"data.dir='{idx_dir}'"]), out, progress=False)
    return out


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Path:
    """broker, worker, edge and a stranger's CURVE key pairs made by `splitexit keys`;
    allow-edges/ lists the edge, allow-workers/ the worker."""
    folder = tmp_path_factory.mktemp("keys")
    for name in ("broker", "worker", "edge", "stranger"):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "keys", str(folder),
                            "--name", name], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    for role in ("edge", "worker"):
        allow = folder / f"allow-{role}s"
        allow.mkdir()
        shutil.copy(folder / f"{role}.key", allow)
    return folder


class Observed:
    """The metrics of every process a test spawns, read live from their files: what tests
    wait on before injecting a fault, and what they count afterwards."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.registry = multiprocess_registry(folder)

    def total(self, name: str, **labels: str) -> float:
        return total(self.registry, name, **labels)

    def wait(self, what: str, predicate, procs=(), timeout_s: float = START_TIMEOUT_S) -> None:
        wait_until(predicate, timeout_s, what, procs)

    def wait_for(self, name: str, at_least: float, procs=(), **labels: str) -> float:
        """Wait until a sample reaches `at_least`; returns the value seen."""
        self.wait(f"{name}{labels or ''} >= {at_least}",
                  lambda: self.total(name, **labels) >= at_least, procs)
        return self.total(name, **labels)

    def ready(self, role: str, n: int = 1, procs=()) -> None:
        self.wait_for("splitexit_ready", n, procs, role=role)

    def broker_and_worker(self, group, art: Path) -> tuple[str, object]:
        """A broker and one worker w0 on fresh loopback ports, started in `group`, returned
        once the broker confirmed the worker: (the edges' frontend, w0's process)."""
        from workers.broker import run_broker
        from workers.config import BrokerConfig, WorkerConfig
        from workers.tail_worker import run_worker

        front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        broker = group.start("broker", run_broker, BrokerConfig(front, back))
        w0 = group.start("w0", run_worker, str(art), WorkerConfig(back), "w0")
        self.ready("worker", 1, [broker, w0])
        return front, w0


@pytest.fixture
def observed(tmp_path, monkeypatch) -> Observed:
    """Processes started after this fixture write their metrics into a folder of this test's
    own (prometheus-client reads PROMETHEUS_MULTIPROC_DIR when a spawned child imports it)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))
    return Observed(folder)
