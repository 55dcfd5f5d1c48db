/* The static entropy code's coders: canonical Huffman and rANS, both ways
 * (pipeline/protocol/static_code.py holds the Python reference and builds the tables these
 * read). C99, no allocation, no globals: reentrant. Only stdint.h, stddef.h and string.h, so
 * it builds as it is for a microcontroller.
 *
 * One source per codec: the worker decodes with it and the NumPy edge encodes with it through
 * ctypes, and the exported device edge #includes this same file, so their bytes cannot drift.
 *
 * Decoders read exactly `len` bytes of `data` at most, write exactly frames * channels bytes
 * of `out`, and return 0 or the error code static_code.ERRORS names. Encoders read
 * frames * channels codes (row-major) and write at most `cap` bytes of `out`; they return the
 * bytes written or a negative ENCODE_* code. All are linear: one pass over the symbols. */

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
int64_t huffman_encode(const uint8_t *codes, int64_t frames, int64_t channels, int64_t symbols,
                       const uint32_t *code, const uint8_t *length, uint8_t *out, int64_t cap)
{
    uint64_t acc = 0;
    int bits = 0;
    int64_t pos = 0;
    for (int64_t f = 0; f < frames; f++) {
        for (int64_t c = 0; c < channels; c++) {
            int64_t s = *codes++;
            if (s >= symbols)
                return ENCODE_SYMBOL;
            int64_t k = c * symbols + s;
            int n = length[k];
            if (n < 1 || n > MAX_CODE_BITS)
                return ENCODE_TABLE;
            acc = acc << n | (code[k] & ((1u << n) - 1));
            bits += n;
            while (bits >= 8) {
                if (pos == cap)
                    return ENCODE_CAP;
                bits -= 8;
                out[pos++] = (uint8_t)(acc >> bits);
            }
        }
    }
    if (bits > 0) {
        if (pos == cap)
            return ENCODE_CAP;
        out[pos++] = (uint8_t)(acc << (8 - bits));
    }
    return pos;
}

/* rANS (byte-wise, ryg_rans), the last symbol first, so the decoder reads the first first:
 * the state starts at 2^23, emits its low byte while it is at least RANS_EMIT * freq, and
 * ends as 4 big-endian bytes in front. Bytes are written backwards from the end of `out`,
 * then moved to its start. freq: channels x symbols; cum: channels x (symbols + 1).
 * `rcp` (channels x symbols, or NULL: divide) holds floor(2^43 / freq) + 1: after the bytes
 * leave, x < 2^19 freq, so x * rcp fits 64 bits and its top bits are exactly x / freq
 * (the error, under x / 2^43 < freq / 2^24 <= 1 / freq, cannot reach the next integer). */
static int64_t rans_encode_with(const uint8_t *codes, int64_t frames, int64_t channels,
                                int64_t symbols, const uint16_t *freq, const uint16_t *cum,
                                const uint64_t *rcp, uint8_t *out, int64_t cap)
{
    uint32_t x = RANS_LOW;
    uint8_t *p = out + cap;
    for (int64_t f = frames - 1; f >= 0; f--) {
        for (int64_t c = channels - 1; c >= 0; c--) {
            int64_t s = codes[f * channels + c];
            if (s >= symbols)
                return ENCODE_SYMBOL;
            int64_t k = c * symbols + s;
            uint32_t fr = freq[k];
            if (fr == 0 || fr > PROB_TOTAL)
                return ENCODE_TABLE;
            /* a branch, not a branchless byte count: predicted, it keeps the compare off
             * the state's critical path (measured 1.4 against 1.9 us a 400-wide frame) */
            while (x >= RANS_EMIT * fr) {
                if (p == out)
                    return ENCODE_CAP;
                *--p = (uint8_t)x;
                x >>= 8;
            }
            /* (x / fr) << 12 + x % fr + cum, with one product on the critical path */
            uint32_t q = rcp ? (uint32_t)((x * rcp[k]) >> RCP_SHIFT) : x / fr;
            x += cum[c * (symbols + 1) + s] + q * (PROB_TOTAL - fr);
        }
    }
    if (p - out < 4)
        return ENCODE_CAP;
    for (int i = 0; i < 4; i++, x >>= 8)
        *--p = (uint8_t)x;
    int64_t n = out + cap - p;
    memmove(out, p, (size_t)n);
    return n;
}

int64_t rans_encode(const uint8_t *codes, int64_t frames, int64_t channels, int64_t symbols,
                    const uint16_t *freq, const uint16_t *cum, uint8_t *out, int64_t cap)
{
    return rans_encode_with(codes, frames, channels, symbols, freq, cum, NULL, out, cap);
}

/* Huffman or rANS, whichever is shorter, Huffman on a tie, from the sizes a pass over the
 * symbols measured: Huffman's `bits` exactly, rANS's `cost` (2^-16 bits) up to a byte and a
 * slack. Only a close call runs both coders: Huffman at the start of `out`, rANS after it. */
static int64_t encode_sized(const uint8_t *codes, int64_t frames, int64_t channels,
                            int64_t symbols, const uint32_t *code, const uint8_t *length,
                            const uint16_t *freq, const uint16_t *cum, const uint64_t *rcp,
                            int64_t bits, uint64_t cost, uint8_t *out, int64_t cap,
                            int32_t *is_rans)
{
    /* a byte is 2^19; the slack, a quarter byte and 2^-8 bits a symbol (as payload_bounds) */
    const uint64_t byte = 1u << 19;
    uint64_t huffman = (uint64_t)((bits + 7) / 8) * byte;
    uint64_t slack = byte / 4 + (uint64_t)(frames * channels) * 256;
    *is_rans = 0;
    if (huffman + slack <= cost + 3 * byte)
        return huffman_encode(codes, frames, channels, symbols, code, length, out, cap);
    if (huffman > cost + 4 * byte + slack) {
        *is_rans = 1;
        return rans_encode_with(codes, frames, channels, symbols, freq, cum, rcp, out, cap);
    }
    int64_t h = huffman_encode(codes, frames, channels, symbols, code, length, out, cap);
    if (h < 0)
        return h;
    int64_t r = rans_encode_with(codes, frames, channels, symbols, freq, cum, rcp, out + h,
                                 cap - h);
    if (r < 0 || r >= h)
        return r < 0 ? r : h;
    memmove(out, out + h, (size_t)r);
    *is_rans = 1;
    return r;
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
    int64_t bits = 0;
    uint64_t rans = 0;
    const uint8_t *row = codes;
    for (int64_t f = 0; f < frames; f++) {
        for (int64_t c = 0; c < channels; c++) {
            int64_t s = *row++;
            if (s >= symbols)
                return ENCODE_SYMBOL;
            bits += length[c * symbols + s];
            rans += cost[c * symbols + s];
        }
    }
    return encode_sized(codes, frames, channels, symbols, code, length, freq, cum, rcp, bits,
                        rans, out, cap, is_rans);
}

/* The NumPy edge's wire.quantize_unsigned and then static_encode_smallest, bit for bit, with
 * the sizing pass in the same loop: codes = clip(rint(max(x, 0) / scale), 0, levels), in
 * float32 (division, then ties to even), written to `codes` (frames x channels). scale: each
 * frame's float16 scale as a float32 (what the wire carries). No branch on the values:
 * after the clamps 0 <= y <= 255, where adding and taking away 2^23 rounds to the nearest
 * integer, ties to even, as rint does (round-to-nearest, the default). */
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
