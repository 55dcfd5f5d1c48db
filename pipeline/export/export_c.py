"""The head and exit as one dependency-free C99 file pair, for devices that run no Python.

    splitexit export runs/default --target c --out head/     # head/splitexit_head.{c,h}
    cc -O2 -c head/splitexit_head.c                          # no libc beyond <stdint.h>

The tables are `const` arrays (flash on a microcontroller); the one function takes a frame
and writes the split features and the exit logits, allocating nothing:

    void splitexit_head(const float pixels[SPLITEXIT_INPUT],
                        float features[SPLITEXIT_FEATURES], float exit_logits[SPLITEXIT_CLASSES]);
    void splitexit_head_scored(..., double *unfamiliarity);   /* and the frame's score */

The score (an artifact trained with one: c_unfamiliar.py) is computed inside the head from
the activations the exit reads, before a later layer can overwrite them; the header states
SPLITEXIT_UNFAMILIAR and its threshold. Without one, the head is what it always was and the
score is 0.

A sparse junction is ELL: for each output, d_in (value, input index) pairs, indices as narrow
as the input width allows. `int8` stores each junction's values as int8 with one float scale
per output row (4x smaller tables); inputs and accumulators stay float. Given calibration
frames, the integers are chosen so rounding errors cancel on such frames (int8_weights.py).
An MLP head's scratch is two stack buffers as wide as the widest edge layer, plus the
standardized frame: a few KiB.

A conv head keeps the same signature, the frame CHW; its int8 variant stores each conv's
kernels as int8 with one float scale per output channel, rounded as a junction's rows are
(int8_weights.py), and applies the scale once per pooled output, not per tap. A sparse conv
stores, per output channel, its d_in kernels and the input channel each reads, and loops
over those only: its work is C_out x d_in x k x k per output pixel, what the NumPy head and
the MAC counts say, not C_out x C_in x k x k. Its scratch -- the padded input, one output
channel's sums, two activation maps -- is tens of KiB (16 x 28 x 28 floats is 49 KiB), more
than many microcontroller stacks (1-8 KiB, overflowing silently), so it is `static`: sized
at link time, where the linker says when RAM is short. The price, stated in the header:
the function is not reentrant.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.export.c_literals import c_array, c_float
from pipeline.export.c_unfamiliar import NO_SCORE, CScore, c_score
from pipeline.export.export_edge import export_edge
from pipeline.edge.numpy_head import ConvStage, Junction, NumpyHead, load_numpy_head
from pipeline.export.int8_weights import int8_tables, junction_rows

__all__ = ["export_c", "C_VARIANTS", "C_FILE", "H_FILE"]

C_FILE, H_FILE = "splitexit_head.c", "splitexit_head.h"
C_VARIANTS = ("float32", "int8")
VECTOR = 16  # floats: a multiple of every SIMD width up to 512 bits
# Partial sums of a conv head's junctions: its exit reads thousands of inputs an output
# (3136 on conv-sparse), and 4 chains of dependent adds made it a third of the head's time.
LANES = 16


def _index_type(n_in: int) -> tuple[str, type]:
    if n_in <= 1 << 8:
        return "uint8_t", np.uint8
    if n_in <= 1 << 16:
        return "uint16_t", np.uint16
    return "uint32_t", np.uint32


def _junction(name: str, j: Junction, n_in: int, src: str, dst: str,
              int8: tuple[np.ndarray, np.ndarray] | None, relu: bool,
              lanes: int = 4) -> tuple[str, str]:
    """(tables, loop) computing dst[o] from src for one junction; int8: (values, scales);
    `lanes` partial sums where d_in allows (else 4, else 1)."""
    values, _ = junction_rows(j)   # (N_out, d_in or N_in)
    n_out, d_in = values.shape
    tables, scaled = "", ""
    if int8 is not None:
        q, scale = int8
        tables += (c_array("int8_t", f"{name}_values", q)
                   + c_array("float", f"{name}_scale", scale))
        scaled = f" * {name}_scale[o]"
    else:
        tables += c_array("float", f"{name}_values", values.astype(np.float32))
    tables += c_array("float", f"{name}_bias", j.bias)
    if j.indices is None:
        def read(k: str) -> str:
            return f"{src}[{k}]"
    else:
        ctype, np_type = _index_type(n_in)
        tables += c_array(ctype, f"{name}_index", j.indices.astype(np_type))

        def read(k: str) -> str:
            return f"{src}[{name}_index[o * {d_in} + {k}]]"
    out = "acc > 0.0f ? acc : 0.0f" if relu else "acc"
    # Partial sums: one running sum makes every multiply-add wait for the last add.
    lanes = next(n for n in (lanes, 4, 1) if d_in % n == 0)
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


def _conv(name: str, conv: ConvStage, shape: tuple[int, ...], src: str, dst: str,
          first: bool, scratch: dict[str, int],
          int8: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[str, str, tuple[int, int, int]]:
    """(tables, loops, output shape) for one conv, its max pool and ReLU, CHW in and out;
    int8: (kernels as rows, one scale per output channel). The input is staged once into
    `padded` with its zero border (the first layer's standardized there), so the tap loops
    run branch-free over whole rows."""
    c_in, h, w = shape
    c_out, d_in, k, _ = conv.weight.shape
    pad, s, pool = k // 2, conv.stride, conv.pool
    hp, wp = h + 2 * pad, w + 2 * pad
    ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
    hq, wq = ho // pool, wo // pool
    if int8 is None:
        tables, start = c_array("float", f"{name}_weight", conv.weight), f"{name}_bias[o]"
    else:  # the sums of int8 kernels: scaled and biased once, after the pool (scale > 0)
        tables = c_array("int8_t", f"{name}_weight", int8[0]) + \
            c_array("float", f"{name}_scale", int8[1])
        start = "0.0f"
    tables += c_array("float", f"{name}_bias", conv.bias)

    def scaled(v: str) -> str:
        return v if int8 is None else f"{v} * {name}_scale[o] + {name}_bias[o]"
    if conv.indices is None:
        channel, reads = "j", f"dense: all {c_in}"
    else:
        ctype, np_type = _index_type(c_in)
        tables += c_array(ctype, f"{name}_index", conv.indices.astype(np_type))
        channel, reads = f"{name}_index[o * {d_in} + j]", f"{d_in} of {c_in}"
    loop = (f"    /* {name}: conv {c_in}x{h}x{w} -> {c_out}x{ho}x{wo}, {k}x{k} stride {s}, "
            f"{reads} input channels each{f', max pool {pool}' if pool > 1 else ''}, ReLU */\n")
    if first or pad:
        value = "(pixels[i] - pixel_mean[c]) * pixel_scale[c]" if first else f"{src}[i]"
        if pad:
            loop += (f"    for (int i = 0; i < {c_in * hp * wp}; ++i)\n"
                     f"        padded[i] = 0.0f;\n")
        loop += (f"    for (int c = 0; c < {c_in}; ++c)\n"
                 f"        for (int y = 0; y < {h}; ++y)\n"
                 f"            for (int x = 0; x < {w}; ++x) {{\n"
                 f"                int i = (c * {h} + y) * {w} + x;\n"
                 f"                padded[(c * {hp} + y + {pad}) * {wp} + x + {pad}] = {value};\n"
                 f"            }}\n")
        src = "padded"
    # One kernel row (k taps) per pass over the outputs: k multiply-adds per load and store
    # of the sums. Tap by tap was 1.2-1.7x slower at -O2, and -O3 interchanged that nest
    # into a scalar loop (5x slower).
    if s == 1:
        # Over the padded width: one flat run of (ho - 1) * wp + wo outputs, rounded up to a
        # multiple of VECTOR, the columns past wo wasted (never read). A long run no SIMD
        # width leaves a remainder of is what -O2 vectorizes (GCC's cheap cost model wants
        # no epilogue), even where a row is only 7 wide.
        row, span = wp, -(-((ho - 1) * wp + wo) // VECTOR) * VECTOR
        reach = (c_in - 1) * hp * wp + (k - 1) * wp + k - 1 + span   # the last read + 1
        outputs, at, target = [f"for (int i = 0; i < {span}; ++i)"], "i", "sums[i]"
    else:
        row, span, reach = wo, ho * wo, c_in * hp * wp
        outputs = [f"for (int y = 0; y < {ho}; ++y)", f"for (int x = 0; x < {wo}; ++x)"]
        at, target = f"y * {s * wp} + x * {s}", f"sums[y * {wo} + x]"
    indent = 16 + 4 * len(outputs)
    terms = f"\n{' ' * (indent + 4)}+ ".join(
        f"{name}_weight[tap + {kx}] * {src}[base + {at} + {kx}]" for kx in range(k))
    taps = "".join(f"{' ' * (16 + 4 * n)}{line}\n" for n, line in enumerate(outputs)) + \
        f"{' ' * indent}{target} += {terms};\n"
    scratch["sums"] = max(scratch.get("sums", 0), span)
    scratch[src] = max(scratch.get(src, 0), reach)
    if pool > 1:
        out = (f"        for (int y = 0; y < {hq}; ++y)\n"
               f"            for (int x = 0; x < {wq}; ++x) {{\n"
               f"                float m = sums[y * {pool * row} + x * {pool}];\n"
               f"                for (int dy = 0; dy < {pool}; ++dy)\n"
               f"                    for (int dx = 0; dx < {pool}; ++dx) {{\n"
               f"                        float v = sums[(y * {pool} + dy) * {row} + x * {pool}"
               f" + dx];\n"
               f"                        m = v > m ? v : m;\n"
               f"                    }}\n"
               + (f"                m = {scaled('m')};\n" if int8 is not None else "") +
               f"                {dst}[(o * {hq} + y) * {wq} + x] = m > 0.0f ? m : 0.0f;\n"
               f"            }}\n")
    else:
        out = (f"        for (int y = 0; y < {ho}; ++y)\n"
               f"            for (int x = 0; x < {wo}; ++x) {{\n"
               f"                float v = {scaled(f'sums[y * {row} + x]')};\n"
               f"                {dst}[(o * {ho} + y) * {wo} + x] = v > 0.0f ? v : 0.0f;\n"
               f"            }}\n")
    loop += (f"    for (int o = 0; o < {c_out}; ++o) {{\n"
             f"        for (int i = 0; i < {span}; ++i)\n"
             f"            sums[i] = {start};\n"
             f"        for (int j = 0; j < {d_in}; ++j) {{\n"
             f"            const int c = {channel};\n"
             f"            for (int ky = 0; ky < {k}; ++ky) {{\n"
             f"                const int tap = ((o * {d_in} + j) * {k} + ky) * {k};\n"
             f"                const int base = c * {hp * wp} + ky * {wp};\n"
             f"{taps}"
             f"            }}\n"
             f"        }}\n{out}    }}\n")
    return tables, loop, (c_out, hq, wq)


def _exit_pool(src: str, shape: tuple[int, ...], side: int) -> str:
    """The exit's input averaged over side x side bins, drawn as adaptive_avg_pool2d draws
    them (bin i: floor(i*H/side) to ceil((i+1)*H/side); they overlap where side does not
    divide H)."""
    c, h, w = shape
    return (f"    for (int c = 0; c < {c}; ++c)  /* the exit's average pool: {h}x{w} -> "
            f"{side}x{side} */\n"
            f"        for (int i = 0; i < {side}; ++i)\n"
            f"            for (int j = 0; j < {side}; ++j) {{\n"
            f"                const int top = i * {h} / {side}, "
            f"bottom = ((i + 1) * {h} + {side - 1}) / {side};\n"
            f"                const int left = j * {w} / {side}, "
            f"right = ((j + 1) * {w} + {side - 1}) / {side};\n"
            f"                float sum = 0.0f;\n"
            f"                for (int y = top; y < bottom; ++y)\n"
            f"                    for (int x = left; x < right; ++x)\n"
            f"                        sum += {src}[(c * {h} + y) * {w} + x];\n"
            f"                pooled[(c * {side} + i) * {side} + j] = "
            f"sum / (float)((bottom - top) * (right - left));\n"
            f"            }}\n")


def _conv_source(head: NumpyHead, int8: list | None = None
                 ) -> tuple[str, str, int, CScore]:
    """(tables, function body, scratch floats, the unfamiliarity score) of a conv head:
    convs, then any junctions, the exit reading its layer (pooled first if it says so) and
    the score on it before a later one runs; int8: each layer's (int8 rows, scales), the
    exit's last (None: float32)."""
    int8 = int8 or [None] * (len(head.layers) + 1)
    tables, loops, scratch, score = "", "", {}, NO_SCORE
    shape: tuple[int, ...] = tuple(head.input_shape)
    src = "pixels"
    for i, layer in enumerate(head.layers):
        dst = "features" if i == len(head.layers) - 1 else ("a" if i % 2 == 0 else "b")
        if isinstance(layer, ConvStage):
            t, loop, shape = _conv(f"layer{i}", layer, shape, src, dst, i == 0, scratch,
                                   int8[i])
        else:
            t, loop = _junction(f"layer{i}", layer, int(np.prod(shape)), src, dst, int8[i],
                                True, LANES)
            shape = (layer.bias.shape[0],)
        if dst != "features":
            scratch[dst] = max(scratch.get(dst, 0), int(np.prod(shape)))
        tables, loops, src = tables + t, loops + loop, dst
        if i + 1 == head.exit_layer:  # before a later layer can overwrite what it reads
            seen, n_seen = src, int(np.prod(shape))
            if head.exit_pool:
                loops += _exit_pool(src, shape, head.exit_pool)
                seen, n_seen = "pooled", shape[0] * head.exit_pool ** 2
                scratch["pooled"] = n_seen
            t, loop = _junction("exit", head.exit, n_seen, seen, "exit_logits", int8[-1],
                                False, LANES)
            score = c_score(head.unfamiliarity, shape, static=True)
            tables, loops = tables + t, loops + loop + _scored(score, src)
    buffers = "".join(f"static float {name}[{size}];\n" for name, size in scratch.items())
    return tables + "\n" + buffers + "\n" + score.source, loops, sum(scratch.values()), score


def _scored(score: CScore, src: str) -> str:
    """The head's line that scores the activations in `src`, the exit's input."""
    return (f"    if (unfamiliarity)  /* before a later layer can overwrite {src} */\n"
            f"        *unfamiliarity = {score.call.format(src)};\n")


def _header(head: NumpyHead, kind: str, features: int, frame: str, score: CScore,
            note: str = "") -> str:
    guard = "SPLITEXIT_HEAD_H"
    return (f"/* splitexit head {head.model_id} ({kind}): generated by `splitexit export`."
            f" */\n#ifndef {guard}\n#define {guard}\n\n"
            f"#ifdef __cplusplus\nextern \"C\" {{\n#endif\n\n"   # C++ callers link to it
            f"#define SPLITEXIT_MODEL_ID \"{head.model_id}\"\n{frame}"
            f"#define SPLITEXIT_FEATURES {features}   /* sent to the server when unsure */\n"
            f"#define SPLITEXIT_CLASSES {head.exit.bias.shape[0]}\n"
            f"#define SPLITEXIT_EXIT_TEMPERATURE {c_float(np.float32(head.temperature))}\n"
            f"#define SPLITEXIT_THRESHOLD {c_float(head.threshold)}  /* exit if {head.score} "
            f"of softmax(exit_logits / SPLITEXIT_EXIT_TEMPERATURE) >= this */\n{score.header}"
            f"\n{note}"
            f"void splitexit_head(const float pixels[SPLITEXIT_INPUT],\n"
            f"                    float features[SPLITEXIT_FEATURES],\n"
            f"                    float exit_logits[SPLITEXIT_CLASSES]);\n\n"
            f"/* The same, and the frame's unfamiliarity score in *unfamiliarity (unless NULL):\n"
            f" * how unlike the training set the activations the exit reads are\n"
            f" * (pipeline/floor/unfamiliar.py; 0 when SPLITEXIT_UNFAMILIAR is 0). Where\n"
            f" * SPLITEXIT_UNFAMILIAR_FLAGS is 1, a frame with a score above\n"
            f" * SPLITEXIT_UNFAMILIAR_THRESHOLD is unfamiliar: never answered by the exit. */\n"
            f"void splitexit_head_scored(const float pixels[SPLITEXIT_INPUT],\n"
            f"                           float features[SPLITEXIT_FEATURES],\n"
            f"                           float exit_logits[SPLITEXIT_CLASSES],\n"
            f"                           double *unfamiliarity);\n\n"
            f"#ifdef __cplusplus\n}}\n#endif\n\n#endif\n")


def _static_assert(name: str, condition: str) -> str:
    """A compile-time check in C99 (no _Static_assert there): an array of size -1 is an
    error. Guards the buffers the loops index against a header edited by hand."""
    return f"typedef char splitexit_{name}[({condition}) ? 1 : -1];\n\n"


# The head's body scores the frame where asked; splitexit_head is it without the score.
WRAPPER = ("void splitexit_head(const float pixels[SPLITEXIT_INPUT],\n"
           "                    float features[SPLITEXIT_FEATURES],\n"
           "                    float exit_logits[SPLITEXIT_CLASSES]) {\n"
           "    splitexit_head_scored(pixels, features, exit_logits, (double *)0);\n}\n")
SIGNATURE = ("void splitexit_head_scored(const float pixels[SPLITEXIT_INPUT],\n"
             "                           float features[SPLITEXIT_FEATURES],\n"
             "                           float exit_logits[SPLITEXIT_CLASSES],\n"
             "                           double *unfamiliarity) {\n")


def _tables(head: NumpyHead, variant: str, calibration: np.ndarray | None
            ) -> tuple[list, str]:
    """(each layer's int8 (rows, scales), the exit's last, or None each for float32; the
    variant as the files' first line names it)."""
    if variant != "int8":
        return [None] * (len(head.layers) + 1), variant
    return int8_tables(head, calibration), variant + (
        ", rounded to nearest" if calibration is None else
        f", rounding compensated on {len(calibration)} training frames")


def _mlp_files(head: NumpyHead, int8: list, kind: str) -> tuple[str, str]:
    widths = [head.input_pad or head.input_size] + [j.bias.shape[0] for j in head.layers]
    scratch = max(widths[1:])
    tables, loops, score = "", "", NO_SCORE
    src = "x"
    # float32 reads raw pixels with the standardization folded into layer 0, as the NumPy
    # edge does (its rounding, hence its bytes); int8 rows were fitted to the layer as trained.
    folded = int8[0] is None
    layers = [head._first, *head.layers[1:]] if folded else head.layers
    for i, layer in enumerate(layers):
        dst = "features" if i == len(head.layers) - 1 else ("a" if i % 2 == 0 else "b")
        t, loop = _junction(f"layer{i}", layer, widths[i], src, dst, int8[i], relu=True)
        tables, loops, src = tables + t, loops + loop, dst
        if i + 1 == head.exit_layer:  # before a later layer can overwrite what it reads
            t, loop = _junction("exit", head.exit, widths[i + 1], src, "exit_logits",
                                int8[-1], relu=False)
            score = c_score(head.unfamiliarity, (widths[i + 1],), static=False)
            tables, loops = tables + t, loops + loop + _scored(score, src)
    frame = f"#define SPLITEXIT_INPUT {head.input_size}      /* pixels in [0, 1], row-major */\n"
    header = _header(head, kind, widths[-1], frame, score)
    pad = ""
    if head.input_pad:
        pad = (f"    for (int i = {head.input_size}; i < {head.input_pad}; ++i)\n"
               f"        x[i] = 0.0f;  /* the input padding */\n")
    if folded:
        standardize, read = ("/* pixels are standardized by layer 0's weights and bias: "
                             "(p - mean) / std folded in */\n"), "pixels[i]"
    else:
        standardize = (f"static const float pixel_mean = {c_float(head.pixel_mean)};\n"
                       f"static const float pixel_scale = "
                       f"{c_float(np.float32(1) / head.pixel_std)};"
                       f"  /* 1 / std: a multiply, not a divide, per pixel */\n")
        read = "(pixels[i] - pixel_mean) * pixel_scale"
    source = (f"/* splitexit head {head.model_id} ({kind}): generated by `splitexit export`."
              f" */\n#include <stdint.h>\n#include \"{H_FILE}\"\n\n"
              f"{standardize}\n{tables}\n{score.source}"
              f"{_static_assert('input_fits', f'SPLITEXIT_INPUT <= {widths[0]}')}"
              f"{SIGNATURE}"
              f"    float x[{widths[0]}], a[{scratch}], b[{scratch}];\n"
              f"    (void)a; (void)b;\n"
              f"    for (int i = 0; i < {head.input_size}; ++i)\n"
              f"        x[i] = {read};\n{pad}{loops}}}\n\n{WRAPPER}")
    return header, source


def _conv_files(head: NumpyHead, int8: list, kind: str) -> tuple[str, str]:
    c, h, w = head.input_shape
    tables, loops, scratch, score = _conv_source(head, int8)
    frame = (f"#define SPLITEXIT_INPUT {head.input_size}      /* pixels in [0, 1]: CHW, "
             f"row-major, RGB order for 3 channels */\n"
             f"#define SPLITEXIT_CHANNELS {c}\n#define SPLITEXIT_HEIGHT {h}\n"
             f"#define SPLITEXIT_WIDTH {w}\n")
    static = f" and {score.scratch_bytes // 8} doubles" if score.scratch_bytes else ""
    note = (f"/* Not reentrant: its scratch ({scratch} floats{static}) is static, not on the "
            f"stack; one call at a time. */\n")
    header = _header(head, kind, head.width, frame, score, note)
    scale = (np.float32(1) / head.pixel_std).astype(np.float32)
    source = (f"/* splitexit head {head.model_id} ({kind}): generated by `splitexit export`."
              f" */\n#include <stdint.h>\n#include \"{H_FILE}\"\n\n"
              f"{c_array('float', 'pixel_mean', head.pixel_mean.astype(np.float32))}"
              f"/* 1 / std per channel: a multiply, not a divide, per pixel */\n"
              f"{c_array('float', 'pixel_scale', scale)}\n{tables}\n"
              f"{_static_assert('input_fits', f'SPLITEXIT_INPUT == {c * h * w}')}"
              f"{SIGNATURE}{loops}}}\n\n{WRAPPER}")
    return header, source


def _head_bytes(head: NumpyHead) -> tuple[int, int]:
    """(stack, static) bytes of splitexit_head's scratch, as export_c lays it out."""
    if head.convolutional:
        _, _, floats, score = _conv_source(head)
        return 0, 4 * floats + score.scratch_bytes
    widths = [j.bias.shape[0] for j in head.layers]
    score = c_score(head.unfamiliarity, (widths[head.exit_layer - 1],), static=False)
    return 4 * ((head.input_pad or head.input_size) + 2 * max(widths)) + score.scratch_bytes, 0


def export_c(artifact: str | Path, out_dir: Path, variant: str = "float32",
             calibration: np.ndarray | None = None, unfamiliar: bool = True) -> list[Path]:
    """Write splitexit_head.c and .h for the edge artifact (DIR or DIR/edge.npz) into
    out_dir, its junctions as stored (ELL stays ELL); returns their paths. For int8,
    `calibration` frames (pixels in [0, 1], a conv head's CHW) make the rounding
    error-compensating. `unfamiliar=False` leaves the unfamiliarity score out (its tables
    are the default's largest after the static code: 17.6 KB of flash), so the device
    answers every confident frame as an edge trained without one would."""
    if variant not in C_VARIANTS:
        raise ValueError(f"variant {variant!r}: choose one of {', '.join(C_VARIANTS)}")
    head = load_numpy_head(artifact, dense_max_elements=0)
    if not unfamiliar:
        head = dataclasses.replace(head, unfamiliarity=None)
    files = _conv_files if head.convolutional else _mlp_files
    header, source = files(head, *_tables(head, variant, calibration))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / H_FILE).write_text(header)
    (out_dir / C_FILE).write_text(source)
    # the rest of the edge step (quantizer, coder, wire), which calls this head
    return [out_dir / C_FILE, out_dir / H_FILE,
            *export_edge(head, out_dir, variant, _head_bytes(head))]
