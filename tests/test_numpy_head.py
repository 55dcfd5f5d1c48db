"""The torch-free edge: the head and exit in NumPy from edge.npz equal the torch head, and a
`splitexit edge` run end to end never imports torch (a stand-in torch that refuses to load
sits first on its path) while its offloaded frames are answered as a torch edge's would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.errors import ArtifactError
from pipeline.model.artifacts import load_edge, load_model
from pipeline.model.calibrate import exit_scores as torch_exit_scores
from pipeline.floor.data import load_dataset
from pipeline.floor.edge_artifact import EDGE_NPZ
from tests.conftest import ROOT, free_port
from workers.broker import run_broker
from workers.config import BrokerConfig, WorkerConfig
from workers.pool import START_TIMEOUT_S, ProcessGroup
from workers.tail_worker import run_worker


@pytest.mark.parametrize("which", ["split exit", "exit before a bottleneck"])
def test_the_numpy_head_equals_the_torch_head(which, artifacts, bottleneck_artifacts, idx_dir):
    artifacts = artifacts if which == "split exit" else bottleneck_artifacts
    pixels = load_dataset(idx_dir).test.images.astype(np.float32) / 255
    edge, head = load_edge(artifacts), load_numpy_head(artifacts)
    with torch.inference_mode():
        t_logits, t_features = edge.head(torch.from_numpy(pixels))
    logits, features = head(pixels)
    assert head.model_id == edge.model_id and head.threshold == edge.threshold
    np.testing.assert_allclose(features, t_features.numpy(), atol=1e-5)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-5)
    for score in ("max_softmax", "margin", "entropy"):
        np.testing.assert_allclose(exit_scores(logits, score),
                                   torch_exit_scores(t_logits, score), atol=1e-6)
    decided = exit_scores(logits, head.score) >= head.threshold
    assert (decided == (torch_exit_scores(t_logits, edge.score) >= edge.threshold)).all()
    # The exit reads the 40-wide layer; a bottleneck after it runs only for offloads.
    exit_logits, hidden = head.run_exit(pixels)
    assert hidden.shape[1] == 40 and np.array_equal(exit_logits, logits)
    assert head.width == (40 if which == "split exit" else 8)
    # 800->40 is sparse (uint16 indices: no wider than 800 inputs need), the exit dense
    assert head.layers[0].indices is not None and head.exit.indices is None
    with np.load(artifacts / EDGE_NPZ) as npz:
        assert npz["layer0.indices"].dtype == np.uint16


def test_a_bad_or_missing_edge_artifact_is_one_line(tmp_path, artifacts):
    with pytest.raises(ArtifactError, match="no such edge artifact"):
        load_numpy_head(tmp_path)
    (tmp_path / "edge.pt").write_bytes((artifacts / "edge.pt").read_bytes())
    with pytest.raises(ArtifactError, match="splitexit calibrate"):  # older training: the fix
        load_numpy_head(tmp_path)
    (tmp_path / EDGE_NPZ).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ArtifactError, match="not a readable splitexit edge artifact"):
        load_numpy_head(tmp_path)


def test_an_edge_run_never_imports_torch(artifacts, idx_dir, tmp_path, observed):
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch imported by the edge')\n")
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    group = ProcessGroup()
    try:
        group.start("broker", run_broker, BrokerConfig(front, back))
        group.start("w0", run_worker, str(artifacts), WorkerConfig(back), "w0")
        observed.ready("worker", 1, group.procs)
        env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
        env.pop("PROMETHEUS_MULTIPROC_DIR")
        edge = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "edge", "--artifacts", str(artifacts),
             "--insecure", "--broker", front, "--data", str(idx_dir), "--deadline-ms", "5000",
             "--dtype", "float32", "--results", str(tmp_path / "out"), "--metrics-port", "0"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    finally:
        group.stop()
    assert edge.returncode == 0, edge.stderr
    outcomes = [json.loads(line) for line in (tmp_path / "out" / "edge-0.jsonl").open()]
    offloaded = [o for o in outcomes if o["path"] == "offload"]
    assert len(outcomes) == 300 and offloaded and not any(o["path"] == "fallback"
                                                          for o in outcomes)
    model, _, _ = load_model(artifacts)  # the torch model, in this process
    pixels = load_dataset(idx_dir).test.images
    with torch.inference_mode():
        exit_logits, final_logits = model(torch.from_numpy(pixels).float() / 255)
    for o in outcomes:
        expected = final_logits if o["path"] == "offload" else exit_logits
        assert o["cls"] == int(expected[o["frame"]].argmax()), o


def test_the_base_install_is_what_an_edge_needs():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("torch", "tqdm"))]
    assert [d for d in project["optional-dependencies"]["server"] if d.startswith("torch")]


def test_a_folder_trained_before_bottlenecks_existed_still_calibrates(artifacts, tmp_path):
    """edge.pt from an older splitexit has no exit_at / uplink_bits in its config: a new
    threshold rewrites edge.npz with the defaults (exit on the split layer, int8 uplink)."""
    import shutil

    from pipeline.model.artifacts import set_threshold

    for name in ("edge.pt", "server.pt"):
        shutil.copy(artifacts / name, tmp_path / name)
    blob = torch.load(tmp_path / "edge.pt", weights_only=True)
    for key in ("exit_at", "uplink_bits"):
        del blob["config"]["model"][key]
    torch.save(blob, tmp_path / "edge.pt")
    set_threshold(tmp_path, 0.5, "max_softmax")
    head = load_numpy_head(tmp_path)
    assert head.threshold == 0.5 and head.uplink_bits == 0
    assert head.exit_layer == len(head.layers) and head.code is None
