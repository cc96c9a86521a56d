/*
 * attention_internal.h - shared by kernels/cpu/attention.c and
 * attention_packed.c (not a public header).
 */
#ifndef ENTROKV_ATTENTION_INTERNAL_H
#define ENTROKV_ATTENTION_INTERNAL_H

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

#endif
