/*
 * attention_avx512.c - kern_attention's AVX-512 level (attention.c says what
 * every level computes and what they must agree on): the group kernel and
 * the split decode path's three phases, bit-identical to each other.
 */
#include <math.h>

#include "attention_internal.h"

#if defined(__x86_64__)

#define GROUP_MAX KERN_ATTN_GROUP_MAX

/*
 * AVX-512: a block tile of 16 tokens is one zmm per query. The dot products
 * run over j in four interleaved partial sums (j mod 4), added at the end in
 * a fixed order, so the FMA chains overlap even for one query; the V pass
 * keeps 64 output dimensions of all g queries in registers.
 */
#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
#define AVX512_FN __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((always_inline, target(AVX512_TARGET)))

/* dot[i] = Q[i] . K for the 16 tokens of the tile at kb, i < G */
AVX512_INLINE void dots_avx512(const ekv_f16 *kb, int32_t bt, int32_t d, const float *Q,
                               int q_stride, const int G, __m512 *dot, const ekv_f16 *ahead)
{
    __m512 a[GROUP_MAX][4];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
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
#pragma GCC unroll 4
            for (int i = 0; i < G; i++)
                a[i][u] = _mm512_fmadd_ps(_mm512_set1_ps(Q[(size_t)i * q_stride + j + u]), kj,
                                          a[i][u]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
        dot[i] = _mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3]));
}

/* Scores of the tiles starting in [t_begin, t_end) (multiples of 16); max[i]:
 * the largest of query i's among them (-inf if none visible). */
AVX512_FN void kern_attn_scores_avx512(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                    int32_t qpos, float scale, float *scores, float *max,
                                    int32_t t_begin, int32_t t_end)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    const __m512 ninf = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
    const __m512i vqpos = _mm512_set1_epi32(qpos);
    __m512 vmax[GROUP_MAX] = {ninf, ninf, ninf, ninf};
    for (int32_t t0 = t_begin; t0 < t_end; t0 += 16) {
        const ekv_f16 *kb = kv->k_blocks[t0 / bt] + t0 % bt;
        const int32_t *pb = kv->pos_blocks[t0 / bt] + t0 % bt;
        /* real tokens of the tile, then those visible to qpos */
        const __mmask16 real = n - t0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - t0)) - 1);
        const __mmask16 vis = _mm512_mask_cmple_epi32_mask(real, _mm512_maskz_loadu_epi32(real, pb), vqpos);
        if (!vis) { /* whole tile masked: skip the dot products */
            for (int i = 0; i < g; i++)
                _mm512_mask_storeu_ps(scores + (size_t)i * n + t0, real, ninf);
            continue;
        }
        /* the tile 32 tokens on, when this head has one (bt == 16: two blocks on) */
        const ekv_f16 *ahead = t0 + 64 < t_end ? kv->k_blocks[(t0 + 64) / bt] + (t0 + 64) % bt : NULL;
        __m512 dot[GROUP_MAX];
        switch (g) { /* a constant group size keeps the accumulators in registers */
        case 1: dots_avx512(kb, bt, d, Q, q_stride, 1, dot, ahead); break;
        case 2: dots_avx512(kb, bt, d, Q, q_stride, 2, dot, ahead); break;
        case 3: dots_avx512(kb, bt, d, Q, q_stride, 3, dot, ahead); break;
        default: dots_avx512(kb, bt, d, Q, q_stride, 4, dot, ahead); break;
        }
        for (int i = 0; i < g; i++) {
            const __m512 s = _mm512_mask_blend_ps(vis, ninf, _mm512_mul_ps(dot[i], vscale));
            vmax[i] = _mm512_max_ps(vmax[i], s);
            _mm512_mask_storeu_ps(scores + (size_t)i * n + t0, real, s);
        }
    }
    for (int i = 0; i < g; i++)
        max[i] = _mm512_reduce_max_ps(vmax[i]);
}

/* out_i = inv_i * sum_t p_it v_t over dimensions [j0, j0 + 16 * NC), i < G */
AVX512_INLINE void values_chunk_avx512(const kern_kv_view *kv, const float *scores,
                                       const float *inv, float *out, int out_stride, int32_t j0,
                                       const int G, const int NC)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    __m512 o[GROUP_MAX][4];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            o[i][c] = _mm512_setzero_ps();
    for (int32_t b = 0, t0 = 0; t0 < n; b++, t0 += bt) {
        const ekv_f16 *vb = kv->v_blocks[b] + j0;
        const int32_t rows = n - t0 < bt ? n - t0 : bt;
        const ekv_f16 *ahead = t0 + 4 * bt < n ? kv->v_blocks[b + 4] + j0 : NULL;
        for (int32_t r = 0; r < rows; r++) {
            const ekv_f16 *v = vb + (size_t)r * d;
            if (ahead) { /* this row's slice two blocks on */
                _mm_prefetch((const char *)(ahead + (size_t)r * d), _MM_HINT_T0);
                if (NC == 4)
                    _mm_prefetch((const char *)(ahead + (size_t)r * d + 32), _MM_HINT_T0);
            }
            __m512 vc[4];
#pragma GCC unroll 4
            for (int c = 0; c < NC; c++)
                vc[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16 * c)));
#pragma GCC unroll 4
            for (int i = 0; i < G; i++) {
                const float p = scores[(size_t)i * n + t0 + r];
                if (p == 0.0f) /* masked: adding 0 * v would change nothing */
                    continue;
                const __m512 vp = _mm512_set1_ps(p);
#pragma GCC unroll 4
                for (int c = 0; c < NC; c++)
                    o[i][c] = _mm512_fmadd_ps(vp, vc[c], o[i][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        const __m512 vi = _mm512_set1_ps(inv[i]);
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(out + (size_t)i * out_stride + j0 + 16 * c, _mm512_mul_ps(o[i][c], vi));
    }
}

/* 64 dimensions per pass over the tokens where the head has them, then 16 */
AVX512_FN static void values_avx512(const kern_kv_view *kv, const float *s, int g,
                                    const float *inv, float *out, int os)
{
    for (int32_t j0 = 0; j0 < kv->head_dim;) {
        const int wide = kv->head_dim - j0 >= 64;
        switch (g * 2 + wide) { /* constant shapes keep the accumulators in registers */
        case 2: values_chunk_avx512(kv, s, inv, out, os, j0, 1, 1); break;
        case 3: values_chunk_avx512(kv, s, inv, out, os, j0, 1, 4); break;
        case 4: values_chunk_avx512(kv, s, inv, out, os, j0, 2, 1); break;
        case 5: values_chunk_avx512(kv, s, inv, out, os, j0, 2, 4); break;
        case 6: values_chunk_avx512(kv, s, inv, out, os, j0, 3, 1); break;
        case 7: values_chunk_avx512(kv, s, inv, out, os, j0, 3, 4); break;
        case 8: values_chunk_avx512(kv, s, inv, out, os, j0, 4, 1); break;
        default: values_chunk_avx512(kv, s, inv, out, os, j0, 4, 4); break;
        }
        j0 += wide ? 64 : 16;
    }
}

AVX512_FN void kern_attend_group_avx512(const kern_kv_view *kv, const float *Q, int g,
                                          int q_stride, int32_t qpos, float scale, float *out,
                                          int out_stride, float *scores,
                                          const kern_attn_probe *pr, int q0)
{
    float max[GROUP_MAX], inv[GROUP_MAX];
    kern_attn_scores_avx512(kv, Q, g, q_stride, qpos, scale, scores, max, 0, kv->n_tokens);
    probe_logits(pr, scores, kv->n_tokens, g, q0);
    kern_attn_softmax_avx2(scores, kv->n_tokens, g, max, inv);
    values_avx512(kv, scores, g, inv, out, out_stride);
    probe_probs(pr, scores, kv->n_tokens, g, q0, inv);
}

/*
 * The split path's phases (kern_attention_split_*). Scores and exps are per
 * token, the max is exact whatever the order, and each output dimension's
 * sum over tokens stays one chain in token order, so every part computes
 * exactly what attend_group_avx512 does for its share.
 */

/* softmax numerators of the 16-token units starting in [t_begin, t_end) */
AVX512_FN void kern_attn_split_exp_avx512(float *scores, int32_t n, int g, const float *max,
                                       int32_t t_begin, int32_t t_end)
{
    const int32_t hi = t_end < n ? t_end : n;
    for (int i = 0; i < g; i++) {
        float *s = scores + (size_t)i * n;
        if (max[i] == -INFINITY) { /* nothing visible: zeros, as softmax_avx2 */
            for (int32_t t = t_begin; t < hi; t++)
                s[t] = 0.0f;
            continue;
        }
        const __m256 vmax = _mm256_set1_ps(max[i]);
        for (int32_t t = t_begin; t < hi; t += 8) { /* the tail padded with -inf, as there */
            const __mmask8 m = hi - t >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (hi - t)) - 1);
            const __m256 x = _mm256_mask_loadu_ps(_mm256_set1_ps(-INFINITY), m, s + t);
            _mm256_mask_storeu_ps(s + t, m, exp256_neg(_mm256_sub_ps(x, vmax)));
        }
    }
}

/* values_chunk_avx512 over the numerators, also summing them as
 * exp_scores_avx2 does (8-lane vectors in token order, the tail's missing
 * lanes 0, then hsum256): inv = 1 / sum comes out bit-identical. */
AVX512_INLINE void values_sum_chunk_avx512(const kern_kv_view *kv, const float *scores,
                                           float *out, int out_stride, int32_t j0, const int G,
                                           const int NC)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    __m512 o[GROUP_MAX][4];
    __m256 vsum[GROUP_MAX];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        vsum[i] = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            o[i][c] = _mm512_setzero_ps();
    }
    for (int32_t b = 0, t0 = 0; t0 < n; b++, t0 += bt) {
        const ekv_f16 *vb = kv->v_blocks[b] + j0;
        const int32_t rows = n - t0 < bt ? n - t0 : bt;
        const ekv_f16 *ahead = t0 + 4 * bt < n ? kv->v_blocks[b + 4] + j0 : NULL;
        for (int32_t r = 0; r < rows; r++) {
            const ekv_f16 *v = vb + (size_t)r * d;
            if (ahead) /* this row's slice four blocks on */
#pragma GCC unroll 4
                for (int c = 0; c < NC; c += 2)
                    _mm_prefetch((const char *)(ahead + (size_t)r * d + 16 * c), _MM_HINT_T0);
            if (r % 8 == 0) {
                const int32_t left = rows - r;
                const __mmask8 m = left >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << left) - 1);
#pragma GCC unroll 4
                for (int i = 0; i < G; i++)
                    vsum[i] = _mm256_add_ps(
                        vsum[i], _mm256_maskz_loadu_ps(m, scores + (size_t)i * n + t0 + r));
            }
            __m512 vc[4];
#pragma GCC unroll 4
            for (int c = 0; c < NC; c++)
                vc[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16 * c)));
#pragma GCC unroll 4
            for (int i = 0; i < G; i++) {
                const float p = scores[(size_t)i * n + t0 + r];
                if (p == 0.0f) /* masked: adding 0 * v would change nothing */
                    continue;
                const __m512 vp = _mm512_set1_ps(p);
#pragma GCC unroll 4
                for (int c = 0; c < NC; c++)
                    o[i][c] = _mm512_fmadd_ps(vp, vc[c], o[i][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++) {
        const float sum = hsum256(vsum[i]);
        const __m512 vi = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : 0.0f);
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(out + (size_t)i * out_stride + j0 + 16 * c, _mm512_mul_ps(o[i][c], vi));
    }
}

/* output dimensions [j_begin, j_end) (multiples of 16), 64 per pass */
AVX512_FN void kern_attn_split_values_avx512(const kern_kv_view *kv, const float *s, int g,
                                          float *out, int os, int32_t j_begin, int32_t j_end)
{
    for (int32_t j0 = j_begin; j0 < j_end;) {
        const int nc = (j_end - j0) / 16 >= 4 ? 4 : (j_end - j0) / 16;
        switch (g * 4 + nc - 1) { /* constant shapes keep the accumulators in registers */
#define SPLIT_CASE(G, NC) \
    case (G) * 4 + (NC) - 1: values_sum_chunk_avx512(kv, s, out, os, j0, G, NC); break;
            SPLIT_CASE(1, 1) SPLIT_CASE(1, 2) SPLIT_CASE(1, 3) SPLIT_CASE(1, 4)
            SPLIT_CASE(2, 1) SPLIT_CASE(2, 2) SPLIT_CASE(2, 3) SPLIT_CASE(2, 4)
            SPLIT_CASE(3, 1) SPLIT_CASE(3, 2) SPLIT_CASE(3, 3) SPLIT_CASE(3, 4)
            SPLIT_CASE(4, 1) SPLIT_CASE(4, 2) SPLIT_CASE(4, 3)
            default: values_sum_chunk_avx512(kv, s, out, os, j0, 4, 4); break;
#undef SPLIT_CASE
        }
        j0 += 16 * nc;
    }
}
#endif /* __x86_64__ */
