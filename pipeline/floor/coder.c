/* The static entropy code's coders: canonical Huffman and rANS, both ways
 * (pipeline/floor/static_code.py holds the Python reference and builds the tables these
 * read). C99, no allocation, no writable globals: reentrant. Only stdint.h, stddef.h and
 * string.h, so it builds as it is for a microcontroller.
 *
 * One source per codec: the worker decodes with it and the NumPy edge encodes with it through
 * ctypes, and the exported device edge #includes this same file, so their bytes cannot drift.
 *
 * Decoders read exactly `len` bytes of `data` at most, write exactly frames * channels bytes
 * of `out`, and return 0 or the error code static_code.ERRORS names. Encoders read
 * frames * channels codes (row-major) and write at most `cap` bytes of `out`; they return the
 * bytes written or a negative ENCODE_* code. All are linear: one pass over the symbols
 * (the compact form's encoder passes over a channel's entries for each). */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_CODE_BITS 24
#define PROB_BITS 12
#define RANS_LOW (1u << 23)

#define PROB_TOTAL (1u << PROB_BITS)
#define RANS_EMIT ((RANS_LOW >> PROB_BITS) << 8)   /* state >= RANS_EMIT * freq: emit a byte */
#define RCP_SHIFT 43

enum { HUFFMAN_CODE = 1, HUFFMAN_TAIL, RANS_SHORT, RANS_RANGE, RANS_END, RANS_FINAL };
/* What an encoder refuses (static_code.ENCODE_ERRORS): `out` too small, a code not below
 * `symbols`, a table entry no StaticCode builds (a length outside 1..MAX_CODE_BITS, a zero
 * frequency). */
enum { ENCODE_CAP = -1, ENCODE_SYMBOL = -2, ENCODE_TABLE = -3 };

/* Canonical Huffman, MSB first. `buf` holds `bits` unread bits at its top (the rest zero);
 * the top MAX_CODE_BITS of it are the window. A code's length is the first n whose
 * limit[n] the window is below; its symbol order[base[n] + the window's top n bits].
 * limit, base: channels x (MAX_CODE_BITS + 1); order: channels x symbols. */
int huffman_decode(const uint8_t *data, int64_t len, int64_t frames, int64_t channels,
                   int64_t symbols, const uint32_t *limit, const int32_t *base,
                   const uint8_t *order, const uint8_t *minimum, uint8_t *out)
{
    uint64_t buf = 0;
    int bits = 0;
    int64_t pos = 0;
    for (int64_t f = 0; f < frames; f++) {
        for (int64_t c = 0; c < channels; c++) {
            while (bits <= 56 && pos < len) {
                buf |= (uint64_t)data[pos++] << (56 - bits);
                bits += 8;
            }
            uint32_t window = (uint32_t)(buf >> (64 - MAX_CODE_BITS));
            const uint32_t *lim = limit + c * (MAX_CODE_BITS + 1);
            int n = minimum[c];
            while (n <= MAX_CODE_BITS && window >= lim[n])
                n++;
            if (n > MAX_CODE_BITS || n > bits)
                return HUFFMAN_CODE;
            int64_t index = base[c * (MAX_CODE_BITS + 1) + n] + (window >> (MAX_CODE_BITS - n));
            if (index < 0 || index >= symbols)  /* only a table not built by StaticCode */
                return HUFFMAN_CODE;
            *out++ = order[c * symbols + index];
            buf <<= n;
            bits -= n;
        }
    }
    if (pos != len || bits >= 8 || buf != 0)
        return HUFFMAN_TAIL;
    return 0;
}

/* rANS (byte-wise, ryg_rans): the state starts as the first 4 bytes, big-endian, and must
 * stay in [2^23, 2^31); the symbol of a slot is found by bisection of the channel's
 * cumulative frequencies. freq: channels x symbols; cum: channels x (symbols + 1). */
int rans_decode(const uint8_t *data, int64_t len, int64_t frames, int64_t channels,
                int64_t symbols, const uint16_t *freq, const uint16_t *cum, uint8_t *out)
{
    if (len < 4)
        return RANS_SHORT;
    uint32_t x = (uint32_t)data[0] << 24 | (uint32_t)data[1] << 16 | (uint32_t)data[2] << 8
                 | data[3];
    int64_t pos = 4;
    const uint32_t mask = (1u << PROB_BITS) - 1;
    for (int64_t f = 0; f < frames; f++) {
        for (int64_t c = 0; c < channels; c++) {
            if (x < RANS_LOW || x >= RANS_LOW << 8)
                return RANS_RANGE;
            const uint16_t *cm = cum + c * (symbols + 1);
            uint32_t slot = x & mask;
            /* the last of cm[0 .. symbols - 1] at or below slot (cm[0] = 0 is), by halving
             * with a select, not a branch: slots are random, so a branch mispredicts */
            const uint16_t *at = cm;
            for (int64_t n = symbols; n > 1; n -= n / 2)
                at = at[n / 2] <= slot ? at + n / 2 : at;
            int64_t lo = at - cm;
            *out++ = (uint8_t)lo;
            x = freq[c * symbols + lo] * (x >> PROB_BITS) + slot - cm[lo];
            while (x < RANS_LOW) {
                if (pos == len)
                    return RANS_END;
                x = x << 8 | data[pos++];
            }
        }
    }
    if (x != RANS_LOW || pos != len)
        return RANS_FINAL;
    return 0;
}

/* Canonical Huffman, MSB first, the last byte zero-padded. code, length: channels x symbols,
 * each code value below 2^length. At most 31 bits wait in the accumulator. */
typedef struct {     /* MSB-first bits into out[0 .. cap) */
    uint64_t acc;
    int bits;
    int64_t pos, cap;
    uint8_t *out;
} bit_writer;

/* Appends the low n bits of `code`; 0, or ENCODE_CAP when `out` is full. */
static int put_bits(bit_writer *w, uint32_t code, int n)
{
    w->acc = w->acc << n | (code & ((1u << n) - 1));
    w->bits += n;
    while (w->bits >= 8) {
        if (w->pos == w->cap)
            return ENCODE_CAP;
        w->bits -= 8;
        w->out[w->pos++] = (uint8_t)(w->acc >> w->bits);
    }
    return 0;
}

/* The last byte, zero-padded: the bytes written, or ENCODE_CAP. */
static int64_t flush_bits(bit_writer *w)
{
    if (w->bits > 0) {
        if (w->pos == w->cap)
            return ENCODE_CAP;
        w->out[w->pos++] = (uint8_t)(w->acc << (8 - w->bits));
    }
    return w->pos;
}

/* The code's tables in either form: the full ones (entry NULL; rcp optional: NULL divides)
 * or the device's compact one (entry only, see static_encode_compact below). */
typedef struct {
    const uint32_t *code;
    const uint8_t *length;
    const uint16_t *freq, *cum;
    const uint64_t *rcp;
    const uint16_t *entry;
} code_tables;

/* A compact entry: (code length - 1) << 12 | cumulative frequency. */
#define ENTRY_LENGTH(e) ((int)((e) >> 12) + 1)
#define ENTRY_CUM(e) ((uint32_t)(e) & 0xFFF)

/* Symbol s's frequency from its channel's entries e. */
static uint32_t entry_freq(const uint16_t *e, int64_t s, int64_t symbols)
{
    return (s + 1 < symbols ? ENTRY_CUM(e[s + 1]) : PROB_TOTAL) - ENTRY_CUM(e[s]);
}

/* Each symbol's code and length from the full tables, or, from the compact entries, its
 * canonical code counted from its channel's lengths: the codes of (length, symbol) before it
 * in canonical order, each weighing 2^(n - its length) (RFC 1951's assignment, summed). */
static int64_t huffman_encode_with(const uint8_t *codes, int64_t frames, int64_t channels,
                                   int64_t symbols, const code_tables *t, uint8_t *out,
                                   int64_t cap)
{
    bit_writer w = {0, 0, 0, cap, out};
    for (int64_t f = 0; f < frames; f++) {
        for (int64_t c = 0; c < channels; c++) {
            int64_t s = *codes++;
            if (s >= symbols)
                return ENCODE_SYMBOL;
            uint32_t code = 0;
            int n;
            if (t->entry) {
                const uint16_t *e = t->entry + c * symbols;
                n = ENTRY_LENGTH(e[s]);
                for (int64_t u = 0; u < symbols; u++) {
                    int m = ENTRY_LENGTH(e[u]);
                    uint32_t before = (uint32_t)((m < n) | ((m == n) & (u < s)));
                    code += (before << 16) >> (16 + m - n);   /* 2^(n - m); 0 if not before */
                }
            } else {
                int64_t k = c * symbols + s;
                n = t->length[k];
                if (n < 1 || n > MAX_CODE_BITS)
                    return ENCODE_TABLE;
                code = t->code[k];
            }
            if (put_bits(&w, code, n))
                return ENCODE_CAP;
        }
    }
    return flush_bits(&w);
}

int64_t huffman_encode(const uint8_t *codes, int64_t frames, int64_t channels, int64_t symbols,
                       const uint32_t *code, const uint8_t *length, uint8_t *out, int64_t cap)
{
    const code_tables t = {code, length, NULL, NULL, NULL, NULL};
    return huffman_encode_with(codes, frames, channels, symbols, &t, out, cap);
}

/* Before coding a symbol of frequency fr: x's low bytes out (backwards, ending at p) while
 * x >= RANS_EMIT * fr; the new p, or NULL when `out` is full. A branch, not a branchless
 * byte count: predicted, it keeps the compare off the state's critical path (measured 1.4
 * against 1.9 us a 400-wide frame). */
static inline uint8_t *rans_emit(uint32_t *x, uint32_t fr, uint8_t *p, const uint8_t *out)
{
    while (*x >= RANS_EMIT * fr) {
        if (p == out)
            return NULL;
        *--p = (uint8_t)*x;
        *x >>= 8;
    }
    return p;
}

/* The final state in front, big-endian, and the bytes from p moved to out's start: their
 * count, or ENCODE_CAP. */
static int64_t rans_flush(uint32_t x, uint8_t *p, uint8_t *out, int64_t cap)
{
    if (p - out < 4)
        return ENCODE_CAP;
    for (int i = 0; i < 4; i++, x >>= 8)
        *--p = (uint8_t)x;
    int64_t n = out + cap - p;
    memmove(out, p, (size_t)n);
    return n;
}

/* rANS (byte-wise, ryg_rans), the last symbol first, so the decoder reads the first first:
 * the state starts at 2^23, emits its low byte while it is at least RANS_EMIT * freq, and
 * ends as 4 big-endian bytes in front. Bytes are written backwards from the end of `out`,
 * then moved to its start. freq: channels x symbols; cum: channels x (symbols + 1).
 * `rcp` (channels x symbols, or NULL: divide) holds floor(2^43 / freq) + 1: after the bytes
 * leave, x < 2^19 freq, so x * rcp fits 64 bits and its top bits are exactly x / freq
 * (the error, under x / 2^43 < freq / 2^24 <= 1 / freq, cannot reach the next integer). */
static int64_t rans_encode_with(const uint8_t *codes, int64_t frames, int64_t channels,
                                int64_t symbols, const code_tables *t, uint8_t *out,
                                int64_t cap)
{
    uint32_t x = RANS_LOW;
    uint8_t *p = out + cap;
    for (int64_t f = frames - 1; f >= 0; f--) {
        for (int64_t c = channels - 1; c >= 0; c--) {
            int64_t s = codes[f * channels + c];
            if (s >= symbols)
                return ENCODE_SYMBOL;
            uint32_t fr, start;
            uint64_t rcp = 0;
            if (t->entry) {
                const uint16_t *e = t->entry + c * symbols;
                fr = entry_freq(e, s, symbols);
                start = ENTRY_CUM(e[s]);
            } else {
                int64_t k = c * symbols + s;
                fr = t->freq[k];
                if (fr == 0 || fr > PROB_TOTAL)
                    return ENCODE_TABLE;
                start = t->cum[c * (symbols + 1) + s];
                rcp = t->rcp ? t->rcp[k] : 0;
            }
            if ((p = rans_emit(&x, fr, p, out)) == NULL)
                return ENCODE_CAP;
            /* (x / fr) << 12 + x % fr + start, with one product on the critical path */
            uint32_t q = rcp ? (uint32_t)((x * rcp) >> RCP_SHIFT) : x / fr;
            x += start + q * (PROB_TOTAL - fr);
        }
    }
    return rans_flush(x, p, out, cap);
}

int64_t rans_encode(const uint8_t *codes, int64_t frames, int64_t channels, int64_t symbols,
                    const uint16_t *freq, const uint16_t *cum, uint8_t *out, int64_t cap)
{
    const code_tables t = {NULL, NULL, freq, cum, NULL, NULL};
    return rans_encode_with(codes, frames, channels, symbols, &t, out, cap);
}

/* What the sizes of a pass over the symbols decide (StaticCode.encode_smallest_reference):
 * Huffman's `bits` exactly, rANS's `cost` (2^-16 bits) up to a byte and a slack. PICK_HUFFMAN
 * when even rANS's least is no shorter, PICK_RANS when even its most is shorter, PICK_BOTH
 * (run both, keep the shorter, Huffman on a tie) for a close call. Monotone in `cost`: the
 * larger, the more Huffman (rANS, both, Huffman). */
enum { PICK_HUFFMAN, PICK_RANS, PICK_BOTH };

static int pick(int64_t bits, uint64_t cost, int64_t symbols)
{
    /* a byte is 2^19; the slack, a quarter byte and 2^-8 bits a symbol (as payload_bounds) */
    const uint64_t byte = 1u << 19;
    uint64_t huffman = (uint64_t)((bits + 7) / 8) * byte;
    uint64_t slack = byte / 4 + (uint64_t)symbols * 256;
    if (huffman + slack <= cost + 3 * byte)
        return PICK_HUFFMAN;
    if (huffman > cost + 4 * byte + slack)
        return PICK_RANS;
    return PICK_BOTH;
}

/* The coder `choice` (pick's) names; both for a close call: Huffman at the start of `out`,
 * rANS after it, the shorter kept at the start; either form of the tables. */
static int64_t encode_picked(const uint8_t *codes, int64_t frames, int64_t channels,
                             int64_t symbols, const code_tables *t, int choice,
                             uint8_t *out, int64_t cap, int32_t *is_rans)
{
    *is_rans = choice == PICK_RANS;
    if (choice == PICK_HUFFMAN)
        return huffman_encode_with(codes, frames, channels, symbols, t, out, cap);
    if (choice == PICK_RANS)
        return rans_encode_with(codes, frames, channels, symbols, t, out, cap);
    int64_t h = huffman_encode_with(codes, frames, channels, symbols, t, out, cap);
    if (h < 0)
        return h;
    int64_t r = rans_encode_with(codes, frames, channels, symbols, t, out + h, cap - h);
    if (r < 0 || r >= h)
        return r < 0 ? r : h;
    memmove(out, out + h, (size_t)r);
    *is_rans = 1;
    return r;
}

static int64_t encode_sized(const uint8_t *codes, int64_t frames, int64_t channels,
                            int64_t symbols, const uint32_t *code, const uint8_t *length,
                            const uint16_t *freq, const uint16_t *cum, const uint64_t *rcp,
                            int64_t bits, uint64_t cost, uint8_t *out, int64_t cap,
                            int32_t *is_rans)
{
    const code_tables t = {code, length, freq, cum, rcp, NULL};
    return encode_picked(codes, frames, channels, symbols, &t,
                         pick(bits, cost, frames * channels), out, cap, is_rans);
}

static uint32_t cost_near(uint32_t f);

/* The sizing pass: Huffman's bits and rANS's cost summed over the symbols, from the full
 * tables (`cost`: StaticCode's, exact) or the compact entries (cost_near's, within
 * COST_NEAR a symbol). Nonzero for a code not below `symbols`. */
static int size_symbols(const uint8_t *codes, int64_t frames, int64_t channels,
                        int64_t symbols, const code_tables *t, const uint32_t *cost,
                        int64_t *bits, uint64_t *rans)
{
    const uint8_t *row = codes;
    for (int64_t f = 0; f < frames; f++) {
        for (int64_t c = 0; c < channels; c++) {
            int64_t s = *row++;
            if (s >= symbols)
                return 1;
            if (t->entry) {
                const uint16_t *e = t->entry + c * symbols;
                *bits += ENTRY_LENGTH(e[s]);
                *rans += cost_near(entry_freq(e, s, symbols));
            } else {
                *bits += t->length[c * symbols + s];
                *rans += cost[c * symbols + s];
            }
        }
    }
    return 0;
}

/* StaticCode.encode_smallest: the shorter encoding, Huffman on a tie; *is_rans says which.
 * It makes the Python reference's decisions in the same integers: `cost` is each symbol's
 * -log2(freq / 2^12) in units of 2^-16 bits (channels x symbols), so sums are exact. `cap`
 * must hold both encodings (a close call writes both). rcp: as rans_encode_with's. */
int64_t static_encode_smallest(const uint8_t *codes, int64_t frames, int64_t channels,
                               int64_t symbols, const uint32_t *code, const uint8_t *length,
                               const uint16_t *freq, const uint16_t *cum, const uint64_t *rcp,
                               const uint32_t *cost, uint8_t *out, int64_t cap,
                               int32_t *is_rans)
{
    const code_tables t = {code, length, freq, cum, rcp, NULL};
    int64_t bits = 0;
    uint64_t rans = 0;
    if (size_symbols(codes, frames, channels, symbols, &t, cost, &bits, &rans))
        return ENCODE_SYMBOL;
    return encode_sized(codes, frames, channels, symbols, code, length, freq, cum, rcp, bits,
                        rans, out, cap, is_rans);
}

/* The NumPy edge's quantization.quantize_unsigned and then static_encode_smallest, bit for
 * bit, with the sizing pass in the same loop: codes = clip(rint(max(x, 0) / scale), 0,
 * levels), in float32 (division, then ties to even), written to `codes` (frames x channels).
 * scale: each frame's float16 scale as a float32 (what the wire carries). No branch on the
 * values: after the clamps 0 <= y <= 255, where adding and taking away 2^23 rounds to the
 * nearest integer, ties to even, as rint does (round-to-nearest, the default). */
int64_t static_quantize_encode(const float *x, const float *scale, int64_t levels,
                               uint8_t *codes, int64_t frames, int64_t channels,
                               int64_t symbols, const uint32_t *code, const uint8_t *length,
                               const uint16_t *freq, const uint16_t *cum, const uint64_t *rcp,
                               const uint32_t *cost, uint8_t *out, int64_t cap,
                               int32_t *is_rans)
{
    if (levels < 1 || levels > 255)
        return ENCODE_TABLE;
    if (levels >= symbols)
        return ENCODE_SYMBOL;
    const float top = (float)levels, magic = 8388608.0f;   /* 2^23 */
    int64_t bits = 0;
    uint64_t rans = 0;
    for (int64_t f = 0; f < frames; f++) {
        const float s = scale[f];
        uint8_t *q = codes + f * channels;
        for (int64_t c = 0; c < channels; c++) {
            float y = x[f * channels + c] / s;
            y = y > 0 ? y : 0;          /* negative and NaN: 0, as max(x, 0) and the cast */
            y = y < top ? y : top;
            q[c] = (uint8_t)(uint32_t)((y + magic) - magic);
        }
        for (int64_t c = 0; c < channels; c++) {
            bits += length[c * symbols + q[c]];
            rans += cost[c * symbols + q[c]];
        }
    }
    return encode_sized(codes, frames, channels, symbols, code, length, freq, cum, rcp, bits,
                        rans, out, cap, is_rans);
}

/* -- the same code from one uint16 per (channel, symbol): for a device --------------------
 * A microcontroller cannot hold the tables above for a wide split: 400 channels x 16 symbols
 * take 82 KiB of flash, 132 KiB with rcp. All of them follow from each symbol's Huffman code
 * length and cumulative frequency, which fit one uint16, its `entry`: (length - 1) << 12 |
 * cum. Lengths are at most 16 (a Huffman code as deep as 17 needs a total weight of at
 * least Fibonacci(19) = 4181 > 2^12); cum is below 2^12 (every later symbol has a
 * frequency of at least 1), and a frequency is the next symbol's cum minus its own (2^12
 * after the last). The encoder derives the rest per symbol as it goes: the canonical code
 * from its channel's lengths, and rANS's cost from the frequency, exactly the integer
 * StaticCode's cost table holds. Same bytes and the same choice as static_encode_smallest
 * from a sixth of the flash (12.5 KiB); more work per symbol (for Huffman, a pass over the
 * channel's entries). */

#define COST_LOG_BITS 30   /* log2's fraction bits in static_rans_cost */
#define COST_NEAR 4        /* static_rans_cost_near is within this of static_rans_cost */

static int floor_log2(uint32_t v)   /* v >= 1 */
{
#if defined(__GNUC__)
    return 31 - __builtin_clz(v);
#else
    int e = 0;
    while (v >> (e + 1))
        e++;
    return e;
#endif
}

/* rANS's cost of a symbol of frequency f (1 .. 2^12) in 2^-16 bits: StaticCode's
 * rint(-log2(f / 2^12) * 2^16), for every f (the tests compare all 4096). log2 of f's
 * mantissa by repeated squaring in Q1.31, a bit a square: COST_LOG_BITS bits are within
 * 2^-30 + 2^-30.5 bits (1e-4 units) of the truth, and no f's cost is nearer than 2.5e-4
 * units to a rounding tie (the nearest: f = 3196). Integers only: the same on any CPU.
 * About 30 multiplies: static_encode_compact calls it only for a close call. */
uint32_t static_rans_cost(uint32_t f)
{
    int e = floor_log2(f);
    uint32_t x = f << (31 - e), y = 0;   /* f / 2^e, in [1, 2) */
    for (int i = 0; i < COST_LOG_BITS; i++) {
        uint64_t square = (uint64_t)x * x;             /* in [1, 4), Q2.62 */
        uint32_t bit = (uint32_t)(square >> 63);
        y = y << 1 | bit;
        x = (uint32_t)(square >> (31 + bit));
    }
    uint32_t fraction = (y + (1u << (COST_LOG_BITS - 17))) >> (COST_LOG_BITS - 16);
    return (uint32_t)(PROB_BITS - e) * 65536u - fraction;
}

/* round(log2(1 + i / 64) * 2^24), i = 0 .. 64 */
static const uint32_t LOG2_KNOTS[65] = {
    0, 375270, 744810, 1108793, 1467383, 1820738, 2169009, 2512340, 2850868, 3184728,
    3514044, 3838941, 4159533, 4475935, 4788255, 5096595, 5401057, 5701737, 5998727,
    6292118, 6581994, 6868440, 7151536, 7431359, 7707984, 7981483, 8251926, 8519380,
    8783912, 9045584, 9304457, 9560591, 9814042, 10064867, 10313120, 10558852, 10802114,
    11042956, 11281425, 11517568, 11751428, 11983051, 12212479, 12439752, 12664911,
    12887994, 13109041, 13328087, 13545168, 13760320, 13973576, 14184969, 14394532,
    14602297, 14808293, 15012551, 15215099, 15415967, 15615181, 15812769, 16008758,
    16203172, 16396036, 16587377, 16777216};

/* static_rans_cost within COST_NEAR (the tests check every f): log2 of the 13-bit mantissa
 * interpolated between 65 knots. A table lookup's work; what the sizing pass sums. */
static uint32_t cost_near(uint32_t f)
{
    int e = floor_log2(f);                            /* f <= 2^12: e <= 12 */
    uint32_t j = (f << (12 - e)) - 4096;              /* 0 .. 4095 */
    uint32_t i = j >> 6, r = j & 63;
    uint32_t v = LOG2_KNOTS[i] + (((LOG2_KNOTS[i + 1] - LOG2_KNOTS[i]) * r) >> 6);
    return (uint32_t)(PROB_BITS - e) * 65536u - ((v + 128) >> 8);
}

uint32_t static_rans_cost_near(uint32_t f)
{
    return cost_near(f);
}


/* static_encode_smallest from the entries: the same choice and bytes. The sizing pass sums
 * the near costs; only when the choice could differ anywhere within COST_NEAR a symbol of
 * them (pick is monotone: the two ends agree, so does everything between) does it sum the
 * exact ones. */
int64_t static_encode_compact(const uint8_t *codes, int64_t frames, int64_t channels,
                              int64_t symbols, const uint16_t *entry, uint8_t *out, int64_t cap,
                              int32_t *is_rans)
{
    const code_tables t = {NULL, NULL, NULL, NULL, NULL, entry};
    int64_t bits = 0, n = frames * channels;
    uint64_t near = 0;
    if (size_symbols(codes, frames, channels, symbols, &t, NULL, &bits, &near))
        return ENCODE_SYMBOL;
    uint64_t error = (uint64_t)n * COST_NEAR;
    int choice = pick(bits, near + error, n);
    if (choice != pick(bits, near > error ? near - error : 0, n)) {
        uint64_t cost = 0;
        const uint8_t *row = codes;
        for (int64_t f = 0; f < frames; f++)
            for (int64_t c = 0; c < channels; c++)
                cost += static_rans_cost(entry_freq(entry + c * symbols, *row++, symbols));
        choice = pick(bits, cost, n);
    }
    return encode_picked(codes, frames, channels, symbols, &t, choice, out, cap, is_rans);
}
