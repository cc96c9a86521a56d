/*
 * engine_admit.c - what admission counts a request at (moved beside
 * engine.c's admit): the blocks a running sequence may still take and the
 * blocks admitting a queued one commits, with reserve_output_pct's share
 * of each request's completion at the size its KV policy leaves the prompt
 * (engine.h). All under the engine's mu, on the engine thread.
 */
#include "engine_internal.h"

/* The completion tokens admission keeps room for: reserve_output_pct of
 * what max_tokens (and the context) still allow q to generate. */
static int32_t reserved_output(const ekv_engine *e, const ereq *q)
{
    int64_t left = (int64_t)q->r.params.max_tokens - q->n_gen;
    if (left > (int64_t)e->cfg.max_ctx - q->n_tok)
        left = (int64_t)e->cfg.max_ctx - q->n_tok;
    return left > 0 ? (int32_t)(left * e->cfg.reserve_output_pct / 100) : 0;
}

/* Blocks q may still take from now on: its unfed tokens plus the reserved
 * completion; a prompt still to be compressed needs its whole prompt first
 * and then only its kept share plus the completion (one block per head of
 * slack: budgets differ between heads). */
static int64_t future_blocks(const ekv_engine *e, const ereq *q)
{
    const int32_t out = reserved_output(e, q);
    if (!q->seq)
        return engine_blocks_for(e, q->n_tok) + engine_blocks_for(e, out);
    const int64_t direct = kv_seq_blocks_needed(q->seq, q->n_tok - q->n_fed + out);
    if (!q->cap || out == 0)
        return direct;
    const int32_t n_after = q->kept_tokens + (q->n_tok - q->n_prompt) + out;
    const int64_t after =
        engine_blocks_for(e, n_after) + e->blocks_per_slot - kv_seq_blocks(q->seq);
    const int64_t prompt = kv_seq_blocks_needed(q->seq, q->n_prompt - q->n_fed);
    const int64_t peak = prompt > after ? prompt : after;
    return peak < direct ? peak : direct;
}

/* Blocks the running sequences may still take: future_blocks each, plus
 * one block per head each so every decode row finds room (under mu). */
int64_t engine_committed_blocks(const ekv_engine *e)
{
    int64_t need = (int64_t)e->n_running * e->blocks_per_slot;
    for (int32_t i = 0; i < e->n_running; i++) {
        const ereq *q = e->running[i];
        /* a follower to be forked: a copy of the shared last block and a
         * decode block, per head, and its own completion */
        need += (2 * e->blocks_per_slot + engine_blocks_for(e, reserved_output(e, q))) *
                q->n_followers;
        need += future_blocks(e, q);
    }
    return need;
}

/* What admitting q commits: its whole prompt (and tokens so far, after a
 * preemption), or with reserved completions the larger of that and its
 * compressed prompt plus completion. */
int64_t engine_admit_blocks(const ekv_engine *e, const ereq *q)
{
    const int32_t out = reserved_output(e, q);
    int64_t need = engine_blocks_for(e, q->n_tok);
    if (out > 0) {
        const int32_t kept = q->kept_tokens + (q->n_tok - q->n_prompt);
        const int64_t after = engine_blocks_for(e, kept + out) +
                              (kept < q->n_prompt ? e->blocks_per_slot : 0);
        const int64_t full = engine_blocks_for(e, q->n_tok + out);
        need = after > need ? after : need;
        need = need < full ? need : full;
    }
    return need + (2 * e->blocks_per_slot + engine_blocks_for(e, out)) * q->n_followers;
}
