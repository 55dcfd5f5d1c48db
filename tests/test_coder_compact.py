"""The static code's device form (coder.c's static_encode_compact, what the exported C edge
runs): one uint16 per (channel, symbol) instead of the server's tables, and the same bytes
and the same Huffman-or-rANS choice as the Python reference for any symbols, since its rANS
costs are StaticCode's integers for every frequency there is."""

from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from pipeline.floor import native
from pipeline.floor.code_tables import COST_BITS, PROB_BITS
from pipeline.floor.static_code import ENCODE_CAP, ENCODE_SYMBOL, StaticCode

LIB = native.coder()
pytestmark = pytest.mark.skipif(LIB is None, reason=f"no native coder: {native.coder_status()}")
COST_NEAR = int(re.search(r"#define COST_NEAR (\d+)", native.CODER_SOURCE.read_text()).group(1))
BYTE = 8 << COST_BITS


def every_frequency() -> StaticCode:
    """A code whose channel f holds a symbol of frequency f, for f = 1 .. 2^12 - 1 (2^12
    itself needs a single symbol, which no StaticCode has)."""
    f = np.arange(1, 1 << PROB_BITS)
    return StaticCode(np.stack([f, (1 << PROB_BITS) - f], axis=1))


def compact(code: StaticCode, codes: np.ndarray, cap: int | None = None) -> tuple[int, bytes, bool]:
    codes = np.ascontiguousarray(codes, np.uint8)
    frames = len(codes)
    cap = code._cap(frames, False) + code._cap(frames, True) if cap is None else cap
    out, is_rans = np.zeros(max(cap, 1), np.uint8), ctypes.c_int32(0)
    n = LIB.static_encode_compact(codes.ctypes.data, frames, code.channels, code.symbols,
                                  code._tables.entry.ctypes.data, out.ctypes.data, cap,
                                  ctypes.byref(is_rans))
    return n, out[:max(n, 0)].tobytes(), bool(is_rans.value)


def test_the_costs_are_staticcodes_for_every_frequency():
    """Exact: every frequency's rANS cost equals StaticCode's table; the quick one the sizing
    pass sums is within COST_NEAR of it, as the encoder assumes."""
    code = every_frequency()
    expected = code._cost[:, 0].astype(np.int64)
    exact = np.array([LIB.static_rans_cost(f) for f in range(1, 1 << PROB_BITS)])
    near = np.array([LIB.static_rans_cost_near(f) for f in range(1, 1 << PROB_BITS)])
    assert np.array_equal(exact, expected)
    assert np.abs(near - expected).max() <= COST_NEAR
    assert LIB.static_rans_cost(1 << PROB_BITS) == LIB.static_rans_cost_near(1 << PROB_BITS) == 0


def test_an_entry_holds_length_and_cumulative_frequency():
    code = StaticCode.fit(np.random.default_rng(1).integers(0, 16, (500, 30)), 16)
    entry = code._tables.entry.astype(np.int64)
    assert np.array_equal((entry >> 12) + 1, code.lengths)
    cum = np.concatenate([entry & 0xFFF, np.full((code.channels, 1), 1 << PROB_BITS)], axis=1)
    assert np.array_equal(np.diff(cum, axis=1), code.frequencies)


def skewed_code(rng, symbols: int, channels: int) -> StaticCode:
    """Fitted on sparse, skewed symbols, as a trained bottleneck's are (many zeros)."""
    train = rng.gamma(rng.uniform(0.1, 3), 1, (300, channels)) * symbols / 6
    return StaticCode.fit(train.astype(int).clip(0, symbols - 1), symbols)


def frames_like(rng, code: StaticCode, frames: int) -> np.ndarray:
    x = rng.gamma(rng.uniform(0.1, 3), 1, (frames, code.channels)) * code.symbols / 6
    return x.astype(int).clip(0, code.symbols - 1).astype(np.uint8)


def test_random_codes_and_frames_give_the_references_bytes_and_choice():
    rng = np.random.default_rng(0)
    chose = set()
    for _ in range(100):
        symbols = int(rng.choice([2, 4, 16, 256]))
        code = skewed_code(rng, symbols, int(rng.integers(1, 450 if symbols <= 16 else 12)))
        codes = frames_like(rng, code, int(rng.integers(1, 4)))
        expected, is_rans = code.encode_smallest_reference(codes)
        assert compact(code, codes)[1:] == (expected, is_rans)
        chose.add(is_rans)
    assert chose == {False, True}


def pick(bits: np.ndarray, cost: np.ndarray, n: int) -> np.ndarray:
    """The reference's choice from its sizes (StaticCode.encode_smallest_reference): 0
    Huffman, 1 rANS, 2 both, per frame."""
    huffman = (bits + 7) // 8 * BYTE
    slack = BYTE // 4 + n * (1 << (COST_BITS - 8))
    return np.where(huffman + slack <= cost + 3 * BYTE, 0,
                    np.where(huffman > cost + 4 * BYTE + slack, 1, 2))


def sizes(code: StaticCode, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: Huffman's bits, the quick rANS cost the compact encoder sums first, and
    StaticCode's exact one."""
    near_cost = np.array([0] + [LIB.static_rans_cost_near(f) for f in range(1, 1 << PROB_BITS)])
    channel = np.arange(code.channels)
    return (code.lengths[channel, codes].sum(axis=1, dtype=np.int64),
            near_cost[code.frequencies[channel, codes]].sum(axis=1, dtype=np.int64),
            code._cost[channel, codes].sum(axis=1, dtype=np.int64))


def test_close_calls_sum_the_exact_costs_and_still_choose_as_the_reference():
    """Frames drawn from the code's own frequencies, a random share of them zeroed (sparser
    and sparser frames cross from Huffman to rANS). The close calls -- where the quick costs,
    off by up to COST_NEAR a symbol, cannot settle the choice, so the encoder sums the exact
    ones -- include frames that the quick sum alone would decide otherwise than the
    reference; every one gives the reference's bytes."""
    rng = np.random.default_rng(2)
    code = skewed_code(rng, 16, 400)
    n, frames = code.channels, 20000
    codes = np.stack([rng.choice(16, frames, p=f / f.sum()) for f in code.frequencies], axis=1)
    codes[rng.random((frames, n)) < rng.random((frames, 1))] = 0
    bits, near, exact = sizes(code, codes)
    error = n * COST_NEAR
    low, high = pick(bits, np.maximum(near - error, 0), n), pick(bits, near + error, n)
    close = np.flatnonzero(low != high)
    misled = np.flatnonzero(pick(bits, near, n) != pick(bits, exact, n))
    assert len(close) >= 20 and len(misled) >= 3 and set(misled) <= set(close)
    for i in close:
        row = codes[i:i + 1].astype(np.uint8)
        assert compact(code, row)[1:] == code.encode_smallest_reference(row), i


def test_bad_symbols_and_short_buffers_are_refused():
    rng = np.random.default_rng(3)
    code = skewed_code(rng, 16, 40)
    codes = frames_like(rng, code, 1)
    n, expected, _ = compact(code, codes)
    assert n == len(expected) > 0
    assert compact(code, codes, cap=n - 1)[0] == ENCODE_CAP
    codes[0, 7] = 16
    assert compact(code, codes)[0] == ENCODE_SYMBOL


DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include "coder.c"

static void take(void *p, size_t n) { if (fread(p, 1, n, stdin) != n) exit(3); }
static void *grab(size_t n) { void *p = malloc(n ? n : 1); take(p, n); return p; }

int main(void)   /* C, S, the entries; then per call: frames, cap, the codes */
{
    int64_t C, S, frames, cap;
    take(&C, 8); take(&S, 8);
    uint16_t *entry = grab(2 * C * S);
    while (fread(&frames, 8, 1, stdin) == 1) {
        take(&cap, 8);
        uint8_t *codes = grab(frames * C), *out = malloc(cap ? cap : 1);
        int32_t is_rans = -1;
        int64_t w = static_encode_compact(codes, frames, C, S, entry, out, cap, &is_rans);
        fwrite(&w, 8, 1, stdout); fwrite(&is_rans, 4, 1, stdout);
        if (w > 0) fwrite(out, 1, w, stdout);
        free(codes); free(out);
    }
    free(entry);
    return 0;
}
"""


def test_the_compact_coder_is_clean_under_the_sanitizers(tmp_path):
    """Built with -fsanitize=address,undefined: random codes and frames, every buffer from
    far too small to enough (both encodings' room: what a close call may need); the bytes
    are the reference's or the buffer is refused, and nothing is read or written out of
    bounds (the driver allocates exactly `cap`)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler: install gcc to run the coder under the sanitizers")
    shutil.copy(native.CODER_SOURCE, tmp_path / "coder.c")
    (tmp_path / "driver.c").write_text(DRIVER)
    exe = tmp_path / "driver"
    done = subprocess.run([cc, "-std=c99", "-O1", "-g", "-Wall", "-Werror",
                           "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                           "-o", str(exe), str(tmp_path / "driver.c")],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and ("asan" in done.stderr or "ubsan" in done.stderr):
        pytest.skip(f"no sanitizer runtime: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(4)
    outcomes = {"refused": 0, "written": 0}
    for symbols in (2, 16, 256):
        code = skewed_code(rng, symbols, 24 if symbols == 256 else 120)
        calls, expected = [], []
        for _ in range(60):
            codes = frames_like(rng, code, int(rng.integers(0, 4)))
            want = code.encode_smallest_reference(codes)
            both = len(code.encode_reference(codes)) + len(code.encode_rans_reference(codes))
            cap = int(rng.integers(0, both + 3))
            calls.append(struct.pack("<qq", len(codes), cap) + codes.tobytes())
            expected.append((want, both, cap))
        stdin = struct.pack("<qq", code.channels, symbols) + code._tables.entry.tobytes()
        run = subprocess.run([str(exe)], input=stdin + b"".join(calls), capture_output=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        out = run.stdout
        for (data, is_rans), both, cap in expected:
            written, flag = struct.unpack_from("<qi", out)
            out = out[12:]
            outcomes["refused" if written == ENCODE_CAP else "written"] += 1
            if written == ENCODE_CAP:      # refused only short of room for both encodings
                assert cap < both
            else:
                assert (out[:written], bool(flag)) == (data, is_rans)
                out = out[written:]
        assert out == b""
    assert min(outcomes.values()) > 20, outcomes
