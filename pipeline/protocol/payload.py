"""A REQUEST's payload: the features quantized to the request's dtype (pipeline/floor/
quantization.py) and packed by its codec, and the checked way back. wire.py frames it.

An edge asks for a codec; the payload says which one it got: lz4 only when it shrinks the
quantized bytes, the model's static code (Huffman or rANS, whichever is smaller) only when
it shrinks the packed codes, else the bytes as they are (Codec.NONE).

An entropy-coded payload (STATIC, RANS) has a budget the header sets before a bit of it is
decoded: at most MAX_CODED_SYMBOLS features (an edge sends a larger pack as packed codes),
fewer bytes than those packed codes (the edge codes only when that shrinks them), and within
what the model's code can write for that many frames (StaticCode.payload_bounds). Both
decoders are linear, so the largest legal message costs a worker a few ms of CPU (see
workers/tail_worker.py). Every bad payload raises WireError with a short reason.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Callable

import lz4.block
import numpy as np

from pipeline.floor.quantization import (SCALED, UNSIGNED_BITS, DType, PackingError,
                                         dequantize, dequantize_codes, pack_bits, quantize,
                                         quantize_unsigned, row_bytes, unsigned_scales)
from pipeline.floor.static_code import CodeError, StaticCode

__all__ = ["Codec", "CODEC_NAMES", "WireError", "encode_payload", "decode_payload",
           "MAX_PAYLOAD_BYTES", "MAX_CODED_SYMBOLS"]

MAX_PAYLOAD_BYTES = 4 << 20        # decoded payload cap; a 400-wide float32 batch of 256 is 400 KB
MAX_CODED_SYMBOLS = 1 << 18        # features one entropy-coded request may carry (256 x 1024);
                                   # an edge sends a larger pack as packed bits


class Codec(IntEnum):
    NONE = 0
    LZ4 = 1     # lz4 block; used only when it shrinks the payload
    STATIC = 2  # the model's static code (floor/static_code.py), Huffman, over unsigned codes
    RANS = 3    # the same code's frequencies through rANS; an edge asked for the static
                # code sends the smaller of the two, and only when it shrinks the payload


CODEC_NAMES = {"lz4": Codec.LZ4, "none": Codec.NONE, "static": Codec.STATIC}


class WireError(Exception):
    """A peer sent bytes that are not a valid message; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_payload(features: np.ndarray, dtype: DType, codec: Codec,
                   code: StaticCode | None) -> tuple[bytes, bytes, Codec]:
    """(scales, payload, the codec used) for features (frames, width). Codec.STATIC needs
    the model's `code` and an unsigned dtype; like lz4 it is used only when it shrinks the
    payload."""
    frames, width = features.shape
    if codec == Codec.STATIC:
        if code is None or dtype not in UNSIGNED_BITS or code.channels != width:
            raise ValueError("the static codec needs the model's code and an unsigned dtype")
        bits = UNSIGNED_BITS[dtype]
        levels = (1 << bits) - 1
        x = np.ascontiguousarray(features, dtype=np.float32)
        s = unsigned_scales(x, levels)
        scales = s.tobytes()
        codable = frames * width <= MAX_CODED_SYMBOLS   # more: sent packed, as too many to decode
        fused = code.encode_features(x, s.astype(np.float32), levels) if codable else None
        if fused is not None:                           # quantized and coded in one C call
            symbols, coded, is_rans = fused
        else:
            symbols, _ = quantize_unsigned(x, bits)
            coded, is_rans = code.encode_smallest(symbols) if codable else (b"", False)
        if coded and len(coded) < frames * row_bytes(dtype, width):
            return scales, coded, Codec.RANS if is_rans else Codec.STATIC
        return scales, pack_bits(symbols, bits).tobytes(), Codec.NONE
    payload, scales = quantize(features, dtype)
    if codec == Codec.LZ4:
        packed = lz4.block.compress(payload, store_size=False)
        if len(packed) < len(payload):
            return scales, packed, codec
        codec = Codec.NONE
    return scales, payload, codec


def decode_payload(payload: bytes, scales: bytes, dtype: DType, codec: Codec, n: int,
                   width: int, code: StaticCode | None,
                   tick: Callable[[], None] | None) -> np.ndarray:
    """The float32 features (n, width) of a payload whose header the caller has checked (the
    width, the decoded size within MAX_PAYLOAD_BYTES, the scales' length); `code` and `tick`
    as wire.decode_request takes them."""
    expected = n * row_bytes(dtype, width)
    codes = None  # the entropy codecs give codes, the others bytes in the dtype's layout
    if codec in (Codec.STATIC, Codec.RANS):
        codes = _static_decode(payload, code, codec, dtype, n, width, tick)
    else:
        if codec == Codec.LZ4:
            if len(payload) > expected + expected // 255 + 16:  # lz4's worst case for it
                raise WireError("size", f"compressed payload {len(payload)} B too large")
            try:
                payload = lz4.block.decompress(payload, uncompressed_size=expected)
            except Exception:  # LZ4BlockError, or anything lz4 raises on hostile bytes
                raise WireError("decompress", "payload is not a valid lz4 block") from None
        if len(payload) != expected:
            raise WireError("shape", f"payload is {len(payload)} B, {n}x{width} {dtype.name} "
                                     f"needs {expected}")
    if dtype in SCALED:
        s = np.frombuffer(scales, dtype="<f2")
        if not np.all(np.isfinite(s) & (s > 0)):
            raise WireError("nonfinite", "scales must be finite and positive")
    try:
        features = (dequantize(payload, scales, dtype, n, width) if codes is None
                    else dequantize_codes(codes, scales))
    except PackingError as e:
        raise WireError("field", str(e)) from None
    if not np.isfinite(features).all():
        raise WireError("nonfinite", "features contain NaN or Inf")
    return features


def _static_decode(payload: bytes, code: StaticCode | None, codec: Codec, dtype: DType,
                   n: int, width: int, tick: Callable[[], None] | None) -> np.ndarray:
    """The unsigned codes (n, width) a STATIC or RANS payload encodes, checked like any.
    The budget comes first, from the header alone: no more symbols than MAX_CODED_SYMBOLS,
    fewer bytes than the packed codes (an edge codes only when that shrinks them), and as
    many as this code can write for n frames; the decoders then cost one pass each."""
    if code is None or dtype not in UNSIGNED_BITS or code.channels != width or \
            code.symbols != 1 << UNSIGNED_BITS[dtype]:
        raise WireError("codec", "static code payload for a model whose code this side lacks")
    if n * width > MAX_CODED_SYMBOLS:
        raise WireError("size", f"{n}x{width} coded features exceed {MAX_CODED_SYMBOLS}; "
                                f"send fewer frames a message")
    low, high = code.payload_bounds(n, codec == Codec.RANS)
    high = min(high, n * row_bytes(dtype, width) - 1)
    if not low <= len(payload) <= high:
        raise WireError("size", f"static-coded payload of {len(payload)} B: {n} frames take "
                                f"{low}..{high} B")
    try:
        return (code.decode if codec == Codec.STATIC else code.decode_rans)(payload, n, tick)
    except CodeError as e:
        raise WireError("decompress", str(e)) from None
