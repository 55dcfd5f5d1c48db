import pytest

from pipeline.model.config import CONFIG_DIR, from_dict, load_config
from pipeline.errors import ConfigError
from pipeline.model.split_model import SplitModel

MODEL = {"widths": [800, 40, 40, 10], "fan_out": [2, 9, 10], "input_pad": 800}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.toml")
                                        if p.stem != "prometheus"))
def test_shipped_configs_load_and_build(name):
    cfg = load_config(name)
    SplitModel(cfg.model)


def one_line_error(raw, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(raw)
    assert "\n" not in str(e.value)


def test_unknown_key_is_named():
    one_line_error({"model": MODEL, "train": {"epoch": 3}}, "unknown key 'epoch' in \\[train\\]")


def test_unknown_section_is_named():
    one_line_error({"model": MODEL, "trian": {}}, "unknown section \\[trian\\]")


def test_wrong_type_is_named():
    one_line_error({"model": MODEL, "train": {"lr": "fast"}}, "train.lr = 'fast' must be")
    one_line_error({"model": dict(MODEL, widths=[800, 40.5, 10])}, "list of integers")


def test_missing_layout():
    one_line_error({"model": {"widths": [800, 40, 10]}}, "needs fan_out")


def test_split_must_leave_a_tail():
    one_line_error({"model": dict(MODEL, split=3)}, "split = 3 must leave")


def test_first_width_must_match_padded_input():
    one_line_error({"model": dict(MODEL, input_pad=0)}, "set input_pad = 800")


def test_impossible_fan_out_in_a_config_names_the_junction():
    cfg = from_dict({"model": dict(MODEL, fan_out=[7, 4, 10], widths=[800, 30, 40, 10])})
    with pytest.raises(ConfigError, match="layer1: junction 800->30 cannot have fan-out 7.*"
                                          "pad the input to"):
        SplitModel(cfg.model)
    cfg = from_dict({"model": dict(MODEL, fan_out=[2, 7, 10], widths=[800, 40, 30, 10])})
    with pytest.raises(ConfigError, match="layer2: .*make the layer before it 60 wide"):
        SplitModel(cfg.model)


def test_overrides_and_bare_words(tmp_path):
    cfg = load_config("paper-sparse", ["train.epochs=3", "calibrate.policy=max_drop",
                                        "model.fan_out=[2, 9, 10]"])
    assert cfg.train.epochs == 3 and cfg.calibrate.policy == "max_drop"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("paper-sparse", ["epochs=3"])
    with pytest.raises(ConfigError, match="calibrate.policy = 'sometimes'"):
        load_config("paper-sparse", ["calibrate.policy=sometimes"])


def test_an_older_configs_validation_size_reads_as_exactly_that_many_images():
    """Trained folders keep their config: one written before val_fraction still loads and
    splits its data as it did (val_size images, no fraction)."""
    raw = load_config("paper-sparse").to_dict()
    for key in ("val_fraction", "val_min"):
        del raw["train"][key]
    raw["train"]["val_size"] = 5000
    t = from_dict(raw).train
    assert (t.val_fraction, t.val_min) == (0.0, 5000)


def test_the_schedule_is_in_steps_unless_epochs_are_asked_for():
    assert load_config("paper-sparse").train.steps == 8600    # 40 epochs of 55 000
    assert load_config("paper-sparse", ["train.epochs=3"]).train.epochs == 3
    with pytest.raises(ConfigError, match="train.steps = 0"):
        load_config("paper-sparse", ["train.steps=0"])


def test_early_stopping_is_on_by_default_and_its_patience_a_fraction_below_1():
    """0 runs the whole schedule; 1 would never stop (no plateau is as long as all the
    training before it), a negative one would stop at once: both are refused in one line."""
    assert load_config("paper-sparse").train.patience == pytest.approx(1 / 3)
    assert load_config("paper-sparse", ["train.patience=0"]).train.patience == 0.0
    for bad in ("1", "-0.1"):
        with pytest.raises(ConfigError, match=rf"train.patience = {float(bad)} must be in "
                                              rf"\[0, 1\)") as e:
            load_config("paper-sparse", [f"train.patience={bad}"])
        assert "\n" not in str(e.value)


def test_missing_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match="paper-sparse"):
        load_config("no-such-config")


def test_invalid_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nwidths = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


BOTTLENECK = {"widths": [800, 400, 32, 100, 10], "fan_out": [2, 4, 100, 10], "input_pad": 800,
              "split": 2, "exit_at": 1, "uplink_bits": 4}


def test_a_bottleneck_config_builds_its_exit_on_the_wide_layer():
    model = SplitModel(from_dict({"model": BOTTLENECK}).model)
    assert model.head.exit.in_features == 400 and model.tail.layers[0].in_features == 32


@pytest.mark.parametrize("change,match", [
    ({"exit_at": 3}, "model.exit_at = 3 must be a layer on the edge: 1..2"),
    ({"exit_at": -1}, "model.exit_at = -1 must be a layer on the edge"),
    ({"uplink_bits": 3}, "model.uplink_bits = 3: choose 0 .* or one of 8, 4, 2"),
    ({"fan_out": [2, 5, 100, 10]}, "layer2: junction 400->32 cannot have fan-out 5"),
])
def test_bad_bottleneck_settings_are_one_line(change, match):
    with pytest.raises(ConfigError, match=match) as e:
        SplitModel(from_dict({"model": dict(BOTTLENECK, **change)}).model)
    assert "\n" not in str(e.value)


def test_a_negative_rate_weight_is_one_line():
    one_line_error({"model": MODEL, "train": {"rate_weight": -0.1}}, "rate_weight >= 0")


@pytest.mark.parametrize("line,match", [
    ("lr = nan", r"train.lr = nan must be a finite number"),
    ("lr = inf", r"train.lr = inf must be a finite number"),
    ("weight_decay = nan", r"train.weight_decay = nan must be a finite number"),
    ("label_smoothing = 5", r"train.label_smoothing = 5.0 must be in \[0, 1\)"),
    ("lr = 1e6", r"train.lr = 1000000.0 must be in \[0.0, 10.0\]"),
    ("batch_size = 1_000_000_000_000", r"train.batch_size = 1000000000000 must be in \[1, "),
])
def test_non_finite_or_out_of_range_train_values_are_one_line(tmp_path, line, match):
    """#25 finding 10: these passed validation and ended in tracebacks during training."""
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nwidths = [800, 40, 40, 10]\nfan_out = [2, 9, 10]\n"
                    f"input_pad = 800\n[train]\n{line}\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change,match", [
    ({"widths": [800, 10**13, 40, 10]}, r"model.widths = .* at most 16777216"),
    ({"input_shape": [1, 100000, 100000]}, r"model.input_shape = .* sides in \[1, 2048\]"),
    ({"widths": [2048 * 2048, 65536, 40, 10], "fan_out": [65536, 9, 10], "input_pad": 0,
      "input_shape": [1, 2048, 2048]}, r"junction 1 \(4194304->65536, fan-out 65536\) has"),
])
def test_a_layout_too_large_to_build_is_refused_at_once(change, match):
    """A width of 10^13 searched fan-outs for minutes; now it is one line, at once."""
    one_line_error({"model": dict(MODEL, **change)}, match)
