"""The head and its exit in NumPy: what an edge device runs, without torch.

It runs the edge artifact DIR/edge.npz (its layout: pipeline.protocol.edge_artifact). A
sparse junction is a gather, a multiply and a sum over d_in: storage and work scale with the
real weights, never with N_in x N_out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.protocol.edge_artifact import UPLINK_CODE, read_edge_npz
from pipeline.protocol.static_code import StaticCode

__all__ = ["Junction", "NumpyHead", "load_numpy_head", "exit_scores", "SCORES"]

SCORES = ("max_softmax", "margin", "entropy")
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
class NumpyHead:
    layers: tuple[Junction, ...]
    exit: Junction
    pixel_mean: np.float32
    pixel_std: np.float32
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

    @property
    def width(self) -> int:
        """Features per frame at the split (what goes on the wire)."""
        return self.layers[-1].bias.shape[0]

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels in [0, 1] (B, input_size) -> (exit logits (B, C), features (B, W)). The
        input padding is never built: the first junction reads no padded input (`_unpad`),
        and it reads raw pixels: the standardization is folded into its weights."""
        exit_logits, hidden = self.run_exit(pixels)
        return exit_logits, self.run_uplink(hidden)

    def run_exit(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(exit logits (B, C), the activations the exit read): all a confident frame needs."""
        x = np.asarray(pixels, dtype=np.float32)
        for layer in (self._first, *self.layers[1:self.exit_layer]):
            x = np.maximum(layer(x), 0)
        return self.exit(x), x

    def run_uplink(self, hidden: np.ndarray) -> np.ndarray:
        """The split features from run_exit's activations, for the frames sent up: a
        bottleneck after the exit costs nothing on frames answered locally."""
        for layer in self.layers[self.exit_layer:]:
            hidden = np.maximum(layer(hidden), 0)
        return hidden

    @functools.cached_property
    def _first(self) -> Junction:
        """layers[0] on raw pixels: sum w (p - mean) / std + b = sum (w / std) p + b', with
        b' = b - mean / std * sum w. One NumPy pass less a frame; `layers` stay as trained
        (the exports standardize as torch does)."""
        j = self.layers[0]
        per_output = j.values.sum(axis=0 if j.indices is None else 1, dtype=np.float64)
        bias = j.bias - (float(self.pixel_mean) / float(self.pixel_std)) * per_output
        return Junction((j.values / self.pixel_std).astype(np.float32), j.indices,
                        bias.astype(np.float32))


def exit_scores(logits: np.ndarray, score: str, temperature: float = 1.0) -> np.ndarray:
    """Confidence of the exit classifier in [0, 1], higher = more sure, on softmax(logits /
    temperature): the one definition that training (choosing the threshold) and every edge
    (applying it) share, in float64."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if score == "max_softmax":
        return p.max(axis=1)
    if score == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if score == "entropy":
        entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
        return 1.0 - entropy / math.log(p.shape[1])
    raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")


def _junction(arrays, name: str, n_in: int, dense_max_elements: int) -> Junction:
    values, bias = arrays[f"{name}.values"], arrays[f"{name}.bias"].astype(np.float32)
    indices = arrays.get(f"{name}.indices")
    if indices is None:
        return Junction(np.ascontiguousarray(values.T, dtype=np.float32), None, bias)
    if indices.shape != values.shape or indices.size and not 0 <= indices.min() <= \
            indices.max() < n_in:
        raise ValueError(f"{name}: indices {indices.shape} do not fit values {values.shape} "
                         f"and {n_in} inputs")
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


def load_numpy_head(path: str | Path, dense_max_elements: int = DENSE_MAX_ELEMENTS) -> NumpyHead:
    """The edge artifact (DIR or DIR/edge.npz) as a NumPy head; one-line errors. ELL
    junctions of at most `dense_max_elements` weights run dense (0: every junction as
    stored, what an export wants)."""
    meta, arrays, path = read_edge_npz(path)
    try:
        n_in = int(meta["input_pad"]) or int(meta["input_size"])
        widths, layers = [n_in], []
        for i in range(meta["split"]):
            layers.append(_junction(arrays, f"layer{i}", n_in, dense_max_elements))
            n_in = layers[-1].bias.shape[0]
            widths.append(n_in)
        layers[0] = _unpad(layers[0], int(meta["input_size"]))
        exit_layer = int(meta.get("exit_layer", meta["split"]))
        if not 1 <= exit_layer <= len(layers):
            raise ValueError(f"exit layer {exit_layer} is not one of the {len(layers)} layers")
        exit_ = _junction(arrays, "exit", widths[exit_layer], dense_max_elements)
        head = NumpyHead(tuple(layers), exit_,
                         np.float32(arrays["pixel_mean"]), np.float32(arrays["pixel_std"]),
                         int(meta["input_size"]), int(meta["input_pad"]), str(meta["model_id"]),
                         float(meta["threshold"]), str(meta["score"]), tuple(meta["classes"]),
                         path, exit_layer, int(meta.get("uplink_bits", 0)),
                         StaticCode(arrays[UPLINK_CODE]) if UPLINK_CODE in arrays else None,
                         float(meta.get("temperature", 1.0)))  # absent: before calibration
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ArtifactError(f"{path}: edge artifact is incomplete ({e}); re-create it with "
                            f"`splitexit train`") from None
    if head.score not in SCORES:
        raise ArtifactError(f"{path}: unknown exit score {head.score!r}")
    if not 0 < head.temperature < math.inf:
        raise ArtifactError(f"{path}: exit temperature {head.temperature} is not a positive "
                            f"number; re-run `splitexit calibrate` on its folder")
    return head
