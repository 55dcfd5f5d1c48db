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

__all__ = ["sparse_conv2d", "max_pool2d", "relu"]


def sparse_conv2d(x: np.ndarray, weight: np.ndarray, indices: np.ndarray, bias: np.ndarray,
                  stride: int = 1, padding: int = 0) -> np.ndarray:
    """y[b, o] = bias[o] + sum_j conv(x[b, indices[o, j]], weight[o, j]); NCHW in and out."""
    n_out, d_in, k_h, k_w = weight.shape
    batch, _, height, width = x.shape
    h_out = (height + 2 * padding - k_h) // stride + 1
    w_out = (width + 2 * padding - k_w) // stride + 1
    if padding:  # pad the C_in input channels once, not the C_out*d_in gathered ones
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    flat = np.asarray(indices, dtype=np.intp).reshape(-1)
    gathered = x.take(flat, axis=1).reshape(batch, n_out, d_in, *x.shape[2:])
    y = np.zeros((batch, n_out, h_out, w_out), dtype=np.result_type(x, weight))
    rows, cols = stride * (h_out - 1) + 1, stride * (w_out - 1) + 1
    for i in range(k_h):
        for j in range(k_w):
            window = gathered[..., i:i + rows:stride, j:j + cols:stride]  # (B, O, d, Ho, Wo)
            y += np.einsum("bodhw,od->bohw", window, weight[:, :, i, j])
    y += np.asarray(bias, dtype=y.dtype)[:, None, None]
    return y


def max_pool2d(x: np.ndarray, k: int) -> np.ndarray:
    """k x k max pooling with stride k; a ragged edge is dropped, as torch's default does."""
    batch, channels, height, width = x.shape
    h, w = height // k, width // k
    tiles = x[:, :, :h * k, :w * k].reshape(batch, channels, h, k, w, k)
    return tiles.max(axis=(3, 5))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0, dtype=x.dtype)
