"""Hostile entropy-coded requests, live against a real broker and tail worker (issue #25).

A sender mixes the worst messages a worker may legally be asked to decode with payloads over
the budget their header sets, while a valid edge client keeps sending. Decoding is linear and
budgeted, and a worker heartbeats between messages and between the frames the Python
fallback decodes, so: every request is answered by the worker it was given to (the broker
redelivers nothing: it never thought the worker dead), the valid client gets every answer,
and each over-budget message is refused and counted with its reason.

On the quadratic decoder one longest-code message of this 256-wide model held the worker for
7.7 s of CPU (the broker's liveness is 2 s): the broker declared it dead and redelivered, and
the over-budget messages were decoded and answered as if valid.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zmq

from benchmarks.decode_worst import longest_codes, message, worst_legal
from pipeline.floor import native
from pipeline.protocol import wire
from pipeline.protocol.wire import Codec, DType, Refusal
from tests.conftest import ROOT, free_port, train_bottleneck
from workers.broker import run_broker
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import ProcessGroup
from workers.tail_worker import run_worker

REDELIVERIES = "splitexit_broker_redeliveries_total"
VALID = 30          # the valid client's one-frame requests


@pytest.fixture(scope="module")
def wide_bottleneck(tmp_path_factory, idx_dir):
    """A bottleneck 256 wide sent as 4-bit codes (like the default's 400): 256 frames make
    65 536 coded features, enough for a quadratic decoder to take seconds."""
    return train_bottleneck(tmp_path_factory.mktemp("wide-bottleneck"), idx_dir,
                            "wide-bottleneck", [800, 40, 256, 20, 10], [2, 32, 5, 10], epochs=1)


def hostile(code, tag: bytes) -> tuple[list[bytes], list[bytes]]:
    """(legal worst cases, over-budget messages), each a request with its own msg_id."""
    def tagged(msg: bytes) -> bytes:
        return msg[:8] + tag + msg[12:]

    legal = [tagged(message(code, worst_legal(code, 256, rans), rans, 1000 + i))
             for i, rans in enumerate((False, True, False, True))]
    over = [tagged(message(code, longest_codes(code, 256), False, 2000 + i)) for i in range(3)]
    # within the byte budget, but bytes no encoder wrote: refused by the decoder itself
    rng = np.random.default_rng(0)
    garbage = bytearray(legal[1])
    garbage[-64:] = rng.bytes(64)
    over.append(tagged(bytes(garbage[:4]) + (3000).to_bytes(4, "little") + bytes(garbage[8:])))
    return legal, over


@pytest.mark.parametrize("decoders", ["native", "python"])
def test_hostile_decodes_neither_stall_the_worker_nor_starve_a_valid_client(
        wide_bottleneck, observed, monkeypatch, decoders):
    from pipeline.model.artifacts import load_server

    if decoders == "python":
        monkeypatch.setenv(native.DISABLE_ENV, "0")   # the worker runs the Python reference
    elif native.coder() is None:
        pytest.skip(native.coder_status())
    server = load_server(wide_bottleneck)
    code, tag = server.code, wire.model_tag(server.model_id)
    legal, over = hostile(code, tag)
    for msg in legal:  # the sizes a legal edge could have sent: under the packed codes
        assert len(msg) < wire.REQUEST_HEADER_BYTES + 512 + 256 * 128
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    group, ctx = ProcessGroup(), zmq.Context()
    try:
        # a queue timeout far beyond the test: a request is answered or redelivered, never
        # expired, whatever the machine's pace; the worker's liveness is the default 2 s
        broker = group.start("broker", run_broker, BrokerConfig(front, back,
                                                                queue_timeout_s=600.0))
        w0 = group.start("w0", run_worker, str(wide_bottleneck), WorkerConfig(back), "w0")
        observed.ready("worker", 1, [broker, w0])
        attacker, client = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock in (attacker, client):
            sock.linger = 0
            sock.connect(front)
        for msg in [m for pair in zip(over, legal) for m in pair]:
            attacker.send(msg)
        rng = np.random.default_rng(1)
        for i in range(VALID):
            x = np.maximum(rng.normal(size=(1, code.channels)), 0).astype(np.float32)
            client.send_multipart(wire.encode_request(i, tag, x, DType.UINT4, Codec.STATIC,
                                                      code))
        got: dict[str, dict[int, object]] = {"attacker": {}, "client": {}}

        def all_answered_or_redelivered() -> bool:
            for name, sock in (("attacker", attacker), ("client", client)):
                while sock.poll(0):
                    answer = wire.decode_answer(sock.recv_multipart())
                    got[name][answer.msg_id] = answer
            return (len(got["attacker"]) == len(legal) + len(over)
                    and len(got["client"]) == VALID) or observed.total(REDELIVERIES) > 0

        observed.wait("every request answered (or one redelivered)",
                      all_answered_or_redelivered, [broker, w0])
        assert observed.total(REDELIVERIES) == 0, "the worker went silent while decoding"
        assert all(isinstance(a, wire.Reply) for a in got["client"].values())
        assert sorted(got["client"]) == list(range(VALID))
        for msg in legal:
            answer = got["attacker"][wire.peek(msg)[1]]
            assert isinstance(answer, wire.Reply) and len(answer.classes) == 256
        for msg in over:
            answer = got["attacker"][wire.peek(msg)[1]]
            assert isinstance(answer, wire.Error) and answer.reason == Refusal.BAD_REQUEST
        bad = {reason: observed.total("splitexit_bad_messages_total", component="worker",
                                      reason=reason) for reason in ("size", "decompress")}
        assert bad == {"size": len(over) - 1, "decompress": 1}
        assert w0.is_alive() and broker.is_alive()
    finally:
        group.stop()
        ctx.destroy(linger=0)


def test_the_decode_benchmark_runs_in_its_quick_mode():
    done = subprocess.run([sys.executable, "-m", "benchmarks.decode_worst", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "worst legal, 256 frames (rans)" in done.stdout
    assert "refused: size" in done.stdout
