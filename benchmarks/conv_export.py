"""Conv heads through the exports, on Fashion-MNIST's test frames: the ONNX graph (run by
onnxruntime) against the NumPy head, and the int8 C head against the float head -- exit
decisions kept, with the rounding compensated (what `splitexit export --variant int8` does)
and rounded to nearest, beside the float32 C head's size.

    python -m benchmarks.conv_export runs/bandwidth/conv-sparse-s0
    python -m benchmarks.conv_export DIR --frames 1000        # the first 1000 test frames
    python -m benchmarks.conv_export runs/default   # an MLP head: docs/export.md's int8 table
    python -m benchmarks.conv_export DIR --tiny --data IDX_DIR   # the first 32 test frames

Goals (#26): ONNX outputs within 1e-4 of the NumPy head; int8 keeps >= 99.5 % of the exit
decisions. Calibration uses the training frames as the CLI does (the first 4096).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")       # one BLAS thread: the calibration's
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # Hessians crawl on a busy machine with more

import numpy as np  # noqa: E402

from benchmarks import add_tiny, apply_tiny  # noqa: E402
from pipeline.export.export_c import C_FILE, export_c  # noqa: E402
from pipeline.export.export_onnx import export_onnx  # noqa: E402
from pipeline.edge.numpy_head import exit_scores, load_numpy_head  # noqa: E402
from pipeline.export.int8_weights import CALIBRATION_FRAMES  # noqa: E402
from pipeline.model.config import FASHION_MNIST_DIR  # noqa: E402
from pipeline.floor.data import load_dataset  # noqa: E402

P = ctypes.POINTER(ctypes.c_float)


def c_head(folder: Path, out: Path, variant: str, calibration) -> tuple[ctypes.CDLL, int]:
    """The exported head compiled as the tests compile it; (library, its .text+.data bytes:
    the tables and code a device flashes)."""
    export_c(folder, out, variant, calibration)
    cc = shutil.which("cc") or "gcc"
    subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o",
                    str(out / "head.so"), str(out / C_FILE)], check=True)
    subprocess.run([cc, "-std=c99", "-O2", "-c", "-o", str(out / "head.o"), str(out / C_FILE)],
                   check=True)
    size = subprocess.run(["size", str(out / "head.o")], capture_output=True, text=True)
    text, data = (int(v) for v in size.stdout.splitlines()[1].split()[:2])
    return ctypes.CDLL(str(out / "head.so")), text + data


def run_c(lib, head, pixels):
    logits = np.zeros((len(pixels), head.exit.bias.shape[0]), np.float32)
    features = np.zeros((len(pixels), head.width), np.float32)
    for i in range(len(pixels)):
        frame = np.ascontiguousarray(pixels[i])
        lib.splitexit_head(frame.ctypes.data_as(P), features[i].ctypes.data_as(P),
                           logits[i].ctypes.data_as(P))
    return logits, features


def decisions(head, logits) -> np.ndarray:
    return exit_scores(logits, head.score, head.temperature) >= head.threshold


def measure(folder: Path, data: str, frames: int | None, work: Path) -> list[str]:
    head = load_numpy_head(folder)
    split = load_dataset(data, shape=head.input_shape, resize=head.resize)
    test = split.test.images[:frames].astype(np.float32) / 255
    calibration = split.train.images[:CALIBRATION_FRAMES].astype(np.float32) / 255
    ref_logits, ref_features = head(test)
    ref = decisions(head, ref_logits)
    rows = []
    try:
        import onnxruntime as ort
        [path] = export_onnx(folder, work / "onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        features, logits = session.run(["features", "exit_logits"], {"pixels": test})
        rows.append(f"| {folder.name} | ONNX (onnxruntime {ort.__version__}) | "
                    f"{np.abs(logits - ref_logits).max():.2e} | "
                    f"{np.abs(features - ref_features).max():.2e} | "
                    f"{(decisions(head, logits) == ref).mean():.4%} | "
                    f"{path.stat().st_size} (file) |")
    except ImportError:
        rows.append(f"| {folder.name} | ONNX | the onnx extra is not installed | | | |")
    for variant, cal, name in (("float32", None, "C float32"),
                               ("int8", None, "C int8, nearest"),
                               ("int8", calibration, "C int8, compensated")):
        start = time.perf_counter()
        lib, flash = c_head(folder, work / name.replace(" ", "").replace(",", "-"), variant,
                            cal)
        took = time.perf_counter() - start
        logits, features = run_c(lib, head, test)
        rows.append(f"| {folder.name} | {name} (export {took:.0f} s) | "
                    f"{np.abs(logits - ref_logits).max():.2e} | "
                    f"{np.abs(features - ref_features).max():.2e} | "
                    f"{(decisions(head, logits) == ref).mean():.4%} | {flash} (.o) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("heads", nargs="+", type=Path, help="trained head folders (conv or MLP)")
    ap.add_argument("--data", default=FASHION_MNIST_DIR, help="IDX or image folder")
    ap.add_argument("--frames", type=int, help="test frames (default: all)")
    add_tiny(ap)
    args = ap.parse_args()
    apply_tiny(ap, args, frames=32)
    work = Path(tempfile.mkdtemp(prefix="conv-export-"))
    print("| head | export | max |logit err| | max |feature err| | exit decisions kept | "
          "bytes |\n|---|---|---|---|---|---|")
    try:
        for folder in args.heads:
            for row in measure(folder, args.data, args.frames, work):
                print(row, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
