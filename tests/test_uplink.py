"""Quantization-aware training of the uplink: what the tail trains on is, bit for bit, what
the wire delivers (pipeline/model/uplink.py against pipeline/protocol/wire.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.uplink import UPLINK_BITS, fake_quantize
from pipeline.protocol import wire


def split_features(frames: int = 64, width: int = 48, seed: int = 0) -> np.ndarray:
    """Post-ReLU features: many zeros, a long tail, one all-zero frame, and frames whose
    scale falls outside float16 (too large, subnormal, below the smallest subnormal)."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_t(3, size=(frames, width)), 0).astype(np.float32) * 3
    x[5] = 0.0
    x[6] *= 1e7
    x[7] *= 1e-6
    x[8] *= 1e-12
    return x


@pytest.mark.parametrize("bits", UPLINK_BITS)
def test_fake_quant_forward_equals_the_wires_quantize_dequantize(bits):
    x = split_features()
    dtype = wire.DTYPE_FOR_BITS[bits]
    msg = wire.encode_request(1, bytes(4), x, dtype, wire.Codec.LZ4)
    delivered = wire.decode_request(msg).features
    trained = fake_quantize(torch.from_numpy(x), bits).numpy()
    assert np.array_equal(trained, delivered)
    assert len(np.unique(trained[0])) <= 1 << bits


def test_fake_quant_passes_gradients_straight_through():
    x = torch.from_numpy(split_features()).requires_grad_(True)
    g = torch.randn_like(x)
    fake_quantize(x, 4).backward(g)
    assert torch.equal(x.grad, g)


def test_a_model_trained_for_its_uplink_sends_what_it_trained(tiny_config_path, tmp_path):
    from pipeline.edge.config import wire_codec, wire_dtype
    from pipeline.errors import ConfigError
    from pipeline.model.artifacts import load_server
    from pipeline.edge.numpy_head import load_numpy_head
    from pipeline.model.config import load_config
    from pipeline.model.train import run

    cfg = load_config(str(tiny_config_path), ["model.uplink_bits=4", "train.epochs=1"])
    run(cfg, tmp_path, progress=False)
    head = load_numpy_head(tmp_path)
    assert head.uplink_bits == 4
    assert wire_dtype("auto", head.uplink_bits) == wire.DType.UINT4
    assert wire_dtype("int8", head.uplink_bits) == wire.DType.INT8  # an explicit choice wins
    # ... and both halves carry the same static entropy code for its 4-bit codes
    server = load_server(tmp_path)
    assert head.code is not None and np.array_equal(head.code.frequencies, server.code.frequencies)
    assert head.code.channels == head.width and head.code.symbols == 16
    assert wire_codec("auto", wire.DType.UINT4, head.code) == wire.Codec.STATIC
    assert wire_codec("auto", wire.DType.INT8, head.code) == wire.Codec.LZ4
    with pytest.raises(ConfigError, match="--codec static needs a model trained"):
        wire_codec("static", wire.DType.UINT4, None)


def test_a_rate_penalty_trains_sparser_features(tiny_config_path, idx_dir):
    """The split features' code length falls with train.rate_weight: more of them are 0."""
    from pipeline.model.config import load_config
    from pipeline.floor.data import load_dataset
    from pipeline.model.train import fit

    data = load_dataset(idx_dir, val_fraction=0.05)
    pixels = torch.from_numpy(data.test.images).float() / 255
    zeros = []
    for weight in (0.0, 3.0):
        cfg = load_config(str(tiny_config_path), ["model.uplink_bits=4", "train.epochs=2",
                                                  f"train.rate_weight={weight}"])
        model, _ = fit(cfg, data, progress=False)
        with torch.inference_mode():
            _, features = model.head(pixels)
        zeros.append(float((features == 0).float().mean()))
    assert zeros[1] > zeros[0] + 0.05, zeros
