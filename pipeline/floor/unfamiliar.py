"""How unlike the training set a frame is, from what the exit already computed: the squared
Mahalanobis distance of the features the exit reads to the nearest class mean, one shared
covariance fitted on the training frames (Lee et al., NeurIPS 2018). Training fits it
(pipeline.model.train), the edge artifact carries it (pipeline.floor.edge_artifact), the
NumPy edge, the C export and the tail worker compute it with this one definition.

Why this score: on Fashion-MNIST with frames of another kind (noise, inverted, rotated) it
separates them at AUROC 0.88-1.00 where the exit's max softmax gives 0.02-0.68; the exit is
*more* confident on inverted frames than on real ones (docs/unfamiliar.md, measured by
benchmarks/unfamiliar.py).

    features  an MLP exit's input as is; a conv exit's map averaged per channel (Lee et al.
              pool each map so): d values a frame
    whiten    (d,) the inverse standard deviations (the diagonal form), or (d, d) R, lower
              triangular, with R R^T the inverse covariance (the full form): z = f R
    means     (C, d) the class means, whitened the same way
    score     min over classes c of sum_j (z_j - means_cj)^2

The full form costs d^2 / 2 + C d multiply-adds and d^2 floats; the diagonal C d and d:
`auto` takes the full form up to FULL_MAX_FEATURES features (a conv's 64 channel means), the
diagonal above (the default MLP's 400: 0.02 AUROC less on noise, 14 KB instead of 320 KB, what
fits a microcontroller). NumPy computes it as |z|^2 - 2 z.m + |m|^2, one matrix product for
all classes (3x faster than the (z - m)^2 terms at batch 64), in float64: in float32 that
expansion cancels away the digits of distances near 900; in float64 it agrees with the C
export's direct sum of (z - m)^2 in double to about 1e-12.

A frame is unfamiliar when its score is above the threshold: the quantile of familiar
validation frames' scores that flags `flag_rate` of them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["FORMS", "FULL_MAX_FEATURES", "UNKNOWN", "Unfamiliarity", "exit_features", "fit",
           "flag_threshold"]

# The answer for a frame unlike anything the model was trained on, where a class index would
# be (an Outcome's cls; on the wire it is wire.UNKNOWN_CLASS, a byte)
UNKNOWN = -1

FORMS = ("auto", "full", "diagonal")
FULL_MAX_FEATURES = 256
# Dead features (ReLU, the rate penalty) make the covariance singular: a ridge of this share
# of the mean variance keeps it invertible and those features' weight bounded.
RIDGE = 1e-3


def exit_features(hidden: np.ndarray) -> np.ndarray:
    """(B, d) float64: the exit's input flattened, or a conv map's per-channel means."""
    hidden = np.asarray(hidden)
    if hidden.ndim == 4:
        return hidden.mean(axis=(2, 3), dtype=np.float64)
    return hidden.reshape(len(hidden), -1).astype(np.float64)


@dataclass(frozen=True)
class Unfamiliarity:
    whiten: np.ndarray          # (d,) or (d, d) float32, as stored
    means: np.ndarray           # (C, d) float32, whitened
    threshold: float | None     # flag a score above it; None: score, never flag
    flag_rate: float            # the share of familiar validation frames it flags

    @property
    def diagonal(self) -> bool:
        return self.whiten.ndim == 1

    @property
    def features(self) -> int:
        return self.means.shape[1]

    def score(self, features: np.ndarray) -> np.ndarray:
        """(B,) float64 squared distances to the nearest class mean; features (B, d)."""
        whiten, means_t, norms = self._tables
        f = np.asarray(features, np.float64)
        z = f * whiten if self.diagonal else f @ whiten
        distances = np.einsum("bd,bd->b", z, z)[:, None] - 2 * (z @ means_t) + norms
        return np.maximum(distances.min(axis=1), 0.0)

    @functools.cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored tables in float64: whiten, means transposed (d, C), |mean|^2 (C,)."""
        means = self.means.astype(np.float64)
        return (self.whiten.astype(np.float64), np.ascontiguousarray(means.T),
                np.einsum("cd,cd->c", means, means))

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(B,) bool: unfamiliar."""
        if self.threshold is None:
            return np.zeros(len(scores), bool)
        return np.asarray(scores) > self.threshold

    def flagged(self, features: np.ndarray) -> np.ndarray:
        """(B,) bool: unfamiliar, from features (B, d)."""
        return self.flags(self.score(features))

    def with_threshold(self, val_scores: np.ndarray, flag_rate: float) -> Unfamiliarity:
        return Unfamiliarity(self.whiten, self.means, flag_threshold(val_scores, flag_rate),
                             flag_rate)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.whiten": self.whiten, f"{prefix}.means": self.means}


def fit(features: np.ndarray, labels: np.ndarray, classes: int,
        form: str = "auto") -> Unfamiliarity:
    """Class means and one shared covariance of `features` (B, d) with `labels` in
    [0, classes); a class without frames gets the mean of all (it is never nearer than its
    data would put it). No threshold yet: `with_threshold` on validation scores."""
    if form not in FORMS:
        raise ValueError(f"unfamiliar form {form!r}: choose one of {', '.join(FORMS)}")
    x = np.asarray(features, np.float64)
    d = x.shape[1]
    overall = x.mean(axis=0)
    means = np.stack([x[labels == c].mean(axis=0) if (labels == c).any() else overall
                      for c in range(classes)])
    centred = x - means[labels]
    if form == "diagonal" or form == "auto" and d > FULL_MAX_FEATURES:
        var = (centred ** 2).mean(axis=0)
        var += RIDGE * var.mean() + 1e-12
        whiten = 1 / np.sqrt(var)
        white = means * whiten
    else:
        cov = centred.T @ centred / len(x)
        cov += (RIDGE * np.trace(cov) / d + 1e-12) * np.eye(d)
        whiten = np.linalg.cholesky(np.linalg.inv(cov))     # lower: R R^T = inverse
        white = means @ whiten
    return Unfamiliarity(whiten.astype(np.float32), white.astype(np.float32), None, 0.0)


def flag_threshold(val_scores: np.ndarray, flag_rate: float) -> float | None:
    """The score above which `flag_rate` of these familiar frames lie; None for 0 (off)."""
    if not 0 <= flag_rate < 1:
        raise ValueError(f"flag rate {flag_rate} must be in [0, 1)")
    if flag_rate == 0:
        return None
    return float(np.quantile(np.asarray(val_scores, np.float64), 1 - flag_rate))
