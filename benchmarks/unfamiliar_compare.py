"""The method study behind the shipped unfamiliarity score (`python -m benchmarks.unfamiliar
--compare`): candidate scores on the exit's logits and features, each judged on how well it
separates the held-out classes' test frames (and shifted known frames) from the known
classes', with the torch-free edge head. Candidates (higher = more unfamiliar):

  msp      -max softmax probability of the calibrated exit: the exit's own confidence
           (Hendrycks & Gimpel, ICLR 2017, the baseline)
  energy   -T logsumexp(logits / T), T = 1 (Liu et al., NeurIPS 2020)
  maha     min over classes of the Mahalanobis distance, class means and one shared
           covariance of the exit's input fitted on the known training frames (Lee et al.,
           NeurIPS 2018): pipeline.floor.unfamiliar's full form, what conv-sparse ships
  maha-diag  its diagonal form (d x C MACs, no d x d matrix): what the default ships
  rel-maha minus the distance to one Gaussian of all classes (Ren et al., arXiv:2106.09022)
  maha-logits  maha on the exit's logits
  vim      alpha * |features outside their principal subspace| + energy (Wang et al., CVPR
           2022): a virtual logit for "none of these"
  knn      -(cosine similarity to the k-th nearest of a fixed sample of normalized training
           features) (Sun et al., ICML 2022)

Each threshold flags FLAG_RATE of the known classes' validation frames; a frame is answered
by the exit when it is confident by the artifact's threshold and not flagged; a flagged frame
goes to the tail, which answers it with a class (no `unknown` here: the study is of the edge).
The Mahalanobis candidates are pipeline.floor.unfamiliar.fit, refitted here in each form.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.edge.numpy_head import NumpyHead, exit_scores, load_numpy_head
from pipeline.floor.data import load_test_split
from pipeline.floor.splits import Split
from pipeline.floor.unfamiliar import exit_features, fit
from pipeline.model.artifacts import load_model
from pipeline.model.config import Config
from pipeline.model.unfamiliar_fit import auroc, shifted

FLAG_RATE = 0.05        # familiar validation frames each score's threshold flags
VIM_SHARE = 4           # ViM's principal subspace: a quarter of the features (512 of 2048)
KNN_SAMPLE, KNN_K = 5000, 10   # Sun et al.: k scales with the sample (k=1 at 1 % of CIFAR)
TIMING_BATCH = 64
ANSWERED_GOAL = 0.10    # of held-out frames the exit may still answer (#29)

Score = Callable[[np.ndarray, np.ndarray], np.ndarray]


def exit_view(head: NumpyHead, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exit logits, the features the distance scores read: the shipped score's)."""
    logits, hidden = head.run_exit(pixels)
    return logits, exit_features(hidden)


def in_batches(head: NumpyHead, pixels: np.ndarray, batch: int = 4096):
    parts = [exit_view(head, pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def fit_scores(head: NumpyHead, train: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
               val: tuple[np.ndarray, np.ndarray]) -> dict[str, Score]:
    """Each candidate as f(exit logits, features) -> unfamiliarity, fitted on the known
    classes' training frames where it needs statistics (the union on validation)."""
    train_logits, features = train
    classes = train_logits.shape[1]
    maha = fit(features, labels, classes, "full")
    maha_diag = fit(features, labels, classes, "diagonal")
    background = fit(features, np.zeros_like(labels), 1, "full")
    maha_logits = fit(train_logits, labels, classes, "full")
    sample = np.random.default_rng(0).permutation(len(features))[:KNN_SAMPLE]
    bank = features[sample] / np.maximum(np.linalg.norm(features[sample], axis=1,
                                                         keepdims=True), 1e-12)
    bank = np.ascontiguousarray(bank.T.astype(np.float32))
    k = min(KNN_K, bank.shape[1])

    def msp(logits, _):
        return -exit_scores(logits, "max_softmax", head.temperature)

    def energy(logits, _):
        z = logits.astype(np.float64)
        top = z.max(1)
        return -(top + np.log(np.exp(z - top[:, None]).sum(1)))

    # ViM (Wang et al., CVPR 2022): the features' norm outside their principal subspace,
    # scaled to the logits' size, as a virtual logit against the energy
    mean = features.mean(0)
    _, vectors = np.linalg.eigh(np.cov(features - mean, rowvar=False))
    keep = vectors[:, -max(1, features.shape[1] // VIM_SHARE):].astype(np.float32)
    mean32 = mean.astype(np.float32)

    def residual(x):
        c = (x - mean32).astype(np.float32)
        return np.sqrt(np.maximum((c ** 2).sum(1) - ((c @ keep) ** 2).sum(1), 0))
    alpha = float(train_logits.max(1).mean() / residual(features).mean())

    def vim(logits, x):
        return alpha * residual(x) + energy(logits, x)

    def knn(_, x):
        x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return -np.partition(x @ bank, -k, axis=1)[:, -k]

    scores = {"msp": msp, "energy": energy,
              "maha": lambda _, x: maha.score(x),
              "maha-diag": lambda _, x: maha_diag.score(x),
              # near-OOD frames share the all-class Gaussian with the known ones
              "rel-maha": lambda _, x: maha.score(x) - background.score(x),
              "maha-logits": lambda logits, _: maha_logits.score(logits),
              "vim": vim, "knn": knn}
    for a, b in (("energy", "maha"), ("maha-logits", "maha")):
        scores[f"{a} or {b}"] = union(scores[a], scores[b], val)
    return scores


def union(a: Score, b: Score, val: tuple[np.ndarray, np.ndarray]) -> Score:
    """Flag a frame when either score is in its own top tail on familiar validation frames:
    each score becomes the fraction of validation frames below it, and the union the larger
    of the two (on the edge: two thresholds at one validation quantile)."""
    tables = [np.sort(score(*val)) for score in (a, b)]
    return lambda logits, x: np.maximum(
        *(np.searchsorted(t, s(logits, x)) / len(t) for t, s in zip(tables, (a, b))))


def us_per_frame(score: Score, logits: np.ndarray, features: np.ndarray,
                 repeats: int = 30) -> float:
    """Median of `repeats` calls at batch TIMING_BATCH, in µs per frame."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score(logits, features)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / len(logits) * 1e6


def price(s: np.ndarray, confident: np.ndarray, unknown: np.ndarray) -> float:
    """The known test frames offloaded when the threshold is put (on the test set itself,
    so an oracle's price, not a deployable threshold) where the exit answers at most
    ANSWERED_GOAL of the held-out frames."""
    allowed = int(ANSWERED_GOAL * unknown.sum())
    answered = np.sort(s[confident & unknown])
    if len(answered) <= allowed:
        return float(1 - confident[~unknown].mean())
    threshold = answered[allowed] if allowed else -np.inf   # flag s >= threshold
    return float(1 - (confident & (s < threshold))[~unknown].mean())


def measure(out: Path, cfg: Config, data_dir: str, held_out: list[int],
            frames: int | None) -> None:
    from pipeline.model.train import dataset, predict
    head = load_numpy_head(out)
    data = dataset(cfg)     # the 8-class folder, split as training split it
    test = load_test_split(data_dir, cfg.model.input_shape, cfg.model.resize)
    if frames:
        test = Split(test.images[:frames], test.labels[:frames])
    unknown = np.isin(test.labels, held_out)
    renumber = np.cumsum(~np.isin(np.arange(10), held_out)) - 1
    known = Split(test.images[~unknown], renumber[test.labels[~unknown]])
    pixels = test.images.astype(np.float32) / 255

    val = in_batches(head, data.val.images.astype(np.float32) / 255)
    scores = fit_scores(head, in_batches(head, data.train.images.astype(np.float32) / 255),
                        data.train.labels, val)
    logits, features = in_batches(head, pixels)
    confident = exit_scores(logits, head.score, head.temperature) >= head.threshold
    model, _, _ = load_model(out)
    _, final_logits = predict(model, known)
    exit_right = logits[~unknown].argmax(1) == known.labels
    tail_right = final_logits.argmax(1).numpy() == known.labels
    today = np.where(confident[~unknown], exit_right, tail_right).mean()
    print(f"\nmethod study: the exit ({head.score} >= {head.threshold:.3f}) alone answers "
          f"{confident[~unknown].mean():.1%} of known and {confident[unknown].mean():.1%} of "
          f"held-out frames; split+exit on known {today:.2%}\n")

    rows = {}
    timing = slice(0, TIMING_BATCH)
    head_us = us_per_frame(lambda p, _: exit_view(head, p), pixels[timing], None)
    print(f"| score | AUROC held-out | threshold (flags {FLAG_RATE:.0%} known val) | "
          f"per class | held-out answered by exit | known offloaded | split+exit known | "
          f"cost (points) | µs/frame (batch {TIMING_BATCH}) | known offloaded for held-out "
          f"answered <= {ANSWERED_GOAL:.0%} |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| none (confidence only) | | | | {confident[unknown].mean():.1%} | "
          f"{1 - confident[~unknown].mean():.1%} | {today:.2%} | 0 | "
          f"{head_us:.1f} (the head's exit) | |")
    for name, score in scores.items():
        s = score(logits, features)
        threshold = float(np.quantile(score(*val), 1 - FLAG_RATE))
        local = confident & (s <= threshold)
        accuracy = np.where(local[~unknown], exit_right, tail_right).mean()
        us = us_per_frame(score, logits[timing], features[timing])
        rows[name] = (score, threshold)
        each = ", ".join(f"{c}: {auroc(s[test.labels == c], s[~unknown]):.2f}"
                         for c in held_out)
        print(f"| {name} | {auroc(s[unknown], s[~unknown]):.3f} | {threshold:.4g} | {each} | "
              f"{local[unknown].mean():.1%} | {1 - local[~unknown].mean():.1%} | "
              f"{accuracy:.2%} | {(today - accuracy) * 100:+.2f} | {us:.2f} | "
              f"{price(s, confident, unknown):.1%} |", flush=True)

    clean = {name: score(logits[~unknown], features[~unknown])
             for name, (score, _) in rows.items()}
    print("\n| score | shift | AUROC vs clean known | shifted answered by exit |"
          "\n|---|---|---|---|")
    for shift, moved in shifted(pixels[~unknown], tuple(cfg.model.input_shape)).items():
        s_logits, s_features = in_batches(head, moved)
        s_confident = exit_scores(s_logits, head.score, head.temperature) >= head.threshold
        print(f"| none (confidence only) | {shift} | | {s_confident.mean():.1%} |")
        for name, (score, threshold) in rows.items():
            s = score(s_logits, s_features)
            print(f"| {name} | {shift} | {auroc(s, clean[name]):.3f} | "
                  f"{(s_confident & (s <= threshold)).mean():.1%} |", flush=True)
