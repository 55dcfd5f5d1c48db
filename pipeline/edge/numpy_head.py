"""The head and its exit in NumPy: what an edge device runs, without torch.

It runs the edge artifact DIR/edge.npz (its layout: pipeline.floor.edge_artifact). A
sparse junction is a gather, a multiply and a sum over d_in; a sparse conv one product per
input channel with the kernels that read it (pipeline.edge.numpy_conv): storage and work
scale with the real weights, never with N_in x N_out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.edge.numpy_conv import (adaptive_avg_pool2d, input_major, max_pool2d,
                                      sparse_conv2d)
from pipeline.errors import ArtifactError
from pipeline.floor.edge_artifact import UNFAMILIAR, UPLINK_CODE, read_edge_npz
from pipeline.floor.scores import SCORES, exit_scores   # re-exported: the edge's API
from pipeline.floor.static_code import StaticCode
from pipeline.floor.unfamiliar import Unfamiliarity, exit_features

__all__ = ["Junction", "ConvStage", "NumpyHead", "load_numpy_head", "exit_scores", "SCORES"]

# A junction this small is all per-call overhead in NumPy (~1 µs a call): one dense product
# beats the gather, multiply and sum (default exit 400->10 at in-degree 200: 1.7 µs dense
# against 4.7 µs ELL, batch 1). The file stays ELL; only the runtime expands it.
DENSE_MAX_ELEMENTS = 4096


@dataclass(frozen=True)
class Junction:
    values: np.ndarray          # (N_out, d_in) ELL, or (N_in, N_out) dense, transposed
    indices: np.ndarray | None  # (N_out, d_in), None for a dense junction
    bias: np.ndarray            # (N_out,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.indices is None:
            return x @ self.values + self.bias                            # (B, N_out)
        # Gathered slot-major, (B, d_in, N_out): the sum over d_in adds whole rows, and
        # take() skips fancy indexing's checks (default head, batch 1: 3.4 µs, not 5.8).
        indices, values = self._slot_major
        gathered = x.take(indices, axis=1)
        return np.einsum("bdo,do->bo", gathered, values) + self.bias      # (B, N_out)

    @functools.cached_property
    def _slot_major(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.ascontiguousarray(self.indices.T, dtype=np.intp),
                np.ascontiguousarray(self.values.T))

    @property
    def macs(self) -> int:
        return self.values.size


@dataclass(frozen=True)
class ConvStage:
    """A conv ("same" padding unless strided) and its max pool; NCHW in and out."""
    weight: np.ndarray          # (C_out, d_in, k, k); d_in = C_in when dense
    indices: np.ndarray | None  # (C_out, d_in) channel each kernel reads, None when dense
    bias: np.ndarray            # (C_out,)
    stride: int
    pool: int
    plan: tuple[np.ndarray, np.ndarray] | None = None  # numpy_conv.input_major, made once

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = sparse_conv2d(x, self.weight, self.indices, self.bias, self.stride,
                          self.weight.shape[-1] // 2, self.plan)
        return max_pool2d(y, self.pool) if self.pool > 1 else y


Layer = Junction | ConvStage


def _relu_stack(layers, x: np.ndarray) -> np.ndarray:
    for layer in layers:
        x = np.maximum(layer(x if isinstance(layer, ConvStage) else x.reshape(len(x), -1)), 0)
    return x


@dataclass(frozen=True)
class NumpyHead:
    layers: tuple[Layer, ...]
    exit: Junction
    pixel_mean: np.ndarray      # () for an MLP, (C,) per channel for convs
    pixel_std: np.ndarray
    input_size: int
    input_pad: int
    model_id: str
    threshold: float
    score: str
    classes: tuple[str, ...]
    path: Path
    exit_layer: int             # the layer the exit reads (== len(layers) unless a bottleneck)
    uplink_bits: int            # 0, or the unsigned bits the uplink was trained for
    code: StaticCode | None     # the uplink's static entropy code, if trained for one
    temperature: float = 1.0    # scores are computed on softmax(exit logits / temperature)
    input_shape: tuple[int, int, int] = (1, 28, 28)  # what frames are fitted to (C, H, W)
    resize: str = "stretch"     # how (pipeline.floor.frames)
    exit_pool: int = 0          # a conv exit averages its input to exit_pool^2 bins first
    width: int = 0              # features per frame at the split (what goes on the wire)
    unfamiliarity: Unfamiliarity | None = None   # the score of frames unlike the training set

    def unfamiliar(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B,), flags (B,) bool) from run_exit's activations: a flagged frame is
        never answered here (pipeline.floor.unfamiliar). Without a score in the artifact
        (trained before it existed): zeros, nothing flagged."""
        if self.unfamiliarity is None:
            return np.zeros(len(hidden)), np.zeros(len(hidden), bool)
        scores = self.unfamiliarity.score(exit_features(hidden))
        return scores, self.unfamiliarity.flags(scores)

    @property
    def convolutional(self) -> bool:
        return isinstance(self.layers[0], ConvStage)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels in [0, 1] (B, input_size) -> (exit logits (B, C), features (B, W)). An
        MLP's input padding is never built: the first junction reads no padded input
        (`_unpad`), and it reads raw pixels: the standardization is folded into its
        weights."""
        exit_logits, hidden = self.run_exit(pixels)
        return exit_logits, self.run_uplink(hidden)

    def run_exit(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(exit logits (B, C), the activations the exit read): all a confident frame needs."""
        x = np.asarray(pixels, dtype=np.float32)
        if self.convolutional:   # zero padding is of standardized pixels: nothing to fold
            x = ((x.reshape(-1, *self.input_shape) - self.pixel_mean[:, None, None])
                 / self.pixel_std[:, None, None])
        x = _relu_stack((self._first, *self.layers[1:self.exit_layer]), x)
        seen = adaptive_avg_pool2d(x, self.exit_pool) if self.exit_pool else x
        return self.exit(seen.reshape(len(seen), -1)), x

    def run_uplink(self, hidden: np.ndarray) -> np.ndarray:
        """The split features (B, W) from run_exit's activations, for the frames sent up: a
        bottleneck after the exit costs nothing on frames answered locally."""
        hidden = _relu_stack(self.layers[self.exit_layer:], hidden)
        return hidden.reshape(len(hidden), -1)

    @functools.cached_property
    def _first(self) -> Layer:
        """An MLP's layers[0] on raw pixels: sum w (p - mean) / std + b = sum (w / std) p +
        b', with b' = b - mean / std * sum w. One NumPy pass less a frame; `layers` stay as
        trained (the exports standardize as torch does)."""
        j = self.layers[0]
        if self.convolutional:
            return j
        per_output = j.values.sum(axis=0 if j.indices is None else 1, dtype=np.float64)
        bias = j.bias - (float(self.pixel_mean) / float(self.pixel_std)) * per_output
        return Junction((j.values / self.pixel_std).astype(np.float32), j.indices,
                        bias.astype(np.float32))


def _junction(arrays, name: str, n_in: int, dense_max_elements: int) -> Junction:
    """Shapes and indices are checked already (read_edge_npz)."""
    values, bias = arrays[f"{name}.values"], arrays[f"{name}.bias"].astype(np.float32)
    indices = arrays.get(f"{name}.indices")
    if indices is None:
        return Junction(np.ascontiguousarray(values.T, dtype=np.float32), None, bias)
    if n_in * values.shape[0] <= dense_max_elements:
        dense = np.zeros((n_in, values.shape[0]), np.float32)       # (N_in, N_out)
        dense[indices, np.arange(values.shape[0])[:, None]] = values
        return Junction(dense, None, bias)
    return Junction(values.astype(np.float32), indices.astype(np.intp), bias)


def _unpad(j: Junction, input_size: int) -> Junction:
    """The first junction without its padded inputs, which are always 0: a dense one loses
    those rows; an ELL one reads input 0 with weight 0 there instead (the sums are equal)."""
    if j.indices is None:
        return Junction(np.ascontiguousarray(j.values[:input_size]), None, j.bias)
    padded = j.indices >= input_size
    return Junction(np.where(padded, 0, j.values).astype(np.float32),
                    np.where(padded, 0, j.indices), j.bias)


def _conv(arrays, name: str, n_in: int, layout: dict) -> ConvStage:
    """Shapes and channel indices are checked already (read_edge_npz)."""
    weight = arrays[f"{name}.values"].astype(np.float32)
    indices, bias = arrays.get(f"{name}.indices"), arrays[f"{name}.bias"].astype(np.float32)
    if indices is None:
        return ConvStage(weight, None, bias, int(layout["stride"]), int(layout["pool"]))
    indices = indices.astype(np.intp)
    return ConvStage(weight, indices, bias, int(layout["stride"]), int(layout["pool"]),
                     input_major(weight, indices, n_in))


def _unfamiliarity(meta: dict, arrays: dict) -> Unfamiliarity | None:
    """Shapes are checked already (read_edge_npz)."""
    if f"{UNFAMILIAR}.means" not in arrays:
        return None
    threshold = meta.get("unfamiliar_threshold")
    return Unfamiliarity(arrays[f"{UNFAMILIAR}.whiten"].astype(np.float32),
                         arrays[f"{UNFAMILIAR}.means"].astype(np.float32),
                         None if threshold is None else float(threshold),
                         float(meta.get("unfamiliar_flag_rate", 0.0)))


def load_numpy_head(path: str | Path, dense_max_elements: int = DENSE_MAX_ELEMENTS) -> NumpyHead:
    """The edge artifact (DIR or DIR/edge.npz) as a NumPy head; one-line errors. ELL
    junctions of at most `dense_max_elements` weights run dense (0: every junction as
    stored, what an export wants)."""
    meta, arrays, path = read_edge_npz(path)
    try:
        convs = meta.get("convs", [])   # absent: an MLP, or trained before convs existed
        shape = tuple(int(v) for v in meta.get("input_shape", (1, 28, 28)))
        n_in = shape[0] if convs else int(meta["input_pad"]) or int(meta["input_size"])
        x = np.zeros((1, *shape), np.float32) if convs else np.zeros((1, n_in), np.float32)
        layers, outputs = [], []    # outputs: each layer's output on a blank frame (shapes)
        for i in range(meta["split"]):
            if i < len(convs):
                layers.append(_conv(arrays, f"layer{i}", n_in, convs[i]))
            else:
                x = x.reshape(1, -1)
                layers.append(_junction(arrays, f"layer{i}", x.shape[1], dense_max_elements))
            x = layers[-1](x)
            outputs.append(x)
            n_in = x.shape[1]
        if not convs:
            layers[0] = _unpad(layers[0], int(meta["input_size"]))
        exit_layer = int(meta.get("exit_layer", meta["split"]))
        if not 1 <= exit_layer <= len(layers):
            raise ValueError(f"exit layer {exit_layer} is not one of the {len(layers)} layers")
        exit_pool = int(meta.get("exit_pool", 0))
        seen = outputs[exit_layer - 1]
        seen = adaptive_avg_pool2d(seen, exit_pool) if exit_pool else seen
        exit_ = _junction(arrays, "exit", seen.size, dense_max_elements)
        head = NumpyHead(tuple(layers), exit_,
                         np.asarray(arrays["pixel_mean"], np.float32),
                         np.asarray(arrays["pixel_std"], np.float32),
                         int(meta["input_size"]), int(meta["input_pad"]), str(meta["model_id"]),
                         float(meta["threshold"]), str(meta["score"]), tuple(meta["classes"]),
                         path, exit_layer, int(meta.get("uplink_bits", 0)),
                         StaticCode(arrays[UPLINK_CODE]) if UPLINK_CODE in arrays else None,
                         float(meta.get("temperature", 1.0)),   # absent: before calibration
                         shape, str(meta.get("resize", "stretch")), exit_pool,
                         outputs[-1].size, _unfamiliarity(meta, arrays))
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ArtifactError(f"{path}: edge artifact is incomplete ({e}); re-create it with "
                            f"`splitexit train`") from None
    if head.score not in SCORES:
        raise ArtifactError(f"{path}: unknown exit score {head.score!r}")
    if not 0 < head.temperature < math.inf:
        raise ArtifactError(f"{path}: exit temperature {head.temperature} is not a positive "
                            f"number; re-run `splitexit calibrate` on its folder")
    return head
