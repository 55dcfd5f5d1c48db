"""Small generated colour image folders for tests: each class one coloured shape at a random
place and size on a noisy background, so a tiny conv net learns them in a few epochs and a
test needs no download."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# name -> BGR colour: each class differs in both shape and colour
SHAPES = {"circle": (40, 40, 220), "square": (40, 200, 40), "triangle": (220, 60, 40),
          "cross": (30, 210, 230)}


def _draw(image: np.ndarray, name: str, colour: tuple[int, int, int], cx: int, cy: int,
          r: int) -> None:
    if name == "circle":
        cv2.circle(image, (cx, cy), r, colour, -1)
    elif name == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
    elif name == "triangle":
        points = np.array([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], np.int32)
        cv2.fillPoly(image, [points], colour)
    else:
        bar = max(1, r // 3)
        cv2.rectangle(image, (cx - r, cy - bar), (cx + r, cy + bar), colour, -1)
        cv2.rectangle(image, (cx - bar, cy - r), (cx + bar, cy + r), colour, -1)


def _image(rng: np.random.Generator, name: str, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    background = rng.integers(60, 140)
    image = np.clip(rng.normal(background, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    r = int(rng.integers(max(2, min(size) // 6), max(3, min(size) // 3) + 1))
    cx = int(rng.integers(r, max(r + 1, width - r)))
    cy = int(rng.integers(r, max(r + 1, height - r)))
    jitter = rng.integers(-20, 21, 3)
    colour = tuple(int(c) for c in np.clip(np.array(SHAPES[name]) + jitter, 0, 255))
    _draw(image, name, colour, cx, cy, r)
    return image


def write_colour_set(root: Path, classes: int = 3, per_class: int = 60,
                     size: tuple[int, int] = (48, 36), layout: str = "flat", seed: int = 0,
                     ext: str = ".png") -> list[str]:
    """Write `classes` (at most 4) folders of `per_class` BGR images, `size` = (width,
    height), under root/<class>/ ("flat") or root/train/<class>/ plus per_class // 4 each
    under root/test/<class>/ ("split"); the same files for the same seed. Returns the class
    names."""
    if not 2 <= classes <= len(SHAPES) or layout not in ("flat", "split"):
        raise ValueError(f"classes {classes} (2 to {len(SHAPES)}), layout {layout!r} "
                         f"(flat or split)")
    rng = np.random.default_rng(seed)
    names = list(SHAPES)[:classes]
    parts = {"": per_class} if layout == "flat" else {"train": per_class,
                                                      "test": per_class // 4}
    for part, count in parts.items():
        for name in names:
            folder = Path(root) / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                cv2.imwrite(str(folder / f"{name}_{i:03d}{ext}"), _image(rng, name, size))
    return names


def huge_png(width: int, height: int, bit_depth: int = 1, colour: bool = False) -> bytes:
    """A valid PNG of width x height black pixels, deflated by hand: a few tens of KB that
    OpenCV would decode to gigabytes (1-bit gray, or 16-bit RGB with colour and bit_depth 16)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\0" * (1 + (width * bit_depth * (3 if colour else 1) + 7) // 8)  # filter 0 + pixels
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2 if colour else 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))
