/*
 * dtype.c - block geometry of ggml tensor types and scalar half conversions.
 */
#include "entrokv/dtype.h"

#include <stdatomic.h>
#include <string.h>

static const ekv_dtype_info dtype_table[] = {
    [EKV_F32] = {"F32", 1, 4},       [EKV_F16] = {"F16", 1, 2},
    [EKV_Q4_0] = {"Q4_0", 32, 18},   [EKV_Q4_1] = {"Q4_1", 32, 20},
    [EKV_Q5_0] = {"Q5_0", 32, 22},   [EKV_Q5_1] = {"Q5_1", 32, 24},
    [EKV_Q8_0] = {"Q8_0", 32, 34},   [EKV_Q8_1] = {"Q8_1", 32, 36},
    [EKV_Q2_K] = {"Q2_K", 256, 84},  [EKV_Q3_K] = {"Q3_K", 256, 110},
    [EKV_Q4_K] = {"Q4_K", 256, 144}, [EKV_Q5_K] = {"Q5_K", 256, 176},
    [EKV_Q6_K] = {"Q6_K", 256, 210}, [EKV_Q8_K] = {"Q8_K", 256, 292},
    [EKV_I8] = {"I8", 1, 1},         [EKV_I16] = {"I16", 1, 2},
    [EKV_I32] = {"I32", 1, 4},       [EKV_I64] = {"I64", 1, 8},
    [EKV_F64] = {"F64", 1, 8},       [EKV_BF16] = {"BF16", 1, 2},
};

const ekv_dtype_info *ekv_dtype_get(uint32_t type)
{
    if (type >= sizeof dtype_table / sizeof dtype_table[0])
        return NULL;
    if (!dtype_table[type].name)
        return NULL;
    return &dtype_table[type];
}

bool ekv_dtype_row_bytes(uint32_t type, uint64_t n, uint64_t *out)
{
    const ekv_dtype_info *info = ekv_dtype_get(type);
    if (!info || n % info->block_elems)
        return false;
    uint64_t blocks = n / info->block_elems;
    if (blocks > UINT64_MAX / info->block_bytes)
        return false;
    *out = blocks * info->block_bytes;
    return true;
}

float ekv_f16_to_f32(ekv_f16 h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

ekv_f16 ekv_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (ekv_f16)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (ekv_f16)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* result is subnormal or zero */
        if (absx < 0x33000000u)
            return (ekv_f16)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (ekv_f16)(sign | half);
    }
    uint32_t e = (absx >> 23) - 127 + 15;
    uint32_t m = absx & 0x7fffff;
    uint32_t h = (e << 10) | (m >> 13);
    uint32_t rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
        h++; /* may carry into the exponent, which is correct */
    return (ekv_f16)(sign | h);
}

float ekv_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* VCVTPS2PH rounds to nearest even, overflows to inf and makes subnormals
 * as ekv_f32_to_f16 does; only a NaN's payload differs (the scalar code
 * keeps none), so a group of eight holding a NaN goes the scalar way. */
__attribute__((target("avx,f16c"))) static size_t f32_to_f16_f16c(const float *src, ekv_f16 *dst,
                                                                   size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(src + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)))
            for (size_t j = i; j < i + 8; j++)
                dst[j] = ekv_f32_to_f16(src[j]);
        else
            _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    return i;
}
#endif

void ekv_f32_to_f16_n(const float *src, ekv_f16 *dst, size_t n)
{
    size_t i = 0;
#if defined(__x86_64__)
    /* F16C has no __builtin_cpu_supports name in older compilers; every CPU
     * with AVX2 has it (as kernels/cpu/matmul.c assumes) */
    static atomic_int f16c = -1; /* any thread may be first */
    int has = atomic_load_explicit(&f16c, memory_order_relaxed);
    if (has < 0) {
        __builtin_cpu_init();
        has = __builtin_cpu_supports("avx2") ? 1 : 0;
        atomic_store_explicit(&f16c, has, memory_order_relaxed);
    }
    if (has)
        i = f32_to_f16_f16c(src, dst, n);
#endif
    for (; i < n; i++)
        dst[i] = ekv_f32_to_f16(src[i]);
}
