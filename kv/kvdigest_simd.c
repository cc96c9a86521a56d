/*
 * kvdigest_simd.c - recall's ranking bound for many blocks at once
 * (kv_digest_bounds, kvrecall.h), bit for bit kv_digest_bound's.
 *
 * kv_digest_bound sums sixteen lanes of max(q_c min_c, q_c max_c), lane j
 * taking channels j, j + 16, ... in order, then adds the sixteen lanes one
 * after another. That last chain of sixteen dependent adds, per block and
 * query, is what a decode step's ranking spent most of its time on (8k
 * context, 461 digests per head: about 60 cycles a bound). Here a group of
 * blocks' lane vectors are transposed in registers (sixteen blocks on
 * AVX-512, eight on AVX2, each as two 8 x 8 halves), so the chain runs once
 * per group with a block in each lane: the same additions in the same
 * order, so the same floats. Other head sizes, the baseline ISA and the
 * last blocks short of a group take kv_digest_bound itself.
 *
 * kvds_bounds also gives each block's largest |min_c| or |max_c| (the
 * magnitude kvrecall_bound.c's pruning margin scales with), from the same
 * loads.
 */
#include "entrokv/kvrecall.h"

#include "entrokv/kernels.h"
#include "kvrecall_int.h"

#include <math.h>
#include <stddef.h>

#if defined(__x86_64__)
#include <immintrin.h>

/* r[j] becomes column j of the 16 x 16 matrix whose row i was r[i]. */
__attribute__((target("avx512f"))) static inline void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}

/* Blocks [0, n16) in groups of sixteen; d a multiple of 16. */
__attribute__((target("avx512f"))) static void bounds_avx512(const float *kmin,
                                                             const float *kmax, int32_t n16,
                                                             const float *Q, int n_q,
                                                             int q_stride, int32_t d,
                                                             float *bound)
{
    for (int32_t b0 = 0; b0 < n16; b0 += 16) {
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (int g = 0; g < n_q; g++) {
            const float *q = Q + (size_t)g * q_stride;
            __m512 acc[16];
            for (int i = 0; i < 16; i++) {
                const float *mn = kmin + (size_t)(b0 + i) * d, *mx = kmax + (size_t)(b0 + i) * d;
                __m512 s = _mm512_setzero_ps();
                for (int32_t c = 0; c < d; c += 16) {
                    const __m512 qc = _mm512_loadu_ps(q + c);
                    const __m512 a = _mm512_mul_ps(qc, _mm512_loadu_ps(mn + c));
                    const __m512 b = _mm512_mul_ps(qc, _mm512_loadu_ps(mx + c));
                    s = _mm512_add_ps(s, _mm512_max_ps(a, b)); /* a > b ? a : b */
                }
                acc[i] = s;
            }
            transpose16(acc); /* acc[j]: lane j of each of the sixteen blocks */
            __m512 sum = _mm512_setzero_ps();
            for (int j = 0; j < 16; j++)
                sum = _mm512_add_ps(sum, acc[j]);
            best = _mm512_max_ps(sum, best); /* sum > best ? sum : best */
        }
        _mm512_storeu_ps(bound + b0, best);
    }
}
/* r[j] becomes column j of the 8 x 8 matrix whose row i was r[i]. */
__attribute__((target("avx2"))) static inline void transpose8(__m256 r[8])
{
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++)
        r[i] = t[i];
}

/* The largest lane of v. */
__attribute__((target("avx2"))) static inline float hmax8(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* Blocks [0, n8) in groups of eight; d a multiple of 16. Lanes 0-7 and
 * 8-15 of kv_digest_bound's sixteen are two vectors per block (lo, hi). */
__attribute__((target("avx2"))) static void bounds_avx2(const float *kmin, const float *kmax,
                                                        int32_t n8, const float *Q, int n_q,
                                                        int q_stride, int32_t d, float *bound,
                                                        float *amax)
{
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int32_t b0 = 0; b0 < n8; b0 += 8) {
        if (amax)
            for (int i = 0; i < 8; i++) {
                const float *mn = kmin + (size_t)(b0 + i) * d, *mx = kmax + (size_t)(b0 + i) * d;
                __m256 m = _mm256_setzero_ps();
                for (int32_t c = 0; c < d; c += 8) {
                    m = _mm256_max_ps(m, _mm256_and_ps(abs_mask, _mm256_loadu_ps(mn + c)));
                    m = _mm256_max_ps(m, _mm256_and_ps(abs_mask, _mm256_loadu_ps(mx + c)));
                }
                amax[b0 + i] = hmax8(m);
            }
        __m256 best = _mm256_set1_ps(-INFINITY);
        for (int g = 0; g < n_q; g++) {
            const float *q = Q + (size_t)g * q_stride;
            __m256 lo[8], hi[8];
            for (int i = 0; i < 8; i++) {
                const float *mn = kmin + (size_t)(b0 + i) * d, *mx = kmax + (size_t)(b0 + i) * d;
                __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
                for (int32_t c = 0; c < d; c += 16) {
                    const __m256 q0 = _mm256_loadu_ps(q + c), q1 = _mm256_loadu_ps(q + c + 8);
                    const __m256 a0 = _mm256_mul_ps(q0, _mm256_loadu_ps(mn + c));
                    const __m256 b0v = _mm256_mul_ps(q0, _mm256_loadu_ps(mx + c));
                    const __m256 a1 = _mm256_mul_ps(q1, _mm256_loadu_ps(mn + c + 8));
                    const __m256 b1 = _mm256_mul_ps(q1, _mm256_loadu_ps(mx + c + 8));
                    s0 = _mm256_add_ps(s0, _mm256_max_ps(a0, b0v)); /* a > b ? a : b */
                    s1 = _mm256_add_ps(s1, _mm256_max_ps(a1, b1));
                }
                lo[i] = s0;
                hi[i] = s1;
            }
            transpose8(lo); /* lo[j]: lane j of each of the eight blocks */
            transpose8(hi); /* hi[j]: lane 8 + j */
            __m256 sum = _mm256_setzero_ps();
            for (int j = 0; j < 8; j++)
                sum = _mm256_add_ps(sum, lo[j]);
            for (int j = 0; j < 8; j++)
                sum = _mm256_add_ps(sum, hi[j]);
            best = _mm256_max_ps(sum, best); /* sum > best ? sum : best */
        }
        _mm256_storeu_ps(bound + b0, best);
    }
}
#endif

/* The largest |kmin_c| or |kmax_c| of one digest. */
static float digest_amax(const float *mn, const float *mx, int32_t d)
{
    float m = 0.0f;
    for (int32_t c = 0; c < d; c++) {
        const float a = fabsf(mn[c]), b = fabsf(mx[c]);
        m = a > m ? a : m;
        m = b > m ? b : m;
    }
    return m;
}

void kvds_bounds(const float *kmin, const float *kmax, int32_t n, const float *Q, int n_q,
                 int q_stride, int32_t d, float *bound, float *amax)
{
    int32_t b = 0;
#if defined(__x86_64__)
    const kern_isa isa = kern_active_isa();
    if (d % 16 == 0 && n >= 16 && isa >= KERN_ISA_AVX512 && !amax) {
        b = n - n % 16;
        bounds_avx512(kmin, kmax, b, Q, n_q, q_stride, d, bound);
    } else if (d % 16 == 0 && n >= 8 && isa >= KERN_ISA_AVX2) {
        b = n - n % 8;
        bounds_avx2(kmin, kmax, b, Q, n_q, q_stride, d, bound, amax);
    }
#endif
    for (; b < n; b++) {
        const float *mn = kmin + (size_t)b * d, *mx = kmax + (size_t)b * d;
        float best = -INFINITY;
        for (int g = 0; g < n_q; g++) {
            const float s = kv_digest_bound(mn, mx, Q + (size_t)g * q_stride, d);
            best = s > best ? s : best;
        }
        bound[b] = best;
        if (amax)
            amax[b] = digest_amax(mn, mx, d);
    }
}

void kv_digest_bounds(const float *kmin, const float *kmax, int32_t n, const float *Q, int n_q,
                      int q_stride, int32_t d, float *bound)
{
    kvds_bounds(kmin, kmax, n, Q, n_q, q_stride, d, bound, NULL);
}
