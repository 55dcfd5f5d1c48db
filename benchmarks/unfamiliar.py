"""Which unfamiliarity score should the edge compute (#29, item 1)? An open-set protocol on
Fashion-MNIST: 2 of the 10 classes, drawn by a seed, are held out of training; a model of 8
outputs trains on the other 8; on the test set the torch-free edge head (edge.npz) scores
every frame, and each candidate score is judged on how well it separates the held-out
classes' frames (and synthetically shifted known frames) from the known classes'.

    python -m benchmarks.unfamiliar                       # default, full schedule, seed 0
    python -m benchmarks.unfamiliar --seed 1              # held out: another pair of classes
    python -m benchmarks.unfamiliar --config conv-sparse --set train.epochs=10   # of 80
    python -m benchmarks.unfamiliar --out runs/unfamiliar-default   # keep/reuse the training
    python -m benchmarks.unfamiliar --tiny --data IDX_DIR           # one epoch, seconds

Why 8 outputs, not 10 with two never trained: a model with outputs for the held-out classes
would be told, on every training frame, that those two classes exist and are never right
(their logits only ever get pushed down) -- knowledge of the unknowns that a deployed model
never has. An 8-class model is what a user who trains on 8 classes gets.

The candidates (higher = more unfamiliar):
  msp      -max softmax probability of the calibrated exit: today's confidence
           (Hendrycks & Gimpel, ICLR 2017, the baseline)
  energy   -T logsumexp(logits / T), T = 1 (Liu et al., NeurIPS 2020)
  maha     min over classes of the Mahalanobis distance, class means and one shared
           covariance of the exit's input fitted on the known training frames (Lee et al.,
           NeurIPS 2018); a conv exit's map is averaged per channel first, as Lee et al. do
  maha-diag  the same with the shared covariance's diagonal only (d x C MACs, no d x d matrix)
  vim      alpha * |features outside their principal subspace| + energy (Wang et al., CVPR
           2022): a virtual logit for "none of these"
  knn      -(cosine similarity to the k-th nearest of a fixed sample of normalized training
           features) (Sun et al., ICML 2022)

The threshold of each score flags FLAG_RATE of the known classes' validation frames; a frame
is answered by the exit when it is confident by today's threshold and not flagged; a flagged
frame goes to the tail (torch, the server artifact), which answers it with a class.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")       # timed as an edge runs it: one core, and
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # a busy machine stalls a second BLAS thread

import numpy as np  # noqa: E402

from benchmarks import add_tiny, apply_tiny  # noqa: E402
from pipeline.edge.numpy_head import NumpyHead, exit_scores, load_numpy_head  # noqa: E402
from pipeline.floor.data import load_test_split, write_idx  # noqa: E402
from pipeline.floor.splits import Split  # noqa: E402
from pipeline.model.artifacts import load_model  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR, Config, load_config  # noqa: E402

FLAG_RATE = 0.05        # familiar validation frames each score's threshold flags
HELD_OUT = 2            # classes of the 10 never trained
VIM_SHARE = 4           # ViM's principal subspace: a quarter of the features (512 of 2048)
KNN_SAMPLE, KNN_K = 5000, 10   # Sun et al.: k scales with the sample (k=1 at 1 % of CIFAR)
NOISE_SIGMA = 0.25      # Gaussian pixel noise, pixels in [0, 1]
TIMING_BATCH = 64
ANSWERED_GOAL = 0.10    # of held-out frames the exit may still answer (#29)
MARKER = "unfamiliar.json"


def held_out_classes(seed: int, classes: int = 10) -> list[int]:
    return sorted(int(c) for c in np.random.default_rng(seed).choice(classes, HELD_OUT,
                                                                     replace=False))


def known_only(data_dir: str, held_out: list[int], folder: Path) -> Path:
    """The training and test IDX files without the held-out classes, labels renumbered
    0..7 in order: what `splitexit train` reads as an 8-class data set."""
    from pipeline.floor.data import FILES, read_idx   # the IDX names the reader knows

    def find(key: str) -> Path:   # plain or .gz, as the reader takes them
        return min(Path(data_dir).glob(FILES[key] + "*"))
    folder.mkdir(parents=True, exist_ok=True)
    for images_key, labels_key in (("train_images", "train_labels"),
                                   ("test_images", "test_labels")):
        images = read_idx(find(images_key))
        labels = read_idx(find(labels_key)).astype(np.int64)
        keep = ~np.isin(labels, held_out)
        renumber = np.cumsum(~np.isin(np.arange(10), held_out)) - 1
        write_idx(folder / f"{FILES[images_key]}", images[keep])
        write_idx(folder / f"{FILES[labels_key]}", renumber[labels[keep]].astype(np.uint8))
    return folder


def eight_class_config(name: str, overrides: list[str], data_dir: Path) -> Config:
    """The config with its last layer cut to the known classes (a fan-out over 8 outputs at
    most 8)."""
    cfg = load_config(name, overrides)
    known = 10 - HELD_OUT
    m = cfg.model
    widths, fan_out = [*m.widths[:-1], known], [*m.fan_out[:-1], min(m.fan_out[-1], known)]
    extra = [f"model.widths={widths}", f"model.fan_out={fan_out}", f"data.dir='{data_dir}'"]
    if m.exit_fan_out:
        extra.append(f"model.exit_fan_out={min(m.exit_fan_out, known)}")
    return load_config(name, [*overrides, *extra])


def train_once(cfg: Config, out: Path, key: dict) -> None:
    """Train into `out` unless a training of the same config and held-out classes is there."""
    from pipeline.model.train import run
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == key:
        print(f"reusing the training in {out}", flush=True)
        return
    start = time.perf_counter()
    metrics = run(cfg, out, progress=False)
    marker.write_text(json.dumps(key) + "\n")
    print(f"trained {cfg.model.name} on the 8 known classes in {time.perf_counter() - start:.0f}"
          f" s: epochs run {metrics['train_epochs']}, known test split+exit "
          f"{metrics['calibration']['test']['split_exit']:.2%}", flush=True)


def exit_view(head: NumpyHead, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exit logits, the features the distance scores read): the exit's input, a conv map
    averaged per channel (Lee et al. 2018 pool each map so)."""
    logits, hidden = head.run_exit(pixels)
    if hidden.ndim == 4:
        hidden = hidden.mean(axis=(2, 3))
    return logits, hidden.reshape(len(hidden), -1)


def in_batches(head: NumpyHead, pixels: np.ndarray, batch: int = 4096):
    parts = [exit_view(head, pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


Score = Callable[[np.ndarray, np.ndarray], np.ndarray]


def gaussians(x: np.ndarray, labels: np.ndarray, diagonal: bool = False) -> Score:
    """Class means and one shared covariance of `x` (Lee et al. 2018) -> a function giving
    each frame's squared Mahalanobis distance to its nearest class mean. Dead features
    (ReLU, the rate penalty) make the covariance singular: a ridge of 1e-3 of the mean
    variance. Whitened means: |z|^2 - 2 z.m + |m|^2 with z = x R (P = R R^T), d^2 + C d MACs;
    diagonal: C d."""
    d = x.shape[1]
    means = np.stack([x[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    centred = x - means[labels]
    cov = centred.T @ centred / len(x)
    cov += 1e-3 * np.trace(cov) / d * np.eye(d)
    if diagonal:
        inv_var, means32 = (1 / np.diag(cov)).astype(np.float32), means.astype(np.float32)
        return lambda v: (((v[:, None, :] - means32) ** 2) * inv_var).sum(2).min(1)
    root = np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)
    white = means.astype(np.float32) @ root
    norms = (white ** 2).sum(1)

    def distance(v):
        z = v @ root
        return ((z ** 2).sum(1)[:, None] - 2 * z @ white.T + norms).min(1)
    return distance


def fit_scores(head: NumpyHead, train: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
               val: tuple[np.ndarray, np.ndarray]) -> dict[str, Score]:
    """Each candidate as f(exit logits, features) -> unfamiliarity, fitted on the known
    classes' training frames where it needs statistics (the union on validation)."""
    train_logits, features = train
    maha_features = gaussians(features, labels)
    maha_diag = gaussians(features, labels, diagonal=True)
    background = gaussians(features, np.zeros_like(labels))
    maha_logits = gaussians(train_logits, labels)
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
        c = x - mean32
        return np.sqrt(np.maximum((c ** 2).sum(1) - ((c @ keep) ** 2).sum(1), 0))
    alpha = float(train_logits.max(1).mean() / residual(features).mean())

    def vim(logits, x):
        return alpha * residual(x) + energy(logits, x)

    def knn(_, x):
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return -np.partition(x @ bank, -k, axis=1)[:, -k]

    scores = {"msp": msp, "energy": energy,
              "maha": lambda _, x: maha_features(x),
              "maha-diag": lambda _, x: maha_diag(x),
              # Ren et al. 2021 (arXiv:2106.09022): minus the distance to one Gaussian of
              # all classes, which near-OOD frames share with the known ones
              "rel-maha": lambda _, x: maha_features(x) - background(x),
              "maha-logits": lambda logits, _: maha_logits(logits),
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


def auroc(unfamiliar: np.ndarray, familiar: np.ndarray) -> float:
    """P(score of an unfamiliar frame > a familiar one's), ties half (Mann-Whitney U)."""
    both = np.concatenate([unfamiliar, familiar])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]     # ties: their mean rank
    n1, n0 = len(unfamiliar), len(familiar)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


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


def shifted(pixels: np.ndarray, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Known-class test frames (floats in [0, 1]) moved off the training distribution."""
    rng = np.random.default_rng(0)
    images = pixels.reshape(-1, *shape)
    return {"noise": np.clip(pixels + rng.normal(0, NOISE_SIGMA, pixels.shape), 0, 1)
            .astype(np.float32),
            "inverted": 1 - pixels,
            "rot90": np.ascontiguousarray(np.rot90(images, 1, axes=(-2, -1)))
            .reshape(len(pixels), -1)}


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
    print(f"\nheld out: classes {held_out}; test frames {int((~unknown).sum())} known, "
          f"{int(unknown.sum())} held out; today's exit ({head.score} >= "
          f"{head.threshold:.3f}) answers {confident[~unknown].mean():.1%} of known and "
          f"{confident[unknown].mean():.1%} of held-out frames; split+exit on known "
          f"{today:.2%}\n")

    rows = {}
    timing = slice(0, TIMING_BATCH)
    head_us = us_per_frame(lambda p, _: exit_view(head, p), pixels[timing], None)
    print(f"| score | AUROC held-out | threshold (flags {FLAG_RATE:.0%} known val) | "
          f"per class | held-out answered by exit | known offloaded | split+exit known | "
          f"cost (points) | µs/frame (batch {TIMING_BATCH}) | known offloaded for held-out "
          f"answered <= {ANSWERED_GOAL:.0%} |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| none (today) | | | | {confident[unknown].mean():.1%} | "
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

    known_pixels = pixels[~unknown]
    clean = {name: score(logits[~unknown], features[~unknown])
             for name, (score, _) in rows.items()}
    print("\n| score | shift | AUROC vs clean known | shifted answered by exit |"
          "\n|---|---|---|---|")
    for shift, frames_ in shifted(known_pixels, cfg.model.input_shape).items():
        s_logits, s_features = in_batches(head, frames_)
        s_confident = exit_scores(s_logits, head.score, head.temperature) >= head.threshold
        print(f"| none (today) | {shift} | | {s_confident.mean():.1%} |")
        for name, (score, threshold) in rows.items():
            s = score(s_logits, s_features)
            print(f"| {name} | {shift} | {auroc(s, clean[name]):.3f} | "
                  f"{(s_confident & (s <= threshold)).mean():.1%} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="default", help="config to train (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, as `splitexit train --set` (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="draws the held-out classes")
    ap.add_argument("--data", default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
    ap.add_argument("--out", type=Path, help="training folder to keep and reuse "
                    "(default: a temporary one)")
    ap.add_argument("--frames", type=int, help="test frames (default: all)")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=300)
    if args.tiny:
        args.set = ["train.epochs=1", "train.val_fraction=0.1", *args.set]
    held_out = held_out_classes(args.seed)
    with tempfile.TemporaryDirectory(prefix="unfamiliar-") as work:
        data = known_only(args.data, held_out, Path(work) / "known")
        cfg = eight_class_config(args.config, args.set, data)
        out = args.out or Path(work) / "model"
        out.mkdir(parents=True, exist_ok=True)
        train_once(cfg, out, {"config": args.config, "set": args.set, "held_out": held_out,
                              "data": str(args.data)})
        measure(out, cfg, args.data, held_out, args.frames)


if __name__ == "__main__":
    main()
