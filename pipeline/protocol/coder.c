/* The static entropy code's decoders (pipeline/protocol/static_code.py holds the Python
 * reference and builds the tables these read). C99, no allocation, no globals: reentrant.
 *
 * One source per codec: the worker loads it with ctypes today; the NumPy edge's encoder and
 * the exported device edge are meant to compile this same file, so their bytes cannot drift.
 *
 * Every function reads exactly `len` bytes of `data` at most, writes exactly
 * frames * channels bytes of `out`, and returns 0 or the error code static_code.ERRORS
 * names. Both decoders are linear: one pass over the symbols and one over the bytes. */

#include <stddef.h>
#include <stdint.h>

#define MAX_CODE_BITS 24
#define PROB_BITS 12
#define RANS_LOW (1u << 23)

enum { HUFFMAN_CODE = 1, HUFFMAN_TAIL, RANS_SHORT, RANS_RANGE, RANS_END, RANS_FINAL };

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
            int64_t lo = 0, hi = symbols;  /* cm[lo] <= slot < cm[hi] */
            while (hi - lo > 1) {
                int64_t mid = (lo + hi) / 2;
                if (cm[mid] <= slot)
                    lo = mid;
                else
                    hi = mid;
            }
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
