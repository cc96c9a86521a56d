/*
 * attention_internal.h - shared by kernels/cpu/attention.c and
 * attention_packed.c (not a public header).
 */
#ifndef ENTROKV_ATTENTION_INTERNAL_H
#define ENTROKV_ATTENTION_INTERNAL_H

#include <stdbool.h>

#include "entrokv/kernels.h"

/* The largest head_dim a view with packed keys may have. */
#define KERN_PACKED_MAX_DIM 512

/* g (<= KERN_ATTN_GROUP_MAX) queries at one position over a view with
 * packed tokens (kv->packed != NULL); pr: the probe or NULL, these queries'
 * rows start at q0. scores: g * kv->n_tokens floats. A query's result does
 * not depend on g. */
void kern_attend_packed(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                        int32_t qpos, float scale, float *out, int out_stride, float *scores,
                        const kern_attn_probe *pr, int q0);

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
