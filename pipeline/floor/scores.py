"""The exit's confidence score: training chooses the threshold on it (pipeline.model.
calibrate) and every edge applies it (pipeline.edge), so both import this one definition."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SCORES", "exit_scores"]

SCORES = ("max_softmax", "margin", "entropy")


def exit_scores(logits: np.ndarray, score: str, temperature: float = 1.0) -> np.ndarray:
    """Confidence of the exit classifier in [0, 1], higher = more sure, on softmax(logits /
    temperature): the one definition that training (choosing the threshold) and every edge
    (applying it) share, in float64."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if score == "max_softmax":
        return p.max(axis=1)
    if score == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    if score == "entropy":
        entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
        return 1.0 - entropy / math.log(p.shape[1])
    raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
