/*
 * engine_internal.h - state shared by the step engine's two files, included
 * only by worker/engine*.c.
 *
 *   engine.c       the API, the request queue, admission, the engine thread,
 *                  finishing and preempting a sequence (everything that takes
 *                  the lock);
 *   engine_step.c  one step: build the batch, forward it, sample, stream text.
 *
 * Locking: e->mu guards the queue, the running list's membership, every
 * request's cancel flag, the counters and the published stats. Only the
 * engine thread changes the running list (under mu) and touches a request's
 * sequence state (tokens after submit, sampler, stopper, KV), so it reads
 * those without the lock.
 */
#ifndef ENTROKV_ENGINE_INTERNAL_H
#define ENTROKV_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "entrokv/engine.h"
#include "entrokv/tokenizer.h"

typedef struct ereq ereq;
typedef struct engine_tp engine_tp;

/* A follower's KV pool holds this many times rank 0's tokens per head
 * (engine_tp.c: per-head budgets can give its heads more than rank 0's). */
#define ENGINE_TP_POOL_HEADROOM 2

/* One accepted request, from engine_submit to its on_done. */
struct ereq {
    uint64_t id;
    ereq *prev, *next;     /* queue or local list links */
    engine_request r;      /* prompt and stops point nowhere: see below */
    int32_t *tokens;       /* prompt, then generated ids; capacity cap_tokens */
    int32_t cap_tokens;
    int32_t n_prompt;
    int32_t n_tok;         /* prompt + generated so far */
    int32_t n_gen;         /* generated (emitted) tokens */
    int32_t n_fed;         /* tokens whose K/V are in seq (0 after preemption) */
    int32_t n_restored;    /* of those, restored from the prefix cache */
    void *restore_job;     /* the prefix cache is fetching its prefix: no rows yet */
    bool prompt_saved;     /* the prompt's KV went to the prefix cache */
    int32_t rows;          /* rows in the batch being built */
    int32_t lp_rows;       /* of those, rows whose logits score a prompt token (echo) */
    int32_t n_scored;      /* prompt tokens whose log-probabilities went out (echo) */
    ekv_logit_bias *bias;  /* the request's logit_bias, copied at submit */
    int32_t preemptions;
    int32_t kept_tokens;   /* mean tokens per head its KV policy keeps of the prompt */
    ekv_sampler *sampler;  /* made at first admission, kept across preemption */
    ekv_stopper *stopper;  /* owns copies of the stop strings; NULL: none */
    grammar_state *gs;     /* structured output: where it is in the schema; NULL: none */
    tok_stream ts;
    kv_seq *seq;           /* NULL while queued */
    kvc_capture *cap;      /* until the prompt is compressed */
    kvc_scope *scope;      /* SCOPE decode compression, from the prompt's end; NULL: none */
    int64_t saved_tokens, saved_channels; /* bytes the prompt's token policy and SparK freed */
    bool cancel;           /* engine_cancel asked (under mu) */
    bool started;          /* admitted at least once */
    int32_t choice;        /* which of the request's n choices (engine_request.n) */
    ereq *followers;       /* choices 1..n-1 until the prompt is in: then forked */
    int32_t n_followers;
    ereq *fnext;           /* next in a leader's followers */
    double t_submit, t_sched, t_first;
};

struct ekv_engine {
    const ekv_model *m;
    engine_config cfg;
    ekv_runtime *rt;
    kv_pool *pool;
    int32_t n_vocab;
    int64_t blocks_per_slot; /* blocks one token takes over all (layer, KV head) */

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* the engine thread waits for work */
    pthread_cond_t done_cv; /* engine_drain waits for requests to finish */

    /* under mu */
    ereq *q_head, *q_tail;  /* waiting; preempted requests go back to the head */
    int32_t n_queued;
    ereq *cancelled;        /* cancelled while queued, awaiting on_done */
    ereq **running;         /* admission order, oldest first */
    int32_t n_running;
    int64_t n_open;         /* accepted, on_done not yet returned */
    uint64_t next_id;
    bool draining, stopping;
    uint64_t kicks;         /* work_cv signals so far (engine_kick_locked) */
    bool pins_released;     /* a copy let go of pool blocks: kv_pool_reap them */
    bool restore_wait;      /* the last step had nothing to run but restores... */
    uint64_t restore_wait_kicks; /* ...and saw this many kicks before looking */
    engine_stats stats;     /* kv_bytes_saved, preemptions, steps, pool blocks */

    /* engine thread only: per-step scratch */
    int32_t *b_tokens, *b_pos;
    kv_seq **b_seqs;
    uint8_t *b_want;
    ereq **b_reqs;          /* requests with rows in the batch, row order */
    int32_t n_b_reqs;
    ereq **scratch_reqs;    /* max_running */
    float *logits;          /* logits_rows rows of n_vocab (max_running, more with echo) */
    float *fork_logits;     /* n_vocab: a follower's copy of its leader's last row */
    int32_t logits_rows;
    ekv_logprob *lp_buf;    /* ENGINE_ECHO_CHUNK + 1 entries (engine_step.c) */
    const model_tap **taps; /* the captures' taps of this batch's sequences */
    int32_t n_taps;
    model_tap tap;          /* calls each of taps[] (the batch's one tap) */
    uint8_t *b_probe;       /* per row: a SCOPE sequence's decode row (model_probe) */
    ereq **b_rowq;          /* per row: its request */
    model_probe probe;      /* hands each probed row's attention to its request's scope */
    char *piece, *safe;     /* detokenised text, and after the stop strings */
    size_t piece_cap, safe_cap;
    ekv_grammar_vocab *gvocab; /* token bytes for grammar masks, built at the first use */

    /* tensor parallelism (engine_tp.c): NULL for one rank */
    engine_tp *tp;
    bool on_cpu;            /* the runtime's forward is the CPU's (else SCOPE, recall, SparK refused) */
    bool tp_broken;         /* under mu: a collective failed; the group serves nothing more */
    char tp_why[640];       /* why (written once, under mu, before tp_broken is set) */
};

/* ---- engine_request.c ---- */

/* EKV_EINVAL / EKV_ERANGE / EKV_EUNSUPPORTED for a request engine_submit
 * must refuse (any thread; reads only e's config and model). */
ekv_status engine_request_check(const ekv_engine *e, const engine_request *r, ekv_error *err);

/* ---- engine.c (engine thread) ---- */

/* Flushes held-back text (unless failed or stopped), frees the KV, removes q
 * from the running list, calls on_done and frees q. */
void engine_finish(ekv_engine *e, ereq *q, gen_finish finish, ekv_status rc, const char *msg);
/* Frees q's KV and capture and puts it back at the head of the queue to be
 * recomputed from prompt + generated tokens. */
void engine_preempt(ekv_engine *e, ereq *q);
/* q's restore has landed with n_restored prompt tokens in its KV (0: none):
 * the rest of the prompt is to be prefilled. False when q was finished. */
bool engine_prompt_start(ekv_engine *e, ereq *q, int32_t n_restored);
/* Wakes the engine thread (under mu): new work, or a restore landed. */
void engine_kick_locked(ekv_engine *e);
/* Publishes the pool's free blocks and bumps the step counter. */
void engine_note_step(ekv_engine *e);
/* Publishes the pool's free and shared blocks and copies (under mu). */
void engine_publish_locked(ekv_engine *e);

/* ---- engine_step.c (engine thread) ---- */

/* Allocates the per-step scratch; EKV_ENOMEM. */
ekv_status engine_scratch_init(ekv_engine *e, ekv_error *err);
void engine_scratch_free(ekv_engine *e);
/* One batched forward over the running sequences, then sampling. */
void engine_step(ekv_engine *e);
/* Emits the text the detokenizer and stopper still hold; *stopped when that
 * tail completes a stop string. */
ekv_status engine_flush_text(ekv_engine *e, ereq *q, bool *stopped, ekv_error *err);
/* Blocks the pool needs for n tokens of a fresh sequence. */
int64_t engine_blocks_for(const ekv_engine *e, int32_t n);
/* engine_admit.c: blocks the running sequences may still take, and what
 * admitting q commits (under mu). */
int64_t engine_committed_blocks(const ekv_engine *e);
int64_t engine_admit_blocks(const ekv_engine *e, const ereq *q);
/* q's sampler and grammar state, made once and kept across preemption. */
ekv_status engine_sampling_setup(ekv_engine *e, ereq *q, ekv_error *err);
/* q's prompt is in its KV (compressed) and logits holds its last row: gives
 * each follower a fork of q's KV and its own sampler, puts it in the running
 * list and samples its first token from a copy of logits. */
void engine_fork_choices(ekv_engine *e, ereq *q, const float *logits);
/* Samples q's next token from logits (changed in place) and applies the
 * finish rules; q may be finished on return. */
void engine_sample_next(ekv_engine *e, ereq *q, float *logits);

/* ---- engine_tp.c (engine thread): rank 0 of a tensor-parallel group ---- */

ekv_status engine_tp_create(ekv_engine *e, struct ekv_comm *comm, ekv_error *err);
void engine_tp_free(ekv_engine *e);
/* The runtime's shard (NULL without TP). */
const model_shard *engine_tp_shard(const ekv_engine *e);
/* Logs that s was created / forked from parent / is about to be freed, for
 * the followers to mirror at the next plan. No-ops without TP. */
ekv_status engine_tp_seq_new(ekv_engine *e, kv_seq *s, ekv_error *err);
ekv_status engine_tp_seq_fork(ekv_engine *e, const kv_seq *parent, kv_seq *s, ekv_error *err);
void engine_tp_seq_gone(ekv_engine *e, const kv_seq *s);
/* s's compression capture (kvc_capture_create, or the shard's under TP,
 * logged for the followers). */
kvc_capture *engine_tp_capture(ekv_engine *e, const kv_seq *s, const kvc_policy *p,
                               int32_t n_prompt, int32_t pos0, ekv_error *err);
/* Logs s's SCOPE (made once its prompt is in): each rank evicts its own
 * heads' decode tokens (SCOPE's choices are per head: nothing exchanged). */
ekv_status engine_tp_scope(ekv_engine *e, const kv_seq *s, const kvc_decode_policy *d,
                           int32_t max_new, ekv_error *err);
/* Broadcast the plan before a collective of rank 0: the batch's forward, a
 * compression of s. EKV_EUNAVAILABLE once the group is broken. */
ekv_status engine_tp_step(ekv_engine *e, const model_batch *b, ekv_error *err);
ekv_status engine_tp_compress(ekv_engine *e, const kv_seq *s, ekv_error *err);
/* The KV store tier (docs/tp.md, "The KV store tier"): logs s's save of
 * tokens[0, n) from block first_block on, which every follower makes of its
 * own heads when it applies the plan (before the next forward or
 * compression). No-op without TP. */
ekv_status engine_tp_save(ekv_engine *e, const kv_seq *s, const int32_t *tokens, int32_t n,
                          int32_t first_block, ekv_error *err);
/* Rank 0 restored got tokens (block-aligned, > 0) of tokens into s: every
 * follower restores the same prefix of its own heads, the ranks allgather
 * what each holds and every rank keeps the least (s cut back to it).
 * Returns the tokens kept (0: every rank recomputes the prompt), or -1
 * (err set) when the group broke. Without TP: got. */
int32_t engine_tp_restore(ekv_engine *e, kv_seq *s, const int32_t *tokens, int32_t got,
                          ekv_error *err);
/* Idle: a ping and a barrier (finds a dead rank; keeps followers waiting). */
void engine_tp_ping(ekv_engine *e);
int engine_tp_heartbeat_ms(const ekv_engine *e);
/* The last plan: the followers free what is left and return. */
void engine_tp_end(ekv_engine *e);
/* Marks the group broken (once; why is kept for the errors that follow). */
void engine_tp_break(ekv_engine *e, const char *why);

#endif
