/*
 * kvdigest_simd.c - recall's ranking bound for many blocks at once
 * (kv_digest_bounds, kvrecall.h), bit for bit kv_digest_bound's.
 *
 * kv_digest_bound sums sixteen lanes of max(q_c min_c, q_c max_c), lane j
 * taking channels j, j + 16, ... in order, then adds the sixteen lanes one
 * after another. That last chain of sixteen dependent adds, per block and
 * query, is what a decode step's ranking spent most of its time on (8k
 * context, 461 digests per head: about 60 cycles a bound). Here sixteen
 * blocks' lane vectors are transposed in registers, so the chain runs once
 * per sixteen blocks with a block in each lane: the same additions in the
 * same order, so the same floats. Other head sizes, other ISAs and the
 * last n % 16 blocks take kv_digest_bound itself.
 */
#include "entrokv/kvrecall.h"

#include "entrokv/kernels.h"

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
#endif

void kv_digest_bounds(const float *kmin, const float *kmax, int32_t n, const float *Q, int n_q,
                      int q_stride, int32_t d, float *bound)
{
    int32_t b = 0;
#if defined(__x86_64__)
    if (d % 16 == 0 && n >= 16 && kern_active_isa() >= KERN_ISA_AVX512) {
        b = n - n % 16;
        bounds_avx512(kmin, kmax, b, Q, n_q, q_stride, d, bound);
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
    }
}
