"""The head and exit as an ONNX graph with a dynamic batch, for runtimes that speak ONNX.

    splitexit export runs/default --target onnx      # runs/default/export-onnx/splitexit_head.onnx

A sparse junction stays ELL in the graph (Gather the inputs each output reads, Mul by the
values, ReduceSum over d_in), so the file holds the tables, not a densified matrix: indices
are stored as narrow as in edge.npz (uint16) and cast once at run time. Inputs and outputs:

    pixels        float32 (batch, input_size), in [0, 1]
    features      float32 (batch, split width)   what an unsure frame sends
    exit_logits   float32 (batch, classes)

Needs the `onnx` package (`pip install 'splitexit[onnx]'`); onnxruntime runs the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.edge.numpy_head import Junction, load_numpy_head, require_mlp
from pipeline.errors import UserError

__all__ = ["export_onnx", "ONNX_FILE"]

ONNX_FILE = "splitexit_head.onnx"
OPSET = 17
# The IR version opset 17 came with (ONNX 1.12): onnx would stamp its own newest (14 in
# onnx 1.23), which the onnxruntime releases the `onnx` extra allows (>= 1.17, IR <= 9) refuse.
IR_VERSION = 8


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise UserError("the ONNX export needs the onnx package: pip install "
                        "'splitexit[onnx]'") from None
    return onnx, helper, numpy_helper


def _junction(name: str, j: Junction, src: str, relu: bool, nodes: list, inits: list) -> str:
    _, helper, numpy_helper = _onnx()
    inits.append(numpy_helper.from_array(j.values.astype(np.float32), f"{name}.values"))
    inits.append(numpy_helper.from_array(j.bias.astype(np.float32), f"{name}.bias"))
    if j.indices is None:                                       # dense: (N_in, N_out)
        nodes.append(helper.make_node("MatMul", [src, f"{name}.values"], [f"{name}.mm"]))
    else:                                                       # ELL: (N_out, d_in)
        narrow = np.uint16 if j.indices.max(initial=0) < 1 << 16 else np.int32
        inits.append(numpy_helper.from_array(j.indices.astype(narrow), f"{name}.indices"))
        nodes += [
            helper.make_node("Cast", [f"{name}.indices"], [f"{name}.idx"], to=7),  # int64
            helper.make_node("Gather", [src, f"{name}.idx"], [f"{name}.gathered"], axis=1),
            helper.make_node("Mul", [f"{name}.gathered", f"{name}.values"], [f"{name}.prod"]),
            helper.make_node("ReduceSum", [f"{name}.prod", "axis2"], [f"{name}.mm"],
                             keepdims=0),
        ]
    out = f"{name}.out" if relu else "exit_logits"
    nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.bias"],
                                  [f"{name}.pre" if relu else out]))
    if relu:
        nodes.append(helper.make_node("Relu", [f"{name}.pre"], [out]))
    return out


def export_onnx(artifact: str | Path, out_dir: Path) -> list[Path]:
    """Write splitexit_head.onnx for the edge artifact (DIR or DIR/edge.npz) into out_dir."""
    onnx, helper, numpy_helper = _onnx()
    # The tables as stored, without the input padding (its inputs are always 0).
    head = require_mlp(load_numpy_head(artifact, dense_max_elements=0), "the ONNX export")
    nodes: list = [helper.make_node("Sub", ["pixels", "pixel_mean"], ["centered"]),
                   helper.make_node("Div", ["centered", "pixel_std"], ["x"])]
    inits = [numpy_helper.from_array(np.array(head.pixel_mean, np.float32), "pixel_mean"),
             numpy_helper.from_array(np.array(head.pixel_std, np.float32), "pixel_std")]
    if any(j.indices is not None for j in (*head.layers, head.exit)):
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "axis2"))  # over d_in
    outputs = ["x"]
    for i, layer in enumerate(head.layers):
        outputs.append(_junction(f"layer{i}", layer, outputs[-1], True, nodes, inits))
    nodes.append(helper.make_node("Identity", [outputs[-1]], ["features"]))
    _junction("exit", head.exit, outputs[head.exit_layer], False, nodes, inits)
    classes = head.exit.bias.shape[0]
    graph = helper.make_graph(
        nodes, f"splitexit_head_{head.model_id}",
        [helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT,
                                       ["batch", head.input_size])],
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT,
                                       ["batch", head.width]),
         helper.make_tensor_value_info("exit_logits", onnx.TensorProto.FLOAT,
                                       ["batch", classes])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="splitexit", ir_version=IR_VERSION)
    model.metadata_props.add(key="model_id", value=head.model_id)
    model.metadata_props.add(key="threshold", value=repr(head.threshold))
    model.metadata_props.add(key="score", value=head.score)
    model.metadata_props.add(key="temperature", value=repr(head.temperature))  # score on
    # softmax(exit_logits / temperature)
    onnx.checker.check_model(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ONNX_FILE
    onnx.save(model, path)
    return [path]
