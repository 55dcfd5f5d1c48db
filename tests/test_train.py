import json

import pytest
import torch

from pipeline.model.artifacts import load_edge, load_model, load_server, save_artifacts
from pipeline.model.config import from_dict, load_config
from pipeline.errors import ArtifactError, ConfigError
from pipeline.model.split_model import SplitModel, describe
from pipeline.model.train import dataset, fit, predict, run


def test_training_is_reproducible_with_a_seed(tiny_config_path):
    cfg = load_config(str(tiny_config_path))
    data = dataset(cfg)
    a, _ = fit(cfg, data, progress=False)
    b, _ = fit(cfg, data, progress=False)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    cfg.train.seed = 1
    c, _ = fit(cfg, data, progress=False)
    assert not torch.equal(a.head.layers[0].weight, c.head.layers[0].weight)


def test_run_writes_loadable_artifacts_that_reassemble_the_model(tiny_config_path, tmp_path):
    cfg = load_config(str(tiny_config_path), ["train.epochs=5"])
    metrics = run(cfg, tmp_path, progress=False)
    # plain weights_only loading: no pickled code in either file
    for name in ("edge.pt", "server.pt"):
        blob = torch.load(tmp_path / name, weights_only=True)
        assert blob["model_id"] == metrics["model_id"]
    edge, server = load_edge(tmp_path), load_server(tmp_path)
    assert edge.threshold == metrics["calibration"]["threshold"]
    assert "tail" not in str(list(torch.load(tmp_path / "edge.pt", weights_only=True)
                                  ["state_dict"]))
    # head on the edge + tail on the server == the whole model
    model, _, _ = load_model(tmp_path)
    data = dataset(cfg)
    exit_logits, final_logits = predict(model, data.test)
    pixels = torch.from_numpy(data.test.images).float() / 255
    with torch.inference_mode():
        e, features = edge.head(pixels)
        torch.testing.assert_close(e, exit_logits)
        torch.testing.assert_close(server.tail(features), final_logits)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["calibration"]["test"]["full"] > 0.8  # learnable synthetic data
    t = saved["calibration"]["test"]
    assert 0.0 <= t["offload_ratio"] <= 1.0
    assert (tmp_path / "calibration.csv").is_file() and (tmp_path / "calibration.png").is_file()
    assert (tmp_path / "reliability.png").is_file()


def test_the_threshold_is_chosen_on_the_calibrated_score_every_edge_computes(artifacts):
    """The exit temperature fitted on validation travels with the threshold: the torch-free
    head scores a frame exactly as training did, so validation's offload ratio reproduces."""
    from pipeline.edge.numpy_head import exit_scores, load_numpy_head

    metrics = json.loads((artifacts / "metrics.json").read_text())
    c = metrics["calibration"]
    t_exit, t_tail = (c["confidence"][k]["temperature"] for k in ("exit", "final"))
    assert t_exit != 1.0 and t_tail != 1.0     # fitted, not the default
    head, server = load_numpy_head(artifacts), load_server(artifacts)
    assert (head.temperature, server.temperature) == (t_exit, t_tail)
    data = dataset(from_dict(metrics["config"]))
    exit_logits, _ = head(data.val.images.astype("float32") / 255)
    offload = float((exit_scores(exit_logits, head.score, head.temperature)
                     < head.threshold).mean())
    # One frame of the 200 may sit on the threshold (float32 sums in another order): 1.5, as
    # 0.505 - 0.5 exceeds 1 / 200 by a rounding error.
    assert offload == pytest.approx(c["validation"]["offload_ratio"], abs=1.5 / 200)


def test_paper_sparse_head_is_4x_smaller_and_cheaper_than_dense_twin(tmp_path):
    """Storage and MACs do not depend on training: compare freshly built artifacts."""
    sizes, macs = {}, {}
    for name in ("paper-sparse", "paper-dense"):
        cfg = load_config(name)
        model = SplitModel(cfg.model)
        sizes[name] = save_artifacts(tmp_path / name, model, cfg, 0.5, ["c"] * 10)["edge_bytes"]
        macs[name] = sum(r["macs"] for r in describe(model.head))
    assert sizes["paper-dense"] >= 4 * sizes["paper-sparse"]
    assert macs["paper-dense"] >= 4 * macs["paper-sparse"]
    assert macs == {"paper-sparse": 1600 + 400, "paper-dense": 32000 + 400}


def test_mismatched_and_corrupt_artifacts_are_one_line_errors(tiny_config_path, tmp_path):
    cfg = load_config(str(tiny_config_path))
    a, b = SplitModel(cfg.model), SplitModel(cfg.model)
    torch.nn.init.zeros_(b.tail.layers[0].bias)
    save_artifacts(tmp_path / "a", a, cfg, 0.5, ["c"] * 10)
    save_artifacts(tmp_path / "b", b, cfg, 0.5, ["c"] * 10)
    (tmp_path / "a" / "server.pt").write_bytes((tmp_path / "b" / "server.pt").read_bytes())
    with pytest.raises(ArtifactError, match="different trainings"):
        load_model(tmp_path / "a")
    (tmp_path / "b" / "edge.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="not a readable splitexit artifact"):
        load_edge(tmp_path / "b")
    with pytest.raises(ArtifactError, match="expected a edge artifact, found 'server'"):
        load_edge(tmp_path / "a" / "server.pt")
    with pytest.raises(ArtifactError, match="no such artifact"):
        load_server(tmp_path / "missing")


def test_the_weights_kept_are_a_moving_average_that_leaves_training_alone():
    """WeightAverage: each update moves the average toward the weights by 1 - decay, the
    decay ramping up so the initial weights are soon forgotten; inside swapped_in the model
    holds the average, and its own weights come back after."""
    from pipeline.model.train import WeightAverage

    layer = torch.nn.Linear(3, 2)
    average = WeightAverage(layer, decay=0.5)
    trained = [p.detach().clone() for p in layer.parameters()]
    expected = [t.clone() for t in trained]
    for step in range(1, 6):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        decay = min(0.5, (1 + step) / (10 + step))   # 0.1818.., 0.25, .., then 0.5
        expected = [e * decay + p.detach() * (1 - decay)
                    for e, p in zip(expected, layer.parameters())]
        average.update(layer)
    own = [p.detach().clone() for p in layer.parameters()]
    with average.swapped_in(layer):
        for p, e in zip(layer.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)
            assert not torch.equal(p.detach(), own[0 if p.dim() == 2 else 1])
    for p, o in zip(layer.parameters(), own):
        assert torch.equal(p.detach(), o)


def test_an_average_decay_outside_0_to_1_is_a_one_line_error(tiny_config_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.ema_decay = 1.0 must be in \[0, 1\) \(0: "
                                          r"keep the weights as trained"):
        load_config(tiny_config_path, ["train.ema_decay=1.0"])


def test_augmentation_flips_and_shifts_each_frame_on_its_own_draw():
    from pipeline.model.config import TrainConfig
    from pipeline.model.train import augment

    frames = torch.arange(2 * 3 * 4, dtype=torch.float).reshape(2, 12)   # two 1 x 3 x 4 frames
    t = TrainConfig(augment="flip+shift", shift=1)
    out = augment(frames, (1, 3, 4), t, torch.Generator().manual_seed(0)).reshape(2, 3, 4)
    again = augment(frames, (1, 3, 4), t, torch.Generator().manual_seed(0)).reshape(2, 3, 4)
    assert torch.equal(out, again)                                        # a seed decides
    # seed 0: the first frame flipped and moved up a row, the second moved down and right
    assert out[0].tolist() == [[7, 6, 5, 4], [11, 10, 9, 8], [0, 0, 0, 0]]
    assert out[1].tolist() == [[0, 0, 0, 0], [0, 12, 13, 14], [0, 16, 17, 18]]
    flipped = augment(frames, (1, 3, 4), TrainConfig(augment="flip"),
                      torch.Generator().manual_seed(3)).reshape(2, 3, 4)
    for frame, result in zip(frames.reshape(2, 3, 4), flipped):          # whole frames only
        assert torch.equal(result, frame) or torch.equal(result, frame.flip(-1))


def test_an_unknown_augmentation_is_a_one_line_error(tiny_config_path):
    with pytest.raises(ConfigError, match="train.augment = 'rotate': choose one of none, flip, "
                                        "shift, flip\\+shift"):
        load_config(str(tiny_config_path), ["train.augment='rotate'"])


def _memorizable(folder):
    """The generated frames with their training labels shuffled: nothing to learn but the
    training set by heart, so the validation objective gets worse after the first epochs."""
    import numpy as np

    from pipeline.floor.data import read_idx, write_idx
    from tests.conftest import make_idx_dataset

    make_idx_dataset(folder, n_train=1000, n_test=100)
    labels = folder / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.random.default_rng(0).permutation(read_idx(labels)))
    return folder


def test_training_stops_once_validation_stops_improving_and_keeps_the_best_epoch(tmp_path):
    """patience 0 runs the whole schedule and records the validation objective per epoch;
    with patience the same training (same seeds) stops where stop_now says on that curve,
    keeps the best epoch of what it ran, and, that being the whole run's best, the very same
    weights; metrics.json and the report say so."""
    from pipeline.model.report import format_report
    from pipeline.model.train import stop_now
    from tests.conftest import TINY_CONFIG

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_CONFIG + f'\n[data]\ndir = "{_memorizable(tmp_path / "idx")}"\n')
    overrides = ["train.epochs=24", "train.select_by='loss'", "train.lr=0.01"]
    cfg = load_config(str(path), overrides + ["train.patience=0"])
    data = dataset(cfg)
    whole, _ = fit(cfg, data, progress=False)
    curve, total, per_epoch = whole.epochs["val_objective"], 24 * 15, 15  # 950 / 64 -> 15
    # the best of the first e epochs (ties: the later one, as fit keeps)
    best = [1 + min(range(e), key=lambda i: (curve[i], -i)) for e in range(1, 25)]
    assert whole.epochs == {"run": 24, "best": best[-1], "scheduled": 24,
                            "stopped_early": False, "stopped_at_step": None,
                            "scheduled_steps": total, "val_objective": curve}
    expected = next(e for e in range(1, 25)
                    if stop_now(0.25, e * per_epoch, best[e - 1] * per_epoch, total))
    assert expected < 24 and best[expected - 1] == best[-1]

    metrics = run(load_config(str(path), overrides + ["train.patience=0.25"]), tmp_path / "o",
                  progress=False)
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    e = saved["train_epochs"]
    assert e == {"run": expected, "best": whole.epochs["best"], "scheduled": 24,
                 "stopped_early": True, "stopped_at_step": expected * per_epoch,
                 "scheduled_steps": total}
    assert saved["train_val_objective"] == curve[:expected]
    stopped, _, _ = load_model(tmp_path / "o")
    for (name, a), b in zip(whole.state_dict().items(), stopped.state_dict().values()):
        assert torch.equal(a, b), name
    assert (f"epoch {e['best']} of {expected} kept, stopped early at step "
            f"{expected * per_epoch} of {total}") in format_report(metrics)
