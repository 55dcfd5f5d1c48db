"""The C coder's encoders against the Python reference, bit for bit, and the whole coder
(decoders and encoders) run under AddressSanitizer and UBSan on hostile and random inputs.

The reference (StaticCode.*_reference) defines the wire; the C coder must give exactly its
bytes, refuse exactly what it refuses, and never read or write outside its buffers.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.decode_worst import fitted_code, longest_codes, worst_legal
from pipeline.floor import native, quantization
from pipeline.floor.code_tables import MAX_CODE_BITS
from pipeline.floor.static_code import ENCODE_CAP, ENCODE_SYMBOL, ERRORS, CodeError, StaticCode
from pipeline.protocol import wire
from pipeline.protocol.wire import Codec, DType
from tests.conftest import ROOT

needs_native = pytest.mark.skipif(native.coder() is None, reason=native.coder_status())
TAG = bytes(4)


def random_frequencies(rng: np.random.Generator, channels: int, symbols: int) -> np.ndarray:
    """Rows of 12-bit frequencies, each at least 1, summing to 4096: some rows nearly one
    symbol (long codes for the rest), some flat."""
    rows = []
    for _ in range(channels):
        weights = rng.random(symbols) ** rng.uniform(0.5, 12)
        extra = np.floor(weights / weights.sum() * (4096 - symbols)).astype(np.int64)
        extra[rng.integers(symbols)] += 4096 - symbols - extra.sum()
        rows.append(extra + 1)
    return np.array(rows)


def fitted(rng: np.random.Generator, channels: int, symbols: int) -> StaticCode:
    skew = rng.uniform(0.0, 0.999, size=channels)
    training = np.where(rng.random((300, channels)) < skew, 0,
                        rng.integers(0, symbols, (300, channels))).astype(np.uint8)
    return StaticCode.fit(training, symbols)


def symbols_for(code: StaticCode, rng: np.random.Generator, frames: int) -> np.ndarray:
    """Mostly each channel's likeliest symbol (as a trained bottleneck's zeros), the rest
    uniform, and now and then each channel's longest code."""
    likeliest = code.frequencies.argmax(axis=1)
    longest = code.lengths.argmax(axis=1)
    draw = rng.random((frames, code.channels))
    out = rng.integers(0, code.symbols, (frames, code.channels))
    out = np.where(draw < 0.6, likeliest, out)
    return np.where(draw > 0.97, longest, out).astype(np.uint8)


@needs_native
@settings(max_examples=120, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(1, 64), st.sampled_from([4, 16, 256]),
       st.integers(1, 256), st.booleans())
def test_native_encoders_write_the_references_bytes(seed, channels, symbols, frames, drawn):
    rng = np.random.default_rng(seed)
    code = (StaticCode(random_frequencies(rng, channels, symbols)) if drawn
            else fitted(rng, channels, symbols))
    assert code.lengths.max() <= MAX_CODE_BITS
    codes = symbols_for(code, rng, frames)
    huffman, rans = code.encode(codes), code.encode_rans(codes)
    assert huffman == code.encode_reference(codes)
    assert rans == code.encode_rans_reference(codes)
    assert code.encode_smallest(codes) == code.encode_smallest_reference(codes)
    # across: native bytes decode with the reference, reference bytes with native
    assert np.array_equal(code.decode_reference(huffman, frames), codes)
    assert np.array_equal(code.decode_rans_reference(rans, frames), codes)
    assert np.array_equal(code.decode(code.encode_reference(codes), frames), codes)
    assert np.array_equal(code.decode_rans(code.encode_rans_reference(codes), frames), codes)


def reference_quantize_encode(code: StaticCode, x: np.ndarray, bits: int):
    codes, _ = quantization.quantize_unsigned(x, bits)
    return (codes, *code.encode_smallest_reference(codes))


@needs_native
@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(1, 64), st.sampled_from([2, 4, 8]),
       st.integers(1, 64))
def test_quantize_and_encode_in_one_call_equals_numpy_then_the_reference(seed, channels, bits,
                                                                         frames):
    rng = np.random.default_rng(seed)
    levels = (1 << bits) - 1
    code = fitted(rng, channels, levels + 1)
    x = (rng.normal(size=(frames, channels)) * rng.uniform(0.01, 5, channels)).astype(np.float32)
    # exact ties: a frame whose peak is `levels` has scale 1, so k + 0.5 rounds to even
    x[0, 0] = levels
    x[0, 1:] = rng.integers(0, levels, channels - 1) + 0.5
    x[rng.random(x.shape) < 0.3] = 0.0
    x[rng.random(x.shape) < 0.05] = -0.0
    if frames > 1:
        x[-1] = -1.0                 # an all-negative frame: scale 1, every code 0
    scales = quantization.unsigned_scales(x, levels)
    codes, payload, is_rans = code.encode_features(x, scales.astype(np.float32), levels)
    expected = reference_quantize_encode(code, x, bits)
    assert np.array_equal(codes, expected[0])
    assert (payload, is_rans) == expected[1:]


@needs_native
def test_extreme_features_quantize_as_numpy_does():
    code = fitted(np.random.default_rng(0), 4, 16)
    x = np.array([[np.inf, 1.0, 0.0, -np.inf], [1e30, 1e-30, 3e-8, 0.0],
                  [65504 * 15, 7.5, -0.0, 1.0], [1e-45, 0.0, 0.0, 0.0]], np.float32)
    scales = quantization.unsigned_scales(x, 15)
    got = code.encode_features(x, scales.astype(np.float32), 15)
    expected = reference_quantize_encode(code, x, 4)
    assert np.array_equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.fixture(scope="module")
def default_like() -> StaticCode:
    """400 channels of 4-bit codes fitted on ReLU features: the default's uplink shape."""
    return fitted_code()


def relu(rng: np.random.Generator, frames: int, channels: int) -> np.ndarray:
    spread = rng.uniform(0.2, 3.0, size=channels)
    return np.maximum(rng.normal(size=(frames, channels)) * spread, 0).astype(np.float32)


def encode_both_ways(monkeypatch, tmp_path, code: StaticCode, features: list[np.ndarray]):
    """Every request encode_request makes of these feature packs, native and then with the
    Python coder (SPLITEXIT_NATIVE=0)."""
    def requests():
        return [wire.encode_request(i, TAG, x, DType.UINT4, Codec.STATIC, code)
                for i, x in enumerate(features)]
    fast = requests()
    monkeypatch.setattr(native.CODER, "_state", {})
    monkeypatch.setenv("SPLITEXIT_CACHE", str(tmp_path))
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.coder() is None
    return fast, requests()


@needs_native
def test_requests_are_the_same_bytes_native_or_not(default_like, monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    packs = [relu(rng, n, default_like.channels) for n in (1, 1, 2, 7, 64, 256)]
    packs.append(np.zeros((3, default_like.channels), np.float32))
    fast, reference = encode_both_ways(monkeypatch, tmp_path, default_like, packs)
    assert fast == reference
    codecs = {Codec(msg[0][2] & 0xF) for msg in fast}
    assert Codec.RANS in codecs


@needs_native
def test_a_trained_bottleneck_sends_the_same_bytes_native_or_not(bottleneck_artifacts, idx_dir,
                                                                 monkeypatch, tmp_path):
    from pipeline.edge.numpy_head import load_numpy_head
    from pipeline.floor.data import load_test_split

    head = load_numpy_head(bottleneck_artifacts)
    assert head.code is not None
    pixels = load_test_split(idx_dir).images.reshape(-1, head.input_size)[:300] / 255.0
    _, hidden = head.run_exit(pixels.astype(np.float32))
    features = head.run_uplink(hidden)
    packs = [features[i:i + 1] for i in range(200)] + [features[200:264], features[264:300]]
    fast, reference = encode_both_ways(monkeypatch, tmp_path, head.code, packs)
    assert fast == reference
    for msg, x in zip(fast, packs):
        assert wire.decode_request(msg, head.code).features.shape == x.shape


@needs_native
@pytest.mark.parametrize("bad", [16, 255])
def test_a_code_beyond_the_symbols_is_refused(default_like, bad):
    codes = np.zeros((2, default_like.channels), np.uint8)
    codes[1, 17] = bad
    for encode in (default_like.encode, default_like.encode_rans, default_like.encode_reference,
                   default_like.encode_rans_reference):
        with pytest.raises(ValueError, match="not below"):
            encode(codes)
    for encode in (default_like.encode_smallest, default_like.encode_smallest_reference):
        with pytest.raises(ValueError, match="not below"):
            encode(codes)
    with pytest.raises(ValueError, match="not below"):   # wider than uint8 first
        default_like.encode(codes.astype(np.int64) + 300)
    lib, t = native.coder(), default_like._tables
    out = np.empty(4096, np.uint8)
    args = (codes.ctypes.data, 2, default_like.channels, default_like.symbols)
    assert lib.huffman_encode(*args, *t.encoder[:2], out.ctypes.data, 4096) == ENCODE_SYMBOL
    assert lib.rans_encode(*args, *t.encoder[2:4], out.ctypes.data, 4096) == ENCODE_SYMBOL


@needs_native
def test_an_output_buffer_too_small_is_refused_never_overrun(default_like):
    rng = np.random.default_rng(5)
    lib, t = native.coder(), default_like._tables
    for frames in (1, 3):
        codes = symbols_for(default_like, rng, frames)
        args = (codes.ctypes.data, frames, default_like.channels, default_like.symbols)
        for function, tables, expected in (
                (lib.huffman_encode, t.encoder[:2], default_like.encode_reference(codes)),
                (lib.rans_encode, t.encoder[2:4], default_like.encode_rans_reference(codes))):
            n = len(expected)
            for cap in (0, 1, 3, n // 2, n - 1, n, n + 1):
                out = np.full(n + 16, 0xA5, np.uint8)
                got = function(*args, *tables, out.ctypes.data, cap)
                if cap < n:
                    assert got == ENCODE_CAP
                else:
                    assert got == n and out[:n].tobytes() == expected
                assert (out[max(cap, 0):] == 0xA5).all(), "wrote past cap"


# -- the whole coder under AddressSanitizer and UndefinedBehaviorSanitizer --------------------

# One program: a code's tables, then operations, each answered on stdout; every buffer is
# malloc'ed at exactly its size, so a read or write one byte out of bounds stops it.
DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "coder.c"

static void take(void *p, size_t n) { if (n && fread(p, 1, n, stdin) != n) exit(3); }
static void *grab(size_t n) { void *p = malloc(n ? n : 1); if (!p) exit(4); take(p, n); return p; }
static void give(const void *p, size_t n) { fwrite(p, 1, n, stdout); }

int main(void)
{
    int64_t C, S;
    take(&C, 8); take(&S, 8);
    uint32_t *code = grab(4 * C * S); uint8_t *length = grab(C * S);
    uint16_t *freq = grab(2 * C * S), *cum = grab(2 * C * (S + 1));
    uint64_t *rcp = grab(8 * C * S); uint32_t *cost = grab(4 * C * S);
    uint32_t *limit = grab(4 * C * (MAX_CODE_BITS + 1));
    int32_t *base = grab(4 * C * (MAX_CODE_BITS + 1));
    uint8_t *order = grab(C * S), *minimum = grab(C);
    for (;;) {
        uint8_t op; int64_t frames, size;
        if (fread(&op, 1, 1, stdin) != 1) break;
        take(&frames, 8); take(&size, 8);
        int64_t n = frames * C;
        if (op <= 1) {                                  /* decode `size` bytes */
            uint8_t *data = grab(size), *out = malloc(n ? n : 1);
            int rc = op == 0 ? huffman_decode(data, size, frames, C, S, limit, base, order,
                                              minimum, out)
                             : rans_decode(data, size, frames, C, S, freq, cum, out);
            give(&rc, 4);
            if (rc == 0) give(out, n);
            free(data); free(out);
        } else {                                        /* encode into `size` bytes */
            int64_t levels = 0; float *x = NULL, *scale = NULL; uint8_t *codes;
            if (op == 5) {
                take(&levels, 8); x = grab(4 * n); scale = grab(4 * frames);
                codes = malloc(n ? n : 1);
            } else {
                codes = grab(n);
            }
            uint8_t *out = malloc(size ? size : 1);
            int32_t is_rans = -1; int64_t w;
            if (op == 2) w = huffman_encode(codes, frames, C, S, code, length, out, size);
            else if (op == 3) w = rans_encode(codes, frames, C, S, freq, cum, out, size);
            else if (op == 4) w = static_encode_smallest(codes, frames, C, S, code, length,
                                                         freq, cum, rcp, cost, out, size,
                                                         &is_rans);
            else w = static_quantize_encode(x, scale, levels, codes, frames, C, S, code, length,
                                            freq, cum, rcp, cost, out, size, &is_rans);
            give(&w, 8); give(&is_rans, 4);
            if (op == 5 && w >= 0) give(codes, n);
            if (w > 0) give(out, w);
            free(codes); free(out); free(x); free(scale);
        }
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory) -> str:
    """The coder and DRIVER built with -fsanitize=address,undefined; skips without them."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: install gcc to run the coder under the sanitizers")
    folder = tmp_path_factory.mktemp("sanitized")
    shutil.copy(native.CODER_SOURCE, folder / "coder.c")
    (folder / "driver.c").write_text(DRIVER)
    exe = folder / "driver"
    done = subprocess.run([cc, "-std=c99", "-O1", "-g", "-Wall", "-Werror",
                           "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                           "-fno-omit-frame-pointer", "-o", str(exe), str(folder / "driver.c")],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and ("asan" in done.stderr or "ubsan" in done.stderr):
        pytest.skip(f"no sanitizer runtime: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return str(exe)


class Session:
    """Operations for one code, sent to the sanitized driver in one run; `run` answers
    them in order."""

    def __init__(self, code: StaticCode):
        t = code._tables
        self.code, self.parse = code, []
        self.ops = [struct.pack("<qq", code.channels, code.symbols)]
        self.ops += [np.ascontiguousarray(a).tobytes() for a in
                     (t.code, t.length, t.freq, t.cum, t.rcp, t.cost, t.limit, t.base, t.order,
                      t.minimum)]

    def decode(self, rans: bool, data: bytes, frames: int) -> None:
        self.ops.append(struct.pack("<Bqq", int(rans), frames, len(data)) + data)
        self.parse.append(("decode", frames))

    def encode(self, op: int, codes: np.ndarray, cap: int) -> None:
        self.ops.append(struct.pack("<Bqq", op, len(codes), cap) + codes.tobytes())
        self.parse.append(("encode", len(codes)))

    def quantize(self, x: np.ndarray, scales: np.ndarray, levels: int, cap: int) -> None:
        self.ops.append(struct.pack("<Bqqq", 5, len(x), cap, levels) + x.tobytes()
                        + scales.astype(np.float32).tobytes())
        self.parse.append(("quantize", len(x)))

    def run(self, exe: str) -> list:
        done = subprocess.run([exe], input=b"".join(self.ops), capture_output=True, timeout=300,
                              env={"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
                                   "UBSAN_OPTIONS": "print_stacktrace=1"})
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        out, pos, answers = done.stdout, 0, []
        n_channels = self.code.channels
        for kind, frames in self.parse:
            if kind == "decode":
                (rc,) = struct.unpack_from("<i", out, pos)
                pos += 4
                size = frames * n_channels if rc == 0 else 0
                answers.append((rc, out[pos:pos + size]))
            else:
                w, is_rans = struct.unpack_from("<qi", out, pos)
                pos += 12
                codes = b""
                if kind == "quantize" and w >= 0:
                    codes, pos = out[pos:pos + frames * n_channels], pos + frames * n_channels
                size = max(w, 0)
                answers.append((w, is_rans, codes, out[pos:pos + size]))
            pos += size
        assert pos == len(out)
        return answers


def reference_outcome(decode, data: bytes, frames: int) -> tuple[str, bytes]:
    try:
        return "", decode(data, frames).tobytes()
    except CodeError as e:
        return str(e), b""


def hostile_payloads(code: StaticCode, rng: np.random.Generator) -> list[tuple[bool, bytes, int]]:
    """(rans, bytes, frames): the hostile decode tests' worst cases and their damage."""
    out = []
    for rans in (False, True):
        encode = code.encode_rans_reference if rans else code.encode_reference
        worst = [worst_legal(code, 8, rans)] if code.symbols == 16 else []
        for symbols in (*worst, longest_codes(code, 8), symbols_for(code, rng, 5)):
            data, frames = encode(symbols), len(symbols)
            out.append((rans, data, frames))
            for bad in (data[:-1], data + b"\x00", data[:len(data) // 2], b"", data[:3],
                        bytes([data[0] ^ 0x80]) + data[1:], data[:-1] + bytes([data[-1] ^ 1]),
                        rng.bytes(len(data)), b"\xff" * len(data), bytes(len(data))):
                out.append((rans, bad, frames))
                out.append((rans, bad, frames + 1))
        out += [(rans, rng.bytes(int(n)), int(f)) for n, f in
                zip(rng.integers(0, 80, 40), rng.integers(1, 5, 40))]
    return out


@pytest.mark.parametrize("which", ["default-like", "tiny", "skewed-256"])
def test_the_coder_is_clean_under_the_sanitizers(sanitized, which):
    rng = np.random.default_rng({"default-like": 1, "tiny": 2, "skewed-256": 3}[which])
    code = {"default-like": lambda: fitted_code(64),
            "tiny": lambda: StaticCode(np.array([[2048, 1024, 512, 512], [1, 1, 1, 4093]])),
            "skewed-256": lambda: StaticCode(random_frequencies(rng, 5, 256))}[which]()
    session, expected = Session(code), []
    for rans, data, frames in hostile_payloads(code, rng):
        session.decode(rans, data, frames)
        decode = code.decode_rans_reference if rans else code.decode_reference
        expected.append(("decode", reference_outcome(decode, data, frames)))
    for frames in (1, 2, 9, 40):
        codes = symbols_for(code, rng, frames)
        huffman, rans = code.encode_reference(codes), code.encode_rans_reference(codes)
        smallest = code.encode_smallest_reference(codes)
        for op, data in ((2, huffman), (3, rans)):
            for cap in (len(data), len(data) - 1, 0, len(data) + 7):
                session.encode(op, codes, cap)
                expected.append(("encode", (len(data) if cap >= len(data) else ENCODE_CAP,
                                            data if cap >= len(data) else b"")))
        session.encode(4, codes, len(huffman) + len(rans) + 16)
        expected.append(("smallest", smallest))
        bad = codes.copy()
        bad[-1, -1] = code.symbols if code.symbols < 256 else 255
        if code.symbols < 256:
            for op in (2, 3, 4):
                session.encode(op, bad, 4096)
                expected.append(("encode", (ENCODE_SYMBOL, b"")))
        x = rng.normal(size=(frames, code.channels)).astype(np.float32)
        levels = min(code.symbols - 1, 255)
        bits = int(np.log2(levels + 1))
        scales = quantization.unsigned_scales(x, levels)
        session.quantize(x, scales, levels, code._cap(frames, False) + code._cap(frames, True))
        expected.append(("quantize", reference_quantize_encode(code, x, bits)))
    answers = session.run(sanitized)
    assert len(answers) == len(expected)
    for answer, (kind, want) in zip(answers, expected):
        if kind == "decode":
            rc, symbols = answer
            assert (ERRORS[rc] if rc else "", symbols) == want
        elif kind == "encode":
            w, _, _, data = answer
            assert (w, data) == want
        elif kind == "smallest":
            w, is_rans, _, data = answer
            assert (data, bool(is_rans)) == want and w == len(data)
        else:
            w, is_rans, codes, data = answer
            assert codes == want[0].tobytes() and (data, bool(is_rans)) == want[1:]


def test_the_coder_builds_for_a_microcontroller(tmp_path):
    """No stdio, no libc beyond string.h: the device edge compiles this same file."""
    cc = shutil.which("arm-none-eabi-gcc")
    if cc is None:
        pytest.skip("arm-none-eabi-gcc missing: apt-get install gcc-arm-none-eabi")
    done = subprocess.run([cc, "-std=c99", "-mcpu=cortex-m4", "-mthumb", "-Os", "-Wall",
                           "-Wextra", "-Werror", "-ffreestanding", "-c", "-o",
                           str(tmp_path / "coder.o"), str(native.CODER_SOURCE)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_coder_benchmark_runs_in_its_quick_mode(bottleneck_artifacts, idx_dir):
    done = subprocess.run([sys.executable, "-m", "benchmarks.coder", "--quick", "--frames", "128",
                           "--artifacts", str(bottleneck_artifacts), "--data", str(idx_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| quantize + encode (wire.encode_request) |" in done.stdout
    assert "| native decode / tail |" in done.stdout
