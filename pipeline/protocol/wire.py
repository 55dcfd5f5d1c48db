"""The wire format: every message between edge, broker and worker. The only place it lives.

A message is a list of ZeroMQ frames. Frame 0 is a msgpack *array* (positions, not string
keys: a map with names would cost more than the 40-byte payload it carries) whose first three
items are always [version, kind, msg_id]; a request adds frame 1, the raw feature bytes, so
payloads are never copied into msgpack.

    REQUEST    [v, 1, msg_id, producer_id, model_tag, capture_ts_us, frame_ids, width,
                dtype, codec, scales]                          + [payload]
    REPLY      [v, 2, msg_id, worker_id, classes, confidences, [queue_us, tail_us, batch]]
    ERROR      [v, 3, msg_id, reason, detail]                  (refusal of a request)
    READY      [v, 4, 0, worker_id, model_tag, credit]         worker -> broker
    HEARTBEAT  [v, 5, 0]                                       both ways, broker <-> worker
    DISCONNECT [v, 6, 0]                                       both ways, see Kind

The broker answers a READY with a HEARTBEAT at once: the worker's proof that the broker
knows it (its readiness), instead of waiting up to a heartbeat interval.

A request is self-contained (any worker can serve it after a redelivery): the 8-byte model
tag says which model produced the features, `width` their size, `dtype`/`codec` one small
integer each. An edge may pack several frames into one request (`frame_ids`, one row each).
Decoding trusts nothing: sizes are capped before anything is decompressed, shape x dtype must
equal the payload length, values must be finite. Every bad input raises WireError with a
short reason (a bounded metric label), never anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import lz4.block
import msgpack
import numpy as np

__all__ = ["VERSION", "Kind", "Field", "DType", "Codec", "Refusal", "DTYPE_NAMES",
           "CODEC_NAMES", "REFUSAL_NAMES", "WireError", "Request", "Reply",
           "Error", "Ready", "encode_request", "decode_request", "encode_reply", "encode_error",
           "encode_ready", "HEARTBEAT", "DISCONNECT", "decode_control", "decode_answer",
           "peek", "quantize", "quantize_unsigned", "dequantize", "row_bytes", "wire_bytes",
           "model_tag", "MODEL_TAG_BYTES",
           "MAX_FRAMES_PER_REQUEST"]

VERSION = 1
MODEL_TAG_BYTES = 8
MAX_FRAMES_PER_REQUEST = 256       # what one edge packs into a message
MAX_WIDTH = 1 << 16                # features per frame at the split
MAX_PAYLOAD_BYTES = 4 << 20        # decoded payload cap; a 400-wide float32 batch of 256 is 400 KB
MAX_HEADER_BYTES = 4096            # a request header is ~45 B plus 5 B per packed frame id
MAX_DETAIL_CHARS = 200             # error detail text
UINT64_MAX = (1 << 64) - 1


class Kind(IntEnum):
    REQUEST = 1      # edge -> broker -> worker: features to run the tail on
    REPLY = 2        # worker -> broker -> edge: classes and confidences
    ERROR = 3        # broker or worker -> edge: a refusal (Refusal says why)
    READY = 4        # worker -> broker: serve me requests, I hold `credit` at once
    HEARTBEAT = 5    # broker <-> worker: alive (any message counts as one)
    DISCONNECT = 6   # worker -> broker: draining, send nothing new;
                     # broker -> worker: I do not know you, announce yourself (READY) again


class Field(IntEnum):
    """Positions in a REQUEST header (the hot path; other kinds are short)."""
    VERSION = 0
    KIND = 1
    MSG_ID = 2
    PRODUCER_ID = 3
    MODEL_TAG = 4
    CAPTURE_TS_US = 5
    FRAME_IDS = 6
    WIDTH = 7
    DTYPE = 8
    CODEC = 9
    SCALES = 10


REQUEST_FIELDS = len(Field)


class DType(IntEnum):
    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2    # symmetric, one float32 scale per frame
    # Unsigned, for features after a ReLU (never negative): 0..2^bits-1 times one float32
    # scale per frame (the frame's peak / (2^bits - 1)). Rows are packed low bits first and
    # padded to a whole byte with zero bits. What quantization-aware training trains
    # (pipeline/model/uplink.py) is exactly this.
    UINT8 = 3
    UINT4 = 4
    UINT2 = 5


class Codec(IntEnum):
    NONE = 0
    LZ4 = 1     # lz4 block; used only when it shrinks the payload


class Refusal(IntEnum):
    """Why a request was not answered with a prediction (ERROR messages)."""
    BUSY = 1           # broker queue full: answer locally now
    WRONG_MODEL = 2    # the worker serves another model id
    BAD_REQUEST = 3    # the request did not decode
    NO_WORKER = 4      # nothing could serve it in time


# The names users and metric labels see (--dtype int8, reason="busy").
DTYPE_NAMES = {"float32": DType.FLOAT32, "float16": DType.FLOAT16, "int8": DType.INT8,
               "uint8": DType.UINT8, "uint4": DType.UINT4, "uint2": DType.UINT2}
CODEC_NAMES = {"lz4": Codec.LZ4, "none": Codec.NONE}
REFUSAL_NAMES = {r: r.name.lower() for r in Refusal}   # busy, wrong_model, ...


BITS = {DType.FLOAT32: 32, DType.FLOAT16: 16, DType.INT8: 8, DType.UINT8: 8, DType.UINT4: 4,
        DType.UINT2: 2}
UNSIGNED_BITS = {DType.UINT8: 8, DType.UINT4: 4, DType.UINT2: 2}
DTYPE_FOR_BITS = {bits: dtype for dtype, bits in UNSIGNED_BITS.items()}
SCALED = {DType.INT8, *UNSIGNED_BITS}   # one float32 scale per frame rides along
NUMPY = {DType.FLOAT32: np.dtype("<f4"), DType.FLOAT16: np.dtype("<f2"),
         DType.INT8: np.dtype("i1")}
FLOAT16_MAX = 65504.0


def row_bytes(dtype: DType, width: int) -> int:
    """Payload bytes of one frame's features (before any codec)."""
    return (width * BITS[dtype] + 7) // 8


class WireError(Exception):
    """A peer sent bytes that are not a valid message; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Request:
    msg_id: int
    producer_id: int
    model_tag: bytes
    capture_ts_us: int
    frame_ids: tuple[int, ...]
    features: np.ndarray        # (frames, width) float32, dequantized


@dataclass(frozen=True, slots=True)
class Reply:
    msg_id: int
    worker_id: str
    classes: np.ndarray         # (frames,) uint8
    confidences: np.ndarray     # (frames,) float32
    queue_us: int
    tail_us: int
    batch: int


@dataclass(frozen=True, slots=True)
class Error:
    msg_id: int
    reason: Refusal
    detail: str


@dataclass(frozen=True, slots=True)
class Ready:
    worker_id: str
    model_tag: bytes
    credit: int


# -- quantization ---------------------------------------------------------------------------

def quantize(features: np.ndarray, dtype: DType) -> tuple[bytes, bytes]:
    """(payload, scales) for float32 features (frames, width). Scales are empty for floats."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if dtype == DType.FLOAT32:
        return x.tobytes(), b""
    if dtype == DType.FLOAT16:
        return np.clip(x, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2").tobytes(), b""
    if dtype == DType.INT8:
        peak = np.abs(x).max(axis=1)
        scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
        q = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
        return q.tobytes(), scales.tobytes()
    bits = UNSIGNED_BITS[dtype]
    q, scales = quantize_unsigned(x, bits)
    return _pack_bits(q, bits).tobytes(), scales.tobytes()


def quantize_unsigned(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 (frames, width), float32 scales (frames,)): x clipped at 0, each frame
    scaled so its peak is the top code. The reference uplink.fake_quantize reproduces."""
    levels = (1 << bits) - 1
    x = np.maximum(x, 0)
    peak = x.max(axis=1)
    scales = np.where(peak > 0, peak / np.float32(levels), np.float32(1)).astype("<f4")
    q = np.clip(np.rint(x / scales[:, None]), 0, levels).astype(np.uint8)
    return q, scales


def _pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
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


def _unpack_bits(raw: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Inverse of _pack_bits; raises WireError when padding bits are not zero."""
    if bits == 8:
        return raw
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    lanes = np.stack([(raw >> np.uint8(bits * j)) & mask for j in range(per)], axis=-1)
    codes = lanes.reshape(raw.shape[0], -1)
    if codes[:, width:].any():
        raise WireError("field", "padding bits after the last feature must be zero")
    return codes[:, :width]


def dequantize(raw: bytes, scales: bytes, dtype: DType, frames: int, width: int) -> np.ndarray:
    if dtype in UNSIGNED_BITS:
        packed = np.frombuffer(raw, dtype=np.uint8).reshape(frames, row_bytes(dtype, width))
        values = _unpack_bits(packed, UNSIGNED_BITS[dtype], width).astype(np.float32)
    else:
        values = np.frombuffer(raw, dtype=NUMPY[dtype]).reshape(frames, width).astype(np.float32)
    if dtype in SCALED:
        values *= np.frombuffer(scales, dtype="<f4")[:, None]
    return values


# -- encoding -------------------------------------------------------------------------------

_pack = msgpack.Packer(use_bin_type=True).pack


def encode_request(msg_id: int, producer_id: int, model_tag: bytes, capture_ts_us: int,
                   frame_ids: list[int], features: np.ndarray, dtype: DType = DType.INT8,
                   codec: Codec = Codec.LZ4) -> list[bytes]:
    """[header, payload] for one or more frames' features (frames, width)."""
    frames, width = features.shape
    raw, scales = quantize(features, dtype)
    payload = raw
    if codec == Codec.LZ4:
        packed = lz4.block.compress(raw, store_size=False)
        payload, codec = (packed, Codec.LZ4) if len(packed) < len(raw) else (raw, Codec.NONE)
    header = _pack([VERSION, Kind.REQUEST, msg_id, producer_id, model_tag, capture_ts_us,
                    list(frame_ids), width, int(dtype), int(codec), scales])
    return [header, payload]


def encode_reply(msg_id: int, worker_id: str, classes: np.ndarray, confidences: np.ndarray,
                 queue_us: int, tail_us: int, batch: int) -> list[bytes]:
    return [_pack([VERSION, Kind.REPLY, msg_id, worker_id,
                   np.asarray(classes, dtype=np.uint8).tobytes(),
                   np.asarray(confidences, dtype="<f2").tobytes(),
                   [int(queue_us), int(tail_us), int(batch)]])]


def encode_error(msg_id: int, reason: Refusal, detail: str) -> list[bytes]:
    return [_pack([VERSION, Kind.ERROR, msg_id, int(reason), detail[:MAX_DETAIL_CHARS]])]


def encode_ready(worker_id: str, model_tag: bytes, credit: int) -> list[bytes]:
    return [_pack([VERSION, Kind.READY, 0, worker_id, model_tag, credit])]


HEARTBEAT = [_pack([VERSION, Kind.HEARTBEAT, 0])]
DISCONNECT = [_pack([VERSION, Kind.DISCONNECT, 0])]


# -- decoding -------------------------------------------------------------------------------

def _unpack_header(frame) -> list:
    data = bytes(frame)
    if len(data) > MAX_HEADER_BYTES:
        raise WireError("size", f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                                 max_bin_len=MAX_HEADER_BYTES, max_str_len=MAX_HEADER_BYTES,
                                 max_array_len=MAX_FRAMES_PER_REQUEST + 16, max_map_len=0,
                                 max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types for bad bytes
        raise WireError("malformed", f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(fields, list) or len(fields) < 3:
        raise WireError("malformed", "header is not an array of at least 3 items")
    if fields[0] != VERSION or type(fields[0]) is not int:
        raise WireError("version", f"version {fields[0]!r}, this side speaks {VERSION}")
    _int(fields[2], "msg_id")
    return fields


def _int(value, name: str, lo: int = 0, hi: int = UINT64_MAX) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise WireError("field", f"{name} must be an integer in [{lo}, {hi}]")
    return value


def _bytes(value, name: str, length: int | None = None) -> bytes:
    if type(value) is not bytes or (length is not None and len(value) != length):
        want = f"{length} bytes" if length is not None else "bytes"
        raise WireError("field", f"{name} must be {want}")
    return value


def _str(value, name: str) -> str:
    if type(value) is not str or len(value) > MAX_DETAIL_CHARS:
        raise WireError("field", f"{name} must be a string of at most {MAX_DETAIL_CHARS} chars")
    return value


def _enum(value, cls, name: str):
    try:
        return cls(_int(value, name, 0, 255))
    except ValueError:
        raise WireError("field", f"unknown {name} {value}") from None


def peek(frame) -> tuple[Kind, int]:
    """(kind, msg_id) of any message: all the broker needs to route it."""
    fields = _unpack_header(frame)
    return _enum(fields[1], Kind, "kind"), fields[2]


def decode_request(frames: list) -> Request:
    if len(frames) != 2:
        raise WireError("malformed", f"a request has 2 frames, got {len(frames)}")
    f = _unpack_header(frames[0])
    if len(f) != REQUEST_FIELDS or f[Field.KIND] != Kind.REQUEST:
        raise WireError("kind", "not a request header")
    msg_id, producer_id = f[Field.MSG_ID], _int(f[Field.PRODUCER_ID], "producer_id")
    model_tag = _bytes(f[Field.MODEL_TAG], "model_tag", MODEL_TAG_BYTES)
    capture_ts_us = _int(f[Field.CAPTURE_TS_US], "capture_ts_us")
    ids = f[Field.FRAME_IDS]
    if type(ids) is not list or not 1 <= len(ids) <= MAX_FRAMES_PER_REQUEST:
        raise WireError("field", f"frame_ids must list 1..{MAX_FRAMES_PER_REQUEST} ids")
    frame_ids = tuple(_int(i, "frame id") for i in ids)
    width = _int(f[Field.WIDTH], "width", 1, MAX_WIDTH)
    dtype, codec = _enum(f[Field.DTYPE], DType, "dtype"), _enum(f[Field.CODEC], Codec, "codec")
    scales = _bytes(f[Field.SCALES], "scales")
    n = len(frame_ids)
    expected = n * row_bytes(dtype, width)
    if expected > MAX_PAYLOAD_BYTES:
        raise WireError("size", f"{n}x{width} {dtype.name} exceeds {MAX_PAYLOAD_BYTES} bytes")
    payload = bytes(frames[1])
    if codec == Codec.NONE:
        raw = payload
    else:
        if len(payload) > expected + expected // 255 + 16:  # lz4's worst case for this size
            raise WireError("size", f"compressed payload {len(payload)} B too large")
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=expected)
        except Exception:  # LZ4BlockError, or anything lz4 raises on hostile bytes
            raise WireError("decompress", "payload is not a valid lz4 block") from None
    if len(raw) != expected:
        raise WireError("shape", f"payload is {len(raw)} B, {n}x{width} {dtype.name} needs "
                                 f"{expected}")
    if len(scales) != (4 * n if dtype in SCALED else 0):
        raise WireError("field", "scales must hold one float32 per frame for integer dtypes, "
                                 "else none")
    if dtype in SCALED:
        s = np.frombuffer(scales, dtype="<f4")
        if not np.all(np.isfinite(s) & (s > 0)):
            raise WireError("nonfinite", "scales must be finite and positive")
    features = dequantize(raw, scales, dtype, n, width)
    if not np.isfinite(features).all():
        raise WireError("nonfinite", "features contain NaN or Inf")
    return Request(msg_id, producer_id, model_tag, capture_ts_us, frame_ids, features)


def decode_answer(frames: list) -> Reply | Error:
    """What comes back to an edge: a REPLY or an ERROR."""
    if len(frames) != 1:
        raise WireError("malformed", f"an answer has 1 frame, got {len(frames)}")
    f = _unpack_header(frames[0])
    kind = _enum(f[1], Kind, "kind")
    if kind == Kind.ERROR and len(f) == 5:
        return Error(f[2], _enum(f[3], Refusal, "reason"), _str(f[4], "detail"))
    if kind != Kind.REPLY or len(f) != 7:
        raise WireError("kind", "not a reply or error")
    worker_id = _str(f[3], "worker_id")
    classes, conf = _bytes(f[4], "classes"), _bytes(f[5], "confidences")
    if not 1 <= len(classes) <= MAX_FRAMES_PER_REQUEST or len(conf) != 2 * len(classes):
        raise WireError("shape", "classes and confidences must cover the same frames")
    timing = f[6]
    if type(timing) is not list or len(timing) != 3:
        raise WireError("field", "timing must be [queue_us, tail_us, batch]")
    confidences = np.frombuffer(conf, dtype="<f2").astype(np.float32)
    if not np.isfinite(confidences).all():
        raise WireError("nonfinite", "confidences contain NaN or Inf")
    return Reply(f[2], worker_id, np.frombuffer(classes, dtype=np.uint8), confidences,
                 _int(timing[0], "queue_us"), _int(timing[1], "tail_us"),
                 _int(timing[2], "batch", 1, 1 << 20))


def decode_control(frames: list) -> Ready | Kind:
    """A worker's READY, or the bare kind of a HEARTBEAT/DISCONNECT."""
    if len(frames) != 1:
        raise WireError("malformed", f"a control message has 1 frame, got {len(frames)}")
    f = _unpack_header(frames[0])
    kind = _enum(f[1], Kind, "kind")
    if kind == Kind.READY:
        if len(f) != 6:
            raise WireError("field", "READY has 6 items")
        return Ready(_str(f[3], "worker_id"), _bytes(f[4], "model_tag", MODEL_TAG_BYTES),
                     _int(f[5], "credit", 1, 1 << 16))
    if kind in (Kind.HEARTBEAT, Kind.DISCONNECT):
        return kind
    raise WireError("kind", f"{kind.name} is not a control message")


def wire_bytes(frames: list) -> int:
    """Bytes on the wire for a multipart message: ZMTP 3 adds 2 B a frame (9 above 255 B)."""
    return sum(len(f) + (2 if len(f) < 256 else 9) for f in frames)


def model_tag(model_id: str) -> bytes:
    """The 8-byte tag on the wire for a hex model id from pipeline.artifacts."""
    tag = bytes.fromhex(model_id)
    if len(tag) != MODEL_TAG_BYTES:
        raise ValueError(f"model id {model_id!r} is not {MODEL_TAG_BYTES} bytes of hex")
    return tag
