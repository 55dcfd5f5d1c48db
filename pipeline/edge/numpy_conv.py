"""Predefined-sparse convolution, pooling and ReLU in NumPy, for the torch-free edge.

Computes what pipeline.model.sparse_conv.SparseConv2d computes, from the same arrays (the
kernel table [C_out, d_in, k, k], the channel index table [C_out, d_in] and the bias). Torch
gathers the channels each output reads and runs a grouped conv; here the kernels are turned
around to the input channel they read (`input_major`): each input channel's k*k patches
(one im2col copy of the input, as a dense conv makes) meet its d_out kernels in one small
matrix product, and each output sums the d_in maps meant for it. That is C_out*d_in*k*k
multiply-adds per output pixel -- proportional to the real kernels -- in one batched BLAS
call, not k*k einsums (NumPy at batch 1 is per-call overhead first: 2-3x faster on the
shipped conv-sparse head).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["input_major", "sparse_conv2d", "max_pool2d", "adaptive_avg_pool2d", "relu"]


def input_major(weight: np.ndarray, indices: np.ndarray, c_in: int) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """The kernels grouped by the input channel they read: (C_in, d_out, k*k), zero-filled
    where a channel feeds fewer than the most-fed one, and for each (output, slot) of
    `indices` in order, its row in the (C_in*d_out) maps that grouping computes."""
    n_out, d_in, k_h, k_w = weight.shape
    reads = np.asarray(indices, dtype=np.intp).reshape(-1)
    fed = np.bincount(reads, minlength=c_in)
    d_out = int(fed.max()) if reads.size else 0
    kernels = np.zeros((c_in, d_out, k_h * k_w), dtype=weight.dtype)
    rows = np.empty(reads.size, dtype=np.intp)
    slot = np.zeros(c_in, dtype=np.intp)
    flat = weight.reshape(n_out * d_in, k_h * k_w)
    for r, channel in enumerate(reads):
        kernels[channel, slot[channel]] = flat[r]
        rows[r] = channel * d_out + slot[channel]
        slot[channel] += 1
    return kernels, rows


def sparse_conv2d(x: np.ndarray, weight: np.ndarray, indices: np.ndarray | None,
                  bias: np.ndarray, stride: int = 1, padding: int = 0,
                  plan: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """y[b, o] = bias[o] + sum_j conv(x[b, indices[o, j]], weight[o, j]); NCHW in and out.
    indices None: a dense conv, every output reads every input channel. `plan`: this conv's
    input_major(), made once by a caller that runs it often."""
    n_out, d_in, k_h, k_w = weight.shape
    batch, c_in = x.shape[:2]
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(x, (k_h, k_w), axis=(2, 3))[:, :, ::stride, ::stride]
    h_out, w_out = windows.shape[2:4]
    pixels = h_out * w_out
    if indices is None:      # im2col: (B, C_in*k*k, P), one GEMM per frame
        cols = windows.transpose(0, 1, 4, 5, 2, 3).reshape(batch, c_in * k_h * k_w, pixels)
        y = weight.reshape(n_out, -1) @ cols                               # (B, C_out, P)
    else:
        kernels, rows = plan if plan is not None else input_major(weight, indices, c_in)
        cols = windows.transpose(1, 4, 5, 0, 2, 3).reshape(c_in, k_h * k_w, batch * pixels)
        maps = (kernels @ cols).reshape(-1, batch * pixels)           # (C_in*d_out, B*P)
        y = maps.take(rows, axis=0).reshape(n_out, d_in, batch, pixels).sum(axis=1)
        y = y.transpose(1, 0, 2)                                           # (B, C_out, P)
    y = y.reshape(batch, n_out, h_out, w_out)
    return y + np.asarray(bias, dtype=y.dtype)[:, None, None]


def max_pool2d(x: np.ndarray, k: int) -> np.ndarray:
    """k x k max pooling with stride k; a ragged edge is dropped, as torch's default does.
    The max of k*k strided views: a reduction over reshaped tile axes is ~20x slower."""
    h, w = x.shape[2] // k * k, x.shape[3] // k * k
    out = x[:, :, 0:h:k, 0:w:k].copy()
    for i in range(k):
        for j in range(k):
            if i or j:
                np.maximum(out, x[:, :, i:h:k, j:w:k], out=out)
    return out


def adaptive_avg_pool2d(x: np.ndarray, side: int) -> np.ndarray:
    """Average over side x side bins as torch's adaptive_avg_pool2d draws them: bin i spans
    floor(i*H/side) to ceil((i+1)*H/side), so bins overlap where side does not divide H."""
    batch, channels, height, width = x.shape
    out = np.empty((batch, channels, side, side), dtype=x.dtype)
    for i in range(side):
        top, bottom = i * height // side, -(-(i + 1) * height // side)
        for j in range(side):
            left, right = j * width // side, -(-(j + 1) * width // side)
            out[:, :, i, j] = x[:, :, top:bottom, left:right].mean(axis=(2, 3))
    return out


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, dtype=x.dtype)
