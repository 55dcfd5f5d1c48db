"""The C device edge (examples/c_edge/edge.c), built with the README's command against an
exported edge and libzmq, run as a process against a real broker and worker: every frame one
answer, the Python edge's answers on the same frames, the deadline fallback when the
worker stops mid-stream (late answers dropped, not a second answer), and frames the head's
unfamiliarity score flags: sent to the server, never answered locally, `unknown` when no
answer comes."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline import Edge
from pipeline.export.export_c import export_c
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.floor.data import load_dataset, load_test_split
from pipeline.protocol.security import Security
from tests.conftest import ROOT, free_port
from tests.unfamiliar_artifacts import scored_artifact
from workers.broker import run_broker
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import START_TIMEOUT_S, ProcessGroup, wait_until
from workers.tail_worker import run_worker

CC = shutil.which("cc") or shutil.which("gcc")
EXAMPLE = ROOT / "examples" / "c_edge"
GENEROUS_MS = 60_000      # no fallback on 2 busy cores: every answer is the server's or local
WHERE = {"exit": "local", "offload": "server", "fallback": "fallback"}   # Python's path names
SUMMARY = re.compile(r"I: (\d+) frames: (\d+) local, (\d+) server, (\d+) fallback; "
                     r"(\d+) late answers dropped, (\d+) bad; (\d+) unfamiliar, "
                     r"(\d+) answered unknown")
UNKNOWN = -1              # SPLITEXIT_UNKNOWN: the class edge.c prints as `unknown`


def readme_build_line() -> str:
    """The build command the example's README gives (the test builds with exactly it)."""
    text = (EXAMPLE / "README.md").read_text()
    [line] = [line for line in text.splitlines() if line.startswith("cc ")]
    return line


def libzmq_missing(tmp: Path) -> str | None:
    """Why the example cannot be built here (a skip reason), or None."""
    if CC is None:
        return "no C compiler (cc/gcc) on this machine"
    probe = tmp / "probe.c"
    probe.write_text("#include <zmq.h>\nint main(void) { return zmq_has(\"curve\") ? 0 : 1; }\n")
    r = subprocess.run([CC, str(probe), "-lzmq", "-o", str(tmp / "probe")], capture_output=True)
    if r.returncode:
        return "libzmq headers missing: apt-get install libzmq3-dev"
    if subprocess.run([str(tmp / "probe")]).returncode:
        return "this libzmq has no CURVE"
    return None


@pytest.fixture(scope="module")
def c_edge(bottleneck_artifacts, tmp_path_factory) -> Path:
    """The example built strictly against the export of a coded 4-bit uplink (the default's
    kind of edge: bottleneck, static code)."""
    return built(bottleneck_artifacts, tmp_path_factory)


def built(art: Path, tmp_path_factory) -> Path:
    """The example built with the README's command, strictly, against art's export."""
    missing = libzmq_missing(tmp_path_factory.mktemp("probe"))
    out = tmp_path_factory.mktemp("c-edge")
    if missing:
        pytest.skip(missing)
    export_c(art, out)
    command = CC + readme_build_line()[len("cc"):] + " -Wextra -pedantic -Werror"
    r = subprocess.run(["sh", "-c", command],
                       cwd=ROOT, env={**os.environ, "EDGE": str(out)}, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return out / "edge"


@pytest.fixture(scope="module")
def frames(idx_dir) -> np.ndarray:
    """The generated test split (300 frames), uint8, as a device reads them."""
    return load_test_split(idx_dir).images.reshape(-1, 784)


def parse(stdout: str) -> dict[int, tuple]:
    """{frame: (where, class, confidence, reason)}, class `unknown` as UNKNOWN; fails on a
    frame answered twice."""
    answers = {}
    for line in stdout.splitlines():
        frame, cls, where, confidence, *reason = line.split()
        assert int(frame) not in answers, f"frame {frame} answered twice"
        answers[int(frame)] = (where, UNKNOWN if cls == "unknown" else int(cls),
                               float(confidence), reason[0] if reason else None)
    return answers


def exit_answers(art: Path, frames: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(local, class, confidence, unfamiliar) of the NumPy edge on each frame: local where
    the exit is sure and the unfamiliarity score does not flag the frame; the class is the
    exit's, or UNKNOWN for a flagged frame (its fallback)."""
    head = load_numpy_head(art)
    logits, hidden = head.run_exit(frames.astype(np.float32) / np.float32(255))
    scores = exit_scores(logits, head.score, head.temperature)
    flags = head.unfamiliar(hidden)[1]
    return (scores >= head.threshold) & ~flags, np.where(flags, UNKNOWN, logits.argmax(1)), \
        scores, flags


def start_pool(group: ProcessGroup, art: Path, observed, broker=Security(insecure=True),
               worker=Security(insecure=True), **worker_settings) -> tuple[str, object]:
    """A broker and one worker w0 on fresh ports, once the broker confirmed w0."""
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    b = group.start("broker", run_broker, BrokerConfig(front, back, security=broker,
                                                       queue_timeout_s=GENEROUS_MS / 1000))
    w0 = group.start("w0", run_worker, str(art),
                     WorkerConfig(back, security=worker, **worker_settings), "w0")
    observed.ready("worker", 1, [b, w0])
    return front, w0


def test_the_c_edge_answers_as_the_python_edge_through_a_curve_broker(
        c_edge, bottleneck_artifacts, frames, keys, observed):
    """Both edges, one after the other, send the same 300 frames through one CURVE broker to
    one worker; every frame gets one answer from each, the same: local where the exit is
    sure (same class and score), else the worker's (same class and float16 confidence). The
    worker runs one request a batch, so an answer cannot depend on what shared its batch."""
    edge_key = Security(secret=str(keys / "edge.key_secret"), server=str(keys / "broker.key"))
    group = ProcessGroup()
    try:
        front, _ = start_pool(
            group, bottleneck_artifacts, observed,
            broker=Security(secret=str(keys / "broker.key_secret"),
                            allow_edges=str(keys / "allow-edges"),
                            allow_workers=str(keys / "allow-workers")),
            worker=Security(secret=str(keys / "worker.key_secret"),
                            server=str(keys / "broker.key")), max_batch=1)
        r = subprocess.run([str(c_edge), "--deadline-ms", str(GENEROUS_MS), "--curve-secret",
                            edge_key.secret, "--curve-server", edge_key.server, front],
                           input=frames.tobytes(), capture_output=True,
                           timeout=GENEROUS_MS / 1000 + START_TIMEOUT_S)
        with Edge(bottleneck_artifacts, broker=front, deadline_ms=GENEROUS_MS, max_pack=1,
                  security=edge_key, registry=CollectorRegistry()) as python_edge:
            futures = [python_edge.submit(f.astype(np.float32) / np.float32(255))
                       for f in frames]
            python = [f.result() for f in futures]
        stranger = stranger_is_told(c_edge, front, keys, frames[:20])
    finally:
        group.stop()
    assert r.returncode == 0, r.stderr
    c = parse(r.stdout.decode())
    assert sorted(c) == list(range(len(frames)))
    for o in python:
        where, cls, confidence, _ = c[o.frame]
        assert (where, cls) == (WHERE[o.path], o.cls), o
        assert confidence == pytest.approx(o.confidence, abs=2e-6), o
    paths = Counter(where for where, *_ in c.values())
    assert paths["local"] > 0 and paths["server"] > 0 and set(paths) == {"local", "server"}
    summary = SUMMARY.search(r.stderr.decode())
    flagged = int(exit_answers(bottleneck_artifacts, frames)[3].sum())
    unknown = sum(cls == UNKNOWN for _, cls, *_ in c.values())
    assert summary and [int(n) for n in summary.groups()] == [
        len(frames), paths["local"], paths["server"], 0, 0, 0, flagged, unknown]
    sure, exit_cls, _, _ = exit_answers(bottleneck_artifacts, frames[:len(stranger)])
    assert sorted(stranger) == list(range(len(sure)))
    for i, (where, cls, _, reason) in stranger.items():   # the exit's answers, nothing more
        expected = ("local", None) if sure[i] else ("fallback", "deadline")
        assert (where, reason, cls) == (*expected, exit_cls[i]), i


def stranger_is_told(c_edge: Path, front: str, keys: Path, frames: np.ndarray) -> dict:
    """An edge whose key the broker does not allow: one line says so (libzmq retries, the
    line is not repeated); SIGTERM with stdin still open ends it cleanly once nothing is
    out. Returns its answers (parse)."""
    edge = subprocess.Popen([str(c_edge), "--deadline-ms", "300", "--curve-secret",
                             str(keys / "stranger.key_secret"), "--curve-server",
                             str(keys / "broker.key"), front], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = Lines(edge)
        edge.stdin.write(frames.tobytes())
        edge.stdin.flush()
        lines.take(lines.err, lines.err_lines, 1, edge)
        lines.take(lines.out, lines.out_lines, len(frames), edge)
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(timeout=START_TIMEOUT_S) == 0
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait()
    lines.drain()
    assert lines.err_lines[0].startswith("E: CURVE handshake with the broker failed")
    assert sum("handshake" in line for line in lines.err_lines) == 1
    return parse("".join(lines.out_lines))


class Lines:
    """A process's stdout and stderr lines as they come (threads: neither pipe fills)."""

    def __init__(self, proc: subprocess.Popen):
        self.out, self.err = queue.Queue(), queue.Queue()
        self.out_lines, self.err_lines = [], []
        for pipe, q in ((proc.stdout, self.out), (proc.stderr, self.err)):
            threading.Thread(target=lambda p=pipe, q=q: [q.put(x.decode()) for x in p],
                             daemon=True).start()

    def take(self, q: queue.Queue, into: list, n: int, proc) -> list[str]:
        """Wait until `into` holds n lines (the timeout bounds a wait that will never end)."""
        wait_until(lambda: _drain(q, into) >= n, START_TIMEOUT_S, f"{n} lines", [proc])
        return into

    def drain(self) -> None:
        """After the process ended: whatever its pipes still held."""
        _drain(self.out, self.out_lines)
        _drain(self.err, self.err_lines)


def _drain(q: queue.Queue, into: list) -> int:
    while True:
        try:
            into.append(q.get_nowait())
        except queue.Empty:
            return len(into)


def test_a_paused_worker_gives_the_unsure_frames_their_fallback_once(
        c_edge, bottleneck_artifacts, frames, observed):
    """Frames 0-149 with the worker up; then the worker stops (SIGSTOP) and frames 150-299
    come: each unsure one falls back at its deadline with the exit's answer, exactly once.
    The worker resumes, and the answers it (or the broker) then sends for those requests
    reach the edge late and are dropped, not printed as a second answer."""
    art = bottleneck_artifacts
    sure, exit_cls, exit_conf, _ = exit_answers(art, frames)
    half = len(frames) // 2
    group = ProcessGroup()
    edge = None
    try:
        front, w0 = start_pool(group, art, observed)
        edge = subprocess.Popen([str(c_edge), "--deadline-ms", "400", "-v", front],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        lines = Lines(edge)
        edge.stdin.write(frames[:half].tobytes())
        edge.stdin.flush()
        observed.wait_for("splitexit_worker_requests_total", 1, [w0, edge], worker="w0",
                          status="ok")   # traffic flows
        lines.take(lines.out, lines.out_lines, half, edge)
        os.kill(w0.pid, signal.SIGSTOP)
        try:
            edge.stdin.write(frames[half:].tobytes())
            edge.stdin.flush()
            lines.take(lines.out, lines.out_lines, len(frames), edge)
        finally:
            os.kill(w0.pid, signal.SIGCONT)
        late = lines.take(lines.err, lines.err_lines, 1, edge)   # a late answer came
        edge.stdin.close()
        assert edge.wait(timeout=START_TIMEOUT_S) == 0
    finally:
        if edge is not None and edge.poll() is None:
            edge.kill()
            edge.wait()
        group.stop()
    lines.drain()
    answers = parse("".join(lines.out_lines))
    assert sorted(answers) == list(range(len(frames)))
    for i, (where, cls, confidence, reason) in answers.items():
        if sure[i]:
            assert (where, cls) == ("local", exit_cls[i]), i
        elif i >= half:   # sent while the worker was stopped
            assert (where, cls, reason) == ("fallback", exit_cls[i], "deadline"), i
        else:
            assert where in ("server", "fallback"), i
        if where != "server":
            assert confidence == pytest.approx(exit_conf[i], abs=2e-6)
    assert not sure[half:].all()   # the fallback was taken
    late = [line for line in lines.err_lines if line.startswith("I: a late answer")]
    summary = SUMMARY.search("".join(lines.err_lines))
    assert late and summary, lines.err_lines
    assert int(summary.group(1)) == len(frames) and int(summary.group(5)) == len(late)


@pytest.mark.parametrize("args, message", [
    (["--deadline-ms", "0"], "--deadline-ms takes milliseconds"),
    (["--deadline-ms", "soon"], "--deadline-ms takes milliseconds"),
    (["--deadline-ms"], "--deadline-ms needs a value"),
    (["--curve-secret", "k.key_secret"], "--curve-secret and --curve-server go together"),
    (["--frames", "3"], "unknown option --frames"),
    (["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], "one ENDPOINT only"),
    (["nowhere"], "cannot connect to nowhere"),
    (["--curve-secret", "/nonexistent.key_secret", "--curve-server", "b.key"],
     "cannot read CURVE key /nonexistent.key_secret"),
])
def test_bad_arguments_are_one_line(c_edge, args, message):
    r = subprocess.run([str(c_edge), *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=START_TIMEOUT_S)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"E: {message}") and r.stderr.count("\n") == 1, r.stderr


@pytest.fixture(scope="module")
def scored_edge(bottleneck_artifacts, idx_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, edge): the bottleneck with an unfamiliarity score (full form, flagging 5 %
    of its validation frames), and the example built against its export."""
    data = load_dataset(idx_dir, val_fraction=0.1)
    art = scored_artifact(bottleneck_artifacts, tmp_path_factory.mktemp("scored"), data.train,
                          data.val, "full")
    return art, built(art, tmp_path_factory)


def test_unfamiliar_frames_go_to_the_server_and_fall_back_unknown(scored_edge, frames,
                                                                 observed):
    """Familiar frames and frames of other kinds (inverted, noise), 200 in all. With a
    worker: every frame the score flags is the server's to answer, never the device's (a
    class, or `unknown` if the server's own score flags it). With no broker listening:
    every request falls back, a flagged frame's answer `unknown`, the others the exit's."""
    art, edge = scored_edge
    noise = np.random.default_rng(0).integers(0, 256, (50, frames.shape[1]), dtype=np.uint8)
    mixed = np.concatenate([frames[:100], 255 - frames[:50], noise])
    local, cls, confidence, flags = exit_answers(art, mixed)
    head = load_numpy_head(art)
    sure = confidence >= head.threshold     # flagged frames the exit alone would answer
    assert 0 < flags.sum() < len(mixed) and local.any() and (flags & sure).any()
    group = ProcessGroup()
    try:
        front, _ = start_pool(group, art, observed, max_batch=1)
        served = subprocess.run([str(edge), "--deadline-ms", str(GENEROUS_MS), front],
                                input=mixed.tobytes(), capture_output=True,
                                timeout=GENEROUS_MS / 1000 + START_TIMEOUT_S)
    finally:
        group.stop()
    nobody = subprocess.run([str(edge), "--deadline-ms", "200",
                             f"tcp://127.0.0.1:{free_port()}"], input=mixed.tobytes(),
                            capture_output=True, timeout=START_TIMEOUT_S)
    assert served.returncode == 0 and nobody.returncode == 0, (served.stderr, nobody.stderr)
    for run, remote in ((served, "server"), (nobody, "fallback")):
        answers = parse(run.stdout.decode())
        assert sorted(answers) == list(range(len(mixed)))
        for i, (where, c, _, reason) in answers.items():
            if local[i]:
                assert (where, c) == ("local", cls[i]), i
            elif remote == "server":
                assert where == "server" and (c == UNKNOWN or 0 <= c < len(head.classes)), i
            else:
                assert (where, c) == ("fallback", cls[i]) and reason in (
                    "deadline", "unreachable"), i
        summary = SUMMARY.search(run.stderr.decode())
        unknown = sum(c == UNKNOWN for _, c, *_ in answers.values())
        assert summary and int(summary.group(7)) == flags.sum(), run.stderr
        assert int(summary.group(8)) == unknown
    assert unknown == flags.sum()    # with nobody to ask, exactly the flagged frames
