"""The codec: round trips for every dtype/codec, and hostile bytes that must only ever raise
WireError (property-based, with hypothesis)."""

import contextlib
import struct

import lz4.block
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.protocol import wire
from pipeline.protocol.wire import Codec, DType, Kind, Refusal, WireError

TAG = bytes(range(4))


def features(frames=1, width=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(frames, width)), 0).astype(np.float32)  # post-ReLU


@pytest.mark.parametrize("dtype", list(DType))
@pytest.mark.parametrize("codec", [Codec.NONE, Codec.LZ4])  # STATIC: tests/test_static_code.py
@pytest.mark.parametrize("frames,width", [(1, 40), (3, 400), (1, 1), (256, 7)])
def test_request_round_trip(dtype, codec, frames, width):
    x = features(frames, width)
    msg = wire.encode_request(7, TAG, x, dtype, codec)
    r = wire.decode_request(msg)
    assert (r.msg_id, r.model_tag) == (7, TAG) and r.features.shape == (frames, width)
    # at most half a step of the frame's peak for integer dtypes
    tol = {DType.FLOAT32: 0, DType.FLOAT16: 1e-3, DType.INT8: 1 / 127, DType.UINT8: 1 / 255,
           DType.UINT4: 1 / 15, DType.UINT2: 1 / 3}[dtype]
    assert np.all(np.abs(r.features - x) <= tol * np.abs(x).max(axis=1, keepdims=True) + 1e-7)
    assert wire.peek(msg[0]) == (Kind.REQUEST, 7)


def test_a_shadow_is_a_request_under_its_own_kind():
    x = features(2, 40)
    plain, shadow = (wire.encode_request(7, TAG, x, DType.INT8, Codec.NONE, shadow=s)[0]
                     for s in (False, True))
    assert wire.peek(shadow) == (Kind.SHADOW, 7) and len(shadow) == len(plain)
    assert np.array_equal(wire.decode_request([shadow]).features,
                          wire.decode_request([plain]).features)


def request_codec(msg) -> Codec:
    return Codec(msg[0][2] & 0xF)


def test_lz4_only_when_it_shrinks():
    tiny = wire.encode_request(1, TAG, features(1, 40), DType.INT8, Codec.LZ4)
    assert request_codec(tiny) == Codec.NONE  # 40 random bytes don't compress
    zeros = wire.encode_request(1, TAG, np.zeros((1, 400), np.float32), DType.FLOAT32,
                                Codec.LZ4)
    assert request_codec(zeros) == Codec.LZ4 and len(zeros[0]) < 100


def test_a_request_is_its_features_plus_16_bytes():
    # 14 B of fixed header and a 2 B scale; ZMTP adds 2 B to a frame under 256 B.
    msg = wire.encode_request(wire.MAX_MSG_ID, TAG, features(1, 40), DType.INT8, Codec.NONE)
    assert len(msg) == 1 and len(msg[0]) == 40 + 14 + 2
    assert wire.wire_bytes(msg) == 40 + 16 + 2
    four_bit = wire.encode_request(1, TAG, features(1, 32), DType.UINT4, Codec.NONE)
    assert wire.wire_bytes(four_bit) == 16 + 16 + 2
    assert wire.peek(msg[0]) == (Kind.REQUEST, wire.MAX_MSG_ID)


def test_reply_error_and_control_round_trip():
    r = wire.decode_answer(wire.encode_reply(9, "w1", np.array([3, 7]), np.array([0.5, 0.99]),
                                             120, 340, 2))
    assert (r.msg_id, r.worker_id, list(r.classes), r.batch) == (9, "w1", [3, 7], 2)
    assert (r.queue_us, r.tail_us) == (120, 340)
    assert np.allclose(r.confidences, [0.5, 0.99], atol=1e-3)
    assert wire.peek(wire.encode_reply(9, "w1", [1], [0.5], 0, 0, 1)[0]) == (Kind.REPLY, 9)
    assert (r.queued, r.free_credit) == (0, 0)               # until a broker stamps it
    e = wire.decode_answer(wire.encode_error(9, Refusal.WRONG_MODEL, "serves model abc"))
    assert (e.msg_id, e.reason, e.detail) == (9, Refusal.WRONG_MODEL, "serves model abc")
    assert wire.peek(wire.encode_error(9, Refusal.BUSY, "")[0]) == (Kind.ERROR, 9)
    ready = wire.decode_control(wire.encode_ready("w1", TAG, 16))
    assert (ready.worker_id, ready.model_tag, ready.credit) == ("w1", TAG, 16)
    assert wire.decode_control(wire.HEARTBEAT) == Kind.HEARTBEAT
    assert wire.decode_control(wire.DISCONNECT) == Kind.DISCONNECT


def test_the_broker_stamps_its_load_into_replies_and_nothing_else():
    reply = wire.encode_reply(9, "w1", np.array([3, 7]), np.array([0.5, 0.99]), 1, 2, 2)[0]
    r = wire.decode_answer([wire.stamp_load(reply, 12, 70_000)])
    assert (r.queued, r.free_credit) == (12, 0xFFFF)         # saturates, never wraps
    assert (r.msg_id, r.worker_id, list(r.classes), r.batch) == (9, "w1", [3, 7], 2)
    error = wire.encode_error(9, Refusal.BUSY, "queue full")[0]
    assert wire.stamp_load(error, 12, 3) == error


def reject(frames, reason, decode=wire.decode_request):
    with pytest.raises(WireError) as e:
        decode(frames)
    assert e.value.reason == reason, e.value


def request(version=wire.VERSION, kind=1, dtype=2, codec=0, frames=1, msg_id=5, tag=TAG,
            width=40, scales=np.float16(1).tobytes(), payload=bytes(40)):
    """A request frame built field by field, so that each can be made wrong."""
    return [struct.pack("<BBBBI4sH", version, kind, dtype << 4 | codec, frames - 1, msg_id,
                        tag, width) + scales + payload]


def test_each_bad_field_has_its_reason():
    wire.decode_request(request())
    reject(request(version=1), "version")  # the msgpack layout's version
    reject(request(version=2), "version")  # 8-byte tags and float32 scales
    reject(request(kind=2), "kind")
    reject(request(width=0), "field")
    reject(request(dtype=9), "field")
    reject(request(codec=7), "field")
    reject(request(payload=bytes(39)), "shape")
    reject(request(width=40_000, frames=200, payload=b""), "size")
    reject(request(scales=b"", payload=b""), "shape")
    reject(request(scales=np.float16([np.nan]).tobytes()), "nonfinite")
    reject(request(scales=np.float16([np.inf]).tobytes()), "nonfinite")
    reject(request(scales=np.float16([-1]).tobytes()), "nonfinite")
    reject(request(scales=np.float16([0]).tobytes()), "nonfinite")
    reject(request(dtype=0, scales=b"", width=10, payload=np.full(10, np.inf, np.float32)
                   .tobytes()), "nonfinite")
    reject(request(dtype=1, scales=b"", width=20, payload=np.full(20, np.nan, "<f2")
                   .tobytes()), "nonfinite")
    reject([request()[0][:10]], "kind")
    reject([b"\x02"], "malformed")
    reject(request() + [b""], "malformed")
    old = msgpack.packb([1, 1, 5, 1, TAG, 0, [1], 40, 2, 0, b"\x00\x00\x80\x3f"]) + bytes(40)
    reject([old], "version")  # a peer on the msgpack layout is told, not misread


def test_bad_answers_and_control_messages_have_their_reasons():
    reply = wire.encode_reply(9, "w1", np.array([3, 7]), np.array([0.5, 0.99]), 1, 2, 2)[0]
    reject([reply[:-1]], "shape", wire.decode_answer)        # a confidence cut short
    reject([reply[:22]], "shape", wire.decode_answer)        # ends inside the worker id
    reject([reply[:20]], "kind", wire.decode_answer)         # inside the fixed header
    reject([bytes([wire.VERSION, 3]) + msgpack.packb([9, 99, "x"])], "field", wire.decode_answer)
    reject([bytes([wire.VERSION, 3]) + b"\xc1"], "malformed", wire.decode_answer)
    reject([bytes([wire.VERSION, 4]) + msgpack.packb(["w", b"short", 1])], "field",
           wire.decode_control)
    reject([bytes([wire.VERSION, 4]) + msgpack.packb(["w", TAG, 0])], "field", wire.decode_control)
    reject([wire.HEARTBEAT[0] + b"x"], "malformed", wire.decode_control)
    reject([bytes([wire.VERSION, 1])], "kind", wire.decode_control)


def test_lz4_bomb_is_refused_before_decompressing():
    bomb = lz4.block.compress(bytes(50_000_000), store_size=False)  # 50 MB of zeros, ~200 KB
    reject(request(dtype=0, scales=b"", codec=1, width=40, payload=bomb), "size")
    liar = lz4.block.compress(bytes(4000), store_size=False)  # decompresses past the claim
    reject(request(dtype=0, scales=b"", codec=1, width=10, payload=liar), "decompress")


def valid_request_frames():
    return st.builds(
        lambda n, w, d, c, seed: wire.encode_request(1, TAG, features(n, w, seed), DType(d),
                                                     Codec(c)),
        st.integers(1, 4), st.integers(1, 64), st.integers(0, len(DType) - 1),
        st.integers(0, 1), st.integers(0, 1000))


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
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_a_valid_prefix_only_raise_wire_error(rest):
    for kind in Kind:
        frame = bytes([wire.VERSION, kind]) + rest
        for decode in (wire.decode_request, wire.decode_answer, wire.decode_control):
            with contextlib.suppress(WireError):
                decode([frame])
        with contextlib.suppress(WireError):
            wire.peek(frame)


@settings(max_examples=400, deadline=None)
@given(valid_request_frames(), st.data())
def test_mutated_requests_decode_or_raise_wire_error(frames, data):
    target = bytearray(frames[0])
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
    try:
        r = wire.decode_request([bytes(target)])
    except WireError:
        return
    assert np.isfinite(r.features).all() and 1 <= r.features.shape[0] <= 256


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**70, 2**70), st.binary(max_size=20), st.text(max_size=5),
                          st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=3)),
                min_size=0, max_size=12))
def test_control_bodies_with_wrong_types_raise_wire_error(fields):
    try:
        body = msgpack.packb(fields)
    except (OverflowError, ValueError):
        return
    for kind in (Kind.ERROR, Kind.READY):
        frame = bytes([wire.VERSION, kind]) + body
        for decode in (wire.decode_answer, wire.decode_control):
            with contextlib.suppress(WireError):
                decode([frame])
        with contextlib.suppress(WireError):
            wire.peek(frame)


@pytest.mark.parametrize("dtype,width,row", [(DType.UINT8, 33, 33), (DType.UINT4, 33, 17),
                                             (DType.UINT2, 33, 9), (DType.UINT4, 32, 16)])
def test_unsigned_dtypes_pack_rows_to_whole_bytes(dtype, width, row):
    x = features(3, width)
    msg = wire.encode_request(1, TAG, x, dtype, Codec.NONE)
    assert len(msg[0]) == wire.REQUEST_HEADER_BYTES + 3 * wire.SCALE_BYTES + 3 * row
    assert row == wire.row_bytes(dtype, width)
    bits = wire.UNSIGNED_BITS[dtype]
    sent = wire.decode_request(msg).features
    peak = x.max(axis=1, keepdims=True)
    codes = np.rint(sent / (peak / ((1 << bits) - 1)))
    assert codes.min() == 0 and codes.max() == (1 << bits) - 1  # the peak is the top code


def test_nonzero_padding_bits_are_rejected():
    msg = wire.encode_request(1, TAG, features(1, 33), DType.UINT4, Codec.NONE)
    tampered = msg[0][:-1] + bytes([msg[0][-1] | 0xF0])  # the 34th nibble does not exist
    reject([tampered], "field")


def test_the_size_caps_hold_the_largest_legal_messages():
    # the largest request: 4 MiB of features lz4 cannot shrink, with a scale per frame
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (256, 16384), dtype=np.uint8).astype(np.float32)
    [biggest] = wire.encode_request(1, TAG, noise, DType.INT8, Codec.LZ4)
    assert wire.MAX_REQUEST_BYTES >= len(biggest) + 16384 // 255 * 256  # lz4's worst too
    [reply] = wire.encode_reply(1, "w" * 300, np.zeros(256), np.ones(256), 1, 1, 256)
    [error] = wire.encode_error(wire.MAX_MSG_ID, Refusal.BAD_REQUEST, "\u20ac" * 500)
    [ready] = wire.encode_ready("w" * wire.MAX_DETAIL_CHARS, TAG, 1 << 16)
    assert max(len(reply), len(error), len(ready)) <= wire.MAX_REPLY_BYTES


def test_entropy_coded_requests_are_budgeted_before_decoding():
    from pipeline.floor.static_code import StaticCode

    wide = StaticCode(np.full((2048, 16), 256))   # every symbol 4 bits, so never smaller
    x = features(200, 2048)                       # 409 600 features > MAX_CODED_SYMBOLS
    msg = wire.encode_request(1, TAG, x, DType.UINT4, Codec.STATIC, wide)
    assert request_codec(msg) == Codec.NONE       # an edge sends so many packed
    over = request(dtype=DType.UINT4, codec=Codec.STATIC, frames=200, width=2048,
                   scales=bytes(400), payload=bytes(100))
    reject(over, "size", lambda f: wire.decode_request(f, wide))   # ... and refuses them coded
    code = StaticCode(np.array([[2045, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1, 1, 1,
                                 1]] * 40))
    low, high = code.payload_bounds(3, rans=False)
    for n, reason in ((low - 1, "size"), (low, "decompress"), (min(high, 59) + 1, "size")):
        reject(request(dtype=DType.UINT4, codec=Codec.STATIC, frames=3, scales=bytes(6),
                       payload=b"\xff" * n), reason, lambda f: wire.decode_request(f, code))


def test_another_models_request_is_wrong_model_before_its_payload_is_read():
    """A worker of another model lacks the code the features were coded with: it must say
    wrong_model from the header, not that the payload is bad."""
    from pipeline.floor.static_code import StaticCode

    code = StaticCode(np.array([[2045, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1, 1, 1,
                                 1]] * 40))
    msg = wire.encode_request(7, TAG, np.zeros((4, 40), np.float32), DType.UINT4,
                              Codec.STATIC, code)
    assert request_codec(msg) in (Codec.STATIC, Codec.RANS)
    other = bytes(wire.MODEL_TAG_BYTES)
    reject(msg, "wrong_model", lambda f: wire.decode_request(f, None, serves=other))
    reject(msg, "codec", lambda f: wire.decode_request(f, None, serves=TAG))  # its own tag
    assert wire.decode_request(msg, code, serves=TAG).msg_id == 7
