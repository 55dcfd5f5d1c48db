"""The `splitexit` command. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import UserError

__all__ = ["main"]

DEFAULT_CONFIG = "default"
DEFAULT_OUT = "runs/default"


def _cmd_train(args: argparse.Namespace) -> None:
    import torch

    from pipeline.config import load_config
    from pipeline.report import format_report
    from pipeline.train import run

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
    metrics = run(cfg, out, progress=not args.quiet)
    print(format_report(metrics))
    print(f"\nI: wrote {out}/edge.pt, {out}/server.pt, {out}/metrics.json, "
          f"{out}/calibration.csv" + (", calibration.png" if metrics["calibration"]["sweep_png"]
                                      else " (no PNG: pip install matplotlib)"))


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from pipeline.artifacts import load_edge
    from pipeline.config import apply_overrides, from_dict
    from pipeline.report import format_report
    from pipeline.train import calibrate_dir

    out = Path(args.dir)
    raw = load_edge(out).config.to_dict()
    overrides = list(args.set)
    for key, value in (("policy", args.policy), ("target_offload", args.target_offload),
                       ("max_drop", args.max_drop), ("score", args.score)):
        if value is not None:
            overrides.append(f"calibrate.{key}={value!r}" if isinstance(value, str)
                             else f"calibrate.{key}={value}")
    cfg = from_dict(apply_overrides(raw, overrides), origin="calibrate options")
    metrics = calibrate_dir(out, cfg, args.data)
    if "structure" in metrics:
        print(format_report(metrics))
    print(f"\nI: new threshold {metrics['calibration']['threshold']:.4f} written to {out}/edge.pt")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="splitexit", description="Split computing with early exit "
                                 "on predefined-sparse networks.")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a split model, calibrate its exit, write artifacts")
    t.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help="TOML file or shipped config name (default: %(default)s)")
    t.add_argument("--out", help="output directory (default: runs/<model name>)")
    t.add_argument("--data", help="folder with the IDX files (default: Debian's Fashion-MNIST)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set train.lr=0.001")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("calibrate", help="choose a new exit threshold for a trained directory")
    c.add_argument("dir", nargs="?", default=DEFAULT_OUT, help="(default: %(default)s)")
    c.add_argument("--policy", choices=["offload", "max_drop"])
    c.add_argument("--target-offload", type=float, help="fraction of frames to offload")
    c.add_argument("--max-drop", type=float, help="accuracy points allowed below the full model")
    c.add_argument("--score", choices=["max_softmax", "margin", "entropy"])
    c.add_argument("--data", help="folder with the IDX files (default: the training's)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.set_defaults(func=_cmd_calibrate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"splitexit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("splitexit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
