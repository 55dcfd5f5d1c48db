"""`splitexit export --target onnx`: the head as an ONNX graph with a dynamic batch, ELL kept
as Gather/Mul/ReduceSum and a sparse conv as Gather + grouped Conv (the file stays near its
tables' size), run by onnxruntime and checked against torch (MLPs) or the NumPy head (convs).
Skips, saying why, where the onnx extra is not installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.export.export_onnx import IR_VERSION, OPSET, export_onnx
from pipeline.edge.numpy_head import load_numpy_head
from pipeline.model.artifacts import load_edge
from pipeline.floor.data import load_dataset
from pipeline.floor.edge_artifact import EDGE_NPZ
from tests.test_cli import splitexit
from tests.test_conv_model import conv_artifact
from tests.test_export_c import CONV_LAYOUTS

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: "
                          "pip install 'splitexit[onnx]'")
pytest.importorskip("onnx", reason="the onnx extra is not installed")


@pytest.mark.parametrize("which", ["sparse", "dense twin", "bottleneck"])
def test_the_onnx_head_equals_the_torch_head_at_any_batch(which, artifacts, dense_twin,
                                                          bottleneck_artifacts, idx_dir,
                                                          tmp_path):
    art = {"sparse": artifacts, "dense twin": dense_twin, "bottleneck": bottleneck_artifacts}[
        which]
    [path] = export_onnx(art, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = load_dataset(idx_dir).test.images.astype(np.float32) / 255
    torch_head = load_edge(art).head
    with torch.inference_mode():
        t_logits, t_features = torch_head(torch.from_numpy(pixels))
    for batch in (1, 7, len(pixels)):  # the batch dimension is dynamic
        features, logits = session.run(["features", "exit_logits"], {"pixels": pixels[:batch]})
        np.testing.assert_allclose(features, t_features[:batch].numpy(), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(logits, t_logits[:batch].numpy(), atol=1e-4, rtol=1e-5)
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert ("Gather" in ops) == (which != "dense twin")  # ELL stays a gather, never densified
    assert path.stat().st_size <= 1.1 * (art / EDGE_NPZ).stat().st_size


def test_the_cli_exports_onnx(artifacts, tmp_path):
    r = splitexit("export", str(artifacts), "--target", "onnx", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "splitexit_head.onnx").is_file()


# A separate interpreter with the oldest onnxruntime the onnx extra allows (it needs numpy
# < 2, so it cannot share this one's environment); ./run.sh creates it.
ORT_OLDEST = Path(os.environ.get("SPLITEXIT_ORT_OLDEST", "/opt/splitexit-ort-1.17"))
RUN_WITH_OLDEST = """
import sys, numpy as np, onnxruntime as ort
assert ort.__version__.startswith("1.17."), ort.__version__
for path in sys.argv[1:]:
    pixels = np.load(path + ".pixels.npy")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    features, logits = session.run(["features", "exit_logits"], {"pixels": pixels})
    np.save(path + ".features.npy", features)
    np.save(path + ".logits.npy", logits)
"""


def test_the_file_pins_an_ir_version_older_runtimes_load(artifacts, tmp_path):
    """onnx itself would stamp its newest IR version, which onnxruntime 1.17 refuses."""
    import onnx

    [path] = export_onnx(artifacts, tmp_path)
    assert onnx.load(path).ir_version <= 9


def test_the_oldest_allowed_onnxruntime_runs_mlp_and_conv_exports(artifacts, conv_sparse,
                                                                   idx_dir, tmp_path):
    """onnxruntime 1.17, the oldest `splitexit[onnx]` allows, loads and runs both kinds of
    head, and its outputs are the NumPy head's within 1e-4."""
    python = ORT_OLDEST / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"{python} missing: ./run.sh test creates it (onnxruntime==1.17.3)")
    pixels = load_dataset(idx_dir).test.images[:50].astype(np.float32) / 255
    paths = []
    for name, art in (("mlp", artifacts), ("conv", conv_sparse)):
        [path] = export_onnx(art, tmp_path / name)
        np.save(f"{path}.pixels.npy", pixels)
        paths.append((path, art))
    r = subprocess.run([str(python), "-c", RUN_WITH_OLDEST, *(str(p) for p, _ in paths)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for path, art in paths:
        ref_logits, ref_features = load_numpy_head(art)(pixels)
        np.testing.assert_allclose(np.load(f"{path}.features.npy"), ref_features, atol=1e-4)
        np.testing.assert_allclose(np.load(f"{path}.logits.npy"), ref_logits, atol=1e-4)


def run_onnx(path, pixels):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    features, logits = session.run(["features", "exit_logits"], {"pixels": pixels})
    return logits, features


def test_a_trained_conv_sparse_head_exports_to_onnx_within_1e4(conv_sparse, idx_dir, tmp_path):
    """The shipped conv-sparse layout, trained: onnxruntime's outputs on the test frames are
    the NumPy head's within 1e-4, at any batch, and the sparse convs stay sparse (each output
    channel's d_in kernels as stored, gathered channels, a grouped Conv)."""
    import onnx

    r = splitexit("export", str(conv_sparse), "--target", "onnx", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = tmp_path / "splitexit_head.onnx"
    head = load_numpy_head(conv_sparse)
    pixels = load_dataset(idx_dir).test.images.astype(np.float32) / 255
    ref_logits, ref_features = head(pixels)
    assert 0 < (ref_features > 0).mean() < 1
    for batch in (1, 7, len(pixels)):
        logits, features = run_onnx(path, pixels[:batch])
        np.testing.assert_allclose(features, ref_features[:batch], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(logits, ref_logits[:batch], atol=1e-4, rtol=1e-4)
    model = onnx.load(path)
    assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
    groups = [next((a.i for a in node.attribute if a.name == "group"), 1)
              for node in model.graph.node if node.op_type == "Conv"]
    assert groups == [1, 32, 64, 1]   # the dense first conv and bottleneck, two sparse ones
    weights = {t.name: t.dims for t in model.graph.initializer}
    assert weights["layer1.weight"] == [32, 2, 3, 3]   # d_in = 2 of 16, never densified
    assert path.stat().st_size <= 1.1 * (conv_sparse / EDGE_NPZ).stat().st_size


@pytest.mark.parametrize("layout", CONV_LAYOUTS)
def test_every_conv_layout_exports_to_onnx(layout, tmp_path):
    """Colour, ragged pools, strides, overlapping exit bins (a MatMul by the bins' weights),
    junctions after the convs: onnxruntime equals the NumPy head within 1e-4."""
    conv_artifact(tmp_path / "art", *CONV_LAYOUTS[layout][0])
    head = load_numpy_head(tmp_path / "art")
    [path] = export_onnx(tmp_path / "art", tmp_path)
    pixels = np.random.default_rng(0).random((5, head.input_size), dtype=np.float32)
    logits, features = run_onnx(path, pixels)
    ref_logits, ref_features = head(pixels)
    np.testing.assert_allclose(features, ref_features, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
