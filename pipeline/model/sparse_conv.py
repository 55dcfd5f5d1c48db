"""Predefined-sparse convolutions: channel connectivity fixed before training, exact degrees.

A conv C_in -> C_out with channel fan-out d_out (every input channel feeds exactly d_out
output channels) and channel fan-in d_in = C_in*d_out/C_out (every output channel reads
exactly d_in input channels) has C_out*d_in real k x k kernels. Fixed fan-in is what makes
the layout compact: the kernels fit a [C_out, d_in, k, k] table plus a [C_out, d_in] channel
index table (ELL again, one index per kernel), and the forward is a channel gather followed by
one grouped convolution, so storage, multiply-adds and gradients scale with the real kernels.

From prior work. Pre-defined sparsity (Dey, Chugg, Beerel et al.: the pattern is fixed
before training, degrees are exact on both sides of each junction, and the pattern is drawn
at random) -- what pipeline/model/sparse.py does for linear junctions, whose pattern drawing
and degree checks this module reuses, with channels in place of neurons. Channel-wise sparse
connectivity in CNNs: grouped convolutions (AlexNet, ResNeXt) and ShuffleNet's channel
shuffle fix which input channels an output channel sees, and Deep Expander Networks (Prabhu
et al., ECCV 2018) replace the block-diagonal group structure with random, expander-like
bipartite graphs between channels, again fixed before training. The random exact-degree
pattern here is such a graph; a plain grouped conv is one of its (non-expanding) instances.

The same group's convolutional work (Kundu, Chugg, Beerel et al.: pSConv, Allerton 2019;
"Pre-defined Sparsity for Low-Complexity CNNs", IEEE TC 2020) instead fixes zeros *inside*
the k x k kernels, in periodic patterns.

What this module chooses: sparsity over channel connections -- a whole k x k kernel is kept
or dropped -- never inside a kernel. Whole kernels keep the work proportional to what is
stored and run on stock dense convolution code (a grouped conv over gathered channels);
zeros inside kernels save work only with kernels written for their pattern.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.sparse import SparsityError, draw_connectivity, nearby_fan_outs

__all__ = ["SparseConv2d", "make_conv", "channel_fan_in"]

def channel_fan_in(in_channels: int, out_channels: int, fan_out: int) -> int:
    """Return the exact channel fan-in, or raise a one-line SparsityError about channels.

    The linear junctions' fix for an indivisible pair -- pad the input, or widen the layer
    before -- means nothing for a first conv, whose input channels are the image's; changing
    out_channels (or the fan-out) works for every conv, so that is what the message offers.
    """
    name = f"conv {in_channels}->{out_channels} channels"
    if in_channels < 1 or out_channels < 1:
        raise SparsityError(f"{name}: channel counts must be positive")
    if not 1 <= fan_out <= out_channels:
        raise SparsityError(
            f"{name}: channel fan-out {fan_out} must be between 1 and {out_channels} (each "
            f"input channel feeds distinct output channels; {out_channels} means dense)")
    edges = in_channels * fan_out
    if edges % out_channels == 0:
        return edges // out_channels
    # out_channels that keep this fan-out: divisors of C_in*d_out no smaller than d_out.
    widths = [c for c in range(fan_out, edges + 1) if edges % c == 0]
    near = ([c for c in widths if c < out_channels][-1:]
            + [c for c in widths if c > out_channels][:1])
    raise SparsityError(
        f"{name} cannot have channel fan-out {fan_out}: {in_channels}*{fan_out} is not "
        f"divisible by {out_channels}; valid fan-outs nearby are "
        f"{', '.join(map(str, nearby_fan_outs(in_channels, out_channels, fan_out)))}, or "
        f"change out_channels to {' or '.join(map(str, near))} to keep fan-out {fan_out}")


class SparseConv2d(nn.Module):
    """A k x k conv whose output channel o reads only input channels indices[o] (d_in of them).

    `weight` holds the real kernels [C_out, d_in, k, k]; `indices` the channel index table
    [C_out, d_in] (int16 while C_in fits). state_dict size and multiply-adds are both
    proportional to C_out*d_in kernels, never to C_out*C_in.
    """

    def __init__(self, in_channels: int, out_channels: int, fan_out: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, seed: int = 0):
        super().__init__()
        d_in = channel_fan_in(in_channels, out_channels, fan_out)
        self.in_channels, self.out_channels, self.fan_out, self.fan_in = (
            in_channels, out_channels, fan_out, d_in)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        index_dtype = torch.int16 if in_channels <= torch.iinfo(torch.int16).max else torch.int32
        pattern = draw_connectivity(in_channels, out_channels, fan_out, seed)
        self.register_buffer("indices", torch.from_numpy(pattern).to(index_dtype))
        self.weight = nn.Parameter(torch.empty(out_channels, d_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He-normal on the real fan-in d_in*k*k: C_in*k*k would start a layer at density
        # d_in/C_in with that fraction of the variance it needs.
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (self.fan_in * self.kernel_size ** 2)))
        nn.init.zeros_(self.bias)

    # While training, compute through the equivalent dense weight (same outputs, and the
    # same gradients reach only the real kernels): on CPU oneDNN's dense conv runs a training
    # step 3-10x faster than the grouped one over gathered channels at these sizes
    # (benchmarks/sparse_conv.py), and the multiply-adds saved are the edge's to collect.
    train_dense: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fan_in == self.in_channels or (self.train_dense and self.training
                                               and torch.is_grad_enabled()):
            # (Dense: the gather would copy the input C_out times for nothing.)
            weight = self.dense_weight(differentiable=True)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding)
        # Group o of the gathered input is exactly the d_in channels output o reads, so one
        # grouped conv does C_out*d_in*k*k multiply-adds per output pixel; autograd's
        # index_select backward scatter-adds the gradient back to the shared input channels.
        gathered = x.index_select(1, self.indices.reshape(-1).long())  # (B, C_out*d_in, H, W)
        return F.conv2d(gathered, self.weight, self.bias, self.stride, self.padding,
                        groups=self.out_channels)

    def dense_weight(self, differentiable: bool = False) -> torch.Tensor:
        """The equivalent dense [C_out, C_in, k, k] weight; zeros where no kernel is stored."""
        values = self.weight if differentiable else self.weight.detach()
        index = self.indices.long()[:, :, None, None].expand_as(values)
        w = values.new_zeros(self.out_channels, self.in_channels, *values.shape[2:])
        return w.scatter(1, index, values)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def macs(self, h: int, w: int) -> int:
        """Multiply-adds for one frame of h x w input: real kernels x output pixels."""
        h_out, w_out = self.output_size(h, w)
        return self.kernels * self.kernel_size ** 2 * h_out * w_out

    @property
    def kernels(self) -> int:
        return self.out_channels * self.fan_in

    def extra_repr(self) -> str:
        return (f"{self.in_channels}->{self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, fan_out={self.fan_out}, "
                f"fan_in={self.fan_in}, density={self.fan_in / self.in_channels:.3f}")


def make_conv(in_channels: int, out_channels: int, fan_out: int, kernel_size: int,
              stride: int = 1, padding: int = 0, seed: int = 0) -> nn.Module:
    """A dense nn.Conv2d when fan-out is the full width, else a SparseConv2d."""
    if fan_out == out_channels:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        nn.init.normal_(conv.weight, std=math.sqrt(2.0 / (in_channels * kernel_size ** 2)))
        nn.init.zeros_(conv.bias)
        return conv
    return SparseConv2d(in_channels, out_channels, fan_out, kernel_size, stride, padding, seed)

