"""A static entropy code for the uplink, fitted per model: per-channel symbol frequencies.

The features of a trained bottleneck are far from uniform (after the ReLU half the 4-bit
codes or more are 0, and each channel has its own spread), and lz4 finds no repeats in a few
dozen bytes. Training counts each channel's codes on the training frames (`fit`); both
artifacts carry the frequencies (12-bit, every symbol at least 1), so the edge and the
worker build the same two coders from them:

- canonical Huffman (Codec.STATIC): a whole number of bits per feature, at least 1, no
  state to flush: best for narrow splits;
- rANS (Codec.RANS, Duda 2013; byte-wise as in ryg_rans): fractions of a bit per feature
  and 4 bytes of final state: best for wide, sparse splits, where a 0 costs well under a bit.

The edge sends whichever is smaller for each message. Decoding checks every step: hostile
bytes raise CodeError, and never allocate more than the symbols asked for.

Both ways run in C (coder.c, through pipeline.floor.native) where it builds: the edge
quantizes and encodes a pack in one call, the worker decodes a pack in one call. The Python
coders (`*_reference`) define the bytes: tests hold the C coder to them, and they run where
no compiler is. The tables both read are built in code_tables.py.
"""

from __future__ import annotations

import ctypes
import math
from typing import Callable

import numpy as np

from pipeline.floor import native
from pipeline.floor.code_tables import (COST_BITS, MAX_CODE_BITS, PROB_BITS, CanonicalTables,
                                        canonical_codes, limited_lengths)

__all__ = ["StaticCode", "CodeError", "ERRORS", "ENCODE_ERRORS", "ENCODE_CAP", "ENCODE_SYMBOL",
           "ENCODE_TABLE"]

_TOTAL = 1 << PROB_BITS
_LOW = 1 << 23                      # rANS state lives in [2^23, 2^31)
_BYTE = 8 << COST_BITS
# How far rANS's size may stray from its cost: a quarter byte, and 2^-8 bits a symbol (its
# rounding costs under 2^-11; payload_bounds allows the same).
_SLACK, _SLACK_PER_SYMBOL = _BYTE // 4, 1 << (COST_BITS - 8)

Tick = Callable[[], None]
# What a decoder refuses, by the code coder.c returns (0 is success); the Python reference
# raises the same text, so both give one outcome for any bytes.
HUFFMAN_CODE, HUFFMAN_TAIL, RANS_SHORT, RANS_RANGE, RANS_END, RANS_FINAL = range(1, 7)
ERRORS = {
    HUFFMAN_CODE: "the bits end inside a code, or no code matches",
    HUFFMAN_TAIL: "bytes left over after the last frame, or padding bits not zero",
    RANS_SHORT: "an rANS payload holds at least its 4-byte state",
    RANS_RANGE: "the coder state left its range",
    RANS_END: "the bytes end inside a frame",
    RANS_FINAL: "the final state or the byte count is not what the encoder left",
}
# What an encoder refuses, by the negative code coder.c returns.
ENCODE_CAP, ENCODE_SYMBOL, ENCODE_TABLE = -1, -2, -3
ENCODE_ERRORS = {
    ENCODE_CAP: "the output buffer is too small",
    ENCODE_SYMBOL: "a code is not below the code's symbol count",
    ENCODE_TABLE: "a code table entry no StaticCode builds",
}


class CodeError(ValueError):
    """Bytes that are not a valid encoding under this code."""


class StaticCode:
    """Per-channel coders over the symbols 0 .. symbols-1, from their frequencies."""

    def __init__(self, frequencies: np.ndarray):
        freq = np.asarray(frequencies)
        if freq.ndim != 2 or freq.size == 0 or freq.shape[1] < 2 or freq.min() < 1 or \
                np.any(freq.sum(axis=1) != _TOTAL):
            raise ValueError(f"frequencies must be (channels, symbols >= 2), each at least 1, "
                             f"each row summing to {_TOTAL}")
        self.frequencies = freq.astype(np.uint16)
        self.channels, self.symbols = freq.shape
        self.lengths = np.array([limited_lengths(row) for row in freq.tolist()], np.uint8)
        self._codes = [canonical_codes(row) for row in self.lengths.tolist()]
        rows = self.frequencies.astype(np.int64)
        self._bits = -np.log2(rows / _TOTAL)  # what rANS spends on each (channel, symbol)
        self._cum = np.concatenate([np.zeros((self.channels, 1), np.int64),
                                    np.cumsum(rows, axis=1)], axis=1).tolist()
        self._freq = rows.tolist()
        self._slot = [np.repeat(np.arange(self.symbols), row).tolist() for row in rows]
        # rANS's cost of each (channel, symbol) in 2^-16 bits: the edge sizes both coders with
        # exact integer sums, so native and reference make the same choice for any symbols
        self._cost = np.rint(self._bits * (1 << COST_BITS)).astype(np.uint32)
        self._tables = CanonicalTables(self.lengths, self.frequencies, self._codes, self._cost)
        # the fewest and most bits one frame can cost: the bounds of an honest payload
        self._huffman_bits = (int(self.lengths.min(axis=1).sum()),
                              int(self.lengths.max(axis=1).sum()))
        self._rans_bits = (float(self._bits.min(axis=1).sum()),
                           float(self._bits.max(axis=1).sum()))

    @classmethod
    def fit(cls, codes: np.ndarray, symbols: int) -> "StaticCode":
        """Frequencies from (frames, channels) training symbols; unseen symbols still get a
        share, so any frame can be encoded."""
        rows = []
        for column in np.asarray(codes).T:
            counts = np.bincount(column, minlength=symbols)[:symbols] + 1.0
            freq = np.maximum(1, np.floor(counts / counts.sum() * _TOTAL)).astype(np.int64)
            freq[np.argmax(freq)] += _TOTAL - freq.sum()  # exact total; the largest absorbs
            rows.append(freq)
        return cls(np.array(rows))

    def encode_smallest(self, codes: np.ndarray) -> tuple[bytes, bool]:
        """(the shorter of the Huffman and rANS encodings, whether it is rANS); Huffman on a
        tie. Both lengths are known before encoding, up to a byte for rANS (it writes
        between bits/8 + 3 and bits/8 + 4 bytes: the bits its 23-bit start state carries,
        and a 4-byte flush), so only a close call pays for both encoders. One C call when
        the native coder is built (coder.c's static_encode_smallest), the same decisions
        in the same integers otherwise."""
        lib = native.coder()
        if lib is None:
            return self.encode_smallest_reference(codes)
        codes = self._checked(codes, in_c=True)
        frames = len(codes)
        cap = self._cap(frames, False) + self._cap(frames, True)
        out, is_rans = np.empty(cap, np.uint8), ctypes.c_int32(0)
        n = lib.static_encode_smallest(*self._args(codes), *self._tables.encoder, out.ctypes.data,
                                       cap, ctypes.byref(is_rans))
        return _written(out, n), bool(is_rans.value)

    def encode_features(self, x: np.ndarray, scales: np.ndarray,
                        levels: int) -> tuple[np.ndarray, bytes, bool] | None:
        """(codes, payload, whether it is rANS) for float32 features (frames, channels) and
        each frame's scale (float32 values of the wire's float16 ones): what
        quantization.quantize_unsigned and encode_smallest give, bit for bit, in one C call
        that also sizes both codes while it quantizes (the NumPy around the coder cost the
        edge more than the coder). None without the native coder: the caller quantizes in
        NumPy and calls encode_smallest."""
        lib = native.coder()
        if lib is None:
            return None
        frames = len(x)
        if x.dtype != np.float32 or not x.flags.c_contiguous or x.shape != (frames, self.channels) \
                or scales.dtype != np.float32 or scales.shape != (frames,):
            raise ValueError(f"features must be C-contiguous float32 (frames, {self.channels}) "
                             f"and scales float32 (frames,)")
        scales = np.ascontiguousarray(scales)
        codes = np.empty((frames, self.channels), np.uint8)
        cap = self._cap(frames, False) + self._cap(frames, True)
        out, is_rans = np.empty(cap, np.uint8), ctypes.c_int32(0)
        n = lib.static_quantize_encode(x.ctypes.data, scales.ctypes.data, levels,
                                       *self._args(codes), *self._tables.encoder,
                                       out.ctypes.data, cap, ctypes.byref(is_rans))
        return codes, _written(out, n), bool(is_rans.value)

    def encode_smallest_reference(self, codes: np.ndarray) -> tuple[bytes, bool]:
        """encode_smallest with the Python encoders; its decisions in the same integers."""
        codes = self._checked(codes)
        channel = np.arange(self.channels)
        huffman = (int(self.lengths[channel, codes].sum(dtype=np.int64)) + 7) // 8 * _BYTE
        rans = int(self._cost[channel, codes].sum(dtype=np.int64))
        slack = _SLACK + codes.size * _SLACK_PER_SYMBOL
        if huffman + slack <= rans + 3 * _BYTE:
            return self.encode_reference(codes), False
        if huffman > rans + 4 * _BYTE + slack:
            return self.encode_rans_reference(codes), True
        coded, ransed = self.encode_reference(codes), self.encode_rans_reference(codes)
        return (coded, False) if len(coded) <= len(ransed) else (ransed, True)

    def _checked(self, codes: np.ndarray, in_c: bool = False) -> np.ndarray:
        """(frames, channels) uint8 codes, C-contiguous; ValueError for a wrong shape or a
        code out of range (uint8 codes going to the C coder: it checks the range itself)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.channels:
            raise ValueError(f"codes must be (frames, {self.channels}), not {codes.shape}")
        if (codes.dtype != np.uint8 or not in_c) and codes.size and \
                (codes.min() < 0 or codes.max() >= self.symbols):
            raise ValueError(f"{ENCODE_ERRORS[ENCODE_SYMBOL]} ({self.symbols})")
        return np.ascontiguousarray(codes, np.uint8)

    def _cap(self, frames: int, rans: bool) -> int:
        """Bytes that hold any encoding of `frames` frames (payload_bounds' most, and room
        for its rounding)."""
        return self.payload_bounds(frames, rans)[1] + 8

    def _args(self, codes: np.ndarray) -> tuple:
        return codes.ctypes.data, codes.shape[0], self.channels, self.symbols

    def _encode_native(self, function, codes: np.ndarray, rans: bool, *tables: int) -> bytes:
        codes = self._checked(codes, in_c=True)
        cap = self._cap(len(codes), rans)
        out = np.empty(cap, np.uint8)
        return _written(out, function(*self._args(codes), *tables, out.ctypes.data, cap))

    # -- Huffman ---------------------------------------------------------------------------

    def encode(self, codes: np.ndarray) -> bytes:
        """Huffman: (frames, channels) symbols -> one bit string, MSB first, zero-padded.
        Native when the C coder is built, else the Python reference."""
        lib = native.coder()
        if lib is None:
            return self.encode_reference(codes)
        return self._encode_native(lib.huffman_encode, codes, False,
                                   *self._tables.encoder[:2])

    def encode_reference(self, codes: np.ndarray) -> bytes:
        """Huffman in Python. Whole bytes leave the accumulator once it holds 64 bits, so it
        never grows with the message (shifting one integer as long as the message made
        encoding quadratic)."""
        out, acc, bits = bytearray(), 0, 0
        tables = self._codes
        for row in self._checked(codes).tolist():
            for channel, symbol in enumerate(row):
                code, n = tables[channel][symbol]
                acc, bits = (acc << n) | code, bits + n
                if bits >= 64:
                    whole, bits = bits // 8, bits % 8
                    out += (acc >> bits).to_bytes(whole, "big")
                    acc &= (1 << bits) - 1
        pad = -bits % 8
        out += (acc << pad).to_bytes((bits + pad) // 8, "big")
        return bytes(out)

    def decode(self, data: bytes, frames: int, tick: Tick | None = None) -> np.ndarray:
        """Inverse of encode for `frames` frames; the bytes must hold exactly them. Native
        when the C coder is built (pipeline.floor.native), else the Python reference,
        which calls `tick` after each frame (a worker heartbeats from it)."""
        lib = native.coder()
        if lib is None:
            return self.decode_reference(data, frames, tick)
        return self._native(lib.huffman_decode, data, frames, *self._tables.huffman_decoder)

    def decode_reference(self, data: bytes, frames: int, tick: Tick | None = None) -> np.ndarray:
        """Canonical decoding in Python, linear in the bytes: a bit buffer of at most 31 bits
        refilled a byte at a time; a window of MAX_CODE_BITS bits, compared against each
        length's limit, gives the length and then the symbol (what coder.c does)."""
        out = np.empty((frames, self.channels), np.uint8)
        limits, bases, orders, minimums = self._tables.lists()
        acc = bits = pos = 0
        size, top = len(data), MAX_CODE_BITS
        for f in range(frames):
            row = []
            for channel in range(self.channels):
                while bits < top and pos < size:
                    acc, bits, pos = (acc << 8) | data[pos], bits + 8, pos + 1
                window = acc << (top - bits) if bits < top else acc >> (bits - top)
                limit, n = limits[channel], minimums[channel]
                while n <= top and window >= limit[n]:
                    n += 1
                if n > top or n > bits:
                    raise CodeError(ERRORS[HUFFMAN_CODE])
                bits -= n
                acc &= (1 << bits) - 1
                row.append(orders[channel][bases[channel][n] + (window >> (top - n))])
            out[f] = row
            if tick is not None:
                tick()
        if bits + 8 * (size - pos) >= 8 or acc:
            raise CodeError(ERRORS[HUFFMAN_TAIL])
        return out

    def payload_bounds(self, frames: int, rans: bool) -> tuple[int, int]:
        """(fewest, most) bytes the encoder can write for `frames` frames: a payload outside
        is refused before decoding. Huffman writes its bits rounded up to a byte. rANS
        writes its 4-byte state plus the bits its symbols cost beyond the 23 of the start
        state (up to 8 fewer, as the final state holds them), each step off by at most
        2^-11 of the state: less than 2^-8 bits a symbol, counted on both sides."""
        if not rans:
            low, high = self._huffman_bits
            return -(-frames * low // 8), -(-frames * high // 8)
        low, high = self._rans_bits
        slack = frames * self.channels / 256
        return (4 + max(0, math.floor((frames * low - slack - 8) / 8)),
                4 + math.ceil((frames * high + slack) / 8))

    def _native(self, function, data: bytes, frames: int, *tables: int) -> np.ndarray:
        out = np.empty((frames, self.channels), np.uint8)
        rc = function(data, len(data), frames, self.channels, self.symbols, *tables,
                      out.ctypes.data)
        if rc:
            raise CodeError(ERRORS[rc])
        return out

    # -- rANS ------------------------------------------------------------------------------

    def encode_rans(self, codes: np.ndarray) -> bytes:
        """rANS: symbols coded last to first, so the decoder reads them first to last.
        Native when the C coder is built, else the Python reference."""
        lib = native.coder()
        if lib is None:
            return self.encode_rans_reference(codes)
        return self._encode_native(lib.rans_encode, codes, True, *self._tables.encoder[2:4])

    def encode_rans_reference(self, codes: np.ndarray) -> bytes:
        """rANS in Python (what coder.c's rans_encode does)."""
        out = bytearray()
        x = _LOW
        freq, cum = self._freq, self._cum
        for row in reversed(self._checked(codes).tolist()):
            for channel in range(self.channels - 1, -1, -1):
                symbol = row[channel]
                f = freq[channel][symbol]
                limit = ((_LOW >> PROB_BITS) << 8) * f
                while x >= limit:
                    out.append(x & 0xFF)
                    x >>= 8
                x = ((x // f) << PROB_BITS) + (x % f) + cum[channel][symbol]
        out += x.to_bytes(4, "little")
        out.reverse()
        return bytes(out)

    def decode_rans(self, data: bytes, frames: int, tick: Tick | None = None) -> np.ndarray:
        """Inverse of encode_rans; the bytes must hold exactly `frames` frames. Native when
        the C coder is built, else the Python reference (which calls `tick` per frame)."""
        lib = native.coder()
        if lib is None:
            return self.decode_rans_reference(data, frames, tick)
        return self._native(lib.rans_decode, data, frames, *self._tables.encoder[2:4])

    def decode_rans_reference(self, data: bytes, frames: int,
                              tick: Tick | None = None) -> np.ndarray:
        """rANS decoding in Python: each step checks the state's range and the bytes left."""
        if len(data) < 4:
            raise CodeError(ERRORS[RANS_SHORT])
        out = np.empty((frames, self.channels), np.uint8)
        x, pos = int.from_bytes(data[:4], "big"), 4
        freq, cum, slots = self._freq, self._cum, self._slot
        mask = _TOTAL - 1
        for f in range(frames):
            row = []
            for channel in range(self.channels):
                if not _LOW <= x < _LOW << 8:
                    raise CodeError(ERRORS[RANS_RANGE])
                slot = x & mask
                symbol = slots[channel][slot]
                row.append(symbol)
                x = freq[channel][symbol] * (x >> PROB_BITS) + slot - cum[channel][symbol]
                while x < _LOW:
                    if pos == len(data):
                        raise CodeError(ERRORS[RANS_END])
                    x, pos = (x << 8) | data[pos], pos + 1
            out[f] = row
            if tick is not None:
                tick()
        if x != _LOW or pos != len(data):
            raise CodeError(ERRORS[RANS_FINAL])
        return out


def _written(out: np.ndarray, n: int) -> bytes:
    """The bytes a C encoder wrote, or its refusal as a ValueError."""
    if n < 0:
        raise ValueError(ENCODE_ERRORS.get(n, f"encoder error {n}"))
    return out[:n].tobytes()
