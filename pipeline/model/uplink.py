"""The uplink as training sees it: the split features quantized exactly as the wire sends them.

With `model.uplink_bits` set, training runs the tail on features that went through the
wire's unsigned quantization (pipeline.floor.quantization.quantize_unsigned: each frame
scaled so its peak is the top code, the scale rounded to the float16 it travels as, codes
rounded half to even) and back, so what is trained is what is sent. Rounding has no useful
gradient; the straight-through estimator passes the gradient of the dequantized features to
the features unchanged (Bengio et al., 2013).
"""

from __future__ import annotations

import torch

from pipeline.model.config import UPLINK_BITS
from pipeline.floor.quantization import FLOAT16_MAX, SCALE_MIN

__all__ = ["fake_quantize", "UPLINK_BITS"]


def fake_quantize(features: torch.Tensor, bits: int) -> torch.Tensor:
    """Forward: the wire's quantize-dequantize at `bits`, bit for bit. Backward: identity."""
    levels = (1 << bits) - 1
    x = features.clamp_min(0)
    with torch.no_grad():
        peak = x.amax(dim=1, keepdim=True)
        scale = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
        scale = scale.clamp(SCALE_MIN, FLOAT16_MAX).half().float()
        sent = torch.clamp(torch.round(x / scale), 0, levels) * scale
    return x + (sent - x).detach()
