/*
 * generate.h - one sequence from prompt to finish: chunked prefill, then
 * decode with sampling, streaming detokenisation and stop strings.
 *
 * This is the single-sequence driver behind `entrokv generate` and the
 * benchmarks; the serving step engine batches many sequences instead.
 * Ownership: the result's ids and text are malloc'd and freed by
 * gen_result_free.
 */
#ifndef ENTROKV_GENERATE_H
#define ENTROKV_GENERATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/compress.h"
#include "entrokv/grammar.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"
#include "entrokv/model.h"
#include "entrokv/sampler.h"
#include "entrokv/stopper.h"

typedef enum gen_finish {
    GEN_FINISH_LENGTH = 0, /* max_tokens reached */
    GEN_FINISH_EOS,        /* an end-of-generation token */
    GEN_FINISH_STOP,       /* a stop string */
    GEN_FINISH_CONTEXT,    /* the context is full */
    GEN_FINISH_CANCELLED,  /* the text callback asked to stop */
} gen_finish;

typedef struct gen_params {
    int32_t max_tokens;
    ekv_sampler_params sampling;
    const char *const *stops;
    size_t n_stops;
    bool ignore_eos;         /* keep going past end-of-generation tokens (benchmarks) */
    ekv_grammar *grammar;    /* NULL, or structured output: every token masked to it
                              * (grammar.h); the caller's reference, the engine and
                              * gen_run hold their own while they use it */
    bool logprobs;           /* the step engine reports each sampled token's log-probability */
    int32_t top_logprobs;    /* ... with this many alternatives, [0, EKV_MAX_TOP_LOGPROBS] */
    bool prompt_logprobs;    /* ... and every prompt token's, from the same prefill (echo) */
    kvc_policy kv;           /* compression of the prompt's KV after prefill (zero: full), of
                              * the generated tokens' KV (kv.decode) and of key channels
                              * (kv.spark) */
} gen_params;

/* Called with each piece of text that is safe to show; return false to stop. */
typedef bool (*gen_text_fn)(void *ctx, const char *text, size_t len);

typedef struct gen_result {
    int32_t *ids;            /* generated token ids */
    int32_t n_ids;
    char *text;              /* generated text, stop string excluded */
    size_t text_len;
    gen_finish finish;
    int32_t prompt_tokens;
    double prefill_s;
    double decode_s;         /* from the first to the last generated token */
    int64_t kv_bytes;        /* KV the sequence held at the end, from the pool */
    int64_t kv_bytes_prompt; /* KV held right after the prompt (and its compression) */
    kvc_report compression;  /* zero for full KV */
    double grammar_s;        /* of decode_s, spent computing grammar masks */
    int64_t kv_bytes_peak;   /* the most KV held after any decode step (SCOPE keeps it bounded) */
    kvc_scope_stats scope;   /* zero without decode compression */
    kv_recall_stats recall;  /* zero without recall (kv.recall) */
} gen_result;

void gen_params_default(gen_params *p);
const char *gen_finish_name(gen_finish f);

/* Runs prompt (n_prompt ids) on a fresh sequence from kv; the sequence is
 * freed before returning. */
ekv_status gen_run(ekv_runtime *rt, kv_pool *kv, const int32_t *prompt, int32_t n_prompt,
                   const gen_params *p, gen_text_fn on_text, void *ctx, gen_result *out,
                   ekv_error *err);
/* Tensor parallelism (model_runtime_create_tp): rank 0 calls gen_run, every
 * other rank gen_follow with the same prompt and params on its own runtime
 * and KV pool (model_kv_pool_create_shard); rank 0 broadcasts each step's
 * plan and the followers run the same rows, returning when rank 0 is done.
 * SCOPE and recall run on every rank over its own heads. */
ekv_status gen_follow(ekv_runtime *rt, kv_pool *kv, const int32_t *prompt, int32_t n_prompt,
                      const gen_params *p, ekv_error *err);
void gen_result_free(gen_result *r);

double gen_now(void); /* monotonic seconds */

#endif
