"""The exported C edge step (pipeline/export/edge_step.c + export_edge.py), compiled with cc:
its decisions and its REQUEST bytes against the Python edge's for the same frame and message
id, its quantizer and coder bit for bit on the same features, and its answer decoding
against wire.decode_answer on valid and broken messages."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.edge.config import AUTO, wire_codec, wire_dtype
from pipeline.export.export_c import C_FILE, export_c
from pipeline.export.export_edge import EDGE_FILES, EDGE_H, STEP_C
from pipeline.edge.inflight import reply_fault
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.model.config import FASHION_MNIST_DIR
from pipeline.floor.data import load_dataset, load_test_split
from pipeline.protocol import wire
from tests.test_cli import splitexit
from tests.unfamiliar_artifacts import scored_artifact, unscored_artifact

CC = shutil.which("cc") or shutil.which("gcc")
CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) on this machine")
STRICT = ["-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror"]
FLOATS = ctypes.POINTER(ctypes.c_float)
BUFFER = 1 << 16
UNKNOWN = -1                                  # SPLITEXIT_UNKNOWN


class Decision(ctypes.Structure):
    _fields_ = [("offload", ctypes.c_int32), ("cls", ctypes.c_int32),
                ("confidence", ctypes.c_double), ("bytes", ctypes.c_size_t),
                ("unfamiliarity", ctypes.c_double), ("unfamiliar", ctypes.c_int32)]


class Answer(ctypes.Structure):
    _fields_ = [("msg_id", ctypes.c_uint32), ("cls", ctypes.c_int32),
                ("confidence", ctypes.c_float), ("refusal", ctypes.c_int32),
                ("queued", ctypes.c_uint16), ("free_credit", ctypes.c_uint16)]


class CEdge:
    """The exported edge of one artifact, built strictly into a shared library."""

    def __init__(self, art, out, variant: str = "float32"):
        paths = export_c(art, out, variant)
        assert {p.name for p in paths} >= set(EDGE_FILES)
        subprocess.run([CC, *STRICT, "-shared", "-fPIC", "-o", str(out / "edge.so"),
                        str(out / C_FILE), str(out / STEP_C), "-lm"], check=True,
                       capture_output=True)
        self.lib = lib = ctypes.CDLL(str(out / "edge.so"))
        lib.splitexit_edge_step.restype = ctypes.c_int
        lib.splitexit_encode_request.restype = ctypes.c_int64
        lib.splitexit_exit_score.restype = ctypes.c_double
        lib.splitexit_decode_answer.restype = ctypes.c_int
        self.out = (ctypes.c_uint8 * BUFFER)()
        self.head = load_numpy_head(art)
        self.tag = wire.model_tag(self.head.model_id)
        self.dtype = wire_dtype(AUTO, self.head.uplink_bits)
        self.codec = wire_codec(AUTO, self.dtype, self.head.code)
        self.header = (out / EDGE_H).read_text()

    def step(self, pixels: np.ndarray, msg_id: int) -> tuple[Decision, bytes]:
        d = Decision()
        frame = np.ascontiguousarray(pixels, np.float32)
        rc = self.lib.splitexit_edge_step(frame.ctypes.data_as(FLOATS), ctypes.c_uint32(msg_id),
                                          self.out, ctypes.c_size_t(BUFFER), ctypes.byref(d))
        assert rc == 0
        return d, bytes(self.out[:d.bytes])

    def encode(self, features: np.ndarray, msg_id: int) -> bytes:
        row = np.ascontiguousarray(features, np.float32)
        n = self.lib.splitexit_encode_request(row.ctypes.data_as(FLOATS), ctypes.c_uint32(msg_id),
                                              self.out, ctypes.c_size_t(BUFFER))
        assert n > 0
        return bytes(self.out[:n])

    def features(self, pixels: np.ndarray) -> np.ndarray:
        features = np.zeros(self.head.width, np.float32)
        logits = np.zeros(self.head.exit.bias.shape[0], np.float32)
        frame = np.ascontiguousarray(pixels, np.float32)
        self.lib.splitexit_head(frame.ctypes.data_as(FLOATS), features.ctypes.data_as(FLOATS),
                                logits.ctypes.data_as(FLOATS))
        return features

    def python_request(self, features: np.ndarray, msg_id: int) -> bytes:
        """What the Python edge sends for one frame's features (producer._handle)."""
        [request] = wire.encode_request(msg_id, self.tag, features.reshape(1, -1), self.dtype,
                                        self.codec, self.head.code)
        return request

    def decode(self, message: bytes) -> tuple[int, Answer]:
        a = Answer()
        data = (ctypes.c_uint8 * max(1, len(message))).from_buffer_copy(message or b"\0")
        return self.lib.splitexit_decode_answer(data, ctypes.c_size_t(len(message)),
                                                ctypes.byref(a)), a


def test_the_c_edge_answers_and_sends_what_the_python_edge_does_on_fashion_mnist(
        fashion_default, tmp_path):
    """All 10 000 test frames, one frame per request, message id = frame + 1: the same
    decision (offload or local, with its class) on every frame; the C quantizer, coder and
    header give Python's bytes bit for bit on the same features; and the whole step's bytes
    equal the Python edge's on every frame (both fold the standardization into layer 0: with
    it unfolded, 2 of ~3 800 requests differed, a last-bit difference across a rounding)."""
    edge = CEdge(fashion_default, tmp_path)
    head = edge.head
    pixels = load_test_split(FASHION_MNIST_DIR).images.astype(np.float32).reshape(-1, 784) / 255
    offloads, differ, near = 0, [], 0
    for i, frame in enumerate(pixels):
        msg_id = i + 1
        logits, hidden = head.run_exit(frame[None])
        score = float(exit_scores(logits, head.score, head.temperature)[0])
        d, sent = edge.step(frame, msg_id)
        [unfamiliar] = head.unfamiliar(hidden)[1]   # none where the artifact has no score
        assert bool(d.offload) == (unfamiliar or score < head.threshold), i
        assert d.cls == (UNKNOWN if unfamiliar else int(logits[0].argmax()))
        assert d.confidence == pytest.approx(score, abs=1e-6)
        if not d.offload:
            assert sent == b""
            continue
        offloads += 1
        features = head.run_uplink(hidden)[0]
        expected = edge.python_request(features, msg_id)
        assert edge.encode(features, msg_id) == expected, i   # same features: same bytes
        if sent != expected:
            differ.append(i)
            own = edge.features(frame)
            assert not np.array_equal(own, features)
            assert sent == edge.python_request(own, msg_id), i
        near += np.array_equal(edge.features(frame), features)
    print(f"C edge on {len(pixels)} frames: {offloads} offloaded, {offloads - len(differ)} "
          f"byte-identical to the Python edge ({len(differ)} differ: {differ[:10]}); "
          f"{near} with bit-identical features")
    assert offloads > 1000
    assert differ == []


@pytest.fixture(scope="module")
def coded_edge(bottleneck_artifacts, tmp_path_factory):
    """A 4-bit uplink with its static code behind a bottleneck (the exit reads an earlier
    layer)."""
    return CEdge(bottleneck_artifacts, tmp_path_factory.mktemp("coded-edge"))


def awkward_rows(width: int, seed: int = 0) -> list[np.ndarray]:
    """Features that take every branch of the quantizer and coder: zero, tiny (a subnormal
    float16 scale), huge (a clipped scale), exact rounding ties, dense (coded larger than
    packed), sparse, negative."""
    rng = np.random.default_rng(seed)
    rows = [np.zeros(width), np.full(width, 1e-7), np.full(width, 3e-6),
            np.full(width, 1e9), rng.random(width) * 2 - 1,
            rng.integers(0, 16, width) + 0.5, (rng.integers(0, 30, width) / 2.0),
            rng.random(width) * 7, rng.exponential(0.3, width) * (rng.random(width) < 0.2)]
    rows += [rng.gamma(0.5, s, width) * (rng.random(width) < p)
             for s in (1e-5, 0.01, 1, 300) for p in (0.05, 0.5, 1)]
    return [r.astype(np.float32) for r in rows]


def test_the_c_encoder_equals_wire_encode_request_bit_for_bit(coded_edge):
    head = coded_edge.head
    assert head.code is not None and coded_edge.codec == wire.Codec.STATIC
    seen = set()
    for msg_id, row in enumerate(awkward_rows(head.width), start=1):
        expected = coded_edge.python_request(row, msg_id * 0x01010101)
        assert coded_edge.encode(row, msg_id * 0x01010101) == expected
        seen.add(expected[2] & 0xF)
    assert seen == {wire.Codec.NONE, wire.Codec.STATIC, wire.Codec.RANS} or \
        seen >= {wire.Codec.NONE, wire.Codec.STATIC}


def test_a_model_without_a_static_code_sends_int8_as_python_does_with_codec_none(
        artifacts, tmp_path):
    """No trained uplink: int8 with a float16 scale, packed as is (lz4 is not in the C edge:
    its bytes are the Python edge's with --codec none)."""
    edge = CEdge(artifacts, tmp_path)
    assert edge.dtype == wire.DType.INT8
    for msg_id, row in enumerate(awkward_rows(edge.head.width, seed=1), start=1):
        [expected] = wire.encode_request(msg_id, edge.tag, row[None], wire.DType.INT8,
                                         wire.Codec.NONE)
        assert edge.encode(row, msg_id) == expected


def test_decisions_and_bytes_through_a_bottleneck(coded_edge, idx_dir):
    """A head whose exit reads an earlier layer: the C edge runs the bottleneck for the
    frames it sends; every frame's decision is the Python edge's, and the bytes follow
    from the C head's features exactly as Python would code them."""
    pixels = load_dataset(idx_dir).test.images.astype(np.float32) / 255
    head = coded_edge.head
    sent = 0
    for i, frame in enumerate(pixels):
        logits, hidden = head.run_exit(frame[None])
        score = float(exit_scores(logits, head.score, head.temperature)[0])
        d, request = coded_edge.step(frame, i)
        [unfamiliar] = head.unfamiliar(hidden)[1]
        assert bool(d.offload) == (unfamiliar or score < head.threshold)
        if d.offload:
            sent += 1
            assert request == coded_edge.python_request(coded_edge.features(frame), i)
    assert sent > 0


# -- answers ----------------------------------------------------------------------------

def python_outcome(message: bytes, classes: int) -> str | tuple:
    """What the Python edge makes of an answer to a one-frame request; the wire's unknown
    class byte is the class `unknown` (the server's score flagged the frame)."""
    try:
        answer = wire.decode_answer([message])
    except wire.WireError:
        return "bad"
    if isinstance(answer, wire.Error):
        return ("refused", answer.msg_id, int(answer.reason))
    if len(answer.classes) != 1 or reply_fault(answer, classes):
        return "bad"
    cls = int(answer.classes[0])
    return ("reply", answer.msg_id, UNKNOWN if cls == wire.UNKNOWN_CLASS else cls,
            float(answer.confidences[0]), answer.queued, answer.free_credit)


def c_outcome(edge: CEdge, message: bytes) -> str | tuple:
    rc, a = edge.decode(message)
    if rc == 1:
        return ("refused", a.msg_id, a.refusal)
    if rc == 0:
        return ("reply", a.msg_id, a.cls, a.confidence, a.queued, a.free_credit)
    assert rc < 0
    return "bad"


def answers() -> list[bytes]:
    [reply] = wire.encode_reply(0xDEADBEEF, "worker-ü", np.array([3]), np.array([0.75]),
                                120, 450, 7)
    return [wire.stamp_load(reply, 12, 3), reply,
            wire.encode_reply(5, "", np.array([9]), np.array([1.0]), 0, 0, 1)[0],
            wire.encode_reply(5, "w", np.array([1, 2]), np.array([0.5, 0.5]), 0, 0, 1)[0],
            wire.encode_reply(6, "w", np.array([10]), np.array([0.5]), 0, 0, 1)[0],
            *(wire.encode_reply(8, "w", np.array([c]), np.array([0.25]), 0, 0, 1)[0]
              for c in (wire.UNKNOWN_CLASS, wire.UNKNOWN_CLASS - 1)),   # unknown; out of range
            wire.encode_reply(6, "w", np.array([1]), np.array([1.5]), 0, 0, 1)[0],
            wire.encode_reply(6, "w", np.array([1]), np.array([np.nan]), 0, 0, 1)[0],
            wire.encode_error(77, wire.Refusal.BUSY, "queue full")[0],
            wire.encode_error(0xFFFFFFFF, wire.Refusal.NO_WORKER, "é" * 200)[0],
            wire.encode_error(1 << 20, wire.Refusal.WRONG_MODEL, "")[0],
            wire.HEARTBEAT[0], wire.encode_ready("w", b"abcd", 4)[0]]


def test_answers_decode_as_the_python_edge_takes_them(coded_edge):
    classes = coded_edge.head.exit.bias.shape[0]
    valid = answers()
    outcomes = [c_outcome(coded_edge, m) for m in valid]
    assert outcomes[0] == ("reply", 0xDEADBEEF, 3, 0.75, 12, 3)
    assert outcomes[4] == "bad"                                 # class 10 of 10 classes
    assert outcomes[5] == ("reply", 8, UNKNOWN, 0.25, 0, 0)     # 255: unknown
    assert outcomes[6] == "bad"                                 # 254: out of range
    assert coded_edge.decode(valid[6])[0] == -9                 # SPLITEXIT_E_ANSWER
    assert outcomes[9] == ("refused", 77, int(wire.Refusal.BUSY))
    for message, outcome in zip(valid, outcomes):
        assert outcome == python_outcome(message, classes), message
    rng = np.random.default_rng(0)
    for _ in range(3000):   # every prefix, and random bytes changed
        m = bytearray(valid[rng.integers(len(valid))])
        if rng.random() < 0.3:
            m = m[:rng.integers(len(m) + 1)]
        else:
            for _ in range(rng.integers(1, 4)):
                m[rng.integers(len(m))] = rng.integers(256)
        assert c_outcome(coded_edge, bytes(m)) == python_outcome(bytes(m), classes), bytes(m)


# -- what the header promises -----------------------------------------------------------

def defined(header: str, name: str) -> int:
    return int(re.search(rf"#define {name} (\d+)", header).group(1))


@pytest.mark.parametrize("score", [None, "full"])
def test_the_edge_builds_strictly_allocates_nothing_and_states_its_memory(
        score, bottleneck_artifacts, idx_dir, tmp_path):
    """C99 with every warning an error (the library above), no malloc, no static RAM for an
    MLP head, and the stack gcc measures within what the header states, with and without
    an unfamiliarity score (its full form keeps its whitened features on the stack); C++
    callers link."""
    out, art = tmp_path / "edge", unscored_artifact(bottleneck_artifacts, tmp_path / "art")
    if score:
        data = load_dataset(idx_dir, val_fraction=0.1)
        art = scored_artifact(art, art, data.train, data.val, score)
    export_c(art, out)
    source = (out / STEP_C).read_text()
    assert not re.search(r"\b(malloc|calloc|realloc|free)\s*\(", source)
    header = (out / EDGE_H).read_text()
    assert 'extern "C"' in header and defined(header, "SPLITEXIT_EDGE_STATIC_BYTES") == 0
    assert sorted(p.name for p in out.glob("*.c")) == sorted([C_FILE, STEP_C])  # cc *.c links
    objects = []
    for name in (C_FILE, STEP_C):
        obj = out / (name + ".o")
        subprocess.run([CC, *STRICT, "-fstack-usage", "-c", str(out / name), "-o", str(obj)],
                       check=True, capture_output=True, cwd=out)
        objects.append(obj)
    size = subprocess.run(["size", *map(str, objects)], capture_output=True, text=True,
                          check=True).stdout.splitlines()[1:]
    assert all(int(line.split()[1]) + int(line.split()[2]) == 0 for line in size)  # data, bss
    usage = {}
    for su in out.glob("*.su"):
        for line in su.read_text().splitlines():
            where, n, _ = line.split("\t")
            usage[where.rsplit(":", 1)[-1]] = int(n)
    head = usage["splitexit_head_scored"] + usage.get("unfamiliar_score", 0)   # if not inlined
    chain = (usage["splitexit_edge_step"] + head
             + max(usage["splitexit_encode_request"] + usage.get("static_encode_compact", 0)
                   + usage.get("encode_picked", 0)
                   + max(usage.get(f, 0) for f in ("huffman_encode_compact",
                                                   "rans_encode_compact")),
                   usage["splitexit_exit_score"]))
    print(f"stack: {chain} B measured, {defined(header, 'SPLITEXIT_EDGE_STACK_BYTES')} B stated")
    assert chain <= defined(header, "SPLITEXIT_EDGE_STACK_BYTES")
    if CXX:
        (out / "caller.cpp").write_text(
            '#include "splitexit_edge.h"\n'
            "int main() { static float px[SPLITEXIT_INPUT];\n"
            "  static uint8_t out[SPLITEXIT_EDGE_BUFFER_BYTES]; splitexit_decision d;\n"
            "  return splitexit_edge_step(px, 1, out, sizeof out, &d); }\n")
        subprocess.run([CXX, "-Wall", "-Werror", "-I", str(out), str(out / "caller.cpp"),
                        *map(str, objects), "-lm", "-o", str(out / "caller")], check=True,
                       capture_output=True)
        assert subprocess.run([str(out / "caller")]).returncode == 0


def test_a_short_buffer_is_refused_before_anything_is_written(coded_edge):
    d, row = Decision(), np.zeros(coded_edge.head.width, np.float32)
    cap = defined(coded_edge.header, "SPLITEXIT_EDGE_BUFFER_BYTES") - 1
    frame = np.zeros(coded_edge.head.input_size, np.float32)
    assert coded_edge.lib.splitexit_edge_step(frame.ctypes.data_as(FLOATS), 1, coded_edge.out,
                                              ctypes.c_size_t(cap), ctypes.byref(d)) == -1
    assert coded_edge.lib.splitexit_encode_request(row.ctypes.data_as(FLOATS), 1, coded_edge.out,
                                                   ctypes.c_size_t(cap)) == -1


def test_the_cli_export_writes_the_edge(artifacts, tmp_path):
    r = splitexit("export", str(artifacts), "--out", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert all((tmp_path / "c" / name).is_file() for name in EDGE_FILES)
    assert "splitexit_edge_step" in r.stderr + r.stdout
