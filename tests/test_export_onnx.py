"""`splitexit export --target onnx`: the head as an ONNX graph with a dynamic batch, ELL kept
as Gather/Mul/ReduceSum (the file stays near its tables' size), run by onnxruntime and
checked against torch. Skips, saying why, where the onnx extra is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.edge.export_onnx import export_onnx
from pipeline.model.artifacts import load_edge
from pipeline.model.data import load_dataset
from pipeline.protocol.edge_artifact import EDGE_NPZ
from tests.test_cli import splitexit

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


def test_the_file_pins_an_ir_version_older_runtimes_load(artifacts, tmp_path):
    """onnxruntime 1.17 (the oldest the onnx extra allows) loads IR <= 9; onnx itself would
    stamp its newest."""
    import onnx

    [path] = export_onnx(artifacts, tmp_path)
    assert onnx.load(path).ir_version <= 9
