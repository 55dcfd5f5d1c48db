"""Train the shipped configs (and search candidates) on Fashion-MNIST; print the comparison.

Every number comes from the test split, with the exit threshold chosen on validation by each
config's policy. Ratios are against the dense twin (paper-dense) of the same seeds.

    python -m benchmarks.compare_configs                    # shipped configs, 3 seeds
    python -m benchmarks.compare_configs --search --seeds 0  # plus the default's candidates
    python -m benchmarks.compare_configs --tiny --data IDX_DIR --out DIR   # 1 seed, 1 epoch
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks import add_tiny, apply_tiny
from benchmarks.common import DEFAULT_BEFORE_BANDWIDTH
from pipeline.model.config import load_config
from pipeline.model.train import run

SHIPPED = ["paper-sparse", "paper-dense", "paper-tiny", "default"]
# Candidates tried for the recommended default before the bandwidth work (benchmarks/
# bandwidth.py took it on from there): (label, base config, overrides). All keep the 1 600-edge
# first junction (fan-out 2 from 800 inputs).
CANDIDATES = [
    ("old default: sparse exit fo 5, dense tail 400-100-10, float uplink", "default",
     DEFAULT_BEFORE_BANDWIDTH),
    ("sparse 800-100-40-10, fo 2/8/10", "paper-sparse",
     ["model.widths=[800, 100, 40, 10]", "model.fan_out=[2, 8, 10]"]),
    ("sparse head 800-200 + sparse exit fo 5, dense tail 200-100-10", "default",
     [*DEFAULT_BEFORE_BANDWIDTH, "model.widths=[800, 200, 100, 10]",
      "model.fan_out=[2, 100, 10]"]),
    ("sparse head 800-400 + dense exit, dense tail", "default",
     [*DEFAULT_BEFORE_BANDWIDTH, "model.exit_fan_out=0"]),
]


def mean_sd(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, help="override every config's epochs")
    ap.add_argument("--search", action="store_true", help="also train the default's candidates")
    ap.add_argument("--data", help="IDX folder (default: Debian's Fashion-MNIST)")
    ap.add_argument("--out", default="runs/bench")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, seeds=[0], epochs=1)

    runs = [(name, name, []) for name in SHIPPED]
    if args.search:
        runs += CANDIDATES
    results: dict[str, list[dict]] = {}
    for label, base, overrides in runs:
        for seed in args.seeds:
            extra = [f"train.seed={seed}", f"model.seed={seed}"]
            if args.epochs:
                extra.append(f"train.epochs={args.epochs}")
            if args.data:
                extra.append(f"data.dir={args.data!r}")
            cfg = load_config(base, overrides + extra)
            out = Path(args.out) / f"{label.replace(' ', '_').replace('/', '-')}-s{seed}"
            m = run(cfg, out, progress=False)
            t = m["calibration"]["test"]
            print(f"I: {label} seed {seed}: split+exit {100 * t['split_exit']:.2f}% at "
                  f"{100 * t['offload_ratio']:.1f}% offload, {m['train_seconds_per_epoch']:.2f} "
                  f"s/epoch", flush=True)
            results.setdefault(label, []).append(m)

    dense = results.get("paper-dense", [None])[0]
    print(f"\nFashion-MNIST test split, seeds {args.seeds}; mean ± sd over seeds; head = edge "
          f"side (first junctions + exit); threshold policy per config, chosen on validation\n")
    print("| config | head params | head bytes on disk | head MACs/frame | x smaller / fewer "
          "MACs than dense twin | split width | exit only % | full model % | split+exit % "
          "| offload % (test) | s/epoch |")
    print("|---" * 11 + "|")
    for label, ms in results.items():
        m0 = ms[0]
        s, edge_bytes = m0["structure"], m0["artifact_bytes"]["edge"]
        ratio = "—"
        if dense and label != "paper-dense":
            ratio = (f"{dense['artifact_bytes']['edge'] / edge_bytes:.1f}x / "
                     f"{dense['structure']['edge_macs'] / s['edge_macs']:.1f}x")
        tests = [m["calibration"]["test"] for m in ms]
        print(f"| {label} | {s['edge_params']} | {edge_bytes} | {s['edge_macs']} | {ratio} | "
              f"{m0['config']['model']['widths'][m0['config']['model']['split']]} | "
              f"{mean_sd([t['exit_only'] for t in tests])} | "
              f"{mean_sd([t['full'] for t in tests])} | "
              f"{mean_sd([t['split_exit'] for t in tests])} | "
              f"{mean_sd([t['offload_ratio'] for t in tests])} | "
              f"{statistics.mean(m['train_seconds_per_epoch'] for m in ms):.2f} |")


if __name__ == "__main__":
    main()
