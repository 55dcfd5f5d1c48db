"""The split model: a head (edge) and a tail (server) cut from one layer layout.

    pixels (B, 784) -> standardize, pad (B, 800) -> head junctions -> features (B, W_split)
        edge:   layer `exit_layer` (the split layer unless a bottleneck follows it)
                -> exit classifier -> exit logits (B, C)
        server: features (as the wire delivers them) -> tail junctions -> final logits (B, C)

Submodule names are the contract between the training checkpoint and the two artifacts: the
edge file holds `head.*`, the server file `tail.*`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model.sparse import SparseLinear, SparsityError, fan_in_for, make_junction
from pipeline.model.uplink import fake_quantize

__all__ = ["Head", "Tail", "SplitModel", "junction_specs"]


def junction_specs(cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(name, N_in, N_out, fan_out) of every junction, the exit classifier included."""
    w, classes = cfg.widths, cfg.widths[-1]
    specs = [(f"layer{i + 1}", w[i], w[i + 1], f) for i, f in enumerate(cfg.fan_out)]
    exit_spec = ("exit", w[cfg.exit_layer], classes, cfg.exit_fan_out or classes)
    for name, n_in, n_out, fan_out in specs + [exit_spec]:
        try:
            fan_in_for(n_in, n_out, fan_out, input_layer=name == "layer1")
        except SparsityError as e:
            raise ConfigError(f"model {cfg.name}, {name}: {e}") from None
    return specs[:cfg.split] + [exit_spec] + specs[cfg.split:]


def _stack(specs, seed: int) -> nn.ModuleList:
    return nn.ModuleList(make_junction(n_in, n_out, f, seed + i)
                         for i, (_, n_in, n_out, f) in enumerate(specs))


def _relu_stack(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = F.relu(layer(x))
    return x


class Head(nn.Module):
    """Runs on the edge: preprocessing, the junctions before the split, the exit classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        specs = junction_specs(cfg)
        self.input_size, self.input_pad = cfg.input_size, cfg.input_pad
        # Standardization statistics of the training pixels; set by training, saved with it.
        self.register_buffer("pixel_mean", torch.tensor(0.0))
        self.register_buffer("pixel_std", torch.tensor(1.0))
        self.layers = _stack(specs[:cfg.split], cfg.seed)
        self.exit_layer = cfg.exit_layer
        exit_spec = specs[cfg.split]
        self.exit = make_junction(exit_spec[1], exit_spec[2], exit_spec[3], cfg.seed + 1000)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (B, input_size) -> standardized, zero-padded (B, widths[0])."""
        x = (pixels - self.pixel_mean) / self.pixel_std
        if self.input_pad:
            x = F.pad(x, (0, self.input_pad - self.input_size))
        return x

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exit logits (B, C), split features (B, W_split)). The exit reads layer
        `exit_layer`; the layers after it (a bottleneck) matter only to offloaded frames."""
        x = _relu_stack(self.layers[:self.exit_layer], self.preprocess(pixels))
        exit_logits = self.exit(x)
        return exit_logits, _relu_stack(self.layers[self.exit_layer:], x)


class Tail(nn.Module):
    """Runs on the server: the junctions after the split, ending in the final classifier."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        specs = junction_specs(cfg)[cfg.split + 1:]
        self.layers = _stack(specs, cfg.seed + cfg.split)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = _relu_stack(self.layers[:-1], features)
        return self.layers[-1](x)  # (B, C) logits


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
    """Per-junction structure: density, stored parameters, multiply-adds per frame."""
    rows = []
    for name, layer in module.named_modules():
        if isinstance(layer, SparseLinear):
            n_in, n_out, edges = layer.in_features, layer.out_features, layer.edges
            fan_out = layer.fan_out
        elif isinstance(layer, nn.Linear):
            n_in, n_out = layer.in_features, layer.out_features
            edges, fan_out = n_in * n_out, n_out
        else:
            continue
        rows.append({"junction": name, "n_in": n_in, "n_out": n_out, "fan_out": fan_out,
                     "density": edges / (n_in * n_out), "weights": edges,
                     "params": edges + n_out, "macs": edges})
    return rows
