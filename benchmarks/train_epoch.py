"""Seconds per training epoch on Fashion-MNIST: sparse heads against their dense twin.

Each run is a fresh process (1 torch thread unless --threads) that trains one model for
--epochs epochs with pipeline.model.train.fit and reports its fastest epoch; the models run
in alternation, --pairs times, so drift on a shared machine hits them alike. "auto" is what
ships: each sparse layer's kernel chosen by timing on first use (kernel_choice.py, read
from the cache after the first run); "native" forces the ELL kernel of
pipeline/model/ell_kernel.c (SPLITEXIT_NATIVE=1), "pytorch" keeps it out (SPLITEXIT_NATIVE=0).

    python -m benchmarks.train_epoch                   # paper-sparse, paper-dense, default
    python -m benchmarks.train_epoch --pairs 1 --epochs 1
    python -m benchmarks.train_epoch --tiny --data IDX_DIR   # 1 round, 1 epoch, 3 runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import add_tiny, apply_tiny

RUNS = [("paper-dense", "auto"), ("paper-sparse", "auto"), ("paper-sparse", "native"),
        ("paper-sparse", "pytorch"), ("default", "auto"), ("default", "native"),
        ("default", "pytorch")]
ENV = {"auto": None, "native": "1", "pytorch": "0"}  # SPLITEXIT_NATIVE


def one(config: str, epochs: int, threads: int, data: str | None = None) -> None:
    import pipeline  # noqa: F401  (before torch: it sets OpenMP's wait policy, as the CLI does)
    import torch

    from pipeline.model import ell_native, kernel_choice
    from pipeline.model.config import load_config
    from pipeline.model.train import dataset, fit

    torch.set_num_threads(threads)
    cfg = load_config(config, [f"train.epochs={epochs}",
                               *([f"data.dir={data!r}"] if data else [])])
    data = dataset(cfg)
    cpu = time.process_time()
    _, seconds = fit(cfg, data, progress=False)
    cpu = (time.process_time() - cpu) / len(seconds)
    steps = sorted({f"{key.split()[0]}: {kernel}" for key, kernel in kernel_choice.made().items()
                    if "batch<=256" in key and " step" in key})
    print(json.dumps({"seconds": min(seconds), "cpu": cpu, "kernels": ell_native.status(),
                      "chosen": "; ".join(steps) or "-"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the fastest counts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", help="IDX folder (default: each config's, Fashion-MNIST)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, pairs=1, epochs=1)
    if args.one:
        one(args.one, args.epochs, args.threads, args.data)
        return
    # --tiny: each kernel setting once, on a model of its own (the dense twin first: the
    # reference every row is compared with)
    runs = [RUNS[0], RUNS[2], RUNS[6]] if args.tiny else RUNS
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    cpu: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for round_ in range(args.pairs):
        for config, kernels in runs:
            env = dict(os.environ)
            env.pop("SPLITEXIT_NATIVE", None)
            if ENV[kernels] is not None:
                env["SPLITEXIT_NATIVE"] = ENV[kernels]
            out = subprocess.run([sys.executable, "-m", "benchmarks.train_epoch", "--one", config,
                                  "--epochs",
                                  str(args.epochs), "--threads", str(args.threads),
                                  *(["--data", args.data] if args.data else [])],
                                 env=env, check=True, capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1]).stdout
            result = json.loads(out.strip().splitlines()[-1])
            times[(config, kernels)].append(result["seconds"])
            cpu[(config, kernels)].append(result["cpu"])
            print(f"round {round_ + 1}: {config} ({kernels}): {result['seconds']:.3f} s "
                  f"[{result['kernels']}; training steps chose {result['chosen']}]",
                  file=sys.stderr)
    dense = statistics.median(times[("paper-dense", "auto")])
    dense_cpu = statistics.median(cpu[("paper-dense", "auto")])
    print(f"\n{args.threads} thread(s), fastest of {args.epochs} epochs per run, "
          f"{args.pairs} alternating runs; CPU s/epoch: the process's CPU time in fit per "
          f"epoch (validation included), steadier than wall time on a shared machine")
    print("| model | sparse kernels | s/epoch (median) | range | vs paper-dense | CPU s/epoch "
          "| CPU vs paper-dense |")
    print("|---|---|---|---|---|---|---|")
    for (config, kernels), ts in times.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[(config, kernels)])
        print(f"| {config} | {kernels if config != 'paper-dense' else '(dense)'} | {med:.3f} | "
              f"{min(ts):.3f}–{max(ts):.3f} | {dense / med:.2f}x | {med_cpu:.3f} | "
              f"{dense_cpu / med_cpu:.2f}x |")


if __name__ == "__main__":
    main()
