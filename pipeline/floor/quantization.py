"""Uplink quantization: the features at the split as the dtypes the wire carries them.

The floor owns it, not the wire, because three sides apply the same arithmetic: the edge
before it sends (pipeline/protocol/wire.py frames the result), training when it fits the
static code on quantized features and trains for the uplink (pipeline/model/uplink.py
reproduces `quantize_unsigned` bit for bit), and the C coder, which quantizes from the same
float16 scales. The wire's header names a dtype by its DType value.

    FLOAT32, FLOAT16     the values as they are (float16 clipped to its range)
    INT8                 symmetric: codes -127..127 times one float16 scale per frame
    UINT8, UINT4, UINT2  for features after a ReLU (never negative): 0..2^bits-1 times one
                         float16 scale per frame (the frame's peak / (2^bits - 1)); rows are
                         packed low bits first and padded to a whole byte with zero bits
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["DType", "DTYPE_NAMES", "BITS", "UNSIGNED_BITS", "DTYPE_FOR_BITS", "SCALED",
           "FLOAT16_MAX", "SCALE_BYTES", "SCALE_MIN", "PackingError", "row_bytes", "quantize",
           "frame_scales", "quantize_unsigned", "unsigned_scales", "pack_bits", "unpack_bits",
           "dequantize", "dequantize_codes"]


class DType(IntEnum):
    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2    # symmetric, one float16 scale per frame
    # Unsigned, one float16 scale per frame; what quantization-aware training trains
    # (pipeline/model/uplink.py) is exactly this.
    UINT8 = 3
    UINT4 = 4
    UINT2 = 5


# The names users and metric labels see (--dtype int8).
DTYPE_NAMES = {"float32": DType.FLOAT32, "float16": DType.FLOAT16, "int8": DType.INT8,
               "uint8": DType.UINT8, "uint4": DType.UINT4, "uint2": DType.UINT2}
BITS = {DType.FLOAT32: 32, DType.FLOAT16: 16, DType.INT8: 8, DType.UINT8: 8, DType.UINT4: 4,
        DType.UINT2: 2}
UNSIGNED_BITS = {DType.UINT8: 8, DType.UINT4: 4, DType.UINT2: 2}
DTYPE_FOR_BITS = {bits: dtype for dtype, bits in UNSIGNED_BITS.items()}
SCALED = {DType.INT8, *UNSIGNED_BITS}   # one float16 scale per frame rides along
NUMPY = {DType.FLOAT32: np.dtype("<f4"), DType.FLOAT16: np.dtype("<f2"),
         DType.INT8: np.dtype("i1")}
FLOAT16_MAX = 65504.0
SCALE_BYTES = 2          # a float16 per frame of an integer dtype
SCALE_MIN = 2.0 ** -24   # the smallest positive float16: no frame's scale rounds to 0


class PackingError(ValueError):
    """Packed codes that no quantizer writes (the wire reports it as a bad field)."""


def row_bytes(dtype: DType, width: int) -> int:
    """Payload bytes of one frame's features (before any codec)."""
    return (width * BITS[dtype] + 7) // 8


def quantize(features: np.ndarray, dtype: DType) -> tuple[bytes, bytes]:
    """(payload, scales) for float32 features (frames, width). Scales are empty for floats."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if dtype == DType.FLOAT32:
        return x.tobytes(), b""
    if dtype == DType.FLOAT16:
        return np.clip(x, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2").tobytes(), b""
    if dtype == DType.INT8:
        scales = frame_scales(np.abs(x).max(axis=1), 127)
        q = np.clip(np.rint(x / scales[:, None].astype(np.float32)), -127, 127)
        return q.astype(np.int8).tobytes(), scales.tobytes()
    bits = UNSIGNED_BITS[dtype]
    q, scales = quantize_unsigned(x, bits)
    return pack_bits(q, bits).tobytes(), scales.tobytes()


def frame_scales(peak: np.ndarray, levels: int) -> np.ndarray:
    """Each frame's scale, peak / levels, as the float16 the wire carries (1 for a zero
    peak). Values are divided by the rounded scale, whose relative error is at most 2^-11:
    before rounding to a code a value moves by at most levels x 2^-11 of a code (0.12 for
    uint8, under 0.01 for uint4), and the peak is clipped to the top code. 2 bytes a frame
    instead of 4."""
    s = np.where(peak > 0, peak / np.float32(levels), np.float32(1)).astype(np.float32)
    return np.clip(s, SCALE_MIN, FLOAT16_MAX).astype("<f2")


def quantize_unsigned(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 (frames, width), float16 scales (frames,)): x clipped at 0, each frame
    scaled so its peak is the top code. The reference uplink.fake_quantize reproduces, and
    so does the C coder (StaticCode.encode_features), from these scales."""
    levels = (1 << bits) - 1
    scales = unsigned_scales(x, levels)
    q = np.clip(np.rint(np.maximum(x, 0) / scales[:, None].astype(np.float32)), 0, levels)
    return q.astype(np.uint8), scales


def unsigned_scales(x: np.ndarray, levels: int) -> np.ndarray:
    """Each frame's float16 scale for unsigned codes: its peak after clipping at 0."""
    return frame_scales(np.maximum(x.max(axis=1), 0), levels)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """(frames, width) codes < 2^bits -> (frames, row bytes) uint8, low bits first."""
    if bits == 8:
        return q
    per = 8 // bits
    frames, width = q.shape
    padded = np.zeros((frames, -(-width // per) * per), np.uint8)
    padded[:, :width] = q
    lanes = padded.reshape(frames, -1, per)
    packed = np.zeros(lanes.shape[:2], np.uint8)
    for j in range(per):
        packed |= lanes[..., j] << np.uint8(bits * j)
    return packed


def unpack_bits(raw: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Inverse of pack_bits; raises PackingError when padding bits are not zero."""
    if bits == 8:
        return raw
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    lanes = np.stack([(raw >> np.uint8(bits * j)) & mask for j in range(per)], axis=-1)
    codes = lanes.reshape(raw.shape[0], -1)
    if codes[:, width:].any():
        raise PackingError("padding bits after the last feature must be zero")
    return codes[:, :width]


def dequantize(raw: bytes, scales: bytes, dtype: DType, frames: int, width: int) -> np.ndarray:
    """float32 features (frames, width) from a payload in the dtype's layout and its scales."""
    if dtype in UNSIGNED_BITS:
        packed = np.frombuffer(raw, dtype=np.uint8).reshape(frames, row_bytes(dtype, width))
        return dequantize_codes(unpack_bits(packed, UNSIGNED_BITS[dtype], width), scales)
    values = np.frombuffer(raw, dtype=NUMPY[dtype]).reshape(frames, width)
    return dequantize_codes(values, scales) if dtype in SCALED else values.astype(np.float32)


def dequantize_codes(codes: np.ndarray, scales: bytes) -> np.ndarray:
    """Integer codes (frames, width) times their frame's float16 scale."""
    return codes.astype(np.float32) * np.frombuffer(scales, "<f2").astype(np.float32)[:, None]
