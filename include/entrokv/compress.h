/*
 * compress.h - KV-cache compression: which tokens each (layer, KV head) keeps
 * after a prompt's prefill.
 *
 * A policy is a method (full, streaming, snapkv, pyramidkv, uncomp) and a
 * budget. The budget is either a fraction of the prompt in (0, 1] or an
 * average number of tokens per KV head (> 1); either way the sum of the
 * per-head budgets never exceeds n_layers * n_kv_heads * mean.
 *
 * Use per sequence:
 *   kvc_capture *cap = kvc_capture_create(&policy, model, n_prompt, pos0, err);
 *   model_batch.tap = kvc_capture_tap(cap) for the prefill rows   (records the
 *       observation window's queries and, for uncomp, the query Gram matrices)
 *   kvc_capture_compress(cap, rt, seq, evict, evict_ctx, &report, err);
 *   kvc_capture_free(cap);
 * Compression calls kv_seq_keep per head, so dropped blocks return to the
 * pool at once; the evicted tokens go to the pool's eviction hook (kvcache.h).
 *
 * Methods and their deviations from the papers are in docs/COMPRESSION.md;
 * the algorithms are specified in shared/specs/uncomp.md.
 */
#ifndef ENTROKV_COMPRESS_H
#define ENTROKV_COMPRESS_H

#include <stdbool.h>
#include <stdint.h>

#include "entrokv/kvcache.h"
#include "entrokv/model.h"
#include "entrokv/status.h"

typedef enum kvc_method_id {
    KVC_FULL = 0,
    KVC_STREAMING,
    KVC_SNAPKV,
    KVC_PYRAMIDKV,
    KVC_UNCOMP,
    KVC_N_METHODS
} kvc_method_id;

typedef struct kvc_profile kvc_profile; /* offline UNComp head groups (kvc_profile_load) */

typedef struct kvc_policy {
    kvc_method_id method;
    double budget;               /* (0, 1]: fraction of the prompt; > 1: tokens per head */
    const kvc_profile *profile;  /* uncomp only; NULL: online entropy from the request */
} kvc_policy;

/* "full", "streaming", ... ; NULL for an out-of-range id. */
const char *kvc_method_name(kvc_method_id id);

/* Parses a method name and a budget into p (profile NULL). EKV_EINVAL with a
 * message for an unknown method or a budget <= 0, NaN or infinite. "" and
 * NULL mean full. */
ekv_status kvc_policy_parse(const char *method, double budget, kvc_policy *p, ekv_error *err);

/* Mean tokens per head the policy keeps of an n_prompt-token prompt; EKV_ERANGE
 * when an absolute budget exceeds the prompt. Full always keeps n_prompt. */
ekv_status kvc_policy_mean_tokens(const kvc_policy *p, int32_t n_prompt, int32_t *mean,
                                  ekv_error *err);

/* ---- offline UNComp profile (compress/profile.c) ---- */

/* Loads a profile written by kvc_profile_save. EKV_EINVAL when the file is
 * malformed or was made for another model (its layers, heads, dims, vocab
 * or name differ from m). */
kvc_profile *kvc_profile_load(const char *path, const ekv_model *m, ekv_error *err);
void kvc_profile_free(kvc_profile *p);

/* Building a profile (entrokv calibrate): each sample adds the per-(layer,
 * query head) entropies of one calibration text (kvc_capture_entropy); a
 * KV head's entropy is the mean of its query heads'; per layer the n/2
 * highest KV heads (at least one) get a vote; the profile's HIGH group is
 * the heads with the most votes (specs/uncomp.md section 2). */
typedef struct kvc_calibration kvc_calibration;
kvc_calibration *kvc_calibration_create(const ekv_model *m, ekv_error *err);
void kvc_calibration_free(kvc_calibration *c);
void kvc_calibration_add(kvc_calibration *c, const float *entropy);
ekv_status kvc_calibration_save(const kvc_calibration *c, const char *path, ekv_error *err);

/* ---- capture and compression of one sequence (compress/compress.c) ---- */

typedef struct kvc_capture kvc_capture;

typedef struct kvc_report {
    int32_t n_prompt;
    int64_t budget_total;  /* tokens the budget allows over all heads */
    int64_t kept_total;    /* tokens kept over all heads */
    int64_t blocks_before; /* the sequence's blocks before and after */
    int64_t blocks_after;
    double seconds;        /* scoring + entropy + selection */
} kvc_report;

/* For a prompt of n_prompt tokens appended at positions pos0..pos0+n_prompt-1. */
kvc_capture *kvc_capture_create(const kvc_policy *p, const ekv_model *m, int32_t n_prompt,
                                int32_t pos0, ekv_error *err);
void kvc_capture_free(kvc_capture *c);

/* The tap to set on each prefill batch of this sequence (model.h). NULL when
 * the method needs nothing recorded (full, streaming). */
const model_tap *kvc_capture_tap(kvc_capture *c, kv_seq *seq);

/* After the whole prompt is in seq: scores, allocates budgets, keeps the
 * chosen tokens of every (layer, KV head). */
ekv_status kvc_capture_compress(kvc_capture *c, ekv_runtime *rt, kv_seq *seq, kvc_report *rep,
                                ekv_error *err);

/* Switches the policy kvc_capture_compress will apply. A capture made for
 * uncomp without a profile records everything any method needs, so one
 * prefill can be compressed several ways on clones of its sequence
 * (kv_seq_clone; evaluation). EKV_EINVAL if p needs what c did not record. */
ekv_status kvc_capture_set_policy(kvc_capture *c, const kvc_policy *p, ekv_error *err);

/* Per-(layer, query head) truncated matrix entropy of the captured prompt
 * (uncomp captures only; valid after kvc_capture_compress or
 * kvc_capture_entropy). n_layers * n_heads values. */
ekv_status kvc_capture_entropy(kvc_capture *c, const float **entropy, ekv_error *err);

#endif
