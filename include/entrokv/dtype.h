/*
 * dtype.h - the tensor element types GGUF files use (ggml's numbering) and
 * their block geometry, plus fp16/bf16 scalar conversions.
 *
 * Quantized types store `block_elems` values in `block_bytes` bytes; a row of
 * n elements must be a whole number of blocks. The GGUF reader uses this table
 * to check tensor sizes; the kernels use it to walk rows.
 */
#ifndef ENTROKV_DTYPE_H
#define ENTROKV_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum ekv_dtype {
    EKV_F32 = 0,
    EKV_F16 = 1,
    EKV_Q4_0 = 2,
    EKV_Q4_1 = 3,
    EKV_Q5_0 = 6,
    EKV_Q5_1 = 7,
    EKV_Q8_0 = 8,
    EKV_Q8_1 = 9,
    EKV_Q2_K = 10,
    EKV_Q3_K = 11,
    EKV_Q4_K = 12,
    EKV_Q5_K = 13,
    EKV_Q6_K = 14,
    EKV_Q8_K = 15,
    EKV_I8 = 24,
    EKV_I16 = 25,
    EKV_I32 = 26,
    EKV_I64 = 27,
    EKV_F64 = 28,
    EKV_BF16 = 30,
} ekv_dtype;

typedef struct ekv_dtype_info {
    const char *name;
    uint32_t block_elems;
    uint32_t block_bytes;
} ekv_dtype_info;

/* NULL for a type this build does not know. */
const ekv_dtype_info *ekv_dtype_get(uint32_t type);

/* Bytes of a row of n elements; false if n is not a whole number of blocks,
 * the type is unknown, or the size overflows. */
bool ekv_dtype_row_bytes(uint32_t type, uint64_t n, uint64_t *out);

typedef uint16_t ekv_f16;

/* IEEE half <-> float, round to nearest even (matches F16C / ggml). */
float ekv_f16_to_f32(ekv_f16 h);
ekv_f16 ekv_f32_to_f16(float f);
float ekv_bf16_to_f32(uint16_t h);
/* dst[i] = ekv_f32_to_f16(src[i]) for i < n, bit for bit, eight at a time
 * with F16C where the CPU has it (the KV cache's append). */
void ekv_f32_to_f16_n(const float *src, ekv_f16 *dst, size_t n);

#endif
