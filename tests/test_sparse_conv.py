"""Predefined-sparse convolutions: exact channel degrees, one-line errors, a forward and
gradients equal to a masked dense conv, storage and multiply-adds proportional to the real
kernels, and a NumPy twin for the torch-free edge that computes the same thing."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.edge.numpy_conv import input_major, max_pool2d, relu, sparse_conv2d
from pipeline.model.sparse import SparsityError
from pipeline.model.sparse_conv import SparseConv2d, channel_fan_in, make_conv

# (in_channels, out_channels, fan_out): image inputs, dense, fan-out 1, fan-in 1, wide, narrow.
SHAPES = [(1, 1, 1), (1, 8, 8), (3, 16, 16), (3, 12, 4), (3, 12, 8), (3, 6, 2), (7, 7, 7),
          (16, 16, 1), (16, 32, 4), (32, 16, 4), (64, 64, 8), (64, 128, 16), (128, 64, 1),
          (48, 96, 12), (20, 30, 3), (64, 10, 5), (256, 256, 32)]


def kernel_index(conv: SparseConv2d) -> torch.Tensor:
    """The channel index table expanded to the kernel table's shape, for gather/scatter."""
    return conv.indices.long()[:, :, None, None].expand_as(conv.weight)


@pytest.mark.parametrize("c_in,c_out,fan_out", SHAPES)
def test_channel_degrees_are_exact(c_in, c_out, fan_out):
    conv = SparseConv2d(c_in, c_out, fan_out, kernel_size=3, seed=11)
    rows = conv.indices.numpy()
    d_in = c_in * fan_out // c_out
    assert conv.fan_in == d_in and rows.shape == (c_out, d_in)
    assert conv.weight.shape == (c_out, d_in, 3, 3) and conv.indices.dtype == torch.int16
    assert all(len(np.unique(r)) == d_in for r in rows)  # d_in distinct inputs per output
    assert np.all(np.bincount(rows.ravel(), minlength=c_in) == fan_out)  # exact fan-out
    assert rows.min() >= 0 and rows.max() < c_in


@pytest.mark.parametrize("c_in,c_out,fan_out", SHAPES)
def test_pattern_is_a_pure_function_of_the_seed(c_in, c_out, fan_out):
    def pattern(seed):
        return SparseConv2d(c_in, c_out, fan_out, 1, seed=seed).indices

    assert torch.equal(pattern(5), pattern(5))
    if c_in * fan_out // c_out < c_in and c_in > 1:  # more than one pattern exists
        assert any(not torch.equal(pattern(5), pattern(s)) for s in range(6, 12))


@pytest.mark.parametrize("c_in,c_out,fan_out", [(3, 16, 5), (16, 24, 5), (64, 100, 7),
                                                (3, 32, 3), (10, 4, 3)])
def test_impossible_fan_out_is_one_line_naming_valid_choices(c_in, c_out, fan_out):
    with pytest.raises(SparsityError) as e:
        SparseConv2d(c_in, c_out, fan_out, kernel_size=3)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"conv {c_in}->{c_out} channels cannot have channel fan-out {fan_out}")
    assert "valid fan-outs nearby are" in msg and "pad" not in msg
    nearby = msg.split("nearby are ")[1].split(", or ")[0]
    suggested = [int(f) for f in nearby.split(", ")]
    assert suggested
    for f in suggested:
        channel_fan_in(c_in, c_out, f)  # every suggested fan-out works
    widths = msg.split("change out_channels to ")[1].split(" to keep")[0].split(" or ")
    for width in widths:
        channel_fan_in(c_in, int(width), fan_out)  # every suggested width keeps the fan-out


@pytest.mark.parametrize("fan_out", [0, 17, -1])
def test_fan_out_out_of_range_is_one_line(fan_out):
    with pytest.raises(SparsityError, match="channel fan-out .* between 1 and 16") as e:
        SparseConv2d(3, 16, fan_out, kernel_size=3)
    assert "\n" not in str(e.value)


def test_make_conv_is_a_plain_conv_when_dense():
    dense = make_conv(3, 16, 16, kernel_size=3, padding=1)
    assert type(dense) is nn.Conv2d and dense.padding == (1, 1)
    assert torch.count_nonzero(dense.bias) == 0
    assert dense.weight.std().item() == pytest.approx((2 / 27) ** 0.5, rel=0.25)  # He on 3*3*3
    sparse = make_conv(16, 32, 4, kernel_size=3, stride=2, seed=1)
    assert isinstance(sparse, SparseConv2d) and sparse.stride == 2
    assert torch.equal(sparse.indices, SparseConv2d(16, 32, 4, 3, seed=1).indices)
    with pytest.raises(SparsityError):
        make_conv(3, 16, 5, kernel_size=3)


def test_init_is_he_normal_on_the_real_fan_in():
    torch.manual_seed(0)
    conv = SparseConv2d(256, 256, 32, kernel_size=3)  # d_in = 32: real fan-in 288
    assert conv.weight.std().item() == pytest.approx((2 / 288) ** 0.5, rel=0.05)
    assert torch.count_nonzero(conv.bias) == 0


# (c_in, c_out, fan_out, kernel, stride, padding, height, width)
CONV_CASES = [(3, 12, 4, 3, 1, 0, 9, 8), (3, 12, 8, 3, 2, 1, 11, 10), (16, 32, 4, 3, 1, 1, 8, 8),
              (32, 16, 4, 5, 2, 0, 13, 12), (16, 16, 1, 1, 1, 0, 5, 7), (20, 30, 3, 3, 2, 1, 9, 9),
              (8, 8, 8, 3, 1, 1, 6, 6)]  # the last one dense


@pytest.mark.parametrize("train_dense", [False, True], ids=["gather", "train-dense"])
@pytest.mark.parametrize("c_in,c_out,fan_out,k,stride,padding,h,w", CONV_CASES)
def test_forward_and_gradients_match_masked_dense(c_in, c_out, fan_out, k, stride, padding,
                                                  h, w, train_dense):
    """Both ways of computing it: the gather + grouped conv (proportional to the kernels, what
    inference runs) and training's pass through the dense equivalent."""
    torch.manual_seed(0)
    conv = SparseConv2d(c_in, c_out, fan_out, k, stride, padding, seed=3).double()
    conv.train_dense = train_dense
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, c_in, h, w, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)

    w_ref = conv.dense_weight().requires_grad_(True)
    mask = torch.zeros_like(w_ref).scatter(1, kernel_index(conv), 1.0)
    assert mask.sum() == conv.kernels * k * k  # dense_weight zero exactly off the pattern
    assert torch.count_nonzero(w_ref.detach() * (1 - mask)) == 0
    b_ref = conv.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.conv2d(x_ref, w_ref * mask, b_ref, stride, padding)
    y_ref.backward(g)

    torch.testing.assert_close(y.detach(), y_ref.detach())
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad.gather(1, kernel_index(conv)))
    torch.testing.assert_close(conv.bias.grad, b_ref.grad)
    h_out, w_out = conv.output_size(h, w)
    assert y.shape == (3, c_out, h_out, w_out)


def test_state_dict_holds_only_the_real_kernels():
    c_in, c_out, k = 64, 64, 3
    sizes = {}
    for fan_out in (16, 8):
        conv = SparseConv2d(c_in, c_out, fan_out, k)
        d_in = conv.fan_in
        sd = conv.state_dict()
        assert set(sd) == {"weight", "bias", "indices"}
        assert sd["weight"].numel() == c_out * d_in * k * k
        assert sd["bias"].numel() == c_out and sd["indices"].numel() == c_out * d_in
        assert sum(t.numel() for t in sd.values()) == c_out * d_in * k * k + c_out + c_out * d_in
        sizes[fan_out] = sd["weight"].numel()
    assert sizes[8] * 2 == sizes[16]  # halving the fan-out halves the stored kernels


def test_loading_a_state_dict_replaces_the_pattern():
    a, b = SparseConv2d(16, 32, 4, 3, seed=1), SparseConv2d(16, 32, 4, 3, seed=2)
    x = torch.randn(2, 16, 6, 6)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize("c_in,c_out,fan_out,k,stride,padding,h,w", CONV_CASES)
def test_macs_are_real_kernels_times_output_pixels(c_in, c_out, fan_out, k, stride, padding,
                                                   h, w):
    conv = SparseConv2d(c_in, c_out, fan_out, k, stride, padding)
    dense = SparseConv2d(c_in, c_out, c_out, k, stride, padding)
    h_out, w_out = conv(torch.zeros(1, c_in, h, w)).shape[2:]
    assert conv.kernels == c_out * conv.fan_in
    assert conv.macs(h, w) == c_out * conv.fan_in * k * k * h_out * w_out
    assert conv.macs(h, w) * c_out == dense.macs(h, w) * fan_out  # fan_out/C_out of dense


def test_repr_names_the_degrees():
    text = repr(SparseConv2d(16, 32, 4, 3, padding=1))
    assert "16->32" in text and "fan_out=4" in text and "fan_in=2" in text


# --- the NumPy twin (pipeline/edge/numpy_conv.py) ---

@pytest.mark.parametrize("c_in,c_out,fan_out,k,stride,padding,h,w", CONV_CASES)
def test_numpy_conv_equals_the_torch_module(c_in, c_out, fan_out, k, stride, padding, h, w):
    torch.manual_seed(1)
    conv = SparseConv2d(c_in, c_out, fan_out, k, stride, padding, seed=4)
    with torch.no_grad():
        conv.bias.normal_()
        x = torch.randn(2, c_in, h, w)
        expected = conv(x).numpy()
    params = {name: t.detach().numpy() for name, t in conv.state_dict().items()}
    got = sparse_conv2d(x.numpy(), params["weight"], params["indices"], params["bias"],
                        stride, padding)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_numpy_conv_takes_any_channel_table_and_a_ready_plan():
    """input_major pads channels that feed fewer outputs (and one that feeds none); a plan
    made once gives what a fresh one gives. The reference: the same kernels scattered into a
    dense weight, through torch's conv."""
    rng = np.random.default_rng(5)
    c_in, c_out, d_in = 6, 5, 3
    indices = np.stack([rng.choice(c_in - 1, d_in, replace=False) for _ in range(c_out)])
    weight = rng.standard_normal((c_out, d_in, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(c_out).astype(np.float32)
    dense = np.zeros((c_out, c_in, 3, 3), np.float32)
    dense[np.arange(c_out)[:, None], indices] = weight
    x = rng.standard_normal((2, c_in, 7, 9)).astype(np.float32)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(dense), torch.from_numpy(bias),
                        stride=2, padding=1).numpy()
    plan = input_major(weight, indices, c_in)
    assert plan[0].shape == (c_in, np.bincount(indices.ravel()).max(), 9)
    assert not plan[0][c_in - 1].any()       # never read: zero kernels, never gathered
    for made in (None, plan):
        got = sparse_conv2d(x, weight, indices, bias, 2, 1, made)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,h,w", [(2, 8, 8), (2, 9, 7), (3, 10, 12)])
def test_numpy_max_pool_and_relu_equal_torch(k, h, w):
    x = torch.randn(2, 3, h, w)
    np.testing.assert_array_equal(max_pool2d(x.numpy(), k), F.max_pool2d(x, k).numpy())
    out = relu(x.numpy())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, torch.relu(x).numpy())


def test_numpy_conv_never_imports_torch():
    code = ("import sys; sys.modules['torch'] = None; "
            "import pipeline.edge.numpy_conv")  # a torch import would now raise ImportError
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[1])
