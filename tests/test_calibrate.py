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


def calibrated_logits(n=20_000, classes=10, temperature=1.0, seed=0):
    """Logits whose softmax is the true class distribution, then multiplied by `temperature`
    (overconfident above 1): labels are drawn from softmax(z), so dividing the logits by the
    same temperature calibrates them, by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.5, (n, classes))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z * temperature, labels


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_overconfident_ones():
    z, y = calibrated_logits()
    assert cal.expected_calibration_error(z, y) < 0.02
    assert cal.expected_calibration_error(z * 3, y) > 0.1   # too sure of itself
    # dividing the logits back by the same factor undoes it
    assert cal.expected_calibration_error(z * 3, y, temperature=3) < 0.02


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_fit_temperature_recovers_the_temperature_that_was_applied(temperature):
    z, y = calibrated_logits(temperature=temperature, seed=1)
    assert cal.fit_temperature(z, y) == pytest.approx(temperature, rel=0.05)


def test_calibrated_nll_ignores_overconfidence_but_not_wrong_answers():
    """What training keeps an epoch by: the same logits, overconfident by any factor, are
    worth the same once their temperature is fitted; shuffled labels are worth less."""
    z, y = calibrated_logits(seed=4)
    raw = cal._nll(z * 3, y, 1.0)
    assert cal.calibrated_nll(z * 3, y) == pytest.approx(cal.calibrated_nll(z, y), rel=1e-4)
    assert cal.calibrated_nll(z * 3, y) < raw
    assert cal.calibrated_nll(z, np.random.default_rng(5).permutation(y)) \
        > cal.calibrated_nll(z, y) + 0.5


def test_calibration_quality_reports_the_test_ece_before_and_after():
    zv, yv = calibrated_logits(temperature=2.5, seed=2)   # overconfident
    zt, yt = calibrated_logits(temperature=2.5, seed=3)
    q = cal.calibration_quality(zv, yv, zt, yt)
    assert q["temperature"] == pytest.approx(2.5, rel=0.05) and q["ece_bins"] == cal.ECE_BINS
    assert q["test_ece_after"] < q["test_ece_before"] / 2


def test_the_ece_floor_is_what_a_calibrated_classifier_shows_on_as_many_frames():
    """Calibrated by construction, its ECE is noise: about the floor, and the floor shrinks
    with more frames (as 1/sqrt(n))."""
    small, labels = calibrated_logits(n=2_000, seed=4)
    floor = cal.ece_floor(small)
    assert 0 < floor < 0.05
    assert cal.expected_calibration_error(small, labels) < 3 * floor
    large, _ = calibrated_logits(n=50_000, seed=4)
    assert cal.ece_floor(large) < floor / 3
