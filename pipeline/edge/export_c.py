"""The head and exit as one dependency-free C99 file pair, for devices that run no Python.

    splitexit export runs/default --target c --out head/     # head/splitexit_head.{c,h}
    cc -O2 -c head/splitexit_head.c                          # no libc beyond <stdint.h>

The tables are `const` arrays (flash on a microcontroller); the one function takes a frame
and writes the split features and the exit logits, allocating nothing (its scratch is two
stack buffers as wide as the widest edge layer, plus the standardized frame):

    void splitexit_head(const float pixels[SPLITEXIT_INPUT],
                        float features[SPLITEXIT_FEATURES], float exit_logits[SPLITEXIT_CLASSES]);

A sparse junction is ELL: for each output, d_in (value, input index) pairs, indices as narrow
as the input width allows. `int8` stores each junction's values as int8 with one float scale
per output row (4x smaller tables); inputs and accumulators stay float. Given calibration
frames, the integers are chosen so rounding errors cancel on such frames (quantize.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.edge.numpy_head import Junction, load_numpy_head, require_mlp
from pipeline.edge.quantize import int8_tables, junction_rows

__all__ = ["export_c", "C_VARIANTS", "C_FILE", "H_FILE"]

C_FILE, H_FILE = "splitexit_head.c", "splitexit_head.h"
C_VARIANTS = ("float32", "int8")
PER_LINE = 8


def _float(v: float) -> str:
    """A C float literal that round-trips float32 exactly (9 significant digits)."""
    if not np.isfinite(v):
        raise ValueError(f"the head holds a non-finite value ({v}); retrain it")
    text = f"{float(v):.9g}"
    return text + ("f" if any(c in text for c in ".en") else ".0f")


def _array(ctype: str, name: str, values: np.ndarray) -> str:
    if values.dtype.kind == "f":
        items = [_float(v) for v in values.ravel()]
    else:
        items = [str(int(v)) for v in values.ravel()]
    lines = [", ".join(items[i:i + PER_LINE]) for i in range(0, len(items), PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(items)}] = {{\n    {body}\n}};\n"


def _index_type(n_in: int) -> tuple[str, type]:
    if n_in <= 1 << 8:
        return "uint8_t", np.uint8
    if n_in <= 1 << 16:
        return "uint16_t", np.uint16
    return "uint32_t", np.uint32


def _junction(name: str, j: Junction, n_in: int, src: str, dst: str,
              int8: tuple[np.ndarray, np.ndarray] | None, relu: bool) -> tuple[str, str]:
    """(tables, loop) computing dst[o] from src for one junction; int8: (values, scales)."""
    values, _ = junction_rows(j)   # (N_out, d_in or N_in)
    n_out, d_in = values.shape
    tables, scaled = "", ""
    if int8 is not None:
        q, scale = int8
        tables += _array("int8_t", f"{name}_values", q) + _array("float", f"{name}_scale", scale)
        scaled = f" * {name}_scale[o]"
    else:
        tables += _array("float", f"{name}_values", values.astype(np.float32))
    tables += _array("float", f"{name}_bias", j.bias)
    if j.indices is None:
        def read(k: str) -> str:
            return f"{src}[{k}]"
    else:
        ctype, np_type = _index_type(n_in)
        tables += _array(ctype, f"{name}_index", j.indices.astype(np_type))

        def read(k: str) -> str:
            return f"{src}[{name}_index[o * {d_in} + {k}]]"
    out = "acc > 0.0f ? acc : 0.0f" if relu else "acc"
    # Four partial sums: one running sum makes every multiply-add wait for the last add.
    lanes = 4 if d_in % 4 == 0 else 1
    ks = ["k"] + [f"k + {lane}" for lane in range(1, lanes)]
    body = "".join(f"            s{lane} += {name}_values[o * {d_in} + {k}] * {read(k)};\n"
                   for lane, k in enumerate(ks))
    loop = (f"    for (int o = 0; o < {n_out}; ++o) {{  /* {name}: {n_in}->{n_out}, "
            f"{d_in} inputs each */\n"
            f"        float {', '.join(f's{lane} = 0.0f' for lane in range(lanes))};\n"
            f"        for (int k = 0; k < {d_in}; k += {lanes}) {{\n{body}        }}\n"
            f"        float acc = ({' + '.join(f's{lane}' for lane in range(lanes))})"
            f"{scaled} + {name}_bias[o];\n"
            f"        {dst}[o] = {out};\n"
            f"    }}\n")
    return tables, loop


def export_c(artifact: str | Path, out_dir: Path, variant: str = "float32",
             calibration: np.ndarray | None = None) -> list[Path]:
    """Write splitexit_head.c and .h for the edge artifact (DIR or DIR/edge.npz) into
    out_dir, its junctions as stored (ELL stays ELL); returns their paths. For int8,
    `calibration` frames (pixels in [0, 1]) make the rounding error-compensating."""
    if variant not in C_VARIANTS:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(C_VARIANTS)}")
    head = require_mlp(load_numpy_head(artifact, dense_max_elements=0), "the C export")
    int8: list = [None] * (len(head.layers) + 1)
    kind = variant
    if variant == "int8":
        int8 = int8_tables(head, calibration)
        kind += (", rounded to nearest" if calibration is None else
                 f", rounding compensated on {len(calibration)} training frames")
    widths = [head.input_pad or head.input_size] + [j.bias.shape[0] for j in head.layers]
    classes = head.exit.bias.shape[0]
    scratch = max(widths[1:])
    tables, loops = "", ""
    src = "x"
    for i, layer in enumerate(head.layers):
        dst = "features" if i == len(head.layers) - 1 else ("a" if i % 2 == 0 else "b")
        t, loop = _junction(f"layer{i}", layer, widths[i], src, dst, int8[i], relu=True)
        tables, loops, src = tables + t, loops + loop, dst
        if i + 1 == head.exit_layer:  # before a later layer can overwrite what it reads
            t, loop = _junction("exit", head.exit, widths[i + 1], src, "exit_logits",
                                int8[-1], relu=False)
            tables, loops = tables + t, loops + loop
    guard = "SPLITEXIT_HEAD_H"
    header = (f"/* splitexit head {head.model_id} ({kind}): generated by `splitexit export`."
              f" */\n#ifndef {guard}\n#define {guard}\n\n"
              f"#define SPLITEXIT_MODEL_ID \"{head.model_id}\"\n"
              f"#define SPLITEXIT_INPUT {head.input_size}      /* pixels in [0, 1], row-major */\n"
              f"#define SPLITEXIT_FEATURES {widths[-1]}   /* sent to the server when unsure */\n"
              f"#define SPLITEXIT_CLASSES {classes}\n"
              f"#define SPLITEXIT_EXIT_TEMPERATURE {_float(np.float32(head.temperature))}\n"
              f"#define SPLITEXIT_THRESHOLD {_float(head.threshold)}  /* exit if {head.score} "
              f"of softmax(exit_logits / SPLITEXIT_EXIT_TEMPERATURE) >= this */\n\n"
              f"void splitexit_head(const float pixels[SPLITEXIT_INPUT],\n"
              f"                    float features[SPLITEXIT_FEATURES],\n"
              f"                    float exit_logits[SPLITEXIT_CLASSES]);\n\n#endif\n")
    pad = ""
    if head.input_pad:
        pad = (f"    for (int i = {head.input_size}; i < {head.input_pad}; ++i)\n"
               f"        x[i] = 0.0f;  /* the input padding */\n")
    source = (f"/* splitexit head {head.model_id} ({kind}): generated by `splitexit export`."
              f" */\n#include <stdint.h>\n#include \"{H_FILE}\"\n\n"
              f"static const float pixel_mean = {_float(head.pixel_mean)};\n"
              f"static const float pixel_scale = {_float(np.float32(1) / head.pixel_std)};"
              f"  /* 1 / std: a multiply, not a divide, per pixel */\n\n{tables}\n"
              f"void splitexit_head(const float pixels[SPLITEXIT_INPUT],\n"
              f"                    float features[SPLITEXIT_FEATURES],\n"
              f"                    float exit_logits[SPLITEXIT_CLASSES]) {{\n"
              f"    float x[{widths[0]}], a[{scratch}], b[{scratch}];\n"
              f"    (void)a; (void)b;\n"
              f"    for (int i = 0; i < {head.input_size}; ++i)\n"
              f"        x[i] = (pixels[i] - pixel_mean) * pixel_scale;\n{pad}{loops}}}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / H_FILE).write_text(header)
    (out_dir / C_FILE).write_text(source)
    return [out_dir / C_FILE, out_dir / H_FILE]
