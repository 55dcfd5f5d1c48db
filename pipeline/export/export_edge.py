"""The whole edge step in C: what `splitexit export --target c` writes beside the head.

A device that runs only the head still has to quantize, code and frame its features before
the server takes a byte; re-implemented by hand, its bytes drift from the Python edge's.
So the export ships all of it, and a test compares the bytes with the Python edge's:

    splitexit_head.c/.h       the head and exit (export_c.py)
    edge_step.c               hand-written, the same for every model (pipeline/export/edge_step.c):
                              score, unfamiliarity flag, decision, uplink quantizer,
                              wire-v4 REQUEST, REPLY/ERROR;
                              with the static code's coders pasted in verbatim where the
                              template #includes them (pipeline/floor/coder.c, the one source
                              the worker and the NumPy edge run), so every shipped .c file is
                              one compile unit: `cc *.c` links
    splitexit_edge.h          generated here: the API, this model's sizes, stack and RAM
    splitexit_edge_model.h    generated here: this model's wire constants and code tables

    cc -std=c99 -O2 -c splitexit_head.c edge_step.c       # link with -lm (exp, log)

Only the per-model part is generated: constants and `const` tables (flash on a
microcontroller). Doubles (temperature, threshold) are written as C99 hex literals, so the C
side compares exactly the numbers the Python edge compares.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.export.c_literals import c_array
from pipeline.edge.numpy_head import SCORES, NumpyHead
from pipeline.protocol import wire
from pipeline.floor.native import CODER_SOURCE

__all__ = ["export_edge", "EDGE_FILES", "EDGE_H", "MODEL_H", "STEP_C"]

EDGE_H, MODEL_H = "splitexit_edge.h", "splitexit_edge_model.h"
STEP_C = "edge_step.c"
EDGE_FILES = (STEP_C, EDGE_H, MODEL_H)
CODER_INCLUDE = f'#include "{CODER_SOURCE.name}"\n'
TEMPLATE = Path(__file__).with_name(STEP_C)
# Scalars, spilled registers and the calls' frames beyond the arrays counted below: what
# gcc -fstack-usage reports above them (tests/test_export_edge.py checks the sum).
STACK_SLACK = 512


def _uplink(head: NumpyHead) -> tuple[wire.DType, bool]:
    """(dtype, static code?) the Python edge sends with its defaults (edge.config's auto): the
    unsigned dtype the uplink was trained for, coded with the model's static code when it
    has one for that dtype; int8 otherwise."""
    dtype = wire.DTYPE_FOR_BITS[head.uplink_bits] if head.uplink_bits else wire.DType.INT8
    code = head.code
    coded = (code is not None and dtype in wire.UNSIGNED_BITS and code.channels == head.width
             and code.symbols == 1 << wire.UNSIGNED_BITS[dtype])
    return dtype, coded


def _tables(head: NumpyHead, coded: bool) -> str:
    """The static code in its device form (coder.c's static_encode_compact): one uint16 a
    (channel, symbol), (length - 1) << 12 | cum, from which the coder derives the
    canonical codes, frequencies and rANS costs: 12.5 KiB for the default's 400
    channels, where the server's tables take 82 KiB (132 KiB with rANS's reciprocals)."""
    if not coded:
        return ""
    return c_array("uint16_t", "code_entry", head.code._tables.entry)


def _coder_cap(head: NumpyHead, coded: bool) -> int:
    """Bytes static_encode_compact may write for one frame: the most Huffman and rANS can
    each write, and room for their rounding (StaticCode._cap, what the Python edge gives it)."""
    if not coded:
        return 0
    return sum(head.code.payload_bounds(1, rans)[1] + 8 for rans in (False, True))


def export_edge(head: NumpyHead, out_dir: Path, kind: str,
                head_bytes: tuple[int, int]) -> list[Path]:
    """Write the edge step's files for `head` (loaded with every junction as stored) into
    out_dir, beside the head export_c wrote; `kind` names the head's variant, `head_bytes`
    its (stack, static) scratch bytes as export_c laid it out. Returns their paths."""
    dtype, coded = _uplink(head)
    bits = wire.UNSIGNED_BITS.get(dtype, 8)
    width, classes = head.width, head.exit.bias.shape[0]
    packed = wire.row_bytes(dtype, width)
    request = wire.REQUEST_HEADER_BYTES + wire.SCALE_BYTES + packed
    buffer = max(request, wire.REQUEST_HEADER_BYTES + wire.SCALE_BYTES
                 + _coder_cap(head, coded))
    head_stack, static = head_bytes
    # edge step: features (float), logits (float), codes (u8), the softmax (double)
    arrays = 4 * width + 4 * classes + width + 8 * classes
    stack = arrays + head_stack + STACK_SLACK
    tag = wire.model_tag(head.model_id)
    codec = ("coded with the model's static code (Huffman or rANS, the shorter) where that "
             "shrinks them" if coded else
             "packed, no codec: the Python edge's bytes with --codec none")
    names = wire.REFUSAL_NAMES
    initializer = ", ".join(f'[{int(r)}] = "{name}"' for r, name in names.items())
    refusals = ("".join(f"#define SPLITEXIT_REFUSAL_{r.name} {int(r)}\n" for r in names)
                + f"#define SPLITEXIT_REFUSAL_NAMES {{{initializer}}}  /* for a const char *[] "
                f"*/\n#define SPLITEXIT_REFUSAL_MAX {max(map(int, names))}\n")
    header = f"""/* splitexit edge {head.model_id} ({kind}): generated by `splitexit export`.
 * The whole edge step for one frame: head, exit score and decision, uplink quantizer, the
 * wire-v4 REQUEST, and the server's answers. Features go up as {dtype.name.lower()},
 * {codec}.
 * Build: cc -std=c99 -O2 -c splitexit_head.c edge_step.c (edge_step.c holds the coder);
 * link with -lm. Nothing is allocated; the tables are const. */
#ifndef SPLITEXIT_EDGE_H
#define SPLITEXIT_EDGE_H

#include <stddef.h>
#include <stdint.h>
#include "splitexit_head.h"

#ifdef __cplusplus
extern "C" {{
#endif

/* Memory: at most SPLITEXIT_EDGE_STACK_BYTES of stack for splitexit_edge_step (its arrays,
 * {arrays} B, the head's, {head_stack} B, and {STACK_SLACK} B for scalars and call frames),
 * SPLITEXIT_EDGE_STATIC_BYTES of static RAM (the head's scratch, if a conv head; else none),
 * and the caller's `out` buffer of SPLITEXIT_EDGE_BUFFER_BYTES. */
#define SPLITEXIT_EDGE_STACK_BYTES {stack}
#define SPLITEXIT_EDGE_STATIC_BYTES {static}
/* The largest REQUEST: 14 B header, a float16 scale, the packed codes */
#define SPLITEXIT_REQUEST_MAX_BYTES {request}
/* What `out` must hold: the request, or both coders' output while the shorter is chosen */
#define SPLITEXIT_EDGE_BUFFER_BYTES {buffer}

/* splitexit_edge_step and splitexit_encode_request: < 0 */
#define SPLITEXIT_E_CAP (-1)       /* cap < SPLITEXIT_EDGE_BUFFER_BYTES */
#define SPLITEXIT_E_CODER (-2)     /* a code table the export did not write (edited?) */

/* A class that is none of the model's: the frame is unlike anything it was trained on */
#define SPLITEXIT_UNKNOWN (-1)

typedef struct {{
    int32_t offload;    /* 1: send out[0 .. bytes) to the broker; 0: answered here */
    int32_t cls;        /* the exit's class: the answer, or the fallback for an offload;
                           SPLITEXIT_UNKNOWN for an unfamiliar frame */
    double confidence;  /* the exit's score ({head.score} of softmax(logits / temperature)) */
    size_t bytes;       /* the REQUEST's length; 0 when answered here */
    double unfamiliarity;  /* the frame's unfamiliarity score (0 without SPLITEXIT_UNFAMILIAR) */
    int32_t unfamiliar; /* 1: the score is above SPLITEXIT_UNFAMILIAR_THRESHOLD: offloaded,
                           never answered here */
}} splitexit_decision;

/* One frame: head, exit and unfamiliarity score; answered here if the exit's score reaches
 * the trained threshold and the frame is not unfamiliar, else the frame's REQUEST, one
 * frame, message id `msg_id`, into out (bytes equal the Python edge's for the same frame
 * and msg_id). Returns 0 or SPLITEXIT_E_*. Reentrant for an MLP head (a conv head's
 * scratch is static). */
int splitexit_edge_step(const float pixels[SPLITEXIT_INPUT], uint32_t msg_id,
                        uint8_t *out, size_t cap, splitexit_decision *decision);

/* The REQUEST for one frame's split features (what splitexit_head wrote): quantized with a
 * float16 scale, coded, framed. Returns its length, or SPLITEXIT_E_*. */
int64_t splitexit_encode_request(const float features[SPLITEXIT_FEATURES], uint32_t msg_id,
                                 uint8_t *out, size_t cap);

/* The exit's score of its logits (wire-independent: pipeline.edge.numpy_head.exit_scores),
 * and its class (the first largest logit) in *cls. */
double splitexit_exit_score(const float logits[SPLITEXIT_CLASSES], int32_t *cls);

/* An answer from the broker, for one-frame requests. */
#define SPLITEXIT_REPLY 0          /* the server's class and confidence for msg_id */
#define SPLITEXIT_REFUSED 1        /* an ERROR for msg_id: answer it with the fallback now */
/* < 0: not a valid answer (the wire's reasons); count it, wait on for the deadline */
#define SPLITEXIT_E_MALFORMED (-3)
#define SPLITEXIT_E_VERSION (-4)
#define SPLITEXIT_E_KIND (-5)
#define SPLITEXIT_E_SHAPE (-6)     /* not one frame's answer, or bytes missing or left over */
#define SPLITEXIT_E_FIELD (-7)     /* a value out of range; bad utf-8 in the worker id */
#define SPLITEXIT_E_NONFINITE (-8)
#define SPLITEXIT_E_ANSWER (-9)    /* a class >= SPLITEXIT_CLASSES (but the wire's unknown)
                                      or a confidence outside [0, 1]: no model's answer */
#define SPLITEXIT_E_SIZE (-10)     /* an ERROR longer than the wire allows */

/* The largest message the broker sends (an ERROR): a receive buffer of this many bytes
 * takes any answer whole */
#define SPLITEXIT_ANSWER_MAX_BYTES {wire.MAX_HEADER_BYTES}
/* An ERROR's reason (splitexit_answer.refusal) and the names the Python edge reports */
{refusals}
typedef struct {{
    uint32_t msg_id;        /* match it to the request in flight; another one is stale */
    int32_t cls;            /* REPLY: the class, or SPLITEXIT_UNKNOWN (the server found the
                               frame unfamiliar) */
    float confidence;       /* REPLY: the server's confidence */
    int32_t refusal;        /* ERROR: SPLITEXIT_REFUSAL_* */
    uint16_t queued;        /* REPLY: requests waiting in the broker (its load hint) */
    uint16_t free_credit;   /* REPLY: requests its workers could still take */
}} splitexit_answer;

/* Decode one message from the broker (one ZeroMQ frame): SPLITEXIT_REPLY, SPLITEXIT_REFUSED
 * or SPLITEXIT_E_*, with the checks wire.decode_answer makes. */
int splitexit_decode_answer(const uint8_t *msg, size_t len, splitexit_answer *answer);

#ifdef __cplusplus
}}
#endif

#endif
"""
    model = (f"/* splitexit edge {head.model_id}: this model's wire constants and code tables,"
             f" generated by `splitexit export`; included by edge_step.c only. */\n"
             f"#define SPLITEXIT_WIRE_VERSION {wire.VERSION}\n"
             f"#define SPLITEXIT_DTYPE {int(dtype)}    /* wire.DType.{dtype.name} */\n"
             f"#define SPLITEXIT_BITS {bits if dtype in wire.UNSIGNED_BITS else 0}"
             f"     /* unsigned code bits; 0: int8 */\n"
             f"#define SPLITEXIT_CODED {int(coded)}     /* the static code's tables below */\n"
             f"#define SPLITEXIT_SYMBOLS {head.code.symbols if coded else 0}\n"
             f"#define SPLITEXIT_PACKED_BYTES {packed}\n"
             f"#define SPLITEXIT_CODER_CAP {_coder_cap(head, coded)}\n"
             f"#define SPLITEXIT_SCORE {SCORES.index(head.score)}    /* {head.score}: "
             f"0 max_softmax, 1 margin, 2 entropy */\n"
             f"/* float64, exactly what the Python edge divides by and compares with */\n"
             f"#define SPLITEXIT_TEMPERATURE {float(head.temperature).hex()}  /* "
             f"{head.temperature!r} */\n"
             f"#define SPLITEXIT_EDGE_THRESHOLD {float(head.threshold).hex()}  /* "
             f"{head.threshold!r} */\n"
             f"#define SPLITEXIT_UNKNOWN_BYTE {wire.UNKNOWN_CLASS}  /* a REPLY's class byte for "
             f"`unknown` (wire.UNKNOWN_CLASS) */\n\n"
             f"static const uint8_t model_tag[4] = {{{', '.join(str(b) for b in tag)}}};\n\n"
             f"{_tables(head, coded)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EDGE_H).write_text(header)
    (out_dir / MODEL_H).write_text(model)
    step = TEMPLATE.read_text()
    if step.count(CODER_INCLUDE) != 1:
        raise RuntimeError(f"{TEMPLATE} must include {CODER_SOURCE.name} exactly once")
    (out_dir / STEP_C).write_text(step.replace(
        CODER_INCLUDE, f"/* ---- {CODER_SOURCE.name}, verbatim from pipeline/floor/ ---- */\n"
        f"{CODER_SOURCE.read_text()}/* ---- end of {CODER_SOURCE.name} ---- */\n"))
    return [out_dir / name for name in EDGE_FILES]
