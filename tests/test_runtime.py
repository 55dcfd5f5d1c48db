"""The offload runtime end to end: real processes (broker, workers, edges) over tcp on
loopback, artifacts trained on generated data."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model.artifacts import load_model
from workers.config import BrokerConfig
from workers.broker import run_broker
from pipeline.model.config import load_config
from pipeline.floor.data import load_dataset
from pipeline.edge.config import EdgeConfig
from pipeline.edge.producer import run_producer
from pipeline.model.train import run
from pipeline.model.unfamiliar_fit import activations, tail_answers
from tests.conftest import free_port
from workers.pool import ProcessGroup
from workers.config import WorkerConfig
from workers.tail_worker import run_worker

FRAMES = 300  # the generated test split


@pytest.fixture
def system(tmp_path, observed):
    """Start/stop helper: a broker and workers on fresh ports; stops everything at the end."""
    group = ProcessGroup()

    class System:
        frontend = f"tcp://127.0.0.1:{free_port()}"
        backend = f"tcp://127.0.0.1:{free_port()}"

        def broker(self, **kw):
            return group.start("broker", run_broker, BrokerConfig(self.frontend, self.backend,
                                                                  **kw))

        def workers(self, artifacts, n, **kw):
            """n workers, returned once the broker has confirmed each of them."""
            procs = [group.start(f"w{i}", run_worker, str(artifacts),
                                 WorkerConfig(self.backend, **kw), f"w{i}") for i in range(n)]
            observed.ready("worker", n, procs)
            return procs

        def edge(self, artifacts, source="dataset", results=None, data_dir=None, **kw):
            results = results or tmp_path / f"edge-{time.monotonic_ns()}.jsonl"
            proc = group.start("edge", run_producer, str(artifacts),
                               EdgeConfig(self.frontend, results=str(results), **kw),
                               source, None, None, data_dir)
            group.wait([proc])
            assert proc.exitcode == 0
            return [json.loads(line) for line in Path(results).read_text().splitlines()]

    yield System()
    group.stop()


def test_every_frame_gets_one_answer_and_two_workers_share_the_load(system, artifacts,
                                                                     idx_dir):
    system.broker()
    system.workers(artifacts, 2)
    outcomes = system.edge(artifacts, data_dir=str(idx_dir), dtype="float32", codec="none",
                           deadline_ms=2000)
    frames = [o["frame"] for o in outcomes]
    assert sorted(frames) == list(range(FRAMES))  # exactly one final answer per frame
    paths = Counter(o["path"] for o in outcomes)
    assert paths["fallback"] == 0 and paths["offload"] > 50 and paths["exit"] > 50
    workers = Counter(o["worker"] for o in outcomes if o["path"] == "offload")
    assert set(workers) == {"w0", "w1"} and min(workers.values()) > 10

    # Offloaded answers equal the in-process head + tail for the same frame.
    data = load_dataset(idx_dir)
    exit_answers, tail_answers = in_process(artifacts, data.test.images)
    for o in outcomes:
        expected = tail_answers if o["path"] == "offload" else exit_answers
        assert o["cls"] == expected[o["frame"]], o
        assert o["label"] == int(data.test.labels[o["frame"]])


def in_process(artifacts: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the exit's classes, the tail's answers) of the in-process model for these frames: a
    tail answer is its class, or unknown (-1) where its unfamiliarity score flags the frame."""
    model, _, server = load_model(artifacts)
    acts = activations(model, images.astype(np.float32) / 255)   # the tail as the wire feeds it
    return acts.exit_logits.argmax(1), tail_answers(acts, server.unfamiliarity)


def test_int8_features_on_the_wire_cost_little_accuracy(system, artifacts, idx_dir):
    system.broker()
    system.workers(artifacts, 1)
    outcomes = system.edge(artifacts, data_dir=str(idx_dir), dtype="int8", deadline_ms=2000)
    offloaded = [o for o in outcomes if o["path"] == "offload"]
    assert len(outcomes) == FRAMES and offloaded
    assert all(o["uplink_bytes"] <= 40 + 60 for o in offloaded)  # 40 int8 values + header
    model, _, _ = load_model(artifacts)
    data = load_dataset(idx_dir)
    with torch.inference_mode():
        _, final_logits = model(torch.from_numpy(data.test.images).float() / 255)
    agree = np.mean([o["cls"] == int(final_logits[o["frame"]].argmax()) for o in offloaded])
    assert agree >= 0.95


def test_a_bottleneck_trained_for_4_bits_is_answered_as_trained(system, bottleneck_artifacts,
                                                                 idx_dir):
    """The exit reads the wide layer; offloaded frames run the 8-wide bottleneck and go up as
    4-bit codes (the model's trained uplink, picked by --dtype auto): 4 bytes of payload,
    answered exactly as the in-process model, whose tail trained on those codes."""
    system.broker()
    system.workers(bottleneck_artifacts, 1)
    outcomes = system.edge(bottleneck_artifacts, data_dir=str(idx_dir), deadline_ms=2000)
    offloaded = [o for o in outcomes if o["path"] == "offload"]
    assert len(outcomes) == FRAMES and len(offloaded) > 50
    _, tail_answers = in_process(bottleneck_artifacts, load_dataset(idx_dir).test.images)
    assert all(o["cls"] == tail_answers[o["frame"]] for o in offloaded)
    single = [o["uplink_bytes"] for o in offloaded]
    assert min(single) < 40 + 60  # 4 payload bytes + a scale + the header, all frames


def test_a_worker_refuses_another_models_features(system, artifacts, idx_dir, tmp_path):
    other = tmp_path / "other"
    cfg = load_config("paper-sparse", ["train.epochs=1", "train.val_fraction=0.1", "train.seed=5",
                                       "calibrate.target_offload=1.0", f"data.dir='{idx_dir}'"])
    run(cfg, other, progress=False)
    system.broker()
    system.workers(artifacts, 1)
    outcomes = system.edge(other, data_dir=str(idx_dir), deadline_ms=2000)
    assert len(outcomes) == FRAMES
    assert all(o["path"] == "fallback" and o["reason"] == "wrong_model" for o in outcomes)


def test_features_coded_for_another_model_are_wrong_model_not_bad_bytes(system, artifacts):
    """The worker's model has no static code; features coded with another model's code are
    refused as that model's, from the header, before the payload is read."""
    import zmq

    from pipeline.protocol import wire
    from pipeline.floor.static_code import StaticCode

    system.broker()
    system.workers(artifacts, 1)
    code = StaticCode(np.array([[2045, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1, 1, 1,
                                 1]] * 40))
    [msg] = wire.encode_request(3, bytes(4), np.zeros((2, 40), np.float32), wire.DType.UINT4,
                                wire.Codec.STATIC, code)
    ctx = zmq.Context()
    edge = ctx.socket(zmq.DEALER)
    edge.linger = 0
    try:
        edge.connect(system.frontend)
        edge.send(msg)
        assert edge.poll(60_000), "no answer from the worker"
        answer = wire.decode_answer(edge.recv_multipart())
        assert isinstance(answer, wire.Error) and answer.reason == wire.Refusal.WRONG_MODEL
    finally:
        edge.close()
        ctx.term()


def test_a_full_queue_answers_busy_at_once(system, artifacts, idx_dir):
    system.broker(max_queue=4, queue_timeout_s=60.0)  # no workers: nothing drains the queue
    outcomes = system.edge(artifacts, data_dir=str(idx_dir), deadline_ms=3000, max_pack=1)
    reasons = Counter(o["reason"] for o in outcomes if o["path"] == "fallback")
    offloaded = sum(o["path"] != "exit" for o in outcomes)
    assert len(outcomes) == FRAMES
    assert reasons["busy"] == offloaded - 4 and reasons["deadline"] == 4  # queue held 4
    busy_ms = [o["latency_ms"] for o in outcomes if o["reason"] == "busy"]
    deadline_ms = [o["latency_ms"] for o in outcomes if o["reason"] == "deadline"]
    assert max(busy_ms) < 1000 <= 2900 <= min(deadline_ms)  # BUSY at once, not at the deadline


def test_no_broker_means_local_answers_after_the_deadline(system, artifacts, idx_dir):
    outcomes = system.edge(artifacts, data_dir=str(idx_dir), deadline_ms=50)
    assert len(outcomes) == FRAMES
    assert {o["reason"] for o in outcomes if o["path"] == "fallback"} == {"deadline"}


def test_a_video_file_is_a_source(system, artifacts, tmp_path):
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(12):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    system.broker()
    system.workers(artifacts, 1)
    outcomes = system.edge(artifacts, source=str(video), deadline_ms=2000)
    assert sorted(o["frame"] for o in outcomes) == list(range(12))
    assert all(o["label"] is None and o["source"] == str(video) for o in outcomes)


def test_sigterm_drains_a_worker_and_the_other_takes_over(system, artifacts, idx_dir, tmp_path,
                                                          observed):
    system.broker()
    w0, w1 = system.workers(artifacts, 2)  # ready: their SIGTERM handlers are installed
    results = tmp_path / "drain.jsonl"
    group = ProcessGroup()
    edge = group.start("edge", run_producer, str(artifacts),
                       EdgeConfig(system.frontend, 5000.0, results=str(results), max_pack=1),
                       "dataset", 60.0, None, str(idx_dir))  # 300 frames over ~5 s
    observed.wait_for("splitexit_worker_requests_total", 5, [edge], worker="w0", status="ok")
    w0.terminate()  # SIGTERM mid-stream: drain
    w0.join(60)
    drained_at = time.time()
    assert w0.exitcode == 0 and w1.is_alive()
    group.wait([edge])
    outcomes = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(o["frame"] for o in outcomes) == list(range(FRAMES))
    assert not [o for o in outcomes if o["path"] == "fallback"]
    after = [o for o in outcomes if o["path"] == "offload" and o["capture_ts"] > drained_at]
    assert after and {o["worker"] for o in after} == {"w1"}
