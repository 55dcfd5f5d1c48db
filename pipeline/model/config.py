"""Model, training and calibration settings, loaded from TOML into dataclasses.

A TOML file has the sections [model], [train], [calibrate] and [data]; every key is a field
below, every field has a default except the layer layout. Unknown keys and wrong types are
errors (a typo must not silently train the wrong model). Command-line overrides use the same
names: `--set train.epochs=5`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.floor.data import FASHION_MNIST_DIR
from pipeline.floor.edge_artifact import (MAX_ARRAY_BYTES, MAX_KERNEL, MAX_LAYERS, MAX_SIDE,
                                          MAX_WIDTH)
from pipeline.floor.frames import RESIZE_MODES
from pipeline.floor.scores import SCORES
from pipeline.floor.splits import VAL_FRACTION, VAL_MIN
from pipeline.floor.unfamiliar import FORMS as UNFAMILIAR_FORMS
from pipeline.protocol.wire import MAX_CLASSES

__all__ = ["ModelConfig", "TrainConfig", "CalibrationConfig", "DataConfig", "Config",
           "load_config", "apply_overrides", "CONFIG_DIR", "resolve_config_path"]

# Shipped inside the package (a wheel has no checkout around it); `configs/` in a checkout is
# a link to the same folder.
CONFIG_DIR = Path(str(resources.files("pipeline") / "configs"))
POLICIES = ("offload", "max_drop")
SELECT_BY = ("calibrated_loss", "loss")   # train.select_by: how the epoch kept is chosen
AUGMENTS = ("none", "flip", "shift", "flip+shift")   # train.augment
UPLINK_BITS = (8, 4, 2)   # what model.uplink_bits may train for (pipeline/model/uplink.py)
# Upper bounds: a typo (a width of 10^13) is refused at once, not after minutes of searching
# fan-outs or a MemoryError. (key, lowest, highest) for [train]; the layout's in _check_layout.
TRAIN_RANGES = (("lr", 0.0, 10.0), ("weight_decay", 0.0, 10.0), ("exit_weight", 0.0, 1e3),
                ("rate_weight", 0.0, 1e3), ("steps", 1, 10**9), ("epochs", 0, 10**6),
                ("batch_size", 1, 1 << 20), ("shift", 0, MAX_SIDE))
MAX_WEIGHTS = MAX_ARRAY_BYTES // 4   # float32 weights in one layer: what edge.npz may hold


@dataclass
class ModelConfig:
    # Neurons per fully connected layer: [input, hidden..., classes]. The input is the padded
    # pixels of an MLP, or the last conv's output flattened (channels x height x width).
    widths: list[int]
    fan_out: list[int]         # per junction; equal to the next width means dense
    name: str = "model"
    # Frames are fitted to channels x height x width (1: grey, 3: colour) the same way in
    # training and on the edge (pipeline/floor/frames.py); `resize`: stretch or crop.
    input_shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    resize: str = "stretch"
    input_size: int = 0        # pixels per frame; 0 = channels x height x width
    input_pad: int = 0         # zero-pad the input to this width (paper: 800); 0 = no padding
    # Convolutions before the fully connected layers, one entry each (none: an MLP). A conv
    # keeps the frame's size ("same" padding) unless strided; it is followed by a ReLU and,
    # where pool > 1, a max pool of that side.
    channels: list[int] = field(default_factory=list)         # output channels
    channel_fan_out: list[int] = field(default_factory=list)  # = channels: dense
    kernel: list[int] = field(default_factory=list)           # side; empty = 3 each
    stride: list[int] = field(default_factory=list)           # empty = 1 each
    pool: list[int] = field(default_factory=list)             # empty = 1 each (no pool)
    # Layers (convs, then junctions) on the edge; the uplink sends layer `split`'s output.
    split: int = 1
    exit_fan_out: int = 0      # exit classifier fan-out; 0 = dense
    # The layer the exit reads; 0 = the split layer. Smaller puts the exit before the split:
    # the layers from it to the split (a bottleneck) run only for frames sent up.
    exit_at: int = 0
    # A conv layer's output is average-pooled to exit_pool x exit_pool before the exit
    # classifier reads it (0: read all of it).
    exit_pool: int = 0
    # 0: the uplink is not trained for (the edge sends int8 unless told otherwise); 8, 4 or
    # 2: trained through the wire's unsigned quantization at that many bits, which the edge
    # then sends (pipeline/model/uplink.py).
    uplink_bits: int = 0
    seed: int = 0              # connectivity seed (patterns are drawn once, stored in the file)

    @property
    def exit_layer(self) -> int:
        """The layer the exit classifier reads (1 = the first hidden layer)."""
        return self.exit_at or self.split

    @property
    def split_width(self) -> int:
        """Features per frame the uplink sends: layer `split`'s output, flattened."""
        convs = len(self.channels)
        if self.split > convs:
            return self.widths[self.split - convs]
        return math.prod(conv_shapes(self)[self.split])

    @property
    def layers(self) -> int:
        """Convs and junctions, the final classifier included (not the exit)."""
        return len(self.channels) + len(self.fan_out)


@dataclass
class TrainConfig:
    # The schedule in optimizer steps, not epochs, so that it does not depend on having
    # 55 000 images (8 600 steps = 40 epochs of them at batch 256); the weights kept are
    # those of the epoch best on validation. epochs > 0 (`--epochs`): that many instead.
    steps: int = 8600
    epochs: int = 0
    batch_size: int = 256
    lr: float = 3e-3           # AdamW peak, cosine-decayed per step to 0
    weight_decay: float = 1e-4  # decoupled L2 (AdamW)
    exit_weight: float = 1.0   # loss = exit_weight * CE(exit) + CE(final)
    label_smoothing: float = 0.0
    # Each training frame, each step: flipped left-right with probability 1/2 (flip), and/or
    # moved by up to `shift` pixels each way, zeros filling in (shift); none: as stored.
    augment: str = "none"
    shift: int = 2
    # The weights evaluated and kept are an exponential moving average of the trained ones
    # (pipeline.model.train.WeightAverage): over about the last ninth of the steps so far, and
    # at most 1 / (1 - ema_decay) steps; 0 = the weights as trained.
    ema_decay: float = 0.999
    # The epoch kept is the one with the lowest validation objective, its cross-entropy
    # taken after each classifier's temperature (calibrated_loss) or as trained (loss); see
    # pipeline.model.train._validation_loss.
    select_by: str = "calibrated_loss"
    # Early stopping (pipeline.model.train.stop_now): stop once the last `patience` of the
    # steps so far, and at least 5 % of the schedule, brought no better validation objective
    # than the epoch kept; 0 = run the whole schedule. A fraction of the steps so far, not a
    # fixed count (the "patience increase" of the deeplearning.net tutorials): a plateau a
    # third as long as all the training so far is evidence it is over, a few epochs' one
    # early on is noise. 1/3: on full Fashion-MNIST a stop before the schedule's end needs
    # the best epoch to be 26 of 40 or earlier; the earliest kept in the runs measured is 31
    # (paper-dense, whose last 9 epochs bring nothing better: a fixed patience of 6 epochs
    # would cut it). 4 000 images keep epoch 34-103 of 574 and stop 29-52 epochs later: the
    # same model in 0.13-0.17 of the training time (docs/training.md, "When training stops").
    patience: float = 1 / 3
    # Weight of the mean |split feature| in the loss: a rate penalty that trades accuracy for
    # sparser features, which the uplink's static code sends in fewer bits. 0 = off.
    rate_weight: float = 0.0
    # Held out from train for early stopping and calibration (test stays untouched): this
    # fraction of the training images, at least val_min (5 000 of Fashion-MNIST's 60 000);
    # val_fraction = 0: exactly val_min. (An older config's val_size = N reads as 0 and N.)
    val_fraction: float = VAL_FRACTION
    val_min: int = VAL_MIN
    seed: int = 0              # weights, shuffling, validation split


@dataclass
class CalibrationConfig:
    score: str = "max_softmax"  # exit confidence: max_softmax | margin | entropy
    policy: str = "offload"    # offload: hit target_offload; max_drop: lose <= max_drop points
    target_offload: float = 0.3  # fraction of frames sent to the server
    max_drop: float = 0.5      # accuracy points below the full model, on validation
    # Frames unlike the training set (pipeline.floor.unfamiliar): the share of familiar
    # validation frames the edge's score flags (never answered by the exit: offloaded), and
    # the tail's (answered `unknown`); 0 turns either off. The tail sees the hard frames, so
    # its rate is small: each flag it raises on a familiar frame is an answer lost (default
    # MLP: 0.002 costs 0.12 points of split+exit on test, 0.005 costs 0.41).
    unfamiliar_flag_rate: float = 0.05
    tail_unfamiliar_flag_rate: float = 0.002
    unfamiliar_form: str = "auto"   # auto | full | diagonal covariance


# In a training folder: the config it was trained with (under "config") and its results.
METRICS_FILE = "metrics.json"


@dataclass
class DataConfig:
    dir: str = FASHION_MNIST_DIR  # folder with the four IDX(.gz) files


@dataclass
class Config:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrationConfig = field(default_factory=CalibrationConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        m, t, c = self.model, self.train, self.calibrate
        _check_layout(m)
        if m.widths[-1] > MAX_CLASSES:
            raise ConfigError(f"model.widths[-1] = {m.widths[-1]} classes: the wire names a "
                              f"class in one byte, at most {MAX_CLASSES} (255 is `unknown`)")
        if not 1 <= m.split <= m.layers - 1:
            raise ConfigError(f"model.split = {m.split} must leave at least one layer on each "
                              f"side: choose 1..{m.layers - 1}")
        if m.exit_pool < 0 or m.exit_pool and m.exit_layer > len(m.channels):
            raise ConfigError(f"model.exit_pool = {m.exit_pool} pools a conv layer's output: "
                              f"use 0, or an exit_at among the {len(m.channels)} convs")
        if not 0 <= m.exit_at <= m.split:
            raise ConfigError(f"model.exit_at = {m.exit_at} must be a layer on the edge: 1.."
                              f"{m.split} (model.split), or 0 for the split layer itself")
        if m.uplink_bits not in (0, *UPLINK_BITS):
            raise ConfigError(f"model.uplink_bits = {m.uplink_bits}: choose 0 (not trained "
                              f"for the uplink) or one of {', '.join(map(str, UPLINK_BITS))}")
        for name, value in (("steps", t.steps), ("batch_size", t.batch_size)):
            if value < 1:
                raise ConfigError(f"train.{name} = {value} must be at least 1")
        if t.epochs < 0:
            raise ConfigError(f"train.epochs = {t.epochs} must be 0 (train.steps decides) or "
                              f"more")
        if t.lr <= 0 or t.weight_decay < 0 or t.exit_weight < 0 or t.rate_weight < 0:
            raise ConfigError("train.lr must be > 0, weight_decay, exit_weight and rate_weight "
                              ">= 0")
        for name, seed in (("model.seed", m.seed), ("train.seed", t.seed)):
            if not 0 <= seed < 1 << 63:
                raise ConfigError(f"{name} = {seed} must be in [0, 2^63)")
        for name, low, high in TRAIN_RANGES:
            value = getattr(t, name)
            if not low <= value <= high:
                raise ConfigError(f"train.{name} = {value} must be in [{low}, {high}]")
        if not 0 <= t.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing = {t.label_smoothing} must be in [0, 1) "
                              f"(0: none)")
        if t.select_by not in SELECT_BY:
            raise ConfigError(f"train.select_by = {t.select_by!r}: choose one of "
                              f"{', '.join(SELECT_BY)}")
        if t.augment not in AUGMENTS or t.shift < 0:
            raise ConfigError(f"train.augment = {t.augment!r}: choose one of "
                              f"{', '.join(AUGMENTS)} (and train.shift >= 0 pixels)")
        if not 0 <= t.ema_decay < 1:
            raise ConfigError(f"train.ema_decay = {t.ema_decay} must be in [0, 1) (0: keep the "
                              f"weights as trained, no average)")
        if not 0 <= t.patience < 1:
            raise ConfigError(f"train.patience = {t.patience} must be in [0, 1): the fraction "
                              f"of the steps so far without a better validation objective "
                              f"after which training stops (0: never, run the whole schedule)")
        if not 0 <= t.val_fraction < 1 or t.val_min < 1:
            raise ConfigError(f"train.val_fraction = {t.val_fraction} must be in [0, 1) and "
                              f"train.val_min = {t.val_min} at least 1")
        if c.score not in SCORES:
            raise ConfigError(f"calibrate.score = {c.score!r}: choose one of {', '.join(SCORES)}")
        if c.policy not in POLICIES:
            raise ConfigError(f"calibrate.policy = {c.policy!r}: choose one of "
                              f"{', '.join(POLICIES)}")
        if not 0.0 <= c.target_offload <= 1.0:
            raise ConfigError(f"calibrate.target_offload = {c.target_offload} must be in [0, 1]")
        if not 0.0 <= c.max_drop <= 100.0:
            raise ConfigError(f"calibrate.max_drop = {c.max_drop} must be in [0, 100] points")
        for key in ("unfamiliar_flag_rate", "tail_unfamiliar_flag_rate"):
            if not 0.0 <= getattr(c, key) < 1.0:
                raise ConfigError(f"calibrate.{key} = {getattr(c, key)} must be in [0, 1): the "
                                  f"share of familiar validation frames flagged (0: off)")
        if c.unfamiliar_form not in UNFAMILIAR_FORMS:
            raise ConfigError(f"calibrate.unfamiliar_form = {c.unfamiliar_form!r}: choose one "
                              f"of {', '.join(UNFAMILIAR_FORMS)}")
        return self


def _check_layout(m: ModelConfig) -> None:
    """Layer counts, the input, and that each layer fits the one before it."""
    if len(m.input_shape) != 3 or m.input_shape[0] not in (1, 3) or min(m.input_shape) < 1 \
            or max(m.input_shape) > MAX_SIDE:
        raise ConfigError(f"model.input_shape = {m.input_shape} must be [channels, height, "
                          f"width] with 1 (grey) or 3 (colour) channels and sides in [1, "
                          f"{MAX_SIDE}]")
    for name, high in (("widths", MAX_WIDTH), ("fan_out", MAX_WIDTH), ("channels", MAX_WIDTH),
                       ("channel_fan_out", MAX_WIDTH), ("kernel", MAX_KERNEL),
                       ("stride", MAX_SIDE), ("pool", MAX_SIDE)):
        values = getattr(m, name)
        if any(v > high for v in values) or len(values) > MAX_LAYERS:
            raise ConfigError(f"model.{name} = {values} must hold at most {MAX_LAYERS} "
                              f"values of at most {high}")
    for name, high in (("input_pad", MAX_WIDTH), ("exit_fan_out", MAX_WIDTH),
                       ("exit_pool", MAX_SIDE)):
        if getattr(m, name) > high:
            raise ConfigError(f"model.{name} = {getattr(m, name)} must be at most {high}")
    if m.resize not in RESIZE_MODES:
        raise ConfigError(f"model.resize = {m.resize!r}: choose one of "
                          f"{', '.join(RESIZE_MODES)}")
    pixels = math.prod(m.input_shape)
    m.input_size = m.input_size or pixels
    if m.input_size != pixels:
        raise ConfigError(f"model.input_size = {m.input_size} must be {pixels}, the pixels of "
                          f"model.input_shape = {m.input_shape} (or 0)")
    convs = len(m.channels)
    for name in ("channel_fan_out", "kernel", "stride", "pool"):
        given = len(getattr(m, name))
        if given != convs and (given or name == "channel_fan_out"):
            raise ConfigError(f"model.{name} has {given} entries: give one per conv "
                              f"({convs}, as model.channels)"
                              + ("" if name == "channel_fan_out" else ", or none"))
        if any(v < 1 for v in getattr(m, name)):
            raise ConfigError(f"model.{name} = {getattr(m, name)} must be positive")
    if any(c < 1 for c in m.channels):
        raise ConfigError(f"model.channels = {m.channels} must be positive")
    if len(m.fan_out) != len(m.widths) - 1 or len(m.widths) < (2 if convs else 3):
        raise ConfigError(f"model.widths needs at least {2 if convs else 3} layers and "
                          f"model.fan_out one entry per junction ({len(m.widths) - 1}), got "
                          f"{len(m.fan_out)}")
    pairs = zip(m.widths, m.widths[1:], m.fan_out)
    for i, (n_in, n_out, fan_out) in enumerate(pairs):
        if n_in * min(fan_out, n_out) > MAX_WEIGHTS:
            raise ConfigError(f"model: junction {i + 1} ({n_in}->{n_out}, fan-out {fan_out}) "
                              f"has {n_in * min(fan_out, n_out)} weights, over the "
                              f"{MAX_WEIGHTS} one layer may hold")
    if convs:
        if m.input_pad:
            raise ConfigError("model.input_pad pads an MLP's pixels; a conv model reads "
                              "them as an image: set it to 0")
        c, h, w = conv_shapes(m)[-1]
        if m.widths[0] != c * h * w:
            raise ConfigError(f"model.widths[0] = {m.widths[0]} must be the last conv's "
                              f"output flattened: {c} x {h} x {w} = {c * h * w}")
        return
    expected_in = m.input_pad or m.input_size
    if m.input_pad and m.input_pad < m.input_size:
        raise ConfigError(f"model.input_pad = {m.input_pad} is smaller than "
                          f"model.input_size = {m.input_size}; use 0 for no padding")
    if m.widths[0] != expected_in:
        raise ConfigError(f"model.widths[0] = {m.widths[0]} must equal the (padded) input "
                          f"width {expected_in}; set input_pad = {m.widths[0]} to pad")


def conv_shapes(m: ModelConfig) -> list[tuple[int, int, int]]:
    """(channels, height, width) of the input and of each conv layer's output (after its
    pool); one-line error where a frame has shrunk away."""
    shapes = [tuple(m.input_shape)]
    for i, channels in enumerate(m.channels):
        k = m.kernel[i] if m.kernel else 3
        s = m.stride[i] if m.stride else 1
        p = m.pool[i] if m.pool else 1
        _, h, w = shapes[-1]
        h, w = ((h + 2 * (k // 2) - k) // s + 1) // p, ((w + 2 * (k // 2) - k) // s + 1) // p
        if h < 1 or w < 1:
            raise ConfigError(f"model: conv {i + 1} gets a {shapes[-1][1]} x "
                              f"{shapes[-1][2]} input, which its stride {s} and pool {p} "
                              f"shrink to nothing; use a larger model.input_shape or fewer "
                              f"strides and pools")
        if channels * h * w > MAX_WIDTH:
            raise ConfigError(f"model: conv {i + 1} outputs {channels} x {h} x {w} values, "
                              f"over the {MAX_WIDTH} one layer may hold")
        shapes.append((channels, h, w))
    return shapes


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "calibrate": CalibrationConfig,
            "data": DataConfig}


def _check_type(where: str, value, annotation):
    hints = {"int": int, "float": float, "str": str, "list[int]": list}
    expected = hints[annotation]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{where} = {value!r} must be of type {annotation}")
    if expected is float and not math.isfinite(value):   # TOML has nan and inf
        raise ConfigError(f"{where} = {value} must be a finite number")
    if annotation == "list[int]" and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where} = {value!r} must be a list of integers")
    return value


def from_dict(raw: dict, origin: str = "config") -> Config:
    """Build a validated Config from nested dicts (a parsed TOML file or an artifact's copy)."""
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{origin}: unknown section [{sorted(unknown)[0]}]; "
                          f"known: {', '.join(SECTIONS)}")
    if "model" not in raw:
        raise ConfigError(f"{origin}: missing [model] section with widths and fan_out")
    parts = {}
    for section, cls in SECTIONS.items():
        values = dict(raw.get(section, {}))
        if section == "train" and "val_size" in values:   # before val_fraction existed
            values["val_fraction"], values["val_min"] = 0.0, values.pop("val_size")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ConfigError(f"{origin}: unknown key {key!r} in [{section}]; "
                                  f"known: {', '.join(fields)}")
            values[key] = _check_type(f"{section}.{key}", values[key], fields[key].type)
        try:
            parts[section] = cls(**values)
        except TypeError:
            missing = [n for n, f in fields.items() if n not in values
                       and f.default is dataclasses.MISSING]
            raise ConfigError(f"{origin}: [{section}] needs {', '.join(missing)}") from None
    return Config(**parts).validate()


def resolve_config_path(name_or_path: str) -> Path:
    """Accept a path, or the bare name of a shipped config ('paper-sparse')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"no config file {name_or_path!r}; give a path or one of: {names}")


def load_config(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Config:
    path = resolve_config_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    apply_overrides(raw, overrides)
    return from_dict(raw, origin=str(path))


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply `section.key=value` strings (value in TOML syntax) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: write section.key=value, e.g. train.epochs=5")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare word is a string: calibrate.policy=max_drop
        raw.setdefault(section, {})[name] = parsed
    return raw
