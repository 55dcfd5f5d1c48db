"""Choose the exit's confidence threshold on validation data.

A frame is answered on the edge when its exit score >= threshold, else offloaded. Sorting
frames by score, offloading the k least confident gives accuracy
    acc(k) = (final-correct among the k offloaded + exit-correct among the rest) / N,
so one pass of cumulative sums sweeps every threshold. Scores all lie in [0, 1]; a threshold
above 1 offloads everything.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.floor.scores import exit_scores as edge_scores
from pipeline.model.config import CalibrationConfig

__all__ = ["exit_scores", "Sweep", "sweep", "choose_threshold", "split_accuracy",
           "write_csv", "write_plot", "expected_calibration_error", "fit_temperature",
           "calibration_quality", "reliability", "write_reliability_plot", "ece_floor", "ECE_BINS"]

OFFLOAD_ALL = 1.5  # above every score
ECE_BINS = 15       # the customary equal-width bins of expected calibration error


def exit_scores(exit_logits: torch.Tensor | np.ndarray, score: str,
                temperature: float = 1.0) -> np.ndarray:
    """Confidence of the exit classifier in [0, 1], higher = more sure: the edge's own
    definition (pipeline.floor.scores), so the threshold chosen here is the one it applies."""
    if isinstance(exit_logits, torch.Tensor):
        exit_logits = exit_logits.numpy()
    return edge_scores(exit_logits, score, temperature)


@dataclass
class Sweep:
    thresholds: np.ndarray  # ascending, last = OFFLOAD_ALL
    offload: np.ndarray     # fraction offloaded at each threshold
    accuracy: np.ndarray    # split+exit accuracy at each threshold
    exit_accuracy: float
    full_accuracy: float


def sweep(scores: np.ndarray, exit_correct: np.ndarray, final_correct: np.ndarray) -> Sweep:
    n = len(scores)
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    final_cum = np.concatenate([[0], np.cumsum(final_correct[order])])
    exit_cum = np.concatenate([[0], np.cumsum(exit_correct[order])])
    thresholds = np.concatenate([np.unique(s), [OFFLOAD_ALL]])
    k = np.searchsorted(s, thresholds, side="left")  # frames with score < threshold
    accuracy = (final_cum[k] + exit_cum[-1] - exit_cum[k]) / n
    return Sweep(thresholds, k / n, accuracy, float(exit_correct.mean()),
                 float(final_correct.mean()))


def choose_threshold(result: Sweep, cfg: CalibrationConfig) -> float:
    """Apply the policy: hit a target offload ratio, or offload least within an accuracy drop."""
    if cfg.policy == "offload":
        i = int(np.argmin(np.abs(result.offload - cfg.target_offload)))
    else:
        floor = result.full_accuracy - cfg.max_drop / 100.0
        i = int(np.flatnonzero(result.accuracy >= floor - 1e-12)[0])  # the last always passes
    return float(result.thresholds[i])


def split_accuracy(scores, exit_correct, final_correct, threshold: float) -> tuple[float, float]:
    """(accuracy, offload ratio) of split+exit at one threshold."""
    offload = scores < threshold
    correct = np.where(offload, final_correct, exit_correct)
    return float(correct.mean()), float(offload.mean())


def write_csv(path: Path, result: Sweep, max_rows: int = 501) -> None:
    """The sweep, thinned to at most max_rows evenly spaced points (always keeping the ends)."""
    idx = np.unique(np.linspace(0, len(result.thresholds) - 1, max_rows).round().astype(int))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["threshold", "offload_ratio", "accuracy"])
        for i in idx:
            w.writerow([f"{result.thresholds[i]:.6f}", f"{result.offload[i]:.6f}",
                        f"{result.accuracy[i]:.6f}"])


def write_plot(path: Path, result: Sweep, chosen: float, title: str) -> bool:
    """Accuracy vs offload ratio as PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(result.offload, result.accuracy * 100, label="split + exit")
    ax.axhline(result.full_accuracy * 100, ls="--", c="gray", label="full model")
    ax.axhline(result.exit_accuracy * 100, ls=":", c="gray", label="exit only")
    i = int(np.searchsorted(result.thresholds, chosen))
    ax.plot([result.offload[i]], [result.accuracy[i] * 100], "o", c="red",
            label=f"chosen threshold {chosen:.3f}")
    ax.set_xlabel("offload ratio (validation)")
    ax.set_ylabel("accuracy % (validation)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray,
                               temperature: float = 1.0, bins: int = ECE_BINS) -> float:
    """How far max-softmax confidence is from accuracy, averaged over equal-width confidence
    bins weighted by their frames: 0 when a 0.9-confident answer is right 90 % of the time.
    A threshold on confidence only means what it says when this is small."""
    return _ece(*reliability(logits, labels, temperature, bins))


def _ece(conf: np.ndarray, accuracy: np.ndarray, frames: np.ndarray) -> float:
    filled = frames > 0
    return float((frames[filled] * np.abs(accuracy[filled] - conf[filled])).sum()
                 / frames.sum())


def ece_floor(logits: np.ndarray, temperature: float = 1.0, draws: int = 20,
              bins: int = ECE_BINS, seed: int = 0) -> float:
    """The ECE a perfectly calibrated classifier with these confidences would still show on
    this many frames (each right with probability its confidence; mean of `draws`): the
    estimator's own sampling noise. An ECE near it cannot be improved, only re-drawn."""
    confidence = _softmax(logits, temperature).max(axis=1)
    rng = np.random.default_rng(seed)
    return float(np.mean([_ece(*_binned(confidence, rng.random(len(confidence)) < confidence,
                                        bins)) for _ in range(draws)]))


def reliability(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
                bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (mean confidence, accuracy, frames); NaN where empty.
    Plotted, a calibrated classifier lies on the diagonal."""
    p = _softmax(logits, temperature)
    return _binned(p.max(axis=1), p.argmax(axis=1) == labels, bins)


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def _binned(confidence: np.ndarray, correct: np.ndarray, bins: int):
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    frames = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, confidence, bins) / frames
        accuracy = np.bincount(which, correct, bins) / frames
    return mean_conf, accuracy, frames


def write_reliability_plot(path: Path, logits: dict[str, tuple[np.ndarray, float]],
                           labels: np.ndarray, title: str) -> bool:
    """Reliability diagrams, one panel per classifier (name -> (logits, temperature)), before
    and after its temperature, ECE in the legend; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(logits), figsize=(4.5 * len(logits), 4.2), dpi=120,
                             squeeze=False)
    for ax, (name, (z, t)) in zip(axes[0], logits.items()):
        ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1)
        for temperature, style in ((1.0, "o-"), (t, "s-")):
            conf, acc, frames = reliability(z, labels, temperature)
            ece = _ece(conf, acc, frames)
            kept = ~np.isnan(conf)
            ax.plot(conf[kept], acc[kept], style, ms=3,
                    label=f"T = {temperature:.2f}: ECE {ece:.4f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _nll(logits: np.ndarray, labels: np.ndarray, inverse_t: float) -> float:
    z = logits * inverse_t
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimizes the negative log-likelihood of softmax(logits / T)
    (Guo et al., 2017). The NLL is convex in 1/T, so a golden-section search over log(1/T)
    finds the optimum deterministically, without an optimizer's learning rate."""
    z = np.asarray(logits, np.float64)
    lo, hi = math.log(1 / 20), math.log(20)   # T between 0.05 and 20
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(z, labels, math.exp(a)), _nll(z, labels, math.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(z, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(z, labels, math.exp(b))
    return float(1 / math.exp((lo + hi) / 2))


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """The mean negative log-likelihood of softmax(logits): the cross-entropy."""
    return _nll(np.asarray(logits, np.float64), labels, 1.0)


def calibrated_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """The negative log-likelihood after the best temperature: what the logits are worth
    once calibrated, as they are shipped; overconfidence alone does not count against it."""
    z = np.asarray(logits, np.float64)
    return _nll(z, labels, 1 / fit_temperature(z, labels))


def calibration_quality(val_logits: np.ndarray, val_labels: np.ndarray,
                        test_logits: np.ndarray, test_labels: np.ndarray) -> dict:
    """A temperature fitted on validation, the test set's ECE before and after it, and the
    ECE a perfectly calibrated classifier would show there (its noise floor)."""
    t = fit_temperature(val_logits, val_labels)
    return {"temperature": t, "ece_bins": ECE_BINS,
            "test_ece_before": expected_calibration_error(test_logits, test_labels),
            "test_ece_after": expected_calibration_error(test_logits, test_labels, t),
            "test_ece_floor": ece_floor(test_logits, t)}
