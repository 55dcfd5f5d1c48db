"""What every frame source shares: the `Frame` it yields, pixels as the library takes them
(`as_pixels`), the `Pacer` that holds delivery to a rate, and the `Source` base class (limit,
looping, fitting a picture to the model's input). The sources themselves: pipeline.edge.sources
(replay, image folders, and `open_source`, which picks one) and pipeline.edge.video_sources
(camera, stream, video file)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from pipeline.floor.frames import DEFAULT_SHAPE, to_pixels

__all__ = ["Frame", "Item", "Source", "Pacer", "as_pixels"]

# pixels, label, capture_ts of one frame, and its own name where the source has one per
# frame (an image folder: the file), else None (the source's spec names it)
Item = tuple[np.ndarray, int | None, float, str | None]


@dataclass(frozen=True)
class Frame:
    frame_id: int          # 0, 1, 2, ... per source, in delivery order
    pixels: np.ndarray     # float32 (C*H*W,) in [0, 1], the model's input shape
    label: int | None      # known for dataset replay, else None
    source: str            # the spec string it came from, or its file in an image folder
    capture_ts: float      # time.time() when captured


def as_pixels(image: np.ndarray, shape: tuple[int, int, int] = DEFAULT_SHAPE,
              resize: str = "stretch") -> np.ndarray:
    """A frame as the library takes it: a uint8 image as OpenCV reads it (gray, BGR or BGRA,
    any size), fitted to `shape`; or pixels already in the model's form (float in [0, 1],
    C*H*W of them, flat or shaped)."""
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.size and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        return to_pixels(image, shape, resize)
    size = int(np.prod(shape))
    if image.dtype.kind == "f" and image.size == size and image.ndim in (1, 2, 3):
        with np.errstate(over="ignore"):   # a float64 beyond float32: inf, refused below
            pixels = np.ascontiguousarray(image, np.float32).reshape(-1)
        finite = np.isfinite(pixels)
        if not finite.all():   # else it is answered, with confidence NaN
            raise ValueError(f"a frame with {pixels.size - int(finite.sum())} NaN or infinite "
                             f"pixels: give float pixels in [0, 1]")
        return pixels
    raise ValueError(f"a frame of dtype {image.dtype} and shape {image.shape}: give a uint8 "
                     f"image (H x W gray, H x W x 3 BGR or x 4 BGRA) or float pixels in "
                     f"[0, 1], {size} of them (the model reads {' x '.join(map(str, shape))})")


class Pacer:
    """Holds delivery to `fps` against the monotonic clock; a late consumer restarts the
    schedule instead of getting a burst of catch-up frames."""

    def __init__(self, fps: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.period_s = 1.0 / fps if fps else None
        self._clock, self._sleep, self._next = clock, sleep, None

    def wait(self) -> None:
        if self.period_s is None:
            return
        now = self._clock()
        if self._next is None or now - self._next > self.period_s:
            self._next = now
        elif self._next > now:
            self._sleep(self._next - now)
        self._next += self.period_s


class Source:
    """A stream of model-ready frames; subclasses say how to read one pass of raw images."""

    live = False               # True: the consumer sees the newest frame, stale ones are dropped
    dropped = 0                # frames a live source skipped to stay current
    reconnects = 0             # times a live source was lost and reopened
    skipped = 0                # pictures an image folder could not use (warned about once each)
    truncated = False          # a video file ended before the frames its header claims

    def __init__(self, spec: str, fps: float | None, limit: int | None, loop: bool,
                 shape: tuple[int, int, int] = DEFAULT_SHAPE, resize: str = "stretch"):
        self.spec, self.fps, self.limit, self.loop = spec, fps, limit, loop
        self.shape, self.resize = tuple(shape), resize

    def fit(self, image: np.ndarray) -> np.ndarray:
        """A captured image as the model's pixels."""
        return to_pixels(image, self.shape, self.resize)

    def frames(self) -> Iterator[Frame]:
        """Yield frames (blocking), paced at fps when set, at most `limit` of them."""
        pacer, items = Pacer(self.fps), self._items()
        frame_id = 0
        while self.limit is None or frame_id < self.limit:
            pacer.wait()  # before reading, so a live source hands over its newest frame
            item = next(items, None)
            if item is None:
                return
            pixels, label, capture_ts, name = item
            yield Frame(frame_id, pixels, label, name or self.spec, capture_ts)
            frame_id += 1

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _items(self) -> Iterator[Item]:
        while True:
            empty = True
            for item in self._one_pass():
                empty = False
                yield item
            if not self.loop or empty:  # an empty pass would loop forever
                return

    def _one_pass(self) -> Iterator[Item]:
        raise NotImplementedError
