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

/* SCOPE (specs/scope.md): what each KV head keeps of the generated tokens.
 * The prompt's tokens (whatever the prefill policy kept) are never evicted
 * while decoding; the decode pool of each (layer, KV head) is capped at a
 * budget B(t) that includes the `recent` newest tokens. */
typedef enum kvc_decode_mode {
    KVC_DECODE_NONE = 0,      /* the decode pool grows without bound */
    KVC_DECODE_SLIDE,         /* B = window, top-k every step once full */
    KVC_DECODE_ADAPTIVE,      /* B(t) = recent + t / delta, top-k every step */
    KVC_DECODE_DISCONTINUOUS, /* B(t) as adaptive, top-k once every delta + 1 steps */
    KVC_DECODE_RECENT,        /* baseline: B = window, the newest decode tokens only */
    KVC_DECODE_H2O,           /* baseline: P + window tokens per head, unified top by
                               * accumulated attention mass (prompt tokens evictable) */
    KVC_DECODE_N_MODES
} kvc_decode_mode;

typedef struct kvc_decode_policy {
    kvc_decode_mode mode;
    int32_t recent;  /* R >= 1 */
    int32_t window;  /* W > R: slide's budget; sets delta for the others */
    int32_t max_new; /* T_out for delta; 0: the request's max_tokens */
} kvc_decode_policy;

/* SparK (specs/spark.md): key channels pruned per prompt token at the end
 * of prefill, after the token policy. */
typedef enum kvc_spark_recovery {
    KVC_SPARK_AVG = 0, /* pruned channels rebuilt as sign * sqrt(m / c_j) */
    KVC_SPARK_ZERO,    /* pruned channels read as 0 (ablation) */
} kvc_spark_recovery;

typedef struct kvc_spark_policy {
    double ratio; /* fraction of head_dim pruned per token, [0, 1); 0: off */
    kvc_spark_recovery recovery;
} kvc_spark_policy;

typedef struct kvc_policy {
    kvc_method_id method;
    double budget;               /* (0, 1]: fraction of the prompt; > 1: tokens per head */
    const kvc_profile *profile;  /* uncomp only; NULL: online entropy from the request */
    kvc_decode_policy decode;    /* zero: no decode compression */
    kvc_spark_policy spark;      /* zero: no channel pruning */
    /* Recall (kvrecall.h): blocks of KVC_RECALL_BLOCK evicted tokens per KV
     * head that rejoin attention each decode step; 0: off. They come out of
     * the budget: the prefill policy keeps mean - recall * KVC_RECALL_BLOCK
     * tokens per head on average (split across heads by the method as
     * ever), so resident + recall buffer stays within it. */
    int32_t recall;
    /* Recall's ranking every recall_every decode steps (0: the default,
     * every step) and its promotion of recall blocks that keep winning into
     * the resident set (kvrecall.h; recall_no_promote 1: off). */
    int32_t recall_every;
    uint8_t recall_no_promote;
    /* Channels recall's ranking scores exactly (kv_recall_set_channels):
     * 0 the default (KV_RECALL_EXACT_CHANNELS), KVC_RECALL_BOX the digest's
     * box alone, n > 0 n channels (head_dim or more: the exact maximum). */
    int32_t recall_channels;
    /* Token-granular recall (kv_recall_set_gather): 0 whole blocks, k the
     * best R x 16 tokens of the ranking's k x R best blocks. */
    int32_t recall_gather;
} kvc_policy;

#define KVC_RECALL_BOX (-1)

#define KVC_RECALL_BLOCK 16 /* the KV pool's block (model_kv_pool_create) */
#define KVC_RECALL_MAX 1024

/* "full", "streaming", ... ; NULL for an out-of-range id. */
const char *kvc_method_name(kvc_method_id id);

/* Parses a method name and a budget into p (profile NULL). EKV_EINVAL with a
 * message for an unknown method or a budget <= 0, NaN or infinite. "" and
 * NULL mean full. */
ekv_status kvc_policy_parse(const char *method, double budget, kvc_policy *p, ekv_error *err);

/* Mean tokens per head the policy keeps of an n_prompt-token prompt; EKV_ERANGE
 * when an absolute budget exceeds the prompt, or when recall's buffer
 * (recall * KVC_RECALL_BLOCK tokens) leaves the prefill policy no resident
 * token. Full always keeps n_prompt. */
ekv_status kvc_policy_mean_tokens(const kvc_policy *p, int32_t n_prompt, int32_t *mean,
                                  ekv_error *err);

/* The decode, SparK and recall parts of p (kv.decode, kv.spark, kv.recall)
 * as a request carries them: EKV_EINVAL with a message for an unknown mode
 * or recovery, recent < 1, window <= recent, max_new < 0, a ratio outside
 * [0, 1) or recall outside [0, KVC_RECALL_MAX]. */
ekv_status kvc_policy_check(const kvc_policy *p, ekv_error *err);

/* Trailing prompt rows the capture must see computed (not restored from a
 * prefix cache): 1 for full KV, the observation window, or SparK's
 * 32-query window. */
int32_t kvc_policy_rows(const kvc_policy *p);

/* "none", "scope-slide", "scope-adaptive", "scope-discontinuous", "recent", "h2o"; NULL for
 * an out-of-range mode. */
const char *kvc_decode_name(kvc_decode_mode mode);

/* Parses a decode method name ("" and NULL mean none) with its recent
 * window R and budget W into d (max_new 0). EKV_EINVAL with a message for
 * an unknown name, R < 1 or W <= R (with a method other than none). */
ekv_status kvc_decode_parse(const char *name, int32_t recent, int32_t window,
                            kvc_decode_policy *d, ekv_error *err);

/* Parses a SparK ratio in [0, 1) and a recovery ("avg", "zero"; "" and NULL
 * mean avg) into p. EKV_EINVAL with a message otherwise. */
ekv_status kvc_spark_parse(double ratio, const char *recovery, kvc_spark_policy *p,
                           ekv_error *err);

/* ---- SCOPE decode-phase compression of one sequence (compress/scope.c) ---- */

typedef struct kvc_scope kvc_scope;

/* For a sequence whose prompt is in seq and compressed (the prefill pool):
 * records each head's true prefill length. max_new is T_out when
 * d->max_new is 0. NULL when d->mode is none is not an error: check d first. */
kvc_scope *kvc_scope_create(const kvc_decode_policy *d, const kv_seq *seq, int32_t max_new,
                            ekv_error *err);
void kvc_scope_free(kvc_scope *s);

/* Before the forward that appends decode token t (0 for the first generated
 * token, counted per sequence): decides whether this step evicts. */
void kvc_scope_begin(kvc_scope *s, int32_t t);

/* model_probe's fn for this sequence's row (model.h): after the step's
 * attention of (layer, head), keeps the prefill pool, the top B(t) - R
 * candidates by this step's logit (max over the head's query heads; ties
 * to the older token) and the last R tokens. h2o instead adds the step's
 * probabilities (summed over the query heads) to each token's mass, every
 * step, and on evicting steps keeps the last R and the top P + W - R of
 * all others by mass. Evicted tokens go to the pool's eviction hook
 * (kv_seq_keep). A failure is kept for kvc_scope_status. */
void kvc_scope_observe(kvc_scope *s, kv_seq *seq, int32_t layer, int32_t head,
                       const float *logits, const float *probs, int32_t n_q, int32_t n_tokens);

/* The first error kvc_scope_observe met (EKV_OK: none). */
ekv_status kvc_scope_status(const kvc_scope *s, ekv_error *err);

typedef struct kvc_scope_stats {
    int32_t delta;           /* delta used for adaptive/discontinuous */
    int32_t budget;          /* B(t) of the last step */
    int32_t decode_held;     /* decode tokens each head holds now */
    int32_t decode_peak;     /* the most any head held at once */
    int64_t evicted;         /* tokens evicted over all heads */
    int64_t topk_calls;      /* steps that ran the selection */
} kvc_scope_stats;
void kvc_scope_get_stats(const kvc_scope *s, kvc_scope_stats *st);

/* B(t) for a policy and delta (exposed for tests). */
int32_t kvc_scope_budget(const kvc_decode_policy *d, int32_t delta, int32_t t);
/* delta = floor((T_out - R) / (W - R)), at least 1. */
int32_t kvc_scope_delta(const kvc_decode_policy *d, int32_t t_out);

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
    int64_t bytes_before;  /* kv_seq_bytes before compression, */
    int64_t bytes_tokens;  /* after the token policy, */
    int64_t bytes_after;   /* and after SparK's channel pruning */
    double seconds;        /* scoring + entropy + selection */
} kvc_report;

/* For a prompt of n_prompt tokens appended at positions pos0..pos0+n_prompt-1. */
kvc_capture *kvc_capture_create(const kvc_policy *p, const ekv_model *m, int32_t n_prompt,
                                int32_t pos0, ekv_error *err);
/* The same for one rank of a tensor-parallel group (model.h model_shard):
 * the tap sees and records the rank's own query heads, and compression
 * scores and selects its own KV heads. Budgets are allocated over all the
 * model's heads on every rank, from every head's entropy (uncomp: the ranks
 * allgather their heads' entropies through the runtime's communicator), so
 * all ranks derive the same budgets; each keeps its heads' share.
 * kvc_capture_compress must get the rank's runtime. */
kvc_capture *kvc_capture_create_shard(const kvc_policy *p, const ekv_model *m,
                                      const model_shard *s, int32_t n_prompt, int32_t pos0,
                                      ekv_error *err);
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
 * kvc_capture_entropy). n_layers * n_heads values (a shard's capture: its
 * own n_heads). */
ekv_status kvc_capture_entropy(kvc_capture *c, const float **entropy, ekv_error *err);

#endif
