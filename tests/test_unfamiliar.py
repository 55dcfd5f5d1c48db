"""Frames unlike anything the model has seen (#29): the score (pipeline.floor.unfamiliar), as
training fits it and the NumPy edge computes it, and what the runtime does with a flagged
frame, from the core's rules to real processes."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.edge.core import EdgeCore
from pipeline.edge.controller import ControllerConfig, State
from pipeline.edge.numpy_head import load_numpy_head
from pipeline.edge.results import UNKNOWN, Results
from pipeline.edge.source_base import Frame
from pipeline.errors import ArtifactError
from pipeline.floor.data import load_dataset, write_idx
from pipeline.floor.edge_artifact import read_edge_npz, write_edge_npz
from pipeline.floor.unfamiliar import exit_features, fit, flag_threshold
from pipeline.model.artifacts import load_edge, load_model, load_server
from pipeline.model.config import from_dict
from pipeline.model.train import calibrate_dir
from pipeline.model.unfamiliar_fit import activations, auroc, tail_answers
from pipeline.protocol import wire
from tests.test_runtime import system  # noqa: F401  (the fixture: broker, workers, edges)

CLASSES = ("a", "b", "c")


# -- the score ----------------------------------------------------------------------------

def blobs(seed: int, n: int = 600, d: int = 6):
    """Three Gaussian classes with correlated features: the full form sees the correlation."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    mix = np.random.default_rng(100).normal(size=(d, d))   # the same mixing for every draw
    x = rng.normal(size=(n, d)) @ mix + 4 * np.eye(3, d)[labels] @ mix
    return x, labels, mix


@pytest.mark.parametrize("form", ["full", "diagonal"])
def test_the_score_is_the_distance_to_the_nearest_class_mean(form):
    x, labels, _ = blobs(0)
    u = fit(x, labels, 3, form)
    means = np.stack([x[labels == c].mean(0) for c in range(3)])
    cov = sum((x[labels == c] - means[c]).T @ (x[labels == c] - means[c]) for c in range(3))
    cov /= len(x)
    cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov) if form == "full" else np.diag(1 / np.diag(cov))
    expected = np.min([np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means], 0)
    assert np.allclose(u.score(x), expected, rtol=2e-4)
    # its own class mean is where a frame is closest
    assert u.whiten.shape == ((6, 6) if form == "full" else (6,)) and u.means.shape == (3, 6)


def test_a_threshold_flags_its_share_of_familiar_frames_and_far_frames_all():
    x, labels, mix = blobs(1)
    u = fit(x, labels, 3)
    val, val_labels, _ = blobs(2)
    u = u.with_threshold(u.score(val), 0.05)
    assert u.flags(u.score(val)).mean() == pytest.approx(0.05, abs=0.002)
    far = np.random.default_rng(3).normal(size=(200, 6)) @ mix * 5
    assert u.flags(u.score(far)).mean() > 0.9
    assert auroc(u.score(far), u.score(val)) > 0.95
    assert flag_threshold(u.score(val), 0) is None
    assert not fit(x, labels, 3).flags(u.score(far)).any()   # no threshold: never flags
    with pytest.raises(ValueError, match="flag rate"):
        flag_threshold(u.score(val), 1.0)


def test_a_class_with_no_training_frames_gets_the_overall_mean():
    x, labels, _ = blobs(4)
    u = fit(x[labels < 2], labels[labels < 2], 3)
    assert np.isfinite(u.means).all() and u.means.shape == (3, 6)


def test_auroc_counts_pairs_and_ties_half():
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5


# -- training writes it, the edge reads it ------------------------------------------------

def test_training_ships_both_scores_and_the_numpy_edge_agrees_with_torch(artifacts, idx_dir):
    head = load_numpy_head(artifacts)
    u = head.unfamiliarity
    assert u is not None and u.threshold is not None and u.flag_rate == 0.05
    server = load_server(artifacts)
    assert server.unfamiliarity is not None and server.unfamiliarity.flag_rate == 0.002
    metrics = json.loads((artifacts / "metrics.json").read_text())
    report = metrics["calibration"]["unfamiliar"]
    assert report["edge"]["threshold"] == pytest.approx(u.threshold)
    assert set(report) >= {"test", "noise", "inverted", "rot90"}

    pixels = load_dataset(idx_dir).test.images.astype(np.float32) / 255
    _, hidden = head.run_exit(pixels)
    scores, flags = head.unfamiliar(hidden)
    edge = load_edge(artifacts)
    with torch.inference_mode():
        _, torch_hidden = edge.head.run_exit(torch.from_numpy(pixels))
    assert np.allclose(scores, u.score(exit_features(torch_hidden.numpy())), rtol=1e-4)
    # the report's test share is what the edge flags of those frames
    assert flags.mean() == pytest.approx(report["test"]["edge_flagged"], abs=1e-9)


def test_calibrate_changes_the_flag_rate_without_retraining(artifacts, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(artifacts, folder)
    before = load_numpy_head(folder).unfamiliarity
    raw = load_edge(folder).config.to_dict()
    raw["calibrate"]["unfamiliar_flag_rate"] = 0.2
    calibrate_dir(folder, from_dict(raw))
    after = load_numpy_head(folder).unfamiliarity
    assert after.flag_rate == 0.2 and after.threshold < before.threshold
    assert np.array_equal(after.means, before.means)


def test_an_artifact_whose_score_does_not_fit_its_exit_is_refused(artifacts, tmp_path):
    meta, arrays, _ = read_edge_npz(artifacts)
    bad = dict(arrays)
    bad["unfamiliar.means"] = arrays["unfamiliar.means"][:, :-1]
    write_edge_npz(tmp_path / "edge.npz", meta, bad)
    with pytest.raises(ArtifactError, match="unfamiliar.means.*features the exit reads"):
        read_edge_npz(tmp_path)
    write_edge_npz(tmp_path / "edge.npz", meta | {"unfamiliar_flag_rate": 2}, arrays)
    with pytest.raises(ArtifactError, match="unfamiliar_flag_rate"):
        read_edge_npz(tmp_path)
    older = {k: v for k, v in arrays.items() if not k.startswith("unfamiliar.")}
    write_edge_npz(tmp_path / "edge.npz", meta, older)
    head = load_numpy_head(tmp_path)   # trained before the score: nothing flagged
    assert head.unfamiliarity is None
    assert not head.unfamiliar(np.ones((4, 40), np.float32))[1].any()


# -- the core's rules ---------------------------------------------------------------------

def frames(n: int) -> list[Frame]:
    return [Frame(i, np.zeros(4, np.float32), i % 3, "test", 0.0) for i in range(n)]


def test_a_flagged_frame_is_never_answered_by_the_exit_and_falls_back_unknown():
    core = EdgeCore(0.5, 1.0, CLASSES)
    batch = frames(4)
    scores = np.array([0.9, 0.9, 0.2, 0.99])
    flagged = np.array([False, True, False, True])
    plan = core.decide(batch, [0, 1, 2, 0], scores, 0.1, now=0.0, unfamiliar=flagged)
    assert [o.frame for o in plan.local] == [0]
    assert plan.offload == [1, 2, 3]
    msg_id = core.open_request(plan, 100, 0.0)
    core.request_sent(plan, msg_id, True, 100, 60, 40, 0.0)
    outcomes = core.expire(now=2.0)                    # the server never answers
    by_frame = {o.frame: o for o in outcomes}
    assert by_frame[1].cls == UNKNOWN and by_frame[1].class_name == "unknown"
    assert by_frame[1].unfamiliar and by_frame[1].confidence == 0.0
    assert by_frame[2].cls == 2 and not by_frame[2].unfamiliar     # an unsure frame's own
    assert core.counts["unfamiliar.edge"] == 2


def test_the_tail_answers_a_class_or_unknown_and_each_frame_once():
    core = EdgeCore(0.5, 1.0, CLASSES)
    plan = core.decide(frames(3), [0, 1, 2], np.array([0.9, 0.1, 0.1]), 0.1, 0.0,
                       np.array([True, False, True]))
    msg_id = core.open_request(plan, 100, 0.0)
    core.request_sent(plan, msg_id, True, 100, 60, 40, 0.0)
    reply = wire.Reply(msg_id, "w", np.array([wire.UNKNOWN_CLASS, 1, 2], np.uint8),
                       np.array([0.0, 0.8, 0.7], np.float32), 1, 1, 1)
    outcomes = core.receive(reply, 0.5)
    assert [(o.frame, o.path, o.cls, o.unfamiliar) for o in outcomes] == [
        (0, "offload", UNKNOWN, True), (1, "offload", 1, False), (2, "offload", 2, True)]
    assert core.counts["unfamiliar.tail"] == 1 and not core.bad_replies
    assert core.receive(reply, 0.6) == []             # a second answer: nothing
    results = Results(None)
    results.add(outcomes)
    assert (results.summary.unknown, results.summary.unfamiliar) == (1, 2)
    # a class byte the model lacks, other than 255, is still not believed
    plan = core.decide(frames(1), [0], np.array([0.1]), 0.1, 1.0)
    msg_id = core.open_request(plan, 100, 1.0)
    core.request_sent(plan, msg_id, True, 100, 60, 40, 1.0)
    assert core.receive(wire.Reply(msg_id, "w", np.array([254], np.uint8),
                                   np.array([0.5], np.float32), 1, 1, 1), 1.1) == []
    assert core.bad_replies["class_range"] == 1


def test_the_controller_counts_flagged_frames_as_offloads():
    """Target 30 % offload, 20 % of the frames unfamiliar: the controller offloads only 10 %
    more by confidence, so the budget holds."""
    core = EdgeCore(0.5, 1.0, CLASSES, controller=ControllerConfig(target_offload=0.3,
                                                                   window=500))
    rng = np.random.default_rng(0)
    offloaded = total = 0
    for step in range(60):
        scores = rng.random(50)
        flagged = rng.random(50) < 0.2
        plan = core.decide(frames(50), [0] * 50, scores, 0.1, step * 0.1, flagged)
        if step >= 20:
            offloaded += len(plan.offload)
            total += 50
        if plan.offload:
            core.request_sent(plan, core.open_request(plan, 10, step * 0.1), True, 10, 5, 5,
                              step * 0.1)
    assert offloaded / total == pytest.approx(0.3, abs=0.03)


def test_while_the_server_is_cut_flagged_frames_are_shed_as_unknown_at_once():
    """An outage: the controller cuts the server's share to a probe trickle; flagged frames
    are answered unknown locally (no deadline, no bytes), and the probes stay its own."""
    core = EdgeCore(0.5, 1.0, CLASSES, controller=ControllerConfig(target_offload=0.3,
                                                                   window=200))
    rng = np.random.default_rng(1)
    core.decide(frames(100), [0] * 100, rng.random(100), 0.1, 0.0, rng.random(100) < 0.1)
    core.controller.refused("no_worker", 0.1)          # nobody serves
    assert core.controller.state is not State.TRACKING
    flagged = rng.random(100) < 0.1
    plan = core.decide(frames(100), [0] * 100, rng.random(100), 0.1, 0.2, flagged)
    shed = [o for o in plan.local if o.path == "fallback"]
    assert sorted(o.frame for o in shed) == np.flatnonzero(flagged).tolist()
    assert all(o.cls == UNKNOWN and o.reason == "shed" and o.unfamiliar for o in shed)
    assert not set(plan.offload) & set(np.flatnonzero(flagged).tolist())
    assert len(plan.offload) <= 0.3 * 100     # what goes is the controller's share


# -- real processes ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_tail(artifacts, tmp_path_factory) -> Path:
    """The tiny model with a tail that flags a fifth of familiar frames: `unknown` answers
    come back often enough to be seen on a few hundred frames."""
    folder = tmp_path_factory.mktemp("strict-tail")
    shutil.copytree(artifacts, folder, dirs_exist_ok=True)
    raw = load_edge(folder).config.to_dict()
    raw["calibrate"]["tail_unfamiliar_flag_rate"] = 0.2
    calibrate_dir(folder, from_dict(raw))
    return folder


def mixed_frames(idx_dir: Path, folder: Path) -> tuple[Path, np.ndarray]:
    """The generated test frames followed by the same frames inverted, as an IDX folder."""
    data = load_dataset(idx_dir)
    images = data.test.images.reshape(-1, 28, 28)
    folder.mkdir()
    for part, x, y in (("train", data.train.images.reshape(-1, 28, 28), data.train.labels),
                       ("t10k", np.concatenate([images, 255 - images]),
                        np.concatenate([data.test.labels, data.test.labels]))):
        write_idx(folder / f"{part}-images-idx3-ubyte", x.astype(np.uint8))
        write_idx(folder / f"{part}-labels-idx1-ubyte", y.astype(np.uint8))
    return folder, np.concatenate([images, 255 - images]).reshape(len(images) * 2, -1)


def test_unknown_answers_flow_end_to_end(system, strict_tail, idx_dir, tmp_path):  # noqa: F811
    folder, images = mixed_frames(idx_dir, tmp_path / "mixed")
    head = load_numpy_head(strict_tail)
    _, hidden = head.run_exit(images.astype(np.float32) / 255)
    _, flagged = head.unfamiliar(hidden)
    assert flagged[len(images) // 2:].mean() > 0.5      # inverted frames: mostly flagged
    acts = activations(load_model(strict_tail)[0], images.astype(np.float32) / 255)
    tail = tail_answers(acts, load_server(strict_tail).unfamiliarity)

    system.broker()
    system.workers(strict_tail, 1)
    outcomes = system.edge(strict_tail, data_dir=str(folder), dtype="float32", codec="none",
                           deadline_ms=5000)
    assert sorted(o["frame"] for o in outcomes) == list(range(len(images)))   # once each
    paths = Counter(o["path"] for o in outcomes)
    assert paths["fallback"] == 0
    unknown = 0
    for o in outcomes:
        i = o["frame"]
        assert o["unfamiliar"] == bool(flagged[i]), o
        if flagged[i]:
            assert o["path"] == "offload", o                 # never the exit's answer
        if o["path"] == "offload":                         # the tail's: a class or unknown
            assert o["cls"] == tail[i], o
            unknown += o["cls"] == -1
            assert (o["class_name"] == "unknown") == (o["cls"] == -1)
    assert unknown > 0 and any(o["cls"] == -1 and o["unfamiliar"] for o in outcomes)


def test_a_server_artifact_whose_score_does_not_fit_its_tail_is_refused(artifacts, tmp_path):
    blob = torch.load(artifacts / "server.pt", weights_only=True)
    blob["unfamiliar"]["means"] = blob["unfamiliar"]["means"][:, :-1]
    torch.save(blob, tmp_path / "server.pt")
    with pytest.raises(ArtifactError, match="unfamiliarity score is damaged.*calibrate"):
        load_server(tmp_path)
    blob = torch.load(artifacts / "server.pt", weights_only=True)
    blob["unfamiliar"]["threshold"] = float("nan")
    torch.save(blob, tmp_path / "server.pt")
    with pytest.raises(ArtifactError, match="not finite"):
        load_server(tmp_path)
