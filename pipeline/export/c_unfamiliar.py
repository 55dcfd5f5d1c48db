"""The unfamiliarity score (pipeline/floor/unfamiliar.py) as C, for the exported head: how
unlike the training set a frame is, from the activations the exit reads. export_c.py places
the call where those activations are still whole (before a later layer can overwrite them).

The sums run in double over (z - m)^2 terms (NumPy's `Unfamiliarity.score` computes the
expanded |z|^2 - 2 z.m + |m|^2 as one matrix product, in float64, where it cannot cancel
digits a float32 sum would lose at distances near 900): on the same features the two agree
to about 1e-12, so C and NumPy flag the same frames.
The tables are float32, as stored (also in the int8 variant: d + C d floats, or d (d + 1) / 2
+ C d for the full form, small beside its junctions).

    diagonal  z_j = f_j w_j, one feature at a time: no buffer
    full      z = f R, accumulated a row of R at a time into d doubles: R's lower triangle
              stored row by row, d (d + 1) / 2 floats (a whiten with anything above its
              diagonal, which `fit` never writes, is stored whole)

Each z_j updates a block of up to 8 class sums at once, each in a register (the means stored
feature-major), so the adds form independent chains rather than one chain of C d: on the
default head's 400 features, about 2 us a frame against 7 us a class at a time (x86-64, -O2;
docs/export.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.export.c_literals import c_array
from pipeline.floor.unfamiliar import Unfamiliarity

__all__ = ["CScore", "c_score", "NO_SCORE"]

FUNCTION = "unfamiliar_score"
# Class sums a pass over the features keeps in registers (x86-64 and AArch64 have 16 or 32
# floating-point registers; a Cortex-M4's 16 single-precision ones hold 8 doubles' worth)
BLOCK = 8


@dataclass(frozen=True)
class CScore:
    """What export_c pastes in for the score: tables and the function (before the head's
    body), the expression the head assigns to *unfamiliarity, its scratch bytes, and the
    header's lines."""
    source: str
    call: str
    scratch_bytes: int          # doubles f and z: on the stack (MLP), static (conv)
    table_bytes: int            # the const float tables (flash)
    multiply_adds: int          # a frame's, from the features the exit reads
    header: str


NO_SCORE_HEADER = ("#define SPLITEXIT_UNFAMILIAR 0          /* no unfamiliarity score in "
                   "this artifact: splitexit_head_scored writes 0 */\n"
                   "#define SPLITEXIT_UNFAMILIAR_FLAGS 0    /* nothing is flagged */\n"
                   "#define SPLITEXIT_UNFAMILIAR_THRESHOLD 0x0p+0  /* unused */\n")
NO_SCORE = CScore("", "0.0", 0, 0, 0, NO_SCORE_HEADER)


def _whiten_table(u: Unfamiliarity) -> tuple[np.ndarray, str]:
    """(the table, the last column j row i adds to): R's lower triangle row by row where R
    is lower triangular, else every row whole."""
    r = u.whiten
    if np.triu(r, 1).any():
        return r.ravel(), f"{u.features - 1}"
    return np.concatenate([r[i, :i + 1] for i in range(u.features)]), "i"


def _blocks(classes: int) -> list[range]:
    """Classes in near-equal blocks of at most BLOCK: one pass over the features each."""
    n = -(-classes // BLOCK)
    return [range(classes * b // n, classes * (b + 1) // n) for b in range(n)]


def _block(block: range, d: int, classes: int, z: str) -> str:
    """One pass over the features summing the (z - m)^2 terms of `block`'s classes, one
    register each, then the nearest so far in `best`."""
    sums = [f"s{k}" for k in range(len(block))]
    terms = "".join(f"            e = z - m[{k}];\n            {s} += e * e;\n"
                    for k, s in enumerate(sums))
    nearest = "".join(f"        best = {s};\n" if c == 0 else
                      f"        best = {s} < best ? {s} : best;\n"
                      for c, s in zip(block, sums))
    return (f"    {{  /* classes {block.start} to {block.stop - 1} */\n"
            f"        double {', '.join(f'{s} = 0.0' for s in sums)};\n"
            f"        for (int j = 0; j < {d}; ++j) {{\n"
            f"            {z}\n"
            f"            const float *m = unfamiliar_means + j * {classes} + {block.start};\n"
            f"            double e;\n{terms}"
            f"        }}\n{nearest}"
            f"    }}\n")


def _header(u: Unfamiliarity) -> str:
    if u.threshold is None:
        flags = ("#define SPLITEXIT_UNFAMILIAR_FLAGS 0    /* no threshold chosen: scored, "
                 "never flagged */\n#define SPLITEXIT_UNFAMILIAR_THRESHOLD 0x0p+0  /* unused */\n")
    else:   # a float64, exactly what the NumPy edge compares with
        flags = (f"#define SPLITEXIT_UNFAMILIAR_FLAGS 1    /* a frame scoring above the "
                 f"threshold is unfamiliar */\n"
                 f"#define SPLITEXIT_UNFAMILIAR_THRESHOLD {float(u.threshold).hex()}  /* "
                 f"{u.threshold!r}: flags {u.flag_rate:.1%} of familiar validation frames */\n")
    form = "diagonal" if u.diagonal else "full"
    return (f"#define SPLITEXIT_UNFAMILIAR 1          /* splitexit_head_scored computes the "
            f"unfamiliarity score ({form} form, {u.features} features) */\n{flags}")


def c_score(u: Unfamiliarity | None, shape: tuple[int, ...], static: bool) -> CScore:
    """The score for an exit reading activations of `shape`: (C, H, W) (a conv map: its
    per-channel means) or (n,); `static` puts its double scratch in static RAM (a conv head,
    not reentrant anyway) instead of on the stack."""
    if u is None:
        return NO_SCORE
    d, classes = u.features, u.means.shape[0]
    storage = "static double" if static else "double"
    # each feature's class means side by side: one pass over the features updates a block
    # of classes' sums, independent chains of adds held in registers
    tables = c_array("float", "unfamiliar_means", u.means.T.astype(np.float32))
    body, madds, scratch = "", classes * d, 0   # the (z - m)^2 terms
    if len(shape) == 3:
        hw = shape[1] * shape[2]
        body += (f"    {storage} f[{d}];\n"
                 f"    for (int c = 0; c < {d}; ++c) {{  /* each channel's mean */\n"
                 f"        double sum = 0.0;\n"
                 f"        for (int i = 0; i < {hw}; ++i)\n"
                 f"            sum += seen[c * {hw} + i];\n"
                 f"        f[c] = sum / {hw}.0;\n"
                 f"    }}\n")
        feature, scratch, madds = "f[{}]", scratch + 8 * d, madds + d * hw
    else:
        feature = "(double)seen[{}]"
    if u.diagonal:
        table = u.whiten
        z = f"const double z = {feature.format('j')} * unfamiliar_whiten[j];"
        madds += d * len(_blocks(classes))
    else:   # z = f R a row of R at a time: z[j] += f_i R[i][j], no chain of dependent adds
        table, last = _whiten_table(u)
        body += (f"    {storage} zs[{d}];\n"
                 f"    for (int j = 0; j < {d}; ++j)\n"
                 f"        zs[j] = 0.0;\n"
                 f"    for (int i = 0, at = 0; i < {d}; ++i) {{  /* z = f R */\n"
                 f"        const double fi = {feature.format('i')};\n"
                 f"        for (int j = 0; j <= {last}; ++j)\n"
                 f"            zs[j] += fi * unfamiliar_whiten[at++];\n"
                 f"    }}\n")
        z, scratch, madds = "const double z = zs[j];", scratch + 8 * d, madds + table.size
    tables += c_array("float", "unfamiliar_whiten", table.astype(np.float32))
    source = (f"/* The unfamiliarity score of the {d} features the exit reads "
              f"(pipeline/floor/unfamiliar.py): the squared distance of the whitened features "
              f"to the nearest of {classes} class means, in double, a sum of (z - m)^2 terms */\n"
              f"{tables}\n"
              f"static double {FUNCTION}(const float *seen)\n{{\n{body}    double best = 0.0;\n"
              + "".join(_block(block, d, classes, z) for block in _blocks(classes)) +
              "    return best;\n}\n\n")
    return CScore(source, FUNCTION + "({})", scratch, 4 * (table.size + u.means.size), madds,
                  _header(u))
