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
 * AVX2 path (F16C loads, a vectorised exp) must agree with it to fp32
 * rounding.
 */
#include <math.h>

#include "entrokv/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

static inline const ekv_f16 *row_of(const ekv_f16 *const *blocks, int32_t t, int32_t bt,
                                    int32_t d)
{
    return blocks[t / bt] + (size_t)(t % bt) * d;
}

static inline int32_t pos_of(const kern_kv_view *kv, int32_t t)
{
    return kv->pos_blocks[t / kv->block_tokens][t % kv->block_tokens];
}

static void attend_one_scalar(const kern_kv_view *kv, const float *q, int32_t qpos,
                              float scale, float *out, float *scores)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens;
    float max = -INFINITY;
    for (int32_t t = 0; t < kv->n_tokens; t++) {
        if (pos_of(kv, t) > qpos) {
            scores[t] = -INFINITY;
            continue;
        }
        const ekv_f16 *k = row_of(kv->k_blocks, t, bt, d);
        float s = 0.0f;
        for (int32_t j = 0; j < d; j++)
            s += q[j] * ekv_f16_to_f32(k[j]);
        scores[t] = s * scale;
        if (scores[t] > max)
            max = scores[t];
    }
    for (int32_t j = 0; j < d; j++)
        out[j] = 0.0f;
    if (max == -INFINITY) /* nothing visible: defined as a zero output */
        return;
    double sum = 0.0;
    for (int32_t t = 0; t < kv->n_tokens; t++) {
        if (scores[t] == -INFINITY)
            continue;
        const float p = expf(scores[t] - max);
        sum += p;
        const ekv_f16 *v = row_of(kv->v_blocks, t, bt, d);
        for (int32_t j = 0; j < d; j++)
            out[j] += p * ekv_f16_to_f32(v[j]);
    }
    const float inv = (float)(1.0 / sum);
    for (int32_t j = 0; j < d; j++)
        out[j] *= inv;
}

#if defined(__x86_64__)
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

/* exp(x) for x <= 0 (softmax arguments): 2^n * p(r), r = x - n ln2, with a
 * degree-6 polynomial on [-ln2/2, ln2/2]; relative error ~2e-7. Inputs below
 * -87 flush to 0, as expf does. */
AVX2_TARGET static inline __m256 exp256_neg(__m256 x)
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

AVX2_TARGET static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_TARGET static void attend_one_avx2(const kern_kv_view *kv, const float *q, int32_t qpos,
                                        float scale, float *out, float *scores)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    float max = -INFINITY;
    for (int32_t t = 0; t < n; t++) {
        if (pos_of(kv, t) > qpos) {
            scores[t] = -INFINITY;
            continue;
        }
        const ekv_f16 *k = row_of(kv->k_blocks, t, bt, d);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int32_t j = 0;
        for (; j + 16 <= d; j += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j),
                                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j))), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8),
                                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j + 8))), acc1);
        }
        for (; j < d; j += 8)
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j),
                                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j))), acc0);
        const float s = hsum256(_mm256_add_ps(acc0, acc1)) * scale;
        scores[t] = s;
        if (s > max)
            max = s;
    }
    for (int32_t j = 0; j < d; j++)
        out[j] = 0.0f;
    if (max == -INFINITY)
        return;
    /* exp in place, 8 at a time; masked scores (-inf) become 0 */
    const __m256 vmax = _mm256_set1_ps(max);
    __m256 vsum = _mm256_setzero_ps();
    int32_t t = 0;
    for (; t + 8 <= n; t += 8) {
        __m256 p = exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vmax));
        _mm256_storeu_ps(scores + t, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    if (t < n) { /* the tail through the same vector exp, padded with -inf */
        float tail[8];
        for (int32_t i = 0; i < 8; i++)
            tail[i] = t + i < n ? scores[t + i] : -INFINITY;
        __m256 p = exp256_neg(_mm256_sub_ps(_mm256_loadu_ps(tail), vmax));
        _mm256_storeu_ps(tail, p);
        vsum = _mm256_add_ps(vsum, p);
        for (int32_t i = 0; t + i < n; i++)
            scores[t + i] = tail[i];
    }
    const float sum = hsum256(vsum);
    /* out = sum_t p_t v_t, head_dim <= 256 kept in registers 64 at a time */
    for (int32_t j0 = 0; j0 < d; j0 += 32) {
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
        __m256 o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
        const int32_t w = d - j0 >= 32 ? 32 : d - j0; /* 8, 16, 24 or 32 */
        for (t = 0; t < n; t++) {
            if (scores[t] == 0.0f)
                continue;
            const __m256 p = _mm256_set1_ps(scores[t]);
            const ekv_f16 *v = row_of(kv->v_blocks, t, bt, d) + j0;
            o0 = _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v)), o0);
            if (w > 8)
                o1 = _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8))), o1);
            if (w > 16)
                o2 = _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 16))), o2);
            if (w > 24)
                o3 = _mm256_fmadd_ps(p, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 24))), o3);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        _mm256_storeu_ps(out + j0, _mm256_mul_ps(o0, inv));
        if (w > 8)
            _mm256_storeu_ps(out + j0 + 8, _mm256_mul_ps(o1, inv));
        if (w > 16)
            _mm256_storeu_ps(out + j0 + 16, _mm256_mul_ps(o2, inv));
        if (w > 24)
            _mm256_storeu_ps(out + j0 + 24, _mm256_mul_ps(o3, inv));
    }
}
#endif

void kern_attention(const kern_kv_view *kv, const float *Q, int n_q, int q_stride,
                    const int32_t *q_pos, float scale, float *out, int out_stride, float *scores)
{
    for (int i = 0; i < n_q; i++) {
        const float *q = Q + (size_t)i * q_stride;
        float *o = out + (size_t)i * out_stride;
#if defined(__x86_64__)
        if (kern_active_isa() >= KERN_ISA_AVX2 && kv->head_dim % 8 == 0) {
            attend_one_avx2(kv, q, q_pos[i], scale, o, scores);
            continue;
        }
#endif
        attend_one_scalar(kv, q, q_pos[i], scale, o, scores);
    }
}
