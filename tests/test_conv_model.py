"""Conv split models from a config: predefined-sparse conv layers on the edge, a conv tail on
the server, colour frames of any size, and the user's own image folders -- trained through
the CLI and served by `up`."""

import json
import tomllib

import numpy as np
import pytest
import torch

from pipeline.edge.numpy_head import load_numpy_head
from pipeline.errors import ConfigError
from pipeline.model.artifacts import save_artifacts
from pipeline.model.config import apply_overrides, from_dict
from pipeline.model.split_model import SplitModel, describe
from pipeline.floor.frames import to_pixels
from tests.conftest import free_port
from tests.image_sets import write_colour_set
from tests.test_cli import splitexit

# Colour 24 x 32 frames; a sparse conv 8->16 (each input channel feeds 4 of 16: 2 in per out),
# a 1x1 bottleneck 16->4 after the exit, a conv and a linear layer on the server.
#   3x24x32 -conv,pool-> 8x12x16 -sparse conv,pool-> 16x6x8 -exit (pooled to 2x2)
#                                                           -bottleneck-> 4x6x8 = 192 sent
#   server: -conv,pool-> 16x3x4 = 192 -> 3 classes
CONV_CONFIG = """
[model]
name = "tiny-conv"
input_shape = [3, 24, 32]
resize = "stretch"
channels        = [8, 16, 4, 16]
channel_fan_out = [8, 4, 2, 16]
kernel          = [3, 3, 1, 3]
pool            = [2, 2, 1, 2]
split = 3
exit_at = 2
exit_pool = 2
widths = [192, 3]
fan_out = [3]
uplink_bits = 4

[train]
epochs = 12
batch_size = 16
lr = 0.01
val_fraction = 0.2
val_min = 20

[calibrate]
target_offload = 0.3
"""


def conv_config(*overrides: str):
    return from_dict(apply_overrides(tomllib.loads(CONV_CONFIG), overrides))


def test_a_conv_layout_is_checked_layer_by_layer_with_the_number_to_use():
    for override, match in [
        ("model.widths=[100, 3]", r"widths\[0\] = 100 must be the last conv's output "
                                  r"flattened: 16 x 3 x 4 = 192"),
        ("model.kernel=[3, 3]", "model.kernel has 2 entries: give one per conv"),
        ("model.channel_fan_out=[8, 3, 2, 16]", "layer2: conv 8->16 channels cannot have "
                                                "channel fan-out 3.*valid fan-outs nearby"),
        ("model.pool=[8, 8, 1, 2]", "conv 2 gets a 3 x 4 input.*shrink to nothing"),
        ("model.input_shape=[2, 24, 32]", "1 \\(grey\\) or 3 \\(colour\\) channels"),
        ("model.resize='squash'", "model.resize = 'squash': choose one of stretch, crop"),
        ("model.input_pad=3000", "a conv model reads them as an image: set it to 0"),
        ("model.exit_pool=7", "exit_pool = 7 is larger than the 6 x 8 layer"),
        ("model.exit_at=4", "exit_at = 4 must be a layer on the edge"),
        ("model.split=5", "split = 5 must leave at least one layer on each side: choose 1..4"),
    ]:
        with pytest.raises(ConfigError, match=match) as e:
            SplitModel(conv_config(override).model)
        assert "\n" not in str(e.value)


def test_features_cross_flat_and_the_tail_reads_them_as_the_split_layers_map():
    cfg = conv_config()
    model = SplitModel(cfg.model).eval()
    pixels = torch.rand(5, 3 * 24 * 32)
    exit_logits, features, final_logits = model.run(pixels)
    assert exit_logits.shape == final_logits.shape == (5, 3)
    assert features.shape == (5, cfg.model.split_width) == (5, 4 * 6 * 8)
    assert model.tail.feature_shape == (4, 6, 8)


def test_macs_and_stored_weights_count_only_the_real_kernels():
    sparse = {r["junction"]: r for r in describe(SplitModel(conv_config().model).head)}
    dense = {r["junction"]: r for r in describe(
        SplitModel(conv_config("model.channel_fan_out=[8, 16, 4, 16]").model).head)}
    # layer 2: 16 outputs x 2 of 8 input channels x 3x3 kernels x 12x16 output pixels
    assert sparse["layers.1"]["macs"] == 16 * 2 * 9 * 12 * 16
    assert sparse["layers.1"]["weights"] == 16 * 2 * 9 and sparse["layers.1"]["density"] == 0.25
    assert dense["layers.1"]["macs"] == 4 * sparse["layers.1"]["macs"]
    # the 1x1 bottleneck reads 8 of 16 channels; the exit 16 x 2 x 2 pooled values
    assert sparse["layers.2"]["macs"] == 4 * 8 * 6 * 8
    assert sparse["exit"]["n_in"] == 16 * 2 * 2
    assert sparse["layers.0"]["macs"] == dense["layers.0"]["macs"] == 8 * 3 * 9 * 24 * 32


def conv_artifact(folder, *overrides: str):
    """An untrained conv model (conv_config) saved as artifacts in `folder`, its weights,
    biases and per-channel standardization moved off their initial values (a trained head's
    are not symmetric); (its config, the model)."""
    cfg = conv_config(*overrides)
    torch.manual_seed(1)
    model = SplitModel(cfg.model).eval()
    with torch.no_grad():
        model.head.pixel_mean.uniform_(0.3, 0.6)
        model.head.pixel_std.uniform_(0.2, 0.3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_artifacts(folder, model, cfg, 0.5, ["a", "b", "c"])
    return cfg, model


@pytest.mark.parametrize("override", [[], ["model.channel_fan_out=[8, 16, 4, 16]"],
                                      ["model.exit_pool=0", "model.exit_fan_out=0"],
                                      ["model.exit_pool=5", "model.stride=[2, 1, 1, 1]",
                                       "model.pool=[1, 2, 1, 2]", "model.widths=[96, 3]",
                                       "model.split=2",
                                       "model.exit_at=0", "model.input_shape=[1, 28, 20]"]],
                         ids=["sparse", "dense", "unpooled-exit", "strided-grey"])
def test_the_numpy_head_computes_what_torch_computes(tmp_path, override):
    cfg, model = conv_artifact(tmp_path, *override)
    head = load_numpy_head(tmp_path)
    pixels = np.random.default_rng(0).random((4, cfg.model.input_size), dtype=np.float32)
    exit_logits, features = head(pixels)
    with torch.inference_mode():
        torch_exit, torch_features = model.head(torch.from_numpy(pixels))
    np.testing.assert_allclose(exit_logits, torch_exit.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features, torch_features.numpy(), rtol=1e-4, atol=1e-4)
    assert head.width == cfg.model.split_width and head.input_shape == tuple(
        cfg.model.input_shape)
    r = splitexit("export", str(tmp_path), "--target", "c", "--out", str(tmp_path / "c"))
    assert r.returncode == 0 and (tmp_path / "c" / "splitexit_head.c").is_file(), r.stderr
    r = splitexit("export", str(tmp_path), "--target", "onnx", "--out", str(tmp_path / "onnx"))
    assert r.returncode == 0 and (tmp_path / "onnx" / "splitexit_head.onnx").is_file(), r.stderr


def test_a_colour_image_folder_trains_through_the_cli_and_up_serves_it(tmp_path):
    """The whole user path: pictures in one folder per class, a conv config, `splitexit
    train`, then `splitexit up` replaying the folder's test split through edges and workers."""
    data = tmp_path / "pictures"
    classes = write_colour_set(data, classes=3, per_class=80, size=(48, 36))
    config = tmp_path / "conv.toml"
    config.write_text(CONV_CONFIG)
    art = tmp_path / "art"
    r = splitexit("train", str(config), "--data", str(data), "--out", str(art), "--quiet")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((art / "metrics.json").read_text())
    test = metrics["calibration"]["test"]
    assert test["full"] >= 0.8 and test["split_exit"] >= 0.8, test   # chance: 1/3
    edge = load_numpy_head(art)
    assert edge.classes == tuple(sorted(classes)) and edge.input_shape == (3, 24, 32)

    r = splitexit("up", "--artifacts", str(art), "--fps", "0", "--run-dir", str(tmp_path / "up"),
                  "--deadline-ms", "5000", "--metrics-port", str(free_port()),
                  "--frontend", f"tcp://127.0.0.1:{free_port()}",
                  "--backend", f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "up" / "report.json").read_text())
    assert report["frames"] == report["unique_frames"] == 3 * 16   # the folder's test split
    assert report["paths"].get("fallback", 0) == 0 and report["paths"]["offload"] > 0
    assert report["accuracy"] == pytest.approx(test["split_exit"], abs=0.05)
    assert report["raw_frame_bytes"] == 3 * 24 * 32


def test_the_edge_fits_a_camera_frame_to_the_models_input(tmp_path):
    """A BGR frame of any size becomes the model's 3 x 24 x 32 RGB pixels, the same way the
    training folder's pictures did."""
    from pipeline import Edge

    cfg = conv_config()
    model = SplitModel(cfg.model).eval()
    save_artifacts(tmp_path, model, cfg, 0.0, ["a", "b", "c"])   # threshold 0: always sure
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[..., 2] = 255                                           # pure red in BGR
    pixels = to_pixels(frame, (3, 24, 32))
    assert pixels.reshape(3, 24, 32)[0].min() == 1.0 and pixels.reshape(3, 24, 32)[1:].max() == 0
    with Edge(tmp_path, broker=f"tcp://127.0.0.1:{free_port()}") as edge:
        answer = edge.classify(frame)
    head = load_numpy_head(tmp_path)
    logits, _ = head.run_exit(pixels[None])
    assert answer.cls == int(logits.argmax()) and answer.sure
    with pytest.raises(ValueError, match="2304 of them"):
        edge.classify(np.zeros(784, np.float32))


def test_a_folder_trained_before_conv_layouts_existed_keeps_its_model_id(artifacts, tmp_path,
                                                                          idx_dir):
    """Its stored [model] has none of the conv keys; its id hashed that section as stored, so
    recalibrating it (which checks the id against the weights) still works."""
    from pipeline.model.artifacts import compute_model_id, load_model
    from pipeline.model.train import calibrate_dir

    new_keys = ("input_shape", "resize", "channels", "channel_fan_out", "kernel", "stride",
                "pool", "exit_pool")
    model, edge, _ = load_model(artifacts)
    old_layout = {k: v for k, v in edge.layout.items() if k not in new_keys}
    old_id = compute_model_id(model, old_layout)
    for name in ("edge.pt", "server.pt"):
        blob = torch.load(artifacts / name, weights_only=True)
        blob["config"]["model"], blob["model_id"] = old_layout, old_id
        torch.save(blob, tmp_path / name)
    metrics = calibrate_dir(tmp_path, edge.config, str(idx_dir))
    assert load_numpy_head(tmp_path).model_id == old_id
    assert metrics["calibration"]["threshold"] > 0


def test_the_docs_conv_config_is_valid_and_its_error_example_is_what_a_user_sees():
    from tests.conftest import ROOT

    readme = (ROOT / "docs" / "conv-heads.md").read_text()
    block = readme[readme.index("```toml\n[model]\ninput_shape") + len("```toml\n"):]
    raw = tomllib.loads(block[:block.index("```")])
    model = SplitModel(from_dict(raw).model)
    assert model.head(torch.rand(2, 3 * 96 * 128))[1].shape == (2, 4 * 12 * 16)
    raw["model"]["widths"][0] = 100
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert f"`{e.value}`" in readme.replace("\n", " ")
