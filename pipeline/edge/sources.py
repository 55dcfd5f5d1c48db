"""Frame sources for edge producers: camera, video file, stream URL, image folder, replay.

Every source yields `Frame`s whose pixels are what training feeds the head: the picture
fitted to the model's input shape (C x H x W, grey or RGB, stretched or cropped) by the one
conversion training uses too (pipeline.protocol.frames), flat, float32 in [0, 1]. OpenCV is
imported only when a camera, video, stream or folder is opened, so replaying Fashion-MNIST
to a 28x28 grey model works without the `camera` extra.

Live sources (camera, stream) read in a background thread that keeps only the newest frame:
OpenCV backends buffer frames, and a reader slower than the camera would otherwise fall
further and further behind real time. Files, folders and replay are not live: every frame
is delivered, paced at `fps` if given.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.errors import DataError, SourceError
from pipeline.floor.data import FASHION_MNIST_DIR, load_test_split
from pipeline.protocol.frames import (DEFAULT_SHAPE, IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS,
                                      opencv, read_image, to_pixels)
from pipeline.protocol.timing import backoff_delays

__all__ = ["Frame", "Source", "LatestFrame", "Shard", "open_source", "as_pixels",
           "SourceError", "IMAGE_EXTENSIONS", "STREAM_SCHEMES"]

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp", "http", "https", "udp", "tcp")
OPEN_TIMEOUT_MS = 5000     # a dead stream URL fails after this instead of hanging
READ_TIMEOUT_MS = 5000     # a stalled stream counts as lost after this and is reconnected
RECONNECT_START_S = 0.5    # first back-off; doubles per failed attempt
RECONNECT_MAX_S = 8.0      # back-off cap
MAX_RECONNECTS = 5         # consecutive failed attempts before a live source gives up
CLOSE_TIMEOUT_S = 1.0      # a read stuck in a driver must not hang shutdown (thread is daemon)
# pixels, label, capture_ts of one frame, and its own name where the source has one per
# frame (an image folder: the file), else None (the source's spec names it)
Item = tuple[np.ndarray, int | None, float, str | None]
ACCEPTED = ("a camera index (0), a video file, a stream URL (rtsp://, http://, ...), "
            "an image folder, or dataset / dataset:test")


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


class LatestFrame:
    """Reads a capture (anything with OpenCV's `read() -> (ok, image)` and `release()`) in a
    thread and keeps only the newest image; a failed read reopens with back-off. Every
    captured image is either taken once or counted in `dropped`."""

    def __init__(self, open_capture: Callable[[], Any], name: str,
                 max_reconnects: int = MAX_RECONNECTS, start_s: float = RECONNECT_START_S,
                 max_s: float = RECONNECT_MAX_S):
        self.name = name
        self.captured = 0      # images read so far
        self.dropped = 0       # captured but never taken: the consumer was slower
        self.reconnects = 0    # reopen attempts so far
        self._open = open_capture
        self._delays_s = backoff_delays(max_reconnects, start_s, max_s)
        first = open_capture()  # an unopenable source fails here, in the caller
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._image: np.ndarray | None = None
        self._capture_ts = 0.0
        self._taken = 0        # `captured` count at the last take
        self._error: SourceError | None = None
        self._thread = threading.Thread(target=self._run, args=(first,), daemon=True,
                                        name=f"capture {name}")
        self._thread.start()

    def take(self, timeout_s: float | None = None) -> tuple[np.ndarray, float] | None:
        """Block until an image newer than the last one taken; None when closed or timed out."""
        with self._cond:
            self._cond.wait_for(lambda: self.captured > self._taken or self._error is not None
                                or self._stop.is_set(), timeout_s)
            if self.captured > self._taken:
                self.dropped += self.captured - self._taken - 1
                self._taken = self.captured
                return self._image, self._capture_ts
            if self._error is not None:
                raise self._error
            return None

    def close(self) -> None:
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)

    def _run(self, capture: Any) -> None:
        failures = 0           # consecutive; a good frame resets it
        while not self._stop.is_set():
            image = _read(capture)
            if image is not None:
                failures = 0
                with self._cond:
                    self._image, self._capture_ts = image, time.time()
                    self.captured += 1
                    self._cond.notify_all()
                continue
            if capture is not None:
                capture.release()
                capture = None
            if failures == len(self._delays_s):
                with self._cond:
                    self._error = SourceError(
                        f"{self.name} was lost and {failures} reconnect attempts failed: "
                        "check that the device is connected or the server is up")
                    self._cond.notify_all()
                return
            if self._stop.wait(self._delays_s[failures]):
                return
            failures += 1
            self.reconnects += 1
            try:
                capture = self._open()
            except Exception:  # the next attempt, or the final error, reports it
                pass
        if capture is not None:
            capture.release()


def _read(capture: Any) -> np.ndarray | None:
    if capture is None:
        return None
    try:
        ok, image = capture.read()
    except Exception:  # a driver or network error is a lost source: reconnecting handles it
        return None
    return image if ok else None


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


class ReplaySource(Source):
    """A data set's test split with its labels (Fashion-MNIST unless told), for accuracy
    checks and load tests; fitted to the model's input as training fitted it."""

    def __init__(self, spec: str, data_dir: str | None, **kw: Any):
        super().__init__(spec, **kw)
        try:
            test = load_test_split(data_dir or FASHION_MNIST_DIR, self.shape, self.resize)
        except DataError as e:
            raise SourceError(f"dataset replay: {e}") from None
        self.images, self.labels = test.images, test.labels

    def _one_pass(self) -> Iterator[Item]:
        for image, label in zip(self.images, self.labels):
            yield image.astype(np.float32) / np.float32(255), int(label), time.time(), None


class FolderSource(Source):
    """Image files sorted by name; one that cannot be used (undecodable, 16-bit, or over
    MAX_IMAGE_PIXELS by its header) is skipped with a one-line warning and counted in
    `skipped`. Read as training reads an image folder (frames.read_image)."""

    def __init__(self, spec: str, **kw: Any):
        super().__init__(spec, **kw)
        try:
            self.paths = sorted(p for p in Path(spec).iterdir()
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        except OSError as e:
            raise SourceError(f"cannot read image folder {spec}: {e.strerror}") from None
        self._bad: set[Path] = set()  # warned about once, then skipped on later loops
        if next(self._one_pass(), None) is None:
            raise SourceError(f"image folder {spec} has no readable images ({len(self.paths)} "
                              f"files with extensions {'/'.join(IMAGE_EXTENSIONS)}, "
                              f"{self.skipped} skipped): add some")

    def _one_pass(self) -> Iterator[Item]:
        for path in self.paths:
            if path in self._bad:
                continue
            try:
                pixels = self.fit(read_image(path))
            except ValueError as e:   # undecodable, too large, or a 16-bit picture
                self._bad.add(path)
                self.skipped = len(self._bad)
                log.warning(f"skipping {path}: {e} ({self.skipped} skipped so far)")
                continue
            yield pixels, None, time.time(), str(path)


def _open_capture(target: int | str, error: str, params: tuple[int, ...] = ()) -> Any:
    """An opened VideoCapture, else SourceError(error): OpenCV's backends each warn on a
    failed probe, so they are silenced and the user gets one line."""
    cv2 = opencv()
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        capture = cv2.VideoCapture(target, cv2.CAP_ANY, list(params))
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not capture.isOpened():
        capture.release()
        raise SourceError(error)
    return capture


def _stream_params() -> tuple[int, ...]:
    cv2, params = opencv(), []
    for prop, value in (("CAP_PROP_OPEN_TIMEOUT_MSEC", OPEN_TIMEOUT_MS),
                        ("CAP_PROP_READ_TIMEOUT_MSEC", READ_TIMEOUT_MS)):
        if hasattr(cv2, prop):  # older builds lack them and hang on a dead URL instead
            params += [getattr(cv2, prop), value]
    return tuple(params)


class VideoFileSource(Source):
    """A video file; every frame is delivered (OpenCV does not pace files, the Pacer does)."""

    def __init__(self, spec: str, **kw: Any):
        super().__init__(spec, **kw)
        self.error = f"cannot open video file {spec}: OpenCV cannot decode it (is it a video?)"
        cv2, capture = opencv(), _open_capture(spec, self.error)  # fail now, not at frame 1
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        capture.release()
        if width * height > MAX_IMAGE_PIXELS:
            raise SourceError(f"video file {spec} has {width} x {height} frames, more than "
                              f"the {MAX_IMAGE_PIXELS} pixels a frame may have: scale it down")

    def _one_pass(self) -> Iterator[Item]:
        cv2 = opencv()
        capture = _open_capture(self.spec, self.error)
        claimed, read = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0
        try:
            while True:
                ok, image = capture.read()
                if not ok:
                    break
                read += 1
                yield self.fit(image), None, time.time(), None
        finally:
            capture.release()
        # A damaged file ends early and OpenCV just stops reading: say so, once.
        if 0 < read < claimed and not self.truncated:
            self.truncated = True
            log.warning(f"video file {self.spec} ended after {read} of the {claimed} frames "
                        f"its header claims: it is truncated or corrupt")
        elif read == 0 and not self.truncated:
            self.truncated = True
            log.warning(f"video file {self.spec} gave no frame (its header claims "
                        f"{max(claimed, 0)}): it is truncated or corrupt")


class LiveSource(Source):
    """A camera or stream: the newest frame each time, stale ones dropped and counted."""

    live = True

    def __init__(self, spec: str, open_capture: Callable[[], Any], name: str,
                 max_reconnects: int = MAX_RECONNECTS, **kw: Any):
        super().__init__(spec, **kw)
        self.latest = LatestFrame(open_capture, name, max_reconnects)

    @property
    def dropped(self) -> int:
        return self.latest.dropped

    @property
    def reconnects(self) -> int:
        return self.latest.reconnects

    def _one_pass(self) -> Iterator[Item]:
        while (item := self.latest.take()) is not None:
            image, capture_ts = item
            yield self.fit(image), None, capture_ts, None

    def close(self) -> None:
        self.latest.close()


def open_source(spec: str, fps: float | None = None, limit: int | None = None,
                data_dir: str | None = None, loop: bool = False,
                max_reconnects: int = MAX_RECONNECTS, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                resize: str = "stretch") -> Source:
    """Open the source a spec string names, its frames fitted to `shape` (the model's C x H x
    W) as `resize` says; anything unusable is a one-line SourceError."""
    if fps is not None and fps <= 0:
        raise SourceError(f"fps = {fps} must be > 0 (leave it unset for as fast as possible)")
    if limit is not None and limit < 1:
        raise SourceError(f"limit = {limit} must be at least 1 (leave it unset for no limit)")
    kw = dict(fps=fps, limit=limit, loop=loop, shape=shape, resize=resize)
    spec = spec.strip()
    scheme = spec.partition("://")[0].lower() if "://" in spec else ""
    if spec in ("dataset", "dataset:test"):
        return ReplaySource(spec, data_dir, **kw)
    if spec.startswith("dataset:"):
        raise SourceError(f"unknown dataset split in {spec!r}: only dataset:test is replayed")
    if spec.isdigit():
        error = f"camera {int(spec)} did not open: is the device present? (ls /dev/video*)"
        return LiveSource(spec, lambda: _open_capture(int(spec), error), f"camera {int(spec)}",
                          max_reconnects, **kw)
    if scheme in STREAM_SCHEMES:
        error = f"stream {spec} did not open: check the URL and that the server is up"
        return LiveSource(spec, lambda: _open_capture(spec, error, _stream_params()),
                          f"stream {spec}", max_reconnects, **kw)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(spec, **kw)
    if path.is_file():
        return VideoFileSource(spec, **kw)
    if scheme:
        raise SourceError(f"unsupported stream scheme {scheme}://: use one of "
                          f"{', '.join(s + '://' for s in STREAM_SCHEMES)}")
    if path.suffix:
        raise SourceError(f"cannot open video file {spec}: no such file")
    if "/" in spec:
        raise SourceError(f"cannot open {spec}: no such file or folder")
    raise SourceError(f"unknown source {spec!r}: give {ACCEPTED}")


class Shard:
    """Every count-th frame of a source, starting at index: M producers share one replay."""

    def __init__(self, source, index: int, count: int):
        self.source, self.index, self.count = source, index, count
        self.live = source.live

    def frames(self):
        return (f for f in self.source.frames() if f.frame_id % self.count == self.index)

    @property
    def dropped(self) -> int:
        return self.source.dropped

    @property
    def reconnects(self) -> int:
        return self.source.reconnects

    @property
    def skipped(self) -> int:
        return self.source.skipped

    @property
    def truncated(self) -> bool:
        return self.source.truncated

    def close(self) -> None:
        self.source.close()
