/*
 * attention_internal.h - shared by kernels/cpu/attention.c, attention_avx512.c
 * and attention_packed.c (not a public header).
 */
#ifndef ENTROKV_ATTENTION_INTERNAL_H
#define ENTROKV_ATTENTION_INTERNAL_H

#include <stdbool.h>

#include "entrokv/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* The largest head_dim a view with packed keys may have. */
#define KERN_PACKED_MAX_DIM 512

/* g (<= KERN_ATTN_GROUP_MAX) queries at one position over a view with
 * packed tokens (kv->packed != NULL); pr: the probe or NULL, these queries'
 * rows start at q0. scores: g * kv->n_tokens floats. A query's result does
 * not depend on g. */
void kern_attend_packed(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                        int32_t qpos, float scale, float *out, int out_stride, float *scores,
                        const kern_attn_probe *pr, int q0);

/* The probe's copies for g queries whose scores (g x n, row i at i * n)
 * hold the scaled logits (before softmax) or the softmax numerators (after,
 * with inv[i] = 1 / their sum): query i's rows go to row q0 + i. */
static inline void probe_logits(const kern_attn_probe *pr, const float *scores, int32_t n, int g,
                                int q0)
{
    if (pr && pr->logits)
        for (int i = 0; i < g; i++)
            for (int32_t t = 0; t < n; t++)
                pr->logits[(size_t)(q0 + i) * n + t] = scores[(size_t)i * n + t];
}

static inline void probe_probs(const kern_attn_probe *pr, const float *scores, int32_t n, int g,
                               int q0, const float *inv)
{
    if (pr && pr->probs)
        for (int i = 0; i < g; i++)
            for (int32_t t = 0; t < n; t++)
                pr->probs[(size_t)(q0 + i) * n + t] = scores[(size_t)i * n + t] * inv[i];
}

#if defined(__x86_64__)
#define KERN_ATTN_AVX2 __attribute__((target("avx2,fma,f16c")))

/* exp(x) for x <= 0 (softmax arguments): 2^n * p(r), r = x - n ln2, with a
 * degree-6 polynomial on [-ln2/2, ln2/2]; relative error ~2e-7. Inputs below
 * -87 flush to 0, as expf does. */
KERN_ATTN_AVX2 static inline __m256 exp256_neg(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, res);
}

KERN_ATTN_AVX2 static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The AVX-512 level (attention_avx512.c): kern_attention's group of g
 * queries, and the split path's three phases over tokens [t_begin, t_end)
 * or output dimensions [j_begin, j_end) (multiples of 16). */
void kern_attend_group_avx512(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                              int32_t qpos, float scale, float *out, int out_stride, float *scores,
                              const kern_attn_probe *pr, int q0);
void kern_attn_scores_avx512(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                             int32_t qpos, float scale, float *scores, float *max, int32_t t_begin,
                             int32_t t_end);
void kern_attn_split_exp_avx512(float *scores, int32_t n, int g, const float *max, int32_t t_begin,
                                int32_t t_end);
void kern_attn_split_values_avx512(const kern_kv_view *kv, const float *s, int g, float *out,
                                   int os, int32_t j_begin, int32_t j_end);
#endif

#if defined(__x86_64__)
/* kern_attend_packed on AVX2 (with BMI2) or AVX-512, as kern_active_isa()
 * allows (attention_packed_simd.c); false: this ISA or head_dim has no SIMD
 * path and nothing was written. */
bool kern_attend_packed_simd(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                             int32_t qpos, float scale, float *out, int out_stride,
                             float *scores, const kern_attn_probe *pr, int q0);
/* attention.c's AVX2 softmax: each of g score rows (n apart) becomes its
 * softmax numerators (row i's max: max[i]); inv[i] = 1 / their sum. */
void kern_attn_softmax_avx2(float *scores, int32_t n, int g, const float *max, float *inv);
#endif

#endif
