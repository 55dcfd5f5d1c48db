"""The C export timed by small C drivers, for benchmarks/edge_head.py: the head alone
(float32 and int8, two sets of flags; its compiled size) and the whole C edge step (head, exit
score, quantizer, static code, wire-v4 REQUEST) beside the head in the same program. Each
driver reads the frames from a raw float32 file and prints the best of `repeats` passes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


def c_compiler() -> str | None:
    """The C compiler on this machine (cc, else gcc), or None."""
    return shutil.which("cc") or shutil.which("gcc")


C_DRIVER = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "splitexit_head.h"
int main(int argc, char **argv) {
    int n = atoi(argv[2]), repeats = atoi(argv[3]);
    float *pixels = malloc(sizeof(float) * SPLITEXIT_INPUT * n);
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(pixels, sizeof(float) * SPLITEXIT_INPUT, n, f) != (size_t)n) return 1;
    fclose(f);
    float features[SPLITEXIT_FEATURES], logits[SPLITEXIT_CLASSES], sink = 0.0f;
    double best = 1e30;
    for (int r = 0; r < repeats; ++r) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < n; ++i) {
            splitexit_head(pixels + (size_t)i * SPLITEXIT_INPUT, features, logits);
            sink += logits[0];
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
        if (ns < best) best = ns;
    }
    printf("%f %f\n", best, sink);
    return 0;
}
"""
C_FLAGS = {"-O2": ["-O2"], "-O3 native fast-math": ["-O3", "-march=native", "-ffast-math"]}


def c_head(art: Path, frames: np.ndarray, calibration: np.ndarray, repeats: int,
           work: Path) -> dict:
    """{(variant, flags): ns per frame (best of `repeats` passes), text + data bytes of the
    compiled head} for the float32 and int8 exports (int8 calibrated as `export` does)."""
    from pipeline.export.export_c import C_FILE, C_VARIANTS, export_c

    cc = c_compiler()
    if cc is None:
        return {}
    frames_file = work / "frames.f32"
    np.ascontiguousarray(frames, dtype=np.float32).tofile(frames_file)
    result = {}
    for variant in C_VARIANTS:
        out = work / f"{art.name}-{variant}"
        export_c(art, out, variant, calibration if variant == "int8" else None)
        (out / "bench.c").write_text(C_DRIVER)
        for label, flags in C_FLAGS.items():
            obj, exe = out / "head.o", out / "bench"
            subprocess.run([cc, "-std=c99", *flags, "-c", str(out / C_FILE), "-o", str(obj)],
                           check=True)
            size = subprocess.run(["size", str(obj)], capture_output=True, text=True,
                                  check=True)
            text, data = (int(v) for v in size.stdout.splitlines()[1].split()[:2])
            subprocess.run([cc, "-std=c99", *flags, "-I", str(out), str(out / "bench.c"),
                            str(obj), "-o", str(exe)], check=True)
            run = subprocess.run([str(exe), str(frames_file), str(len(frames)), str(repeats)],
                                 capture_output=True, text=True, check=True)
            result[(variant, label)] = {"ns": float(run.stdout.split()[0]), "bytes": text + data}
    return result


EDGE_DRIVER = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "splitexit_edge.h"
static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}
int main(int argc, char **argv) {
    int n = atoi(argv[2]), repeats = atoi(argv[3]), unsure = 0, sure = 0;
    float *pixels = malloc(sizeof(float) * SPLITEXIT_INPUT * n);
    int *order = malloc(sizeof(int) * n);   /* unsure frames first, then the sure ones */
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(pixels, sizeof(float) * SPLITEXIT_INPUT, n, f) != (size_t)n) return 1;
    fclose(f);
    static uint8_t out[SPLITEXIT_EDGE_BUFFER_BYTES];
    float *features = malloc(sizeof(float) * SPLITEXIT_FEATURES * n);
    float logits[SPLITEXIT_CLASSES], sink = 0.0f;
    splitexit_decision d;
    double bytes = 0.0;
    for (int i = 0; i < n; ++i) {
        if (splitexit_edge_step(pixels + (size_t)i * SPLITEXIT_INPUT, i + 1, out, sizeof out,
                                &d)) return 2;
        if (d.offload) { order[unsure++] = i; bytes += d.bytes; }
    }
    for (int i = 0; i < n; ++i) {
        splitexit_edge_step(pixels + (size_t)i * SPLITEXIT_INPUT, i + 1, out, sizeof out, &d);
        if (!d.offload) order[unsure + sure++] = i;
    }
    /* per frame, best of `repeats`, alternating: the head alone, the step on unsure frames,
       the request alone (from each frame's features, as the head wrote them), the step on
       sure frames */
    double best[4] = {1e30, 1e30, 1e30, 1e30};
    for (int r = 0; r < repeats; ++r) {
        for (int part = 0; part < 4; ++part) {
            int from = part == 3 ? unsure : 0, to = part == 3 ? unsure + sure : unsure;
            if (to == from) continue;
            double a = now_ns();
            for (int k = from; k < to; ++k) {
                const float *px = pixels + (size_t)order[k] * SPLITEXIT_INPUT;
                float *own = features + (size_t)k * SPLITEXIT_FEATURES;
                if (part == 0) {
                    splitexit_head(px, own, logits);
                    sink += logits[0];
                } else if (part == 2) {
                    sink += (float)splitexit_encode_request(own, k + 1, out, sizeof out);
                } else {
                    splitexit_edge_step(px, k + 1, out, sizeof out, &d);
                    sink += (float)d.bytes;
                }
            }
            double ns = (now_ns() - a) / (to - from);
            if (ns < best[part]) best[part] = ns;
        }
    }
    printf("%d %d %f %f %f %f %f %f\n", unsure, sure, best[0], best[1], best[2], best[3],
           unsure ? bytes / unsure : 0.0, sink);
    return 0;
}
"""
EDGE_FLAGS = {"-O2": ["-O2"], "-O2 native": ["-O2", "-march=native"]}


def c_edge(art: Path, frames: np.ndarray, repeats: int, work: Path) -> dict:
    """{flags: ns per frame of the C head alone and of the whole edge step (unsure frames,
    their request alone, sure frames), bytes per request} for the float32 export."""
    from pipeline.export.export_c import C_FILE, export_c
    from pipeline.export.export_edge import STEP_C

    cc = c_compiler()
    if cc is None:
        return {}
    frames_file = work / "frames.f32"
    np.ascontiguousarray(frames, dtype=np.float32).tofile(frames_file)
    out = work / f"{art.name}-edge"
    export_c(art, out, "float32")
    (out / "bench_edge.c").write_text(EDGE_DRIVER)
    result = {}
    for label, flags in EDGE_FLAGS.items():
        exe = out / "bench_edge"
        subprocess.run([cc, "-std=c99", *flags, "-I", str(out), str(out / "bench_edge.c"),
                        str(out / C_FILE), str(out / STEP_C), "-lm", "-o", str(exe)],
                       check=True)
        run = subprocess.run([str(exe), str(frames_file), str(len(frames)), str(repeats)],
                             capture_output=True, text=True, check=True)
        unsure, sure, head, step, request, local, size, _ = run.stdout.split()
        result[label] = {"unsure": int(unsure), "sure": int(sure), "head": float(head),
                         "step": float(step), "request": float(request),
                         "local": float(local), "bytes": float(size)}
    return result


def print_edge_table(rows: dict, frames: int, repeats: int) -> None:
    print(f"\nthe C edge step (float32 export: head, exit score, quantizer, static code, "
          f"wire-v4 REQUEST) against the C head alone, per frame, same program, best of "
          f"{repeats}, {frames} Fashion-MNIST test frames")
    print("| head | flags | unsure frames | head alone ns | edge step, unsure ns | step / head "
          "(goal <= 3x) | request alone ns | edge step, answered here ns | B per request |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        for label, e in r.items():
            print(f"| {name} | {label} | {e['unsure']} | {e['head']:.0f} | {e['step']:.0f} | "
                  f"{e['step'] / e['head']:.2f}x | {e['request']:.0f} | {e['local']:.0f} | "
                  f"{e['bytes']:.1f} |")
