/*
 * engine.c - the step engine's API, request queue, admission and thread
 * (engine.h); one batched step is engine_step.c.
 *
 * Life of a request: engine_submit validates it and copies it onto the
 * queue. The engine thread admits it when a running slot is free and the pool
 * can hold its whole prompt beside what the running sequences still need
 * (their unfed tokens plus one block per head each for decode), gives it a
 * sampler, a KV sequence and, with a compression policy, a capture, and
 * steps it until it finishes. With reserve_output_pct, admission also keeps
 * that share of every sequence's remaining completion free, at the size its
 * policy leaves the prompt (a compressed prompt needs its whole prompt
 * during prefill, then only its budget). engine_finish frees the KV, then calls on_done.
 *
 * A preempted request goes back to the head of the queue keeping its tokens,
 * sampler, detokenizer and stopper; when re-admitted it is prefilled again
 * from prompt + generated tokens, and the logits of that last row are
 * bit-identical to the decode step it replaces (batch invariance), so it
 * samples as if never interrupted, seeded sampling included (the sampler's
 * RNG stream is kept, and nothing already streamed is emitted again).
 */
#include "engine_internal.h"
#include "entrokv/kvrecall_tier.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- queue and running list (caller holds e->mu) ---- */

static void queue_unlink(ekv_engine *e, ereq *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        e->q_head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        e->q_tail = q->prev;
    q->prev = q->next = NULL;
    e->n_queued--;
}

static void queue_push_tail(ekv_engine *e, ereq *q)
{
    q->next = NULL;
    q->prev = e->q_tail;
    if (e->q_tail)
        e->q_tail->next = q;
    else
        e->q_head = q;
    e->q_tail = q;
    e->n_queued++;
}

static void queue_push_head(ekv_engine *e, ereq *q)
{
    q->prev = NULL;
    q->next = e->q_head;
    if (e->q_head)
        e->q_head->prev = q;
    else
        e->q_tail = q;
    e->q_head = q;
    e->n_queued++;
}

static void running_remove(ekv_engine *e, ereq *q)
{
    for (int32_t i = 0; i < e->n_running; i++) {
        if (e->running[i] != q)
            continue;
        memmove(e->running + i, e->running + i + 1,
                (size_t)(e->n_running - i - 1) * sizeof *e->running);
        e->n_running--;
        return;
    }
}

/* The engine thread owns the pool; others read the figure published here. */
void engine_publish_locked(ekv_engine *e)
{
    e->stats.kv_blocks_free = kv_pool_free_blocks(e->pool);
    e->stats.kv_blocks_shared = kv_pool_shared_blocks(e->pool);
    e->stats.kv_cow_copies = kv_pool_cow_copies(e->pool);
}

/* ---- requests ---- */

static void ereq_free(ereq *q)
{
    if (!q)
        return;
    while (q->followers) { /* only before they ran: engine_finish ends them otherwise */
        ereq *f = q->followers;
        q->followers = f->fnext;
        ereq_free(f);
    }
    kv_seq_free(q->seq);
    if (q->cap)
        kvc_capture_free(q->cap);
    kvc_scope_free(q->scope);
    sampler_free(q->sampler);
    stopper_free(q->stopper);
    grammar_state_free(q->gs);
    grammar_release(q->r.params.grammar);
    free(q->bias);
    free(q->tokens);
    free(q);
}

/* A queued copy of r: the prompt in a buffer that will also hold the
 * generated tokens, the stop strings inside the stopper. */
static ekv_status ereq_new(const ekv_engine *e, const engine_request *r, ereq **out,
                           ekv_error *err)
{
    ereq *q = calloc(1, sizeof *q);
    if (!q)
        return ekv_error_set(err, EKV_ENOMEM, "engine: out of memory");
    int64_t cap = (int64_t)r->n_prompt + r->params.max_tokens;
    if (cap > e->cfg.max_ctx)
        cap = e->cfg.max_ctx;
    q->cap_tokens = (int32_t)cap + 1;
    q->tokens = malloc((size_t)q->cap_tokens * sizeof *q->tokens);
    if (!q->tokens) {
        ereq_free(q);
        return ekv_error_set(err, EKV_ENOMEM, "engine: out of memory");
    }
    memcpy(q->tokens, r->prompt, (size_t)r->n_prompt * sizeof *q->tokens);
    if (r->params.n_stops &&
        !(q->stopper = stopper_create(r->params.stops, r->params.n_stops, err))) {
        ereq_free(q);
        return err ? err->code : EKV_EINVAL;
    }
    const size_t n_bias = r->params.sampling.n_logit_bias;
    if (n_bias && !(q->bias = malloc(n_bias * sizeof *q->bias))) {
        ereq_free(q);
        return ekv_error_set(err, EKV_ENOMEM, "engine: out of memory");
    }
    if (n_bias)
        memcpy(q->bias, r->params.sampling.logit_bias, n_bias * sizeof *q->bias);
    q->r = *r;
    grammar_retain(q->r.params.grammar); /* released by ereq_free */
    q->r.params.sampling.logit_bias = q->bias;
    q->r.prompt = NULL;
    q->r.params.stops = NULL;
    q->r.params.n_stops = 0;
    q->n_prompt = q->n_tok = r->n_prompt;
    if (kvc_policy_mean_tokens(&r->kv, r->n_prompt, &q->kept_tokens, NULL) ||
        q->kept_tokens > r->n_prompt)
        q->kept_tokens = r->n_prompt; /* request_check has refused a bad policy */
    tok_stream_init(&q->ts, false);
    q->t_submit = gen_now();
    *out = q;
    return EKV_OK;
}

/* ---- finishing and preempting (engine thread) ---- */

static void usage_fill(const ekv_engine *e, const ereq *q, engine_usage *u)
{
    const double now = gen_now();
    memset(u, 0, sizeof *u);
    u->prompt_tokens = q->n_prompt;
    u->completion_tokens = q->n_gen;
    if (q->seq) {
        const int64_t bb = (int64_t)kv_pool_block_bytes(e->pool);
        u->kv_bytes = kv_seq_bytes(q->seq);
        u->kv_bytes_full = engine_blocks_for(e, q->n_fed) * bb;
        u->kv_bytes_saved_tokens = q->saved_tokens;
        u->kv_bytes_saved_channels = q->saved_channels;
        if (q->scope) { /* SCOPE: the evicted generated tokens, at full size */
            kvc_scope_stats st;
            kvc_scope_get_stats(q->scope, &st);
            u->kv_bytes_saved_decode = st.evicted * bb / kv_pool_block_tokens(e->pool);
        }
    }
    u->queue_s = (q->started ? q->t_sched : now) - q->t_submit;
    u->ttft_s = q->t_first > 0 ? q->t_first - q->t_submit : 0;
    u->preemptions = q->preemptions;
}

void engine_kick_locked(ekv_engine *e)
{
    e->kicks++;
    pthread_cond_signal(&e->work_cv);
}

/* The prefix cache's wake: a restore job's data has arrived. */
static void restore_landed(void *arg)
{
    ekv_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    engine_kick_locked(e);
    pthread_mutex_unlock(&e->mu);
}

/* The pool's release hook: a copy off this thread (a prefix save) let go
 * of pinned blocks; the engine thread gives them back (kv_pool_reap). */
static void pins_released(void *arg)
{
    ekv_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    e->pins_released = true;
    engine_kick_locked(e);
    pthread_mutex_unlock(&e->mu);
}

/* Drops q's restore in flight, if any (cancel, preemption, shutdown). */
static void drop_restore(ekv_engine *e, ereq *q)
{
    if (!q->restore_job)
        return;
    const engine_prefix_cache *pc = e->cfg.prefix_cache;
    pc->restore_finish(pc->ctx, q->restore_job, NULL);
    q->restore_job = NULL;
}

void engine_finish(ekv_engine *e, ereq *q, gen_finish finish, ekv_status rc, const char *msg)
{
    ekv_error err = {0};
    engine_usage u;
    if (rc == EKV_OK && finish != GEN_FINISH_STOP) {
        bool stopped = false;
        rc = engine_flush_text(e, q, &stopped, &err);
        if (rc)
            msg = err.msg;
        else if (stopped)
            finish = GEN_FINISH_STOP;
    }
    usage_fill(e, q, &u);
    drop_restore(e, q);
    engine_tp_seq_gone(e, q->seq);
    model_runtime_forget_seq(e->rt, q->seq); /* a device's copy of it */
    kv_seq_free(q->seq);
    q->seq = NULL;
    if (q->cap)
        kvc_capture_free(q->cap);
    q->cap = NULL;
    kvc_scope_free(q->scope);
    q->scope = NULL;

    pthread_mutex_lock(&e->mu);
    running_remove(e, q);
    e->stats.kv_bytes_saved += u.kv_bytes_full - u.kv_bytes;
    e->stats.kv_bytes_saved_tokens += u.kv_bytes_saved_tokens;
    e->stats.kv_bytes_saved_channels += u.kv_bytes_saved_channels;
    e->stats.kv_bytes_saved_decode += u.kv_bytes_saved_decode;
    engine_publish_locked(e);
    pthread_mutex_unlock(&e->mu);

    while (q->followers) { /* ended before the prompt was in: they end the same way */
        ereq *f = q->followers;
        q->followers = f->fnext;
        q->n_followers--;
        engine_finish(e, f, finish == GEN_FINISH_CONTEXT ? GEN_FINISH_LENGTH : finish, rc, msg);
    }
    if (rc && (!msg || !*msg))
        msg = ekv_status_name(rc);
    if (q->r.on_done)
        q->r.on_done(q->r.ctx, finish, &u, rc, rc ? msg : "");
    ereq_free(q);

    pthread_mutex_lock(&e->mu);
    e->n_open--;
    pthread_cond_broadcast(&e->done_cv);
    pthread_mutex_unlock(&e->mu);
}

void engine_preempt(ekv_engine *e, ereq *q)
{
    drop_restore(e, q);
    engine_tp_seq_gone(e, q->seq);
    model_runtime_forget_seq(e->rt, q->seq); /* a device's copy of it */
    kv_seq_free(q->seq);
    q->seq = NULL;
    if (q->cap)
        kvc_capture_free(q->cap);
    q->cap = NULL;
    kvc_scope_free(q->scope); /* replayed token by token from the prompt's end */
    q->scope = NULL;
    q->saved_tokens = q->saved_channels = 0;
    q->n_fed = 0;
    q->preemptions++;

    pthread_mutex_lock(&e->mu);
    running_remove(e, q);
    if (q->cancel) { /* asked during this step: no point recomputing it */
        q->next = e->cancelled;
        e->cancelled = q;
    } else {
        queue_push_head(e, q);
    }
    e->stats.preemptions++;
    engine_publish_locked(e);
    pthread_mutex_unlock(&e->mu);
}

void engine_note_step(ekv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->stats.steps++;
    engine_publish_locked(e);
    pthread_mutex_unlock(&e->mu);
}

/* ---- the engine thread ---- */

/* Waits on work_cv (under mu) for at most ms; true when the time ran out. */
static bool timed_wait(ekv_engine *e, int ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    return pthread_cond_timedwait(&e->work_cv, &e->mu, &ts) == ETIMEDOUT;
}

/* Sleeps until there is something to do; false when the engine is stopping. */
static bool wait_for_work(ekv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    for (;;) {
        const bool other = e->stopping || e->q_head || e->cancelled || e->pins_released;
        if (other || (e->n_running > 0 && !e->restore_wait))
            break;
        if (e->n_running == 0 && e->tp && !e->tp_broken) { /* TP: ping while idle */
            if (timed_wait(e, engine_tp_heartbeat_ms(e))) {
                pthread_mutex_unlock(&e->mu);
                engine_tp_ping(e);
                pthread_mutex_lock(&e->mu);
            }
            continue;
        }
        if (e->n_running == 0) {
            pthread_cond_wait(&e->work_cv, &e->mu);
            continue;
        }
        /* only restores in flight: sleep until one lands (or anything else) */
        if (e->kicks != e->restore_wait_kicks)
            break;
        timed_wait(e, 100);
    }
    e->restore_wait = false;
    const bool reap = e->pins_released;
    e->pins_released = false;
    const bool go = !e->stopping;
    pthread_mutex_unlock(&e->mu);
    if (reap && kv_pool_reap(e->pool) > 0) {
        pthread_mutex_lock(&e->mu);
        engine_publish_locked(e); /* the free blocks the stats show */
        pthread_mutex_unlock(&e->mu);
    }
    return go;
}

/* on_done for requests cancelled in the queue; frees running ones that were
 * cancelled. */
static void reap_cancelled(ekv_engine *e)
{
    ereq **kill = e->scratch_reqs;
    int32_t n_kill = 0;
    pthread_mutex_lock(&e->mu);
    ereq *dead = e->cancelled;
    e->cancelled = NULL;
    for (int32_t i = 0; i < e->n_running; i++)
        if (e->running[i]->cancel)
            kill[n_kill++] = e->running[i];
    pthread_mutex_unlock(&e->mu);
    while (dead) {
        ereq *next = dead->next;
        engine_finish(e, dead, GEN_FINISH_CANCELLED, EKV_OK, "");
        dead = next;
    }
    for (int32_t i = 0; i < n_kill; i++)
        engine_finish(e, kill[i], GEN_FINISH_CANCELLED, EKV_OK, "");
}

/* Running slots the followers of running leaders will take (under mu). */
static int32_t followers_waiting(const ekv_engine *e)
{
    int32_t n = 0;
    for (int32_t i = 0; i < e->n_running; i++)
        n += e->running[i]->n_followers;
    return n;
}

/* Gives an admitted request what it runs with; finishes it on failure. */
static void setup(ekv_engine *e, ereq *q)
{
    const ekv_model_config *c = model_config(e->m);
    ekv_error err = {0};
    if (engine_sampling_setup(e, q, &err))
        goto fail;
    const model_shard *sh = engine_tp_shard(e); /* under TP: this rank's heads */
    if (!(q->seq = kv_seq_create(e->pool, c->n_layers, sh ? sh->n_kv_heads : c->n_kv_heads,
                                 &err)) ||
        engine_tp_seq_new(e, q->seq, &err))
        goto fail;
    if (!q->started) {
        q->started = true;
        q->t_sched = gen_now();
    }
    q->n_restored = 0;
    if (e->cfg.prefix_cache && !q->r.params.prompt_logprobs) { /* echo scores every row */
        /* leave the observation window (or one token, for logits) to compute */
        const int32_t keep_out = kvc_policy_rows(&q->r.kv);
        const engine_prefix_cache *pc = e->cfg.prefix_cache;
        q->restore_job = pc->restore_start(pc->ctx, q->tokens, q->n_prompt,
                                           q->n_prompt - keep_out, restore_landed, e);
        if (q->restore_job)
            return; /* engine_step calls engine_prompt_start when it lands */
    }
    engine_prompt_start(e, q, 0);
    return;
fail:
    engine_finish(e, q, GEN_FINISH_LENGTH, err.code ? err.code : EKV_ENOMEM, err.msg);
}

bool engine_prompt_start(ekv_engine *e, ereq *q, int32_t n_restored)
{
    ekv_error err = {0};
    q->n_restored = n_restored;
    q->n_fed = n_restored;
    /* the capture sees what is computed: the prompt after the restored part */
    if ((q->r.kv.method != KVC_FULL || q->r.kv.spark.ratio > 0) &&
        !(q->cap = engine_tp_capture(e, q->seq, &q->r.kv, q->n_prompt - n_restored, n_restored,
                                     &err))) {
        engine_finish(e, q, GEN_FINISH_LENGTH, err.code ? err.code : EKV_ENOMEM, err.msg);
        return false;
    }
    return true;
}

/* A request the whole pool cannot hold. After a preemption it has streamed
 * tokens already, so it ends as if its context were full. */
static void reject(ekv_engine *e, ereq *q)
{
    if (q->n_gen > 0) {
        engine_finish(e, q, GEN_FINISH_CONTEXT, EKV_OK, "");
        return;
    }
    char msg[160];
    snprintf(msg, sizeof msg, "the prompt needs %lld KV blocks; the pool has %lld (kv_tokens %d)",
             (long long)engine_blocks_for(e, q->n_tok),
             (long long)kv_pool_total_blocks(e->pool), e->cfg.kv_tokens);
    engine_finish(e, q, GEN_FINISH_LENGTH, EKV_ENOMEM, msg);
}

/* Moves requests from the queue head to the running list, first come first
 * served, while a slot is free and the pool has room for them. True when
 * nothing runs and the head still waits for blocks: pins hold them. */
static bool admit(ekv_engine *e)
{
    bool blocked = false;
    ereq **fresh = e->scratch_reqs, *rejects = NULL;
    int32_t n_fresh = 0;
    const int64_t total = kv_pool_total_blocks(e->pool);
    pthread_mutex_lock(&e->mu);
    while (e->q_head) {
        ereq *q = e->q_head;
        if (e->n_running + 1 + q->n_followers + followers_waiting(e) > e->cfg.max_running)
            break; /* each choice will take a running slot */
        /* only a prompt the whole pool cannot hold is refused; a reserve
         * beyond the pool waits for an empty pool */
        if (engine_blocks_for(e, q->n_tok) + 2 * e->blocks_per_slot * q->n_followers > total) {
            queue_unlink(e, q);
            q->next = rejects;
            rejects = q;
            continue;
        }
        int64_t need = engine_admit_blocks(e, q);
        if (need > total)
            need = total;
        if (need + engine_committed_blocks(e) > kv_pool_free_blocks(e->pool)) {
            blocked = e->n_running == 0; /* only pinned blocks can be in the way */
            break;
        }
        queue_unlink(e, q);
        e->running[e->n_running++] = q;
        fresh[n_fresh++] = q;
    }
    pthread_mutex_unlock(&e->mu);
    while (rejects) {
        ereq *next = rejects->next;
        reject(e, rejects);
        rejects = next;
    }
    for (int32_t i = 0; i < n_fresh; i++)
        setup(e, fresh[i]);
    return blocked;
}

/* Everything still accepted ends as cancelled. */
static void shutdown_all(ekv_engine *e)
{
    while (e->n_running > 0)
        engine_finish(e, e->running[e->n_running - 1], GEN_FINISH_CANCELLED, EKV_OK, "");
    pthread_mutex_lock(&e->mu);
    ereq *dead = e->cancelled;
    e->cancelled = NULL;
    while (e->q_head) {
        ereq *q = e->q_head;
        queue_unlink(e, q);
        q->next = dead;
        dead = q;
    }
    pthread_mutex_unlock(&e->mu);
    while (dead) {
        ereq *next = dead->next;
        engine_finish(e, dead, GEN_FINISH_CANCELLED, EKV_OK, "");
        dead = next;
    }
}

static void *engine_main(void *arg)
{
    ekv_engine *e = arg;
    while (wait_for_work(e)) {
        reap_cancelled(e);
        if (admit(e) && kv_pool_wait_released(e->pool, 100)) /* not a spin: wait for a copy */
            kv_pool_reap(e->pool);
        if (e->n_running > 0)
            engine_step(e);
    }
    shutdown_all(e);
    engine_tp_end(e); /* after the frees shutdown_all logged */
    return NULL;
}

/* ---- API ---- */

void engine_config_default(engine_config *c)
{
    memset(c, 0, sizeof *c);
    c->n_threads = 0;
    c->max_batch = 256;
    c->prefill_chunk = ENGINE_PREFILL_CHUNK;
    c->max_ctx = 2048;
    c->kv_tokens = 8192;
    c->max_running = 32;
    c->max_queued = 256;
}

static ekv_status config_check(const engine_config *c, ekv_error *err)
{
    if (c->max_batch < 1 || c->max_batch > 65536)
        return ekv_error_set(err, EKV_EINVAL, "engine: max_batch %d outside [1, 65536]",
                             c->max_batch);
    if (c->prefill_chunk < 0)
        return ekv_error_set(err, EKV_EINVAL, "engine: prefill_chunk %d must be >= 0",
                             c->prefill_chunk);
    if (c->max_ctx < 2 || c->max_ctx > (1 << 24))
        return ekv_error_set(err, EKV_EINVAL, "engine: max_ctx %d outside [2, 2^24]", c->max_ctx);
    if (c->kv_tokens < 1)
        return ekv_error_set(err, EKV_EINVAL, "engine: kv_tokens %d must be >= 1", c->kv_tokens);
    if (c->max_running < 1 || c->max_running > c->max_batch)
        return ekv_error_set(err, EKV_EINVAL,
                             "engine: max_running %d outside [1, max_batch %d] (one decode row each)",
                             c->max_running, c->max_batch);
    if (c->max_queued < 1)
        return ekv_error_set(err, EKV_EINVAL, "engine: max_queued %d must be >= 1",
                             c->max_queued);
    if (c->tp_comm && c->runtime_create)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "engine: tensor parallelism on another device's runtime");
    if (c->reserve_output_pct < 0 || c->reserve_output_pct > 100)
        return ekv_error_set(err, EKV_EINVAL, "engine: reserve_output_pct %d outside [0, 100]",
                             c->reserve_output_pct);
    return EKV_OK;
}

/* Everything engine_create made; the thread has been joined. */
static void engine_free(ekv_engine *e)
{
    engine_scratch_free(e);
    grammar_vocab_free(e->gvocab);
    free(e->running);
    engine_tp_free(e);
    model_runtime_free(e->rt);
    kv_pool_destroy(e->pool);
    pthread_cond_destroy(&e->done_cv);
    pthread_cond_destroy(&e->work_cv);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

static bool sync_init(ekv_engine *e)
{
    if (pthread_mutex_init(&e->mu, NULL))
        return false;
    if (pthread_cond_init(&e->work_cv, NULL)) {
        pthread_mutex_destroy(&e->mu);
        return false;
    }
    if (pthread_cond_init(&e->done_cv, NULL)) {
        pthread_cond_destroy(&e->work_cv);
        pthread_mutex_destroy(&e->mu);
        return false;
    }
    return true;
}

ekv_engine *engine_create(const ekv_model *m, const engine_config *cfg, ekv_error *err)
{
    engine_config def;
    if (!cfg) {
        engine_config_default(&def);
        cfg = &def;
    }
    if (!m) {
        ekv_error_set(err, EKV_EINVAL, "engine: no model");
        return NULL;
    }
    if (config_check(cfg, err))
        return NULL;
    ekv_engine *e = calloc(1, sizeof *e);
    if (!e) {
        ekv_error_set(err, EKV_ENOMEM, "engine: out of memory");
        return NULL;
    }
    if (!sync_init(e)) {
        free(e);
        ekv_error_set(err, EKV_EIO, "engine: cannot create a mutex");
        return NULL;
    }
    const ekv_model_config *c = model_config(m);
    e->m = m;
    e->cfg = *cfg;
    e->n_vocab = c->n_vocab;
    e->rt = cfg->runtime_create
                ? cfg->runtime_create(m, cfg, cfg->runtime_arg, err)
                : model_runtime_create_tp(m, cfg->max_batch, cfg->max_ctx, cfg->n_threads,
                                          cfg->tp_comm, err);
    e->on_cpu = e->rt && !strcmp(model_runtime_device(e->rt), "cpu");
    if (!e->rt ||
        !(e->pool = model_kv_pool_create_shard(m, model_runtime_shard(e->rt), cfg->kv_tokens,
                                               err)) ||
        engine_scratch_init(e, err) || (cfg->tp_comm && engine_tp_create(e, cfg->tp_comm, err)))
        goto fail;
    e->blocks_per_slot = (int64_t)c->n_layers * model_runtime_shard(e->rt)->n_kv_heads;
    if (!(e->running = calloc((size_t)cfg->max_running, sizeof *e->running))) {
        ekv_error_set(err, EKV_ENOMEM, "engine: out of memory");
        goto fail;
    }
    e->stats.kv_blocks_total = kv_pool_total_blocks(e->pool);
    e->stats.kv_blocks_free = kv_pool_free_blocks(e->pool);
    kv_pool_set_release_hook(e->pool, pins_released, e);
    kv_pool_set_recall_tier(e->pool, cfg->recall_tier);
    if (pthread_create(&e->thread, NULL, engine_main, e)) {
        ekv_error_set(err, EKV_EIO, "engine: cannot start the engine thread");
        goto fail;
    }
    e->thread_started = true;
    return e;
fail:
    engine_free(e);
    return NULL;
}

void engine_destroy(ekv_engine *e)
{
    if (!e)
        return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stopping = e->draining = true;
        engine_kick_locked(e);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
    }
    engine_free(e);
}

ekv_status engine_submit(ekv_engine *e, const engine_request *r, uint64_t *id, ekv_error *err)
{
    ereq *q = NULL;
    if (!e)
        return ekv_error_set(err, EKV_EINVAL, "engine: no engine");
    ekv_status rc = engine_request_check(e, r, err);
    if (rc)
        return rc;
    /* choice i: its own ctx and seed + i; choices 1.. wait on choice 0 */
    const int32_t n = r->n > 1 ? r->n : 1;
    ereq *list = NULL;
    for (int32_t i = n - 1; i >= 0; i--) {
        engine_request ri = *r;
        if (n > 1) {
            ri.ctx = r->choice_ctx[i];
            ri.params.sampling.seed += (uint64_t)i;
        }
        if ((rc = ereq_new(e, &ri, &q, err))) {
            while (list) {
                ereq *f = list;
                list = f->fnext;
                ereq_free(f);
            }
            return rc;
        }
        q->choice = i;
        if (i > 0) {
            q->fnext = list;
            list = q;
        }
    }
    q->followers = list;
    q->n_followers = n - 1;
    pthread_mutex_lock(&e->mu);
    if (e->tp_broken) {
        rc = ekv_error_set(err, EKV_EUNAVAILABLE, "%s", e->tp_why);
    } else if (e->draining) {
        rc = ekv_error_set(err, EKV_EBUSY, "engine: draining, not accepting requests");
    } else if (e->n_queued >= e->cfg.max_queued) {
        rc = ekv_error_set(err, EKV_EBUSY, "engine: queue full (%d requests waiting)",
                           e->n_queued);
    } else {
        q->id = ++e->next_id;
        for (ereq *f = q->followers; f; f = f->fnext)
            f->id = q->id;
        queue_push_tail(e, q);
        e->n_open += n;
        if (id)
            *id = q->id;
        engine_kick_locked(e);
    }
    pthread_mutex_unlock(&e->mu);
    if (rc)
        ereq_free(q);
    return rc;
}

void engine_cancel(ekv_engine *e, uint64_t id)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    /* every choice of an n > 1 request has the id, queued or running */
    for (ereq *q = e->q_head, *next; q; q = next) {
        next = q->next;
        if (q->id != id)
            continue;
        queue_unlink(e, q);
        q->next = e->cancelled;
        e->cancelled = q;
        engine_kick_locked(e);
    }
    for (int32_t i = 0; i < e->n_running; i++) {
        if (e->running[i]->id != id)
            continue;
        e->running[i]->cancel = true;
        engine_kick_locked(e);
    }
    pthread_mutex_unlock(&e->mu);
}

void engine_stats_get(ekv_engine *e, engine_stats *s)
{
    pthread_mutex_lock(&e->mu);
    *s = e->stats;
    s->queued = e->n_queued;
    s->running = e->n_running;
    pthread_mutex_unlock(&e->mu);
    if (e->cfg.recall_tier) { /* its own atomics */
        kv_recall_tier_stats ts;
        kv_recall_tier_stats_get(e->cfg.recall_tier, &ts);
        s->recall_blocks = ts.blocks_recalled;
        s->recall_bytes = ts.bytes_recalled;
        s->recall_deadline_misses = ts.deadline_misses;
        s->recall_promotions = ts.promotions;
        s->recall_spilled_blocks = ts.spilled_blocks;
        s->recall_rankings = ts.rankings;
    }
}

void engine_drain(ekv_engine *e)
{
    pthread_mutex_lock(&e->mu);
    e->draining = true;
    while (e->n_open > 0)
        pthread_cond_wait(&e->done_cv, &e->mu);
    pthread_mutex_unlock(&e->mu);
}
