"""The head and exit as an ONNX graph with a dynamic batch, for runtimes that speak ONNX.

    splitexit export runs/default --target onnx      # runs/default/export-onnx/splitexit_head.onnx

A sparse junction stays ELL in the graph (Gather the inputs each output reads, Mul by the
values, ReduceSum over d_in), so the file holds the tables, not a densified matrix: indices
are stored as narrow as in edge.npz (uint16) and cast once at run time. A sparse conv stays
sparse the way torch runs it: Gather the d_in channels each output reads (C_out x d_in maps),
then one grouped Conv (group = C_out) with the [C_out, d_in, k, k] kernels as stored; then
MaxPool and Relu. A conv exit's average pool (torch's adaptive bins, which overlap where
they do not divide the map: no ONNX pool draws those) is one MatMul by a constant
(H*W, bins) matrix. Inputs and outputs:

    pixels        float32 (batch, input_size), in [0, 1]; a conv head's frame CHW, row-major
    features      float32 (batch, split width)   what an unsure frame sends
    exit_logits   float32 (batch, classes)

Needs the `onnx` package (`pip install 'splitexit[onnx]'`); onnxruntime runs the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.edge.numpy_head import ConvStage, Junction, NumpyHead, load_numpy_head
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


class _Graph:
    """Nodes and initializers being built; `node` returns its one output's name."""

    def __init__(self) -> None:
        _, self.helper, self.numpy_helper = _onnx()
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], **attrs))
        return output

    def indices(self, name: str, indices: np.ndarray) -> str:
        """An index table stored narrow (as in edge.npz) and cast once to int64."""
        narrow = np.uint16 if indices.max(initial=0) < 1 << 16 else np.int32
        return self.node("Cast", [self.const(f"{name}.indices", indices.astype(narrow))],
                         f"{name}.idx", to=7)                               # int64


def _junction(g: _Graph, name: str, j: Junction, src: str, out: str) -> str:
    values = g.const(f"{name}.values", j.values.astype(np.float32))
    if j.indices is None:                                       # dense: (N_in, N_out)
        mm = g.node("MatMul", [src, values], f"{name}.mm")
    else:                                                       # ELL: (N_out, d_in)
        gathered = g.node("Gather", [src, g.indices(name, j.indices)], f"{name}.gathered",
                          axis=1)
        prod = g.node("Mul", [gathered, values], f"{name}.prod")
        mm = g.node("ReduceSum", [prod, "axis2"], f"{name}.mm", keepdims=0)
    return g.node("Add", [mm, g.const(f"{name}.bias", j.bias.astype(np.float32))], out)


def _conv(g: _Graph, name: str, conv: ConvStage, src: str) -> str:
    c_out, d_in, k, _ = conv.weight.shape
    group = 1
    if conv.indices is not None:    # each output's d_in channels, output by output
        src = g.node("Gather", [src, g.indices(name, conv.indices.reshape(-1))],
                     f"{name}.gathered", axis=1)
        group = c_out
    pad, s = k // 2, conv.stride
    y = g.node("Conv", [src, g.const(f"{name}.weight", conv.weight.astype(np.float32)),
                        g.const(f"{name}.bias", conv.bias.astype(np.float32))],
               f"{name}.conv", kernel_shape=[k, k], pads=[pad] * 4, strides=[s, s], group=group)
    if conv.pool > 1:
        y = g.node("MaxPool", [y], f"{name}.pool", kernel_shape=[conv.pool] * 2,
                   strides=[conv.pool] * 2)
    return y


def _pool_matrix(h: int, w: int, side: int) -> np.ndarray:
    """(h*w, side*side): column (i, j) averages adaptive_avg_pool2d's bin (i, j)."""
    m = np.zeros((h, w, side, side), np.float32)
    for i in range(side):
        top, bottom = i * h // side, -(-(i + 1) * h // side)
        for j in range(side):
            left, right = j * w // side, -(-(j + 1) * w // side)
            m[top:bottom, left:right, i, j] = 1.0 / ((bottom - top) * (right - left))
    return m.reshape(h * w, side * side)


def _shapes(head: NumpyHead) -> list[tuple[int, ...]]:
    """The frame's shape, then each layer's output shape, less the batch (a blank frame run
    through the head)."""
    x = np.zeros((1, *head.input_shape) if head.convolutional else (1, head.input_size),
                 np.float32)
    shapes = [x.shape[1:]]
    for layer in head.layers:
        x = layer(x if isinstance(layer, ConvStage) else x.reshape(1, -1))
        shapes.append(x.shape[1:])
    return shapes


def _graph(head: NumpyHead) -> _Graph:
    g = _Graph()
    if head.convolutional:  # the CHW frame, standardized per channel
        src = g.node("Reshape", ["pixels", g.const("frame_shape", np.array(
            [-1, *head.input_shape], np.int64))], "frame")
        shape = (-1, 1, 1)
    else:
        src, shape = "pixels", ()
    mean, std = (np.asarray(v, np.float32).reshape(shape)
                 for v in (head.pixel_mean, head.pixel_std))
    centered = g.node("Sub", [src, g.const("pixel_mean", mean)], "centered")
    outputs = [g.node("Div", [centered, g.const("pixel_std", std)], "x")]
    if any(isinstance(j, Junction) and j.indices is not None for j in (*head.layers, head.exit)):
        g.const("axis2", np.array([2], np.int64))  # ReduceSum over d_in
    shapes, flats = _shapes(head), {}

    def flat(i: int) -> str:
        """Layer i's output (0: the frame) as (batch, n), flattened once."""
        if len(shapes[i]) == 1:
            return outputs[i]
        if i not in flats:
            flats[i] = g.node("Flatten", [outputs[i]], f"{outputs[i]}.flat", axis=1)
        return flats[i]

    for i, layer in enumerate(head.layers):
        name = f"layer{i}"
        y = _conv(g, name, layer, outputs[-1]) if isinstance(layer, ConvStage) else \
            _junction(g, name, layer, flat(i), f"{name}.pre")
        outputs.append(g.node("Relu", [y], f"{name}.out"))
    g.node("Identity", [flat(len(head.layers))], "features")
    if head.exit_pool:
        c, h, w = shapes[head.exit_layer]
        maps = g.node("Reshape", [outputs[head.exit_layer], g.const(
            "exit_maps", np.array([0, c, h * w], np.int64))], "exit.maps")
        pooled = g.node("MatMul", [maps, g.const("exit_bins", _pool_matrix(
            h, w, head.exit_pool))], "exit.pooled")
        seen = g.node("Flatten", [pooled], "exit.seen", axis=1)
    else:
        seen = flat(head.exit_layer)
    _junction(g, "exit", head.exit, seen, "exit_logits")
    return g


def export_onnx(artifact: str | Path, out_dir: Path) -> list[Path]:
    """Write splitexit_head.onnx for the edge artifact (DIR or DIR/edge.npz) into out_dir."""
    onnx, helper, _ = _onnx()
    # The tables as stored, without the input padding (its inputs are always 0).
    head = load_numpy_head(artifact, dense_max_elements=0)
    g = _graph(head)
    classes = head.exit.bias.shape[0]
    graph = helper.make_graph(
        g.nodes, f"splitexit_head_{head.model_id}",
        [helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT,
                                       ["batch", head.input_size])],
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT,
                                       ["batch", head.width]),
         helper.make_tensor_value_info("exit_logits", onnx.TensorProto.FLOAT,
                                       ["batch", classes])],
        g.inits)
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
