import numpy as np
import pytest
import torch

from pipeline.model import calibrate as cal
from pipeline.model.config import CalibrationConfig


def synthetic(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    exit_correct = rng.random(n) < 0.5 + 0.5 * scores  # confident exits are right more often
    final_correct = rng.random(n) < 0.9
    return scores, exit_correct, final_correct


def test_sweep_matches_brute_force():
    scores, e, f = synthetic(300)
    scores = np.round(scores, 2)  # ties
    result = cal.sweep(scores, e, f)
    for t, off, acc in zip(result.thresholds, result.offload, result.accuracy):
        brute_acc, brute_off = cal.split_accuracy(scores, e, f, t)
        assert off == pytest.approx(brute_off) and acc == pytest.approx(brute_acc)
    assert result.offload[-1] == 1.0 and result.accuracy[-1] == pytest.approx(f.mean())


@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.75, 1.0])
def test_offload_policy_hits_its_target(target):
    scores, e, f = synthetic()
    t = cal.choose_threshold(cal.sweep(scores, e, f),
                             CalibrationConfig(policy="offload", target_offload=target))
    _, offload = cal.split_accuracy(scores, e, f, t)
    assert offload == pytest.approx(target, abs=1 / len(scores))


@pytest.mark.parametrize("max_drop", [0.0, 0.5, 2.0, 10.0])
def test_max_drop_policy_meets_its_bound_with_least_offload(max_drop):
    scores, e, f = synthetic()
    result = cal.sweep(scores, e, f)
    t = cal.choose_threshold(result, CalibrationConfig(policy="max_drop", max_drop=max_drop))
    acc, offload = cal.split_accuracy(scores, e, f, t)
    assert acc >= f.mean() - max_drop / 100 - 1e-12
    cheaper = result.offload < offload
    assert np.all(result.accuracy[cheaper] < f.mean() - max_drop / 100)


@pytest.mark.parametrize("score", ["max_softmax", "margin", "entropy"])
def test_scores_are_in_unit_range_and_rank_confidence(score):
    logits = torch.tensor([[10.0, 0, 0], [1.0, 0.9, 0.8], [0.0, 0, 0]])
    s = cal.exit_scores(logits, score)
    assert np.all((s >= 0) & (s <= 1))
    assert s[0] > s[1] >= s[2]


def test_csv_and_plot(tmp_path):
    result = cal.sweep(*synthetic())
    cal.write_csv(tmp_path / "s.csv", result, max_rows=50)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "threshold,offload_ratio,accuracy" and len(lines) == 51
    assert cal.write_plot(tmp_path / "s.png", result, 0.5, "t")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
