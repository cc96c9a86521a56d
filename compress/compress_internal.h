/*
 * compress_internal.h - what the compression methods share inside compress/.
 *
 * A method is one file defining one kvc_method: how it spreads the budget
 * over (layer, KV head) and how one head picks the tokens it keeps. The
 * machinery around them (recording queries during prefill, observation
 * window scores, entropy, applying the selection) is shared: compress.c,
 * score.c, entropy.c, budget.c.
 */
#ifndef ENTROKV_COMPRESS_INTERNAL_H
#define ENTROKV_COMPRESS_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/compress.h"

/* The observation window and pooling of SnapKV as the UNComp repository runs
 * every method (specs/uncomp.md section 3): last 8 queries, max-pool of 7. */
#define KVC_WINDOW 8
#define KVC_POOL_KERNEL 7
/* StreamingLLM's attention sinks (Xiao et al. 2023 use 4). */
#define KVC_SINKS 4
/* The largest head_dim the scoring and entropy code handle. */
#define KVC_MAX_HEAD_DIM 512
/* PyramidKV's beta (Cai et al. 2024, pyramidkv_utils.py). */
#define KVC_PYRAMID_BETA 20

/* Everything a method's allocate and select may read. */
typedef struct kvc_ctx {
    int32_t n_layers;
    int32_t n_kv_heads;
    int32_t n_tokens;          /* tokens each head holds before compression */
    int32_t mean;              /* budget: mean tokens per head */
    int64_t total;             /* mean * n_layers * n_kv_heads: the sum never exceeds it */
    const float *kv_entropy;   /* [layer][kv head], uncomp only */
    const kvc_profile *profile;
} kvc_ctx;

typedef struct kvc_method {
    const char *name;
    bool needs_scores;  /* observation-window attention scores */
    bool needs_entropy; /* online entropy of the prompt's queries (uncomp without profile) */
    /* budget[layer * n_kv_heads + head]: tokens to keep, each in [1, n_tokens] */
    void (*allocate)(const kvc_ctx *c, int32_t *budget);
    /* keep[]: budget increasing indices into the head's tokens; scores are the
     * head's observation-window scores (n_tokens, NULL when !needs_scores);
     * scratch holds 2 * n_tokens floats. */
    void (*select)(const kvc_ctx *c, const float *scores, int32_t budget, int32_t *keep,
                   float *scratch);
} kvc_method;

extern const kvc_method kvc_method_full;
extern const kvc_method kvc_method_streaming;
extern const kvc_method kvc_method_snapkv;
extern const kvc_method kvc_method_pyramidkv;
extern const kvc_method kvc_method_uncomp;

/* ---- budget.c ---- */

/* Splits total over n items in proportion to weight[i] > 0, each clamped to
 * [lo, hi]: out sums to min(total, n * hi) (and at least n * lo, which the
 * caller keeps <= total). Integer rounding by largest remainder, ties to the
 * lower index, so the result is deterministic. */
void kvc_split(const double *weight, int32_t n, int64_t total, int32_t lo, int32_t hi,
               int32_t *out);

/* Every head gets layer_budget[l] (in [1, n_tokens]). */
void kvc_fill_layers(const kvc_ctx *c, const int32_t *layer_budget, int32_t *budget);

/* ---- select.c ---- */

/* SnapKV's rule for one head: the window's last w = min(KVC_WINDOW, budget/2)
 * tokens always, plus the budget - w highest max-pooled scores of the tokens
 * before them (ties to the lower index). */
void kvc_select_snap(const kvc_ctx *c, const float *scores, int32_t budget, int32_t *keep,
                     float *scratch);

/* ---- score.c ---- */

/* scores[t] = sum over the window's queries and the group's query heads of
 * softmax(q . k / sqrt(d)) over the head's tokens, causally masked by
 * position; fp32 softmax as the reference (specs/uncomp.md section 3.3).
 * wq: n_window rows (row_stride floats apart) of n_group consecutive query
 * vectors of head_dim floats; q_pos: the rows' positions.
 * scratch: n_window * n_group * view->n_tokens floats. */
void kvc_window_scores(const kern_kv_view *view, const float *wq, size_t row_stride,
                       int32_t n_window, int32_t n_group, const int32_t *q_pos, float *scores,
                       float *scratch);

/* ---- entropy.c ---- */

/* Adds the window's n rows (stride floats apart, d each) to the d x d Gram
 * A (row-major, double): rows are centred on the window's mean and each
 * scaled to unit length first (specs/uncomp.md section 1 steps 1-3). */
void kvc_gram_add(double *A, const float *rows, int32_t n, int32_t stride, int32_t d);

/* Truncated matrix entropy of the Gram of n rows: A / trace + 1e-10 I, top k
 * eigenvalues, -sum lambda ln lambda / ln d (section 1 steps 4-7). A is
 * overwritten. EKV_EINVAL for n = 0 or a failed eigen-solve. */
ekv_status kvc_entropy(double *A, int32_t d, int32_t k, double *entropy, ekv_error *err);

/* The truncation: k = 32 for head_dim 128 (the reference's svd32), d / 4 in
 * general. */
int32_t kvc_entropy_rank(int32_t head_dim);

/* ---- spark.c ---- */

/* SparK's window of prompt queries (spec section 2: window_size = 32) and
 * the floor of a channel weight c_j (pitfall 3). */
#define KVC_SPARK_WINDOW 32
#define KVC_SPARK_C_MIN 1e-6f

/* Channels a token keeps: D - int(ratio * D). */
int32_t kvc_spark_keep(double ratio, int32_t head_dim);
/* c[j] = max(C_MIN, sqrt(sum over the window of (mean over the group of q_j)^2));
 * wq: n_window rows row_stride floats apart of n_group query vectors. */
void kvc_spark_channel_weights(const float *wq, size_t row_stride, int32_t n_window,
                               int32_t n_group, int32_t head_dim, float *c);
/* One token: the n_keep channels of largest k_j^2 c_j (ties to the lower j)
 * into mask (bit j); returns m, the mean saliency of the pruned channels. */
float kvc_spark_select(const float *k, const float *c, int32_t head_dim, int32_t n_keep,
                       uint8_t *mask);
/* Prunes and packs every (layer, KV head) of seq; sq holds the window's
 * queries [layer][n_window][n_heads][head_dim]. */
ekv_status kvc_spark_apply(const kvc_spark_policy *p, kv_seq *seq, const float *sq,
                           int32_t n_window, int32_t n_heads, ekv_error *err);

/* ---- h2o.c: the H2O-style unified eviction baseline behind kvc_scope ---- */

typedef struct kvc_h2o kvc_h2o;
/* Per (layer, KV head) of seq: accumulated masses from zero, and the packed
 * prefix that is never a candidate. */
kvc_h2o *kvc_h2o_create(const kv_seq *seq, ekv_error *err);
void kvc_h2o_free(kvc_h2o *a);
/* One decode step of (layer, head), after its attention: adds the sum over
 * the n_q query heads of probs ([n_q][n_tokens]) to each token's mass; with
 * keep_total >= 0 then keeps the last `recent` tokens and the top
 * keep_total - recent others by mass (ties to the older), adding what it
 * drops to *evicted. n_tokens must be what the head held after the last
 * call plus one. */
ekv_status kvc_h2o_observe(kvc_h2o *a, kv_seq *seq, int32_t layer, int32_t head,
                           const float *probs, int32_t n_q, int32_t n_tokens, int32_t keep_total,
                           int32_t recent, int64_t *evicted, ekv_error *err);

/* ---- profile.c ---- */

/* HIGH (1) or LOW (0) group of (layer, kv head) in the profile. */
int kvc_profile_is_high(const kvc_profile *p, int32_t layer, int32_t head);

#endif
