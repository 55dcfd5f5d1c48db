"""The unfamiliarity score in the C export (pipeline/export/c_unfamiliar.py): the C head's
score equals the NumPy edge's (`NumpyHead.unfamiliar`) within 1e-5 on real Fashion-MNIST
frames and frames of another kind (inverted, noise), for an MLP head in both forms and a
conv head on its channel means, and the C edge step flags and decides exactly as the NumPy
edge does: an unfamiliar frame is offloaded, its fallback `unknown`."""

from __future__ import annotations

import ctypes
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.edge.numpy_head import exit_scores, load_numpy_head
from pipeline.export.export_c import H_FILE
from pipeline.floor.data import FASHION_MNIST_DIR, load_dataset
from pipeline.floor.edge_artifact import EDGE_NPZ, UNFAMILIAR, read_edge_npz, write_edge_npz
from tests.test_export_edge import FLOATS, CEdge
from tests.unfamiliar_artifacts import (FLAG_RATE, first, pixels, scored_artifact, shifted,
                                        unscored_artifact)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler (cc/gcc) on this machine")
UNKNOWN = -1        # SPLITEXIT_UNKNOWN
RTOL = 1e-5


def c_scores(edge: CEdge, frames: np.ndarray) -> np.ndarray:
    """splitexit_head_scored's score of each frame."""
    head = edge.head
    features = np.zeros(head.width, np.float32)
    logits = np.zeros(head.exit.bias.shape[0], np.float32)
    out, score = np.zeros(len(frames)), ctypes.c_double()
    for i, frame in enumerate(frames):
        frame = np.ascontiguousarray(frame, np.float32)
        edge.lib.splitexit_head_scored(frame.ctypes.data_as(FLOATS),
                                       features.ctypes.data_as(FLOATS),
                                       logits.ctypes.data_as(FLOATS), ctypes.byref(score))
        out[i] = score.value
    return out


def compare(edge: CEdge, frames: np.ndarray) -> dict:
    """The C edge against the NumPy edge on each frame: the score within RTOL, and the
    same flag, offload decision and class (`unknown` for a flagged frame). Returns the
    counts the tests check for a real comparison."""
    head = edge.head
    logits, hidden = head.run_exit(frames)
    scores, flags = head.unfamiliar(hidden)
    sure = exit_scores(logits, head.score, head.temperature) >= head.threshold
    ours = c_scores(edge, frames)
    np.testing.assert_allclose(ours, scores, rtol=RTOL, atol=0)
    for i, frame in enumerate(frames):
        d, _ = edge.step(frame, i + 1)
        assert d.unfamiliarity == ours[i] and bool(d.unfamiliar) == flags[i], i
        assert bool(d.offload) == (flags[i] or not sure[i]), i
        assert d.cls == (UNKNOWN if flags[i] else int(logits[i].argmax())), i
    return {"frames": len(frames), "flagged": int(flags.sum()),
            "flagged_sure": int((flags & sure).sum()), "local": int((~flags & sure).sum()),
            "max_rel": float(np.max(np.abs(ours - scores) / np.maximum(scores, 1e-300)))}


@pytest.fixture(scope="module")
def synthetic(idx_dir):
    return load_dataset(idx_dir, val_fraction=0.1)


@pytest.fixture(scope="module")
def fashion_test() -> np.ndarray:
    """Real Fashion-MNIST test frames (skips where the data set is not installed)."""
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist")
    return pixels(load_dataset(FASHION_MNIST_DIR).test, 1000)


def check(edge: CEdge, frames: np.ndarray, label: str) -> None:
    counts = compare(edge, frames)
    print(f"{label}: {counts}")
    # flags on both sides of the threshold, and on frames the exit alone would answer
    assert 0 < counts["flagged"] < counts["frames"] and counts["flagged_sure"] > 0
    assert counts["local"] > 0


@pytest.mark.parametrize("form", ["diagonal", "full"])
def test_an_mlp_head_scores_and_decides_as_the_numpy_edge(form, bottleneck_artifacts,
                                                          synthetic, fashion_test, tmp_path):
    """The exit reads a 40-wide layer before the bottleneck: its features, whitened per
    feature or by the full R, on the synthetic test frames it knows, real Fashion-MNIST and
    their shifts it does not."""
    art = scored_artifact(bottleneck_artifacts, tmp_path / "art", synthetic.train,
                          synthetic.val, form)
    edge = CEdge(art, tmp_path / "c")
    assert edge.head.unfamiliarity.diagonal == (form == "diagonal")
    frames = np.concatenate([pixels(synthetic.test), fashion_test[:300],
                             shifted(pixels(synthetic.test, 100))])
    check(edge, frames, f"bottleneck MLP, {form}")


def test_the_default_head_on_fashion_mnist_scores_as_the_numpy_edge(
        fashion_default, fashion_test, tmp_path):
    """The recommended default trained on Fashion-MNIST, its score fitted there (`auto`: the
    diagonal form on its exit's 400 features), on 1 000 real test frames and 2 000 shifted."""
    data = load_dataset(FASHION_MNIST_DIR)
    art = scored_artifact(fashion_default, tmp_path / "art", first(data.train, 10000),
                          first(data.val, 2000), "auto")
    edge = CEdge(art, tmp_path / "c")
    assert edge.head.unfamiliarity.diagonal
    check(edge, np.concatenate([fashion_test, shifted(fashion_test)]), "default, auto")


@pytest.mark.parametrize("variant", ["float32", "int8"])
def test_a_conv_head_scores_its_channel_means_as_the_numpy_edge(
        variant, conv_sparse, synthetic, fashion_test, tmp_path):
    """conv-sparse, the full form on the exit map's per-channel means (averaged in double in
    the C head). int8: the score's tables stay float32, and it scores the int8 head's
    activations, so it is compared with the NumPy head of those int8 weights."""
    art = scored_artifact(conv_sparse, tmp_path / "art", synthetic.train, synthetic.val,
                          "full")
    edge = CEdge(art, tmp_path / "c", variant)
    u = edge.head.unfamiliarity
    channels = edge.head.layers[edge.head.exit_layer - 1].weight.shape[0]
    assert not u.diagonal and u.features == channels
    frames = np.concatenate([pixels(synthetic.test), fashion_test[:200],
                             shifted(pixels(synthetic.test, 100))])
    if variant == "float32":
        check(edge, frames, "conv-sparse, full")
        return
    from pipeline.export.int8_weights import int8_head, int8_tables
    int8 = int8_head(edge.head, int8_tables(edge.head))
    scores, _ = int8.unfamiliar(int8.run_exit(frames)[1])
    np.testing.assert_allclose(c_scores(edge, frames), scores, rtol=RTOL, atol=0)
    source = (tmp_path / "c" / "splitexit_head.c").read_text()
    assert "static const float unfamiliar_whiten" in source


def test_an_artifact_without_a_score_exports_as_before(bottleneck_artifacts, synthetic,
                                                       tmp_path):
    """Trained before the score existed: the header says there is none, the head writes 0,
    nothing is flagged, every decision is the exit's alone."""
    art = unscored_artifact(bottleneck_artifacts, tmp_path / "art")
    edge = CEdge(art, tmp_path / "c")
    header = (tmp_path / "c" / H_FILE).read_text()
    assert "#define SPLITEXIT_UNFAMILIAR 0 " in header
    assert "#define SPLITEXIT_UNFAMILIAR_FLAGS 0 " in header
    assert "unfamiliar_" not in (tmp_path / "c" / "splitexit_head.c").read_text()
    frames = pixels(synthetic.test)
    assert not c_scores(edge, frames).any()
    counts = compare(edge, frames)
    assert counts["flagged"] == 0 and counts["local"] > 0


def test_a_score_without_a_threshold_scores_and_never_flags(bottleneck_artifacts, synthetic,
                                                            tmp_path):
    """flag rate 0 (calibrate's way to turn flagging off): scored, nothing flagged."""
    art = scored_artifact(bottleneck_artifacts, tmp_path / "art", synthetic.train,
                          synthetic.val, "full", flag_rate=0.0)
    edge = CEdge(art, tmp_path / "c")
    header = (tmp_path / "c" / H_FILE).read_text()
    assert "#define SPLITEXIT_UNFAMILIAR 1 " in header
    assert "#define SPLITEXIT_UNFAMILIAR_FLAGS 0 " in header
    frames = np.concatenate([pixels(synthetic.test, 50), shifted(pixels(synthetic.test, 50))])
    counts = compare(edge, frames)
    assert counts["flagged"] == 0 and counts["max_rel"] < RTOL


def test_the_header_states_the_threshold_exactly(bottleneck_artifacts, synthetic, tmp_path):
    art = scored_artifact(bottleneck_artifacts, tmp_path / "art", synthetic.train,
                          synthetic.val, "diagonal")
    CEdge(art, tmp_path / "c")
    header = (tmp_path / "c" / H_FILE).read_text()
    [literal] = re.findall(r"#define SPLITEXIT_UNFAMILIAR_THRESHOLD (\S+)", header)
    assert float.fromhex(literal) == load_numpy_head(art).unfamiliarity.threshold


def test_a_whiten_that_is_not_triangular_is_stored_whole(bottleneck_artifacts, synthetic,
                                                         tmp_path):
    """`fit` writes a lower-triangular R (stored as its triangle); an artifact from elsewhere
    may hold any (d, d) matrix, which the NumPy edge multiplies whole: so does the C."""
    art = scored_artifact(bottleneck_artifacts, tmp_path / "art", synthetic.train,
                          synthetic.val, "full")
    meta, arrays, _ = read_edge_npz(art)
    whiten = arrays[f"{UNFAMILIAR}.whiten"]
    arrays[f"{UNFAMILIAR}.whiten"] = whiten + whiten.T   # symmetric: both triangles
    write_edge_npz(art / EDGE_NPZ, meta, arrays)
    edge = CEdge(art, tmp_path / "c")
    d = edge.head.unfamiliarity.features
    assert f"static const float unfamiliar_whiten[{d * d}]" in \
        (tmp_path / "c" / "splitexit_head.c").read_text()
    counts = compare(edge, np.concatenate([pixels(synthetic.test, 100),
                                           shifted(pixels(synthetic.test, 50))]))
    assert counts["max_rel"] < RTOL
