"""What a worker pays to decode an entropy-coded request: normal packs and the worst a
sender can make it pay, native coder against the Python reference, CPU time beside bytes.

The shapes are the recommended default's uplink (400 channels of 4-bit codes); its code is
fitted on ReLU-like random features (the real one has the same shape and a similar skew).
Rows:
- normal packs of 1, 64 and 256 frames, each coder as the edge picks it;
- the worst legal message: 256 frames whose symbols cost the most bits the budget lets
  through (just under the packed codes' size), for Huffman and for rANS;
- the longest-code message the issue found (each channel's longest code, 256 frames): now
  refused by the budget before decoding, so its row is the cost of the refusal;
- the same worst legal message at MAX_CODED_SYMBOLS (256 frames of 1024 channels), the
  most symbols any request may carry.
Times are medians, in ms, of this thread's CPU time (`time.thread_time`) and of wall time,
for `wire.decode_request` (budget, decode, dequantize: what a worker runs), and for the Python
reference decoder alone (what a worker without a C compiler runs).

    python -m benchmarks.decode_worst            # 20 repeats a row
    python -m benchmarks.decode_worst --quick    # 3 repeats, the Python reference once
    python -m benchmarks.decode_worst --tiny     # once each, packs of at most 16 frames
    timeout 120 stress-ng --cpu 2 & python -m benchmarks.decode_worst    # on a busy machine
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time

import numpy as np

from benchmarks import add_tiny
from pipeline.floor import native, quantization
from pipeline.floor.static_code import StaticCode
from pipeline.protocol import wire
from pipeline.protocol.timing import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS
from pipeline.protocol.wire import Codec, DType

TAG = bytes(4)
CHANNELS = 400
BITS = 4


def fitted_code(channels: int = CHANNELS, seed: int = 0) -> StaticCode:
    """A code fitted like training fits one: ReLU features, each channel its own spread."""
    rng = np.random.default_rng(seed)
    spread = rng.uniform(0.2, 3.0, size=channels)
    x = np.maximum(rng.normal(size=(4000, channels)) * spread, 0).astype(np.float32)
    return StaticCode.fit(quantization.quantize_unsigned(x, BITS)[0], 1 << BITS)


def message(code: StaticCode, symbols: np.ndarray, rans: bool, msg_id: int = 1) -> bytes:
    """A request carrying exactly these symbols under one coder (scales of 1): how a hostile
    sender builds one, whatever the edge would have chosen."""
    frames, width = symbols.shape
    payload = code.encode_rans(symbols) if rans else code.encode(symbols)
    codec = Codec.RANS if rans else Codec.STATIC
    header = struct.pack("<BBBBI4sH", wire.VERSION, wire.Kind.REQUEST,
                         DType.UINT4 << 4 | codec, frames - 1, msg_id, TAG, width)
    return header + np.ones(frames, "<f2").tobytes() + payload


def longest_codes(code: StaticCode, frames: int) -> np.ndarray:
    """Each channel's longest Huffman code in every frame (the issue's 19.5 s message)."""
    return np.tile(code.lengths.argmax(axis=1).astype(np.uint8), (frames, 1))


def worst_legal(code: StaticCode, frames: int, rans: bool) -> np.ndarray:
    """Symbols that cost the coder the most bits a legal payload may hold (fewer bytes than
    the packed codes): each cell takes its channel's costliest symbol while what is left of
    the budget still pays for the cheapest in every cell after it; then each channel's
    symbols are shuffled over the frames."""
    cost = code._bits if rans else code.lengths.astype(np.float64)
    dear, cheap = cost.argmax(axis=1), cost.argmin(axis=1)
    dear_bits, cheap_bits = cost.max(axis=1), cost.min(axis=1)
    budget = 8 * (frames * wire.row_bytes(DType.UINT4, code.channels) - 1)
    margin = 48 if rans else 0          # rANS: its 4-byte state and rounding
    while True:
        symbols = np.tile(cheap.astype(np.uint8), (frames, 1))
        left = budget - margin - frames * cheap_bits.sum()
        for f in range(frames):
            for c in range(code.channels):
                extra = dear_bits[c] - cheap_bits[c]
                if extra <= left:
                    symbols[f, c], left = dear[c], left - extra
        # scattered over the frames: no branch predictor learns where the long codes are
        symbols = np.random.default_rng(0).permuted(symbols, axis=0)
        coded = code.encode_rans(symbols) if rans else code.encode(symbols)
        if 8 * len(coded) <= budget:
            return symbols
        margin += 16


def cpu_ms(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU time of this thread, wall time) of one call, in ms: on a busy machine the
    wall time, which is what a heartbeat waits on, grows and the CPU time does not."""
    cpu, wall = [], []
    for _ in range(repeats):
        start, start_wall = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - start)
        wall.append(time.perf_counter() - start_wall)
    return 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)


def rows(code: StaticCode, frames: int = 256) -> list[tuple[str, bytes]]:
    """(what, request bytes) for the normal packs and the worst cases of one code."""
    rng = np.random.default_rng(1)
    spread = rng.uniform(0.2, 3.0, size=code.channels)
    out = []
    for n in (1, 64, frames):
        x = np.maximum(rng.normal(size=(n, code.channels)) * spread, 0).astype(np.float32)
        [msg] = wire.encode_request(n, TAG, x, DType.UINT4, Codec.STATIC, code)
        out.append((f"normal pack, {n} frames ({Codec(msg[2] & 0xF).name.lower()})", msg))
    for rans in (False, True):
        out.append((f"worst legal, {frames} frames ({'rans' if rans else 'static'})",
                    message(code, worst_legal(code, frames, rans), rans)))
    out.append((f"longest codes, {frames} frames (over budget)",
                message(code, longest_codes(code, frames), False)))
    return out


def decode_or_refuse(msg: bytes, code: StaticCode) -> str:
    try:
        wire.decode_request([msg], code)
        return "decoded"
    except wire.WireError as e:
        return f"refused: {e.reason}"


def measure(code: StaticCode, label: str, repeats: int, reference_repeats: int,
            frames: int = 256) -> list[str]:
    lines = []
    for what, msg in rows(code, frames):
        outcome = decode_or_refuse(msg, code)
        native_ms, wall_ms = cpu_ms(lambda: decode_or_refuse(msg, code), repeats)
        reference = reference_wall = "-"
        if outcome == "decoded":
            payload = msg[wire.REQUEST_HEADER_BYTES + 2 * (msg[3] + 1):]
            decode = (code.decode_rans_reference if msg[2] & 0xF == Codec.RANS
                      else code.decode_reference)
            ms = cpu_ms(lambda: decode(payload, msg[3] + 1), reference_repeats)
            reference, reference_wall = f"{ms[0]:.1f}", f"{ms[1]:.1f}"
        lines.append(f"{label:>5} {what:<42} {len(msg):>7} {outcome:<13} {native_ms:>7.3f} "
                     f"{wall_ms:>7.3f} {reference:>9} {reference_wall:>10}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats, the reference once")
    add_tiny(ap)
    args = ap.parse_args()
    repeats, reference_repeats = (3, 1) if args.quick else (20, 3)
    frames = 256
    if args.tiny:
        repeats, reference_repeats, frames = 1, 1, 16
    print(f"decoders: {native.coder_status()}")
    print(f"{'width':>5} {'message':<42} {'bytes':>7} {'outcome':<13} {'cpu ms':>7} "
          f"{'wall ms':>7} {'py cpu ms':>9} {'py wall ms':>10}")
    for channels in (CHANNELS, wire.MAX_CODED_SYMBOLS // wire.MAX_FRAMES_PER_REQUEST):
        for line in measure(fitted_code(channels), str(channels), repeats, reference_repeats,
                            frames):
            print(line)
    print(f"'cpu/wall ms': wire.decode_request with the decoders above; 'py': the Python "
          f"reference decoder alone. A worker heartbeats every {HEARTBEAT_INTERVAL_S} s and "
          f"is declared dead after {HEARTBEAT_LIVENESS * HEARTBEAT_INTERVAL_S} s of silence; "
          f"it beats between messages and, in the reference, between frames.")


if __name__ == "__main__":
    main()
