"""Does the edge keep frames unlike anything it was trained on from the exit (#29)? An
open-set protocol on Fashion-MNIST: 2 of the 10 classes, drawn by a seed, are held out of
training; a model of 8 outputs trains on the other 8 (`splitexit train`, which fits both
unfamiliarity scores into the artifacts); then the test set runs through the SHIPPED
mechanism, as the runtime runs it:

  edge   the NumPy head of edge.npz: the exit's calibrated confidence against the artifact's
         threshold, and the artifact's unfamiliarity score (NumpyHead.unfamiliar: Mahalanobis
         to the nearest class mean of the features the exit reads, pipeline.floor.unfamiliar)
         against its threshold. The exit answers a frame only when it is confident AND not
         flagged; every other frame is offloaded.
  tail   server.pt's tail (Tail.run) on the split features as the wire delivers them (the
         4-bit uplink quantized), its own score (load_server(...).unfamiliarity, on the final
         classifier's input): a flagged offloaded frame is answered `unknown`, else a class.

Unfamiliar frames: the held-out classes' test frames, and the known classes' test frames
moved off the training distribution (Gaussian noise, inverted, rotated 90 degrees:
pipeline.model.unfamiliar_fit.shifted). For each: the AUROC of the edge's score (and of the
tail's) against the known test frames, the share the exit still answers (before: confidence
alone; shipped: confidence and the score), the share the tail answers `unknown`. On the known
test frames: split+exit accuracy without the mechanism and with it (`unknown` counts as
wrong): the accuracy cost.

    python -m benchmarks.unfamiliar                       # default, full schedule, seed 0
    python -m benchmarks.unfamiliar --seed 1              # held out: another pair of classes
    python -m benchmarks.unfamiliar --config conv-sparse  # or paper-sparse
    python -m benchmarks.unfamiliar --out runs/unfamiliar-default   # keep/reuse the training
    python -m benchmarks.unfamiliar --compare --depth ... # + the method study, + the layers
    python -m benchmarks.unfamiliar --tiny --data IDX_DIR           # one epoch, seconds

--compare: the candidate scores the method was chosen from (benchmarks/unfamiliar_compare.py);
--depth: the same score on every layer of the model (benchmarks/unfamiliar_depth.py).

Why 8 outputs, not 10 with two never trained: a model with outputs for the held-out classes
would be told, on every training frame, that those two classes exist and are never right
(their logits only ever get pushed down) -- knowledge of the unknowns that a deployed model
never has. An 8-class model is what a user who trains on 8 classes gets.

A training folder made before the scores existed is calibrated once more
(pipeline.model.train.calibrate_dir), which fits and writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")       # timed as an edge runs it: one core, and
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # a busy machine stalls a second BLAS thread

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import add_tiny, apply_tiny  # noqa: E402
from pipeline.edge.numpy_head import NumpyHead, exit_scores, load_numpy_head  # noqa: E402
from pipeline.floor.data import load_test_split, write_idx  # noqa: E402
from pipeline.floor.splits import Split  # noqa: E402
from pipeline.floor.unfamiliar import Unfamiliarity  # noqa: E402
from pipeline.model.artifacts import ServerArtifact, load_server  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR, Config, load_config  # noqa: E402
from pipeline.model.unfamiliar_fit import auroc, shifted  # noqa: E402
from pipeline.model.uplink import fake_quantize  # noqa: E402

HELD_OUT = 2            # classes of the 10 never trained
ANSWERED_GOAL = 0.10    # of held-out frames the exit may still answer (#29)
EDGE_RATES = (0.10, 0.20, 0.30, 0.50)   # the edge's flag rate, beside the shipped one
TAIL_RATES = (0.01, 0.05, 0.10)         # the tail's, beside the shipped one
BATCH = 4096
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
    """Train into `out` unless a training of the same config and held-out classes is there;
    give a training older than the unfamiliarity scores its scores."""
    from pipeline.model.train import calibrate_dir, run
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == key:
        print(f"reusing the training in {out}", flush=True)
        if load_numpy_head(out).unfamiliarity is None or load_server(out).unfamiliarity is None:
            start = time.perf_counter()
            calibrate_dir(out, cfg)
            print(f"  trained before the unfamiliarity scores: calibrated again, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        return
    start = time.perf_counter()
    metrics = run(cfg, out, progress=False)
    marker.write_text(json.dumps(key) + "\n")
    print(f"trained {cfg.model.name} on the 8 known classes in {time.perf_counter() - start:.0f}"
          f" s: epochs run {metrics['train_epochs']}, known test split+exit "
          f"{metrics['calibration']['test']['split_exit']:.2%}", flush=True)


@dataclass
class Seen:
    """What the runtime computes on each frame."""
    exit_logits: np.ndarray     # (N, C), the NumPy head's
    confidence: np.ndarray      # (N,) the exit's calibrated score (the artifact's kind)
    confident: np.ndarray       # (N,) confidence >= the artifact's threshold
    edge_score: np.ndarray      # (N,) NumpyHead.unfamiliar
    final_logits: np.ndarray    # (N, C), the tail on the features as the wire delivers them
    tail_score: np.ndarray      # (N,) the server artifact's score on the tail's features


def runtime_view(head: NumpyHead, server: ServerArtifact, pixels: np.ndarray) -> Seen:
    """Edge (edge.npz) then tail (server.pt) on pixels in [0, 1], every frame through both:
    which frames each side sees is decided afterwards (`decide`), so one pass serves every
    threshold."""
    bits = server.config.model.uplink_bits
    parts = []
    for i in range(0, len(pixels), BATCH):
        logits, hidden = head.run_exit(pixels[i:i + BATCH])
        edge_score, _ = head.unfamiliar(hidden)
        features = torch.from_numpy(np.ascontiguousarray(head.run_uplink(hidden)))
        if bits:
            features = fake_quantize(features, bits)   # the wire's rounding, bit for bit
        with torch.inference_mode():
            final, penultimate = server.tail.run(features)
        confidence = exit_scores(logits, head.score, head.temperature)
        parts.append((logits, confidence, confidence >= head.threshold, edge_score, final.numpy(),
                      server.unfamiliarity.score(penultimate.numpy())))
    return Seen(*(np.concatenate(p) for p in zip(*parts)))


@dataclass
class Decided:
    local: np.ndarray       # answered by the exit
    unknown: np.ndarray     # offloaded and answered `unknown` by the tail
    answer: np.ndarray      # the class answered (meaningless where unknown)


def decide(s: Seen, edge: float | None, tail: float | None,
           confidence: float | None = None) -> Decided:
    """The runtime's rule with these thresholds (None: that score never flags): the exit
    answers confident frames its score does not flag; the tail answers the rest, `unknown`
    where its own score flags them. `confidence`: another threshold than the artifact's."""
    flagged = s.edge_score > edge if edge is not None else np.zeros(len(s.confident), bool)
    confident = s.confident if confidence is None else s.confidence >= confidence
    local = confident & ~flagged
    unknown = ~local & (s.tail_score > tail if tail is not None else False)
    return Decided(local, unknown, np.where(local, s.exit_logits.argmax(1),
                                            s.final_logits.argmax(1)))


def accuracy(d: Decided, labels: np.ndarray) -> float:
    """Split+exit accuracy, `unknown` counted as wrong."""
    return float(((d.answer == labels) & ~d.unknown).mean())


@dataclass
class Problem:
    """The frames one run judges, each set through the runtime once."""
    known: Seen
    labels: np.ndarray          # the known frames' labels, 0..7
    val: Seen                   # familiar validation frames: where thresholds are chosen
    unfamiliar: dict[str, Seen]  # held-out classes, then each shift of the known frames
    edge: Unfamiliarity         # as shipped in edge.npz
    tail: Unfamiliarity         # as shipped in server.pt
    exit_threshold: float       # the exit's confidence threshold, as shipped


def load_problem(out: Path, cfg: Config, data_dir: str, held_out: list[int],
                 frames: int | None) -> Problem:
    from pipeline.model.train import dataset
    head, server = load_numpy_head(out), load_server(out)
    test = load_test_split(data_dir, cfg.model.input_shape, cfg.model.resize)
    if frames:
        test = Split(test.images[:frames], test.labels[:frames])
    unknown = np.isin(test.labels, held_out)
    renumber = np.cumsum(~np.isin(np.arange(10), held_out)) - 1
    pixels = test.images.astype(np.float32) / 255
    val = dataset(cfg).val    # the 8-class folder, split as training split it
    sets = {"held-out classes": pixels[unknown],
            **shifted(pixels[~unknown], tuple(cfg.model.input_shape))}
    return Problem(runtime_view(head, server, pixels[~unknown]),
                   renumber[test.labels[~unknown]],
                   runtime_view(head, server, val.images.astype(np.float32) / 255),
                   {name: runtime_view(head, server, p) for name, p in sets.items()},
                   head.unfamiliarity, server.unfamiliarity, head.threshold)


def described(u: Unfamiliarity) -> str:
    if u.threshold is None:
        return f"off ({'diagonal' if u.diagonal else 'full'}, {u.features} features)"
    return (f"{u.threshold:.4g} ({'diagonal' if u.diagonal else 'full'}, {u.features} "
            f"features, flags {u.flag_rate:.1%} of familiar val)")


def shipped_table(p: Problem) -> None:
    """The acceptance table: each set of unfamiliar frames under the artifact's thresholds."""
    before = decide(p.known, None, None)
    edge_only = decide(p.known, p.edge.threshold, None)
    shipped = decide(p.known, p.edge.threshold, p.tail.threshold)
    cost = (accuracy(before, p.labels) - accuracy(shipped, p.labels)) * 100
    print(f"\nshipped thresholds: edge {described(p.edge)}, tail {described(p.tail)}")
    print(f"known test frames: split+exit {accuracy(before, p.labels):.2%} without, "
          f"{accuracy(edge_only, p.labels):.2%} with the edge's score, "
          f"{accuracy(shipped, p.labels):.2%} with both (unknown = wrong): cost {cost:+.2f} "
          f"points; offloaded {1 - before.local.mean():.1%} -> {1 - shipped.local.mean():.1%}; "
          f"answered unknown {shipped.unknown.mean():.2%}\n")
    print("| frames | n | AUROC edge | AUROC tail | edge flags | exit answers: confidence only "
          "| exit answers: shipped | tail answers unknown | accuracy cost on known (points) |"
          "\n|---|---|---|---|---|---|---|---|---|")
    flagged = flag_share(p.known.edge_score, p.edge.threshold)
    print(f"| known (familiar) | {len(p.labels)} | | | {flagged:.1%} | "
          f"{before.local.mean():.1%} | {shipped.local.mean():.1%} | "
          f"{shipped.unknown.mean():.2%} | {cost:+.2f} |")
    for name, s in p.unfamiliar.items():
        d = decide(s, p.edge.threshold, p.tail.threshold)
        print(f"| {name} | {len(s.confident)} | {auroc(s.edge_score, p.known.edge_score):.3f} | "
              f"{auroc(s.tail_score, p.known.tail_score):.3f} | "
              f"{flag_share(s.edge_score, p.edge.threshold):.1%} | {s.confident.mean():.1%} | "
              f"{d.local.mean():.1%} | {d.unknown.mean():.1%} | {cost:+.2f} |", flush=True)


def flag_share(scores: np.ndarray, threshold: float | None) -> float:
    """The share of these frames a threshold flags (None: the score is off)."""
    return 0.0 if threshold is None else float((scores > threshold).mean())


def oracle_edge_threshold(s: Seen) -> float:
    """The edge threshold, chosen on these (test) frames, at which the exit answers at most
    ANSWERED_GOAL of them: a price to read, not a deployable setting."""
    answered = np.sort(s.edge_score[s.confident])
    allowed = int(ANSWERED_GOAL * len(s.confident))
    return float(np.nextafter(answered[allowed], -np.inf)) if len(answered) > allowed \
        else float("inf")


def unflagged(s: Seen, edge: float | None) -> np.ndarray:
    return s.edge_score <= (np.inf if edge is None else edge)


def oracle_confidence(s: Seen, edge: float | None, shipped: float) -> float:
    """The confidence threshold, chosen on these (test) frames, at which the exit answers
    at most ANSWERED_GOAL of them, the edge's score as shipped: the other lever's price."""
    kept = np.sort(s.confidence[unflagged(s, edge)])[::-1]
    allowed = int(ANSWERED_GOAL * len(s.confident))
    return max(float(np.nextafter(kept[allowed], np.inf)) if len(kept) > allowed else 0.0,
               shipped)


def budget_confidence(p: Problem) -> float:
    """The confidence threshold at which the exit answers as many familiar validation frames
    with the edge's score as it did without it: where a budget controller holding the offload
    target settles (flagged frames count as offloads), in the static view."""
    v = p.val
    kept = np.sort(v.confidence[unflagged(v, p.edge.threshold)])[::-1]
    answered = int(v.confident.sum())
    if not 0 < answered <= len(kept):
        return p.exit_threshold
    return min(float(kept[answered - 1]), p.exit_threshold)   # nothing flagged: as shipped


def sweep_tables(p: Problem) -> None:
    """What other thresholds would buy: the edge's rate (how many held-out frames still get
    the exit's answer, and what it costs), or a stricter confidence instead; then the
    tail's rate (how many get `unknown`)."""
    base = accuracy(decide(p.known, None, None), p.labels)
    held = p.unfamiliar["held-out classes"]
    shifts = [name for name in p.unfamiliar if name != "held-out classes"]

    def row(name: str, edge: float | None, tail: float | None,
            confidence: float | None = None) -> None:
        d = decide(p.known, edge, tail, confidence)
        each = {n: decide(s, edge, tail, confidence) for n, s in p.unfamiliar.items()}
        print(f"| {name} | {flag_share(p.val.edge_score, edge):.1%} | "
              f"{flag_share(p.val.tail_score, tail):.2%} | "
              f"{each['held-out classes'].local.mean():.1%} | "
              f"{' / '.join(f'{each[n].local.mean():.1%}' for n in shifts)} | "
              f"{each['held-out classes'].unknown.mean():.1%} | "
              f"{' / '.join(f'{each[n].unknown.mean():.1%}' for n in shifts)} | "
              f"{1 - d.local.mean():.1%} | {d.unknown.mean():.2%} | "
              f"{accuracy(d, p.labels):.2%} | {(base - accuracy(d, p.labels)) * 100:+.2f} |",
              flush=True)

    print(f"\nother thresholds (rule: the exit answers when confident AND not flagged)\n\n"
          f"| thresholds | edge flags familiar val | tail flags familiar val | held-out answered "
          f"by exit | {' / '.join(shifts)} answered | held-out unknown | {' / '.join(shifts)} "
          f"unknown | known offloaded | known unknown | split+exit known | cost (points) |"
          f"\n|---|---|---|---|---|---|---|---|---|---|---|")
    row("shipped", p.edge.threshold, p.tail.threshold)
    for r in EDGE_RATES:
        row(f"edge flags {r:.0%}", p.edge.with_threshold(p.val.edge_score, r).threshold,
            p.tail.threshold)
    t = oracle_edge_threshold(held)
    row(f"oracle: edge threshold {t:.4g}, held-out answered <= {ANSWERED_GOAL:.0%}", t,
        p.tail.threshold)
    c = oracle_confidence(held, p.edge.threshold, p.exit_threshold)
    row(f"oracle: confidence >= {c:.4f} (shipped {p.exit_threshold:.4f}), held-out answered "
        f"<= {ANSWERED_GOAL:.0%}", p.edge.threshold, p.tail.threshold, c)
    c = budget_confidence(p)
    row(f"budget held: confidence >= {c:.4f}, known offload as without the score",
        p.edge.threshold, p.tail.threshold, c)
    for r in TAIL_RATES:
        row(f"tail flags {r:.0%}", p.edge.threshold,
            p.tail.with_threshold(p.val.tail_score, r).threshold)


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
    ap.add_argument("--compare", action="store_true",
                    help="also the candidate scores the shipped one was chosen from")
    ap.add_argument("--depth", action="store_true",
                    help="also the shipped score fitted on every layer of the model")
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
        problem = load_problem(out, cfg, args.data, held_out, args.frames)
        print(f"\n{args.config}, held out: classes {held_out} (seed {args.seed})")
        shipped_table(problem)
        sweep_tables(problem)
        if args.depth:
            from benchmarks.unfamiliar_depth import measure as depth
            depth(out, cfg, args.data, held_out, args.frames)
        if args.compare:
            from benchmarks.unfamiliar_compare import measure as compare
            compare(out, cfg, args.data, held_out, args.frames)


if __name__ == "__main__":
    main()
