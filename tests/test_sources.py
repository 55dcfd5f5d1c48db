import asyncio
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from prometheus_client import CollectorRegistry

from monitoring.exposition import total
from pipeline import __version__
from pipeline.edge.config import EdgeConfig
from pipeline.edge.async_edge import AsyncEdge
from pipeline.floor.data import read_idx
from tests.conftest import ROOT, free_port
from pipeline.errors import SourceError, UserError
from workers.pool import START_TIMEOUT_S, wait_until
from pipeline.edge.sources import (LatestFrame, LiveSource, Pacer, open_source,
                              as_pixels)

cv2 = pytest.importorskip("cv2")

FAST = dict(start_s=0.001, max_s=0.004)  # back-off short enough for tests


def check_pixels(frame):
    assert frame.pixels.dtype == np.float32 and frame.pixels.shape == (784,)
    assert 0.0 <= frame.pixels.min() and frame.pixels.max() <= 1.0


# --- dataset replay ----------------------------------------------------------------------

def test_replay_yields_test_split_with_labels_and_training_pixels(idx_dir):
    with open_source("dataset", data_dir=str(idx_dir)) as source:
        assert not source.live
        frames = list(source.frames())
    images = read_idx(idx_dir / "t10k-images-idx3-ubyte.gz").reshape(300, 784)
    labels = read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz")
    assert [f.frame_id for f in frames] == list(range(300))
    assert [f.label for f in frames] == labels.tolist()
    assert np.array_equal(np.stack([f.pixels for f in frames]),
                          images.astype(np.float32) / 255)
    assert all(f.source == "dataset" and f.capture_ts > 0 for f in frames)
    check_pixels(frames[0])


def test_replay_limit_and_loop(idx_dir):
    assert len(list(open_source("dataset:test", limit=5, data_dir=str(idx_dir)).frames())) == 5
    frames = list(open_source("dataset", limit=650, loop=True, data_dir=str(idx_dir)).frames())
    assert len(frames) == 650 and frames[-1].frame_id == 649
    assert np.array_equal(frames[300].pixels, frames[0].pixels)
    assert frames[600].label == frames[0].label


def test_replay_is_paced_at_fps(idx_dir):
    source = open_source("dataset", fps=200, limit=20, data_dir=str(idx_dir))
    start = time.monotonic()
    assert len(list(source.frames())) == 20
    assert time.monotonic() - start >= 0.09  # 19 periods of 5 ms


def test_pacer_sleeps_to_schedule_and_does_not_burst_after_a_stall():
    now, sleeps = [100.0], []

    def sleep(s):
        sleeps.append(round(s, 6))
        now[0] += s

    pacer = Pacer(10, clock=lambda: now[0], sleep=sleep)
    pacer.wait()                 # first frame at once
    now[0] += 0.03
    pacer.wait()                 # waits the rest of the 0.1 s period
    now[0] += 1.0                # consumer stalled for 10 periods
    pacer.wait()                 # no catch-up burst: restart the schedule
    pacer.wait()
    assert sleeps == [0.07, 0.1]
    Pacer(None, clock=lambda: 0, sleep=sleep).wait()
    assert len(sleeps) == 2


def test_replay_works_without_opencv(idx_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    assert len(list(open_source("dataset", limit=3, data_dir=str(idx_dir)).frames())) == 3
    with pytest.raises(SourceError, match=r"pip install 'splitexit\[camera\]'"):
        open_source("0")


# --- video file and image folder -------------------------------------------------------

def write_video(path, images, fps=10):
    h, w = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for image in images:
        writer.write(image)
    writer.release()


def test_video_file_yields_every_frame_preprocessed(tmp_path):
    images = [np.full((48, 64, 3), 255 if i % 2 == 0 else 0, np.uint8) for i in range(10)]
    images[3][:, :32] = (0, 0, 255)  # pure red left half: gray 0.299 * 255
    write_video(tmp_path / "clip.avi", images)
    with open_source(str(tmp_path / "clip.avi")) as source:
        assert not source.live
        frames = list(source.frames())
    assert len(frames) == 10
    for frame in frames:
        check_pixels(frame)
    assert frames[0].pixels.mean() > 0.95 and frames[1].pixels.mean() < 0.05
    left = frames[3].pixels.reshape(28, 28)[:, :12]
    assert abs(left.mean() - 0.299) < 0.05
    assert frames[3].pixels.reshape(28, 28)[:, 16:].mean() < 0.05


def test_video_file_loops_and_paces(tmp_path):
    write_video(tmp_path / "clip.avi", [np.full((48, 64, 3), 200, np.uint8)] * 10)
    source = open_source(str(tmp_path / "clip.avi"), fps=100, limit=25, loop=True)
    start = time.monotonic()
    assert len(list(source.frames())) == 25
    assert time.monotonic() - start >= 0.2


def test_image_folder_sorted_skips_undecodable(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 50, 3), 255, np.uint8))   # colour
    cv2.imwrite(str(tmp_path / "b.png"), np.full((28, 28), 128, np.uint8))      # gray, exact
    (tmp_path / "c.png").write_bytes(b"not an image")
    cv2.imwrite(str(tmp_path / "d.jpg"), np.zeros((100, 80, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(open_source(str(tmp_path), loop=True, limit=6).frames())
    assert len(frames) == 6
    for frame in frames:
        check_pixels(frame)
        assert frame.label is None
    assert frames[0].pixels.mean() > 0.99
    assert np.array_equal(frames[1].pixels, np.full(784, 128 / 255, np.float32))
    assert frames[2].pixels.mean() < 0.01
    assert np.array_equal(frames[3].pixels, frames[0].pixels)
    # each answer names its file, not the folder
    assert [Path(f.source).name for f in frames] == ["a.png", "b.png", "d.jpg"] * 2
    # one warning for the undecodable file, not one per loop
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"skipping {tmp_path / 'c.png'}: OpenCV cannot decode it (1 skipped so far)"]


RSS_CHILD = """
import resource, sys
from pipeline.edge.sources import open_source
source = open_source(sys.argv[1], loop=True, limit=4)
names = [f.source.rsplit("/", 1)[-1] for f in source.frames()]
print(names, source.skipped, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def _peak_rss_mb(folder) -> tuple[str, int, int, str]:
    """(file names of 4 frames, skipped, peak RSS in MB, stderr) of a child reading `folder`."""
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder)], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    names, skipped, peak_mb = run.stdout.rsplit(" ", 2)
    return names.strip(), int(skipped), int(peak_mb), run.stderr


def test_images_too_large_to_decode_are_skipped_from_their_header(tmp_path):
    """#25 finding 10: a 1 MB PNG reached 2.1 GB of memory decoded, a 16-bit one 4.2 GB.
    Now each is skipped by its header's dimensions, warned about in one line and counted;
    a child process's peak memory, against one that reads the good image alone, shows
    nothing was decoded (the gray one alone is 400 MB decoded)."""
    from tests.image_sets import huge_png
    (tmp_path / "good").mkdir()
    cv2.imwrite(str(tmp_path / "good" / "a.png"), np.full((40, 50, 3), 255, np.uint8))
    _, _, baseline_mb, _ = _peak_rss_mb(tmp_path / "good")
    (tmp_path / "good" / "b.png").write_bytes(huge_png(20000, 20000))                  # 400 MP
    (tmp_path / "good" / "c.png").write_bytes(huge_png(12000, 12000, 16, colour=True))  # 864 MB
    names, skipped, peak_mb, stderr = _peak_rss_mb(tmp_path / "good")
    assert names == str(["a.png"] * 4) and skipped == 2
    assert peak_mb < baseline_mb + 100, f"peak RSS {peak_mb} MB: something was decoded"
    warnings = [line for line in stderr.splitlines() if "skipping" in line]
    assert len(warnings) == 2 and "20000 x 20000 pixels" in warnings[0] \
        and "(2 skipped so far)" in warnings[1]


def test_opencv_is_capped_for_formats_without_a_header_check(tmp_path):
    """Every decode through frames.opencv() runs under OPENCV_IO_MAX_IMAGE_PIXELS, which
    OpenCV reads when it is imported (here: a fresh process)."""
    from tests.image_sets import huge_png
    (tmp_path / "b.png").write_bytes(huge_png(20000, 20000))
    child = ("import sys\nfrom pipeline.floor.frames import opencv\ncv2 = opencv()\n"
             "try:\n    cv2.imread(sys.argv[1])\nexcept cv2.error as e:\n"
             "    print('capped' if 'MAX_IMAGE_PIXELS' in str(e) else e)\n")
    run = subprocess.run([sys.executable, "-c", child, str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.stdout.strip() == "capped", run.stdout + run.stderr


def test_a_truncated_video_warns_with_its_counts(tmp_path, caplog):
    """#25 finding 10: a truncated video ended silently. Its frames are all delivered, then
    one warning says how many of the claimed frames there were."""
    rng = np.random.default_rng(25)
    write_video(tmp_path / "clip.avi", [rng.integers(0, 256, (48, 64, 3), np.uint8)
                                        for _ in range(40)])
    whole = (tmp_path / "clip.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(whole[:len(whole) // 2])
    with open_source(str(tmp_path / "cut.avi"), loop=True, limit=100) as source:
        read = len(list(source.frames()))       # three passes and a bit: one warning
    assert read == 100 and source.truncated
    with open_source(str(tmp_path / "cut.avi")) as source:
        once = len(list(source.frames()))
    assert 0 < once < 40
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"video file {tmp_path / 'cut.avi'} ended after {once} of the 40 "
                        f"frames its header claims: it is truncated or corrupt"] * 2
    caplog.clear()
    with open_source(str(tmp_path / "clip.avi")) as source:   # whole: no warning
        assert len(list(source.frames())) == 40 and not source.truncated
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_as_pixels_handles_gray_colour_and_alpha():
    for image in (np.zeros((10, 12), np.uint8), np.zeros((10, 12, 1), np.uint8),
                  np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12, 4), np.uint8)):
        pixels = as_pixels(image)
        assert pixels.shape == (784,) and pixels.dtype == np.float32
        assert as_pixels(image, (3, 8, 6)).shape == (3 * 8 * 6,)


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, kw, match", [
    ("missing.avi", {}, "cannot open video file missing.avi: no such file"),
    ("no/such/dir", {}, "no such file or folder"),
    ("97", {}, r"camera 97 did not open: is the device present\? \(ls /dev/video\*\)"),
    ("webcam", {}, "unknown source 'webcam': give a camera index"),
    ("ftp://host/x", {}, "unsupported stream scheme ftp://"),
    ("dataset:train", {}, "only dataset:test"),
    ("dataset", {"fps": 0}, "fps = 0 must be > 0"),
    ("dataset", {"limit": 0}, "limit = 0 must be at least 1"),
])
def test_bad_specs_are_one_line_errors(spec, kw, match):
    with pytest.raises(SourceError, match=match) as info:
        open_source(spec, **kw)
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)


def test_empty_folder_and_unreadable_video_and_missing_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="has no readable images"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"\x00" * 20)
    with pytest.raises(SourceError, match=r"has no readable images \(1 files"):
        open_source(str(tmp_path / "junk"))
    (tmp_path / "fake.avi").write_bytes(b"\x00" * 100)
    with pytest.raises(SourceError, match="cannot open video file .*fake.avi: OpenCV cannot"):
        open_source(str(tmp_path / "fake.avi"))
    with pytest.raises(SourceError, match="dataset replay: .*apt-get install") as info:
        open_source("dataset", data_dir=str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


# --- live sources: newest frame only, reconnect ------------------------------------------

class FakeCapture:
    """OpenCV's capture interface: read() hands out fed images in order, blocking while none
    are fed; None fed means a failed read. Returns a failure once the test is over."""

    def __init__(self, done, *items):
        self.items, self.done, self.released = queue.Queue(), done, False
        self.feed(*items)

    def feed(self, *items):
        for item in items:
            self.items.put(item)

    def read(self):
        while not self.done.is_set():
            try:
                item = self.items.get(timeout=0.005)
            except queue.Empty:
                continue
            return (False, None) if item is None else (True, item)
        return False, None

    def release(self):
        self.released = True


def image(value):
    return np.full((48, 64, 3), value, np.uint8)


@pytest.fixture
def live():
    """Builds LatestFrames and LiveSources; stops their fake captures and threads at the end."""
    done, made = threading.Event(), []

    def make(open_capture, cls=LatestFrame, **kw):
        made.append(cls(open_capture=open_capture, name="fake", **kw))
        return made[-1]

    make.done = done
    yield make
    done.set()
    for thing in made:
        thing.close()


def test_slow_consumer_gets_newest_frame_and_drops_are_counted(live):
    capture = FakeCapture(live.done, *(image(v) for v in (1, 2, 3, 4, 5)))
    latest = live(lambda: capture)
    wait_until(lambda: latest.captured == 5, START_TIMEOUT_S, "5 images captured")
    taken, _ = latest.take()
    assert taken[0, 0, 0] == 5 and latest.dropped == 4
    assert latest.take(timeout_s=0.05) is None     # never the same frame twice
    capture.feed(image(6), image(7), image(8))
    wait_until(lambda: latest.captured == 8, START_TIMEOUT_S, "8 images captured")
    taken, capture_ts = latest.take()
    assert taken[0, 0, 0] == 8 and latest.dropped == 6 and capture_ts > 0
    capture.feed(image(9))
    assert latest.take(timeout_s=5)[0][0, 0, 0] == 9 and latest.dropped == 6


def test_lost_source_reconnects_with_backoff(live):
    first, second = FakeCapture(live.done, image(1)), FakeCapture(live.done, image(2))
    results = iter([first, SourceError("down"), OSError("refused"), second])

    def opener():
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    latest = live(opener, max_reconnects=5, **FAST)
    assert latest.take(timeout_s=5)[0][0, 0, 0] == 1
    first.feed(None)                                          # the link drops
    assert latest.take(timeout_s=5)[0][0, 0, 0] == 2
    assert latest.reconnects == 3 and first.released
    assert latest.dropped == 0


def test_gives_up_after_max_reconnects_with_one_line_error(live):
    first, attempts = FakeCapture(live.done, image(1)), []

    def opener():
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return first
        raise SourceError("down")

    latest = live(opener, max_reconnects=3, **FAST)
    assert latest.take(timeout_s=5) is not None
    first.feed(None)
    with pytest.raises(SourceError, match="fake was lost and 3 reconnect attempts failed") as info:
        latest.take(timeout_s=5)
    assert "\n" not in str(info.value) and len(attempts) == 4


def test_unopenable_live_source_fails_in_the_caller(live):
    def opener():
        raise SourceError("camera 5 did not open")

    with pytest.raises(SourceError, match="camera 5 did not open"):
        live(opener)


def test_live_source_yields_model_ready_frames(live):
    capture = FakeCapture(live.done, *(image(255) for _ in range(3)))
    source = live(lambda: capture, cls=LiveSource, spec="0", limit=3, fps=None, loop=False)
    assert source.live
    frames = []
    for frame in source.frames():
        frames.append(frame)
        capture.feed(image(255))  # a camera keeps producing
    assert [f.frame_id for f in frames] == [0, 1, 2]
    for frame in frames:
        check_pixels(frame)
        assert frame.label is None and frame.source == "0" and frame.pixels.mean() == 1.0
    assert len(frames) + source.dropped <= source.latest.captured


# --- a real stream over loopback HTTP ----------------------------------------------------

@pytest.fixture
def http_server(tmp_path):
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_stream_url_reads_live_and_reconnects_at_end_of_stream(tmp_path, http_server):
    write_video(tmp_path / "clip.avi", [np.full((48, 64, 3), 255, np.uint8)] * 10)
    # 15 frames from a 10-frame clip: the end of the clip is a lost stream, reopened once
    with open_source(f"{http_server}/clip.avi", limit=15, max_reconnects=2) as source:
        assert source.live
        frames = list(source.frames())
        assert source.latest.reconnects >= 1
    assert len(frames) == 15 and all(f.pixels.mean() > 0.95 for f in frames)


def test_stream_url_that_does_not_open_is_one_line_error(http_server):
    with pytest.raises(SourceError, match="stream .* did not open: check the URL") as info:
        open_source(f"{http_server}/missing.avi")  # 404
    assert "\n" not in str(info.value)


def test_an_edge_exports_its_live_sources_drops_and_reconnects(live, artifacts):
    """The capture side counts; the producer's metrics say it (no broker needed: the frames
    it sends fall back at their deadline)."""
    first, second = FakeCapture(live.done, image(1), None), FakeCapture(live.done, image(2))
    captures = iter([first, second])
    source = live(lambda: next(captures), cls=LiveSource, spec="fake", fps=None, limit=2,
                  loop=False)
    registry = CollectorRegistry()
    producer = AsyncEdge(str(artifacts), EdgeConfig(f"tcp://127.0.0.1:{free_port()}", 50.0),
                            registry=registry)
    summary = asyncio.run(producer.run(source))
    assert summary.frames == 2
    assert total(registry, "splitexit_edge_source_reconnects_total") == 1
    assert total(registry, "splitexit_edge_source_dropped_frames_total") == source.dropped
    assert total(registry, "splitexit_build_info", role="edge", version=__version__,
                 model_id=producer.head.model_id) == 1
