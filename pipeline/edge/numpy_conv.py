"""Predefined-sparse convolution, pooling and ReLU in NumPy, for the torch-free edge.

Computes what pipeline.model.sparse_conv.SparseConv2d computes, from the same arrays (the
kernel table [C_out, d_in, k, k], the channel index table [C_out, d_in] and the bias): gather
the channels each output reads, then convolve each group of d_in with its own kernels. The
work is one einsum per kernel offset (k*k of them) over strided views of the gathered input,
C_out*d_in*k*k multiply-adds per output pixel -- proportional to the real kernels -- and no
im2col copy k*k times the size of the input.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sparse_conv2d", "max_pool2d", "adaptive_avg_pool2d", "relu"]


def sparse_conv2d(x: np.ndarray, weight: np.ndarray, indices: np.ndarray | None,
                  bias: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """y[b, o] = bias[o] + sum_j conv(x[b, indices[o, j]], weight[o, j]); NCHW in and out.
    indices None: a dense conv, every output reads every input channel (no gather)."""
    n_out, d_in, k_h, k_w = weight.shape
    batch, _, height, width = x.shape
    h_out = (height + 2 * padding - k_h) // stride + 1
    w_out = (width + 2 * padding - k_w) // stride + 1
    if padding:  # pad the C_in input channels once, not the C_out*d_in gathered ones
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    if indices is None:
        source, spec = x, "bdhw,od->bohw"
    else:
        flat = np.asarray(indices, dtype=np.intp).reshape(-1)
        source = x.take(flat, axis=1).reshape(batch, n_out, d_in, *x.shape[2:])
        spec = "bodhw,od->bohw"
    y = np.zeros((batch, n_out, h_out, w_out), dtype=np.result_type(x, weight))
    rows, cols = stride * (h_out - 1) + 1, stride * (w_out - 1) + 1
    for i in range(k_h):
        for j in range(k_w):
            window = source[..., i:i + rows:stride, j:j + cols:stride]
            y += np.einsum(spec, window, weight[:, :, i, j])
    y += np.asarray(bias, dtype=y.dtype)[:, None, None]
    return y


def max_pool2d(x: np.ndarray, k: int) -> np.ndarray:
    """k x k max pooling with stride k; a ragged edge is dropped, as torch's default does."""
    batch, channels, height, width = x.shape
    h, w = height // k, width // k
    tiles = x[:, :, :h * k, :w * k].reshape(batch, channels, h, k, w, k)
    return tiles.max(axis=(3, 5))


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
