"""How deep must the features be for the shipped score to tell held-out classes apart
(`python -m benchmarks.unfamiliar --depth`)? The same score (pipeline.floor.unfamiliar.fit,
its `auto` form) fitted on the output of every layer of the model in turn, up to
the final classifier's input, each judged by its AUROC on the held-out classes and the shifts,
beside the multiply-adds a frame must pay to reach that layer: what an edge that computed the
score deeper would cost.

The fit reads a seeded sample of FIT_FRAMES training frames (the artifact's reads all): the
covariance of at most 1 024 features is well estimated from it, and a conv model's every layer
on all 55 000 frames would take minutes of a shared core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.floor.data import load_test_split
from pipeline.floor.scores import exit_scores
from pipeline.floor.unfamiliar import Unfamiliarity, exit_features, fit
from pipeline.model.artifacts import load_model
from pipeline.model.config import Config
from pipeline.model.split_model import ConvLayer, SplitModel
from pipeline.model.unfamiliar_fit import auroc, shifted
from pipeline.model.uplink import fake_quantize

FIT_FRAMES = 20000
BATCH = 2048


def macs(layer: nn.Module) -> int:
    """Multiply-adds a frame of one layer, as pipeline.model.split_model.describe counts."""
    if isinstance(layer, ConvLayer):
        return layer.macs
    if hasattr(layer, "edges"):           # SparseLinear
        return int(layer.edges)
    return layer.in_features * layer.out_features


def layer_names(model: SplitModel) -> list[tuple[str, int]]:
    """(name, multiply-adds a frame to reach its output) of every layer before the final
    classifier; the exit's layer and the split marked."""
    head, tail = model.head.layers, model.tail.layers[:-1]
    rows, total = [], 0
    for i, layer in enumerate([*head, *tail]):
        total += macs(layer)
        name = f"head.{i}" if i < len(head) else f"tail.{i - len(head)}"
        if i + 1 == model.head.exit_layer:
            name += " (the exit reads it: shipped edge score)"
        if i + 1 == len(head):
            name += " (split)"
        if i == len(head) + len(tail) - 1:
            name += " (tail score)"
        rows.append((name, total))
    return rows


@torch.inference_mode()
def every_layer(model: SplitModel, pixels: np.ndarray) -> list[np.ndarray]:
    """Each layer's output (a conv map averaged per channel), the tail's on the features as
    the wire delivers them; then the exit's logits and the final ones."""
    bits, outs, head = model.cfg.uplink_bits, [], model.head
    for i in range(0, len(pixels), BATCH):
        x = head.preprocess(torch.from_numpy(np.ascontiguousarray(pixels[i:i + BATCH])))
        seen = []
        for j, layer in enumerate(head.layers):
            x = F.relu(layer(x if isinstance(layer, ConvLayer) else x.flatten(1)))
            seen.append(exit_features(x.numpy()))
            if j + 1 == head.exit_layer:
                read = F.adaptive_avg_pool2d(x, head.exit_pool) if head.exit_pool else x
                exit_logits = head.exit(read.flatten(1)).numpy()
        x = x.flatten(1)
        if bits:
            x = fake_quantize(x, bits)
        x = x.reshape(-1, *model.tail.feature_shape) if model.tail.feature_shape else x
        for layer in model.tail.layers[:-1]:
            x = F.relu(layer(x if isinstance(layer, ConvLayer) else x.flatten(1)))
            seen.append(exit_features(x.numpy()))
        outs.append([*seen, exit_logits, model.tail.layers[-1](x.flatten(1)).numpy()])
    return [np.concatenate(layer) for layer in zip(*outs)]


def batched(score: Unfamiliarity, features: np.ndarray) -> np.ndarray:
    """The score in slices: it holds a (frames, classes, features) float64 array."""
    return np.concatenate([score.score(features[i:i + BATCH])
                           for i in range(0, len(features), BATCH)])


def measure(out: Path, cfg: Config, data_dir: str, held_out: list[int],
            frames: int | None) -> None:
    from pipeline.model.train import dataset
    model, edge, server = load_model(out)
    data = dataset(cfg)
    take = np.random.default_rng(0).permutation(len(data.train))[:FIT_FRAMES]
    train = every_layer(model, data.train.images[take].astype(np.float32) / 255)
    labels = data.train.labels[take]
    test = load_test_split(data_dir, cfg.model.input_shape, cfg.model.resize)
    pixels = test.images[:frames].astype(np.float32) / 255
    unknown = np.isin(test.labels[:frames], held_out)
    known = every_layer(model, pixels[~unknown])
    sets = {"held-out classes": every_layer(model, pixels[unknown])}
    sets |= {name: every_layer(model, p) for name, p in
             shifted(pixels[~unknown], tuple(cfg.model.input_shape)).items()}
    classes = cfg.model.widths[-1]
    edge_macs = sum(macs(layer) for layer in model.head.layers[:model.head.exit_layer]) + \
        macs(model.head.exit)
    print(f"\nthe score on every layer (fitted on {len(take)} training frames, auto form); "
          f"the edge runs {edge_macs:,} multiply-adds a frame to its exit\n\n"
          f"| layer | features | form | MACs to reach it | x the edge's | "
          f"{' | '.join(sets)} |\n|---|---|---|---|---|{'---|' * len(sets)}")
    for i, (name, cost) in enumerate(layer_names(model)):
        score = fit(train[i], labels, classes)
        clean = batched(score, known[i])
        cells = " | ".join(f"{auroc(batched(score, s[i]), clean):.3f}" for s in sets.values())
        print(f"| {name} | {score.features} | {'diagonal' if score.diagonal else 'full'} | "
              f"{cost:,} | {cost / edge_macs:.1f} | {cells} |", flush=True)
    total = layer_names(model)[-1][1] + macs(model.tail.layers[-1])
    for name, k, t, cost in (("exit's max softmax (its confidence)", -2, edge.temperature,
                              edge_macs), ("final max softmax", -1, server.temperature, total)):
        clean = -exit_scores(known[k], "max_softmax", t)
        cells = " | ".join(f"{auroc(-exit_scores(s[k], 'max_softmax', t), clean):.3f}"
                           for s in sets.values())
        print(f"| {name} | logits | | {cost:,} | {cost / edge_macs:.1f} | {cells} |")
