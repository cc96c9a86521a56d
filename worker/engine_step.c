/*
 * engine_step.c - one step of the engine: a batch of decode rows and prefill
 * chunks over the running sequences, one model_forward, then per sequence
 * what generate.c's loop does for one: sample, detokenise, stop strings,
 * finish checks.
 *
 * Row order: one decode row per decoding sequence first (oldest admission
 * first), then prefill chunks in admission order in the rows left, at most
 * prefill_chunk of them while there are decode rows (chunked prefill, as
 * Sarathi-Serve and vLLM do), so decode latency does not wait behind long
 * prompts. Chunk boundaries change nothing: the kernels are batch-invariant
 * and a capture records each prompt row by its position (test_prefill_chunk).
 * A sequence's next rows are always tokens[n_fed..]: the prompt at first,
 * prompt + generated tokens after a preemption; the row reaching n_tok
 * wants logits. A sequence with a compression capture stops its chunks at
 * the prompt's end and is compressed right after that forward, before any
 * generated token enters its cache.
 *
 * Memory: decode rows are served first; while the pool cannot hold them the
 * newest running sequence is preempted (engine.c). Prefill chunks are cut to
 * the blocks left. If nothing at all can run, the newest is preempted too.
 */
#include "engine_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TEXT_CAP 8192
/* Prefill rows per step of a request that scores its prompt (echo with
 * logprobs): each wants its logits, so this bounds the logits buffer. */
#define ENGINE_ECHO_CHUNK 64

int64_t engine_blocks_for(const ekv_engine *e, int32_t n)
{
    const int64_t bt = kv_pool_block_tokens(e->pool);
    return e->blocks_per_slot * (((int64_t)n + bt - 1) / bt);
}

/* The batch's one tap: every capture sees the whole batch and keeps only
 * its own sequence's rows. */
static void dispatch_tap(void *ctx, int32_t layer, const model_batch *b, const float *q)
{
    const ekv_engine *e = ctx;
    for (int32_t i = 0; i < e->n_taps; i++)
        e->taps[i]->fn(e->taps[i]->ctx, layer, b, q);
}

/* The batch's probe: a SCOPE sequence's decode row goes to its scope. */
static void dispatch_probe(void *ctx, int32_t layer, int32_t row, int32_t kv_head,
                           const float *logits, const float *probs, int32_t n_q, int32_t n_tokens)
{
    const ekv_engine *e = ctx;
    ereq *q = e->b_rowq[row];
    kvc_scope_observe(q->scope, q->seq, layer, kv_head, logits, probs, n_q, n_tokens);
}

ekv_status engine_scratch_init(ekv_engine *e, ekv_error *err)
{
    const size_t B = (size_t)e->cfg.max_batch, R = (size_t)e->cfg.max_running;
    const size_t min_cap = tok_stream_min_cap(model_tokenizer(e->m));
    e->piece_cap = min_cap > TEXT_CAP ? min_cap : TEXT_CAP;
    e->safe_cap = e->piece_cap + EKV_STOPPER_HOLD_MAX;
    e->b_tokens = malloc(B * sizeof *e->b_tokens);
    e->b_pos = malloc(B * sizeof *e->b_pos);
    e->b_seqs = malloc(B * sizeof *e->b_seqs);
    e->b_want = malloc(B);
    e->b_reqs = malloc(R * sizeof *e->b_reqs);
    e->scratch_reqs = malloc(R * sizeof *e->scratch_reqs);
    e->logits = malloc(R * (size_t)e->n_vocab * sizeof *e->logits);
    e->fork_logits = malloc((size_t)e->n_vocab * sizeof *e->fork_logits);
    e->logits_rows = (int32_t)R;
    e->lp_buf = malloc((ENGINE_ECHO_CHUNK + 1) * sizeof *e->lp_buf);
    e->taps = malloc(R * sizeof *e->taps);
    e->piece = malloc(e->piece_cap);
    e->safe = malloc(e->safe_cap);
    e->tap.fn = dispatch_tap;
    e->tap.ctx = e;
    e->b_probe = calloc(B, 1);
    e->b_rowq = malloc(B * sizeof *e->b_rowq);
    e->probe = (model_probe){.rows = e->b_probe, .fn = dispatch_probe, .ctx = e};
    if (!e->b_probe || !e->b_rowq)
        return ekv_error_set(err, EKV_ENOMEM, "engine: out of memory for step buffers");
    if (!e->b_tokens || !e->b_pos || !e->b_seqs || !e->b_want || !e->b_reqs ||
        !e->scratch_reqs || !e->logits || !e->fork_logits || !e->lp_buf || !e->taps || !e->piece || !e->safe)
        return ekv_error_set(err, EKV_ENOMEM, "engine: out of memory for step buffers");
    return EKV_OK;
}

void engine_scratch_free(ekv_engine *e)
{
    free(e->b_tokens);
    free(e->b_pos);
    free(e->b_seqs);
    free(e->b_want);
    free(e->b_reqs);
    free(e->scratch_reqs);
    free(e->logits);
    free(e->fork_logits);
    free(e->lp_buf);
    free(e->taps);
    free(e->b_probe);
    free(e->b_rowq);
    free(e->piece);
    free(e->safe);
}

/* ---- text ---- */

/* Passes text through q's stop strings, then to on_tokens with ids. */
static ekv_status emit(ekv_engine *e, ereq *q, const int32_t *ids, int32_t n_ids,
                       const char *text, size_t len, bool *stopped, ekv_error *err)
{
    if (q->stopper) {
        size_t n_out = 0;
        ekv_status rc =
            stopper_feed(q->stopper, text, len, e->safe, e->safe_cap, &n_out, stopped, err);
        if (rc)
            return rc;
        text = e->safe;
        len = n_out;
    }
    if (q->r.on_tokens && (n_ids > 0 || len > 0))
        q->r.on_tokens(q->r.ctx, ids, n_ids, text, len);
    return EKV_OK;
}

ekv_status engine_flush_text(ekv_engine *e, ereq *q, bool *stopped, ekv_error *err)
{
    const size_t n = tok_stream_flush(&q->ts, e->piece, e->piece_cap);
    ekv_status rc = emit(e, q, NULL, 0, e->piece, n, stopped, err);
    if (rc || *stopped || !q->stopper)
        return rc;
    size_t n_tail = 0;
    if ((rc = stopper_flush(q->stopper, e->safe, e->safe_cap, &n_tail, err)))
        return rc;
    if (q->r.on_tokens && n_tail > 0)
        q->r.on_tokens(q->r.ctx, NULL, 0, e->safe, n_tail);
    return EKV_OK;
}

/* ---- building the batch ---- */

static bool is_decode(const ereq *q)
{
    return q->n_tok - q->n_fed == 1 && !q->restore_job;
}

/* Frees memory: preempts the newest running sequence. One alone that still
 * does not fit holds the whole pool: that is its context limit. */
static void relieve(ekv_engine *e)
{
    ereq *victim = e->running[e->n_running - 1];
    if (e->n_running > 1)
        engine_preempt(e, victim);
    else if (victim->n_gen > 0)
        engine_finish(e, victim, GEN_FINISH_CONTEXT, EKV_OK, "");
    else
        engine_finish(e, victim, GEN_FINISH_LENGTH, EKV_ENOMEM, "the KV pool cannot hold the prompt");
}

/* Preempts until the pool holds one more token of every decoding sequence;
 * returns the blocks those rows take. */
static int64_t make_room_for_decode(ekv_engine *e)
{
    for (;;) {
        int64_t need = 0;
        for (int32_t i = 0; i < e->n_running; i++)
            if (is_decode(e->running[i]))
                need += kv_seq_blocks_needed(e->running[i]->seq, 1);
        if (need <= kv_pool_free_blocks(e->pool))
            return need;
        relieve(e);
    }
}

/* The most rows, up to want, of q that free_left blocks can hold. */
static int32_t fit_rows(const ereq *q, int32_t want, int64_t free_left)
{
    if (kv_seq_blocks_needed(q->seq, want) <= free_left)
        return want;
    int32_t lo = 0, hi = want; /* lo fits, hi does not */
    while (hi - lo > 1) {
        const int32_t mid = lo + (hi - lo) / 2;
        if (kv_seq_blocks_needed(q->seq, mid) <= free_left)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Whether q still has prompt tokens to score (echo with logprobs). */
static bool scoring(const ereq *q)
{
    return q->r.params.prompt_logprobs && q->r.on_logprobs && q->n_scored < q->n_prompt;
}

/* Appends rows tokens[n_fed, n_fed + rows) of q at row *n. Under echo, the
 * row at position p also wants its logits while they score prompt token
 * p + 1 and it has not been scored yet (a recomputed row is not again). */
static void add_rows(ekv_engine *e, ereq *q, int32_t rows, int32_t *n)
{
    const bool score = scoring(q);
    q->lp_rows = 0;
    for (int32_t i = 0; i < rows; i++) {
        const int32_t p = q->n_fed + i;
        e->b_tokens[*n + i] = q->tokens[p];
        e->b_pos[*n + i] = p;
        e->b_seqs[*n + i] = q->seq;
        e->b_want[*n + i] = score && p + 1 < q->n_prompt && p + 1 >= q->n_scored;
        q->lp_rows += e->b_want[*n + i];
    }
    for (int32_t i = 0; i < rows; i++) { /* a scope sequence runs one row a step */
        e->b_probe[*n + i] = q->scope != NULL;
        e->b_rowq[*n + i] = q;
    }
    if (q->n_fed + rows == q->n_tok)
        e->b_want[*n + rows - 1] = 1;
    *n += rows;
    q->rows = rows;
    e->b_reqs[e->n_b_reqs++] = q;
    const model_tap *t = q->cap ? kvc_capture_tap(q->cap, q->seq) : NULL;
    if (t)
        e->taps[e->n_taps++] = t;
}

/* Prefill rows q would take now: the rest of its tokens, or of its prompt
 * while a capture waits for the prompt's end. */
static int32_t prefill_want(const ereq *q, int32_t budget)
{
    if (q->restore_job)
        return 0; /* its prefix is still on the way */
    int32_t want = q->n_tok - q->n_fed;
    if (q->cap && q->n_prompt - q->n_fed < want)
        want = q->n_prompt - q->n_fed;
    /* SCOPE starts at the prompt's end and sees each generated token's step
     * alone: after a preemption they are replayed one row at a time, as
     * they were decoded */
    if (q->r.kv.decode.mode != KVC_DECODE_NONE)
        want = q->n_fed < q->n_prompt ? (q->n_prompt - q->n_fed < want ? q->n_prompt - q->n_fed
                                                                       : want)
                                      : (want < 1 ? want : 1);
    if (scoring(q) && want > ENGINE_ECHO_CHUNK)
        want = ENGINE_ECHO_CHUNK;
    return want < budget ? want : budget;
}

static bool restoring(const ekv_engine *e)
{
    for (int32_t i = 0; i < e->n_running; i++)
        if (e->running[i]->restore_job)
            return true;
    return false;
}

/* Puts the prefixes that have arrived from the prefix cache into their
 * sequences. When nothing else can run, engine.c sleeps until the next
 * kick; `kicks` is read before looking, so a landing in between is not
 * missed. */
static void settle_restores(ekv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    const uint64_t kicks = e->kicks;
    pthread_mutex_unlock(&e->mu);
    const engine_prefix_cache *pc = e->cfg.prefix_cache;
    for (int32_t i = e->n_running - 1; i >= 0; i--) { /* finishing one shifts later ones */
        ereq *q = e->running[i];
        if (!q->restore_job || !pc->restore_ready(pc->ctx, q->restore_job))
            continue;
        int32_t got = pc->restore_finish(pc->ctx, q->restore_job, q->seq);
        if (got < 0)
            continue; /* its blocks are being filled off this thread: ready again later */
        q->restore_job = NULL;
        ekv_error err = {0};
        /* TP: kept only as far as every rank has its shard */
        if ((got = engine_tp_restore(e, q->seq, q->tokens, got, &err)) < 0)
            engine_finish(e, q, GEN_FINISH_LENGTH, err.code ? err.code : EKV_EUNAVAILABLE,
                          err.msg);
        else
            engine_prompt_start(e, q, got);
    }
    e->restore_wait_kicks = kicks;
}

/* Fills the batch; returns its rows (0 when nothing runs any more, or
 * nothing can run until a restore lands). */
static int32_t build_batch(ekv_engine *e)
{
    for (;;) {
        e->n_b_reqs = 0;
        e->n_taps = 0;
        int64_t free_left = kv_pool_free_blocks(e->pool) - make_room_for_decode(e);
        int32_t n = 0;
        for (int32_t i = 0; i < e->n_running; i++)
            if (is_decode(e->running[i]))
                add_rows(e, e->running[i], 1, &n);
        /* beside decode rows, prompts get prefill_chunk rows: a step's time,
         * every stream's next token, grows with its rows */
        int32_t limit = e->cfg.max_batch;
        if (n > 0 && e->cfg.prefill_chunk > 0 && e->cfg.prefill_chunk < limit - n)
            limit = n + e->cfg.prefill_chunk;
        for (int32_t i = 0; i < e->n_running && n < limit; i++) {
            ereq *q = e->running[i];
            if (is_decode(q))
                continue;
            const int32_t rows = fit_rows(q, prefill_want(q, limit - n), free_left);
            if (rows == 0)
                continue;
            free_left -= kv_seq_blocks_needed(q->seq, rows);
            add_rows(e, q, rows, &n);
        }
        if (n > 0 || e->n_running == 0 || restoring(e))
            return n; /* nothing to run until a restore lands: engine.c waits for it */
        relieve(e);
    }
}

/* ---- after the forward ---- */

/* Structured output: sets the logits of the tokens q's grammar does not
 * allow to -inf. False (q finished) at a dead end, which a correct grammar
 * never reaches. */
static bool grammar_mask(ekv_engine *e, ereq *q, float *logits)
{
    if (grammar_mask_logits(q->gs, logits, e->n_vocab) > 0)
        return true;
    engine_finish(e, q, GEN_FINISH_LENGTH, EKV_EINVAL,
                  "structured output: no token can continue the JSON");
    return false;
}

/* Moves q's grammar over the sampled token. False (q finished) when the
 * token was not allowed, which the mask rules out. */
static bool grammar_take(ekv_engine *e, ereq *q, int32_t id)
{
    ekv_error err = {0};
    if (grammar_accept_token(q->gs, id, &err) == EKV_OK)
        return true;
    engine_finish(e, q, GEN_FINISH_LENGTH, err.code, err.msg);
    return false;
}

/* Samples q's next token from logits and applies generate.c's finish rules
 * in its order: max_tokens, end-of-generation, stop string, context. */
void engine_sample_next(ekv_engine *e, ereq *q, float *logits)
{
    const gen_params *p = &q->r.params;
    const ekv_tokenizer *tok = model_tokenizer(e->m);
    ekv_error err = {0};
    if (q->n_gen >= p->max_tokens) {
        engine_finish(e, q, GEN_FINISH_LENGTH, EKV_OK, "");
        return;
    }
    if (q->gs && !grammar_mask(e, q, logits))
        return;
    const bool want_lp = p->logprobs && q->r.on_logprobs;
    ekv_logprob lp;
    const int32_t id = sampler_next(q->sampler, logits, q->tokens, (size_t)q->n_tok,
                                    (size_t)q->n_prompt, p->top_logprobs, want_lp ? &lp : NULL);
    if (q->t_first == 0)
        q->t_first = gen_now();
    if (!p->ignore_eos && tok_is_eog(tok, id)) {
        if (want_lp) /* reported, not emitted: echo scoring expects max_tokens entries */
            q->r.on_logprobs(q->r.ctx, &lp, 1, false);
        engine_finish(e, q, GEN_FINISH_EOS, EKV_OK, "");
        return;
    }
    if (q->gs && !grammar_take(e, q, id))
        return;
    q->tokens[q->n_tok++] = id;
    q->n_gen++;
    if (want_lp)
        q->r.on_logprobs(q->r.ctx, &lp, 1, false);
    bool stopped = false;
    const size_t n = tok_stream_push(&q->ts, tok, id, e->piece, e->piece_cap);
    ekv_status rc = emit(e, q, &q->tokens[q->n_tok - 1], 1, e->piece, n, &stopped, &err);
    if (rc)
        engine_finish(e, q, GEN_FINISH_LENGTH, rc, err.msg);
    else if (stopped)
        engine_finish(e, q, GEN_FINISH_STOP, EKV_OK, "");
    else if (q->gs && grammar_done(q->gs)) /* the JSON is complete: nothing may follow */
        engine_finish(e, q, GEN_FINISH_EOS, EKV_OK, "");
    else if (q->n_gen >= p->max_tokens)
        engine_finish(e, q, GEN_FINISH_LENGTH, EKV_OK, "");
    else if (q->n_tok >= e->cfg.max_ctx)
        engine_finish(e, q, GEN_FINISH_CONTEXT, EKV_OK, "");
}

/* The prompt is all in q's cache: compress it and drop the capture. False
 * when compression failed and q has been finished. */
static bool compress_prompt(ekv_engine *e, ereq *q)
{
    kvc_report rep;
    ekv_error err = {0};
    ekv_status rc = engine_tp_compress(e, q->seq, &err); /* uncomp allgathers entropies */
    if (rc == EKV_OK && (rc = kvc_capture_compress(q->cap, e->rt, q->seq, &rep, &err)) ==
                            EKV_EUNAVAILABLE && e->tp) {
        ekv_error_wrap(&err, "tensor-parallel group broken");
        engine_tp_break(e, err.msg);
    }
    kvc_capture_free(q->cap);
    q->cap = NULL;
    if (rc == EKV_OK) {
        q->saved_tokens = rep.bytes_before - rep.bytes_tokens;
        q->saved_channels = rep.bytes_tokens - rep.bytes_after;
    }
    if (rc)
        engine_finish(e, q, GEN_FINISH_LENGTH, rc, err.msg);
    return rc == EKV_OK;
}

/* Reports the prompt tokens q's rows just scored, from their logits rows
 * (raw: log-softmax at temperature 1, no bias or penalty), and the first
 * prompt token's empty entry with the first chunk. */
static void report_prompt_logprobs(ekv_engine *e, ereq *q, const float *rows)
{
    if (!scoring(q) || (q->lp_rows == 0 && q->n_scored > 0))
        return;
    int32_t n = 0;
    if (q->n_scored == 0) {
        e->lp_buf[n++] = (ekv_logprob){.token = q->tokens[0], .logprob = NAN};
        q->n_scored = 1;
    }
    for (int32_t j = 0; j < q->lp_rows; j++, q->n_scored++)
        sampler_logprobs(rows + (size_t)j * e->n_vocab, e->n_vocab, q->tokens[q->n_scored],
                         q->r.params.top_logprobs, &e->lp_buf[n++]);
    q->r.on_logprobs(q->r.ctx, e->lp_buf, n, true);
}

/* Makes room for the batch's logits rows (echo asks for many). */
static ekv_status reserve_logits(ekv_engine *e, int32_t n, ekv_error *err)
{
    int32_t want = 0;
    for (int32_t i = 0; i < n; i++)
        want += e->b_want[i] != 0;
    if (want <= e->logits_rows)
        return EKV_OK;
    float *p = realloc(e->logits, (size_t)want * e->n_vocab * sizeof *p);
    if (!p)
        return ekv_error_set(err, EKV_ENOMEM, "engine: out of memory for %d logits rows", want);
    e->logits = p;
    e->logits_rows = want;
    return EKV_OK;
}

/* SCOPE around the forward: the scope starts once the prompt is in (and
 * compressed); each later row is decode step n_fed - n_prompt. False when
 * q failed and has been finished. */
static bool scope_step_done(ekv_engine *e, ereq *q)
{
    ekv_error err = {0};
    if (q->r.kv.decode.mode == KVC_DECODE_NONE)
        return true;
    if (q->scope && kvc_scope_status(q->scope, &err)) {
        engine_finish(e, q, GEN_FINISH_LENGTH, err.code, err.msg);
        return false;
    }
    if (!q->scope && q->n_fed == q->n_prompt &&
        (!(q->scope = kvc_scope_create(&q->r.kv.decode, q->seq, q->r.params.max_tokens, &err)) ||
         engine_tp_scope(e, q->seq, &q->r.kv.decode, q->r.params.max_tokens, &err))) {
        engine_finish(e, q, GEN_FINISH_LENGTH, err.code ? err.code : EKV_ENOMEM, err.msg);
        return false;
    }
    return true;
}

void engine_step(ekv_engine *e)
{
    if (e->cfg.prefix_cache)
        settle_restores(e);
    const int32_t n = build_batch(e);
    if (n == 0) {
        if (restoring(e)) {
            pthread_mutex_lock(&e->mu);
            e->restore_wait = true;
            pthread_mutex_unlock(&e->mu);
        }
        return;
    }
    model_batch b = {.n = n,
                     .tokens = e->b_tokens,
                     .pos = e->b_pos,
                     .seqs = e->b_seqs,
                     .want_logits = e->b_want,
                     .tap = e->n_taps ? &e->tap : NULL};
    bool probing = false;
    for (int32_t i = 0; i < e->n_b_reqs; i++) {
        ereq *q = e->b_reqs[i];
        if (q->scope) {
            kvc_scope_begin(q->scope, q->n_fed - q->n_prompt);
            probing = true;
        }
    }
    b.probe = probing ? &e->probe : NULL;
    ekv_error err = {0};
    ekv_status rc = reserve_logits(e, n, &err);
    if (rc == EKV_OK)
        rc = engine_tp_step(e, &b, &err); /* TP: the followers run the same rows */
    if (rc == EKV_OK && (rc = model_forward(e->rt, &b, e->logits, &err)) == EKV_EUNAVAILABLE &&
        e->tp) { /* a rank died or stalled mid-forward */
        ekv_error_wrap(&err, "tensor-parallel group broken");
        engine_tp_break(e, err.msg);
    }
    engine_note_step(e);
    int32_t k = 0; /* logits rows come in row order: echo scoring rows, then the last */
    for (int32_t i = 0; i < e->n_b_reqs; i++) {
        ereq *q = e->b_reqs[i];
        if (rc) {
            engine_finish(e, q, GEN_FINISH_LENGTH, rc, err.msg);
            continue;
        }
        q->n_fed += q->rows;
        report_prompt_logprobs(e, q, e->logits + (size_t)k * e->n_vocab);
        k += q->lp_rows;
        float *logits = q->n_fed == q->n_tok ? e->logits + (size_t)k++ * e->n_vocab : NULL;
        if (q->n_fed == q->n_prompt && !q->prompt_saved && e->cfg.prefix_cache) {
            const engine_prefix_cache *pc = e->cfg.prefix_cache;
            const int32_t first_block = q->n_restored / kv_pool_block_tokens(e->pool);
            pc->save(pc->ctx, q->seq, q->tokens, q->n_prompt, first_block);
            q->prompt_saved = true;
            ekv_error serr = {0}; /* TP: every follower saves its own heads */
            if (engine_tp_save(e, q->seq, q->tokens, q->n_prompt, first_block, &serr)) {
                engine_finish(e, q, GEN_FINISH_LENGTH, serr.code, serr.msg);
                continue;
            }
        }
        if (q->cap && q->n_fed == q->n_prompt && !compress_prompt(e, q))
            continue;
        if (!scope_step_done(e, q))
            continue;
        if (logits && q->followers) /* n > 1: the prompt is in; the choices part here */
            engine_fork_choices(e, q, logits);
        if (logits)
            engine_sample_next(e, q, logits);
    }
}

/* ---- a request's sampler, and the n > 1 choices' fork (moved from engine.c) ---- */

ekv_status engine_sampling_setup(ekv_engine *e, ereq *q, ekv_error *err)
{
    if (!q->sampler && !(q->sampler = sampler_create(&q->r.params.sampling, e->n_vocab, err)))
        return err && err->code ? err->code : EKV_ENOMEM;
    if (q->r.params.grammar && !q->gs) {
        if (!e->gvocab && !(e->gvocab = grammar_vocab_create(model_tokenizer(e->m), err)))
            return err && err->code ? err->code : EKV_ENOMEM;
        if (!(q->gs = grammar_state_new(q->r.params.grammar, e->gvocab, err)))
            return err && err->code ? err->code : EKV_ENOMEM;
    }
    return EKV_OK;
}

void engine_fork_choices(ekv_engine *e, ereq *q, const float *logits)
{
    while (q->followers) {
        ereq *f = q->followers;
        q->followers = f->fnext;
        f->fnext = NULL;
        ekv_error err = {0};
        f->started = true;
        f->t_sched = q->t_sched;
        pthread_mutex_lock(&e->mu);
        q->n_followers--;
        e->running[e->n_running++] = f; /* admit() kept its slot */
        pthread_mutex_unlock(&e->mu);
        if (engine_sampling_setup(e, f, &err) || !(f->seq = kv_seq_fork(q->seq, &err)) ||
            engine_tp_seq_fork(e, q->seq, f->seq, &err)) {
            engine_finish(e, f, GEN_FINISH_LENGTH, err.code ? err.code : EKV_ENOMEM, err.msg);
            continue;
        }
        /* the prompt is in, compressed once, shared: f starts at its first token */
        f->n_fed = q->n_fed;
        f->n_restored = q->n_restored;
        f->n_scored = q->n_scored;
        f->prompt_saved = true;
        f->saved_tokens = q->saved_tokens;
        f->saved_channels = q->saved_channels;
        memcpy(e->fork_logits, logits, (size_t)e->n_vocab * sizeof *logits);
        engine_sample_next(e, f, e->fork_logits);
    }
    pthread_mutex_lock(&e->mu);
    engine_publish_locked(e);
    pthread_mutex_unlock(&e->mu);
}
