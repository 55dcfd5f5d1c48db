/* The edge step after the head, the same for every model: `splitexit export --target c`
 * copies this file beside the generated splitexit_edge.h (the API) and
 * splitexit_edge_model.h (this model's constants and code tables). C99, no allocation.
 *
 * Each step is the Python edge's, to the byte (pipeline/edge/producer.py, numpy_head.py,
 * pipeline/floor/quantization.py, pipeline/protocol/wire.py and payload.py): the exit's
 * score in float64 on softmax(logits / temperature), the unfamiliarity flag (the head's
 * score above its threshold: offloaded, `unknown` if no answer comes), the uplink
 * quantizer (a float16 scale per frame, float32 division, round half to even, clip), the
 * static code's choice and bits (coder.c, the one source the worker and the NumPy edge
 * run), the wire-v4 REQUEST header; and the checks wire.decode_answer makes on a REPLY or
 * ERROR (a class byte of 255 is `unknown`: the server's own score flagged the frame).
 * Rounding is done with integer and comparison steps only, so -ffast-math or a missing
 * rintf cannot change a byte. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "splitexit_edge.h"
#include "splitexit_edge_model.h"
#include "coder.c"

#define KIND_REQUEST 1
#define KIND_REPLY 2
#define KIND_ERROR 3
#define HEADER_BYTES 14
#define REPLY_HEADER_BYTES 21
#define MAX_DETAIL_CHARS 200
#define CODEC_NONE 0
#define CODEC_STATIC 2
#define CODEC_RANS 3

typedef char splitexit_buffer_fits[
    (SPLITEXIT_EDGE_BUFFER_BYTES >= SPLITEXIT_REQUEST_MAX_BYTES) ? 1 : -1];

/* -- the exit ------------------------------------------------------------------------- */

double splitexit_exit_score(const float logits[SPLITEXIT_CLASSES], int32_t *cls)
{
    double p[SPLITEXIT_CLASSES], top = 0.0, sum = 0.0;
    int32_t best = 0;
    for (int i = 0; i < SPLITEXIT_CLASSES; ++i) {
        p[i] = (double)logits[i] / SPLITEXIT_TEMPERATURE;
        if (logits[i] > logits[best])
            best = i;
    }
    *cls = best;
    top = p[best];
    for (int i = 0; i < SPLITEXIT_CLASSES; ++i) {
        p[i] = exp(p[i] - top);
        sum += p[i];
    }
    for (int i = 0; i < SPLITEXIT_CLASSES; ++i)
        p[i] /= sum;
#if SPLITEXIT_SCORE == 0   /* max_softmax */
    return p[best];
#elif SPLITEXIT_SCORE == 1 /* margin: the top two probabilities apart */
    double first = -1.0, second = -1.0;
    for (int i = 0; i < SPLITEXIT_CLASSES; ++i) {
        if (p[i] > first) {
            second = first;
            first = p[i];
        } else if (p[i] > second) {
            second = p[i];
        }
    }
    return first - second;
#else                      /* entropy, normalized: 1 sure, 0 uniform */
    double entropy = 0.0;
    for (int i = 0; i < SPLITEXIT_CLASSES; ++i)
        entropy += -(p[i] * log(p[i] > 1e-12 ? p[i] : 1e-12));
    return 1.0 - entropy / log((double)SPLITEXIT_CLASSES);
#endif
}

/* -- the uplink quantizer ------------------------------------------------------------- */

/* v rounded half to even (np.rint in float32), then clipped to [lo, hi]; |v| < 2^31. Equal
 * to rint after the clip, as the wire does it: rint is monotone and lo, hi are whole. Plain
 * integer steps, no branch and no libm: the compiler vectorizes the loops that call it, and
 * -ffast-math cannot change a code. */
static int32_t round_clip(float v, int32_t lo, int32_t hi)
{
    int32_t i = (int32_t)v;     /* toward zero */
    float rest = v - (float)i;  /* exact, in (-1, 1) */
    i += (rest > 0.5f) | ((rest == 0.5f) & (i & 1));
    i -= (rest < -0.5f) | ((rest == -0.5f) & (i & 1));
    i = i < lo ? lo : i;
    return i > hi ? hi : i;
}

static uint32_t float_bits(float v)
{
    uint32_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

/* The float16 nearest v, ties to even (numpy's astype("<f2")), for v in [2^-24, 65504]:
 * frame_scales clips every scale into that range first. */
static uint16_t half_of(float v)
{
    uint32_t b = float_bits(v);
    int32_t e = (int32_t)((b >> 23) & 0xFF) - 127;
    uint32_t m = (b & 0x7FFFFF) | 0x800000;          /* 24 significant bits */
    int shift = e >= -14 ? 13 : -e - 1;              /* normal: drop 13 bits; else more */
    uint32_t h = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (e >= -14)
        h = ((uint32_t)(e + 15) << 10) | (h & 0x3FF);
    if (rest > half || (rest == half && (h & 1)))
        h++;                                         /* a carry moves into the exponent */
    return (uint16_t)h;
}

static float float_of_half(uint16_t h)
{
    uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF, b;
    float v;
    if (e == 0) {
        v = (float)m * 5.9604644775390625e-8f;       /* m * 2^-24, exact */
        return (h & 0x8000) ? -v : v;
    }
    b = (uint32_t)(h & 0x8000) << 16 | (e + 112) << 23 | m << 13;
    memcpy(&v, &b, sizeof v);
    return v;
}

/* quantization.frame_scales for one frame: peak / levels as float32 (1 for a zero peak),
 * clipped to float16's positive range, as float16. */
static uint16_t frame_scale(float peak, float levels)
{
    float s = peak > 0.0f ? peak / levels : 1.0f;
    s = s < 5.9604644775390625e-8f ? 5.9604644775390625e-8f : (s > 65504.0f ? 65504.0f : s);
    return half_of(s);
}

/* The largest of x (at least 0), or of |x|: 8 running maxima, not one chain of them (max is
 * exact in any order). */
static float peak_of(const float *x, int magnitude)
{
    float m[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < SPLITEXIT_FEATURES; ++i) {
        float a = magnitude && x[i] < 0.0f ? -x[i] : x[i];
        m[i % 8] = a > m[i % 8] ? a : m[i % 8];
    }
    for (int k = 1; k < 8; ++k)
        m[0] = m[k] > m[0] ? m[k] : m[0];
    return m[0];
}

#if SPLITEXIT_BITS > 0
/* quantization.quantize_unsigned: codes 0 .. 2^bits - 1, the peak at the top code. */
static uint16_t quantize(const float *restrict x, uint8_t *restrict codes)
{
    const float levels = (float)((1 << SPLITEXIT_BITS) - 1);
    uint16_t h = frame_scale(peak_of(x, 0), levels);
    float scale = float_of_half(h);
    for (int i = 0; i < SPLITEXIT_FEATURES; ++i)   /* max(x, 0) / scale, clipped to 0 */
        codes[i] = (uint8_t)round_clip(x[i] / scale, 0, (1 << SPLITEXIT_BITS) - 1);
    return h;
}

/* quantization.pack_bits for one frame: low bits first, the last byte zero-padded. */
static void pack_bits(const uint8_t *codes, uint8_t *out)
{
    const int per = 8 / SPLITEXIT_BITS;
    for (int j = 0; j < SPLITEXIT_PACKED_BYTES; ++j) {
        uint8_t byte = 0;
        for (int k = 0; k < per && j * per + k < SPLITEXIT_FEATURES; ++k)
            byte |= (uint8_t)(codes[j * per + k] << (SPLITEXIT_BITS * k));
        out[j] = byte;
    }
}
#else
/* quantization.quantize's int8: symmetric, -127 .. 127, the largest magnitude at 127. */
static uint16_t quantize(const float *restrict x, uint8_t *restrict codes)
{
    uint16_t h = frame_scale(peak_of(x, 1), 127.0f);
    float scale = float_of_half(h);
    for (int i = 0; i < SPLITEXIT_FEATURES; ++i)
        codes[i] = (uint8_t)(int8_t)round_clip(x[i] / scale, -127, 127);
    return h;
}
#endif

/* -- the REQUEST ---------------------------------------------------------------------- */

int64_t splitexit_encode_request(const float features[SPLITEXIT_FEATURES], uint32_t msg_id,
                                 uint8_t *out, size_t cap)
{
    uint8_t codes[SPLITEXIT_FEATURES];
    uint8_t *payload = out + HEADER_BYTES + 2;
    int codec = CODEC_NONE;
    int64_t n = SPLITEXIT_PACKED_BYTES;
    if (cap < SPLITEXIT_EDGE_BUFFER_BYTES)
        return SPLITEXIT_E_CAP;
    uint16_t scale = quantize(features, codes);
#if SPLITEXIT_CODED
    int32_t is_rans = 0;
    /* the code's compact form: what static_encode_smallest sends, from a sixth of its
       tables */
    int64_t coded = static_encode_compact(codes, 1, SPLITEXIT_FEATURES, SPLITEXIT_SYMBOLS,
                                          code_entry, payload, SPLITEXIT_CODER_CAP, &is_rans);
    if (coded < 0)
        return SPLITEXIT_E_CODER;
    if (coded > 0 && coded < SPLITEXIT_PACKED_BYTES) {  /* coded only where it shrinks */
        codec = is_rans ? CODEC_RANS : CODEC_STATIC;
        n = coded;
    }
#endif
#if SPLITEXIT_BITS > 0
    if (codec == CODEC_NONE)
        pack_bits(codes, payload);
#else
    memcpy(payload, codes, SPLITEXIT_FEATURES);
#endif
    out[0] = SPLITEXIT_WIRE_VERSION;
    out[1] = KIND_REQUEST;
    out[2] = (uint8_t)(SPLITEXIT_DTYPE << 4 | codec);
    out[3] = 0;                                      /* frames - 1 */
    for (int i = 0; i < 4; ++i)
        out[4 + i] = (uint8_t)(msg_id >> (8 * i));   /* little-endian */
    memcpy(out + 8, model_tag, 4);
    out[12] = (uint8_t)(SPLITEXIT_FEATURES & 0xFF);
    out[13] = (uint8_t)(SPLITEXIT_FEATURES >> 8);
    out[14] = (uint8_t)(scale & 0xFF);
    out[15] = (uint8_t)(scale >> 8);
    return HEADER_BYTES + 2 + n;
}

int splitexit_edge_step(const float pixels[SPLITEXIT_INPUT], uint32_t msg_id,
                        uint8_t *out, size_t cap, splitexit_decision *decision)
{
    float features[SPLITEXIT_FEATURES], logits[SPLITEXIT_CLASSES];
    if (cap < SPLITEXIT_EDGE_BUFFER_BYTES)
        return SPLITEXIT_E_CAP;
    splitexit_head_scored(pixels, features, logits, &decision->unfamiliarity);
    decision->confidence = splitexit_exit_score(logits, &decision->cls);
#if SPLITEXIT_UNFAMILIAR_FLAGS   /* as the NumPy edge: a score above the threshold */
    decision->unfamiliar = decision->unfamiliarity > SPLITEXIT_UNFAMILIAR_THRESHOLD;
#else
    decision->unfamiliar = 0;
#endif
    /* an unfamiliar frame is never answered here, and falls back to `unknown` */
    if (decision->unfamiliar)
        decision->cls = SPLITEXIT_UNKNOWN;
    decision->offload = decision->unfamiliar ||
                        !(decision->confidence >= SPLITEXIT_EDGE_THRESHOLD);
    decision->bytes = 0;
    if (!decision->offload)
        return 0;
    int64_t n = splitexit_encode_request(features, msg_id, out, cap);
    if (n < 0)
        return (int)n;
    decision->bytes = (size_t)n;
    return 0;
}

/* -- answers -------------------------------------------------------------------------- */

static uint32_t le(const uint8_t *p, int bytes)
{
    uint32_t v = 0;
    for (int i = bytes - 1; i >= 0; --i)
        v = v << 8 | p[i];
    return v;
}

static uint32_t be(const uint8_t *p, int bytes)
{
    uint32_t v = 0;
    for (int i = 0; i < bytes; ++i)
        v = v << 8 | p[i];
    return v;
}

/* Strict UTF-8 (what Python's bytes.decode() accepts): no overlong forms, no surrogates,
 * nothing above U+10FFFF. */
static int utf8_ok(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t more = c < 0x80 ? 0 : c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2
                      : c >= 0xF0 && c <= 0xF4 ? 3 : 4;
        if (more == 4 || n - i - 1 < more)
            return 0;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
        else if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        for (size_t k = 1; k <= more; ++k) {
            uint8_t d = s[i + k];
            if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF))
                return 0;
        }
        i += more + 1;
    }
    return 1;
}

/* A msgpack integer at *p (any of its encodings) in [0, max]; advances *p. */
static int msgpack_uint(const uint8_t **p, const uint8_t *end, uint32_t max, uint32_t *value)
{
    const uint8_t *q = *p;
    if (q >= end)
        return SPLITEXIT_E_MALFORMED;
    uint8_t t = *q++;
    uint64_t v;
    int bytes = 0, is_signed = 0;
    if (t <= 0x7F) {
        v = t;
    } else if (t >= 0xE0) {
        return SPLITEXIT_E_FIELD;                  /* a negative fixint */
    } else if (t >= 0xCC && t <= 0xD3) {
        bytes = 1 << ((t - 0xCC) & 3);
        is_signed = t >= 0xD0;
        if (end - q < bytes)
            return SPLITEXIT_E_MALFORMED;
        v = 0;
        for (int i = 0; i < bytes; ++i)
            v = v << 8 | q[i];                     /* big-endian */
        q += bytes;
        if (is_signed && (v >> (8 * bytes - 1)) & 1)
            return SPLITEXIT_E_FIELD;              /* negative */
    } else {
        return SPLITEXIT_E_FIELD;                  /* not an integer */
    }
    if (v > max)
        return SPLITEXIT_E_FIELD;
    *value = (uint32_t)v;
    *p = q;
    return 0;
}

/* An ERROR: msgpack [msg_id, reason, detail], nothing after it. */
static int decode_error(const uint8_t *msg, size_t len, splitexit_answer *answer)
{
    const uint8_t *p = msg + 2, *end = msg + len;
    uint32_t msg_id, reason, n;
    int rc;
    if (len > SPLITEXIT_ANSWER_MAX_BYTES)
        return SPLITEXIT_E_SIZE;
    if (p >= end)
        return SPLITEXIT_E_MALFORMED;
    if (*p >= 0x90 && *p <= 0x9F) {
        n = *p++ & 0x0F;
    } else if (*p == 0xDC && end - p >= 3) {
        n = be(p + 1, 2);
        p += 3;
    } else if (*p == 0xDD && end - p >= 5) {
        n = be(p + 1, 4);
        p += 5;
    } else {
        return SPLITEXIT_E_MALFORMED;              /* not an array */
    }
    if (n != 3)
        return SPLITEXIT_E_FIELD;
    if ((rc = msgpack_uint(&p, end, 0xFFFFFFFFu, &msg_id)) != 0 ||
            (rc = msgpack_uint(&p, end, 0xFF, &reason)) != 0)
        return rc;
    if (reason < 1 || reason > SPLITEXIT_REFUSAL_MAX)
        return SPLITEXIT_E_FIELD;
    if (p >= end)
        return SPLITEXIT_E_MALFORMED;
    uint8_t t = *p++;
    if (t >= 0xA0 && t <= 0xBF) {
        n = t & 0x1F;
    } else if (t >= 0xD9 && t <= 0xDB) {
        int bytes = 1 << (t - 0xD9);
        if (end - p < bytes)
            return SPLITEXIT_E_MALFORMED;
        n = be(p, bytes);
        p += bytes;
    } else {
        return SPLITEXIT_E_FIELD;                  /* detail is not a string */
    }
    if ((size_t)(end - p) != n)
        return SPLITEXIT_E_MALFORMED;              /* cut short, or bytes after it */
    if (!utf8_ok(p, n))
        return SPLITEXIT_E_MALFORMED;
    size_t chars = 0;
    for (uint32_t i = 0; i < n; ++i)
        chars += (p[i] & 0xC0) != 0x80;
    if (chars > MAX_DETAIL_CHARS)
        return SPLITEXIT_E_FIELD;
    answer->msg_id = msg_id;
    answer->refusal = (int32_t)reason;
    return SPLITEXIT_REFUSED;
}

int splitexit_decode_answer(const uint8_t *msg, size_t len, splitexit_answer *answer)
{
    if (len < 2)
        return SPLITEXIT_E_MALFORMED;
    if (msg[0] != SPLITEXIT_WIRE_VERSION)
        return SPLITEXIT_E_VERSION;
    if (msg[1] == KIND_ERROR)
        return decode_error(msg, len, answer);
    if (msg[1] != KIND_REPLY || len < REPLY_HEADER_BYTES)
        return SPLITEXIT_E_KIND;
    size_t worker = msg[20];
    if (len - REPLY_HEADER_BYTES < worker)
        return SPLITEXIT_E_SHAPE;
    if (!utf8_ok(msg + REPLY_HEADER_BYTES, worker))
        return SPLITEXIT_E_FIELD;
    const uint8_t *answers = msg + REPLY_HEADER_BYTES + worker;
    if (len - REPLY_HEADER_BYTES - worker != 3 || le(msg + 6, 2) < 1)
        return SPLITEXIT_E_SHAPE;                  /* one frame: a class, a float16 */
    uint16_t h = (uint16_t)le(answers + 1, 2);
    if (((h >> 10) & 0x1F) == 0x1F)
        return SPLITEXIT_E_NONFINITE;
    float confidence = float_of_half(h);
    int unknown = answers[0] == SPLITEXIT_UNKNOWN_BYTE;   /* the server's score flagged it */
    if ((answers[0] >= SPLITEXIT_CLASSES && !unknown) ||
            !(confidence >= 0.0f && confidence <= 1.0f))
        return SPLITEXIT_E_ANSWER;
    answer->msg_id = le(msg + 2, 4);
    answer->cls = unknown ? SPLITEXIT_UNKNOWN : answers[0];
    answer->confidence = confidence;
    answer->refusal = 0;
    answer->queued = (uint16_t)le(msg + 16, 2);
    answer->free_credit = (uint16_t)le(msg + 18, 2);
    return SPLITEXIT_REPLY;
}
