"""Seconds per training epoch on Fashion-MNIST: sparse heads against their dense twin.

Each run is a fresh process (1 torch thread unless --threads) that trains one model for
--epochs epochs with pipeline.model.train.fit and reports its fastest epoch; the models run
in alternation, --pairs times, so drift on a shared machine hits them alike. "native" is
the ELL kernel of pipeline/model/ell_kernel.c, "pytorch" the fallback (SPLITEXIT_NATIVE=0).

    python benchmarks/train_epoch.py                   # paper-sparse, paper-dense, default
    python benchmarks/train_epoch.py --pairs 1 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUNS = [("paper-dense", "native"), ("paper-sparse", "native"), ("paper-sparse", "pytorch"),
        ("default", "native"), ("default", "pytorch")]


def one(config: str, epochs: int, threads: int) -> None:
    import torch

    from pipeline.model import ell_native
    from pipeline.model.config import load_config
    from pipeline.model.train import dataset, fit

    torch.set_num_threads(threads)
    cfg = load_config(config, [f"train.epochs={epochs}"])
    data = dataset(cfg)
    _, seconds = fit(cfg, data, progress=False)
    print(json.dumps({"seconds": min(seconds), "kernels": ell_native.status()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the fastest counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one, args.epochs, args.threads)
        return
    times: dict[tuple[str, str], list[float]] = {run: [] for run in RUNS}
    for round_ in range(args.pairs):
        for config, kernels in RUNS:
            env = dict(os.environ, SPLITEXIT_NATIVE="1" if kernels == "native" else "0")
            out = subprocess.run([sys.executable, __file__, "--one", config, "--epochs",
                                  str(args.epochs), "--threads", str(args.threads)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            times[(config, kernels)].append(result["seconds"])
            print(f"round {round_ + 1}: {config} ({kernels}): {result['seconds']:.3f} s "
                  f"[{result['kernels']}]", file=sys.stderr)
    dense = statistics.median(times[("paper-dense", "native")])
    print(f"\n{args.threads} thread(s), fastest of {args.epochs} epochs per run, "
          f"{args.pairs} alternating runs")
    print("| model | sparse kernels | s/epoch (median) | range | vs paper-dense |")
    print("|---|---|---|---|---|")
    for (config, kernels), ts in times.items():
        med = statistics.median(ts)
        print(f"| {config} | {kernels if config != 'paper-dense' else '(dense)'} | {med:.3f} | "
              f"{min(ts):.3f}–{max(ts):.3f} | {dense / med:.2f}x |")


if __name__ == "__main__":
    main()
