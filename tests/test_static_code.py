"""The uplink's static entropy code: exact round trips, smaller than the packed codes on
skewed features, and a decoder that only ever raises its typed error on hostile bytes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.floor import native, quantization
from pipeline.floor.code_tables import MAX_CODE_BITS
from pipeline.floor.static_code import CodeError, StaticCode
from pipeline.protocol import wire
from pipeline.protocol.wire import Codec, DType, WireError

TAG = bytes(4)


def relu_features(frames: int, width: int = 32, seed: int = 0) -> np.ndarray:
    """Like a trained bottleneck: about half the values 0, each channel its own scale."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 3.0, size=width)
    return np.maximum(rng.normal(size=(frames, width)) * spread, 0).astype(np.float32)


@pytest.fixture(scope="module")
def code4() -> StaticCode:
    codes, _ = quantization.quantize_unsigned(relu_features(5000), 4)
    return StaticCode.fit(codes, 16)


@pytest.mark.parametrize("coder", ["huffman", "rans"])
def test_both_coders_round_trip_exactly(code4, coder):
    codes, _ = quantization.quantize_unsigned(relu_features(40, seed=5), 4)
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
    codes, _ = quantization.quantize_unsigned(sparse(4000), 4)
    code = StaticCode.fit(codes, 16)
    x = sparse(1)
    [msg] = wire.encode_request(1, TAG, x, DType.UINT4, Codec.STATIC, code)
    assert Codec(msg[2] & 0xF) == Codec.RANS
    symbols, _ = quantization.quantize_unsigned(x, 4)
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
       st.integers(1, 4), st.integers(0, 2**32 - 1), st.booleans())
def test_the_smallest_encoding_is_chosen_without_always_running_both(channels, symbols, zeros,
                                                                     frames, seed, reference):
    rng = np.random.default_rng(seed)

    def draw(n):
        return np.where(rng.random((n, channels)) < zeros, 0,
                        rng.integers(0, symbols, (n, channels))).astype(np.uint8)

    code = StaticCode.fit(draw(200), symbols)
    codes = draw(frames)
    huffman, rans = code.encode_reference(codes), code.encode_rans_reference(codes)
    expected = (huffman, False) if len(huffman) <= len(rans) else (rans, True)
    smallest = code.encode_smallest_reference if reference else code.encode_smallest
    assert smallest(codes) == expected


# -- the native coder against the Python reference ----------------------------------------------

needs_native = pytest.mark.skipif(native.coder() is None, reason=native.coder_status())


def random_code(rng: np.random.Generator, channels: int, symbols: int) -> StaticCode:
    """A code fitted on skewed random symbols: some channels nearly constant (long codes for
    the rest), some spread out."""
    skew = rng.uniform(0.0, 0.999, size=channels)
    training = np.where(rng.random((300, channels)) < skew, 0,
                        rng.integers(0, symbols, (300, channels))).astype(np.uint8)
    return StaticCode.fit(training, symbols)


def outcome(decode, data: bytes, frames: int):
    """What a decoder makes of the bytes: its symbols, or its error's text."""
    try:
        return decode(data, frames).tobytes()
    except CodeError as e:
        return str(e)


def damaged(data: bytes, rng: np.random.Generator) -> list[bytes]:
    """Truncated, one byte extra, the last bit flipped (padding, or the final state), the
    first byte flipped (the rANS start state), random bytes of the same length, empty."""
    flip_last = data[:-1] + bytes([data[-1] ^ 1]) if data else b"\x01"
    flip_first = bytes([data[0] ^ 0x80]) + data[1:] if data else b"\x80"
    return [data[:-1], data + b"\x00", data + b"\xff", flip_last, flip_first,
            rng.bytes(len(data)), b"", data[:len(data) // 2]]


@needs_native
@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.sampled_from([2, 4, 16, 256]),
       st.integers(1, 6))
def test_the_native_coder_decodes_exactly_as_the_reference(seed, channels, symbols, frames):
    rng = np.random.default_rng(seed)
    code = random_code(rng, channels, symbols)
    codes = np.where(rng.random((frames, channels)) < 0.5, code.lengths.argmax(axis=1),
                     rng.integers(0, symbols, (frames, channels))).astype(np.uint8)
    for encode, fast, reference in ((code.encode, code.decode, code.decode_reference),
                                    (code.encode_rans, code.decode_rans,
                                     code.decode_rans_reference)):
        data = encode(codes)
        assert np.array_equal(fast(data, frames), codes)
        assert np.array_equal(reference(data, frames), codes)
        for bad in damaged(data, rng):
            for n in (frames, frames + 1):
                assert outcome(fast, bad, n) == outcome(reference, bad, n)


@needs_native
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.integers(1, 4), st.sampled_from(["huffman", "rans"]))
def test_the_native_coder_refuses_arbitrary_bytes_as_the_reference_does(data, frames, coder):
    code = StaticCode(np.array([[2048, 1024, 512, 512], [1, 1, 1, 4093], [1024] * 4]))
    fast, reference = ((code.decode, code.decode_reference) if coder == "huffman"
                       else (code.decode_rans, code.decode_rans_reference))
    assert outcome(fast, data, frames) == outcome(reference, data, frames)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 60), st.sampled_from([2, 4, 16]),
       st.integers(1, 40), st.sampled_from(["random", "longest", "shortest", "dearest"]))
def test_every_honest_encoding_is_within_the_payload_budget(seed, channels, symbols, frames,
                                                            pattern):
    rng = np.random.default_rng(seed)
    code = random_code(rng, channels, symbols)
    pick = {"longest": code.lengths.argmax(axis=1), "shortest": code.lengths.argmin(axis=1),
            "dearest": code.frequencies.argmin(axis=1)}
    codes = (rng.integers(0, symbols, (frames, channels)) if pattern == "random"
             else np.tile(pick[pattern], (frames, 1))).astype(np.uint8)
    for rans, data in ((False, code.encode(codes)), (True, code.encode_rans(codes))):
        low, high = code.payload_bounds(frames, rans)
        assert low <= len(data) <= high, (rans, low, len(data), high)


def test_the_reference_heartbeats_once_a_frame(code4):
    codes, _ = quantization.quantize_unsigned(relu_features(9, seed=2), 4)
    for encode, decode in ((code4.encode, code4.decode_reference),
                           (code4.encode_rans, code4.decode_rans_reference)):
        ticks = []
        decode(encode(codes), 9, lambda: ticks.append(1))
        assert len(ticks) == 9


@pytest.mark.parametrize("env,message", [
    ({"SPLITEXIT_NATIVE": "0"}, "Python coder (SPLITEXIT_NATIVE=0)"),
    ({"CC": "/nonexistent/cc"}, "Python coder (no C compiler: install gcc or set CC"),
])
def test_without_the_native_coder_the_reference_decodes(env, message, monkeypatch, tmp_path,
                                                        code4):
    monkeypatch.setattr(native.CODER, "_state", {})
    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert native.coder() is None
    status = native.coder_status()
    assert status.startswith(message) and "\n" not in status
    codes, _ = quantization.quantize_unsigned(relu_features(5, seed=3), 4)
    assert np.array_equal(code4.decode(code4.encode(codes), 5), codes)
    assert np.array_equal(code4.decode_rans(code4.encode_rans(codes), 5), codes)
