/*
 * dot_scalar.c - the plain-C matmul kernels: the reference every SIMD kernel
 * is tested against, and the path on CPUs without AVX2.
 *
 * Each block dot mirrors ggml's scalar vec_dot: the integer part is exact, the
 * scale is d_w * d_x in float, the per-block sums accumulate in float. One
 * output at a time; no tiling, because this file is for reading, not speed.
 */
#include "quant.h"

static float dot_f32(const float *w, const float *x, int64_t k)
{
    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++)
        sum += w[j] * x[j];
    return sum;
}

/* Products of two halves are exact in float, as in ggml's F16 x F16 dot. */
static float dot_f16(const ekv_f16 *w, const ekv_f16 *x, int64_t k)
{
    float sum = 0.0f;
    for (int64_t j = 0; j < k; j++)
        sum += quant_f16(w[j]) * quant_f16(x[j]);
    return sum;
}

static float dot_q4_0(const blk_q4_0 *w, q8x_row x, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xq = x.qs + b * QK;
        int32_t isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            isum += ((w[b].qs[j] & 0x0F) - 8) * xq[j];
            isum += ((w[b].qs[j] >> 4) - 8) * xq[j + QK / 2];
        }
        sum += (float)isum * (quant_f16(w[b].d) * x.d[b]);
    }
    return sum;
}

static float dot_q4_1(const blk_q4_1 *w, q8x_row x, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xq = x.qs + b * QK;
        int32_t isum = 0;
        for (int j = 0; j < QK / 2; j++) {
            isum += (w[b].qs[j] & 0x0F) * xq[j];
            isum += (w[b].qs[j] >> 4) * xq[j + QK / 2];
        }
        sum += (float)isum * (quant_f16(w[b].d) * x.d[b]) + quant_f16(w[b].m) * x.s[b];
    }
    return sum;
}

static float dot_q8_0(const blk_q8_0 *w, q8x_row x, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xq = x.qs + b * QK;
        int32_t isum = 0;
        for (int j = 0; j < QK; j++)
            isum += w[b].qs[j] * xq[j];
        sum += (float)isum * (quant_f16(w[b].d) * x.d[b]);
    }
    return sum;
}

/* sum_j d*sc_j*q.x - dmin*m_j*sum(x); the mins use Q8_K's 16-element sums. */
static float dot_q4_k(const blk_q4_k *w, const blk_q8_k *x, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w[b].qs;
        const int8_t *xq = x[b].qs;
        int32_t isum = 0, imin = 0;
        for (int j = 0; j < QK_K / 64; j++, q += 32, xq += 64) {
            uint8_t sc1, m1, sc2, m2;
            q4k_scale_min(2 * j, w[b].scales, &sc1, &m1);
            q4k_scale_min(2 * j + 1, w[b].scales, &sc2, &m2);
            int32_t lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += (q[l] & 0xF) * xq[l];
                hi += (q[l] >> 4) * xq[l + 32];
            }
            isum += sc1 * lo + sc2 * hi;
            imin += m1 * (x[b].bsums[4 * j] + x[b].bsums[4 * j + 1]);
            imin += m2 * (x[b].bsums[4 * j + 2] + x[b].bsums[4 * j + 3]);
        }
        sum += quant_f16(w[b].d) * x[b].d * (float)isum;
        sum -= quant_f16(w[b].dmin) * x[b].d * (float)imin;
    }
    return sum;
}

static float dot_q6_k(const blk_q6_k *w, const blk_q8_k *x, int64_t nb)
{
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *ql = w[b].ql, *qh = w[b].qh;
        const int8_t *sc = w[b].scales, *xq = x[b].qs;
        int32_t isum = 0;
        for (int n = 0; n < QK_K; n += 128, ql += 64, qh += 32, sc += 8, xq += 128) {
            for (int half = 0; half < 2; half++) { /* l in [0,16) then [16,32) */
                int32_t s1 = 0, s2 = 0, s3 = 0, s4 = 0;
                for (int l = half * 16; l < half * 16 + 16; l++) {
                    s1 += (((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32) * xq[l];
                    s2 += (((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32) * xq[l + 32];
                    s3 += (((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32) * xq[l + 64];
                    s4 += (((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32) * xq[l + 96];
                }
                isum += sc[half] * s1 + sc[half + 2] * s2 + sc[half + 4] * s3 + sc[half + 6] * s4;
            }
        }
        sum += quant_f16(w[b].d) * x[b].d * (float)isum;
    }
    return sum;
}

#define FOR_EACH_OUTPUT(g, i0, i1, j0, j1, expr)                                            \
    for (int64_t i = (i0); i < (i1); i++) {                                                \
        const uint8_t *wrow = (g)->w + (size_t)i * (g)->w_stride;                          \
        for (int64_t j = (j0); j < (j1); j++) {                                            \
            const uint8_t *xrow = (g)->x + (size_t)j * (g)->x_stride;                      \
            (g)->y[j * (g)->ldy + i] = (expr);                                             \
        }                                                                                  \
    }

static void gemm_f32(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_f32((const float *)wrow, (const float *)xrow, g->k))
}

static void gemm_f16(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_f16((const ekv_f16 *)wrow, (const ekv_f16 *)xrow, g->k))
}

static void gemm_q4_0(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_q4_0((const blk_q4_0 *)wrow, q8x_view(xrow, g->k), g->k / QK))
}

static void gemm_q4_1(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_q4_1((const blk_q4_1 *)wrow, q8x_view(xrow, g->k), g->k / QK))
}

static void gemm_q8_0(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_q8_0((const blk_q8_0 *)wrow, q8x_view(xrow, g->k), g->k / QK))
}

static void gemm_q4_k(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_q4_k((const blk_q4_k *)wrow, (const blk_q8_k *)xrow, g->k / QK_K))
}

static void gemm_q6_k(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    FOR_EACH_OUTPUT(g, i0, i1, j0, j1,
                    dot_q6_k((const blk_q6_k *)wrow, (const blk_q8_k *)xrow, g->k / QK_K))
}

void quant_register_scalar(quant_kernels *t)
{
    t->gemm[QKIND_F32] = gemm_f32;
    t->gemm[QKIND_F16] = gemm_f16;
    t->gemm[QKIND_Q4_0] = gemm_q4_0;
    t->gemm[QKIND_Q4_1] = gemm_q4_1;
    t->gemm[QKIND_Q8_0] = gemm_q8_0;
    t->gemm[QKIND_Q4_K] = gemm_q4_k;
    t->gemm[QKIND_Q6_K] = gemm_q6_k;
    t->prep[QKIND_F32] = NULL;
    t->prep[QKIND_F16] = quant_prep_f16;
    t->prep[QKIND_Q4_0] = quant_prep_q8;
    t->prep[QKIND_Q4_1] = quant_prep_q8;
    t->prep[QKIND_Q8_0] = quant_prep_q8;
    t->prep[QKIND_Q4_K] = quant_prep_q8k;
    t->prep[QKIND_Q6_K] = quant_prep_q8k;
}
