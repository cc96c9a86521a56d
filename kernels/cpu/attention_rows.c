/*
 * attention_rows.c - prefill attention: many rows of one sequence over one
 * KV head, with each K and V tile loaded and widened once for a tile of
 * queries drawn from several rows and all the query heads of the GQA group.
 *
 * kern_attention scores one position at a time, so a prefill chunk of m rows
 * streams the head's K and V m times and widens each fp16 element m times.
 * Here the rows' G query heads are flattened to one list (row r, head h at
 * r * G + h) and taken up to ROWS_TILE_Q at a time, each query with its own
 * position: one K column load feeds ROWS_TILE_Q FMA chains, one V row load
 * ROWS_TILE_Q accumulators. The tile also stops at the last token any of
 * its queries can see, so a causal chunk's rows do not walk (and exp) the
 * chunk's later rows, which they would only mask.
 *
 * Bit-identical to kern_attention, per query, on every ISA: each query's
 * arithmetic is exactly attention.c's - the same per-lane FMA chains over j
 * (four interleaved partial sums on AVX-512), the same max, the same
 * vectorised exp (attention.c's, here sixteen lanes wide) and sum lane by
 * lane (as kern_attn_softmax_avx2: tokens keep their lanes t mod 8, and the
 * trailing masked tokens this tile drops only added exact zeros), the same
 * token order in the V sum. That is why this
 * is three passes over the tile's tokens rather than an online softmax: an
 * online softmax rescales the running sums as the maximum grows, which
 * rounds differently from decode, and kernels.h promises that prefill,
 * batched decode and one-token decode give the same bits
 * (tests/model/test_reference_forward.c checks it on the whole model). The
 * scores of a tile (ROWS_TILE_Q x the visible extent, 192 KiB at 8k) stay
 * in L2 between the passes.
 *
 * Only the AVX-512 path is tiled; other ISAs, packed (SparK) views and
 * geometries without a SIMD path run kern_attention row by row, which is
 * the same result by definition.
 */
#include <math.h>

#include "attention_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* queries per tile: 6 x 4 partial-sum zmm registers (scores) or 6 x 4 output
 * zmm registers (values, head_dim 64) plus the operands fit the 32 zmm */
#define ROWS_TILE_Q 6

_Static_assert(ROWS_TILE_Q <= KERN_ATTN_TILE_Q, "kernels.h sizes the scratch for the tile");

/* The kern_attention fallback: row by row, the G heads of a row together. */
static void rows_by_row(const kern_kv_view *kv, const float *Q, int n_rows, int g, int row_stride,
                        const int32_t *row_pos, float scale, float *out, int out_stride,
                        float *scores)
{
    int32_t qpos[KERN_ATTN_ROWS_MAX_G];
    for (int r = 0; r < n_rows; r++) {
        for (int h = 0; h < g; h++)
            qpos[h] = row_pos[r];
        kern_attention(kv, Q + (size_t)r * row_stride, g, kv->head_dim, qpos, scale,
                       out + (size_t)r * out_stride, kv->head_dim, scores);
    }
}

#if defined(__x86_64__)
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
#define AVX512_FN __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((always_inline, target(AVX512_TARGET)))

/* dot[i] = q[i] . K for the 16 tokens of the tile at kb, i < NQ: attention.c's
 * dots_avx512 with a pointer per query (they come from several rows) */
AVX512_INLINE void tile_dots(const ekv_f16 *kb, int32_t bt, int32_t d, const float *const *q,
                             const int NQ, __m512 *dot, const ekv_f16 *ahead)
{
    __m512 a[ROWS_TILE_Q][4];
#pragma GCC unroll 6
    for (int i = 0; i < NQ; i++)
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++)
            a[i][u] = _mm512_setzero_ps();
    for (int32_t j = 0; j < d; j += 4) {
        if (ahead) { /* the head's blocks are scattered: the prefetchers lag at each jump */
            _mm_prefetch((const char *)(ahead + (size_t)j * bt), _MM_HINT_T0);
            _mm_prefetch((const char *)(ahead + (size_t)(j + 2) * bt), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            const __m512 kj =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kb + (size_t)(j + u) * bt)));
#pragma GCC unroll 6
            for (int i = 0; i < NQ; i++)
                a[i][u] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][j + u]), kj, a[i][u]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < NQ; i++)
        dot[i] = _mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3]));
}

/* Scaled, masked logits of nq queries over the first n tokens (rows n apart
 * in scores) and each query's maximum. */
AVX512_FN static void tile_scores(const kern_kv_view *kv, int32_t n, const float *const *q,
                                  const int32_t *qpos, int nq, float scale, float *scores,
                                  float *max)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens;
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
    __m512 vmax[ROWS_TILE_Q];
    for (int i = 0; i < nq; i++)
        vmax[i] = ninf;
    for (int32_t t0 = 0; t0 < n; t0 += 16) {
        const ekv_f16 *kb = kv->k_blocks[t0 / bt] + t0 % bt;
        const int32_t *pb = kv->pos_blocks[t0 / bt] + t0 % bt;
        const __mmask16 real = n - t0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t0)) - 1);
        const __m512i tpos = _mm512_maskz_loadu_epi32(real, pb);
        __mmask16 vis[ROWS_TILE_Q], any = 0;
        for (int i = 0; i < nq; i++) {
            vis[i] = _mm512_mask_cmple_epi32_mask(real, tpos, _mm512_set1_epi32(qpos[i]));
            any |= vis[i];
        }
        if (!any) { /* whole tile masked for every query: skip the dot products */
            for (int i = 0; i < nq; i++)
                _mm512_mask_storeu_ps(scores + (size_t)i * n + t0, real, ninf);
            continue;
        }
        const ekv_f16 *ahead = t0 + 64 < n ? kv->k_blocks[(t0 + 64) / bt] + (t0 + 64) % bt : NULL;
        __m512 dot[ROWS_TILE_Q];
        switch (nq) { /* a constant tile size keeps the accumulators in registers */
        case 1: tile_dots(kb, bt, d, q, 1, dot, ahead); break;
        case 2: tile_dots(kb, bt, d, q, 2, dot, ahead); break;
        case 3: tile_dots(kb, bt, d, q, 3, dot, ahead); break;
        case 4: tile_dots(kb, bt, d, q, 4, dot, ahead); break;
        case 5: tile_dots(kb, bt, d, q, 5, dot, ahead); break;
        default: tile_dots(kb, bt, d, q, 6, dot, ahead); break;
        }
        for (int i = 0; i < nq; i++) {
            const __m512 s = _mm512_mask_blend_ps(vis[i], ninf, _mm512_mul_ps(dot[i], vscale));
            vmax[i] = _mm512_max_ps(vmax[i], s);
            _mm512_mask_storeu_ps(scores + (size_t)i * n + t0, real, s);
        }
    }
    for (int i = 0; i < nq; i++)
        max[i] = _mm512_reduce_max_ps(vmax[i]);
}

/* o[i] += p_it v_t for the rows of one block, in token order; `check`
 * skips zero weights (constant at each call site) */
AVX512_INLINE void values_rows(const ekv_f16 *vb, const ekv_f16 *ahead, int32_t d, int32_t rows,
                               const float *p, int32_t n, __m512 (*o)[4], const int NQ,
                               const int NC, const int check)
{
    for (int32_t r = 0; r < rows; r++) {
        const ekv_f16 *v = vb + (size_t)r * d;
        if (ahead) {
            _mm_prefetch((const char *)(ahead + (size_t)r * d), _MM_HINT_T0);
            if (NC == 4)
                _mm_prefetch((const char *)(ahead + (size_t)r * d + 32), _MM_HINT_T0);
        }
        __m512 vc[4];
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            vc[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16 * c)));
#pragma GCC unroll 6
        for (int i = 0; i < NQ; i++) {
            if (check && p[(size_t)i * n + r] == 0.0f)
                continue;
            const __m512 vp = _mm512_set1_ps(p[(size_t)i * n + r]);
#pragma GCC unroll 4
            for (int c = 0; c < NC; c++)
                o[i][c] = _mm512_fmadd_ps(vp, vc[c], o[i][c]);
        }
    }
}

/* out[i] = inv_i * sum_t p_it v_t over dimensions [j0, j0 + 16 * NC), i < NQ */
AVX512_INLINE void tile_values_chunk(const kern_kv_view *kv, int32_t n, const float *scores,
                                     const float *inv, float *const *out, int32_t j0,
                                     const int NQ, const int NC)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens;
    __m512 o[ROWS_TILE_Q][4];
#pragma GCC unroll 6
    for (int i = 0; i < NQ; i++)
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            o[i][c] = _mm512_setzero_ps();
    for (int32_t b = 0, t0 = 0; t0 < n; b++, t0 += bt) {
        const ekv_f16 *vb = kv->v_blocks[b] + j0;
        const int32_t rows = n - t0 < bt ? n - t0 : bt;
        const ekv_f16 *ahead = t0 + 4 * bt < n ? kv->v_blocks[b + 4] + j0 : NULL;
        /* A zero weight (masked, or exp underflow) skips its V row, as in
         * attention.c: 0 * v is not a no-op when v is inf. A block where no
         * query has one - all but the causal edge - runs without the test. */
        __mmask16 zero = 0;
        for (int32_t r0 = 0; r0 < rows; r0 += 16) {
            const __mmask16 live = rows - r0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (rows - r0)) - 1);
#pragma GCC unroll 6
            for (int i = 0; i < NQ; i++)
                zero |= _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, scores + (size_t)i * n + t0 + r0),
                                                _mm512_setzero_ps(), _CMP_EQ_OQ);
        }
        if (zero)
            values_rows(vb, ahead, d, rows, scores + t0, n, o, NQ, NC, 1);
        else
            values_rows(vb, ahead, d, rows, scores + t0, n, o, NQ, NC, 0);
    }
#pragma GCC unroll 6
    for (int i = 0; i < NQ; i++) {
        const __m512 vi = _mm512_set1_ps(inv[i]);
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(out[i] + j0 + 16 * c, _mm512_mul_ps(o[i][c], vi));
    }
}

#define VALUES_CASE(nq_, wide_)                                                            \
    case (nq_) * 2 + (wide_):                                                              \
        tile_values_chunk(kv, n, s, inv, out, j0, nq_, (wide_) ? 4 : 1);                    \
        break;

/* 64 dimensions per pass over the tokens where the head has them, then 16 */
AVX512_FN static void tile_values(const kern_kv_view *kv, int32_t n, const float *s, int nq,
                                  const float *inv, float *const *out)
{
    for (int32_t j0 = 0; j0 < kv->head_dim;) {
        const int wide = kv->head_dim - j0 >= 64;
        switch (nq * 2 + wide) { /* constant shapes keep the accumulators in registers */
            VALUES_CASE(1, 0) VALUES_CASE(1, 1) VALUES_CASE(2, 0) VALUES_CASE(2, 1)
            VALUES_CASE(3, 0) VALUES_CASE(3, 1) VALUES_CASE(4, 0) VALUES_CASE(4, 1)
            VALUES_CASE(5, 0) VALUES_CASE(5, 1) VALUES_CASE(6, 0)
        default: tile_values_chunk(kv, n, s, inv, out, j0, 6, 4); break;
        }
        j0 += wide ? 64 : 16;
    }
}

/* attention.c's exp256_neg, sixteen lanes: the same operations in the same
 * order on each lane, so each element gets the same bits. */
AVX512_INLINE __m512 exp512_neg(__m512 x)
{
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e =
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

/* kern_attn_softmax_avx2 with the exp sixteen lanes wide. Its sum keeps the
 * AVX2 order - eight lanes, token t in lane t mod 8, chunks of eight in
 * token order, then the same horizontal sum - so inv is bit-identical too
 * (the padded lanes of the last chunk add exact zeros, as the AVX2 tail's
 * do). */
AVX512_FN static void softmax_avx512(float *scores, int32_t n, int nq, const float *max, float *inv)
{
    for (int i = 0; i < nq; i++) {
        float *s = scores + (size_t)i * n;
        if (max[i] == -INFINITY) { /* nothing visible: a zero output */
            for (int32_t t = 0; t < n; t++)
                s[t] = 0.0f;
            inv[i] = 0.0f;
            continue;
        }
        const __m512 vmax = _mm512_set1_ps(max[i]), ninf = _mm512_set1_ps(-INFINITY);
        __m256 vsum = _mm256_setzero_ps();
        for (int32_t t = 0; t < n; t += 16) {
            const __mmask16 live = n - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t)) - 1);
            const __m512 p = exp512_neg(_mm512_sub_ps(_mm512_mask_loadu_ps(ninf, live, s + t), vmax));
            _mm512_mask_storeu_ps(s + t, live, p);
            vsum = _mm256_add_ps(vsum, _mm512_castps512_ps256(p));
            vsum = _mm256_add_ps(vsum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        const float sum = _mm_cvtss_f32(h);
        inv[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
}

/* Tokens [0, n) hold every token visible to a query at qpos or before:
 * drops the trailing run of tokens later than qpos (a causal chunk's own
 * later rows). Masked tokens inside the run stay, and stay masked. */
static int32_t visible_extent(const kern_kv_view *kv, int32_t qpos)
{
    const int32_t bt = kv->block_tokens;
    int32_t n = kv->n_tokens;
    while (n > 0 && kv->pos_blocks[(n - 1) / bt][(n - 1) % bt] > qpos)
        n--;
    return n;
}

AVX512_FN static void rows_avx512(const kern_kv_view *kv, const float *Q, int n_rows, int g,
                                  int row_stride, const int32_t *row_pos, float scale,
                                  float *out, int out_stride, float *scores)
{
    const int32_t d = kv->head_dim;
    const int n_q = n_rows * g;
    for (int q0 = 0; q0 < n_q; q0 += ROWS_TILE_Q) {
        const int nq = n_q - q0 < ROWS_TILE_Q ? n_q - q0 : ROWS_TILE_Q;
        const float *qp[ROWS_TILE_Q];
        float *op[ROWS_TILE_Q];
        int32_t qpos[ROWS_TILE_Q], last = INT32_MIN;
        for (int i = 0; i < nq; i++) { /* query q0 + i: row r, head h */
            const int r = (q0 + i) / g, h = (q0 + i) % g;
            qp[i] = Q + (size_t)r * row_stride + (size_t)h * d;
            op[i] = out + (size_t)r * out_stride + (size_t)h * d;
            qpos[i] = row_pos[r];
            last = qpos[i] > last ? qpos[i] : last;
        }
        const int32_t n = visible_extent(kv, last);
        float max[ROWS_TILE_Q], inv[ROWS_TILE_Q];
        tile_scores(kv, n, qp, qpos, nq, scale, scores, max);
        softmax_avx512(scores, n, nq, max, inv);
        tile_values(kv, n, scores, nq, inv, op);
    }
}
#endif

void kern_attention_rows(const kern_kv_view *kv, const float *Q, int n_rows, int g,
                         int row_stride, const int32_t *row_pos, float scale, float *out,
                         int out_stride, float *scores)
{
#if defined(__x86_64__)
    if (!kv->packed && kv->block_tokens % 16 == 0 && kv->head_dim % 16 == 0 &&
        kern_active_isa() >= KERN_ISA_AVX512) {
        rows_avx512(kv, Q, n_rows, g, row_stride, row_pos, scale, out, out_stride, scores);
        return;
    }
#endif
    rows_by_row(kv, Q, n_rows, g, row_stride, row_pos, scale, out, out_stride, scores);
}
