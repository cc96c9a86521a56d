/*
 * engine.h - the step engine of one worker group: continuous batching of
 * many sequences over one runtime and one KV pool, on its own thread.
 *
 * Each step the engine builds one model_batch from (a) one decode row for
 * every running sequence and (b) prefill chunks of admitted sequences, up to
 * max_batch rows, so decode rows share each weight read. A request is
 * admitted when the pool has blocks for its prompt plus a reserve; when the
 * pool runs out mid-decode the newest running sequence is preempted (its KV
 * freed, its request re-queued to be recomputed from prompt + tokens so far),
 * so a request never fails because others are running. A sequence's KV is
 * freed the moment it finishes or is cancelled. With a compression policy
 * the prompt's KV is compressed right after its prefill (compress.h).
 *
 * Greedy results do not depend on what else is in the batch: every kernel is
 * batch-invariant (kernels.h), so a request's tokens equal gen_run's for it
 * alone. That holds across preemption too: the recomputed last row gives the
 * logits the interrupted decode step would have, and the request keeps its
 * sampler (RNG stream included), detokenizer and stopper, so seeded sampling
 * continues as if never interrupted and nothing streamed is sent twice.
 *
 * Memory: a request whose prompt needs more blocks than the whole pool fails
 * with EKV_ENOMEM (on_done). A sequence running alone that fills the whole
 * pool ends with GEN_FINISH_CONTEXT: the pool is then its context.
 *
 * Threading: engine_submit/cancel/stats/drain may be called from any thread.
 * Callbacks run on the engine thread, without the engine's lock, and must
 * not block or call back into the engine except engine_cancel and
 * engine_stats_get (engine_drain or engine_destroy there would deadlock).
 */
#ifndef ENTROKV_ENGINE_H
#define ENTROKV_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/compress.h"
#include "entrokv/generate.h"
#include "entrokv/model.h"
#include "entrokv/status.h"

typedef struct ekv_engine ekv_engine;

/*
 * An optional store of prompt KV (the KV store tier: kvprefix.h), called on
 * the engine thread. When a request is scheduled, restore_start asks for the
 * longest stored prefix of its prompt (at most max_tokens, leaving the
 * observation window to be computed) and returns a job, or NULL when there
 * is nothing to ask for; the engine goes on stepping the other sequences
 * while the store works, and wake(wake_arg) (on the store's thread, must not
 * block) tells it the job is ready. restore_finish puts the restored prefix
 * into the empty seq and returns its tokens; only the rest is prefilled. It
 * may instead return a negative value: the job goes on (kvprefix reserves
 * seq's blocks and fills them on its own thread), seq's KV must not be
 * touched, and the engine calls restore_finish again once ready (woken
 * again by wake).
 * With seq NULL it discards the job (the request was cancelled or
 * preempted); it may wait for the store, bounded by its op timeout. When a
 * prompt's prefill completes, before compression, save offers its full KV
 * (blocks below first_block came from the store already); it must not copy
 * it on the engine thread (kvprefix pins the blocks, kv_seq_pin, and copies
 * them on its own thread): the engine gives released pins' blocks back to
 * its pool (kv_pool_reap) when the pool's release hook wakes it.
 */
typedef struct engine_prefix_cache {
    void *(*restore_start)(void *ctx, const int32_t *tokens, int32_t n, int32_t max_tokens,
                           void (*wake)(void *), void *wake_arg);
    bool (*restore_ready)(void *ctx, void *job);
    int32_t (*restore_finish)(void *ctx, void *job, kv_seq *seq);
    void (*save)(void *ctx, const kv_seq *seq, const int32_t *tokens, int32_t n,
                 int32_t first_block);
    void *ctx;
    /* Optional, tensor parallelism (docs/tp.md, "The KV store tier"): on
     * rank 0 after the ranks agreed on a restore, held[r] the tokens rank r
     * restored (its shard of the prefix in its store), agreed the tokens
     * every rank keeps (the least of them; 0: every rank recomputes). */
    void (*tp_agreed)(void *ctx, const int32_t *held, int32_t n_ranks, int32_t agreed);
} engine_prefix_cache;

/* engine_config.prefill_chunk's default (measured in docs/serving.md,
 * "Prefill chunk"). */
#define ENGINE_PREFILL_CHUNK 64

typedef struct engine_config {
    int n_threads;        /* <= 0: one per core */
    int32_t max_batch;    /* rows per forward: decode rows + prefill chunk */
    /* prefill rows per step while any sequence decodes (0: up to max_batch):
     * bounds how long a step, and so one token of every stream, waits
     * behind other requests' prompts; a step without decode rows fills
     * max_batch */
    int32_t prefill_chunk;
    int32_t max_ctx;      /* tokens of one sequence (prompt + generated) */
    int32_t kv_tokens;    /* pool size: tokens per head over all sequences */
    int32_t max_running;  /* sequences in the batch at once; <= max_batch */
    int32_t max_queued;   /* waiting requests; engine_submit says EKV_EBUSY beyond */
    /* 0..100: percent of every sequence's remaining completion (max_tokens,
     * at its policy's compressed size) that admission keeps free for it.
     * 0 (the default): admission counts only the prompt and one decode
     * block, and a pool that runs out preempts (recompute); 100: requests
     * that run to max_tokens are never preempted, at the price of fewer
     * running at once when they end early (docs/COMPRESSION.md,
     * "Memory-bound serving") */
    int32_t reserve_output_pct;
    const engine_prefix_cache *prefix_cache; /* NULL: none; must outlive the engine */
    /* NULL: none; else the recall stores of the engine's sequences attach
     * to it (kvrecall_tier.h: a host cap, the daemon behind it, counters);
     * must outlive the engine */
    struct kv_recall_tier *recall_tier;
    /* Tensor parallelism (docs/tp.md, "A worker group"): NULL for one rank;
     * else rank 0 of a group (borrowed, outlives the engine): the engine
     * runs the rank's shard and broadcasts each step's plan to ranks
     * 1..N-1, which run engine_tp_follow with the same config, except
     * prefix_cache: each rank its own (a kvprefix of its rank over the same
     * store; the plan carries the saves, and a restore is kept only as far
     * as every rank has its shard). Recall runs on every rank over its own
     * heads; a
     * recall_tier is rank 0's alone (its counters are rank 0's share) and
     * must not spill to a backend: the followers have none. */
    struct ekv_comm *tp_comm;
    /* idle rank 0 pings the group this often (ms; <= 0: 1000); keep it well
     * below the communicator's timeout */
    int32_t tp_heartbeat_ms;
    /* NULL: the CPU forward (model_runtime_create_tp). Else the engine's
     * runtime comes from this call (on the engine_create caller's thread;
     * the engine owns and frees it; it sizes itself from cfg: max_batch,
     * max_ctx, kv_tokens for a device's KV), e.g. one whose forward runs on a GPU
     * (model_cuda.h; the CLI's --device cuda). Not with tp_comm. The
     * engine then refuses requests the runtime's device cannot serve
     * (model_runtime_device != "cpu": SCOPE, recall and SparK, EKV_EUNSUPPORTED
     * at submit, docs/cuda.md). */
    ekv_runtime *(*runtime_create)(const ekv_model *m, const struct engine_config *cfg,
                                   void *arg, ekv_error *err);
    void *runtime_arg;
} engine_config;

/* n_threads 0, max_batch 256, prefill_chunk 64, max_ctx 2048, kv_tokens 8192,
 * max_running 32, max_queued 256. */
void engine_config_default(engine_config *c);

typedef struct engine_usage {
    int32_t prompt_tokens;
    int32_t completion_tokens;
    int64_t kv_bytes;        /* KV held by the sequence at its end (after compression) */
    int64_t kv_bytes_full;   /* what full KV would have held for the same tokens */
    /* of kv_bytes_full - kv_bytes, what each mechanism freed: the prompt's
     * token policy, SparK's channel pruning, SCOPE's decode eviction */
    int64_t kv_bytes_saved_tokens;
    int64_t kv_bytes_saved_channels;
    int64_t kv_bytes_saved_decode;
    double queue_s;          /* submit to first scheduled (to the end if never) */
    double ttft_s;           /* submit to first token sampled; 0 if none */
    int32_t preemptions;     /* times its KV was dropped and recomputed */
} engine_usage;

typedef struct engine_request {
    const int32_t *prompt;   /* copied by engine_submit */
    int32_t n_prompt;
    gen_params params;       /* stops copied */
    kvc_policy kv;           /* KVC_FULL for none; kv.profile must outlive the request */
    /* New tokens and the text that became safe to show (may be empty); at the
     * end, the text held back for UTF-8 and stop strings comes with ids NULL,
     * n 0. Ids are those gen_run returns (a stop string's last token
     * included, an end-of-generation token not). */
    void (*on_tokens)(void *ctx, const int32_t *ids, int32_t n, const char *text, size_t len);
    /* NULL, or with params.logprobs: each sampled token's log-probability,
     * just before the on_tokens that carries it, and last the
     * end-of-generation token's that ends a request (which on_tokens does
     * not report: vLLM and llama.cpp report it too, and lm-evaluation-
     * harness counts on max_tokens entries after the prompt); prompt true:
     * with params.prompt_logprobs, the prompt's tokens in order as their
     * prefill chunks complete, the first with logprob NaN (nothing predicts
     * it). All before the first generated token's. */
    void (*on_logprobs)(void *ctx, const ekv_logprob *lp, int32_t n, bool prompt);
    /* Exactly once per accepted request, last, after its KV is freed. rc !=
     * EKV_OK: failed (msg says why); on success msg is "" (or NULL). */
    void (*on_done)(void *ctx, gen_finish finish, const engine_usage *u, ekv_status rc,
                    const char *msg);
    void *ctx;               /* passed to both; valid until on_done returns */
    /* n choices (0 or 1: one): n continuations of the one prompt. The prompt
     * is prefilled and compressed once, as one sequence; then its KV is
     * forked (kv_seq_fork: the blocks are shared, copy-on-write) into n
     * sequences that decode on their own. Choice i samples with seed
     * params.sampling.seed + i and its callbacks get ctx choice_ctx[i] (n
     * pointers, read at submit; required when n > 1, each valid until its
     * own on_done returns, which comes once per choice). All n share the id
     * engine_submit gives: engine_cancel ends them all. n <= max_running;
     * not with params.prompt_logprobs. A preempted choice is recomputed
     * alone from prompt + its own tokens. */
    int32_t n;
    void *const *choice_ctx;
} engine_request;

typedef struct engine_stats {
    int32_t queued;
    int32_t running;
    int64_t kv_blocks_total;
    int64_t kv_blocks_free;
    int64_t kv_bytes_saved;      /* sum over finished sequences of full - held */
    int64_t kv_bytes_saved_tokens;   /* ... of which by token policies, */
    int64_t kv_bytes_saved_channels; /* SparK, */
    int64_t kv_bytes_saved_decode;   /* SCOPE */
    uint64_t preemptions;
    uint64_t steps;
    int64_t kv_blocks_shared;    /* pool blocks held by more than one sequence (n > 1) */
    uint64_t kv_cow_copies;      /* blocks copied on write since the start */
    /* recall (with a recall tier): blocks and bytes that joined attention,
     * top-R blocks skipped as late, promotions, blocks spilled to the tier,
     * (row, layer, KV head) rankings run */
    int64_t recall_blocks, recall_bytes, recall_deadline_misses, recall_promotions;
    int64_t recall_spilled_blocks, recall_rankings;
    /* 1: a tensor-parallel group whose communicator failed (a rank died or
     * stopped answering): every request fails with EKV_EUNAVAILABLE */
    int32_t tp_broken;
} engine_stats;

/* m must outlive the engine; cfg NULL: defaults. EKV_EINVAL for a bad config. */
ekv_engine *engine_create(const ekv_model *m, const engine_config *cfg, ekv_error *err);
/* Cancels everything still queued or running (on_done with
 * GEN_FINISH_CANCELLED), joins the engine thread, frees everything. The
 * last call on e: no other may be in progress (engine_drain included). */
void engine_destroy(ekv_engine *e);

/* Validates and queues r. EKV_EINVAL/EKV_ERANGE for a bad request (empty
 * prompt, prompt + 1 > max_ctx, negative max_tokens, bad sampling params,
 * stop strings, token ids or kv policy), EKV_EBUSY
 * when the queue is full or the engine is draining. On success *id names the
 * request and on_done will be called exactly once. */
ekv_status engine_submit(ekv_engine *e, const engine_request *r, uint64_t *id, ekv_error *err);
/* Asks the request to stop; its KV is freed at the next step and on_done
 * follows with GEN_FINISH_CANCELLED (a queued request leaves the queue at
 * once). Unknown or finished ids are ignored; a request that finishes in
 * the step during which it is cancelled reports its own finish. */
void engine_cancel(ekv_engine *e, uint64_t id);
void engine_stats_get(ekv_engine *e, engine_stats *s);
/* Stops admitting new requests and returns once every accepted one is done. */
void engine_drain(ekv_engine *e);

/* Rank comm_rank(comm) > 0 of a tensor-parallel group whose rank 0 runs an
 * engine with cfg->tp_comm (cfg: the same values as rank 0's): mirrors rank
 * 0's steps on this rank's shard until rank 0's engine is destroyed
 * (EKV_OK) or the group fails (EKV_EUNAVAILABLE; EKV_EFORMAT for a
 * malformed plan; a local failure's code). On an error the caller must
 * break the group (comm_threads_group_abort, or end the process) so rank 0
 * does not wait on this rank. profile: the UNComp profile rank 0's requests
 * may name (NULL: none). cfg->prefix_cache: this rank's own (NULL: none; its
 * restores then miss, so rank 0's recompute). Blocks; runs on the caller's
 * thread. */
ekv_status engine_tp_follow(const ekv_model *m, const engine_config *cfg, struct ekv_comm *comm,
                            const kvc_profile *profile, ekv_error *err);

#endif
