"""Frame sources for edge producers: camera, video file, stream URL, image folder, replay.

Every source yields `Frame`s whose pixels are what training feeds the head: the picture
fitted to the model's input shape (C x H x W, grey or RGB, stretched or cropped) by the one
conversion training uses too (pipeline.floor.frames), flat, float32 in [0, 1]. OpenCV is
imported only when a camera, video, stream or folder is opened, so replaying Fashion-MNIST
to a 28x28 grey model works without the `camera` extra.

Here: the sources that read files (a data set's test split, an image folder), `open_source`,
which picks the source a spec string names, and `Shard`, which splits one among producers.
Cameras, streams and video files (OpenCV's VideoCapture; the live ones keep only the newest
frame) are in pipeline.edge.video_sources; what all sources share (Frame, Source, Pacer) in
pipeline.edge.source_base. Files, folders and replay are not live: every frame is delivered,
paced at `fps` if given.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.edge.source_base import Frame, Item, Pacer, Source, as_pixels
from pipeline.edge.video_sources import (MAX_RECONNECTS, LatestFrame, LiveSource,
                                         VideoFileSource, camera_source, stream_source)
from pipeline.errors import DataError, SourceError
from pipeline.floor.data import FASHION_MNIST_DIR, load_test_split
from pipeline.floor.frames import DEFAULT_SHAPE, IMAGE_EXTENSIONS, read_image

# Frame, Source, Pacer, as_pixels, LatestFrame and LiveSource: re-exported, so that callers
# import every source from here
__all__ = ["Frame", "Source", "Pacer", "LatestFrame", "LiveSource", "Shard", "open_source",
           "as_pixels", "SourceError", "IMAGE_EXTENSIONS", "STREAM_SCHEMES"]

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp", "http", "https", "udp", "tcp")
ACCEPTED = ("a camera index (0), a video file, a stream URL (rtsp://, http://, ...), "
            "an image folder, or dataset / dataset:test")


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
        return camera_source(spec, max_reconnects, **kw)
    if scheme in STREAM_SCHEMES:
        return stream_source(spec, max_reconnects, **kw)
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
