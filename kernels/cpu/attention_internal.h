/*
 * attention_internal.h - shared by kernels/cpu/attention.c and
 * attention_packed.c (not a public header).
 */
#ifndef ENTROKV_ATTENTION_INTERNAL_H
#define ENTROKV_ATTENTION_INTERNAL_H

#include "entrokv/kernels.h"

/* The largest head_dim a view with packed keys may have. */
#define KERN_PACKED_MAX_DIM 512

/* One query over a view with packed tokens (kv->packed != NULL); pr: this
 * query's probe rows or NULL. scores: kv->n_tokens floats. */
void kern_attend_packed(const kern_kv_view *kv, const float *q, int32_t qpos, float scale,
                        float *out, float *scores, const kern_attn_probe *pr);

#endif
