"""Fitting both unfamiliarity scores of a trained model, and measuring them off-line.

The edge's score reads the features its exit reads; the tail's reads the input of the final
classifier (deeper features, and only the offloaded frames pay for them). Both are fitted on
the training frames (class means and one shared covariance, pipeline.floor.unfamiliar), and
each threshold flags its share of the familiar validation frames.

What `splitexit train` and `calibrate` report of them (metrics.json, calibration.unfamiliar):
the test frames each flags, the split+exit accuracy with flagged frames offloaded and the
tail's `unknown` answers counted as wrong, and the AUROC of the edge's score against test
frames moved off the training distribution (noise, inverted, rotated): the same shifts
benchmarks/unfamiliar.py measures on held-out classes too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.floor.splits import Split
from pipeline.floor.unfamiliar import UNKNOWN, Unfamiliarity, exit_features, fit
from pipeline.model.config import CalibrationConfig
from pipeline.model.split_model import SplitModel
from pipeline.model.uplink import fake_quantize

__all__ = ["Activations", "activations", "tail_answers", "fit_scores", "auroc", "shifted",
           "report", "NOISE_SIGMA"]

EVAL_BATCH = 4096
NOISE_SIGMA = 0.25      # Gaussian pixel noise, pixels in [0, 1]


@dataclass
class Activations:
    exit_logits: np.ndarray      # (N, C)
    exit_features: np.ndarray    # (N, d_edge): what the edge's score reads
    final_logits: np.ndarray     # (N, C)
    tail_features: np.ndarray    # (N, d_tail): what the tail's score reads


@torch.inference_mode()
def activations(model: SplitModel, pixels: np.ndarray) -> Activations:
    """Both halves on pixels in [0, 1] (N, input_size), the tail on the features as the
    wire delivers them."""
    parts = []
    for i in range(0, len(pixels), EVAL_BATCH):
        x = torch.from_numpy(np.ascontiguousarray(pixels[i:i + EVAL_BATCH], np.float32))
        exit_logits, hidden = model.head.run_exit(x)
        features = model.head.run_uplink(hidden)
        if model.cfg.uplink_bits:
            features = fake_quantize(features, model.cfg.uplink_bits)
        final_logits, penultimate = model.tail.run(features)
        parts.append((exit_logits.numpy(), exit_features(hidden.numpy()),
                      final_logits.numpy(), penultimate.numpy().astype(np.float64)))
    return Activations(*(np.concatenate(p) for p in zip(*parts)))


def tail_answers(acts: Activations, tail: Unfamiliarity | None) -> np.ndarray:
    """What the tail answers each frame were it offloaded, as a worker does: its class, or
    UNKNOWN where its own score flags the frame."""
    classes = acts.final_logits.argmax(1)
    return classes if tail is None else np.where(tail.flagged(acts.tail_features), UNKNOWN,
                                                 classes)


def pixels_of(split: Split) -> np.ndarray:
    return split.images.astype(np.float32) / 255


def fit_scores(model: SplitModel, train: Split, val: Activations, c: CalibrationConfig
               ) -> tuple[Unfamiliarity, Unfamiliarity]:
    """(edge, tail) scores fitted on the training frames, thresholds on validation."""
    seen = activations(model, pixels_of(train))
    classes = seen.exit_logits.shape[1]
    edge = fit(seen.exit_features, train.labels, classes, c.unfamiliar_form)
    tail = fit(seen.tail_features, train.labels, classes, c.unfamiliar_form)
    return (edge.with_threshold(edge.score(val.exit_features), c.unfamiliar_flag_rate),
            tail.with_threshold(tail.score(val.tail_features), c.tail_unfamiliar_flag_rate))


def auroc(unfamiliar: np.ndarray, familiar: np.ndarray) -> float:
    """P(score of an unfamiliar frame > a familiar one's), ties half (Mann-Whitney U)."""
    both = np.concatenate([unfamiliar, familiar])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]   # ties: their mean
    n1, n0 = len(unfamiliar), len(familiar)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def shifted(pixels: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Frames (floats in [0, 1]) moved off the training distribution, seeded."""
    rng = np.random.default_rng(0)
    images = pixels.reshape(-1, *shape)
    return {"noise": np.clip(pixels + rng.normal(0, NOISE_SIGMA, pixels.shape), 0, 1)
            .astype(np.float32),
            "inverted": (1 - pixels).astype(np.float32),
            "rot90": np.ascontiguousarray(np.rot90(images, 1, axes=(-2, -1)))
            .reshape(len(pixels), -1)}


def outcome(acts: Activations, labels: np.ndarray | None, confident: np.ndarray,
            edge: Unfamiliarity, tail: Unfamiliarity) -> dict:
    """What the runtime does with these frames: the exit answers the confident frames its
    score does not flag, the tail the rest, `unknown` where the tail's score flags them."""
    flagged = edge.flagged(acts.exit_features)
    local = confident & ~flagged
    answer = np.where(local, acts.exit_logits.argmax(1), tail_answers(acts, tail))
    out = {"frames": len(local), "edge_flagged": float(flagged.mean()),
           "offload_ratio": float((~local).mean()), "exit_answered": float(local.mean()),
           "unknown": float((answer == UNKNOWN).mean())}
    if labels is not None:
        out["split_exit"] = float((answer == labels).mean())
    return out


def report(model: SplitModel, test: Split, threshold: float, exit_scores,
           edge: Unfamiliarity, tail: Unfamiliarity) -> dict:
    """The test split as the runtime would answer it, and each shift of it; `exit_scores`
    maps exit logits to the calibrated confidence that `threshold` applies to."""
    pixels = pixels_of(test)
    acts = activations(model, pixels)
    clean = edge.score(acts.exit_features)
    out = {"edge": {"form": "diagonal" if edge.diagonal else "full",
                    "features": edge.features, "flag_rate": edge.flag_rate,
                    "threshold": edge.threshold},
           "tail": {"form": "diagonal" if tail.diagonal else "full",
                    "features": tail.features, "flag_rate": tail.flag_rate,
                    "threshold": tail.threshold},
           "test": outcome(acts, test.labels, exit_scores(acts.exit_logits) >= threshold,
                           edge, tail)}
    for name, frames in shifted(pixels, tuple(model.cfg.input_shape)).items():
        moved = activations(model, frames)
        confident = exit_scores(moved.exit_logits) >= threshold
        out[name] = outcome(moved, None, confident, edge, tail)
        out[name]["auroc"] = auroc(edge.score(moved.exit_features), clean)
        out[name]["exit_answered_before"] = float(confident.mean())
    return out
