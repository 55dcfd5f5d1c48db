/* Batched ELL kernels for SparseLinear's training path (forward, grad-input, grad-values).
 *
 * The batch is the vector dimension. A block of TILE samples is transposed to
 * feature-major ([N][TILE]), so one real edge (o, i) becomes one multiply-add of two
 * contiguous TILE-wide rows: every gather reads a whole row, and the arithmetic vectorizes
 * on any SIMD width without a gather instruction. Grad-input is the same gather over the
 * transposed pattern (fixed fan-out makes W^T fixed-width), so it accumulates in registers
 * instead of scattering. Grad-values is one TILE-wide dot product per edge per block.
 *
 * Loaded with ctypes by pipeline/model/ell_native.py; plain C11 plus GCC/Clang vector
 * extensions; no Python or torch headers, so it builds in about a second.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* VW: floats in one SIMD register of the target, so a vecw is one register. A vector wider
 * than the target's (64 bytes on AVX2) is lowered through the stack: measured 3-10x slower
 * on an AVX2 machine, where a fixed VW 16 made the kernel lose to the PyTorch ones. */
#ifndef VW
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#endif
typedef float vecw __attribute__((vector_size(VW * 4)));

typedef float vec4 __attribute__((vector_size(16)));

#define ALIGN 64

/* Sum of a vector's lanes: quarters added as vectors, then the last four as scalars. */
static inline float hsum(vecw s)
{
    vec4 q[VW / 4];
    memcpy(q, &s, sizeof s);
    vec4 a = q[0];
    for (int i = 1; i < VW / 4; i++)
        a += q[i];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

/* Transposes move 8x8 squares through registers: eight 8-float rows in, eight out (three
 * rounds of shuffles, the classic unpack/shuffle/permute on AVX), so both sides are read and
 * written 32 bytes at a time. Squares go down a column of the block first, so the writes of
 * a square row stay in one cache line. Element by element, the transpose of a 256x800 batch
 * cost more than the 800->40 forward itself (158 against 36 us, measured alone). */
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));

/* dst[k][j] = src[j][k] for an 8x8 square; rows src_stride and dst_stride floats apart. */
static inline void transpose8(const float *src, int64_t src_stride, float *dst, int64_t dst_stride)
{
    vec8 r[8], t[8], u[8];
    for (int k = 0; k < 8; k++)
        memcpy(&r[k], src + k * src_stride, sizeof(vec8));
    for (int k = 0; k < 8; k += 2) {
        t[k] = __builtin_shuffle(r[k], r[k + 1], (ivec8){0, 8, 1, 9, 4, 12, 5, 13});
        t[k + 1] = __builtin_shuffle(r[k], r[k + 1], (ivec8){2, 10, 3, 11, 6, 14, 7, 15});
    }
    for (int k = 0; k < 8; k += 4)
        for (int h = 0; h < 2; h++) {
            u[k + 2 * h] = __builtin_shuffle(t[k + h], t[k + h + 2],
                                             (ivec8){0, 1, 8, 9, 4, 5, 12, 13});
            u[k + 2 * h + 1] = __builtin_shuffle(t[k + h], t[k + h + 2],
                                                 (ivec8){2, 3, 10, 11, 6, 7, 14, 15});
        }
    for (int k = 0; k < 4; k++) {
        r[k] = __builtin_shuffle(u[k], u[k + 4], (ivec8){0, 1, 2, 3, 8, 9, 10, 11});
        r[k + 4] = __builtin_shuffle(u[k], u[k + 4], (ivec8){4, 5, 6, 7, 12, 13, 14, 15});
    }
    for (int k = 0; k < 8; k++)
        memcpy(dst + k * dst_stride, &r[k], sizeof(vec8));
}

/* Rows [b0, b0+nb) of x ([B][n], row stride n) into xt[n][tile]; lanes past nb are zero.
 * With back set, the reverse: xt is read and x written (neither is const for that). */
static void transpose_rows(float *x, int64_t n, int64_t b0, int nb, int tile, float *xt,
                           int back)
{
    int t8 = nb / 8 * 8;
    int64_t n8 = n / 8 * 8;
    for (int64_t i0 = 0; i0 < n8; i0 += 8)
        for (int t0 = 0; t0 < t8; t0 += 8) {
            float *row = x + (b0 + t0) * n + i0, *col = xt + i0 * tile + t0;
            if (back)
                transpose8(col, tile, row, n);
            else
                transpose8(row, n, col, tile);
        }
    for (int t = 0; t < nb; t++) /* the edges: columns past n8, rows past t8 */
        for (int64_t i = t < t8 ? n8 : 0; i < n; i++) {
            if (back)
                x[(b0 + t) * n + i] = xt[i * tile + t];
            else
                xt[i * tile + t] = x[(b0 + t) * n + i];
        }
}

/* Rows [b0, b0+nb) of x ([B][n], row stride n) into xt[n][tile]; lanes past nb are zero. */
static void transpose_block(const float *x, int64_t n, int64_t b0, int nb, int tile, float *xt)
{
    if (nb < tile)
        memset(xt, 0, sizeof(float) * (size_t)n * (size_t)tile);
    transpose_rows((float *)x, n, b0, nb, tile, xt, 0);
}

/* yt[n][tile] back into rows [b0, b0+nb) of out ([B][n]). */
static void untranspose_block(const float *yt, int64_t n, int64_t b0, int nb, int tile, float *out)
{
    transpose_rows(out, n, b0, nb, tile, (float *)yt, 1);
}

/* Gather-accumulate for one block: out[b0+t][o] = bias[o] + sum_k val[o][k] * xt[idx[o][k]][t]
 * (out row stride n_out). TILE is a compile-time constant so the accumulators stay in
 * registers: CH chains of NV vectors, CH*NV = 8 in all, enough independent FMAs to hide
 * their latency without spilling (AVX2 has 16 registers). */
#define DEFINE_GATHER(NAME, TILE)                                                            \
static void NAME(const float *xt, int64_t n_out, int64_t d,                                  \
                          const int32_t *idx, const float *val, const float *bias,           \
                          float *yt, float *out, int64_t b0, int nb)                         \
{                                                                                            \
    enum { NV = TILE / VW, CH = NV >= 8 ? 1 : 8 / NV };                                      \
    for (int64_t o = 0; o < n_out; o++) {                                                    \
        vecw acc[CH][NV];                                                                    \
        float b = bias ? bias[o] : 0.0f;                                                     \
        for (int c = 0; c < CH; c++)                                                         \
            for (int v = 0; v < NV; v++)                                                     \
                acc[c][v] = (vecw){0} + (c == 0 ? b : 0.0f);                                 \
        const int32_t *io = idx + o * d;                                                     \
        const float *vo = val + o * d;                                                       \
        int64_t k = 0;                                                                       \
        for (; k + CH <= d; k += CH)                                                         \
            for (int c = 0; c < CH; c++) {                                                   \
                const vecw *r = (const vecw *)(xt + (int64_t)io[k + c] * TILE);              \
                float w = vo[k + c];                                                         \
                for (int v = 0; v < NV; v++)                                                 \
                    acc[c][v] += w * r[v];                                                   \
            }                                                                                \
        for (; k < d; k++) {                                                                 \
            const vecw *r = (const vecw *)(xt + (int64_t)io[k] * TILE);                      \
            for (int v = 0; v < NV; v++)                                                     \
                acc[0][v] += vo[k] * r[v];                                                   \
        }                                                                                    \
        vecw *dst = (vecw *)(yt + o * TILE);                                                 \
        for (int v = 0; v < NV; v++) {                                                       \
            vecw sum = acc[0][v];                                                            \
            for (int c = 1; c < CH; c++)                                                     \
                sum += acc[c][v];                                                            \
            dst[v] = sum;                                                                    \
        }                                                                                    \
    }                                                                                        \
    untranspose_block(yt, n_out, b0, nb, TILE, out);                                         \
}

/* gv[o][k] += sum_t gt[o][t] * xt[idx[o][k]][t], for one block. */
#define DEFINE_GRAD_VALUES(NAME, TILE)                                                       \
static void NAME(const float *xt, const float *gt, int64_t n_out, int64_t d,                 \
                               const int32_t *idx, float *gv)                                \
{                                                                                            \
    enum { NV = TILE / VW };                                                                 \
    for (int64_t o = 0; o < n_out; o++) {                                                    \
        const vecw *g = (const vecw *)(gt + o * TILE);                                       \
        const int32_t *io = idx + o * d;                                                     \
        for (int64_t k = 0; k < d; k++) {                                                    \
            const vecw *row = (const vecw *)(xt + (int64_t)io[k] * TILE);                    \
            vecw s = g[0] * row[0];                                                          \
            for (int v = 1; v < NV; v++)                                                     \
                s += g[v] * row[v];                                                          \
            gv[o * d + k] += hsum(s);                                                        \
        }                                                                                    \
    }                                                                                        \
}

#ifndef BIG
#define BIG 64
#endif
#define SMALL VW

DEFINE_GATHER(gather_big, BIG)
DEFINE_GATHER(gather_small, SMALL)
DEFINE_GRAD_VALUES(grad_values_big, BIG)
DEFINE_GRAD_VALUES(grad_values_small, SMALL)

static float *scratch(int64_t floats)
{
    size_t bytes = sizeof(float) * (size_t)floats;
    bytes = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    return (float *)aligned_alloc(ALIGN, bytes ? bytes : ALIGN);
}

/* Blocks of BIG samples while at least BIG remain, then blocks of SMALL. */
static int tile_at(int64_t remaining) { return remaining >= BIG ? BIG : SMALL; }

/* One call's arguments, shared by every thread. */
struct job {
    const float *x, *g, *val, *bias, *t_val;
    const int32_t *idx, *t_idx;
    int64_t n_in, n_out, d, fan_out;
    float *y, *gx, *gv;
};

/* A thread's scratch: two [n_in][BIG] tiles and one [n_out][BIG]. */
struct tiles {
    float *in0, *in1, *out;
};

/* Samples [b_begin, b_end) of a forward call. */
static void forward_range(const struct job *j, int64_t b_begin, int64_t b_end, float *gv,
                          const struct tiles *s)
{
    (void)gv;
    for (int64_t b0 = b_begin; b0 < b_end;) {
        int tile = tile_at(b_end - b0);
        int nb = (int)(b_end - b0 < tile ? b_end - b0 : tile);
        transpose_block(j->x, j->n_in, b0, nb, tile, s->in0);
        if (tile == BIG)
            gather_big(s->in0, j->n_out, j->d, j->idx, j->val, j->bias, s->out, j->y, b0, nb);
        else
            gather_small(s->in0, j->n_out, j->d, j->idx, j->val, j->bias, s->out, j->y, b0, nb);
        b0 += nb;
    }
}

/* Samples [b_begin, b_end) of a backward call; grad-values accumulate into gv (zeroed). */
static void backward_range(const struct job *j, int64_t b_begin, int64_t b_end, float *gv,
                           const struct tiles *s)
{
    float *gt = s->out, *xt = s->in0, *gxt = s->in1;
    for (int64_t b0 = b_begin; b0 < b_end;) {
        int tile = tile_at(b_end - b0);
        int nb = (int)(b_end - b0 < tile ? b_end - b0 : tile);
        transpose_block(j->g, j->n_out, b0, nb, tile, gt);
        if (j->gx) {
            if (tile == BIG)
                gather_big(gt, j->n_in, j->fan_out, j->t_idx, j->t_val, NULL, gxt, j->gx, b0, nb);
            else
                gather_small(gt, j->n_in, j->fan_out, j->t_idx, j->t_val, NULL, gxt, j->gx, b0,
                             nb);
        }
        if (gv) {
            transpose_block(j->x, j->n_in, b0, nb, tile, xt);
            if (tile == BIG)
                grad_values_big(xt, gt, j->n_out, j->d, j->idx, gv);
            else
                grad_values_small(xt, gt, j->n_out, j->d, j->idx, gv);
        }
        b0 += nb;
    }
}

typedef void (*range_fn)(const struct job *, int64_t, int64_t, float *, const struct tiles *);

/* Below this many multiply-adds a call, starting threads costs more than they save. */
#define MIN_PARALLEL_MACS (1 << 21)
/* The batch is cut into at most this many chunks of whole BIG blocks. */
#define MAX_CHUNKS 64
/* Grad-values keeps one accumulator per chunk, so it is cut into fewer. */
#define GV_CHUNKS 8

/* Run fn over [0, batch) on up to `threads` OpenMP threads that claim chunks one at a time.
 * OpenMP, not pthreads: loaded after torch, libgomp.so.1 resolves to torch's own copy, so
 * these are the threads torch's ops just used, not more competing with them for the cores.
 * Claimed, not split in equal shares: on busy cores a thread the scheduler holds back runs
 * fewer chunks instead of making every other thread wait for its share. The chunks are
 * fixed by the batch alone and gv sums its per-chunk accumulators in chunk order, so y, gx
 * and gv are bit for bit the same whatever the thread count and whichever thread ran what.
 * Built without OpenMP, one thread runs every chunk. */
static int run_split(struct job base, int64_t batch, int threads, int64_t macs, range_fn fn)
{
    int64_t blocks = (batch + BIG - 1) / BIG;
    int64_t limit = base.gv ? GV_CHUNKS : MAX_CHUNKS;
    int chunks = (int)(blocks < limit ? blocks : limit);
    if (threads > chunks)
        threads = chunks;
    if (threads < 1 || macs < MIN_PARALLEL_MACS)
        threads = 1;
    int64_t w = base.n_out * base.d;
    float *gv[GV_CHUNKS] = {base.gv};
    int ok = 1;
    if (base.gv) {
        memset(base.gv, 0, sizeof(float) * (size_t)w);
        for (int c = 1; c < chunks; c++)
            ok &= (gv[c] = calloc((size_t)w, sizeof(float))) != NULL;
    }
    int next = 0, done = 0;
    if (ok) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
        {
            struct tiles s = {scratch(base.n_in * BIG), base.gx ? scratch(base.n_in * BIG) : NULL,
                              scratch(base.n_out * BIG)};
            if (s.in0 && s.out && (s.in1 || !base.gx)) {
                int c;
                while ((c = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED)) < chunks) {
                    fn(&base, blocks * c / chunks * BIG,
                       (blocks * (c + 1) / chunks * BIG < batch ? blocks * (c + 1) / chunks * BIG
                                                               : batch),
                       base.gv ? gv[c] : NULL, &s);
                    __atomic_fetch_add(&done, 1, __ATOMIC_RELAXED);
                }
            }
            free(s.in0);
            free(s.in1);
            free(s.out);
        }
    }
    for (int c = 1; base.gv && c < chunks; c++) {
        if (gv[c] && done == chunks)
            for (int64_t e = 0; e < w; e++)
                base.gv[e] += gv[c][e];
        free(gv[c]);
    }
    return done == chunks ? 0 : -1;
}

/* y[B][n_out] = x[B][n_in] . W^T + bias, W given as ELL (idx, val: [n_out][d]), on up to
 * `threads` threads. Returns 0, or -1 when scratch memory cannot be allocated. */
int ell_forward(const float *x, int64_t batch, int64_t n_in, int64_t n_out, int64_t d,
                const int32_t *idx, const float *val, const float *bias, float *y, int threads)
{
    struct job job = {.x = x, .val = val, .bias = bias, .idx = idx, .n_in = n_in,
                      .n_out = n_out, .d = d, .y = y};
    return run_split(job, batch, threads, batch * n_out * d, forward_range);
}

/* Given g = dL/dy [B][n_out]:
 *   gx[B][n_in]  = g . W, through the transposed ELL (t_idx, t_val: [n_in][fan_out]);
 *   gv[n_out][d] = sum_b g[b][o] * x[b][idx[o][k]]   (overwritten).
 * Either output may be NULL when its gradient is not needed. Returns 0, or -1 on no memory. */
int ell_backward(const float *x, const float *g, int64_t batch, int64_t n_in, int64_t n_out,
                 int64_t d, const int32_t *idx, int64_t fan_out, const int32_t *t_idx,
                 const float *t_val, float *gx, float *gv, int threads)
{
    struct job job = {.x = x, .g = g, .idx = idx, .t_idx = t_idx, .t_val = t_val,
                      .n_in = n_in, .n_out = n_out, .d = d, .fan_out = fan_out, .gx = gx,
                      .gv = gv};
    return run_split(job, batch, threads, 2 * batch * n_out * d, backward_range);
}
