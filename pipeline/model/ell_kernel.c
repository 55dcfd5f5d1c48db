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

#ifndef VW
#define VW 16
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

/* Transposes go through SQ x nb squares, so both sides stay in L1 whatever n is. */
enum { SQ = 16 };

/* Rows [b0, b0+nb) of x ([B][n], row stride n) into xt[n][tile]; lanes past nb are zero. */
static void transpose_block(const float *x, int64_t n, int64_t b0, int nb, int tile, float *xt)
{
    if (nb < tile)
        memset(xt, 0, sizeof(float) * (size_t)n * (size_t)tile);
    for (int64_t i0 = 0; i0 < n; i0 += SQ) {
        int64_t i1 = i0 + SQ < n ? i0 + SQ : n;
        for (int t = 0; t < nb; t++) {
            const float *row = x + (b0 + t) * n;
            for (int64_t i = i0; i < i1; i++)
                xt[i * tile + t] = row[i];
        }
    }
}

/* yt[n][tile] back into rows [b0, b0+nb) of out ([B][n]). */
static void untranspose_block(const float *yt, int64_t n, int64_t b0, int nb, int tile, float *out)
{
    for (int64_t i0 = 0; i0 < n; i0 += SQ) {
        int64_t i1 = i0 + SQ < n ? i0 + SQ : n;
        for (int t = 0; t < nb; t++) {
            float *row = out + (b0 + t) * n;
            for (int64_t i = i0; i < i1; i++)
                row[i] = yt[i * tile + t];
        }
    }
}

/* Gather-accumulate for one block: out[b0+t][o] = bias[o] + sum_k val[o][k] * xt[idx[o][k]][t]
 * (out row stride n_out). TILE is a compile-time constant so the accumulators stay in
 * registers. */
#define DEFINE_GATHER(NAME, TILE)                                                            \
static void NAME(const float *xt, int64_t n_out, int64_t d,                                  \
                          const int32_t *idx, const float *val, const float *bias,           \
                          float *yt, float *out, int64_t b0, int nb)                         \
{                                                                                            \
    enum { NV = TILE / VW };                                                                 \
    for (int64_t o = 0; o < n_out; o++) {                                                    \
        vecw even[NV], odd[NV];  /* two chains: an FMA's latency, not its issue, bound one */ \
        float b = bias ? bias[o] : 0.0f;                                                     \
        for (int v = 0; v < NV; v++) {                                                       \
            even[v] = (vecw){0} + b;                                                         \
            odd[v] = (vecw){0};                                                              \
        }                                                                                    \
        const int32_t *io = idx + o * d;                                                     \
        const float *vo = val + o * d;                                                       \
        int64_t k = 0;                                                                       \
        for (; k + 1 < d; k += 2) {                                                          \
            const vecw *r0 = (const vecw *)(xt + (int64_t)io[k] * TILE);                     \
            const vecw *r1 = (const vecw *)(xt + (int64_t)io[k + 1] * TILE);                 \
            float w0 = vo[k], w1 = vo[k + 1];                                                \
            for (int v = 0; v < NV; v++) {                                                   \
                even[v] += w0 * r0[v];                                                       \
                odd[v] += w1 * r1[v];                                                        \
            }                                                                                \
        }                                                                                    \
        if (k < d) {                                                                         \
            const vecw *r0 = (const vecw *)(xt + (int64_t)io[k] * TILE);                     \
            for (int v = 0; v < NV; v++)                                                     \
                even[v] += vo[k] * r0[v];                                                    \
        }                                                                                    \
        vecw acc[NV];                                                                        \
        for (int v = 0; v < NV; v++)                                                         \
            acc[v] = even[v] + odd[v];                                                       \
        vecw *dst = (vecw *)(yt + o * TILE);                                                 \
        for (int v = 0; v < NV; v++)                                                         \
            dst[v] = acc[v];                                                                 \
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

/* One call's arguments; a thread runs samples [b_begin, b_end) of it. */
struct job {
    const float *x, *g, *val, *bias, *t_val;
    const int32_t *idx, *t_idx;
    int64_t n_in, n_out, d, fan_out;
    float *y, *gx, *gv; /* gv: this thread's own accumulator, zeroed */
    int64_t b_begin, b_end;
    int rc;
};

static void *forward_range(void *arg)
{
    struct job *j = arg;
    float *xt = scratch(j->n_in * BIG), *yt = scratch(j->n_out * BIG);
    j->rc = (xt && yt) ? 0 : -1;
    for (int64_t b0 = j->b_begin; j->rc == 0 && b0 < j->b_end;) {
        int tile = tile_at(j->b_end - b0);
        int nb = (int)(j->b_end - b0 < tile ? j->b_end - b0 : tile);
        transpose_block(j->x, j->n_in, b0, nb, tile, xt);
        if (tile == BIG)
            gather_big(xt, j->n_out, j->d, j->idx, j->val, j->bias, yt, j->y, b0, nb);
        else
            gather_small(xt, j->n_out, j->d, j->idx, j->val, j->bias, yt, j->y, b0, nb);
        b0 += nb;
    }
    free(xt);
    free(yt);
    return NULL;
}

static void *backward_range(void *arg)
{
    struct job *j = arg;
    float *gt = scratch(j->n_out * BIG);
    float *xt = j->gv ? scratch(j->n_in * BIG) : NULL;
    float *gxt = j->gx ? scratch(j->n_in * BIG) : NULL;
    j->rc = (gt && (!j->gv || xt) && (!j->gx || gxt)) ? 0 : -1;
    for (int64_t b0 = j->b_begin; j->rc == 0 && b0 < j->b_end;) {
        int tile = tile_at(j->b_end - b0);
        int nb = (int)(j->b_end - b0 < tile ? j->b_end - b0 : tile);
        transpose_block(j->g, j->n_out, b0, nb, tile, gt);
        if (j->gx) {
            if (tile == BIG)
                gather_big(gt, j->n_in, j->fan_out, j->t_idx, j->t_val, NULL, gxt, j->gx, b0, nb);
            else
                gather_small(gt, j->n_in, j->fan_out, j->t_idx, j->t_val, NULL, gxt, j->gx, b0,
                             nb);
        }
        if (j->gv) {
            transpose_block(j->x, j->n_in, b0, nb, tile, xt);
            if (tile == BIG)
                grad_values_big(xt, gt, j->n_out, j->d, j->idx, j->gv);
            else
                grad_values_small(xt, gt, j->n_out, j->d, j->idx, j->gv);
        }
        b0 += nb;
    }
    free(gt);
    free(xt);
    free(gxt);
    return NULL;
}

/* Below this many multiply-adds a call, starting threads costs more than they save. */
#define MIN_PARALLEL_MACS (1 << 21)
#define MAX_THREADS 64

/* Run fn over [0, batch) split into whole BIG blocks among up to `threads` OpenMP threads.
 * OpenMP, not pthreads: loaded after torch, libgomp.so.1 resolves to torch's own copy, so
 * these are the threads torch's ops just used (still spinning, waiting for work), not two
 * more competing with them for the cores. Samples land in the same blocks whatever the
 * split, so y and gx do not depend on the thread count; gv sums one accumulator per
 * thread, in thread order. Built without OpenMP, the shares simply run one after another. */
static int run_split(struct job base, int64_t batch, int threads, int64_t macs,
                     void *(*fn)(void *))
{
    int64_t blocks = (batch + BIG - 1) / BIG;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > blocks)
        threads = (int)blocks;
    if (threads < 1 || macs < MIN_PARALLEL_MACS)
        threads = 1;
    struct job jobs[MAX_THREADS];
    size_t gv_bytes = sizeof(float) * (size_t)(base.n_out * base.d);
    int64_t b = 0;
    int rc = 0;
    if (base.gv)
        memset(base.gv, 0, gv_bytes);
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].rc = -1;  /* until its share has run */
        jobs[t].b_begin = b;
        b += (blocks / threads + (t < blocks % threads)) * BIG;
        jobs[t].b_end = b < batch ? b : batch;
        if (base.gv && t > 0 && !(jobs[t].gv = calloc(1, gv_bytes)))
            rc = -1;
    }
    if (rc == 0) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int t = 0; t < threads; t++)
            fn(&jobs[t]);
    }
    for (int t = 0; t < threads; t++) {
        if (rc == 0 && jobs[t].rc)
            rc = -1;
        if (base.gv && t > 0) {
            if (rc == 0)
                for (int64_t e = 0; e < base.n_out * base.d; e++)
                    base.gv[e] += jobs[t].gv[e];
            free(jobs[t].gv);
        }
    }
    return rc;
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
