"""The broker and the edge producer in this process, on real sockets, each counting on a
registry of the test's own (client_python's pattern: a fresh CollectorRegistry, then
`get_sample_value`). No subprocesses, no stderr parsing."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from pipeline.edge.config import EdgeConfig
from pipeline.edge.async_edge import AsyncEdge
from pipeline.edge.sources import open_source
from pipeline.protocol import wire
from tests.conftest import free_port
from workers.broker import Broker
from workers.config import BrokerConfig
from workers.pool import wait_until

TIMEOUT_S = 60.0


def value(registry, name, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_broker_relays_and_counts_on_the_registry_it_is_given():
    registry, ctx = CollectorRegistry(), zmq.Context()
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    broker = Broker(BrokerConfig(front, back), ctx, registry)
    loop = threading.Thread(target=broker.run, daemon=True)
    loop.start()
    worker, edge = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        worker.identity = b"w0"
        worker.connect(back)
        worker.send_multipart(wire.encode_ready("w0", bytes(wire.MODEL_TAG_BYTES), credit=4))
        assert worker.poll(TIMEOUT_S * 1000)
        assert wire.decode_control(worker.recv_multipart()) == wire.Kind.HEARTBEAT  # confirmed
        assert value(registry, "splitexit_ready", role="broker") == 1

        edge.connect(front)
        tag = bytes(wire.MODEL_TAG_BYTES)
        edge.send_multipart(wire.encode_request(5, tag, np.ones((2, 40), np.float32)))
        assert worker.poll(TIMEOUT_S * 1000)
        edge_id, *request = worker.recv_multipart()
        assert len(wire.decode_request(request).features) == 2
        worker.send_multipart([edge_id] + wire.encode_reply(5, "w0", np.array([3, 4]),
                                                            np.array([0.9, 0.8]), 1, 2, 2))
        assert edge.poll(TIMEOUT_S * 1000)
        answer = wire.decode_answer(edge.recv_multipart())
        assert answer.msg_id == 5 and answer.classes.tolist() == [3, 4]
        edge.send_multipart([b"not a message", b""])
        wait_until(lambda: value(registry, "splitexit_bad_messages_total",
                                 component="broker_frontend", reason="malformed") == 1,
                   TIMEOUT_S, "the bad message counted")
    finally:
        broker.running = False
        loop.join(TIMEOUT_S)
        broker.close()
        worker.close(linger=0)
        edge.close(linger=0)
        ctx.term()
    assert value(registry, "splitexit_broker_requests_total", status="dispatched") == 1
    assert value(registry, "splitexit_broker_workers") == 1
    assert value(registry, "splitexit_ready", role="broker") == 0  # closed


def test_an_edge_finalizes_each_frame_once_when_the_server_answers_twice(artifacts, idx_dir):
    """A server that answers every request twice (as after a redelivery): the second answer
    is counted as a duplicate and changes nothing."""
    registry = CollectorRegistry()
    frames = 40

    async def scenario():
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        producer = AsyncEdge(str(artifacts), EdgeConfig(f"tcp://127.0.0.1:{port}", 30_000.0,
                                                        max_pack=1), ctx=ctx, registry=registry)
        source = open_source("dataset", limit=frames, data_dir=str(idx_dir))
        run = asyncio.create_task(producer.run(source))
        answered = 0
        while not run.done():
            if not await router.poll(50):
                continue  # no request now: look whether the producer has finished
            edge_id, *parts = await router.recv_multipart()
            r = wire.decode_request(parts)
            n = len(r.features)
            answer = wire.encode_reply(r.msg_id, "fake", np.zeros(n), np.ones(n), 0, 0, n)
            await router.send_multipart([edge_id] + answer)
            await router.send_multipart([edge_id] + answer)
            answered += 1
        summary = await run
        router.close(linger=0)
        ctx.term()
        return summary, answered

    summary, answered = asyncio.run(scenario())
    assert summary.frames == frames and answered > 0
    assert value(registry, "splitexit_edge_frames_total", producer="0", path="offload") \
        == summary.paths["offload"] == answered
    assert value(registry, "splitexit_edge_requests_total", producer="0",
                 status="answered") == answered
    # every second copy was discarded (those still in flight when the run ended are unread)
    assert 0 < value(registry, "splitexit_edge_duplicate_answers_total", producer="0") \
        <= answered
    assert value(registry, "splitexit_ready", role="edge") == 0  # the run is over
