"""The Python API as the README shows it: its two scripts run verbatim against a real broker
and workers, and the library's rules (same answers as the CLI, errors a caller can read)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitoring.exposition import total
from pipeline import AsyncEdge, Edge, LocalAnswer
from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.floor.frames import to_pixels
from pipeline.errors import ConfigError, UserError
from pipeline.floor.data import load_test_split
from tests.conftest import ROOT, free_port
from workers.pool import START_TIMEOUT_S, ProcessGroup

FRAMES = 40


def readme_scripts() -> dict[str, str]:
    """The README's "From Python" code blocks, by the file name in their first line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {re.match(r"# (\S+):", b).group(1): b for b in blocks}


def camera_images(idx_dir: Path, n: int = FRAMES) -> list[np.ndarray]:
    """Test images as a camera would give them: BGR, and larger than the model reads (twice
    the side, each pixel repeated: the edge's area resize gives back the original)."""
    images = load_test_split(idx_dir).images[:n].reshape(-1, 28, 28)
    return [cv2.resize(cv2.cvtColor(i, cv2.COLOR_GRAY2BGR), (56, 56),
                       interpolation=cv2.INTER_NEAREST) for i in images]


@pytest.fixture
def served(tmp_path, observed, artifacts):
    """A broker and a worker, and a folder laid out as the README's reader's: runs/default."""
    group = ProcessGroup()
    frontend, _ = observed.broker_and_worker(group, artifacts)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "default").symlink_to(artifacts)
    yield frontend, tmp_path
    group.stop()


def run_script(name: str, cwd: Path, frontend: str, *args: str) -> list[str]:
    (cwd / name).write_text(readme_scripts()[name])
    env = {**os.environ, "SPLITEXIT_FRONTEND": frontend,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, name, *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=10 * START_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_the_readme_opencv_loop_answers_every_frame_of_a_video(served, artifacts, idx_dir):
    frontend, cwd = served
    writer = cv2.VideoWriter(str(cwd / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (56, 56))
    for image in camera_images(idx_dir):
        writer.write(image)
    writer.release()

    lines = run_script("classify.py", cwd, frontend, "clip.avi")

    answers = [line.split() for line in lines[:-1]]
    assert [int(a[0]) for a in answers] == list(range(FRAMES))   # one answer each, in order
    # The exit answers exactly the frames it is sure of and does not find unfamiliar; the
    # rest went to the server.
    video, head = cv2.VideoCapture(str(cwd / "clip.avi")), load_numpy_head(artifacts)
    decoded = np.stack([to_pixels(video.read()[1]) for _ in range(FRAMES)])
    logits, hidden = head.run_exit(decoded)
    sure = (exit_scores(logits, head.score, head.temperature) >= head.threshold) & \
        ~head.unfamiliar(hidden)[1]
    assert [a[1] == "exit" for a in answers] == sure.tolist()
    assert all(int(a[2]) == c for a, c, s in zip(answers, logits.argmax(1), sure) if s)
    paths = Counter(a[1] for a in answers)
    assert paths["offload"] > 0 and set(paths) <= {"exit", "offload", "fallback"}
    assert lines[-1] == str(paths)   # edge.summary.paths


def test_the_readme_asyncio_script_answers_a_folder(served, idx_dir):
    frontend, cwd = served
    (cwd / "photos").mkdir()
    for i, image in enumerate(camera_images(idx_dir)):
        cv2.imwrite(str(cwd / "photos" / f"{i:03}.png"), image)

    lines = run_script("folder.py", cwd, frontend, "photos")

    answers = [line.split() for line in lines]
    assert [a[0] for a in answers] == [f"{i:03}.png" for i in range(FRAMES)]
    paths = Counter(a[1] for a in answers)
    assert paths["exit"] > 0 and paths["offload"] > 0
    assert set(paths) <= {"exit", "offload", "fallback"}


def test_classify_is_the_exit_alone_and_submit_falls_back_without_a_server(artifacts, idx_dir,
                                                                            caplog):
    """No broker listens: unsure frames fall back at their deadline with the exit's answer;
    sure ones are answered by the exit; every answer is counted like the CLI's; and the edge
    says once that no broker answers."""
    images = camera_images(idx_dir, 30)
    classes = load_numpy_head(artifacts).classes
    registry = CollectorRegistry()
    with Edge(artifacts, broker=f"tcp://127.0.0.1:{free_port()}", deadline_ms=50,
              registry=registry) as edge:
        local = [edge.classify(image) for image in images]
        futures = [edge.submit(image, label=7) for image in images]
        answers = [f.result() for f in futures]
    assert all(isinstance(a, LocalAnswer) for a in local)
    assert 0 < sum(a.sure for a in local) < len(images)
    for a, answer in zip(local, answers):
        assert (answer.path, answer.reason) == (("exit", None) if a.sure
                                                else ("fallback", "deadline"))
        assert answer.source == "python" and answer.label == 7
        assert answer.unfamiliar == a.unfamiliar
        if a.unfamiliar:   # never the exit's answer, even as a fallback
            assert (answer.cls, answer.class_name, answer.confidence) == (-1, "unknown", 0)
            continue
        assert (answer.cls, answer.confidence) == (a.cls, pytest.approx(a.confidence, 1e-6))
        assert answer.class_name == classes[answer.cls]   # the name, beside the index
    assert [a.frame for a in answers] == list(range(len(images)))
    unreachable = [r for r in caplog.records if "no broker has answered" in r.getMessage()]
    assert len(unreachable) == 1 and unreachable[0].levelname == "WARNING"
    assert edge.summary.frames == len(images)
    assert total(registry, "splitexit_edge_frames_total", path="fallback") \
        == sum(not a.sure for a in local)
    # The same image as float pixels in [0, 1] (the model's own form) gives the same answer.
    assert edge.classify(to_pixels(images[0]).reshape(28, 28)) == local[0]
    with pytest.raises(UserError, match="closed"):
        edge.submit(images[0])


@pytest.mark.parametrize("frame", [np.zeros((28, 28), np.int32), np.zeros(100, np.float32),
                                   np.zeros((4, 4, 2), np.uint8), "a path"])
def test_a_bad_frame_is_a_value_error_that_says_what_a_frame_is(artifacts, frame):
    with Edge(artifacts, broker=f"tcp://127.0.0.1:{free_port()}",
              registry=CollectorRegistry()) as edge:
        with pytest.raises(ValueError, match=r"give a uint8 image .* or float pixels") as e:
            edge.submit(frame)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="give a uint8 image"):
            edge.classify(frame)
    assert edge.summary.frames == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])   # 1e39: inf as float32
def test_a_frame_with_nan_or_infinite_pixels_is_refused_not_answered(artifacts, bad):
    pixels = np.full((28, 28), 0.5)
    pixels[3, 4] = pixels[20, 1] = bad
    with Edge(artifacts, broker=f"tcp://127.0.0.1:{free_port()}",
              registry=CollectorRegistry()) as edge:
        with pytest.raises(ValueError, match="a frame with 2 NaN or infinite pixels") as e:
            edge.submit(pixels)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="NaN or infinite"):
            edge.classify(pixels.reshape(-1))           # flat, as the model reads them
        pixels[3, 4] = pixels[20, 1] = 0.5
        assert np.isfinite(edge.classify(pixels).confidence)   # the same frame, made finite
    assert edge.summary.frames == 0


def test_python_imports_stay_lazy_and_a_type_checker_sees_the_real_classes():
    """`from pipeline import Edge` is resolved on first use (PEP 562) so `import pipeline`
    stays light; the `if TYPE_CHECKING:` imports name the same classes for mypy or pyright,
    and py.typed (PEP 561) tells them to read the package's hints at all."""
    import ast

    import pipeline

    init = Path(pipeline.__file__)
    [block] = [node for node in ast.parse(init.read_text()).body
               if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    typed = {alias.name: imp.module for imp in block.body for alias in imp.names}
    assert typed == pipeline._API and set(pipeline.__all__) == {"__version__", *typed}
    assert (init.parent / "py.typed").is_file()
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipeline; print(sorted(m for m "
                             "in sys.modules if m.startswith(('pipeline.', 'torch', 'zmq'))))"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert loaded.stdout.strip() == "[]", loaded.stderr


def test_settings_and_artifacts_are_checked_when_the_edge_is_made(artifacts, tmp_path):
    with pytest.raises(ConfigError, match="unknown edge setting deadline; known: broker, "
                                          "deadline_ms"):
        Edge(artifacts, deadline=5)
    with pytest.raises(ConfigError, match="--deadline-ms -1 must be positive"):
        Edge(artifacts, deadline_ms=-1)
    with pytest.raises(UserError, match=str(tmp_path)):
        Edge(tmp_path)   # no artifact there


def test_asyncio_edge_packs_frames_submitted_together(artifacts, idx_dir):
    """asyncio.gather: the frames waiting go out together, up to max_pack per request."""
    images = camera_images(idx_dir)
    registry = CollectorRegistry()

    async def scenario():
        with pytest.raises(UserError, match="not running"):
            await AsyncEdge(artifacts, registry=CollectorRegistry()).submit(images[0])
        async with AsyncEdge(artifacts, broker=f"tcp://127.0.0.1:{free_port()}",
                             deadline_ms=50, max_pack=8, registry=registry) as edge:
            return await asyncio.gather(*(edge.submit(i) for i in images))

    answers = asyncio.run(scenario())
    unsure = sum(a.path == "fallback" for a in answers)
    assert len(answers) == FRAMES and unsure > 8
    requests = total(registry, "splitexit_edge_requests_total")
    assert unsure / 8 <= requests < unsure   # packed: fewer requests than frames
