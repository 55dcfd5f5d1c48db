"""Small data: paper-sparse and its dense twin trained by `splitexit train`'s defaults (no
override) on three stratified 4 000-image Fashion-MNIST subsets, 3 seeds each, against the
paper's own Keras code on the same subsets (../shared/notes/reference-baseline.md).

    python ../shared/tools/make_fmnist_subsets.py /usr/share/datasets/fashion-mnist /tmp/subsets
    python -m benchmarks.small_data /tmp/subsets          # 18 trainings, a few minutes
    python -m benchmarks.small_data --tiny DIR   # DIR/subset_101 only, 1 seed, 1 epoch each

Accuracy is the final classifier's on the full 10 000-image test set (what the reference
reports); split+exit and the epoch kept (best on validation) are printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks import add_tiny, apply_tiny
from pipeline.model.config import load_config
from pipeline.model.train import run

# The paper's code, unchanged, 3 subsets x seeds 0-2 (reference-baseline.md)
REFERENCE = {"paper-sparse": (79.90, 0.27), "paper-dense": (83.22, 0.25)}
SUBSETS = ("subset_101", "subset_102", "subset_103")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("subsets", help="the folder make_fmnist_subsets.py wrote")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="an override for every training (the goal is to need none)")
    ap.add_argument("--only", nargs="+", default=list(SUBSETS), dest="names",
                    metavar="NAME", help="the subsets to train on (default: all three)")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, seeds=[0], names=list(SUBSETS[:1]), set=["train.epochs=1"])
    out = Path(tempfile.mkdtemp(prefix="small-data-"))
    print("| config | subset | seed | test accuracy (full model) | split+exit | epoch kept / "
          "run |\n|---|---|---|---|---|---|")
    summary = {}
    for name in REFERENCE:
        accuracies = []
        for subset in args.names:
            for seed in args.seeds:
                cfg = load_config(name, [f"data.dir='{Path(args.subsets) / subset}'",
                                         f"train.seed={seed}", *args.set])
                m = run(cfg, out / f"{name}-{subset}-{seed}", progress=False)
                t = m["calibration"]["test"]
                accuracies.append(100 * t["full"])
                print(f"| {name} | {subset} | {seed} | {100 * t['full']:.2f} % | "
                      f"{100 * t['split_exit']:.2f} % | {m['train_epochs']['best']} / "
                      f"{m['train_epochs']['run']} |", flush=True)
        summary[name] = accuracies
    print("\n| config | splitexit, mean ± sd (range) | reference (paper's code) |\n"
          "|---|---|---|")
    for name, acc in summary.items():
        ref, ref_sd = REFERENCE[name]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {name} | **{statistics.mean(acc):.2f} ± {sd:.2f}** "
              f"({min(acc):.2f}-{max(acc):.2f}) | {ref:.2f} ± {ref_sd:.2f} |")


if __name__ == "__main__":
    main()
