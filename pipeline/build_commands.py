"""The build-time commands, `splitexit train`, `calibrate` and `export`: each one's options
and what it runs. They make and reshape a training folder (torch, the model, the exporters);
the runtime commands that serve it are in pipeline.cli, which adds these to its parser."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.errors import UserError

__all__ = ["add_train", "add_calibrate", "add_export", "DEFAULT_CONFIG", "DEFAULT_OUT"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "default"
DEFAULT_OUT = "runs/default"     # the training folder every command reads by default
EXPORT_TARGETS = ("c", "onnx")


def _cmd_train(args: argparse.Namespace) -> None:
    import torch

    from pipeline.model.config import load_config
    from pipeline.model.report import format_report
    from pipeline.model.train import run

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    if args.data is not None:
        overrides.append(f"data.dir={args.data!r}")
    cfg = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{cfg.model.name}")
    metrics = run(cfg, out, progress=True if args.progress else False if args.quiet else None)
    print(format_report(metrics))
    log.info(f"wrote {out}/edge.pt, {out}/server.pt, {out}/metrics.json, "
             f"{out}/calibration.csv" + (", calibration.png" if metrics["calibration"]["sweep_png"]
                                         else " (no PNG: pip install matplotlib)"))


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from pipeline.model.artifacts import load_edge
    from pipeline.model.config import apply_overrides, from_dict
    from pipeline.model.report import format_report
    from pipeline.model.train import calibrate_dir

    out = Path(args.dir)
    raw = load_edge(out).config.to_dict()
    overrides = list(args.set)
    for key, value in (("policy", args.policy), ("target_offload", args.target_offload),
                       ("max_drop", args.max_drop), ("score", args.score),
                       ("unfamiliar_flag_rate", args.unfamiliar_flag_rate),
                       ("tail_unfamiliar_flag_rate", args.tail_unfamiliar_flag_rate)):
        if value is not None:
            overrides.append(f"calibrate.{key}={value!r}" if isinstance(value, str)
                             else f"calibrate.{key}={value}")
    cfg = from_dict(apply_overrides(raw, overrides), origin="calibrate options")
    metrics = calibrate_dir(out, cfg, args.data)
    if "structure" in metrics:
        print(format_report(metrics))
    log.info(f"new threshold {metrics['calibration']['threshold']:.4f} and unfamiliarity "
             f"scores written to {out}/edge.pt, edge.npz and server.pt")


def _calibration_frames(args: argparse.Namespace, head):
    """Training frames (never test frames) for the int8 rounding, or None with a warning:
    from --data, else the data folder the training folder's metrics.json names."""
    import json

    from pipeline.errors import DataError
    from pipeline.export.int8_weights import CALIBRATION_FRAMES
    from pipeline.floor.data import load_dataset
    from pipeline.model.config import METRICS_FILE, TrainConfig, from_dict

    metrics = Path(args.dir) / METRICS_FILE
    trained = json.loads(metrics.read_text())["config"] if metrics.is_file() else {}
    folder = args.data or trained.get("data", {}).get("dir")
    if folder is None:
        log.warning(f"int8 rounds to nearest: no {METRICS_FILE} in {args.dir} names the training "
                    f"data; pass --data DIR for error-compensated rounding")
        return None
    try:   # the split it was trained with
        t = from_dict(trained, origin=str(metrics)).train if trained else TrainConfig()
        data = load_dataset(folder, t.val_fraction, t.seed, t.val_min, head.input_shape,
                            head.resize)   # as the head reads them
    except DataError as e:
        if args.data:
            raise
        log.warning(f"int8 rounds to nearest: {e}")
        return None
    return data.train.images[:CALIBRATION_FRAMES].astype("float32") / 255


def _cmd_export(args: argparse.Namespace) -> None:
    from pipeline.export.export_c import export_c
    from pipeline.export.export_onnx import export_onnx
    from pipeline.edge.numpy_head import load_numpy_head

    if args.target == "onnx" and args.variant != "float32":   # argparse checked each alone
        raise UserError(f"--variant {args.variant!r}: the ONNX export is float32")
    head = load_numpy_head(args.dir)
    name = args.target if args.target == "onnx" else f"{args.target}-{args.variant}"
    out = Path(args.out or Path(args.dir) / f"export-{name}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if args.target == "onnx":
        [path] = export_onnx(args.dir, out)
        log.info(f"wrote {path} (model {head.model_id}): inputs pixels (batch, "
                 f"{head.input_size}), outputs features and exit_logits")
        return
    calibration = _calibration_frames(args, head) if args.variant == "int8" else None
    if args.no_unfamiliar and args.target != "c":
        raise UserError("--no-unfamiliar: the ONNX export has no unfamiliarity score to leave "
                        "out; drop the flag")
    paths = export_c(args.dir, out, args.variant, calibration, not args.no_unfamiliar)
    log.info(f"wrote {', '.join(str(p) for p in paths)} (model {head.model_id}); build with "
             f"`cc -std=c99 -O2 -c {paths[0]} {out / 'edge_step.c'}` (link -lm), call "
             f"splitexit_edge_step() as {out / 'splitexit_edge.h'} says (the head alone: "
             f"splitexit_head(), {paths[1]})")


def add_train(sub: argparse._SubParsersAction) -> None:
    """`splitexit train`: its options and what it runs."""
    t = sub.add_parser("train", help="train a split model, calibrate its exit, write artifacts")
    t.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help="TOML file or shipped config name (default: %(default)s)")
    t.add_argument("--out", help="output directory (default: runs/<model name>)")
    t.add_argument("--data", help="folder with the IDX files, or an image folder: one "
                   "subfolder of pictures per class (default: Debian's Fashion-MNIST)")
    t.add_argument("--epochs", type=int, help="train this many passes over the training "
                   "frames instead of the config's step count (train.epochs)")
    t.add_argument("--seed", type=int, help="seed of the weights, shuffling and validation "
                   "split (train.seed; default: the config's)")
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set train.lr=0.001")
    bar = t.add_mutually_exclusive_group()
    bar.add_argument("--quiet", action="store_true", help="no progress bar")
    bar.add_argument("--progress", action="store_true", help="a progress bar even when "
                     "stderr is not a terminal (default: only on a terminal)")
    t.set_defaults(func=_cmd_train)


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    """`splitexit calibrate`: its options and what it runs."""
    from pipeline.floor.scores import SCORES
    from pipeline.model.config import POLICIES

    c = sub.add_parser("calibrate", help="choose a new exit threshold for a trained directory")
    c.add_argument("dir", nargs="?", default=DEFAULT_OUT,
                   help="a training folder, rewritten in place (default: %(default)s)")
    c.add_argument("--policy", choices=POLICIES, help="offload: send --target-offload of the "
                   "frames; max_drop: offload the fewest frames that keep accuracy within "
                   "--max-drop points of the full model (default: the training's)")
    c.add_argument("--target-offload", type=float, help="fraction of frames to offload")
    c.add_argument("--max-drop", type=float, help="accuracy points allowed below the full model")
    c.add_argument("--score", choices=SCORES, help="the exit's confidence: the top "
                   "softmax probability, the top two's margin, or 1 - normalized entropy "
                   "(default: the training's)")
    c.add_argument("--unfamiliar-flag-rate", type=float, metavar="FRACTION",
                   help="share of familiar validation frames the edge's unfamiliarity score "
                   "flags (never answered by the exit: offloaded); 0 turns it off (default: "
                   "the training's, 0.05)")
    c.add_argument("--tail-unfamiliar-flag-rate", type=float, metavar="FRACTION",
                   help="the same for the tail's score (answered `unknown`); 0 turns it off "
                   "(default: the training's, 0.002)")
    c.add_argument("--data", help="IDX or image folder (default: the training's)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set calibrate.max_drop=1.0")
    c.set_defaults(func=_cmd_calibrate)


def add_export(sub: argparse._SubParsersAction) -> None:
    """`splitexit export`: its options and what it runs."""
    from pipeline.export.export_c import C_VARIANTS

    x = sub.add_parser("export", help="the edge head as C99 or ONNX for a device",
                       description="Export a training folder's edge head (from edge.npz) for "
                       "a device that runs no Python: C99 source with const tables and one "
                       "function, splitexit_head(pixels, features, exit_logits), or an ONNX "
                       "graph.")
    x.add_argument("dir", nargs="?", default=DEFAULT_OUT,
                   help="a training folder (default: %(default)s)")
    x.add_argument("--target", default="c", choices=EXPORT_TARGETS, help="c (default): "
                   "splitexit_head.c + .h, const tables, one function, no allocation, nothing "
                   "beyond <stdint.h> | onnx: splitexit_head.onnx, a dynamic batch, ELL kept "
                   "as Gather/Mul/ReduceSum (needs the onnx extra)")
    x.add_argument("--no-unfamiliar", action="store_true", help="C: leave the unfamiliarity "
                   "score out (17.6 KB less flash for the default; the device then answers "
                   "frames unlike the training set like any other)")
    x.add_argument("--variant", default="float32", choices=C_VARIANTS, help="float32 "
                   "(default; equals the trained head) | int8 (int8 tables with a float scale "
                   "per row, 4x smaller; rounded so errors cancel on training frames; C only)")
    x.add_argument("--data", help="int8: the training data folder to calibrate the rounding "
                   "on (default: the one DIR/metrics.json names)")
    x.add_argument("--out", help="output folder (default: DIR/export-TARGET-VARIANT)")
    x.set_defaults(func=_cmd_export)
