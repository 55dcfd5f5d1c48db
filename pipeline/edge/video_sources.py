"""Cameras, streams and video files: everything read through OpenCV's VideoCapture (imported
only when one is opened). Live sources (camera, stream) read in a background thread that keeps
only the newest frame (`LatestFrame`): OpenCV backends buffer frames, and a reader slower than
the camera would otherwise fall further and further behind real time; a lost one reopens with
back-off. A video file is not live: every frame is delivered, paced at `fps` if given."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.edge.source_base import Item, Source
from pipeline.errors import SourceError
from pipeline.floor.frames import MAX_IMAGE_PIXELS, opencv
from pipeline.protocol.timing import backoff_delays

__all__ = ["LatestFrame", "LiveSource", "VideoFileSource", "camera_source", "stream_source",
           "MAX_RECONNECTS"]

log = logging.getLogger(__name__)

OPEN_TIMEOUT_MS = 5000     # a dead stream URL fails after this instead of hanging
READ_TIMEOUT_MS = 5000     # a stalled stream counts as lost after this and is reconnected
RECONNECT_START_S = 0.5    # first back-off; doubles per failed attempt
RECONNECT_MAX_S = 8.0      # back-off cap
MAX_RECONNECTS = 5         # consecutive failed attempts before a live source gives up
CLOSE_TIMEOUT_S = 1.0      # a read stuck in a driver must not hang shutdown (thread is daemon)


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


def camera_source(spec: str, max_reconnects: int = MAX_RECONNECTS, **kw: Any) -> LiveSource:
    """Camera `spec` (its index, digits), live."""
    error = f"camera {int(spec)} did not open: is the device present? (ls /dev/video*)"
    return LiveSource(spec, lambda: _open_capture(int(spec), error), f"camera {int(spec)}",
                      max_reconnects, **kw)


def stream_source(spec: str, max_reconnects: int = MAX_RECONNECTS, **kw: Any) -> LiveSource:
    """A stream URL (rtsp://, http://, ...), live; a dead URL fails within OPEN_TIMEOUT_MS."""
    error = f"stream {spec} did not open: check the URL and that the server is up"
    return LiveSource(spec, lambda: _open_capture(spec, error, _stream_params()),
                      f"stream {spec}", max_reconnects, **kw)
