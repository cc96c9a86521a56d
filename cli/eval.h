/*
 * eval.h - quality of KV compression on real text (`entrokv eval`).
 *
 * Each task prefills a prompt once with a capture that records what every
 * method needs, then for each policy compresses a clone of that sequence
 * and measures it, so methods are compared on identical prefill state.
 */
#ifndef ENTROKV_EVAL_H
#define ENTROKV_EVAL_H

#include <stdint.h>

#include "entrokv/compress.h"
#include "entrokv/model.h"

typedef struct eval_policy {
    char label[32];  /* "snapkv", "uncomp-online", ... */
    kvc_policy p;
} eval_policy;

typedef struct eval_metrics {
    double ppl;          /* perplexity of the continuation */
    double kl;           /* mean KL(full || policy) over the continuation */
    double top1;         /* fraction of positions whose argmax equals full KV's */
    int64_t kv_bytes;    /* KV the sequence holds right after compression (from the pool) */
    int64_t kv_bytes_full;
    int64_t kv_bytes_end;  /* ppl: KV held after the continuation (decode policies bound it) */
    double kv_bytes_mean;  /* ppl: mean KV held over the continuation's steps */
    double compress_s;
    int passkey_ok;      /* passkey: 1 when the answer was produced */
    char answer[64];     /* passkey: the generated text (truncated) */
    /* recall (kvrecall.h), when the policy recalls */
    int64_t recall_blocks;      /* blocks that joined attention, all heads and steps */
    double recall_bytes_token;  /* their bytes per forwarded token */
    int64_t recall_buffer_bytes; /* the recall buffer (resident beside kv_bytes) */
    int64_t recall_evicted;     /* tokens in the recall store, all heads */
    double recall_select_s;     /* ranking + view building, summed over threads */
    int64_t recall_rankings;    /* (row, layer, KV head) rankings run */
    int64_t recall_promotions;  /* recall blocks promoted (one resident block demoted each) */
} eval_metrics;

/* Called after each policy with its index, for progress. */
typedef void (*eval_progress_fn)(void *ctx, int done);

/* Prefills tokens[0, prefix), then per policy teacher-forces tokens[prefix,
 * prefix + cont] and compares with full KV (which must be pols[0]). A policy
 * with decode compression (SCOPE) feeds the continuation one token per
 * forward, evicting as generation would, with T_out = cont. */
ekv_status eval_ppl(ekv_runtime *rt, const int32_t *tokens, int32_t prefix, int32_t cont,
                    const eval_policy *pols, int n_pols, eval_metrics *out,
                    eval_progress_fn progress, void *pctx, ekv_error *err);

/* Prefills prompt, then per policy greedily generates up to max_new tokens
 * and checks that key (a decimal number) is in the text. */
ekv_status eval_passkey(ekv_runtime *rt, const int32_t *prompt, int32_t n, const char *key,
                        int32_t max_new, const eval_policy *pols, int n_pols, eval_metrics *out,
                        eval_progress_fn progress, void *pctx, ekv_error *err);

#endif
