/*
 * quant.h - private to kernels/cpu: ggml's quantized block layouts, the
 * prepared-activation layout, and the kernel table each instruction set fills.
 *
 * The weight blocks are byte-for-byte ggml's, because weights are used in
 * place from the GGUF mapping. Activations are quantized once per matmul into
 * the caller's scratch; their values are exactly ggml's (Q8_1 for Q4_0/Q4_1,
 * Q8_0 for Q8_0, Q8_K for the K-quants) but the 32-element types store them
 * structure-of-arrays, which the SIMD kernels load without shuffling:
 *
 *   prepared row for Q4_0/Q4_1/Q8_0 (nbp = k/32 rounded up to even):
 *     int8  qs[nbp * 32]   quants, natural order; a padding block is zero
 *     float d[nbp]         fp16(amax / 127), widened back to float
 *     float s[nbp]         fp16(d * sum(qs)) widened (ggml's Q8_1 `s`)
 *     int32 sum[nbp]       sum(qs), exact (Q4_0's -8 and Q8_0's +128 offsets)
 *   then, for Q4_0/Q4_1 only, at q8x_lanes_offset(k) (64-byte aligned):
 *     float lanes[nbp / 2][16]  per block pair, the activation scales spread
 *                          over the lanes of the AVX-512 4-bit kernel's
 *                          register layout (dot_avx512.c; unused elsewhere)
 *
 * The AVX-512 level prepares Q4_0/Q4_1 rows with the same values but its qs
 * in the order its 4-bit kernel multiplies them (per block pair, 16-byte
 * quarters b[0:16] b1[0:16] b[16:32] b1[16:32]) and fills `lanes`, so the
 * kernel's inner loop loads both ready-made instead of shuffling and
 * permuting them once per weight tile. Prepared rows are private to the ISA
 * table that made them: prep and gemm always come from one table.
 *
 * Padding to an even block count lets the AVX-512 kernels take two blocks per
 * 512-bit register without a tail case: the zero block contributes exactly 0.
 *
 * Nothing outside kernels/cpu includes this file; kernels.h is the interface.
 */
#ifndef ENTROKV_KERNELS_CPU_QUANT_H
#define ENTROKV_KERNELS_CPU_QUANT_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "entrokv/dtype.h"

#define QK 32    /* elements per Q4_0 / Q4_1 / Q8_0 block */
#define QK_K 256 /* elements per K-quant super-block */

typedef struct blk_q4_0 {
    ekv_f16 d;
    uint8_t qs[QK / 2]; /* element j in low nibble of qs[j], j+16 in the high one */
} blk_q4_0;

typedef struct blk_q4_1 {
    ekv_f16 d;
    ekv_f16 m;
    uint8_t qs[QK / 2];
} blk_q4_1;

typedef struct blk_q8_0 {
    ekv_f16 d;
    int8_t qs[QK];
} blk_q8_0;

/* 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes. */
typedef struct blk_q4_k {
    ekv_f16 d;
    ekv_f16 dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
} blk_q4_k;

/* 16 sub-blocks of 16; 6-bit quants = 4 low bits in ql, 2 high bits in qh. */
typedef struct blk_q6_k {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    ekv_f16 d;
} blk_q6_k;

/* Activation super-block for the K-quants (ggml's block_q8_K). */
typedef struct blk_q8_k {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} blk_q8_k;

_Static_assert(sizeof(blk_q4_0) == 18, "Q4_0 block layout");
_Static_assert(sizeof(blk_q4_1) == 20, "Q4_1 block layout");
_Static_assert(sizeof(blk_q8_0) == 34, "Q8_0 block layout");
_Static_assert(sizeof(blk_q4_k) == 144, "Q4_K block layout");
_Static_assert(sizeof(blk_q6_k) == 210, "Q6_K block layout");
_Static_assert(sizeof(blk_q8_k) == 292, "Q8_K block layout");

/* The weight types kern_matmul handles, as a dense index into the tables. */
typedef enum quant_kind {
    QKIND_F32,
    QKIND_F16,
    QKIND_Q4_0,
    QKIND_Q4_1,
    QKIND_Q8_0,
    QKIND_Q4_K,
    QKIND_Q6_K,
    QKIND_COUNT,
    QKIND_NONE = -1
} quant_kind;

quant_kind quant_kind_of(uint32_t wtype);

/* ---- prepared activation rows ---- */

static inline size_t quant_align64(size_t n)
{
    return (n + 63) & ~(size_t)63;
}

/* Blocks per prepared Q8 row, rounded up to even (see the layout above). */
static inline int64_t q8x_blocks(int64_t k)
{
    return ((k / QK) + 1) & ~(int64_t)1;
}

typedef struct q8x_row {
    const int8_t *qs;
    const float *d;
    const float *s;
    const int32_t *sum;
} q8x_row;

static inline q8x_row q8x_view(const uint8_t *row, int64_t k)
{
    int64_t nbp = q8x_blocks(k);
    q8x_row r;
    r.qs = (const int8_t *)row;
    r.d = (const float *)(row + nbp * QK);
    r.s = r.d + nbp;
    r.sum = (const int32_t *)(r.s + nbp);
    return r;
}

/* Byte offset of the AVX-512 lane scales in a prepared Q4_0/Q4_1 row. */
static inline size_t q8x_lanes_offset(int64_t k)
{
    return quant_align64((size_t)q8x_blocks(k) * (QK + 3 * sizeof(float)));
}

/* Bytes of one prepared activation row of k elements for a weight kind. */
size_t quant_prep_row_bytes(quant_kind kind, int64_t k);

/* ---- fp16 helpers (the scalar kernels convert one scale per block) ---- */

static inline float quant_f16(ekv_f16 h)
{
    /* normal numbers inline; zero, subnormal, inf, nan go the slow way */
    uint32_t e = (h >> 10) & 0x1f;
    if (e == 0 || e == 31)
        return ekv_f16_to_f32(h);
    uint32_t bits = ((uint32_t)(h & 0x8000) << 16) | ((e + 112) << 23) | ((uint32_t)(h & 0x3ff) << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ggml's nearest_int: round half to even for |v| < 2^22. Bit-exact with
 * _mm256_round_ps(v, _MM_ROUND_NEAREST), which the SIMD quantizers use. */
static inline int32_t quant_round(float v)
{
    float t = v + 12582912.0f;
    int32_t i;
    memcpy(&i, &t, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* Q4_K packs eight 6-bit scales and mins in 12 bytes (ggml's get_scale_min_k4). */
static inline void q4k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *mn = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* ---- the kernel table ---- */

/*
 * One matmul as the kernels see it. Weight row i is at w + i * w_stride;
 * prepared activation row j at x + j * x_stride (for F32 weights, the caller's
 * float rows); y[j * ldy + i] receives the dot product of the two.
 */
typedef struct quant_gemm {
    const uint8_t *w;
    size_t w_stride;
    const uint8_t *x;
    size_t x_stride;
    float *y;
    int64_t ldy;
    int64_t k;
} quant_gemm;

/* Computes the outputs for weight rows [i0, i1) x activation rows [j0, j1). */
typedef void (*quant_gemm_fn)(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1);

/* Prepares one activation row of k floats into `out` (quant_prep_row_bytes). */
typedef void (*quant_prep_fn)(const float *x, int64_t k, uint8_t *out);

typedef struct quant_kernels {
    quant_gemm_fn gemm[QKIND_COUNT];
    quant_prep_fn prep[QKIND_COUNT]; /* NULL: the kernel reads the float rows */
} quant_kernels;

/* Each instruction-set file fills the entries it implements and leaves the
 * rest as it found them (the dispatcher starts from the narrower ISA's table). */
void quant_register_scalar(quant_kernels *t);
#if defined(__x86_64__)
void quant_register_avx2(quant_kernels *t);
void quant_register_avx512(quant_kernels *t);
/* The AVX2 Q8 quantizer (dot_avx2.c), bit-identical to quant_prep_q8. */
void quant_prep_q8_avx2(const float *x, int64_t k, uint8_t *out);
#endif

/* Scalar activation quantizers (quant.c); the reference the SIMD ones match. */
void quant_prep_q8(const float *x, int64_t k, uint8_t *out);
void quant_prep_q8k(const float *x, int64_t k, uint8_t *out);
void quant_prep_f16(const float *x, int64_t k, uint8_t *out);

/* Dequantizes k elements of one row (kern_get_row). */
void quant_dequant_row(quant_kind kind, const void *row, int64_t k, float *out);

#endif
