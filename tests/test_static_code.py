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

TAG = bytes(4)


def relu_features(frames: int, width: int = 32, seed: int = 0) -> np.ndarray:
    """Like a trained bottleneck: about half the values 0, each channel its own scale."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 3.0, size=width)
    return np.maximum(rng.normal(size=(frames, width)) * spread, 0).astype(np.float32)


@pytest.fixture(scope="module")
def code4() -> StaticCode:
    codes, _ = wire.quantize_unsigned(relu_features(5000), 4)
    return StaticCode.fit(codes, 16)


@pytest.mark.parametrize("coder", ["huffman", "rans"])
def test_both_coders_round_trip_exactly(code4, coder):
    codes, _ = wire.quantize_unsigned(relu_features(40, seed=5), 4)
    encode, decode = ((code4.encode, code4.decode) if coder == "huffman"
                      else (code4.encode_rans, code4.decode_rans))
    for n in (1, 7, 40):
        assert np.array_equal(decode(encode(codes[:n]), n), codes[:n])


def test_rans_wins_on_wide_sparse_features_and_the_wire_says_so():
    # 400 channels, 80 % zeros: Huffman spends at least a bit on each 0, rANS a third of one
    rng = np.random.default_rng(6)
    def sparse(frames):
        keep = rng.random((frames, 400)) < 0.2
        return (keep * rng.uniform(0.1, 1.0, (frames, 400))).astype(np.float32)
    codes, _ = wire.quantize_unsigned(sparse(4000), 4)
    code = StaticCode.fit(codes, 16)
    x = sparse(1)
    [msg] = wire.encode_request(1, TAG, x, DType.UINT4, Codec.STATIC, code)
    assert Codec(msg[2] & 0xF) == Codec.RANS
    symbols, _ = wire.quantize_unsigned(x, 4)
    assert len(code.encode_rans(symbols)) < 0.9 * len(code.encode(symbols))
    assert np.array_equal(wire.decode_request([msg], code).features,
                          wire.decode_request(wire.encode_request(1, TAG, x, DType.UINT4,
                                                                  Codec.NONE)).features)


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
    assert code.lengths.max() <= MAX_CODE_BITS and code.frequencies.min() >= 1
    frame = np.array([[15, 15], [0, 7]], np.uint8)
    assert np.array_equal(code.decode(code.encode(frame), 2), frame)
    assert np.array_equal(code.decode_rans(code.encode_rans(frame), 2), frame)


def test_the_edge_falls_back_to_no_codec_when_coding_does_not_shrink(code4):
    rng = np.random.default_rng(3)
    uniform = rng.uniform(1, 2, size=(1, 32)).astype(np.float32)  # no zeros: codes spread
    msg = wire.encode_request(1, TAG, uniform, DType.UINT4, Codec.STATIC, code4)
    assert Codec(msg[0][2] & 0xF) in (Codec.STATIC, Codec.RANS, Codec.NONE)
    packed = wire.REQUEST_HEADER_BYTES + wire.SCALE_BYTES + 16
    assert len(msg[0]) <= packed


def reject(frames, reason, code):
    with pytest.raises(WireError) as e:
        wire.decode_request(frames, code)
    assert e.value.reason == reason, e.value


def test_hostile_static_payloads_are_refused_with_a_reason(code4):
    [good] = wire.encode_request(1, TAG, relu_features(2, seed=4), DType.UINT4, Codec.STATIC,
                                 code4)
    assert Codec(good[2] & 0xF) in (Codec.STATIC, Codec.RANS)
    head = good[:wire.REQUEST_HEADER_BYTES + 2 * wire.SCALE_BYTES]   # two frames' scales
    payload = good[wire.REQUEST_HEADER_BYTES + 2 * wire.SCALE_BYTES:]
    reject([good], "codec", None)                                   # this side has no code
    reject([good], "codec", StaticCode(np.full((16, 16), 256)))     # a code of another width
    reject([head + payload[:-1]], "decompress", code4)              # ends inside a frame
    reject([head + payload + b"\x00"], "decompress", code4)         # a byte left over
    reject([head + bytes(40 * 32)], "size", code4)                  # longer than any frame
    reject([good[:2] + bytes([DType.INT8 << 4 | Codec.STATIC]) + good[3:]], "codec", code4)
    for coder in (Codec.STATIC, Codec.RANS):                       # garbage in either coder
        types = bytes([DType.UINT4 << 4 | coder])
        reject([good[:2] + types + good[3:len(head)] + b"\xff" * 9],
               "decompress", code4)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 4), st.sampled_from(["huffman", "rans"]))
def test_arbitrary_bytes_only_raise_code_error(data, frames, coder):
    code = StaticCode(np.array([[2048, 1024, 512, 512], [1024, 1024, 1024, 1024]]))
    encode, decode = ((code.encode, code.decode) if coder == "huffman"
                      else (code.encode_rans, code.decode_rans))
    with contextlib.suppress(CodeError):
        out = decode(data, frames)
        assert out.shape == (frames, 2) and out.max() < 4
        assert encode(out) == data  # what decodes is exactly an encoding


@pytest.mark.parametrize("frequencies", [[[4096]], [[4095, 0, 1]], [[2048, 2047]],
                                         [[4000, 97]], [4096, 0]])
def test_a_damaged_frequency_table_is_refused(frequencies):
    with pytest.raises(ValueError):
        StaticCode(np.array(frequencies))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.sampled_from([4, 16, 256]), st.floats(0, 0.95),
       st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_the_smallest_encoding_is_chosen_without_always_running_both(channels, symbols, zeros,
                                                                     frames, seed):
    rng = np.random.default_rng(seed)

    def draw(n):
        return np.where(rng.random((n, channels)) < zeros, 0,
                        rng.integers(0, symbols, (n, channels))).astype(np.uint8)

    code = StaticCode.fit(draw(200), symbols)
    codes = draw(frames)
    huffman, rans = code.encode(codes), code.encode_rans(codes)
    expected = (huffman, False) if len(huffman) <= len(rans) else (rans, True)
    assert code.encode_smallest(codes) == expected
