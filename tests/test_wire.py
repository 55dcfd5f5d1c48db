"""The codec: round trips for every dtype/codec, and hostile bytes that must only ever raise
WireError (property-based, with hypothesis)."""

import contextlib

import lz4.block
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.protocol import wire
from pipeline.protocol.wire import Codec, DType, Kind, Refusal, WireError

TAG = bytes(range(8))


def features(frames=1, width=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(frames, width)), 0).astype(np.float32)  # post-ReLU


@pytest.mark.parametrize("dtype", list(DType))
@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("frames,width", [(1, 40), (3, 400), (1, 1)])
def test_request_round_trip(dtype, codec, frames, width):
    x = features(frames, width)
    msg = wire.encode_request(7, 3, TAG, 123456, list(range(10, 10 + frames)), x, dtype, codec)
    r = wire.decode_request(msg)
    assert (r.msg_id, r.producer_id, r.model_tag, r.capture_ts_us) == (7, 3, TAG, 123456)
    assert r.frame_ids == tuple(range(10, 10 + frames)) and r.features.shape == (frames, width)
    # at most half a step of the frame's peak for integer dtypes
    tol = {DType.FLOAT32: 0, DType.FLOAT16: 1e-3, DType.INT8: 1 / 127, DType.UINT8: 1 / 255,
           DType.UINT4: 1 / 15, DType.UINT2: 1 / 3}[dtype]
    assert np.all(np.abs(r.features - x) <= tol * np.abs(x).max(axis=1, keepdims=True) + 1e-7)
    assert wire.peek(msg[0]) == (Kind.REQUEST, 7)


def test_lz4_only_when_it_shrinks():
    tiny = wire.encode_request(1, 1, TAG, 0, [1], features(1, 40), DType.INT8, Codec.LZ4)
    assert msgpack.unpackb(tiny[0])[9] == Codec.NONE  # 40 random bytes don't compress
    zeros = wire.encode_request(1, 1, TAG, 0, [1], np.zeros((1, 400), np.float32),
                                DType.FLOAT32, Codec.LZ4)
    assert msgpack.unpackb(zeros[0])[9] == Codec.LZ4 and len(zeros[1]) < 100


def test_paper_split_int8_request_is_compact():
    msg = wire.encode_request(2**31, 12, TAG, 2**50, [2**31], features(1, 40), DType.INT8)
    assert len(msg[1]) == 40
    assert wire.wire_bytes(msg) <= 40 + 50  # header + ZMTP framing under 50 bytes


def test_reply_error_and_control_round_trip():
    r = wire.decode_answer(wire.encode_reply(9, "w1", np.array([3, 7]), np.array([0.5, 0.99]),
                                             120, 340, 2))
    assert (r.msg_id, r.worker_id, list(r.classes), r.batch) == (9, "w1", [3, 7], 2)
    assert np.allclose(r.confidences, [0.5, 0.99], atol=1e-3)
    e = wire.decode_answer(wire.encode_error(9, Refusal.WRONG_MODEL, "serves model abc"))
    assert (e.msg_id, e.reason, e.detail) == (9, Refusal.WRONG_MODEL, "serves model abc")
    ready = wire.decode_control(wire.encode_ready("w1", TAG, 16))
    assert (ready.worker_id, ready.model_tag, ready.credit) == ("w1", TAG, 16)
    assert wire.decode_control(wire.HEARTBEAT) == Kind.HEARTBEAT
    assert wire.decode_control(wire.DISCONNECT) == Kind.DISCONNECT


def reject(frames, reason):
    with pytest.raises(WireError) as e:
        wire.decode_request(frames)
    assert e.value.reason == reason, e.value


def header(**change):
    fields = [1, 1, 5, 1, TAG, 0, [1], 40, 2, 0, b"\x00\x00\x80\x3f"]
    names = ["v", "kind", "msg", "producer", "tag", "ts", "ids", "width", "dtype", "codec",
             "scales"]
    for k, v in change.items():
        fields[names.index(k)] = v
    return msgpack.packb(fields)


def test_each_bad_field_has_its_reason():
    ok = bytes(40)
    wire.decode_request([header(), ok])
    reject([header(v=2), ok], "version")
    reject([header(kind=2), ok], "kind")
    reject([header(tag=b"short"), ok], "field")
    reject([header(msg=-1), ok], "field")
    reject([header(ids=[]), ok], "field")
    reject([header(width=0), ok], "field")
    reject([header(dtype=9), ok], "field")
    reject([header(), bytes(39)], "shape")
    reject([header(width=40_000, ids=list(range(200))), b""], "size")
    reject([header(scales=b""), ok], "field")
    reject([header(scales=np.float32([np.nan]).tobytes()), ok], "nonfinite")
    reject([header(dtype=0, scales=b"", width=10), np.full(10, np.inf, np.float32).tobytes()],
           "nonfinite")
    reject([header(dtype=1, scales=b"", width=20), np.full(20, np.nan, "<f2").tobytes()],
           "nonfinite")
    reject([b"\xc1garbage", ok], "malformed")
    reject([header()], "malformed")


def test_lz4_bomb_is_refused_before_decompressing():
    bomb = lz4.block.compress(bytes(50_000_000), store_size=False)  # 50 MB of zeros, ~200 KB
    reject([header(dtype=0, scales=b"", codec=1, width=40), bomb], "size")
    liar = lz4.block.compress(bytes(4000), store_size=False)  # decompresses past the claim
    reject([header(dtype=0, scales=b"", codec=1, width=10), liar], "decompress")


def valid_request_frames():
    return st.builds(
        lambda n, w, d, c, seed: wire.encode_request(
            1, 2, TAG, 3, list(range(n)), features(n, w, seed), DType(d), Codec(c)),
        st.integers(1, 4), st.integers(1, 64), st.integers(0, 2), st.integers(0, 1),
        st.integers(0, 1000))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=4))
def test_arbitrary_bytes_only_raise_wire_error(frames):
    for decode in (wire.decode_request, wire.decode_answer, wire.decode_control):
        with contextlib.suppress(WireError):  # anything else fails the test
            decode(frames)
    if frames:
        with contextlib.suppress(WireError):
            wire.peek(frames[0])


@settings(max_examples=400, deadline=None)
@given(valid_request_frames(), st.data())
def test_mutated_requests_decode_or_raise_wire_error(frames, data):
    i = data.draw(st.integers(0, len(frames) - 1))
    target = bytearray(frames[i])
    for _ in range(data.draw(st.integers(1, 4))):
        if not target:
            break
        pos = data.draw(st.integers(0, len(target) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            target[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del target[pos:]
        else:
            target[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    mutated = list(frames)
    mutated[i] = bytes(target)
    try:
        r = wire.decode_request(mutated)
    except WireError:
        return
    assert np.isfinite(r.features).all() and r.features.shape[0] == len(r.frame_ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**70, 2**70), st.binary(max_size=20), st.text(max_size=5),
                          st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=3)),
                min_size=0, max_size=12), st.binary(max_size=100))
def test_structurally_valid_msgpack_with_wrong_types_raises_wire_error(fields, payload):
    try:
        head = msgpack.packb([1, 1] + fields)
    except (OverflowError, ValueError):
        return
    for frames in ([head, payload], [head]):
        for decode in (wire.decode_request, wire.decode_answer, wire.decode_control):
            with contextlib.suppress(WireError):
                decode(frames)


@pytest.mark.parametrize("dtype,width,row", [(DType.UINT8, 33, 33), (DType.UINT4, 33, 17),
                                             (DType.UINT2, 33, 9), (DType.UINT4, 32, 16)])
def test_unsigned_dtypes_pack_rows_to_whole_bytes(dtype, width, row):
    x = features(3, width)
    msg = wire.encode_request(1, 1, TAG, 0, [1, 2, 3], x, dtype, Codec.NONE)
    assert len(msg[1]) == 3 * row == 3 * wire.row_bytes(dtype, width)
    bits = wire.UNSIGNED_BITS[dtype]
    sent = wire.decode_request(msg).features
    peak = x.max(axis=1, keepdims=True)
    codes = np.rint(sent / (peak / ((1 << bits) - 1)))
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1  # the peak is the top code


def test_nonzero_padding_bits_are_rejected():
    msg = wire.encode_request(1, 1, TAG, 0, [1], features(1, 33), DType.UINT4, Codec.NONE)
    tampered = msg[1][:-1] + bytes([msg[1][-1] | 0xF0])  # the 34th nibble does not exist
    reject([msg[0], tampered], "field")
