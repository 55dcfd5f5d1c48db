"""The split model: a head (edge) and a tail (server) cut from one layer layout.

    pixels (B, C*H*W) -> standardize (an MLP: pad to widths[0]; convs: as C x H x W)
        -> head layers -> features (B, W_split), flattened
        edge:   layer `exit_layer` (the split layer unless a bottleneck follows it)
                -> [average pool] -> exit classifier -> exit logits (B, classes)
        server: features (as the wire delivers them) -> tail layers -> final logits

Layers are convs (pipeline.model.sparse_conv, each with its ReLU and max pool) then fully
connected junctions (pipeline.model.sparse); an MLP has no convs. Submodule names are the
contract between the training checkpoint and the two artifacts: the edge file holds
`head.*`, the server file `tail.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.model.config import ModelConfig, conv_shapes
from pipeline.model.sparse import SparseLinear, SparsityError, fan_in_for, make_junction
from pipeline.model.sparse_conv import SparseConv2d, channel_fan_in, make_conv
from pipeline.model.uplink import fake_quantize

__all__ = ["Head", "Tail", "SplitModel", "ConvLayer", "ConvSpec", "layer_specs", "describe"]

EXIT_SEED_OFFSET = 1000   # the exit's pattern seed: model seed + this


@dataclass(frozen=True)
class ConvSpec:
    name: str
    in_shape: tuple[int, int, int]   # (channels, height, width) it reads
    channels: int
    fan_out: int
    kernel: int
    stride: int
    pool: int


# (name, N_in, N_out, fan_out) of a fully connected junction
Spec = ConvSpec | tuple[str, int, int, int]


def layer_specs(cfg: ModelConfig) -> list[Spec]:
    """Every layer in order, the exit classifier placed right after the split; impossible
    degrees are one ConfigError naming the layer."""
    shapes, convs = conv_shapes(cfg), len(cfg.channels)
    specs: list[Spec] = [
        ConvSpec(f"layer{i + 1}", shapes[i], c, cfg.channel_fan_out[i],
                 cfg.kernel[i] if cfg.kernel else 3, cfg.stride[i] if cfg.stride else 1,
                 cfg.pool[i] if cfg.pool else 1)
        for i, c in enumerate(cfg.channels)]
    w, classes = cfg.widths, cfg.widths[-1]
    specs += [(f"layer{convs + i + 1}", w[i], w[i + 1], f) for i, f in enumerate(cfg.fan_out)]
    specs.insert(cfg.split, ("exit", _exit_inputs(cfg, shapes), classes,
                             cfg.exit_fan_out or classes))
    for spec in specs:
        try:
            if isinstance(spec, ConvSpec):
                channel_fan_in(spec.in_shape[0], spec.channels, spec.fan_out)
            else:
                name, n_in, n_out, fan_out = spec
                fan_in_for(n_in, n_out, fan_out, input_layer=name == "layer1")
        except SparsityError as e:
            name = spec.name if isinstance(spec, ConvSpec) else spec[0]
            raise ConfigError(f"model {cfg.name}, {name}: {e}") from None
    return specs


def _exit_inputs(cfg: ModelConfig, shapes: list[tuple[int, int, int]]) -> int:
    if cfg.exit_layer > len(cfg.channels):
        return cfg.widths[cfg.exit_layer - len(cfg.channels)]
    c, h, w = shapes[cfg.exit_layer]
    if cfg.exit_pool > min(h, w):
        raise ConfigError(f"model.exit_pool = {cfg.exit_pool} is larger than the {h} x {w} "
                          f"layer the exit reads; choose 1..{min(h, w)}, or 0 for no pool")
    return c * (cfg.exit_pool ** 2 if cfg.exit_pool else h * w)


class ConvLayer(nn.Module):
    """A conv with "same" padding, then a max pool where pool > 1 (the ReLU is the stack's:
    max pool and ReLU commute)."""

    def __init__(self, spec: ConvSpec, seed: int):
        super().__init__()
        self.spec = spec
        self.conv = make_conv(spec.in_shape[0], spec.channels, spec.fan_out, spec.kernel,
                              spec.stride, spec.kernel // 2, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.max_pool2d(x, self.spec.pool) if self.spec.pool > 1 else x

    @property
    def macs(self) -> int:
        """Multiply-adds per frame: stored kernels x k*k x output pixels (before the pool)."""
        (_, h, w), k, s = self.spec.in_shape, self.spec.kernel, self.spec.stride
        pixels = ((h + 2 * (k // 2) - k) // s + 1) * ((w + 2 * (k // 2) - k) // s + 1)
        return self.kernels * k * k * pixels

    @property
    def kernels(self) -> int:
        """k x k kernels stored (C_out x channel fan-in)."""
        conv = self.conv
        return conv.kernels if isinstance(conv, SparseConv2d) else \
            conv.out_channels * conv.in_channels


def _build(spec: Spec, seed: int) -> nn.Module:
    if isinstance(spec, ConvSpec):
        return ConvLayer(spec, seed)
    _, n_in, n_out, fan_out = spec
    return make_junction(n_in, n_out, fan_out, seed)


def _relu_stack(layers, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = F.relu(layer(x if isinstance(layer, ConvLayer) else x.flatten(1)))
    return x


class Head(nn.Module):
    """Runs on the edge: preprocessing, the layers before the split, the exit classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        specs = layer_specs(cfg)
        self.input_shape = tuple(cfg.input_shape)
        self.input_size, self.input_pad = cfg.input_size, cfg.input_pad
        self.convolutional = bool(cfg.channels)
        # Standardization statistics of the training pixels (per channel for convs); set by
        # training, saved with it.
        stats = (cfg.input_shape[0],) if self.convolutional else ()
        self.register_buffer("pixel_mean", torch.zeros(stats))
        self.register_buffer("pixel_std", torch.ones(stats))
        self.layers = nn.ModuleList(_build(s, cfg.seed + i) for i, s in enumerate(specs[:cfg.split]))
        self.exit_layer = cfg.exit_layer
        self.exit_pool = cfg.exit_pool if cfg.exit_layer <= len(cfg.channels) else 0
        _, n_in, n_out, fan_out = specs[cfg.split]
        self.exit = make_junction(n_in, n_out, fan_out, cfg.seed + EXIT_SEED_OFFSET)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (B, input_size) -> standardized: (B, C, H, W) for convs, else
        zero-padded (B, widths[0])."""
        if self.convolutional:
            x = pixels.reshape(-1, *self.input_shape)
            return (x - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        x = (pixels - self.pixel_mean) / self.pixel_std
        if self.input_pad:
            x = F.pad(x, (0, self.input_pad - self.input_size))
        return x

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exit logits (B, C), split features (B, W_split)). The exit reads layer
        `exit_layer`; the layers after it (a bottleneck) matter only to offloaded frames."""
        exit_logits, x = self.run_exit(pixels)
        return exit_logits, self.run_uplink(x)

    def run_exit(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exit logits, the activations of layer `exit_layer`): what the unfamiliarity
        score reads (pipeline.floor.unfamiliar), as the NumPy head's run_exit returns it."""
        x = _relu_stack(self.layers[:self.exit_layer], self.preprocess(pixels))
        seen = F.adaptive_avg_pool2d(x, self.exit_pool) if self.exit_pool else x
        return self.exit(seen.flatten(1)), x

    def run_uplink(self, x: torch.Tensor) -> torch.Tensor:
        """The split features (B, W_split) from run_exit's activations."""
        return _relu_stack(self.layers[self.exit_layer:], x).flatten(1)


class Tail(nn.Module):
    """Runs on the server: the layers after the split, ending in the final classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        specs = layer_specs(cfg)[cfg.split + 1:]
        self.layers = nn.ModuleList(_build(s, cfg.seed + cfg.split + i)
                                    for i, s in enumerate(specs))
        # Features arrive flat; a conv tail reads them as the split layer's C x H x W.
        convs = len(cfg.channels)
        self.feature_shape = conv_shapes(cfg)[cfg.split] if cfg.split < convs else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.run(features)[0]  # (B, C) logits

    def run(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the final classifier's input (B, d)): what the tail's unfamiliarity
        score reads."""
        x = features.reshape(-1, *self.feature_shape) if self.feature_shape else features
        x = _relu_stack(self.layers[:-1], x).flatten(1)
        return self.layers[-1](x), x


class SplitModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head = Head(cfg)
        self.tail = Tail(cfg)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (exit logits, final logits), both (B, C)."""
        exit_logits, _, final_logits = self.run(pixels)
        return exit_logits, final_logits

    def run(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(exit logits, split features, final logits). The tail sees the features as the
        wire delivers them when the model is trained for its uplink."""
        exit_logits, features = self.head(pixels)
        sent = fake_quantize(features, self.cfg.uplink_bits) if self.cfg.uplink_bits else features
        return exit_logits, features, self.tail(sent)


def describe(module: nn.Module) -> list[dict]:
    """Per-layer structure: density, stored parameters, multiply-adds per frame. A conv's
    n_in / n_out / fan_out are channels, its weights k x k x kernels."""
    rows = []
    for name, layer in module.named_modules():
        if isinstance(layer, ConvLayer):
            conv = layer.conv
            n_in, n_out = conv.in_channels, conv.out_channels
            weights = layer.kernels * layer.spec.kernel ** 2
            rows.append({"junction": name, "kind": "conv", "n_in": n_in, "n_out": n_out,
                         "fan_out": layer.spec.fan_out,
                         "density": layer.kernels / (n_in * n_out), "weights": weights,
                         "params": weights + n_out, "macs": layer.macs})
            continue
        if isinstance(layer, SparseLinear):
            n_in, n_out, edges = layer.in_features, layer.out_features, layer.edges
            fan_out = layer.fan_out
        elif isinstance(layer, nn.Linear):
            n_in, n_out = layer.in_features, layer.out_features
            edges, fan_out = n_in * n_out, n_out
        else:
            continue
        rows.append({"junction": name, "kind": "linear", "n_in": n_in, "n_out": n_out,
                     "fan_out": fan_out, "density": edges / (n_in * n_out), "weights": edges,
                     "params": edges + n_out, "macs": edges})
    return rows
