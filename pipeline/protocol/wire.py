"""The wire format: every message between edge, broker and worker. The only place it lives.

A message is one ZeroMQ frame. It starts with two bytes, [version, kind]; the hot path (a
request up, a reply down) is a fixed little-endian binary header, so an offloaded frame
costs its features plus 16 bytes (2 more of ZMTP framing), not a msgpack map of names:

    REQUEST    version u8, kind u8, dtype << 4 | codec u8, frames - 1 u8, msg_id u32,
               model_tag 4 B, width u16                                        (14 B)
               + one float16 scale per frame (integer dtypes) + the payload
    REPLY      version u8, kind u8, msg_id u32, batch u16, queue_us u32, tail_us u32,
               queued u16, free_credit u16, len(worker_id) u8                  (21 B)
               + worker_id (utf-8) + a class per frame (u8) + a confidence per frame (f16);
               class UNKNOWN_CLASS (255): the tail found the frame unlike anything it was
               trained on (pipeline/floor/unfamiliar.py), its confidence 0
    SHADOW     the REQUEST layout under its own kind (see Kind.SHADOW)
    ERROR      [version, kind] + msgpack [msg_id, reason, detail]   (a refusal of a request)
    READY      [version, kind] + msgpack [worker_id, model_tag, credit]   worker -> broker
    HEARTBEAT  [version, kind]                            both ways, broker <-> worker
    DISCONNECT [version, kind]                            both ways, see Kind

The broker answers a READY with a HEARTBEAT at once: the worker's proof that the broker
knows it (its readiness), instead of waiting up to a heartbeat interval. It stamps every
REPLY it forwards with its load (`stamp_load`): requests waiting in its queue and the free
credit of its workers, so an edge slows down before the pool refuses it (a worker writes 0).

A request is self-contained (any worker can serve it after a redelivery): the 4-byte model
tag says which model produced the features, `width` their size, `dtype`/`codec` a nibble
each. An edge may pack up to 256 frames into one request; answers come back in that order.
Decoding trusts nothing: sizes are capped before anything is decompressed, shape x dtype must
equal the payload length, values must be finite. Every bad input raises WireError with a
short reason (a bounded metric label), never anything else.

The payload (features quantized to a dtype by pipeline/floor/quantization.py, packed by a
codec, with the entropy codes' budget) is payload.py's; this module frames it. Users import
the wire from here alone: the dtypes, codecs and WireError a header and its checks name are
imported into this module's API. MAX_REQUEST_BYTES and MAX_REPLY_BYTES are the largest
legal messages each way: the ZMQ_MAXMSGSIZE of the sockets that receive them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import struct

import msgpack
import numpy as np

from pipeline.floor.quantization import (DTYPE_FOR_BITS, DTYPE_NAMES, SCALE_BYTES, SCALED,
                                         UNSIGNED_BITS, DType, row_bytes)
from pipeline.floor.static_code import StaticCode
from pipeline.protocol.payload import (CODEC_NAMES, MAX_CODED_SYMBOLS, MAX_PAYLOAD_BYTES, Codec,
                                       WireError, decode_payload, encode_payload)

__all__ = ["VERSION", "Kind", "DType", "Codec", "Refusal", "DTYPE_NAMES",
           "CODEC_NAMES", "REFUSAL_NAMES", "WireError", "Request", "Reply",
           "Error", "Ready", "encode_request", "decode_request", "encode_reply", "encode_error",
           "encode_ready", "HEARTBEAT", "DISCONNECT", "decode_control", "decode_answer",
           "peek", "stamp_load", "REQUEST_KINDS", "row_bytes", "wire_bytes",
           "UNKNOWN_CLASS", "MAX_CLASSES",
           "model_tag", "MODEL_TAG_BYTES", "SCALE_BYTES", "UNSIGNED_BITS", "DTYPE_FOR_BITS",
           "MAX_FRAMES_PER_REQUEST", "MAX_MSG_ID", "REQUEST_HEADER_BYTES",
           "MAX_CODED_SYMBOLS", "MAX_REQUEST_BYTES", "MAX_REPLY_BYTES"]

# 1 was the msgpack-array layout, 2 had an 8-byte tag and float32 scales, 3 replies without
# the broker's load; a peer speaking another version is told "version"
VERSION = 4
MODEL_TAG_BYTES = 4
MAX_FRAMES_PER_REQUEST = 256       # what one edge packs into a message
MAX_WIDTH = 1 << 16                # features per frame at the split
MAX_HEADER_BYTES = 4096            # an ERROR or READY message
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
    SHADOW = 7       # a REQUEST, same layout, for frames the exit already answered (to
                     # measure it): the broker takes it only while a worker has free credit
                     # and nothing is queued, else refuses it BUSY at once


REQUEST_KINDS = (Kind.REQUEST, Kind.SHADOW)   # what a worker serves


class Refusal(IntEnum):
    """Why a request was not answered with a prediction (ERROR messages)."""
    BUSY = 1           # broker queue full: answer locally now
    WRONG_MODEL = 2    # the worker serves another model id
    BAD_REQUEST = 3    # the request did not decode
    NO_WORKER = 4      # nothing could serve it in time


# The names metric labels see (reason="busy").
REFUSAL_NAMES = {r: r.name.lower() for r in Refusal}   # busy, wrong_model, ...


@dataclass(frozen=True, slots=True)
class Request:
    msg_id: int
    model_tag: bytes
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
    queued: int = 0             # requests waiting in the broker when it forwarded this one
    free_credit: int = 0        # requests the broker's live workers could still take then


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


# -- encoding -------------------------------------------------------------------------------

_pack = msgpack.Packer(use_bin_type=True).pack
_PREFIX = struct.Struct("<BB")                 # version, kind: the start of every message
_REQUEST = struct.Struct("<BBBBI4sH")          # + dtype<<4|codec, frames-1, msg_id, tag, width
_REPLY = struct.Struct("<BBIHIIHHB")   # + msg_id, batch, queue_us, tail_us, queued, free_credit,
_LOAD = struct.Struct("<HH")           # len(worker); the broker rewrites queued, free_credit
_LOAD_OFFSET = struct.calcsize("<BBIHII")   # after version, kind, msg_id, batch, queue_us, tail_us
REQUEST_HEADER_BYTES = _REQUEST.size           # 14
UNKNOWN_CLASS = 255        # a REPLY's class byte for `unknown`: no class of the model
MAX_CLASSES = UNKNOWN_CLASS   # classes a model may have: each one's index fits a u8 below it
MAX_MSG_ID = (1 << 32) - 1                     # msg ids are u32; an edge wraps to 1 after this
U32_MAX = (1 << 32) - 1
_REPLY_MAX_WORKER_BYTES = 255
# ZMQ_MAXMSGSIZE for whoever receives requests (broker frontend, worker): the header, a scale
# per frame, and lz4's worst case for the largest payload (an entropy-coded payload is always
# shorter than the packed codes it replaces, so it is smaller still).
MAX_REQUEST_BYTES = (REQUEST_HEADER_BYTES + SCALE_BYTES * MAX_FRAMES_PER_REQUEST
                     + MAX_PAYLOAD_BYTES + MAX_PAYLOAD_BYTES // 255 + 16)
# ... and for whoever receives from workers: a REPLY (header, worker id, 3 B a frame), or an
# ERROR / READY, which decoding refuses above MAX_HEADER_BYTES.
MAX_REPLY_BYTES = max(MAX_HEADER_BYTES, _REPLY.size + _REPLY_MAX_WORKER_BYTES
                      + 3 * MAX_FRAMES_PER_REQUEST)


def encode_request(msg_id: int, model_tag: bytes, features: np.ndarray,
                   dtype: DType = DType.INT8, codec: Codec = Codec.LZ4,
                   code: StaticCode | None = None, shadow: bool = False) -> list[bytes]:
    """[request] for one or more frames' features (frames, width): one frame, the fixed
    header, the scales, the payload. Codec.STATIC needs the model's `code` and an unsigned
    dtype; like lz4 it is used only when it shrinks the payload."""
    frames, width = features.shape
    if len(model_tag) != MODEL_TAG_BYTES:  # struct would pad or cut it silently
        raise ValueError(f"a model tag is {MODEL_TAG_BYTES} bytes (wire.model_tag)")
    scales, payload, codec = encode_payload(features, dtype, codec, code)
    header = _REQUEST.pack(VERSION, Kind.SHADOW if shadow else Kind.REQUEST,
                           int(dtype) << 4 | int(codec), frames - 1, msg_id, model_tag, width)
    return [header + scales + payload]


def encode_reply(msg_id: int, worker_id: str, classes: np.ndarray, confidences: np.ndarray,
                 queue_us: int, tail_us: int, batch: int) -> list[bytes]:
    worker = worker_id.encode()[:_REPLY_MAX_WORKER_BYTES]
    return [_REPLY.pack(VERSION, Kind.REPLY, msg_id, min(int(batch), 0xFFFF),
                        min(int(queue_us), U32_MAX), min(int(tail_us), U32_MAX), 0, 0,
                        len(worker))
            + worker + np.asarray(classes, dtype=np.uint8).tobytes()
            + np.asarray(confidences, dtype="<f2").tobytes()]


def stamp_load(answer: bytes, queued: int, free_credit: int) -> bytes:
    """A worker's answer as the broker forwards it: a REPLY gets the broker's load written
    into its header (saturating at 65535), anything else passes unchanged. The broker has
    peeked it, so a REPLY is at least a header long."""
    if answer[1:2] != bytes([Kind.REPLY]):
        return answer
    stamped = bytearray(answer)
    _LOAD.pack_into(stamped, _LOAD_OFFSET, min(queued, 0xFFFF), min(free_credit, 0xFFFF))
    return bytes(stamped)


def _control(kind: Kind, body: list) -> list[bytes]:
    return [_PREFIX.pack(VERSION, kind) + _pack(body)]


def encode_error(msg_id: int, reason: Refusal, detail: str) -> list[bytes]:
    return _control(Kind.ERROR, [msg_id, int(reason), detail[:MAX_DETAIL_CHARS]])


def encode_ready(worker_id: str, model_tag: bytes, credit: int) -> list[bytes]:
    return _control(Kind.READY, [worker_id, model_tag, credit])


HEARTBEAT = [_PREFIX.pack(VERSION, Kind.HEARTBEAT)]
DISCONNECT = [_PREFIX.pack(VERSION, Kind.DISCONNECT)]


# -- decoding -------------------------------------------------------------------------------

def _prefix(frame) -> tuple[bytes, Kind]:
    data = bytes(frame)
    if len(data) < _PREFIX.size:
        raise WireError("malformed", f"a message is at least {_PREFIX.size} bytes")
    if data[0] != VERSION:
        raise WireError("version", f"version {data[0]}, this side speaks {VERSION}")
    return data, _enum(data[1], Kind, "kind")


def _single(frames: list, what: str) -> tuple[bytes, Kind]:
    """The one frame every message is, and its kind."""
    if len(frames) != 1:
        raise WireError("malformed", f"{what} has 1 frame, got {len(frames)}")
    return _prefix(frames[0])


def _items(data: bytes, kind: Kind, count: int) -> list:
    """The `count` items of an ERROR's or READY's body."""
    fields = _body(data)
    if len(fields) != count:
        raise WireError("field", f"{kind.name} has {count} items")
    return fields


def _body(data: bytes) -> list:
    """The msgpack body of an ERROR or READY (off the hot path)."""
    if len(data) > MAX_HEADER_BYTES:
        raise WireError("size", f"message of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        fields = msgpack.unpackb(data[_PREFIX.size:], raw=False, strict_map_key=True,
                                 use_list=True, max_bin_len=MAX_HEADER_BYTES,
                                 max_str_len=MAX_HEADER_BYTES, max_array_len=16,
                                 max_map_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types for bad bytes
        raise WireError("malformed", f"body is not msgpack ({type(e).__name__})") from None
    if not isinstance(fields, list):
        raise WireError("malformed", "body is not an array")
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
    """(kind, msg_id) of any message: all the broker needs to route it (0 for control)."""
    data, kind = _prefix(frame)
    if kind in REQUEST_KINDS:
        if len(data) < _REQUEST.size:
            raise WireError("malformed", f"a request header is {_REQUEST.size} bytes")
        return kind, _REQUEST.unpack_from(data)[4]
    if kind == Kind.REPLY:
        if len(data) < _REPLY.size:
            raise WireError("malformed", f"a reply header is {_REPLY.size} bytes")
        return kind, _REPLY.unpack_from(data)[2]
    if kind == Kind.ERROR:
        body = _body(data)
        if not body:
            raise WireError("field", "ERROR starts with its msg_id")
        return kind, _int(body[0], "msg_id", 0, MAX_MSG_ID)
    return kind, 0


def decode_request(frames: list, code: StaticCode | None = None,
                   tick: Callable[[], None] | None = None,
                   serves: bytes | None = None) -> Request:
    """The request in `frames`; `code` is this side's model's static code, if it has one;
    `tick` is called between frames while the Python reference decodes an entropy-coded
    payload (a worker heartbeats from it; the C coder never runs long enough to need it).
    With `serves` (the model tag of this side), a request for another model raises
    WireError("wrong_model") from its fixed header, before the payload is touched: another
    model's features do not decode under this model's code, and must not read as bad bytes."""
    data, kind = _single(frames, "a request")
    if kind not in REQUEST_KINDS or len(data) < _REQUEST.size:
        raise WireError("kind", "not a request")
    _, _, types, n, msg_id, model_tag, width = _REQUEST.unpack_from(data)
    if serves is not None and model_tag != serves:
        raise WireError("wrong_model", f"request is for model {model_tag.hex()}")
    dtype, codec = _enum(types >> 4, DType, "dtype"), _enum(types & 0xF, Codec, "codec")
    n += 1
    if not 1 <= width <= MAX_WIDTH:
        raise WireError("field", f"width must be an integer in [1, {MAX_WIDTH}]")
    expected = n * row_bytes(dtype, width)
    if expected > MAX_PAYLOAD_BYTES:
        raise WireError("size", f"{n}x{width} {dtype.name} exceeds {MAX_PAYLOAD_BYTES} bytes")
    scale_bytes = SCALE_BYTES * n if dtype in SCALED else 0
    if len(data) < _REQUEST.size + scale_bytes:
        raise WireError("shape", f"{n} frames of {dtype.name} need {scale_bytes} B of scales")
    scales = data[_REQUEST.size:_REQUEST.size + scale_bytes]
    payload = data[_REQUEST.size + scale_bytes:]
    features = decode_payload(payload, scales, dtype, codec, n, width, code, tick)
    return Request(msg_id, model_tag, features)


def decode_answer(frames: list) -> Reply | Error:
    """What comes back to an edge: a REPLY or an ERROR."""
    data, kind = _single(frames, "an answer")
    if kind == Kind.ERROR:
        f = _items(data, kind, 3)
        return Error(_int(f[0], "msg_id", 0, MAX_MSG_ID), _enum(f[1], Refusal, "reason"),
                     _str(f[2], "detail"))
    if kind != Kind.REPLY or len(data) < _REPLY.size:
        raise WireError("kind", "not a reply or error")
    _, _, msg_id, batch, queue_us, tail_us, queued, free_credit, worker_len = \
        _REPLY.unpack_from(data)
    rest = data[_REPLY.size:]
    if len(rest) < worker_len:
        raise WireError("shape", "reply ends inside its worker id")
    try:
        worker_id = rest[:worker_len].decode()
    except UnicodeDecodeError:
        raise WireError("field", "worker id is not utf-8") from None
    answers = rest[worker_len:]
    n = len(answers) // 3
    if len(answers) % 3 or not 1 <= n <= MAX_FRAMES_PER_REQUEST or batch < 1:
        raise WireError("shape", "classes and confidences must cover the same frames")
    confidences = np.frombuffer(answers[n:], dtype="<f2").astype(np.float32)
    if not np.isfinite(confidences).all():
        raise WireError("nonfinite", "confidences contain NaN or Inf")
    return Reply(msg_id, worker_id, np.frombuffer(answers[:n], dtype=np.uint8), confidences,
                 queue_us, tail_us, batch, queued, free_credit)


def decode_control(frames: list) -> Ready | Kind:
    """A worker's READY, or the bare kind of a HEARTBEAT/DISCONNECT."""
    data, kind = _single(frames, "a control message")
    if kind == Kind.READY:
        f = _items(data, kind, 3)
        return Ready(_str(f[0], "worker_id"), _bytes(f[1], "model_tag", MODEL_TAG_BYTES),
                     _int(f[2], "credit", 1, 1 << 16))
    if kind in (Kind.HEARTBEAT, Kind.DISCONNECT):
        if len(data) != _PREFIX.size:
            raise WireError("malformed", f"{kind.name} is {_PREFIX.size} bytes")
        return kind
    raise WireError("kind", f"{kind.name} is not a control message")


def wire_bytes(frames: list) -> int:
    """Bytes on the wire for a multipart message: ZMTP 3 adds 2 B a frame (9 above 255 B)."""
    return sum(len(f) + (2 if len(f) < 256 else 9) for f in frames)


def model_tag(model_id: str) -> bytes:
    """The 4-byte tag on the wire for a hex model id from pipeline.artifacts: its first
    bytes (a content hash; two models a pool serves at once collide with odds 2^-32)."""
    try:
        tag = bytes.fromhex(model_id)[:MODEL_TAG_BYTES]
    except ValueError:
        tag = b""
    if len(tag) != MODEL_TAG_BYTES:
        raise ValueError(f"model id {model_id!r} is not hex of at least {MODEL_TAG_BYTES} bytes")
    return tag
