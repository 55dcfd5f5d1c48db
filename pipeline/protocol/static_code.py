"""A static entropy code for the uplink: one canonical Huffman code per feature channel.

The features of a trained bottleneck are far from uniform (after the ReLU about half the
4-bit codes are 0, and each channel has its own spread), and lz4 finds no repeats in 16
bytes. Training counts each channel's codes on the training frames and keeps only the code
lengths (`fit`); both artifacts carry them, so the edge and the worker build the same
canonical code, and a request says in its codec nibble that it used it. Every symbol gets a
code (counts start at 1), no code is longer than MAX_CODE_BITS, and decoding checks every bit
it reads: hostile bytes raise CodeError, never allocate more than the symbols asked for.
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["StaticCode", "CodeError", "MAX_CODE_BITS"]

MAX_CODE_BITS = 24


class CodeError(ValueError):
    """Bytes that are not a valid encoding under this code."""


class StaticCode:
    """Canonical Huffman codes, one per channel, over the symbols 0 .. symbols-1."""

    def __init__(self, lengths: np.ndarray):
        lengths = np.asarray(lengths)
        if lengths.ndim != 2 or lengths.size == 0 or lengths.min() < 1 or \
                lengths.max() > MAX_CODE_BITS:
            raise ValueError(f"code lengths must be (channels, symbols) in 1..{MAX_CODE_BITS}")
        for row in lengths:  # Kraft: a complete prefix code, or it is not ours
            if sum(2.0 ** -int(n) for n in row) != 1.0:
                raise ValueError("code lengths do not form a complete prefix code")
        self.lengths = lengths.astype(np.uint8)
        self.channels, self.symbols = lengths.shape
        self._codes = [self._canonical(row) for row in self.lengths.tolist()]
        self._decode = [{(n, c): s for s, (c, n) in enumerate(codes)} for codes in self._codes]

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
        """Code lengths from (frames, channels) training symbols; unseen symbols still get a
        (long) code, so any frame can be encoded."""
        lengths = []
        for column in np.asarray(codes).T:
            counts = np.bincount(column, minlength=symbols)[:symbols] + 1
            while True:
                row = _huffman_lengths(counts)
                if max(row) <= MAX_CODE_BITS:
                    break
                counts = (counts + 1) // 2 + 1  # flatten until the longest code fits
            lengths.append(row)
        return cls(np.array(lengths))

    def encode(self, codes: np.ndarray) -> bytes:
        """(frames, channels) symbols -> one bit string, MSB first, zero-padded to a byte."""
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
