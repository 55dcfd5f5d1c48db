"""The uplink's static entropy code: exact round trips, smaller than the packed codes on
skewed features, and a decoder that only ever raises its typed error on hostile bytes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.protocol import wire
from pipeline.protocol.static_code import MAX_CODE_BITS, CodeError, StaticCode
from pipeline.protocol.wire import Codec, DType, WireError

TAG = bytes(8)


def relu_features(frames: int, width: int = 32, seed: int = 0) -> np.ndarray:
    """Like a trained bottleneck: about half the values 0, each channel its own scale."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 3.0, size=width)
    return np.maximum(rng.normal(size=(frames, width)) * spread, 0).astype(np.float32)


@pytest.fixture(scope="module")
def code4() -> StaticCode:
    codes, _ = wire.quantize_unsigned(relu_features(5000), 4)
    return StaticCode.fit(codes, 16)


def test_round_trip_is_exact_and_smaller_than_packed(code4):
    x = relu_features(300, seed=1)
    sizes = []
    for i in range(0, 300, 3):
        msg = wire.encode_request(i, TAG, x[i:i + 3], DType.UINT4, Codec.STATIC, code4)
        plain = wire.encode_request(i, TAG, x[i:i + 3], DType.UINT4, Codec.NONE)
        assert np.array_equal(wire.decode_request(msg, code4).features,
                              wire.decode_request(plain).features)
        sizes.append(len(msg[0]) / len(plain[0]))
    assert np.mean(sizes) < 0.85  # 3 frames of 16 B packed: the code saves a good part


def test_every_symbol_is_encodable_and_codes_stay_short():
    # Symbol 15 never seen in training, symbol 0 almost always: both still have a code.
    training = np.zeros((100_000, 2), np.uint8)
    training[:3, 0] = 1
    code = StaticCode.fit(training, 16)
    assert code.lengths.max() <= MAX_CODE_BITS
    frame = np.array([[15, 15], [0, 7]], np.uint8)
    assert np.array_equal(code.decode(code.encode(frame), 2), frame)


def test_the_edge_falls_back_to_no_codec_when_coding_does_not_shrink(code4):
    rng = np.random.default_rng(3)
    uniform = rng.uniform(1, 2, size=(1, 32)).astype(np.float32)  # no zeros: codes spread
    msg = wire.encode_request(1, TAG, uniform, DType.UINT4, Codec.STATIC, code4)
    assert Codec(msg[0][2] & 0xF) in (Codec.STATIC, Codec.NONE)
    packed = wire.REQUEST_HEADER_BYTES + 4 + 16
    assert len(msg[0]) <= packed


def reject(frames, reason, code):
    with pytest.raises(WireError) as e:
        wire.decode_request(frames, code)
    assert e.value.reason == reason, e.value


def test_hostile_static_payloads_are_refused_with_a_reason(code4):
    [good] = wire.encode_request(1, TAG, relu_features(2, seed=4), DType.UINT4, Codec.STATIC,
                                 code4)
    assert Codec(good[2] & 0xF) == Codec.STATIC
    head = good[:wire.REQUEST_HEADER_BYTES + 8]
    payload = good[wire.REQUEST_HEADER_BYTES + 8:]
    reject([good], "codec", None)                                   # this side has no code
    reject([good], "codec", StaticCode(np.full((16, 16), 4)))       # a code of another width
    reject([head + payload[:-1]], "decompress", code4)              # bits end inside a frame
    reject([head + payload + b"\x00"], "decompress", code4)         # a byte left over
    reject([head + bytes(40 * 32)], "size", code4)                  # longer than any frame
    reject([good[:2] + bytes([DType.INT8 << 4 | Codec.STATIC]) + good[3:]], "codec", code4)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 4))
def test_arbitrary_bytes_only_raise_code_error(data, frames):
    code = StaticCode(np.array([[1, 2, 3, 3], [2, 2, 2, 2]]))
    with contextlib.suppress(CodeError):
        out = code.decode(data, frames)
        assert out.shape == (frames, 2) and out.max() < 4
        assert code.encode(out) == data  # what decodes is exactly an encoding


@pytest.mark.parametrize("lengths", [[[1, 1, 1]], [[2, 2, 2]], [[0, 1]], [[1, 25]]])
def test_a_damaged_code_table_is_refused(lengths):
    with pytest.raises(ValueError):
        StaticCode(np.array(lengths))
