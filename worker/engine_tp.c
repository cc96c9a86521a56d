/*
 * engine_tp.c - a tensor-parallel worker group (docs/tp.md, "A worker
 * group"): rank 0 runs the step engine (engine.c, engine_step.c) and mirrors
 * what it does to its sequences onto ranks 1..N-1, which run
 * engine_tp_follow.
 *
 * Rank 0 names its sequences by slot ids (a table of its kv_seq pointers).
 * Every change to a sequence (create, free, fork, a compression capture) is
 * logged as an op; before each collective rank 0 runs on the model (a
 * forward, or a compression that allgathers entropies) it broadcasts a
 * plan: a fixed header (magic, version, kind, a message counter, the op and
 * row counts, the payload's length), then the payload (the ops, then the
 * rows' tokens, positions and sequence ids). A follower applies the ops to
 * its own sequences (its heads only) in order, then runs the same
 * collective. While idle, rank 0 sends a ping and a barrier every heartbeat,
 * so a dead or stopped rank is found within the communicator's timeout even
 * without traffic, and no follower times out waiting for work.
 *
 * The KV store tier (docs/tp.md, "The KV store tier"): every rank has its
 * own prefix cache (a kvprefix of its rank: its heads, keys with its rank).
 * Rank 0's save is logged as an op (with the prompt's tokens, which
 * followers never see whole) and each follower saves its own heads when it
 * applies it. A restore rank 0 got is a plan of its own: every follower
 * restores the same prefix from its store, then the ranks allgather what
 * each holds and all keep the least (0: all recompute), so no rank runs a
 * position another lacks.
 *
 * Failure: once a collective fails (comm.h: EKV_EUNAVAILABLE within the
 * timeout) the group is broken for good: every request in flight fails with
 * EKV_EUNAVAILABLE, new ones are refused with it, and engine_stats says
 * tp_broken (the Worker service's Stats then answers UNAVAILABLE, so the
 * coordinator marks the group unhealthy). A follower that meets a malformed
 * plan or cannot mirror a step returns an error; its caller must then break
 * the group (comm_threads_group_abort, or leave the process) so rank 0 does
 * not wait on it.
 */
#include "engine_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/comm.h"

#define TP_PLAN_MAGIC 0x656b7470u /* "ptke" little-endian */
/* 2: the capture carries recall's fields; 3: saves, restores and tokens; 4: the
 * capture carries token recall's K (96-byte ops) */
#define TP_PLAN_VERSION 4

enum { TP_END = 0, TP_STEP = 1, TP_COMPRESS = 2, TP_PING = 3, TP_RESTORE = 4, TP_N_KINDS };
enum { OP_CREATE = 1, OP_FREE = 2, OP_FORK = 3, OP_CAPTURE = 4, OP_SCOPE = 5, OP_SAVE = 6,
       OP_RESTORE = 7 };
#define ROW_INTS 4 /* a row: token, position, sequence id, SCOPE step (-1: none) */

/* The plan's header: broadcast first, fixed size; every field validated by
 * followers. All integers in the host's byte order (ranks of one group run
 * the same build). */
typedef struct tp_plan_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t kind;
    uint32_t counter;       /* messages sent before this one */
    int32_t n_ops;
    int32_t n_rows;
    int32_t arg;            /* TP_COMPRESS, TP_RESTORE: the sequence id */
    uint32_t payload_bytes; /* n_ops * sizeof(tp_op) + (n_rows * ROW_INTS + n_toks) * 4 */
    uint32_t n_toks;        /* tokens after the rows (OP_SAVE's and OP_RESTORE's) */
} tp_plan_hdr;

/* One change to a sequence. The capture's policy travels without its
 * profile pointer: each rank substitutes its own copy of the profile.
 * Recall (kvrecall.h) needs no more than its policy: the store is enabled
 * by the compression, and its ranking, promotion and budget split are per
 * (layer, KV head), decided by each rank over its own heads from the same
 * rows (a tracked row is its sequence's only row of the step on every
 * rank). */
typedef struct tp_op {
    int32_t code, id, parent; /* parent: OP_FORK's source */
    int32_t n_prompt, pos0;   /* OP_CAPTURE */
    int32_t method;
    double budget;
    double spark_ratio;
    int32_t spark_recovery;
    int32_t has_profile;
    /* OP_SCOPE: the decode policy and the request's max_tokens */
    int32_t scope_mode, scope_recent, scope_window, scope_max_new, max_new;
    /* OP_CAPTURE: recall's blocks, ranking period and promotion switch */
    int32_t recall, recall_every, recall_no_promote;
    /* OP_SAVE (pos0: its first block), OP_RESTORE: the prompt's tokens
     * [0, n_tok) at tok_off in the plan's tokens */
    int32_t tok_off, n_tok;
    /* OP_CAPTURE: token recall's K (kvc_policy.recall_gather; 0 whole blocks) */
    int32_t recall_gather;
    int32_t reserved; /* 0: the op's size stays a multiple of its double's */
} tp_op;
_Static_assert(sizeof(tp_op) == 96, "docs/tp.md's op size");

struct engine_tp {
    ekv_comm *comm;
    const model_shard *shard;
    int heartbeat_ms;
    uint32_t counter;
    kv_seq **slots; /* id -> rank 0's sequence */
    int32_t n_slots;
    tp_op *ops;
    int32_t n_ops, cap_ops;
    int32_t *rows; /* tokens, positions, ids, SCOPE steps: ROW_INTS * max_batch */
    int32_t *toks; /* the ops' tokens */
    int32_t n_toks, cap_toks;
    unsigned char *msg;
    size_t msg_cap;
};

static ekv_status tp_grow_msg(unsigned char **msg, size_t *cap, size_t need, ekv_error *err)
{
    if (need <= *cap)
        return EKV_OK;
    unsigned char *p = realloc(*msg, need);
    if (!p)
        return ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory for a plan");
    *msg = p;
    *cap = need;
    return EKV_OK;
}

static void hdr_init(tp_plan_hdr *h, int kind, uint32_t counter, int32_t n_ops, int32_t n_rows,
                     int32_t arg, int32_t n_toks)
{
    memset(h, 0, sizeof *h);
    h->magic = TP_PLAN_MAGIC;
    h->version = TP_PLAN_VERSION;
    h->kind = (uint16_t)kind;
    h->counter = counter;
    h->n_ops = n_ops;
    h->n_rows = n_rows;
    h->arg = arg;
    h->n_toks = (uint32_t)n_toks;
    h->payload_bytes = (uint32_t)((size_t)n_ops * sizeof(tp_op) +
                                  ((size_t)n_rows * ROW_INTS + (size_t)n_toks) * 4);
}

/* ---- rank 0 ---- */

ekv_status engine_tp_create(ekv_engine *e, ekv_comm *comm, ekv_error *err)
{
    engine_tp *t = calloc(1, sizeof *t);
    if (!t)
        return ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory");
    e->tp = t;
    t->comm = comm;
    t->shard = model_runtime_shard(e->rt);
    t->heartbeat_ms = e->cfg.tp_heartbeat_ms > 0 ? e->cfg.tp_heartbeat_ms : 1000;
    /* running sequences, each choice of n > 1 its own */
    t->n_slots = e->cfg.max_running;
    t->slots = calloc((size_t)t->n_slots, sizeof *t->slots);
    t->rows = malloc((size_t)e->cfg.max_batch * ROW_INTS * sizeof *t->rows);
    if (!t->slots || !t->rows)
        return ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory");
    return EKV_OK;
}

void engine_tp_free(ekv_engine *e)
{
    engine_tp *t = e->tp;
    if (!t)
        return;
    free(t->slots);
    free(t->ops);
    free(t->rows);
    free(t->toks);
    free(t->msg);
    free(t);
    e->tp = NULL;
}

const model_shard *engine_tp_shard(const ekv_engine *e)
{
    return e->tp ? e->tp->shard : NULL;
}

static int32_t slot_of(const engine_tp *t, const kv_seq *s)
{
    for (int32_t i = 0; s && i < t->n_slots; i++)
        if (t->slots[i] == s)
            return i;
    return -1;
}

static ekv_status log_op(engine_tp *t, const tp_op *op, ekv_error *err)
{
    if (t->n_ops == t->cap_ops) {
        const int32_t cap = t->cap_ops ? 2 * t->cap_ops : 64;
        tp_op *p = realloc(t->ops, (size_t)cap * sizeof *p);
        if (!p)
            return ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory for ops");
        t->ops = p;
        t->cap_ops = cap;
    }
    t->ops[t->n_ops++] = *op;
    return EKV_OK;
}

/* Takes a slot for s (made by rank 0) and logs op (its code and parent). */
static ekv_status seq_add(engine_tp *t, kv_seq *s, tp_op *op, ekv_error *err)
{
    for (int32_t i = 0; i < t->n_slots; i++)
        if (!t->slots[i]) {
            op->id = i;
            if (log_op(t, op, err))
                return err->code;
            t->slots[i] = s;
            return EKV_OK;
        }
    return ekv_error_set(err, EKV_ERANGE, "tensor parallelism: no free sequence id (%d)",
                         t->n_slots);
}

ekv_status engine_tp_seq_new(ekv_engine *e, kv_seq *s, ekv_error *err)
{
    if (!e->tp)
        return EKV_OK;
    tp_op op = {.code = OP_CREATE, .parent = -1};
    return seq_add(e->tp, s, &op, err);
}

ekv_status engine_tp_seq_fork(ekv_engine *e, const kv_seq *parent, kv_seq *s, ekv_error *err)
{
    if (!e->tp)
        return EKV_OK;
    tp_op op = {.code = OP_FORK, .parent = slot_of(e->tp, parent)};
    if (op.parent < 0)
        return ekv_error_set(err, EKV_EINVAL, "tensor parallelism: fork of an unknown sequence");
    return seq_add(e->tp, s, &op, err);
}

void engine_tp_seq_gone(ekv_engine *e, const kv_seq *s)
{
    if (!e->tp || !s)
        return;
    const int32_t id = slot_of(e->tp, s);
    if (id < 0)
        return; /* never announced (its creation failed) */
    ekv_error err = {0};
    const tp_op op = {.code = OP_FREE, .id = id, .parent = -1};
    if (log_op(e->tp, &op, &err)) {
        /* the followers would keep a sequence rank 0 forgot: the group can
         * no longer agree, so it stops */
        engine_tp_break(e, "tensor parallelism: out of memory logging a free");
        return;
    }
    e->tp->slots[id] = NULL;
}

kvc_capture *engine_tp_capture(ekv_engine *e, const kv_seq *s, const kvc_policy *p,
                               int32_t n_prompt, int32_t pos0, ekv_error *err)
{
    if (!e->tp)
        return kvc_capture_create(p, e->m, n_prompt, pos0, err);
    const tp_op op = {.code = OP_CAPTURE, .id = slot_of(e->tp, s), .parent = -1,
                      .n_prompt = n_prompt, .pos0 = pos0, .method = (int32_t)p->method,
                      .budget = p->budget, .spark_ratio = p->spark.ratio,
                      .spark_recovery = (int32_t)p->spark.recovery,
                      .has_profile = p->profile != NULL, .recall = p->recall,
                      .recall_every = p->recall_every,
                      .recall_no_promote = p->recall_no_promote,
                      .recall_gather = p->recall_gather};
    kvc_capture *c = kvc_capture_create_shard(p, e->m, e->tp->shard, n_prompt, pos0, err);
    if (c && log_op(e->tp, &op, err)) {
        kvc_capture_free(c);
        return NULL;
    }
    return c;
}

ekv_status engine_tp_scope(ekv_engine *e, const kv_seq *s, const kvc_decode_policy *d,
                           int32_t max_new, ekv_error *err)
{
    if (!e->tp)
        return EKV_OK;
    const tp_op op = {.code = OP_SCOPE, .id = slot_of(e->tp, s), .parent = -1,
                      .scope_mode = (int32_t)d->mode, .scope_recent = d->recent,
                      .scope_window = d->window, .scope_max_new = d->max_new,
                      .max_new = max_new};
    return log_op(e->tp, &op, err);
}

void engine_tp_break(ekv_engine *e, const char *why)
{
    pthread_mutex_lock(&e->mu);
    if (!e->tp_broken) {
        e->tp_broken = true;
        e->stats.tp_broken = 1;
        snprintf(e->tp_why, sizeof e->tp_why, "%s", why);
    }
    pthread_mutex_unlock(&e->mu);
}

/* Broadcasts a plan of `kind` with the ops logged so far and n_rows rows
 * from t->rows. */
static ekv_status send_plan(ekv_engine *e, int kind, int32_t n_rows, int32_t arg, ekv_error *err)
{
    engine_tp *t = e->tp;
    pthread_mutex_lock(&e->mu);
    const bool broken = e->tp_broken;
    pthread_mutex_unlock(&e->mu);
    if (broken)
        return ekv_error_set(err, EKV_EUNAVAILABLE, "%s", e->tp_why);
    tp_plan_hdr h;
    hdr_init(&h, kind, t->counter++, t->n_ops, n_rows, arg, t->n_toks);
    ekv_status rc = comm_broadcast(t->comm, &h, sizeof h, 0, err);
    if (rc == EKV_OK && h.payload_bytes > 0) {
        const size_t ob = (size_t)t->n_ops * sizeof(tp_op);
        if ((rc = tp_grow_msg(&t->msg, &t->msg_cap, h.payload_bytes, err)))
            goto out; /* the followers wait on the payload: they time out */
        if (ob)
            memcpy(t->msg, t->ops, ob);
        if (n_rows)
            memcpy(t->msg + ob, t->rows, (size_t)n_rows * ROW_INTS * 4);
        if (t->n_toks)
            memcpy(t->msg + ob + (size_t)n_rows * ROW_INTS * 4, t->toks, (size_t)t->n_toks * 4);
        rc = comm_broadcast(t->comm, t->msg, h.payload_bytes, 0, err);
    }
    if (rc == EKV_OK && kind == TP_PING)
        rc = comm_barrier(t->comm, err); /* a broadcast's root may not wait for its peers */
out:
    t->n_ops = 0;
    t->n_toks = 0;
    if (rc) {
        char why[sizeof err->msg + 64];
        snprintf(why, sizeof why, "tensor-parallel group broken: %s", err ? err->msg : "");
        engine_tp_break(e, why);
        return ekv_error_set(err, EKV_EUNAVAILABLE, "%s", e->tp_why);
    }
    return EKV_OK;
}

ekv_status engine_tp_step(ekv_engine *e, const model_batch *b, ekv_error *err)
{
    engine_tp *t = e->tp;
    if (!t)
        return EKV_OK;
    for (int32_t i = 0; i < b->n; i++) {
        const int32_t id = slot_of(t, model_batch_seq(b, i));
        if (id < 0)
            return ekv_error_set(err, EKV_EINVAL, "tensor parallelism: row %d names no sequence",
                                 i);
        t->rows[i] = b->tokens[i];
        t->rows[b->n + i] = b->pos[i];
        t->rows[2 * b->n + i] = id;
        /* a SCOPE row: the decode step engine_step began its scope with */
        const ereq *q = e->b_rowq[i];
        t->rows[3 * b->n + i] =
            b->probe && b->probe->rows[i] && q->scope ? q->n_fed - q->n_prompt : -1;
    }
    return send_plan(e, TP_STEP, b->n, 0, err);
}

ekv_status engine_tp_compress(ekv_engine *e, const kv_seq *s, ekv_error *err)
{
    if (!e->tp)
        return EKV_OK;
    return send_plan(e, TP_COMPRESS, 0, slot_of(e->tp, s), err);
}

/* Appends tokens[0, n) to the plan's tokens; returns their offset, or -1. */
static int32_t log_tokens(engine_tp *t, const int32_t *tokens, int32_t n)
{
    if (t->n_toks + n > t->cap_toks) {
        int32_t cap = t->cap_toks ? t->cap_toks : 1024;
        while (cap < t->n_toks + n)
            cap *= 2;
        int32_t *p = realloc(t->toks, (size_t)cap * sizeof *p);
        if (!p)
            return -1;
        t->toks = p;
        t->cap_toks = cap;
    }
    memcpy(t->toks + t->n_toks, tokens, (size_t)n * sizeof *tokens);
    t->n_toks += n;
    return t->n_toks - n;
}

ekv_status engine_tp_save(ekv_engine *e, const kv_seq *s, const int32_t *tokens, int32_t n,
                          int32_t first_block, ekv_error *err)
{
    engine_tp *t = e->tp;
    const int32_t bt = kv_pool_block_tokens(e->pool), whole = n / bt * bt;
    if (!t || whole / bt <= first_block)
        return EKV_OK; /* nothing new to store: no rank saves */
    tp_op op = {.code = OP_SAVE, .id = slot_of(t, s), .parent = -1, .pos0 = first_block,
                .n_tok = whole};
    if (op.id < 0)
        return ekv_error_set(err, EKV_EINVAL, "tensor parallelism: save of an unknown sequence");
    if ((op.tok_off = log_tokens(t, tokens, whole)) < 0)
        return ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory for a save");
    return log_op(t, &op, err);
}

/* Keeps the first m tokens of every head of s, whose heads all hold the
 * same restored prefix at positions 0, 1, ... */
static ekv_status seq_cut(kv_seq *s, int32_t m, ekv_error *err)
{
    int32_t *keep = m > 0 ? malloc((size_t)m * sizeof *keep) : NULL;
    if (m > 0 && !keep)
        return ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory");
    for (int32_t i = 0; i < m; i++)
        keep[i] = i;
    ekv_status rc = EKV_OK;
    for (int32_t l = 0; l < kv_seq_n_layers(s) && !rc; l++)
        for (int32_t h = 0; h < kv_seq_n_kv_heads(s) && !rc; h++)
            if (kv_seq_len(s, l, h) > m)
                rc = kv_seq_keep(s, l, h, keep, m, err);
    free(keep);
    return rc;
}

/* Every rank's restored tokens (mine first put at my rank), and the least. */
static ekv_status agree(ekv_comm *c, int32_t mine, int32_t *held, int32_t *least, ekv_error *err)
{
    ekv_status rc = comm_allgather(c, &mine, sizeof mine, held, err);
    if (rc)
        return rc;
    *least = mine;
    for (int32_t r = 0; r < comm_size(c); r++)
        if (held[r] < *least)
            *least = held[r];
    return EKV_OK;
}

int32_t engine_tp_restore(ekv_engine *e, kv_seq *s, const int32_t *tokens, int32_t got,
                          ekv_error *err)
{
    engine_tp *t = e->tp;
    if (!t || got <= 0)
        return got;
    tp_op op = {.code = OP_RESTORE, .id = slot_of(t, s), .parent = -1, .n_tok = got};
    int32_t *held = calloc((size_t)comm_size(t->comm), sizeof *held);
    int32_t least = 0;
    ekv_status rc = EKV_OK;
    if (!held || (op.tok_off = log_tokens(t, tokens, got)) < 0)
        rc = ekv_error_set(err, EKV_ENOMEM, "tensor parallelism: out of memory for a restore");
    else if (op.id < 0)
        rc = ekv_error_set(err, EKV_EINVAL, "tensor parallelism: restore of an unknown sequence");
    else if (!(rc = log_op(t, &op, err)) && !(rc = send_plan(e, TP_RESTORE, 0, op.id, err)) &&
             (rc = agree(t->comm, got, held, &least, err)) != EKV_OK) {
        char why[sizeof err->msg + 64];
        snprintf(why, sizeof why, "tensor-parallel group broken: %s", err->msg);
        engine_tp_break(e, why);
    }
    if (rc == EKV_OK && least < got)
        rc = seq_cut(s, least, err); /* a rank lacks its shard of the rest */
    const engine_prefix_cache *pc = e->cfg.prefix_cache;
    if (rc == EKV_OK && pc->tp_agreed)
        pc->tp_agreed(pc->ctx, held, comm_size(t->comm), least);
    free(held);
    return rc ? -1 : least;
}

void engine_tp_ping(ekv_engine *e)
{
    ekv_error err = {0};
    (void)send_plan(e, TP_PING, 0, 0, &err);
}

void engine_tp_end(ekv_engine *e)
{
    ekv_error err = {0};
    if (e->tp)
        (void)send_plan(e, TP_END, 0, 0, &err);
}

int engine_tp_heartbeat_ms(const ekv_engine *e)
{
    return e->tp ? e->tp->heartbeat_ms : 0;
}

/* ---- ranks 1..N-1 ---- */

typedef struct follower {
    const ekv_model *m;
    ekv_runtime *rt;
    kv_pool *pool;
    const engine_prefix_cache *pc; /* this rank's own; NULL: none */
    pthread_mutex_t mu;            /* a restore's wake */
    pthread_cond_t cv;
    int32_t restored;              /* OP_RESTORE's tokens, for TP_RESTORE's agreement */
    const int32_t *toks;           /* the plan's tokens */
    int32_t n_toks;
    const model_shard *shard;
    const kvc_profile *profile;
    int32_t n_slots, max_batch;
    kv_seq **seqs;
    kvc_capture **caps;
    kvc_scope **scopes;
    const model_tap **taps;
    uint8_t *probe_rows;    /* per row of the step: a SCOPE row */
    const int32_t *row_ids; /* the step's sequence ids (for the probe) */
    model_tap tap;
    int32_t n_taps;
} follower;

static void follower_dispatch_tap(void *ctx, int32_t layer, const model_batch *b, const float *q)
{
    const follower *f = ctx;
    for (int32_t i = 0; i < f->n_taps; i++)
        f->taps[i]->fn(f->taps[i]->ctx, layer, b, q);
}

static void follower_dispatch_probe(void *ctx, int32_t layer, int32_t row, int32_t kv_head,
                                    const float *logits, const float *probs, int32_t n_q,
                                    int32_t n_tokens)
{
    const follower *f = ctx;
    const int32_t id = f->row_ids[row];
    kvc_scope_observe(f->scopes[id], f->seqs[id], layer, kv_head, logits, probs, n_q, n_tokens);
}

static ekv_status bad_plan(ekv_error *err, const char *what, long v)
{
    return ekv_error_set(err, EKV_EFORMAT, "tensor parallelism: malformed plan: %s (%ld)", what,
                         v);
}

static ekv_status check_id(const follower *f, int32_t id, bool used, ekv_error *err)
{
    if (id < 0 || id >= f->n_slots)
        return bad_plan(err, "sequence id out of range", id);
    if (used != (f->seqs[id] != NULL))
        return bad_plan(err, used ? "sequence id not in use" : "sequence id already in use", id);
    return EKV_OK;
}

static void drop_seq(follower *f, int32_t id)
{
    kv_seq_free(f->seqs[id]);
    f->seqs[id] = NULL;
    kvc_capture_free(f->caps[id]);
    f->caps[id] = NULL;
    kvc_scope_free(f->scopes[id]);
    f->scopes[id] = NULL;
}

/* The prefix cache's wake: the restore this rank waits on is ready. */
static void follower_wake(void *arg)
{
    follower *f = arg;
    pthread_mutex_lock(&f->mu);
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
}

/* Restores tokens[0, n) of this rank's heads into the empty seq, waiting
 * for the store and the copy (bounded by the store's op timeout); returns
 * the tokens restored (0: a miss). */
static int32_t follower_restore(follower *f, kv_seq *seq, const int32_t *tokens, int32_t n)
{
    const engine_prefix_cache *pc = f->pc;
    void *job = pc ? pc->restore_start(pc->ctx, tokens, n, n, follower_wake, f) : NULL;
    if (!job)
        return 0;
    int32_t got = pc->restore_finish(pc->ctx, job, seq); /* waits for the gets */
    while (got < 0) { /* the copier fills the blocks */
        pthread_mutex_lock(&f->mu);
        while (!pc->restore_ready(pc->ctx, job)) /* a wake takes mu: none is missed */
            pthread_cond_wait(&f->cv, &f->mu);
        pthread_mutex_unlock(&f->mu);
        got = pc->restore_finish(pc->ctx, job, seq);
    }
    return got;
}

/* OP_SAVE's and OP_RESTORE's tokens: in the plan, in the vocabulary. */
static ekv_status check_toks(const follower *f, const tp_op *op, ekv_error *err)
{
    if (op->tok_off < 0 || op->n_tok <= 0 || op->n_tok > f->n_toks - op->tok_off)
        return bad_plan(err, "tokens outside the plan's", op->tok_off);
    const int32_t n_vocab = model_config(f->m)->n_vocab;
    for (int32_t i = 0; i < op->n_tok; i++)
        if (f->toks[op->tok_off + i] < 0 || f->toks[op->tok_off + i] >= n_vocab)
            return bad_plan(err, "token outside the vocabulary", f->toks[op->tok_off + i]);
    return EKV_OK;
}

static ekv_status apply_op(follower *f, const tp_op *op, ekv_error *err)
{
    const ekv_model_config *c = model_config(f->m);
    ekv_status rc;
    switch (op->code) {
    case OP_CREATE:
        if ((rc = check_id(f, op->id, false, err)))
            return rc;
        f->seqs[op->id] = kv_seq_create(f->pool, c->n_layers, f->shard->n_kv_heads, err);
        return f->seqs[op->id] ? EKV_OK : (err->code ? err->code : EKV_ENOMEM);
    case OP_FREE:
        if ((rc = check_id(f, op->id, true, err)))
            return rc;
        drop_seq(f, op->id);
        return EKV_OK;
    case OP_FORK:
        if ((rc = check_id(f, op->id, false, err)) || (rc = check_id(f, op->parent, true, err)))
            return rc;
        f->seqs[op->id] = kv_seq_fork(f->seqs[op->parent], err);
        return f->seqs[op->id] ? EKV_OK : (err->code ? err->code : EKV_ENOMEM);
    case OP_CAPTURE: {
        if ((rc = check_id(f, op->id, true, err)))
            return rc;
        if (f->caps[op->id])
            return bad_plan(err, "a second capture for sequence", op->id);
        if (op->method < 0 || !kvc_method_name((kvc_method_id)op->method))
            return bad_plan(err, "compression method", op->method);
        if (op->has_profile && !f->profile)
            return ekv_error_set(err, EKV_EINVAL,
                                 "tensor parallelism: rank 0 compresses with an UNComp profile "
                                 "this rank has not loaded (--kv-profile on every rank)");
        kvc_policy p = {.method = (kvc_method_id)op->method, .budget = op->budget,
                        .profile = op->has_profile ? f->profile : NULL,
                        .recall_gather = op->recall_gather}; /* kvc_policy_check bounds it */
        p.spark.ratio = op->spark_ratio;
        p.spark.recovery = (kvc_spark_recovery)op->spark_recovery;
        if (op->recall_no_promote != 0 && op->recall_no_promote != 1)
            return bad_plan(err, "recall's promotion switch", op->recall_no_promote);
        p.recall = op->recall;
        p.recall_every = op->recall_every;
        p.recall_no_promote = (uint8_t)op->recall_no_promote;
        ekv_error why = {0};
        if (kvc_policy_check(&p, &why)) /* rank 0 checked its request's */
            return bad_plan(err, why.msg, op->id);
        f->caps[op->id] = kvc_capture_create_shard(&p, f->m, f->shard, op->n_prompt, op->pos0, err);
        return f->caps[op->id] ? EKV_OK : (err->code ? err->code : EKV_ENOMEM);
    }
    case OP_SCOPE: {
        if ((rc = check_id(f, op->id, true, err)))
            return rc;
        if (f->scopes[op->id])
            return bad_plan(err, "a second SCOPE for sequence", op->id);
        if (op->scope_mode <= KVC_DECODE_NONE || op->scope_mode >= KVC_DECODE_N_MODES)
            return bad_plan(err, "SCOPE mode", op->scope_mode);
        const kvc_decode_policy d = {.mode = (kvc_decode_mode)op->scope_mode,
                                     .recent = op->scope_recent, .window = op->scope_window,
                                     .max_new = op->scope_max_new};
        f->scopes[op->id] = kvc_scope_create(&d, f->seqs[op->id], op->max_new, err);
        return f->scopes[op->id] ? EKV_OK : (err->code ? err->code : EKV_ENOMEM);
    }
    case OP_SAVE: /* rank 0 saved its heads: this rank saves its own */
        if ((rc = check_id(f, op->id, true, err)) || (rc = check_toks(f, op, err)))
            return rc;
        if (op->pos0 < 0 || op->pos0 >= op->n_tok / kv_pool_block_tokens(f->pool) ||
            op->n_tok % kv_pool_block_tokens(f->pool))
            return bad_plan(err, "a save's blocks", op->pos0);
        if (f->pc)
            f->pc->save(f->pc->ctx, f->seqs[op->id], f->toks + op->tok_off, op->n_tok, op->pos0);
        return EKV_OK;
    case OP_RESTORE: /* checked by follow_loop: TP_RESTORE's last op, on its sequence */
        if ((rc = check_toks(f, op, err)))
            return rc;
        if (kv_seq_max_len(f->seqs[op->id]) != 0)
            return bad_plan(err, "a restore into a sequence that holds tokens", op->id);
        f->restored = follower_restore(f, f->seqs[op->id], f->toks + op->tok_off, op->n_tok);
        return EKV_OK;
    default: return bad_plan(err, "op code", op->code);
    }
}

static ekv_status follow_step(follower *f, const tp_plan_hdr *h, const int32_t *rows,
                              ekv_error *err)
{
    const int32_t n = h->n_rows;
    const int32_t *tok = rows, *pos = rows + n, *ids = rows + 2 * n, *steps = rows + 3 * n;
    const int32_t n_vocab = model_config(f->m)->n_vocab;
    f->n_taps = 0;
    bool probing = false;
    for (int32_t i = 0; i < n; i++) {
        ekv_status rc = check_id(f, ids[i], true, err);
        if (rc)
            return rc;
        f->probe_rows[i] = steps[i] >= 0;
        if (steps[i] >= 0) { /* a SCOPE sequence runs one row a step */
            if (!f->scopes[ids[i]])
                return bad_plan(err, "a SCOPE row of a sequence without SCOPE", ids[i]);
            kvc_scope_begin(f->scopes[ids[i]], steps[i]);
            probing = true;
        }
        if (tok[i] < 0 || tok[i] >= n_vocab)
            return bad_plan(err, "token outside the vocabulary", tok[i]);
        /* one tap per captured sequence: it keeps its own rows of the batch */
        bool seen = false;
        for (int32_t j = 0; j < i && !seen; j++)
            seen = ids[j] == ids[i];
        const model_tap *t =
            !seen && f->caps[ids[i]] ? kvc_capture_tap(f->caps[ids[i]], f->seqs[ids[i]]) : NULL;
        if (t)
            f->taps[f->n_taps++] = t;
    }
    f->row_ids = ids;
    const model_probe probe = {.rows = f->probe_rows, .fn = follower_dispatch_probe, .ctx = f};
    model_batch b = {.n = n, .tokens = tok, .pos = pos, .seq_ids = ids, .seq_table = f->seqs,
                     .n_seq_table = f->n_slots, .tap = f->n_taps ? &f->tap : NULL,
                     .probe = probing ? &probe : NULL};
    ekv_status rc = model_forward(f->rt, &b, NULL, err);
    for (int32_t i = 0; i < n && !rc; i++) /* rank 0 finishes its own on such an error */
        if (steps[i] >= 0)
            rc = kvc_scope_status(f->scopes[ids[i]], err);
    return rc;
}

static ekv_status follow_loop(follower *f, ekv_comm *comm, ekv_error *err)
{
    unsigned char *msg = NULL;
    size_t msg_cap = 0;
    ekv_status rc = EKV_OK;
    for (uint32_t counter = 0;; counter++) {
        tp_plan_hdr h;
        if ((rc = comm_broadcast(comm, &h, sizeof h, 0, err)))
            break;
        if (h.magic != TP_PLAN_MAGIC || h.version != TP_PLAN_VERSION) {
            rc = bad_plan(err, "magic or version", (long)h.version);
            break;
        }
        if (h.kind >= TP_N_KINDS || h.counter != counter || h.n_ops < 0 || h.n_rows < 0 ||
            h.n_rows > f->max_batch || h.n_ops > (1 << 20) || h.n_toks > (1u << 26) ||
            (size_t)h.payload_bytes != (size_t)h.n_ops * sizeof(tp_op) +
                                           ((size_t)h.n_rows * ROW_INTS + h.n_toks) * 4) {
            rc = bad_plan(err, "header fields (kind, counter, counts or length)", (long)h.kind);
            break;
        }
        if (h.payload_bytes &&
            ((rc = tp_grow_msg(&msg, &msg_cap, h.payload_bytes, err)) ||
             (rc = comm_broadcast(comm, msg, h.payload_bytes, 0, err))))
            break;
        f->toks = (const int32_t *)(const void *)(msg + (size_t)h.n_ops * sizeof(tp_op) +
                                                  (size_t)h.n_rows * ROW_INTS * 4);
        f->n_toks = (int32_t)h.n_toks;
        f->restored = -1;
        kv_pool_reap(f->pool); /* saves' and restores' pins the copier let go */
        for (int32_t i = 0; i < h.n_ops && !rc; i++) {
            tp_op op;
            memcpy(&op, msg + (size_t)i * sizeof op, sizeof op);
            /* a restore comes alone, last in its own plan, whose agreement
             * (below) follows it */
            if ((op.code == OP_RESTORE) !=
                (h.kind == TP_RESTORE && i == h.n_ops - 1 && op.id == h.arg)) {
                rc = bad_plan(err, "a restore outside its plan", op.id);
                break;
            }
            if (op.code == OP_RESTORE && (rc = check_id(f, op.id, true, err)))
                break;
            rc = apply_op(f, &op, err);
        }
        if (rc || h.kind == TP_END)
            break;
        if (h.kind == TP_PING) {
            rc = comm_barrier(comm, err);
        } else if (h.kind == TP_RESTORE) {
            int32_t *held = calloc((size_t)comm_size(comm), sizeof *held), least = 0;
            if (f->restored < 0)
                rc = bad_plan(err, "a restore plan without its restore", h.arg);
            else if (!held)
                rc = ekv_error_set(err, EKV_ENOMEM, "out of memory");
            else if (!(rc = agree(comm, f->restored, held, &least, err)) && least < f->restored)
                rc = seq_cut(f->seqs[h.arg], least, err); /* a rank lacks the rest */
            free(held);
        } else if (h.kind == TP_STEP) {
            int32_t *rows = (int32_t *)(void *)(msg + (size_t)h.n_ops * sizeof(tp_op));
            rc = h.n_rows > 0 ? follow_step(f, &h, rows, err) : bad_plan(err, "empty step", 0);
        } else { /* TP_COMPRESS */
            if (!(rc = check_id(f, h.arg, true, err)) && !f->caps[h.arg])
                rc = bad_plan(err, "compression of a sequence without a capture", h.arg);
            kvc_report rep;
            if (!rc)
                rc = kvc_capture_compress(f->caps[h.arg], f->rt, f->seqs[h.arg], &rep, err);
            if (!rc) {
                kvc_capture_free(f->caps[h.arg]);
                f->caps[h.arg] = NULL;
            }
        }
        if (rc)
            break;
    }
    free(msg);
    return rc;
}

ekv_status engine_tp_follow(const ekv_model *m, const engine_config *cfg, ekv_comm *comm,
                            const kvc_profile *profile, ekv_error *err)
{
    if (!m || !cfg || !comm || comm_rank(comm) == 0)
        return ekv_error_set(err, EKV_EINVAL, "engine_tp_follow: not a follower rank");
    follower f = {.m = m, .profile = profile, .n_slots = cfg->max_running,
                  .max_batch = cfg->max_batch, .pc = cfg->prefix_cache};
    pthread_mutex_init(&f.mu, NULL);
    pthread_cond_init(&f.cv, NULL);
    f.tap = (model_tap){.fn = follower_dispatch_tap, .ctx = &f};
    ekv_status rc = EKV_OK;
    f.rt = model_runtime_create_tp(m, cfg->max_batch, cfg->max_ctx, cfg->n_threads, comm, err);
    /* Rank 0 admits by its own pool. With the same tokens per head, a
     * follower (never more KV heads than rank 0) needs no more blocks under
     * budgets equal across heads; per-head budgets (UNComp, SparK) can give
     * a follower's heads more tokens than rank 0's, hence the headroom. */
    if (f.rt)
        f.shard = model_runtime_shard(f.rt);
    if (!f.rt ||
        !(f.pool = model_kv_pool_create_shard(m, f.shard, cfg->kv_tokens * ENGINE_TP_POOL_HEADROOM,
                                              err)) ||
        !(f.seqs = calloc((size_t)f.n_slots, sizeof *f.seqs)) ||
        !(f.caps = calloc((size_t)f.n_slots, sizeof *f.caps)) ||
        !(f.scopes = calloc((size_t)f.n_slots, sizeof *f.scopes)) ||
        !(f.probe_rows = calloc((size_t)cfg->max_batch, 1)) ||
        !(f.taps = calloc((size_t)cfg->max_batch, sizeof *f.taps))) {
        rc = err && err->code ? err->code : ekv_error_set(err, EKV_ENOMEM, "out of memory");
    } else {
        rc = follow_loop(&f, comm, err);
    }
    for (int32_t i = 0; f.seqs && i < f.n_slots; i++)
        if (f.seqs[i])
            drop_seq(&f, i);
    free(f.seqs);
    free(f.caps);
    free(f.scopes);
    free(f.probe_rows);
    free(f.taps);
    kv_pool_destroy(f.pool); /* waits for the copier's pins on saves */
    model_runtime_free(f.rt);
    pthread_cond_destroy(&f.cv);
    pthread_mutex_destroy(&f.mu);
    return rc;
}
