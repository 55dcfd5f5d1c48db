"""int8 weight tables with one float scale per output row, for the C export: a junction's row
is an output's d_in weights, a conv's an output channel's d_in kernels (d_in*k*k weights).

Rounding every weight to its nearest step leaves each output off by the sum of d_in
independent rounding errors; on the default head's exit (200 inputs a class) that moved the
exit decision on 0.9 % of Fashion-MNIST's test frames. `compensated_rows` rounds one weight
at a time and pushes its error onto the row's weights not yet rounded, weighted by how the
inputs co-vary on calibration frames (GPTQ, Frantar et al., ICLR 2023), so the errors cancel
in the sum on data like the calibration frames. Same tables, same C; only the choice of
integers differs. A conv row is a junction row over the patches the conv reads: its inputs
are k x k windows of its channels at (frame, position) pairs drawn from the calibration
frames, so the same rounding serves both. Pure NumPy: export needs no torch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.edge.numpy_conv import adaptive_avg_pool2d
from pipeline.edge.numpy_head import ConvStage, Junction, NumpyHead

__all__ = ["quantize_rows", "compensated_rows", "int8_tables", "int8_head", "junction_rows",
           "conv_rows", "CALIBRATION_FRAMES"]

QMAX = 127  # symmetric int8, as the wire's
CALIBRATION_FRAMES = 4096
DAMPING = 0.01  # of the mean input power, added to the Hessian's diagonal (GPTQ's default)
# Patches a conv's rounding is calibrated on, drawn at random (frame, position) pairs: every
# position of 4096 frames would be millions of rows for a Hessian of at most C_in*k*k sides.
CONV_PATCHES = 32768
CHUNK = 256  # calibration frames a conv runs at once (its im2col copy is k*k times the input)


def quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round to nearest: int8 values and one float32 scale per row (peak / 127)."""
    scale = _row_scales(values)
    q = np.clip(np.rint(values / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def _row_scales(values: np.ndarray) -> np.ndarray:
    peak = np.abs(values).max(axis=1)
    return np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)


def compensated_rows(values: np.ndarray, indices: np.ndarray | None,
                     inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and per-row scales for values[o, k] (reading inputs[:, indices[o, k]], or
    inputs[:, k] when indices is None), rounded to minimise each row's output error on
    `inputs` (frames x junction inputs). Weights that are exactly 0 (the input padding)
    stay 0."""
    scale = _row_scales(values)
    q = np.zeros(values.shape, np.int8)
    hessians: dict[bytes, np.ndarray] = {}
    x = inputs.astype(np.float64)
    for o in range(values.shape[0]):
        live = np.flatnonzero(values[o])
        cols = live if indices is None else indices[o, live]
        key = cols.tobytes()
        if key not in hessians:  # a dense junction's rows all share one
            xs = x[:, cols]
            h = xs.T @ xs / len(xs)
            h[np.diag_indices_from(h)] += DAMPING * max(float(np.mean(np.diag(h))), 1e-12)
            hessians = {key: _inverse_cholesky(h)}
        q[o, live] = _round_row(values[o, live].astype(np.float64), scale[o], hessians[key])
    return q, scale


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of H^-1: row k holds how weight k's error spreads to k+1.. ."""
    return np.linalg.cholesky(np.linalg.inv(h)).T


def _round_row(w: np.ndarray, scale: float, u: np.ndarray) -> np.ndarray:
    q = np.empty(len(w), np.int8)
    for k in range(len(w)):
        q[k] = np.clip(np.rint(w[k] / scale), -QMAX, QMAX)
        err = (w[k] - q[k] * scale) / u[k, k]
        w[k + 1:] -= err * u[k, k + 1:]
    return q


def int8_tables(head: NumpyHead, calibration: np.ndarray | None = None
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int8 values, row scales) for each layer, [layer0, ..., exit], as rows (see
    `junction_rows`, `conv_rows`). With calibration pixels (frames x input_size, in [0, 1])
    the rounding is compensated, layer by layer, each calibrated on what the already-quantized
    layers before it output; without, each weight rounds to nearest."""
    layers = [*head.layers, head.exit]
    if calibration is None:
        return [quantize_rows(_rows(layer)[0]) for layer in layers]
    x = np.asarray(calibration, dtype=np.float32)
    if head.convolutional:
        x = x.reshape(-1, *head.input_shape)
        mean, std = head.pixel_mean[:, None, None], head.pixel_std[:, None, None]
    else:
        mean, std = head.pixel_mean, head.pixel_std
    seen = [(x - mean) / std]
    rng = np.random.default_rng(0)
    tables = []
    for i, layer in enumerate(layers):
        x = _exit_input(head, seen[head.exit_layer]) if layer is head.exit else seen[-1]
        values, indices = _rows(layer)
        if isinstance(layer, ConvStage):
            inputs = _patches(x, layer.weight.shape[-1], layer.stride, rng)
        else:
            inputs = x.reshape(len(x), -1)
        q, scale = compensated_rows(values, indices, inputs)
        tables.append((q, scale))
        if i < len(head.layers):
            seen.append(_run(_dequantized(layer, q, scale), x))
    return tables


def int8_head(head: NumpyHead, tables: list[tuple[np.ndarray, np.ndarray]]) -> NumpyHead:
    """The head with int8_tables' values times their scales as its weights: what the int8 C
    export computes (its float sums in another order aside), in NumPy."""
    *layers, exit_ = (_dequantized(layer, q, scale) for layer, (q, scale)
                      in zip((*head.layers, head.exit), tables))
    return dataclasses.replace(head, layers=tuple(layers), exit=exit_)


def _rows(layer: Junction | ConvStage) -> tuple[np.ndarray, np.ndarray | None]:
    return conv_rows(layer) if isinstance(layer, ConvStage) else junction_rows(layer)


def junction_rows(j: Junction) -> tuple[np.ndarray, np.ndarray | None]:
    """(values as rows [N_out, d_in or N_in], indices or None) of a junction."""
    return (j.values.T, None) if j.indices is None else (j.values, j.indices)


def conv_rows(conv: ConvStage) -> tuple[np.ndarray, np.ndarray | None]:
    """(kernels as rows [C_out, d_in*k*k], or None where dense) the columns of a
    `_patches` row each weight reads: channel c's tap t is column c*k*k + t."""
    c_out, d_in, k, _ = conv.weight.shape
    values = conv.weight.reshape(c_out, d_in * k * k)
    if conv.indices is None:
        return values, None
    taps = np.arange(k * k)
    return values, (conv.indices[:, :, None] * (k * k) + taps).reshape(c_out, -1)


def _patches(x: np.ndarray, k: int, stride: int, rng: np.random.Generator) -> np.ndarray:
    """(patches, C_in*k*k): the k x k windows of every channel a conv (padded as the head
    pads it) reads at up to CONV_PATCHES random (frame, output position) pairs."""
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    frames, channels, h, w = windows.shape[:4]
    pick = rng.choice(frames * h * w, size=min(CONV_PATCHES, frames * h * w), replace=False)
    frame, at = np.divmod(pick, h * w)
    return windows[frame, :, at // w, at % w].reshape(len(pick), channels * k * k)


def _dequantized(layer: Junction | ConvStage, q: np.ndarray, scale: np.ndarray
                 ) -> Junction | ConvStage:
    """The layer with its int8 values times their scales: what the int8 C computes."""
    rows = (q * scale[:, None]).astype(np.float32)
    if isinstance(layer, ConvStage):
        return ConvStage(rows.reshape(layer.weight.shape), layer.indices, layer.bias,
                         layer.stride, layer.pool)
    return Junction(rows.T if layer.indices is None else rows, layer.indices, layer.bias)


def _run(layer: Junction | ConvStage, x: np.ndarray) -> np.ndarray:
    """ReLU(layer(x)), a conv CHUNK frames at a time."""
    if isinstance(layer, Junction):
        return np.maximum(layer(x.reshape(len(x), -1)), 0)
    return np.concatenate([np.maximum(layer(x[i:i + CHUNK]), 0)
                           for i in range(0, len(x), CHUNK)])


def _exit_input(head: NumpyHead, x: np.ndarray) -> np.ndarray:
    """What the exit reads from its layer's output: pooled first if the head says so."""
    return (adaptive_avg_pool2d(x, head.exit_pool) if head.exit_pool else x).reshape(len(x), -1)
