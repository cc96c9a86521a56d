/*
 * attention.c - scaled dot-product attention of query vectors over one KV
 * head's paged, possibly sparse, token list.
 *
 * The KV cache gives each (sequence, layer, KV head) its own block list, and
 * each kept token its original position; the causal mask therefore compares
 * positions (token visible iff pos <= query pos) instead of indices, so the
 * same kernel serves full, windowed and compressed heads.
 *
 * Batch invariance: a query's result depends only on the tokens it can see,
 * never on how many masked tokens follow them (a prefill chunk appends
 * future rows before attending) - every score goes through the same exp,
 * and masked scores contribute exact zeros - so chunked prefill, batched
 * decode and one-token decode give bit-identical outputs. K and V are fp16;
 * scores and accumulation are fp32. The scalar path is the reference; the
 * AVX2 and AVX-512 paths (F16C loads, a vectorised exp) must agree with it to
 * fp32 rounding.
 *
 * K is stored transposed within each block ([head_dim][block_tokens], see
 * kern_kv_view), so the SIMD paths score 16 tokens of a block at once with
 * one accumulator lane per token - broadcast q[j] times the widened K column
 * j - and never sum horizontally; the query heads of a GQA group share each
 * widened column. Each lane's summation order over j is fixed by the ISA
 * alone, never by the group size or by which neighbouring lanes are masked.
 * The group size is made a compile-time constant (a switch over g) so the
 * accumulators stay in registers. A head's blocks are scattered through the
 * pool, which defeats the hardware prefetchers at every block boundary at
 * long context, so the AVX-512 path prefetches K and V a few blocks ahead.
 *
 * Decode may split one view's attention across threads (the split phases at
 * the end): AVX2 and AVX-512 each have their own, matching their level's
 * kern_attention bit for bit.
 */
#include <math.h>
#include <stdbool.h>

#include "attention_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

static inline const ekv_f16 *row_of(const ekv_f16 *const *blocks, int32_t t, int32_t bt,
                                    int32_t d)
{
    return blocks[t / bt] + (size_t)(t % bt) * d;
}

/* K element j of token t: blocks are [head_dim][block_tokens] */
static inline float k_at(const kern_kv_view *kv, int32_t t, int32_t j)
{
    const int32_t bt = kv->block_tokens;
    return ekv_f16_to_f32(kv->k_blocks[t / bt][(size_t)j * bt + t % bt]);
}

static inline int32_t pos_of(const kern_kv_view *kv, int32_t t)
{
    return kv->pos_blocks[t / kv->block_tokens][t % kv->block_tokens];
}

static void attend_one_scalar(const kern_kv_view *kv, const float *q, int32_t qpos,
                              float scale, float *out, float *scores, const kern_attn_probe *pr)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens;
    float max = -INFINITY;
    for (int32_t t = 0; t < kv->n_tokens; t++) {
        if (pos_of(kv, t) > qpos) {
            scores[t] = -INFINITY;
            continue;
        }
        float s = 0.0f;
        for (int32_t j = 0; j < d; j++)
            s += q[j] * k_at(kv, t, j);
        scores[t] = s * scale;
        if (scores[t] > max)
            max = scores[t];
    }
    if (pr && pr->logits)
        for (int32_t t = 0; t < kv->n_tokens; t++)
            pr->logits[t] = scores[t];
    for (int32_t j = 0; j < d; j++)
        out[j] = 0.0f;
    if (max == -INFINITY) { /* nothing visible: defined as a zero output */
        if (pr && pr->probs)
            for (int32_t t = 0; t < kv->n_tokens; t++)
                pr->probs[t] = 0.0f;
        return;
    }
    double sum = 0.0;
    for (int32_t t = 0; t < kv->n_tokens; t++) {
        if (scores[t] == -INFINITY) {
            scores[t] = 0.0f;
            continue;
        }
        const float p = expf(scores[t] - max);
        scores[t] = p;
        sum += p;
        const ekv_f16 *v = row_of(kv->v_blocks, t, bt, d);
        for (int32_t j = 0; j < d; j++)
            out[j] += p * ekv_f16_to_f32(v[j]);
    }
    const float inv = (float)(1.0 / sum);
    for (int32_t j = 0; j < d; j++)
        out[j] *= inv;
    if (pr && pr->probs)
        for (int32_t t = 0; t < kv->n_tokens; t++)
            pr->probs[t] = scores[t] * inv;
}

#if defined(__x86_64__)
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

AVX2_TARGET static inline float hmax256(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Stores a tile's 16 scores, or its first `real` of them when it ends the
 * list (scores has no room past n). */
AVX2_TARGET static inline void store_tile_avx2(float *dst, __m256 s0, __m256 s1, int32_t real)
{
    if (real >= 16) {
        _mm256_storeu_ps(dst, s0);
        _mm256_storeu_ps(dst + 8, s1);
        return;
    }
    float tmp[16];
    _mm256_storeu_ps(tmp, s0);
    _mm256_storeu_ps(tmp + 8, s1);
    for (int32_t r = 0; r < real; r++)
        dst[r] = tmp[r];
}

/* Softmax numerators in place over n scores (masked = -inf -> 0); returns
 * their sum. The tail goes through the same vector exp, padded with -inf, so
 * a score's value never depends on how many scores follow it. */
AVX2_TARGET static float exp_scores_avx2(float *scores, int32_t n, float max)
{
    const __m256 vmax = _mm256_set1_ps(max);
    __m256 vsum = _mm256_setzero_ps();
    int32_t t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 p = exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vmax));
        _mm256_storeu_ps(scores + t, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    if (t < n) {
        float tail[8];
        for (int32_t i = 0; i < 8; i++)
            tail[i] = t + i < n ? scores[t + i] : -INFINITY;
        __m256 p = exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(tail), vmax));
        _mm256_storeu_ps(tail, p);
        vsum = _mm256_add_ps(vsum, p);
        for (int32_t i = 0; t + i < n; i++)
            scores[t + i] = tail[i];
    }
    return hsum256(vsum);
}

/*
 * g (1..GROUP_MAX) queries that share one position, over one KV head: each
 * K and V row is loaded and widened from fp16 once for all of them (the
 * query heads of a GQA group). Every query's arithmetic is the same whatever
 * g is, so grouping never changes results. scores: g * n_tokens floats.
 */
#define GROUP_MAX KERN_ATTN_GROUP_MAX
/* a0[i] / a1[i] = Q[i] . K for tokens 0-7 / 8-15 of the tile at kb, i < G.
 * Two partial sums per lane, even and odd j (d is even), added at the end:
 * twice the independent FMA chains of one sum, the same for every G. */
AVX2_INLINE void dots_avx2(const ekv_f16 *kb, int32_t bt, int32_t d, const float *Q, int q_stride,
                           const int G, __m256 *a0, __m256 *a1)
{
    __m256 b0[GROUP_MAX], b1[GROUP_MAX];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
        a0[i] = a1[i] = b0[i] = b1[i] = _mm256_setzero_ps();
    for (int32_t j = 0; j < d; j += 2) {
        const ekv_f16 *kj = kb + (size_t)j * bt;
        __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)kj));
        __m256 k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kj + 8)));
#pragma GCC unroll 4
        for (int i = 0; i < G; i++) {
            const __m256 qj = _mm256_broadcast_ss(Q + (size_t)i * q_stride + j);
            a0[i] = _mm256_fmadd_ps(qj, k0, a0[i]);
            a1[i] = _mm256_fmadd_ps(qj, k1, a1[i]);
        }
        k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kj + bt)));
        k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kj + bt + 8)));
#pragma GCC unroll 4
        for (int i = 0; i < G; i++) {
            const __m256 qj = _mm256_broadcast_ss(Q + (size_t)i * q_stride + j + 1);
            b0[i] = _mm256_fmadd_ps(qj, k0, b0[i]);
            b1[i] = _mm256_fmadd_ps(qj, k1, b1[i]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        a0[i] = _mm256_add_ps(a0[i], b0[i]);
        a1[i] = _mm256_add_ps(a1[i], b1[i]);
    }
}

/* Scores of the tiles starting in [t_begin, t_end) (multiples of 16); max[i]:
 * the largest of query i's among them (-inf if none visible). */
AVX2_TARGET static void scores_avx2(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                    int32_t qpos, float scale, float *scores, float *max,
                                    int32_t t_begin, int32_t t_end)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    const __m256 ninf = _mm256_set1_ps(-INFINITY), vscale = _mm256_set1_ps(scale);
    const __m256i vqpos = _mm256_set1_epi32(qpos);
    const __m256i lane_lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i lane_hi = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    __m256 vmax[GROUP_MAX] = {ninf, ninf, ninf, ninf};
    /* 16 tokens (one tile of a block) at a time, two ymm lanes-per-token each */
    for (int32_t t0 = t_begin; t0 < t_end; t0 += 16) {
        const ekv_f16 *kb = kv->k_blocks[t0 / bt] + t0 % bt;
        const int32_t *pb = kv->pos_blocks[t0 / bt] + t0 % bt;
        const __m256i left = _mm256_set1_epi32(n - t0);
        /* visible: a real token (lane < n - t0) whose position is <= qpos */
        const __m256i vis_lo = _mm256_andnot_si256(
            _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)pb), vqpos),
            _mm256_cmpgt_epi32(left, lane_lo));
        const __m256i vis_hi = _mm256_andnot_si256(
            _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(pb + 8)), vqpos),
            _mm256_cmpgt_epi32(left, lane_hi));
        if (_mm256_testz_si256(vis_lo, vis_lo) && _mm256_testz_si256(vis_hi, vis_hi)) {
            for (int i = 0; i < g; i++) /* whole tile masked: skip the dot products */
                store_tile_avx2(scores + (size_t)i * n + t0, ninf, ninf, n - t0);
            continue;
        }
        __m256 a0[GROUP_MAX], a1[GROUP_MAX];
        switch (g) { /* a constant group size keeps the accumulators in registers */
        case 1: dots_avx2(kb, bt, d, Q, q_stride, 1, a0, a1); break;
        case 2: dots_avx2(kb, bt, d, Q, q_stride, 2, a0, a1); break;
        case 3: dots_avx2(kb, bt, d, Q, q_stride, 3, a0, a1); break;
        default: dots_avx2(kb, bt, d, Q, q_stride, 4, a0, a1); break;
        }
        for (int i = 0; i < g; i++) {
            const __m256 s0 = _mm256_blendv_ps(ninf, _mm256_mul_ps(a0[i], vscale),
                                               _mm256_castsi256_ps(vis_lo));
            const __m256 s1 = _mm256_blendv_ps(ninf, _mm256_mul_ps(a1[i], vscale),
                                               _mm256_castsi256_ps(vis_hi));
            vmax[i] = _mm256_max_ps(vmax[i], _mm256_max_ps(s0, s1));
            store_tile_avx2(scores + (size_t)i * n + t0, s0, s1, n - t0);
        }
    }
    for (int i = 0; i < g; i++)
        max[i] = hmax256(vmax[i]);
}

/* Turns each query's scores into softmax numerators; inv[i] = 1 / their sum. */
AVX2_TARGET static void softmax_avx2(float *scores, int32_t n, int g, const float *max, float *inv)
{
    for (int i = 0; i < g; i++) {
        /* nothing visible: defined as a zero output (probabilities all 0) */
        const float sum = max[i] == -INFINITY ? 0.0f : exp_scores_avx2(scores + (size_t)i * n, n, max[i]);
        if (max[i] == -INFINITY)
            for (int32_t t = 0; t < n; t++)
                scores[(size_t)i * n + t] = 0.0f;
        inv[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
}

void kern_attn_softmax_avx2(float *scores, int32_t n, int g, const float *max, float *inv)
{
    softmax_avx2(scores, n, g, max, inv);
}

/* out_i = inv_i * sum_t p_it v_t over dimensions [j0, j0 + 8 * NC), i < G.
 * Each dimension's sum is one chain in token order whatever NC and G are. */
AVX2_INLINE void values_chunk_avx2(const kern_kv_view *kv, const float *scores, const float *inv,
                                   float *out, int out_stride, int32_t j0, const int G,
                                   const int NC)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    __m256 o[GROUP_MAX][4];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            o[i][c] = _mm256_setzero_ps();
    for (int32_t b = 0, t0 = 0; t0 < n; b++, t0 += bt) {
        const ekv_f16 *vb = kv->v_blocks[b] + j0;
        const int32_t rows = n - t0 < bt ? n - t0 : bt;
        for (int32_t r = 0; r < rows; r++) {
            const ekv_f16 *v = vb + (size_t)r * d;
            __m256 vc[4];
#pragma GCC unroll 4
            for (int c = 0; c < NC; c++)
                vc[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8 * c)));
#pragma GCC unroll 4
            for (int i = 0; i < G; i++) {
                const float p = scores[(size_t)i * n + t0 + r];
                if (p == 0.0f) /* masked: adding 0 * v would change nothing */
                    continue;
                const __m256 vp = _mm256_set1_ps(p);
#pragma GCC unroll 4
                for (int c = 0; c < NC; c++)
                    o[i][c] = _mm256_fmadd_ps(vp, vc[c], o[i][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        const __m256 vi = _mm256_set1_ps(inv[i]);
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            _mm256_storeu_ps(out + (size_t)i * out_stride + j0 + 8 * c, _mm256_mul_ps(o[i][c], vi));
    }
}

/* 8-dimension slices per pass over the tokens: as many as the group's
 * accumulators leave registers for (4 for g <= 2, 3 for g = 3, 2 for g = 4) */
static inline int values_nc(int g, int32_t left)
{
    const int most = g <= 2 ? 4 : g == 3 ? 3 : 2;
    return left / 8 < most ? (int)(left / 8) : most;
}

#define VALUES_CASES(CALL)                                                                   \
    CALL(1, 1) CALL(1, 2) CALL(1, 3) CALL(1, 4) CALL(2, 1) CALL(2, 2) CALL(2, 3) CALL(2, 4) \
    CALL(3, 1) CALL(3, 2) CALL(3, 3) CALL(4, 1)

AVX2_TARGET static void values_avx2(const kern_kv_view *kv, const float *s, int g,
                                    const float *inv, float *out, int os)
{
    for (int32_t j0 = 0; j0 < kv->head_dim;) {
        const int nc = values_nc(g, kv->head_dim - j0);
        switch (g * 8 + nc) { /* constant shapes keep the accumulators in registers */
#define VALUES_CASE(G, NC) \
    case (G) * 8 + (NC): values_chunk_avx2(kv, s, inv, out, os, j0, G, NC); break;
            VALUES_CASES(VALUES_CASE)
#undef VALUES_CASE
        default: values_chunk_avx2(kv, s, inv, out, os, j0, 4, 2); break;
        }
        j0 += 8 * nc;
    }
}

AVX2_TARGET static void attend_group_avx2(const kern_kv_view *kv, const float *Q, int g,
                                          int q_stride, int32_t qpos, float scale, float *out,
                                          int out_stride, float *scores,
                                          const kern_attn_probe *pr, int q0)
{
    float max[GROUP_MAX], inv[GROUP_MAX];
    scores_avx2(kv, Q, g, q_stride, qpos, scale, scores, max, 0, kv->n_tokens);
    probe_logits(pr, scores, kv->n_tokens, g, q0);
    softmax_avx2(scores, kv->n_tokens, g, max, inv);
    values_avx2(kv, scores, g, inv, out, out_stride);
    probe_probs(pr, scores, kv->n_tokens, g, q0, inv);
}

/*
 * The AVX2 split path's phases, as the AVX-512 ones below: each part
 * computes exactly what attend_group_avx2 does for its share (scores and
 * exps per token, the max exact in any order, each output dimension's sum one
 * chain in token order, and the numerators' sum in exp_scores_avx2's order).
 */

/* softmax numerators of the 16-token units starting in [t_begin, t_end) */
AVX2_TARGET static void split_exp_avx2(float *scores, int32_t n, int g, const float *max,
                                       int32_t t_begin, int32_t t_end)
{
    const int32_t hi = t_end < n ? t_end : n;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int i = 0; i < g; i++) {
        float *s = scores + (size_t)i * n;
        if (max[i] == -INFINITY) { /* nothing visible: zeros, as softmax_avx2 */
            for (int32_t t = t_begin; t < hi; t++)
                s[t] = 0.0f;
            continue;
        }
        const __m256 vmax = _mm256_set1_ps(max[i]);
        for (int32_t t = t_begin; t < hi; t += 8) { /* the tail padded with -inf, as there */
            const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(hi - t), lane);
            const __m256 x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(s + t, m),
                                              _mm256_castsi256_ps(m));
            _mm256_maskstore_ps(s + t, m, exp256_neg(_mm256_sub_ps(x, vmax)));
        }
    }
}

/* values_chunk_avx2 over the numerators, also summing them as
 * exp_scores_avx2 does (8-lane vectors in token order, the tail's missing
 * lanes 0, then hsum256): inv = 1 / sum comes out bit-identical. */
AVX2_INLINE void values_sum_chunk_avx2(const kern_kv_view *kv, const float *scores, float *out,
                                       int out_stride, int32_t j0, const int G, const int NC)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 o[GROUP_MAX][4], vsum[GROUP_MAX];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        vsum[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            o[i][c] = _mm256_setzero_ps();
    }
    for (int32_t b = 0, t0 = 0; t0 < n; b++, t0 += bt) {
        const ekv_f16 *vb = kv->v_blocks[b] + j0;
        const int32_t rows = n - t0 < bt ? n - t0 : bt;
        for (int32_t r = 0; r < rows; r++) {
            const ekv_f16 *v = vb + (size_t)r * d;
            if (r % 8 == 0) {
                const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows - r), lane);
#pragma GCC unroll 4
                for (int i = 0; i < G; i++)
                    vsum[i] = _mm256_add_ps(vsum[i], _mm256_maskload_ps(scores + (size_t)i * n + t0 + r, m));
            }
            __m256 vc[4];
#pragma GCC unroll 4
            for (int c = 0; c < NC; c++)
                vc[c] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8 * c)));
#pragma GCC unroll 4
            for (int i = 0; i < G; i++) {
                const float p = scores[(size_t)i * n + t0 + r];
                if (p == 0.0f) /* masked: adding 0 * v would change nothing */
                    continue;
                const __m256 vp = _mm256_set1_ps(p);
#pragma GCC unroll 4
                for (int c = 0; c < NC; c++)
                    o[i][c] = _mm256_fmadd_ps(vp, vc[c], o[i][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        const float sum = hsum256(vsum[i]);
        const __m256 vi = _mm256_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            _mm256_storeu_ps(out + (size_t)i * out_stride + j0 + 8 * c, _mm256_mul_ps(o[i][c], vi));
    }
}

/* output dimensions [j_begin, j_end) (multiples of 16), values_nc slices per pass */
AVX2_TARGET static void split_values_avx2(const kern_kv_view *kv, const float *s, int g,
                                          float *out, int os, int32_t j_begin, int32_t j_end)
{
    for (int32_t j0 = j_begin; j0 < j_end;) {
        const int nc = values_nc(g, j_end - j0);
        switch (g * 8 + nc) { /* constant shapes keep the accumulators in registers */
#define VALUES_CASE(G, NC) \
    case (G) * 8 + (NC): values_sum_chunk_avx2(kv, s, out, os, j0, G, NC); break;
            VALUES_CASES(VALUES_CASE)
#undef VALUES_CASE
        default: values_sum_chunk_avx2(kv, s, out, os, j0, 4, 2); break;
        }
        j0 += 8 * nc;
    }
}

#endif

bool kern_attention_split_ok(const kern_kv_view *kv, int g)
{
#if defined(__x86_64__)
    return !kv->packed && g >= 1 && g <= GROUP_MAX && kv->block_tokens % 16 == 0 &&
           kv->head_dim % 16 == 0 && kern_active_isa() >= KERN_ISA_AVX2;
#else
    (void)kv;
    (void)g;
    return false;
#endif
}

/* part's share of [0, units) in units of `unit` elements, capped at n */
static void split_share(int32_t n, int32_t unit, int part, int n_parts, int32_t *lo, int32_t *hi)
{
    long a, b;
    ekv_split_range((n + unit - 1) / unit, part, n_parts, &a, &b);
    *lo = (int32_t)a * unit;
    *hi = (int32_t)b * unit < n ? (int32_t)b * unit : n;
}

void kern_attention_split_scores(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                 int32_t qpos, float scale, float *scores, int part, int n_parts,
                                 float *part_max)
{
    int32_t lo, hi;
    split_share(kv->n_tokens, 16, part, n_parts, &lo, &hi);
#if defined(__x86_64__)
    if (kern_active_isa() >= KERN_ISA_AVX512)
        kern_attn_scores_avx512(kv, Q, g, q_stride, qpos, scale, scores, part_max, lo, hi);
    else
        scores_avx2(kv, Q, g, q_stride, qpos, scale, scores, part_max, lo, hi);
#else
    (void)Q, (void)q_stride, (void)qpos, (void)scale, (void)scores, (void)part_max;
#endif
}

void kern_attention_split_exp(const kern_kv_view *kv, float *scores, int g, const float *max,
                              int part, int n_parts)
{
    int32_t lo, hi;
    split_share(kv->n_tokens, 16, part, n_parts, &lo, &hi);
#if defined(__x86_64__)
    if (kern_active_isa() >= KERN_ISA_AVX512)
        kern_attn_split_exp_avx512(scores, kv->n_tokens, g, max, lo, hi);
    else
        split_exp_avx2(scores, kv->n_tokens, g, max, lo, hi);
#else
    (void)scores, (void)g, (void)max;
#endif
}

void kern_attention_split_values(const kern_kv_view *kv, const float *scores, int g, float *out,
                                 int out_stride, int part, int n_parts)
{
    int32_t lo, hi;
    split_share(kv->head_dim, 16, part, n_parts, &lo, &hi);
#if defined(__x86_64__)
    if (kern_active_isa() >= KERN_ISA_AVX512)
        kern_attn_split_values_avx512(kv, scores, g, out, out_stride, lo, hi);
    else
        split_values_avx2(kv, scores, g, out, out_stride, lo, hi);
#else
    (void)scores, (void)g, (void)out, (void)out_stride;
#endif
}

void kern_attention(const kern_kv_view *kv, const float *Q, int n_q, int q_stride,
                    const int32_t *q_pos, float scale, float *out, int out_stride, float *scores)
{
    kern_attention_probe(kv, Q, n_q, q_stride, q_pos, scale, out, out_stride, scores, NULL);
}

void kern_attention_probe(const kern_kv_view *kv, const float *Q, int n_q, int q_stride,
                          const int32_t *q_pos, float scale, float *out, int out_stride,
                          float *scores, const kern_attn_probe *pr)
{
    for (int i = 0; i < n_q;) {
        const float *q = Q + (size_t)i * q_stride;
        float *o = out + (size_t)i * out_stride;
        if (kv->packed) { /* SparK's packed keys: the path that rebuilds them */
            int g = 1;
            while (g < KERN_ATTN_GROUP_MAX && i + g < n_q && q_pos[i + g] == q_pos[i])
                g++;
            kern_attend_packed(kv, q, g, q_stride, q_pos[i], scale, o, out_stride, scores, pr, i);
            i += g;
            continue;
        }
#if defined(__x86_64__)
        /* the SIMD paths take whole 16-token tiles of a block */
        const kern_isa isa = kv->block_tokens % 16 == 0 ? kern_active_isa() : KERN_ISA_SCALAR;
        const int32_t d = kv->head_dim;
        if ((isa >= KERN_ISA_AVX512 && d % 16 == 0) || (isa >= KERN_ISA_AVX2 && d % 8 == 0)) {
            int g = 1; /* consecutive queries at one position go together */
            while (g < GROUP_MAX && i + g < n_q && q_pos[i + g] == q_pos[i])
                g++;
            if (isa >= KERN_ISA_AVX512 && d % 16 == 0)
                kern_attend_group_avx512(kv, q, g, q_stride, q_pos[i], scale, o, out_stride, scores,
                                         pr, i);
            else
                attend_group_avx2(kv, q, g, q_stride, q_pos[i], scale, o, out_stride, scores, pr,
                                  i);
            i += g;
            continue;
        }
#endif
        kern_attn_probe one, *p1 = NULL;
        if (pr) { /* this query's rows of the probe */
            one.logits = pr->logits ? pr->logits + (size_t)i * kv->n_tokens : NULL;
            one.probs = pr->probs ? pr->probs + (size_t)i * kv->n_tokens : NULL;
            p1 = &one;
        }
        attend_one_scalar(kv, q, q_pos[i], scale, o, scores, p1);
        i++;
    }
}
