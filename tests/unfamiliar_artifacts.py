"""Edge artifacts with and without an unfamiliarity score, built explicitly (whatever the
fixtures' training writes), for the tests of the exports that compute it: the score is
fitted as training fits it (pipeline.floor.unfamiliar), on frames the test chooses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.edge.numpy_head import load_numpy_head
from pipeline.floor.data import Split
from pipeline.floor.edge_artifact import EDGE_NPZ, UNFAMILIAR, read_edge_npz, write_edge_npz
from pipeline.floor.unfamiliar import exit_features, fit

FLAG_RATE = 0.05


def pixels(split: Split, n: int | None = None) -> np.ndarray:
    """The first n frames' pixels in [0, 1], as the edge reads them."""
    return split.images[:n].astype(np.float32) / np.float32(255)


def first(split: Split, n: int) -> Split:
    return Split(split.images[:n], split.labels[:n])


def copied(art: Path, out: Path) -> Path:
    """The artifact folder `art` copied to `out` (the server's side too: a worker serves it);
    `out` itself if it is `art` (rewritten in place)."""
    if Path(art).resolve() != Path(out).resolve():
        shutil.copytree(art, out, dirs_exist_ok=True)
    return out


def scored_artifact(art: Path, out: Path, train: Split, val: Split, form: str,
                    flag_rate: float = FLAG_RATE) -> Path:
    """A copy of the artifact folder `art` whose edge.npz has an unfamiliarity score of
    `form` fitted as training fits it: class statistics of the exit's features on `train`,
    the threshold flagging `flag_rate` of `val` (whatever score `art` held is replaced)."""
    meta, arrays, _ = read_edge_npz(art)
    head = load_numpy_head(art)
    u = fit(exit_features(head.run_exit(pixels(train))[1]), train.labels, len(head.classes),
            form)
    u = u.with_threshold(u.score(exit_features(head.run_exit(pixels(val))[1])), flag_rate)
    arrays = {k: v for k, v in arrays.items() if not k.startswith(f"{UNFAMILIAR}.")}
    write_edge_npz(copied(art, out) / EDGE_NPZ, meta | {"unfamiliar_threshold": u.threshold,
                                           "unfamiliar_flag_rate": flag_rate},
                   arrays | u.arrays(UNFAMILIAR))
    return out


def unscored_artifact(art: Path, out: Path) -> Path:
    """A copy of `art` as trained before the score existed: no members, no meta keys."""
    meta, arrays, _ = read_edge_npz(art)
    meta = {k: v for k, v in meta.items() if not k.startswith("unfamiliar_")}
    write_edge_npz(copied(art, out) / EDGE_NPZ, meta,
                   {k: v for k, v in arrays.items() if not k.startswith(f"{UNFAMILIAR}.")})
    return out


def shifted(frames: np.ndarray, seed: int = 0) -> np.ndarray:
    """Frames of other kinds: inverted (1 - p), and uniform noise."""
    noise = np.random.default_rng(seed).random(frames.shape, dtype=np.float32)
    return np.concatenate([1 - frames, noise])
