"""The one conversion from a picture to the pixels a model reads, shared by training and the
edge: a model sees the same pixels for the same picture whether it was decoded from a training
folder or captured by a camera.

A model's input shape is (C, H, W): C = 1 reads gray, C = 3 reads RGB. Pixels are flat and
channel-major (all of channel 0, then channel 1, ...), uint8 as stored and float32 in [0, 1]
as fed. Sources arrive as OpenCV gives them (gray, BGR or BGRA, any size) and are resized by
stretching or by centre-cropping to the target's aspect ratio first.

OpenCV is imported only when a frame needs converting: replaying Fashion-MNIST, whose frames
are already 28x28 gray, works without the `camera` extra.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SourceError

__all__ = ["DEFAULT_SHAPE", "RESIZE_MODES", "IMAGE_EXTENSIONS", "opencv", "check_shape",
           "fit_frame", "to_pixels", "read_image", "image_size", "MAX_IMAGE_PIXELS"]

DEFAULT_SHAPE = (1, 28, 28)         # Fashion-MNIST: 28x28 gray
RESIZE_MODES = ("stretch", "crop")  # crop: centre region of the target's aspect ratio
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff")
AV_LOG_FATAL = 8                    # FFmpeg log level: only fatal errors
SOURCE_FORMS = "H x W gray, H x W x 1, H x W x 3 BGR or H x W x 4 BGRA"
# The most pixels a decoded picture or video frame may have (8192 x 4096; a 16-bit BGRA one
# is 256 MiB): a 1 MB PNG can claim 20000 x 20000 and cost gigabytes decoded. Checked from
# the file's header before decoding (PNG, JPEG, BMP), and by OpenCV itself for every format
# through OPENCV_IO_MAX_IMAGE_PIXELS, which it reads once, when first imported.
MAX_IMAGE_PIXELS = 1 << 25


def opencv() -> Any:
    """The cv2 module, imported on first use so an edge that only replays data needs none."""
    # FFmpeg logs every failed connection itself; callers report one line instead. It reads
    # this once, when OpenCV first uses it; a value the user set wins.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", str(AV_LOG_FATAL))
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
    try:
        import cv2
    except ImportError:
        raise SourceError("OpenCV is not installed: pip install 'splitexit[camera]'") from None
    return cv2


def check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """`shape` as (C, H, W) integers, or ValueError: a model reads gray or RGB only."""
    try:
        channels, height, width = (int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"input shape {shape!r}: give (C, H, W), three integers") from None
    if channels not in (1, 3) or height < 1 or width < 1:
        raise ValueError(f"input shape {tuple(shape)}: C must be 1 (gray) or 3 (RGB) and "
                         f"H, W at least 1")
    return channels, height, width


def _check_image(image: np.ndarray) -> np.ndarray:
    """The image as H x W (gray) or H x W x 3/4, or ValueError saying what is accepted."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"an image of dtype {image.dtype}: give uint8 ({SOURCE_FORMS}), as "
                         f"OpenCV reads an 8-bit picture")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"an image of shape {image.shape}: give {SOURCE_FORMS}")
    if image.size == 0:
        raise ValueError(f"an empty image of shape {image.shape}: give {SOURCE_FORMS} with "
                         f"H, W at least 1")
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


def _centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The largest centred region with the target's aspect ratio, so nothing is distorted."""
    h, w = image.shape[:2]
    if w * height > h * width:      # wider than the target: trim left and right
        keep = max(1, round(h * width / height))
        left = (w - keep) // 2
        return image[:, left:left + keep]
    keep = max(1, round(w * height / width))  # taller (or equal): trim top and bottom
    top = (h - keep) // 2
    return image[top:top + keep]


def fit_frame(image: np.ndarray, shape: tuple[int, int, int] = DEFAULT_SHAPE,
              resize: str = "stretch") -> np.ndarray:
    """A uint8 image as OpenCV reads it (gray, BGR or BGRA, any size) as the uint8 pixels a
    model of input `shape` (C, H, W) reads: flat (C*H*W,), channel-major, gray or RGB."""
    channels, height, width = check_shape(shape)
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r}: give one of {', '.join(RESIZE_MODES)}")
    image = _check_image(image)
    if channels == 1 and image.shape == (height, width):  # already the model's form
        return image.reshape(-1).copy()
    cv2 = opencv()
    if resize == "crop":
        image = np.ascontiguousarray(_centre_crop(image, height, width))
    # colour before size, as the edge always did: a gray target then matches old frames
    if image.ndim == 2:
        if channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif channels == 1:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    else:
        code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, code)
    h, w = image.shape[:2]
    if (h, w) != (height, width):
        # INTER_AREA averages the pixels it shrinks (others alias on large frames); it
        # degrades to nearest-neighbour when enlarging, where INTER_LINEAR is smoother
        shrinking = height <= h and width <= w
        image = cv2.resize(image, (width, height),
                           interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    if channels == 3:
        image = image.transpose(2, 0, 1)
    return np.ascontiguousarray(image).reshape(-1)


def to_pixels(image: np.ndarray, shape: tuple[int, int, int] = DEFAULT_SHAPE,
              resize: str = "stretch") -> np.ndarray:
    """The float32 (C*H*W,) pixels in [0, 1] a model is fed for `image` (see fit_frame)."""
    return fit_frame(image, shape, resize).astype(np.float32) / np.float32(255)


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG or BMP file; None for another
    format or a header it cannot read (OpenCV's own cap still applies when it decodes)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)     # a negative height: rows stored top-down
    if head[:2] == b"\xff\xd8":           # JPEG: walk the segments to a start of frame
        at = 2
        while at + 9 <= len(head) and head[at] == 0xFF:
            marker, length = head[at + 1], struct.unpack(">H", head[at + 2:at + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[at + 5:at + 9])
                return width, height
            at += 2 + length
    return None


HEADER_BYTES = 1 << 16   # where a JPEG's frame header is found after its EXIF and tables


def read_image(path: str | Path) -> Any:
    """The picture at `path` as OpenCV reads it (IMREAD_UNCHANGED: no EXIF rotation, alpha
    and 16 bits kept), or ValueError saying why not in a few words: unreadable, undecodable,
    or more than MAX_IMAGE_PIXELS (refused from its header, before anything is decoded)."""
    cv2 = opencv()
    try:
        with open(path, "rb") as f:
            size = image_size(f.read(HEADER_BYTES))
    except OSError as e:
        raise ValueError(f"cannot read it ({e.strerror})") from None
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"it is {size[0]} x {size[1]} pixels, more than the "
                         f"{MAX_IMAGE_PIXELS} a frame may have: scale it down")
    try:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:   # OpenCV's own pixel cap, or a decoder that gave up
        if "MAX_IMAGE_PIXELS" in str(e):
            raise ValueError(f"it has more than the {MAX_IMAGE_PIXELS} pixels a frame may "
                             f"have: scale it down") from None
        image = None
    if image is None:
        raise ValueError("OpenCV cannot decode it")
    return image
