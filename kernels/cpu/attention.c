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
#include <stdbool.h>

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
AVX2_TARGET static void attend_group_avx2(const kern_kv_view *kv, const float *Q, int g,
                                          int q_stride, int32_t qpos, float scale, float *out,
                                          int out_stride, float *scores)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    float max[GROUP_MAX] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int32_t b = 0, t = 0; t < n; b++) {
        const ekv_f16 *kb = kv->k_blocks[b];
        const int32_t *pb = kv->pos_blocks[b];
        for (int32_t r = 0; r < bt && t < n; r++, t++) {
            if (pb[r] > qpos) {
                for (int i = 0; i < g; i++)
                    scores[(size_t)i * n + t] = -INFINITY;
                continue;
            }
            const ekv_f16 *k = kb + (size_t)r * d;
            __m256 acc[GROUP_MAX] = {_mm256_setzero_ps(), _mm256_setzero_ps(),
                                     _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int32_t j = 0; j < d; j += 8) {
                const __m256 kj = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j)));
                for (int i = 0; i < g; i++)
                    acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(Q + (size_t)i * q_stride + j), kj,
                                             acc[i]);
            }
            for (int i = 0; i < g; i++) {
                const float sc = hsum256(acc[i]) * scale;
                scores[(size_t)i * n + t] = sc;
                if (sc > max[i])
                    max[i] = sc;
            }
        }
    }
    float inv[GROUP_MAX];
    for (int i = 0; i < g; i++) {
        /* nothing visible: defined as a zero output (probabilities all 0) */
        const float sum = max[i] == -INFINITY ? 0.0f : exp_scores_avx2(scores + (size_t)i * n, n, max[i]);
        if (max[i] == -INFINITY)
            for (int32_t t = 0; t < n; t++)
                scores[(size_t)i * n + t] = 0.0f;
        inv[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
    /* out_i = sum_t p_it v_t, 16 dimensions at a time for all g queries */
    for (int32_t j0 = 0; j0 < d; j0 += 16) {
        const bool two = d - j0 >= 16;
        __m256 o0[GROUP_MAX], o1[GROUP_MAX];
        for (int i = 0; i < GROUP_MAX; i++)
            o0[i] = o1[i] = _mm256_setzero_ps();
        for (int32_t b = 0, t = 0; t < n; b++) {
            const ekv_f16 *vb = kv->v_blocks[b] + j0;
            for (int32_t r = 0; r < bt && t < n; r++, t++) {
                const ekv_f16 *v = vb + (size_t)r * d;
                const __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v));
                const __m256 v1 = two ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8)))
                                      : _mm256_setzero_ps();
                for (int i = 0; i < g; i++) {
                    const float p = scores[(size_t)i * n + t];
                    if (p == 0.0f)
                        continue;
                    const __m256 vp = _mm256_set1_ps(p);
                    o0[i] = _mm256_fmadd_ps(vp, v0, o0[i]);
                    o1[i] = _mm256_fmadd_ps(vp, v1, o1[i]);
                }
            }
        }
        for (int i = 0; i < g; i++) {
            float *o = out + (size_t)i * out_stride + j0;
            const __m256 vi = _mm256_set1_ps(inv[i]);
            _mm256_storeu_ps(o, _mm256_mul_ps(o0[i], vi));
            if (two)
                _mm256_storeu_ps(o + 8, _mm256_mul_ps(o1[i], vi));
        }
    }
}
#endif

void kern_attention(const kern_kv_view *kv, const float *Q, int n_q, int q_stride,
                    const int32_t *q_pos, float scale, float *out, int out_stride, float *scores)
{
    for (int i = 0; i < n_q;) {
        const float *q = Q + (size_t)i * q_stride;
        float *o = out + (size_t)i * out_stride;
#if defined(__x86_64__)
        if (kern_active_isa() >= KERN_ISA_AVX2 && kv->head_dim % 8 == 0) {
            int g = 1; /* consecutive queries at one position go together */
            while (g < GROUP_MAX && i + g < n_q && q_pos[i + g] == q_pos[i])
                g++;
            attend_group_avx2(kv, q, g, q_stride, q_pos[i], scale, o, out_stride, scores);
            i += g;
            continue;
        }
#endif
        attend_one_scalar(kv, q, q_pos[i], scale, o, scores);
        i++;
    }
}
