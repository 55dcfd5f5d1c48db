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
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["StaticCode", "CodeError", "MAX_CODE_BITS", "PROB_BITS"]

MAX_CODE_BITS = 24
PROB_BITS = 12                      # frequencies of a channel sum to 2^12
_TOTAL = 1 << PROB_BITS
_LOW = 1 << 23                      # rANS state lives in [2^23, 2^31)
_SLACK_BYTES = 0.25                 # rANS's rounding costs under 2^-11 bits a symbol


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
        self.lengths = np.array([_limited_lengths(row) for row in freq.tolist()], np.uint8)
        self._codes = [self._canonical(row) for row in self.lengths.tolist()]
        self._decode = [{(n, c): s for s, (c, n) in enumerate(codes)} for codes in self._codes]
        rows = self.frequencies.astype(np.int64)
        self._bits = -np.log2(rows / _TOTAL)  # what rANS spends on each (channel, symbol)
        self._channel = np.arange(self.channels)
        self._cum = np.concatenate([np.zeros((self.channels, 1), np.int64),
                                    np.cumsum(rows, axis=1)], axis=1).tolist()
        self._freq = rows.tolist()
        self._slot = [np.repeat(np.arange(self.symbols), row).tolist() for row in rows]

    @staticmethod
    def _canonical(lengths: list[int]) -> list[tuple[int, int]]:
        """(code, length) per symbol: shorter codes first, then by symbol (RFC 1951 3.2.2)."""
        codes, code, prev = [None] * len(lengths), 0, 0
        for n, s in sorted((n, s) for s, n in enumerate(lengths)):
            code <<= n - prev
            codes[s], code, prev = (code, n), code + 1, n
        return codes

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
        and a 4-byte flush), so only a close call pays for both encoders."""
        codes = np.asarray(codes)
        huffman = (int(self.lengths[self._channel, codes].sum()) + 7) // 8
        rans = float(self._bits[self._channel, codes].sum()) / 8
        if huffman <= rans + 3 - _SLACK_BYTES:
            return self.encode(codes), False
        if huffman > rans + 4 + _SLACK_BYTES:
            return self.encode_rans(codes), True
        coded, ransed = self.encode(codes), self.encode_rans(codes)
        return (coded, False) if len(coded) <= len(ransed) else (ransed, True)

    # -- Huffman ---------------------------------------------------------------------------

    def encode(self, codes: np.ndarray) -> bytes:
        """Huffman: (frames, channels) symbols -> one bit string, MSB first, zero-padded."""
        acc, bits = 0, 0
        tables = self._codes
        for row in np.asarray(codes).tolist():
            for channel, symbol in enumerate(row):
                code, n = tables[channel][symbol]
                acc, bits = (acc << n) | code, bits + n
        pad = -bits % 8
        return (acc << pad).to_bytes((bits + pad) // 8, "big")

    def decode(self, data: bytes, frames: int) -> np.ndarray:
        """Inverse of encode for `frames` frames; the bytes must hold exactly them."""
        out = np.empty((frames, self.channels), np.uint8)
        value = int.from_bytes(data, "big")
        left = 8 * len(data)  # bits not yet read
        tables = self._decode
        for f in range(frames):
            for channel in range(self.channels):
                table, code, n = tables[channel], 0, 0
                while True:
                    if n == MAX_CODE_BITS or left == 0:
                        raise CodeError("the bits end inside a code, or no code matches")
                    left -= 1
                    code, n = (code << 1) | ((value >> left) & 1), n + 1
                    symbol = table.get((n, code))
                    if symbol is not None:
                        out[f, channel] = symbol
                        break
        if left >= 8 or value & ((1 << left) - 1):
            raise CodeError("bytes left over after the last frame, or padding bits not zero")
        return out

    # -- rANS ------------------------------------------------------------------------------

    def encode_rans(self, codes: np.ndarray) -> bytes:
        """rANS: symbols coded last to first, so the decoder reads them first to last."""
        out = bytearray()
        x = _LOW
        freq, cum = self._freq, self._cum
        for row in reversed(np.asarray(codes).tolist()):
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

    def decode_rans(self, data: bytes, frames: int) -> np.ndarray:
        """Inverse of encode_rans; the bytes must hold exactly `frames` frames."""
        if len(data) < 4:
            raise CodeError("an rANS payload holds at least its 4-byte state")
        out = np.empty((frames, self.channels), np.uint8)
        x, pos = int.from_bytes(data[:4], "big"), 4
        freq, cum, slots = self._freq, self._cum, self._slot
        mask = _TOTAL - 1
        for f in range(frames):
            for channel in range(self.channels):
                if not _LOW <= x < _LOW << 8:
                    raise CodeError("the coder state left its range")
                slot = x & mask
                symbol = slots[channel][slot]
                out[f, channel] = symbol
                x = freq[channel][symbol] * (x >> PROB_BITS) + slot - cum[channel][symbol]
                while x < _LOW:
                    if pos == len(data):
                        raise CodeError("the bytes end inside a frame")
                    x, pos = (x << 8) | data[pos], pos + 1
        if x != _LOW or pos != len(data):
            raise CodeError("the final state or the byte count is not what the encoder left")
        return out


def _limited_lengths(freq: list[int]) -> list[int]:
    """Huffman code lengths for these frequencies, flattened until none exceeds the limit."""
    counts = np.asarray(freq, np.int64)
    while True:
        lengths = _huffman_lengths(counts)
        if max(lengths) <= MAX_CODE_BITS:
            return lengths
        counts = (counts + 1) // 2 + 1


def _huffman_lengths(counts: np.ndarray) -> list[int]:
    """Code length per symbol of a Huffman code for these (positive) counts."""
    if len(counts) == 1:
        return [1]
    heap = [(int(c), [s]) for s, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = [0] * len(counts)
    while len(heap) > 1:
        (a, left), (b, right) = heapq.heappop(heap), heapq.heappop(heap)
        for s in left + right:
            lengths[s] += 1
        heapq.heappush(heap, (a + b, left + right))
    return lengths
