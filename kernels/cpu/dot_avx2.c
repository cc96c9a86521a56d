/*
 * dot_avx2.c - matmul kernels for AVX2 + FMA + F16C (Haswell and later).
 *
 * Compiled with per-function target attributes, so the project needs no
 * -march flag and this file is inert on CPUs the dispatcher does not send
 * here. The 32-block kernels compute a tile of up to 2 weight rows x 4
 * activation rows per step, so one unpacked weight block feeds four dot
 * products (prefill) and decode (m = 1) streams two weight rows side by side
 * (Q4_1: four, with its scales converted four blocks at a time, below);
 * the K-quant kernels unpack one 256-element super-block and reuse it for up
 * to 4 activation rows.
 *
 * The integer block sums are exact and equal to the scalar kernels'; only the
 * float accumulation order differs (eight lanes, summed at the end):
 *   Q4_1: maddubs(nibbles, x) is unsigned x signed, no offset needed.
 *   Q4_0: the same, then -8 * sum(x) from the prepared row fixes the offset.
 *   Q8_0: maddubs(|w|, sign(x, w)), as ggml (no int16 saturation: 2*128*127).
 *   Q4_K, Q6_K: maddubs per 32 quants, madd with the group scales; the
 *   offsets (mins, -32) come from Q8_K's 16-element sums.
 * The Q8 activation quantizer here reproduces quant_prep_q8 bit for bit; the
 * AVX-512 level uses it too.
 */
#include "quant.h"

#if defined(__x86_64__)

#include <immintrin.h>

#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

#define TW 2 /* weight rows per tile */
#define TX 4 /* activation rows per tile */
#define ROUND_EVEN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

AVX2_INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_INLINE int32_t hsum8i(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* How far ahead of the weight rows being read decode prefetches: the same
 * row a few KB on (see dot_avx512.c). */
static inline size_t prefetch_distance(size_t w_stride)
{
    return (size_t)8 * w_stride * (w_stride < 640 ? 2 : 1);
}

AVX2_INLINE float f16_to_f32(ekv_f16 h)
{
    return _cvtsh_ss(h);
}

/* ---- activation quantizer (Q8 rows, see quant.h) ---- */

AVX2_FN void quant_prep_q8_avx2(const float *x, int64_t k, uint8_t *out)
{
    int64_t nb = k / QK, nbp = q8x_blocks(k);
    int8_t *qs = (int8_t *)out;
    float *dd = (float *)(out + nbp * QK);
    float *ss = dd + nbp;
    int32_t *sums = (int32_t *)(ss + nbp);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++, x += QK) {
        __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
        __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
        __m256 mx = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
        mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), ROUND_EVEN));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), ROUND_EVEN));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), ROUND_EVEN));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), ROUND_EVEN));
        int32_t sum = hsum8i(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(qs + b * QK), p);
        dd[b] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
        ss[b] = _cvtsh_ss(_cvtss_sh(d * (float)sum, _MM_FROUND_TO_NEAREST_INT));
        sums[b] = sum;
    }
    for (int64_t b = nb; b < nbp; b++) {
        memset(qs + b * QK, 0, QK);
        dd[b] = ss[b] = 0.0f;
        sums[b] = 0;
    }
}

/* ---- Q4_0 / Q8_0 (tile_q8x) and Q4_1 (tile_q4_1) x Q8 rows ---- */

/* 32 nibbles -> 32 bytes in element order: low nibbles first, then high. */
AVX2_INLINE __m256i unpack_nibbles(const uint8_t *qs)
{
    /* the 16 bytes in both halves (a load), the upper half shifted by 4 */
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4)),
                            _mm256_set1_epi8(0x0F));
}

/*
 * One tile: weight rows i..i+nw-1 x activation rows j..j+nx-1. `kind`, nw and
 * nx are constants at every call site, so the branches and loops fold away.
 */
AVX2_INLINE void tile_q8x(const quant_gemm *g, int64_t i, int64_t j, const int nw, const int nx,
                          const quant_kind kind)
{
    const int64_t nb = g->k / QK;
    const size_t bs = kind == QKIND_Q4_0 ? sizeof(blk_q4_0) : sizeof(blk_q8_0);
    const size_t pf = prefetch_distance(g->w_stride);
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *wr[TW];
    q8x_row xr[TX];
    __m256 acc[TW][TX];
#pragma GCC unroll 4
    for (int r = 0; r < nw; r++)
        wr[r] = g->w + (size_t)(i + r) * g->w_stride;
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        xr[c] = q8x_view(g->x + (size_t)(j + c) * g->x_stride, g->k);
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256i wq[TW];
        __m256 wd[TW];
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++) {
            if (nx <= 2) /* decode streams the weights once: fetch a few KB ahead */
                _mm_prefetch((const char *)wr[r] + pf + (size_t)b * bs, _MM_HINT_T0);
            if (kind == QKIND_Q4_0) {
                const blk_q4_0 *blk = (const blk_q4_0 *)wr[r] + b;
                wq[r] = unpack_nibbles(blk->qs);
                wd[r] = _mm256_set1_ps(f16_to_f32(blk->d));
            } else {
                const blk_q8_0 *blk = (const blk_q8_0 *)wr[r] + b;
                wq[r] = _mm256_loadu_si256((const __m256i *)blk->qs);
                wd[r] = _mm256_set1_ps(f16_to_f32(blk->d));
            }
        }
#pragma GCC unroll 4
        for (int c = 0; c < nx; c++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[c].qs + b * QK));
            const __m256 xd = _mm256_broadcast_ss(&xr[c].d[b]);
#pragma GCC unroll 4
            for (int r = 0; r < nw; r++) {
                __m256i prod;
                if (kind == QKIND_Q8_0)
                    prod = _mm256_maddubs_epi16(_mm256_abs_epi8(wq[r]), _mm256_sign_epi8(xv, wq[r]));
                else
                    prod = _mm256_maddubs_epi16(wq[r], xv);
                __m256i isum = _mm256_madd_epi16(prod, ones);
                if (kind == QKIND_Q4_0)
                    isum = _mm256_add_epi32(isum, _mm256_setr_epi32(-8 * xr[c].sum[b], 0, 0, 0, 0, 0, 0, 0));
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(wd[r], xd), acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++)
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            g->y[(j + c) * g->ldy + i + r] = hsum8(acc[r][c]);
}

/* Walks [i0,i1) x [j0,j1) in tiles; the remainders get smaller tiles. */
AVX2_INLINE void gemm_q8x(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                          const quant_kind kind)
{
    for (int64_t i = i0; i < i1; i += TW) {
        const int nw = i1 - i < TW ? (int)(i1 - i) : TW;
        for (int64_t j = j0; j < j1; j += TX) {
            const int nx = j1 - j < TX ? (int)(j1 - j) : TX;
            if (nw == 2) {
                switch (nx) {
                case 4: tile_q8x(g, i, j, 2, 4, kind); break;
                case 3: tile_q8x(g, i, j, 2, 3, kind); break;
                case 2: tile_q8x(g, i, j, 2, 2, kind); break;
                default: tile_q8x(g, i, j, 2, 1, kind); break;
                }
            } else {
                switch (nx) {
                case 4: tile_q8x(g, i, j, 1, 4, kind); break;
                case 3: tile_q8x(g, i, j, 1, 3, kind); break;
                case 2: tile_q8x(g, i, j, 1, 2, kind); break;
                default: tile_q8x(g, i, j, 1, 1, kind); break;
                }
            }
        }
    }
}

/*
 * Q4_1 in groups of four blocks. A group's scales are converted together:
 * the blocks' (d, m) fp16 pairs are four dword loads and one F16C convert,
 * times the activation row's interleaved (d, s), so lane 2q holds block q's
 * d_w * d_x and lane 2q+1 its m * s. The m * s lanes are added to the
 * accumulator once per group (off the per-block chain), the d_w * d_x lanes
 * scale the blocks' integer dot products. Each (weight row, activation row)
 * pair's operations and their order depend on neither nw nor nx, so decode
 * (4 weight rows x 1) and prefill (2 x 4) tiles give the same bits.
 */
#define Q41_GROUP 4

/* q blocks at b (q <= 4 a constant): one group's step for the tile */
AVX2_INLINE void q41_group(const blk_q4_1 *const *wr, const q8x_row *xr, __m256 (*acc)[TX],
                           int64_t b, const int nw, const int nx, const int q, size_t pf)
{
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256 mlanes = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    float sc[TW * 2][TX][8] __attribute__((aligned(32)));
    __m256 wdm[TW * 2];
#pragma GCC unroll 4
    for (int r = 0; r < nw; r++) {
        const uint8_t *p = (const uint8_t *)(wr[r] + b);
        if (nx <= 2) { /* decode streams the weights once: fetch a few KB ahead */
            _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
            _mm_prefetch((const char *)p + pf + 64, _MM_HINT_T0);
        }
        uint32_t dm[4] = {0, 0, 0, 0};
#pragma GCC unroll 4
        for (int u = 0; u < q; u++)
            memcpy(&dm[u], p + u * sizeof(blk_q4_1), 4);
        wdm[r] = _mm256_cvtph_ps(_mm_setr_epi32((int)dm[0], (int)dm[1], (int)dm[2], (int)dm[3]));
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        __m128 xd, xs;
        if (q == Q41_GROUP) {
            xd = _mm_loadu_ps(xr[c].d + b);
            xs = _mm_loadu_ps(xr[c].s + b);
        } else { /* the row's last blocks: zeros past them */
            const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(q), _mm_setr_epi32(0, 1, 2, 3));
            xd = _mm_maskload_ps(xr[c].d + b, m);
            xs = _mm_maskload_ps(xr[c].s + b, m);
        }
        const __m256 xds = _mm256_setr_m128(_mm_unpacklo_ps(xd, xs), _mm_unpackhi_ps(xd, xs));
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++) {
            const __m256 s = _mm256_mul_ps(wdm[r], xds);
            _mm256_store_ps(sc[r][c], s);
            acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_and_ps(s, mlanes));
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < q; u++) {
        __m256i wq[TW * 2];
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            wq[r] = unpack_nibbles(wr[r][b + u].qs);
#pragma GCC unroll 4
        for (int c = 0; c < nx; c++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[c].qs + (b + u) * QK));
#pragma GCC unroll 4
            for (int r = 0; r < nw; r++) {
                const __m256i isum = _mm256_madd_epi16(_mm256_maddubs_epi16(wq[r], xv), ones);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum),
                                            _mm256_broadcast_ss(&sc[r][c][2 * u]), acc[r][c]);
            }
        }
    }
}

/* Weight rows i..i+nw-1 (nw <= 4; 4 only with nx = 1) x activation rows j..j+nx-1. */
AVX2_INLINE void tile_q4_1(const quant_gemm *g, int64_t i, int64_t j, const int nw, const int nx)
{
    const int64_t nb = g->k / QK;
    const size_t pf = prefetch_distance(g->w_stride);
    const blk_q4_1 *wr[TW * 2];
    q8x_row xr[TX];
    __m256 acc[TW * 2][TX];
#pragma GCC unroll 4
    for (int r = 0; r < nw; r++)
        wr[r] = (const blk_q4_1 *)(g->w + (size_t)(i + r) * g->w_stride);
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        xr[c] = q8x_view(g->x + (size_t)(j + c) * g->x_stride, g->k);
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            acc[r][c] = _mm256_setzero_ps();
    }
    int64_t b = 0;
    for (; b + Q41_GROUP <= nb; b += Q41_GROUP)
        q41_group(wr, xr, acc, b, nw, nx, Q41_GROUP, pf);
    switch (nb - b) {
    case 3: q41_group(wr, xr, acc, b, nw, nx, 3, pf); break;
    case 2: q41_group(wr, xr, acc, b, nw, nx, 2, pf); break;
    case 1: q41_group(wr, xr, acc, b, nw, nx, 1, pf); break;
    default: break;
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++)
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            g->y[(j + c) * g->ldy + i + r] = hsum8(acc[r][c]);
}

AVX2_FN static void gemm_q4_1_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    if (j1 - j0 == 1) { /* decode: four weight rows side by side, four chains */
        int64_t i = i0;
        for (; i + 4 <= i1; i += 4)
            tile_q4_1(g, i, j0, 4, 1);
        switch (i1 - i) {
        case 3: tile_q4_1(g, i, j0, 3, 1); break;
        case 2: tile_q4_1(g, i, j0, 2, 1); break;
        case 1: tile_q4_1(g, i, j0, 1, 1); break;
        default: break;
        }
        return;
    }
    for (int64_t i = i0; i < i1; i += TW) {
        const int nw = i1 - i < TW ? (int)(i1 - i) : TW;
        for (int64_t j = j0; j < j1; j += TX) {
            const int nx = j1 - j < TX ? (int)(j1 - j) : TX;
            if (nw == 2) {
                switch (nx) {
                case 4: tile_q4_1(g, i, j, 2, 4); break;
                case 3: tile_q4_1(g, i, j, 2, 3); break;
                case 2: tile_q4_1(g, i, j, 2, 2); break;
                default: tile_q4_1(g, i, j, 2, 1); break;
                }
            } else {
                switch (nx) {
                case 4: tile_q4_1(g, i, j, 1, 4); break;
                case 3: tile_q4_1(g, i, j, 1, 3); break;
                case 2: tile_q4_1(g, i, j, 1, 2); break;
                default: tile_q4_1(g, i, j, 1, 1); break;
                }
            }
        }
    }
}

AVX2_FN static void gemm_q4_0_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_q8x(g, i0, i1, j0, j1, QKIND_Q4_0);
}

AVX2_FN static void gemm_q8_0_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_q8x(g, i0, i1, j0, j1, QKIND_Q8_0);
}

/* ---- F32 / F16 weights: float dot products, eight lanes ---- */

AVX2_INLINE __m256 load8(const uint8_t *row, int64_t e, const int half)
{
    if (half)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const ekv_f16 *)row + e)));
    return _mm256_loadu_ps((const float *)row + e);
}

AVX2_INLINE float load1(const uint8_t *row, int64_t e, const int half)
{
    return half ? f16_to_f32(((const ekv_f16 *)row)[e]) : ((const float *)row)[e];
}

AVX2_INLINE void tile_float(const quant_gemm *g, int64_t i, int64_t j, const int nw, const int nx,
                            const int half)
{
    const size_t pf = prefetch_distance(g->w_stride);
    const uint8_t *wr[TW], *xr[TX];
    __m256 acc[TW][TX];
#pragma GCC unroll 4
    for (int r = 0; r < nw; r++)
        wr[r] = g->w + (size_t)(i + r) * g->w_stride;
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        xr[c] = g->x + (size_t)(j + c) * g->x_stride;
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            acc[r][c] = _mm256_setzero_ps();
    }
    const int64_t k8 = g->k & ~(int64_t)7;
    for (int64_t e = 0; e < k8; e += 8) {
        __m256 wv[TW];
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++) {
            if (nx <= 2 && (e & 15) == 0)
                _mm_prefetch((const char *)wr[r] + pf + (size_t)e * (half ? 2 : 4), _MM_HINT_T0);
            wv[r] = load8(wr[r], e, half);
        }
#pragma GCC unroll 4
        for (int c = 0; c < nx; c++) {
            const __m256 xv = load8(xr[c], e, half);
#pragma GCC unroll 4
            for (int r = 0; r < nw; r++)
                acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++)
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++) {
            float sum = hsum8(acc[r][c]);
            for (int64_t e = k8; e < g->k; e++)
                sum += load1(wr[r], e, half) * load1(xr[c], e, half);
            g->y[(j + c) * g->ldy + i + r] = sum;
        }
}

AVX2_INLINE void gemm_float(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                            const int half)
{
    for (int64_t i = i0; i < i1; i += TW) {
        const int nw = i1 - i < TW ? (int)(i1 - i) : TW;
        for (int64_t j = j0; j < j1; j += TX) {
            const int nx = j1 - j < TX ? (int)(j1 - j) : TX;
            if (nw == 2) {
                switch (nx) {
                case 4: tile_float(g, i, j, 2, 4, half); break;
                case 3: tile_float(g, i, j, 2, 3, half); break;
                case 2: tile_float(g, i, j, 2, 2, half); break;
                default: tile_float(g, i, j, 2, 1, half); break;
                }
            } else {
                switch (nx) {
                case 4: tile_float(g, i, j, 1, 4, half); break;
                case 3: tile_float(g, i, j, 1, 3, half); break;
                case 2: tile_float(g, i, j, 1, 2, half); break;
                default: tile_float(g, i, j, 1, 1, half); break;
                }
            }
        }
    }
}

AVX2_FN static void gemm_f32_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_float(g, i0, i1, j0, j1, 0);
}

AVX2_FN static void gemm_f16_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_float(g, i0, i1, j0, j1, 1);
}

AVX2_FN static void prep_f16_avx2(const float *x, int64_t k, uint8_t *out)
{
    ekv_f16 *h = (ekv_f16 *)out;
    int64_t e = 0;
    for (; e + 8 <= k; e += 8)
        _mm_storeu_si128((__m128i *)(h + e),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + e), _MM_FROUND_TO_NEAREST_INT));
    for (; e < k; e++)
        h[e] = _cvtss_sh(x[e], _MM_FROUND_TO_NEAREST_INT);
}

/* ---- K-quants x Q8_K: one unpacked weight super-block feeds up to 4 rows ---- */

/* A weight super-block as 8 vectors of 32 unsigned quants (Q4_K 0..15, Q6_K
 * 0..63 = q + 32), per vector the int16 scales of its two 16-element groups,
 * and the per-group multipliers of Q8_K's bsums that take the offset out
 * (Q4_K: -min, applied with dmin; Q6_K: -32 * scale, applied with d). */
typedef struct kblock {
    __m256i q[8];
    __m256i sc[8];
    __m256i corr;
    float d, dmin;
} kblock;

/* Byte shuffle that spreads int16 word a over the low 128-bit lane and word b
 * over the high one (both lanes must hold the same 8 words). */
AVX2_INLINE __m256i spread_words(__m256i words, int a, int b)
{
    const __m256i idx = _mm256_setr_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * a)),
                                          _mm_set1_epi16((short)(0x0100 + 0x0202 * b)));
    return _mm256_shuffle_epi8(words, idx);
}

AVX2_INLINE void unpack_q4_k(const blk_q4_k *w, kblock *u)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; j++) {
        const __m256i bits = _mm256_loadu_si256((const __m256i *)(w->qs + 32 * j));
        u->q[2 * j] = _mm256_and_si256(bits, m4);
        u->q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
    }
    /* the 12 packed bytes -> 8 scales then 8 mins (q4k_scale_min, four at a time) */
    uint32_t t[4];
    memcpy(t, w->scales, 12);
    t[3] = ((t[2] >> 4) & 0x0f0f0f0f) | (((t[1] >> 6) & 0x03030303) << 4);
    const uint32_t mins_lo = t[1] & 0x3f3f3f3f;
    t[1] = (t[2] & 0x0f0f0f0f) | (((t[0] >> 6) & 0x03030303) << 4);
    t[2] = mins_lo;
    t[0] &= 0x3f3f3f3f;
    const __m128i sm = _mm_loadu_si128((const __m128i *)t);
    const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
    for (int v = 0; v < 8; v++)
        u->sc[v] = spread_words(sc, v, v);
    const __m128i mn = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
    u->corr = _mm256_sub_epi16(_mm256_setzero_si256(),
                               _mm256_setr_m128i(_mm_unpacklo_epi16(mn, mn), _mm_unpackhi_epi16(mn, mn)));
    u->d = f16_to_f32(w->d);
    u->dmin = f16_to_f32(w->dmin);
}

AVX2_INLINE void unpack_q6_k(const blk_q6_k *w, kblock *u)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; h++) {
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h));
        const __m256i l2 = _mm256_loadu_si256((const __m256i *)(w->ql + 64 * h + 32));
        const __m256i hb = _mm256_loadu_si256((const __m256i *)(w->qh + 32 * h));
        /* quarter t of the 128: low 4 bits from ql (t odd: second 32 bytes,
         * t >= 2: high nibble), top 2 bits from qh bits 2t..2t+1 */
        u->q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                          _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
        u->q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l2, m4),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m2), 4));
        u->q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m2), 4));
        u->q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m4),
                                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m2), 4));
    }
    const __m128i raw = _mm_loadu_si128((const __m128i *)w->scales);
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(raw));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_srli_si128(raw, 8)));
    for (int v = 0; v < 4; v++) {
        u->sc[v] = spread_words(lo, 2 * v, 2 * v + 1);
        u->sc[v + 4] = spread_words(hi, 2 * v, 2 * v + 1);
    }
    u->corr = _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 5));
    u->d = f16_to_f32(w->d);
    u->dmin = 0.0f;
}

/*
 * Weight row i against activation rows j..j+nx-1: sum over super-blocks of
 * d * sum(scale * q . x) plus the offset term, which Q8_K's 16-element sums
 * make exact in integers (Q4_K: -dmin * sum(min * bsum), Q6_K: -32 * d * sum(scale * bsum)).
 */
AVX2_INLINE void row_k(const quant_gemm *g, int64_t i, int64_t j, const int nx, const quant_kind kind)
{
    const int64_t nb = g->k / QK_K;
    const uint8_t *wrow = g->w + (size_t)i * g->w_stride;
    const blk_q8_k *xr[TX];
    __m256 acc[TX];
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        xr[c] = (const blk_q8_k *)(g->x + (size_t)(j + c) * g->x_stride);
        acc[c] = _mm256_setzero_ps();
    }
    const size_t bs = kind == QKIND_Q4_K ? sizeof(blk_q4_k) : sizeof(blk_q6_k);
    kblock u;
    for (int64_t b = 0; b < nb; b++) {
        if (nx <= 2) /* decode: one sequential stream, fetch ~2 KB ahead */
            for (size_t o = 0; o < bs; o += 64)
                _mm_prefetch((const char *)wrow + (size_t)b * bs + 2048 + o, _MM_HINT_T0);
        if (kind == QKIND_Q4_K)
            unpack_q4_k((const blk_q4_k *)wrow + b, &u);
        else
            unpack_q6_k((const blk_q6_k *)wrow + b, &u);
#pragma GCC unroll 4
        for (int c = 0; c < nx; c++) {
            const blk_q8_k *x = xr[c] + b;
            __m256i isum = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int v = 0; v < 8; v++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * v));
                isum = _mm256_add_epi32(isum, _mm256_madd_epi16(_mm256_maddubs_epi16(u.q[v], xv), u.sc[v]));
            }
            const __m256i icorr = _mm256_madd_epi16(u.corr, _mm256_loadu_si256((const __m256i *)x->bsums));
            if (kind == QKIND_Q6_K) {
                isum = _mm256_add_epi32(isum, icorr);
            } else {
                acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(u.dmin * x->d), _mm256_cvtepi32_ps(icorr), acc[c]);
            }
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(u.d * x->d), _mm256_cvtepi32_ps(isum), acc[c]);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++)
        g->y[(j + c) * g->ldy + i] = hsum8(acc[c]);
}

AVX2_INLINE void gemm_k(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                        const quant_kind kind)
{
    for (int64_t i = i0; i < i1; i++) {
        for (int64_t j = j0; j < j1; j += TX) {
            switch (j1 - j < TX ? (int)(j1 - j) : TX) {
            case 4: row_k(g, i, j, 4, kind); break;
            case 3: row_k(g, i, j, 3, kind); break;
            case 2: row_k(g, i, j, 2, kind); break;
            default: row_k(g, i, j, 1, kind); break;
            }
        }
    }
}

AVX2_FN static void gemm_q4_k_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_k(g, i0, i1, j0, j1, QKIND_Q4_K);
}

AVX2_FN static void gemm_q6_k_avx2(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_k(g, i0, i1, j0, j1, QKIND_Q6_K);
}

void quant_register_avx2(quant_kernels *t)
{
    t->gemm[QKIND_F32] = gemm_f32_avx2;
    t->gemm[QKIND_F16] = gemm_f16_avx2;
    t->gemm[QKIND_Q4_0] = gemm_q4_0_avx2;
    t->gemm[QKIND_Q4_1] = gemm_q4_1_avx2;
    t->gemm[QKIND_Q8_0] = gemm_q8_0_avx2;
    t->gemm[QKIND_Q4_K] = gemm_q4_k_avx2;
    t->gemm[QKIND_Q6_K] = gemm_q6_k_avx2;
    t->prep[QKIND_F16] = prep_f16_avx2;
    t->prep[QKIND_Q4_0] = quant_prep_q8_avx2;
    t->prep[QKIND_Q4_1] = quant_prep_q8_avx2;
    t->prep[QKIND_Q8_0] = quant_prep_q8_avx2;
}

#endif /* __x86_64__ */
