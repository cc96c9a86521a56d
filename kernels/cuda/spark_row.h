/*
 * spark_row.h - one SparK packed key row (kern_kv_packed, kernels.h;
 * shared/specs/spark.md sections 3 and 9) rebuilt channel by channel and
 * dotted with a GQA group's queries, exactly as spark.cu's decode kernel
 * does it, in code that compiles both as CUDA (__host__ __device__) and as
 * plain C11. The kernel includes it; cuda.test_cpu_reference (label unit,
 * no GPU, no CUDA toolkit) compares it with kern_packed_decode, so the
 * kernel's reading of masks, signs, ranks and m is checked in CI although no
 * device runs there.
 *
 * Row: f32 m | mask, d / 8 bytes | signs, ceil((d - n_keep) / 8) bytes |
 * padding to 2 | n_keep fp16 kept values. Needs d a multiple of 32 and the
 * row 4-aligned (kern_packed_row_bytes rounds rows to 4), so the mask and
 * the signs are read as little-endian 32-bit words: bit b of word w is bit
 * b % 8 of byte 4 w + b / 8, the byte order the encoder writes. A sign
 * word read past the sign bytes stays inside the row (its start, 4 + d / 8,
 * is 4-aligned, and so is the row's end).
 */
#ifndef EKV_SPARK_ROW_H
#define EKV_SPARK_ROW_H

#include <math.h>
#include <stdint.h>

#include "entrokv/dtype.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define SPK_FN static __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__ /* the device pass; the host compiler would warn */
#define SPK_UNROLL _Pragma("unroll")
#else
#define SPK_UNROLL
#endif
SPK_FN float spk_h2f(ekv_f16 h) { return __half2float(__ushort_as_half(h)); }
#else
#define SPK_FN static inline
#define SPK_UNROLL
SPK_FN float spk_h2f(ekv_f16 h) { return ekv_f16_to_f32(h); }
#endif

#define SPK_G_MAX 8 /* query heads per KV head the kernel serves */

/* Byte offset of the kept fp16 values in a row (kern_packed_row_bytes's layout). */
SPK_FN int spk_vals_offset(int d, int n_keep)
{
    return (4 + d / 8 + (d - n_keep + 7) / 8 + 1) & ~1;
}

/*
 * s[i] = q_i . k (unscaled) for the g <= SPK_G_MAX queries q + i * d, where
 * k is the row's key: channel j kept -> its fp16 value (the next one in
 * channel order); pruned -> +-sqrt(m) * inv_sqrt_c[j] with the sign of the
 * next sign bit ("avg" recovery), or +-0 when inv_sqrt_c is NULL (the
 * zero-fill ablation). Sums run over j in order into four partial sums by
 * j mod 4, added as (0 + 1) + (2 + 3): kern_attend_packed's scalar order.
 */
SPK_FN void spk_row_dot(const uint8_t *row, int d, int n_keep, const float *inv_sqrt_c,
                        const float *q, int g, float *s)
{
    const float m = *(const float *)(const void *)row;
    const float sm = sqrtf(m > 0.0f ? m : 0.0f);
    const uint32_t *mask = (const uint32_t *)(const void *)(row + 4);
    const uint32_t *sign = (const uint32_t *)(const void *)(row + 4 + d / 8);
    const ekv_f16 *vals = (const ekv_f16 *)(const void *)(row + spk_vals_offset(d, n_keep));
    float a[SPK_G_MAX][4];
    SPK_UNROLL
    for (int i = 0; i < SPK_G_MAX; i++)
        a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.0f;
    int ki = 0, pi = 0; /* next kept value, next sign bit */
    for (int w = 0; w < d / 32; w++) {
        const uint32_t mw = mask[w];
        SPK_UNROLL
        for (int b = 0; b < 32; b++) {
            const int j = 32 * w + b;
            float k;
            if (mw >> b & 1u) {
                k = spk_h2f(vals[ki++]);
            } else {
                const float mag = inv_sqrt_c ? sm * inv_sqrt_c[j] : 0.0f;
                k = (sign[pi >> 5] >> (pi & 31) & 1u) ? -mag : mag;
                pi++;
            }
            SPK_UNROLL
            for (int i = 0; i < SPK_G_MAX; i++)
                if (i < g)
                    a[i][b & 3] += q[i * d + j] * k;
        }
    }
    SPK_UNROLL /* constant indices keep a[][] and s[] in registers */
    for (int i = 0; i < SPK_G_MAX; i++)
        if (i < g)
            s[i] = (a[i][0] + a[i][1]) + (a[i][2] + a[i][3]);
}

#endif
