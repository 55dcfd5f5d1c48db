"""The tables a static code is built from, given its frequencies (static_code.py's
StaticCode holds them): Huffman code lengths, limited to MAX_CODE_BITS; the canonical codes
of those lengths; and the flat arrays the coders read -- the Python reference, coder.c
through ctypes, and the exported C edge step (their compact device form).
"""

from __future__ import annotations

import functools
import heapq

import numpy as np

__all__ = ["MAX_CODE_BITS", "PROB_BITS", "COST_BITS", "CanonicalTables", "canonical_codes",
           "limited_lengths"]

MAX_CODE_BITS = 24
PROB_BITS = 12                      # frequencies of a channel sum to 2^12
COST_BITS = 16                      # rANS's cost of a symbol, in 2^-16 bits (exact sums)


def limited_lengths(freq: list[int]) -> list[int]:
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


def canonical_codes(lengths: list[int]) -> list[tuple[int, int]]:
    """(code, length) per symbol: shorter codes first, then by symbol (RFC 1951 3.2.2)."""
    codes, code, prev = [None] * len(lengths), 0, 0
    for n, s in sorted((n, s) for s, n in enumerate(lengths)):
        code <<= n - prev
        codes[s], code, prev = (code, n), code + 1, n
    return codes


class CanonicalTables:
    """The arrays both decoders read (coder.c takes them as they are, row-major):
    per channel and code length n (1 .. MAX_CODE_BITS), `limit[n]`: the first window of
    MAX_CODE_BITS bits, read MSB first, that a code of length n is too short for (canonical
    codes of one length are consecutive, shorter ones sort first); `base[n]`: where the
    codes of length n start in `order`, minus the first of them; `order`: the symbols in
    code order; `minimum`: the shortest length. The Huffman encoder: each symbol's `code`
    value (uint32) and `length`. rANS: `freq`, `cum` (cumulative frequencies, a leading 0)
    and `rcp` (uint64, what its encoder multiplies by instead of dividing by freq). Sizing
    both: `cost` (rANS's bits, 2^-16 units). A device's form of all of it (coder.c's
    static_encode_compact): `entry`, uint16 (length - 1) << 12 | cum.
    All channels x symbols unless said otherwise."""

    def __init__(self, lengths: np.ndarray, frequencies: np.ndarray,
                 codes: list[list[tuple[int, int]]], cost: np.ndarray):
        channels, symbols = lengths.shape
        self.code = np.array([[value for value, _ in row] for row in codes], np.uint32)
        self.length = np.ascontiguousarray(lengths, np.uint8)
        top = MAX_CODE_BITS
        self.limit = np.zeros((channels, top + 1), np.uint32)
        self.base = np.zeros((channels, top + 1), np.int32)
        self.order = np.argsort(lengths, axis=1, kind="stable").astype(np.uint8)
        self.minimum = lengths.min(axis=1).astype(np.uint8)
        for c, row in enumerate(lengths.tolist()):
            first = offset = 0
            for n in range(1, top + 1):
                count = row.count(n)
                self.base[c, n] = offset - first
                self.limit[c, n] = (first + count) << (top - n)
                first, offset = (first + count) << 1, offset + count
        self.freq = np.ascontiguousarray(frequencies, np.uint16)
        self.cum = np.concatenate([np.zeros((channels, 1), np.uint16),
                                   np.cumsum(frequencies, axis=1).astype(np.uint16)], axis=1)
        # floor(2^43 / freq) + 1: rANS's encoder multiplies by it instead of dividing
        self.rcp = (np.uint64(1 << 43) // self.freq.astype(np.uint64) + np.uint64(1))
        self.cost = np.ascontiguousarray(cost, np.uint32)
        # the addresses coder.c takes, once (numpy's .ctypes costs a microsecond a call); the
        # arrays live as long as this object
        self.encoder = tuple(a.ctypes.data for a in (self.code, self.length, self.freq,
                                                       self.cum, self.rcp, self.cost))
        self.huffman_decoder = tuple(a.ctypes.data for a in (self.limit, self.base,
                                                               self.order, self.minimum))
        self._lists: tuple | None = None

    @functools.cached_property
    def entry(self) -> np.ndarray:
        """The device's form (only the C export asks for it): (length - 1) << 12 | cum as
        uint16; a frequency is the next cum minus this one. Lengths fit 4 bits: a Huffman
        code 17 deep needs a total weight of at least Fibonacci(19) = 4181 > 2^12; cum fits
        12 (every later frequency is at least 1)."""
        if self.length.max() > 16:
            raise ValueError("a code length above 16: no StaticCode builds one")
        return ((self.length.astype(np.uint16) - 1) << 12 | self.cum[:, :-1]).astype(np.uint16)

    def lists(self) -> tuple[list, list, list, list]:
        """The Huffman tables as Python lists (what the reference indexes fastest)."""
        if self._lists is None:
            self._lists = (self.limit.tolist(), self.base.tolist(), self.order.tolist(),
                           self.minimum.tolist())
        return self._lists
