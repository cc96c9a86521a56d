/*
 * kvprefix.c - prompt KV blocks to and from the KV store (see kvprefix.h).
 */
#include "entrokv/kvprefix.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/sha256.h"

struct kvprefix {
    kvstore_client *client;
    char model_id[160];
    int32_t L, HKV, bt, tp_rank, tp_size;
    size_t block_bytes, value_bytes; /* one head's block; one block-row of every head */
    _Atomic uint64_t saved, skipped, restored, misses, restored_tokens, recalled_tokens;
    int32_t head_dim;
    void (*on_saved)(void *); /* kvprefix_on_saved */
    void *on_saved_arg;
    /* the copier: saves' blocks are copied out of the pool here, not on
     * the engine's thread */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* work queued, or a job done (kvprefix_drain) */
    struct save_job *head, *tail; /* queued saves, oldest first */
    int32_t queued;         /* on the queue or being copied */
    bool stop;
    bool held;              /* kvprefix_hold: the copier starts nothing */
};

/* A save: queued with its blocks pinned, then copied into values, which
 * the store's puts send. */
typedef struct save_job {
    kvprefix *p;
    kv_pin *pin;
    int32_t n_blocks, first_block, n_save;
    int32_t *tokens;   /* the n_blocks whole blocks' tokens: the copier makes the keys */
    kvstore_op *ops;
    uint8_t *values;
    struct kvprefix_job *restore; /* set: not a save, this restore's copy into the pool */
    /* kvprefix_on_saved's callback, copied at submit: the puts' done runs on
     * the store client's thread and may outlive the kvprefix */
    void (*on_saved)(void *);
    void *on_saved_arg;
    struct save_job *next;
} save_job;

/* Saves queued or being copied at most: beyond, a save is skipped (its
 * pins would hold pool blocks the engine may need). */
#define KVPREFIX_MAX_QUEUED 8

static bool start_copier(kvprefix *p);
static void restore_copy(struct kvprefix_job *j);

/* The model's identity: its shape and name, plus a hash of the start of its
 * token embeddings, so two finetunes of one architecture never share KV. */
void kvprefix_model_id(const ekv_model *m, char *out, size_t cap)
{
    const ekv_model_config *c = model_config(m);
    const gguf_tensor *t = gguf_find_tensor(model_gguf(m), "token_embd.weight");
    uint8_t h[32] = {0};
    if (t) {
        ekv_sha256 s;
        sha256_init(&s);
        sha256_update(&s, t->data, t->nbytes < 65536 ? (size_t)t->nbytes : 65536);
        sha256_final(&s, h);
    }
    snprintf(out, cap, "%s/%d/%d/%d/%d/%d/%02x%02x%02x%02x%02x%02x%02x%02x", c->arch,
             c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->n_vocab, h[0], h[1], h[2],
             h[3], h[4], h[5], h[6], h[7]);
}

kvprefix *kvprefix_create(const ekv_model *m, kvstore_client *client, int32_t tp_rank,
                          int32_t tp_size, ekv_error *err)
{
    const ekv_model_config *c = model_config(m);
    /* under TP a value holds this rank's KV heads only (its pool's layout) */
    model_shard sh;
    if (model_shard_plan(m, tp_rank, tp_size, &sh, err))
        return NULL;
    kvprefix *p = calloc(1, sizeof *p);
    kv_pool *probe = model_kv_pool_create_shard(m, &sh, 16, err);
    if (!p || !probe) {
        free(p);
        kv_pool_destroy(probe);
        if (!probe)
            return NULL;
        ekv_error_set(err, EKV_ENOMEM, "kvprefix: out of memory");
        return NULL;
    }
    p->client = client;
    p->L = c->n_layers;
    p->HKV = sh.n_kv_heads;
    p->bt = kv_pool_block_tokens(probe);
    p->head_dim = c->head_dim;
    p->block_bytes = kv_pool_block_bytes(probe);
    p->value_bytes = (size_t)p->L * p->HKV * p->block_bytes;
    p->tp_rank = tp_rank;
    p->tp_size = tp_size;
    kv_pool_destroy(probe);
    kvprefix_model_id(m, p->model_id, sizeof p->model_id);
    if (!start_copier(p)) {
        free(p);
        ekv_error_set(err, EKV_ENOMEM, "kvprefix: cannot start the copy thread");
        return NULL;
    }
    return p;
}

void kvprefix_destroy(kvprefix *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL); /* it finishes the queue first */
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

void kvprefix_hold(kvprefix *p, bool held)
{
    pthread_mutex_lock(&p->mu);
    p->held = held;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void kvprefix_drain(kvprefix *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    while (p->queued > 0)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void kvprefix_on_saved(kvprefix *p, void (*fn)(void *), void *arg)
{
    p->on_saved = fn;
    p->on_saved_arg = arg;
}

/* keys[i] for block i of tokens (whole blocks only). */
static void make_keys(const kvprefix *p, const int32_t *tokens, int32_t n_blocks,
                      kvstore_key *keys)
{
    uint8_t chain[KVSTORE_HASH_BYTES] = {0};
    for (int32_t i = 0; i < n_blocks; i++) {
        const int32_t *blk = tokens + (size_t)i * p->bt;
        kvstore_key_make(p->model_id, chain, blk, p->bt, -1, -1, p->tp_rank, p->tp_size,
                         &keys[i]);
        kvstore_chain_hash(chain, blk, p->bt, chain);
    }
}

static void save_job_free(save_job *job)
{
    free(job->tokens);
    free(job->values);
    free(job->ops);
    free(job);
}

static void save_done(kvstore_batch *b, kvstore_op *ops, size_t n, void *arg)
{
    save_job *job = arg; /* no job->p here: the kvprefix may already be destroyed */
    if (job->on_saved)
        job->on_saved(job->on_saved_arg);
    save_job_free(job);
}

/* On the copier: the pinned blocks into one value per block-row, the pins
 * released (the pool gets them back once the sequence lets go too), then
 * the puts. */
static void save_copy(save_job *job)
{
    kvprefix *p = job->p;
    const int32_t n_save = job->n_save;
    kvstore_key *keys = malloc((size_t)job->n_blocks * sizeof *keys);
    job->ops = calloc((size_t)n_save, sizeof *job->ops);
    job->values = malloc((size_t)n_save * p->value_bytes);
    if (keys && job->ops && job->values) {
        make_keys(p, job->tokens, job->n_blocks, keys); /* the chain runs over every block */
        for (int32_t i = 0; i < n_save; i++) {
            uint8_t *v = job->values + (size_t)i * p->value_bytes;
            for (int32_t l = 0; l < p->L; l++)
                for (int32_t h = 0; h < p->HKV; h++)
                    memcpy(v + ((size_t)l * p->HKV + h) * p->block_bytes,
                           kv_pin_block(job->pin, l, h, i), p->block_bytes);
            job->ops[i] = (kvstore_op){.kind = KVSTORE_PUT, .key = keys[job->first_block + i],
                                       .buf = v, .len = p->value_bytes};
        }
    }
    free(keys);
    kv_pin_release(job->pin);
    job->pin = NULL;
    if (job->ops && job->values) {
        /* counted first: the puts' done (on_saved) may run before submit returns */
        atomic_fetch_add(&p->saved, (uint64_t)n_save);
        job->on_saved = p->on_saved;
        job->on_saved_arg = p->on_saved_arg;
        job->p = NULL; /* save_done must not reach the kvprefix */
        if (kvstore_client_submit(p->client, job->ops, (size_t)n_save, save_done, job, NULL,
                                  NULL) == EKV_OK)
            return;
        atomic_fetch_sub(&p->saved, (uint64_t)n_save);
    }
    atomic_fetch_add(&p->skipped, 1);
    save_job_free(job);
}

static void *copier_main(void *arg)
{
    kvprefix *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while ((!p->head || p->held) && !p->stop)
            pthread_cond_wait(&p->cv, &p->mu);
        save_job *job = p->head;
        if (!job)
            break; /* stopping with nothing left */
        p->head = job->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->mu);
        if (job->restore) {
            restore_copy(job->restore);
            save_job_free(job);
        } else {
            save_copy(job);
        }
        pthread_mutex_lock(&p->mu);
        p->queued--;
        pthread_cond_broadcast(&p->cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static bool start_copier(kvprefix *p)
{
    if (pthread_mutex_init(&p->mu, NULL))
        return false;
    if (pthread_cond_init(&p->cv, NULL)) {
        pthread_mutex_destroy(&p->mu);
        return false;
    }
    if (pthread_create(&p->thread, NULL, copier_main, p)) {
        pthread_cond_destroy(&p->cv);
        pthread_mutex_destroy(&p->mu);
        return false;
    }
    return true;
}

static void enqueue(kvprefix *p, save_job *job)
{
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = job;
    else
        p->head = job;
    p->tail = job;
    p->queued++;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void kvprefix_save(kvprefix *p, const kv_seq *seq, const int32_t *tokens, int32_t n,
                   int32_t first_block)
{
    const int32_t n_blocks = n / p->bt;
    if (first_block < 0)
        first_block = 0;
    if (n_blocks <= first_block)
        return;
    kv_pool *pool = kv_seq_pool(seq);
    kv_pool_reap(pool); /* the pool's thread: earlier saves' pins go back */
    const int32_t n_save = n_blocks - first_block;
    /* what pinning costs the pool later: compression's compaction writes
     * into kept blocks, and each pinned one is copied first */
    const int64_t pinned = (int64_t)n_save * p->L * p->HKV;
    pthread_mutex_lock(&p->mu);
    const bool room = p->queued < KVPREFIX_MAX_QUEUED;
    pthread_mutex_unlock(&p->mu);
    save_job *job = NULL;
    int32_t *toks = NULL;
    if (!room || kv_pool_free_blocks(pool) < pinned)
        goto skip;
    job = calloc(1, sizeof *job);
    toks = malloc((size_t)n_blocks * p->bt * sizeof *toks);
    if (!job || !toks)
        goto skip;
    memcpy(toks, tokens, (size_t)n_blocks * p->bt * sizeof *toks);
    *job = (save_job){.p = p, .n_blocks = n_blocks, .first_block = first_block,
                      .n_save = n_save, .tokens = toks};
    toks = NULL;
    /* references, not a copy: the copier reads the blocks meanwhile */
    if (!(job->pin = kv_seq_pin(seq, first_block, n_save, NULL)))
        goto skip;
    enqueue(p, job);
    return;
skip:
    atomic_fetch_add(&p->skipped, 1);
    free(toks);
    if (job)
        save_job_free(job);
}

struct kvprefix_job {
    kvprefix *p;
    int32_t n_blocks;
    kvstore_op *ops;
    uint8_t *values;
    kvstore_batch *batch;
    void (*wake)(void *);
    void *wake_arg;
    _Atomic bool arrived; /* every get has its result */
    atomic_int owners;    /* the engine's (until finish), the store's (until done) and,
                             while it copies, the copier's */
    pthread_mutex_t mu;   /* a wake and a drop never overlap */
    pthread_cond_t cv;    /* copied (kvprefix_restore waits on it) */
    bool dropped;         /* under mu: nobody to wake */
    /* the second half: the copier fills the blocks finish reserved */
    bool placing;         /* the engine's: finish reserved got blocks and queued the copy */
    int32_t got;          /* block-rows being copied */
    kv_pin *pin;          /* on the reserved blocks, until the copier releases it */
    _Atomic bool copied;
};

static void job_free(kvprefix_job *j)
{
    pthread_cond_destroy(&j->cv);
    pthread_mutex_destroy(&j->mu);
    free(j->ops);
    free(j->values);
    free(j);
}

/* Drops one owner's hold on j; the last one frees it. */
static void job_put(kvprefix_job *j)
{
    if (atomic_fetch_sub(&j->owners, 1) == 1)
        job_free(j);
}

static void job_arrived(kvstore_batch *b, kvstore_op *ops, size_t n, void *arg)
{
    kvprefix_job *j = arg;
    atomic_store(&j->arrived, true);
    /* a job dropped before now has no engine to wake (it may be gone) */
    pthread_mutex_lock(&j->mu);
    if (j->wake && !j->dropped)
        j->wake(j->wake_arg);
    pthread_mutex_unlock(&j->mu);
    job_put(j);
}

/* Gets the block-rows of tokens' first n_blocks blocks that need[] marks
 * (all of them with need NULL), in one batch; the k-th one asked for lands
 * in ops[k] and values + k * value_bytes. NULL when the store is busy or
 * memory is short. */
static kvprefix_job *job_start(kvprefix *p, const int32_t *tokens, int32_t n_blocks,
                               const bool *need, void (*wake)(void *), void *wake_arg)
{
    int32_t n_get = 0;
    for (int32_t i = 0; i < n_blocks; i++)
        n_get += !need || need[i];
    if (n_get == 0)
        return NULL;
    kvprefix_job *j = calloc(1, sizeof *j);
    kvstore_key *keys = malloc((size_t)n_blocks * sizeof *keys);
    if (j) {
        *j = (kvprefix_job){.p = p, .n_blocks = n_get, .wake = wake, .wake_arg = wake_arg};
        atomic_init(&j->owners, 2);
        pthread_mutex_init(&j->mu, NULL);
        pthread_cond_init(&j->cv, NULL);
        j->ops = calloc((size_t)n_get, sizeof *j->ops);
        j->values = malloc((size_t)n_get * p->value_bytes);
    }
    if (!j || !keys || !j->ops || !j->values)
        goto fail;
    make_keys(p, tokens, n_blocks, keys);
    for (int32_t i = 0, k = 0; i < n_blocks; i++)
        if (!need || need[i]) {
            j->ops[k] = (kvstore_op){.kind = KVSTORE_GET, .key = keys[i],
                                     .buf = j->values + (size_t)k * p->value_bytes,
                                     .len = p->value_bytes};
            k++;
        }
    if (kvstore_client_submit(p->client, j->ops, (size_t)n_get, job_arrived, j, &j->batch,
                              NULL) != EKV_OK)
        goto fail;
    free(keys);
    return j;
fail:
    free(keys);
    if (j)
        job_free(j);
    return NULL;
}

/* Whether the k-th get of a finished job brought a whole block-row. */
static bool job_got(const kvprefix_job *j, int32_t k)
{
    return j->ops[k].result == KVSTORE_OK && j->ops[k].value_len == j->p->value_bytes;
}

kvprefix_job *kvprefix_restore_start(kvprefix *p, const int32_t *tokens, int32_t n,
                                     int32_t max_tokens, void (*wake)(void *), void *wake_arg)
{
    const int32_t n_blocks = (n < max_tokens ? n : max_tokens) / p->bt;
    if (n_blocks <= 0)
        return NULL;
    kvprefix_job *j = job_start(p, tokens, n_blocks, NULL, wake, wake_arg);
    if (!j)
        atomic_fetch_add(&p->misses, 1);
    return j;
}

bool kvprefix_restore_ready(const kvprefix_job *j)
{
    return j->placing ? atomic_load(&j->copied) : atomic_load(&j->arrived);
}

/* On the copier: the arrived block-rows into the blocks finish reserved
 * (unless the request was dropped meanwhile), then the pin released and
 * the engine woken. */
static void restore_copy(kvprefix_job *j)
{
    kvprefix *p = j->p;
    pthread_mutex_lock(&j->mu);
    const bool dropped = j->dropped;
    pthread_mutex_unlock(&j->mu);
    for (int32_t i = 0; i < j->got && !dropped; i++) {
        const uint8_t *v = j->values + (size_t)i * p->value_bytes;
        for (int32_t l = 0; l < p->L; l++)
            for (int32_t h = 0; h < p->HKV; h++)
                memcpy(kv_pin_block_write(j->pin, l, h, i),
                       v + ((size_t)l * p->HKV + h) * p->block_bytes, p->block_bytes);
    }
    kv_pin_release(j->pin); /* the pool's thread reaps it: before finish reads the blocks */
    j->pin = NULL;
    pthread_mutex_lock(&j->mu);
    atomic_store(&j->copied, true);
    if (j->wake && !j->dropped)
        j->wake(j->wake_arg);
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    job_put(j);
}

int32_t kvprefix_restore_finish(kvprefix_job *j, kv_seq *seq)
{
    kvprefix *p = j->p;
    if (!seq) {
        /* a drop (a cancel, say) never waits on the store nor the copier:
         * the engine goes on at once, and whichever of us is last frees the
         * job (a pending copy's pin keeps its blocks until it is done) */
        pthread_mutex_lock(&j->mu); /* waits out a wake in progress, never the store */
        j->dropped = true;
        pthread_mutex_unlock(&j->mu);
        kvstore_batch_abandon(j->batch);
        j->batch = NULL;
        job_put(j);
        return 0;
    }
    kv_pool *pool = kv_seq_pool(seq);
    if (j->placing) { /* the copier is done (ready): the prefix is in seq */
        kv_pool_reap(pool); /* the copy's pin goes back: seq alone holds the blocks */
        const int32_t got = j->got;
        atomic_fetch_add(&p->restored, (uint64_t)got);
        atomic_fetch_add(&p->restored_tokens, (uint64_t)got * p->bt);
        job_put(j);
        return got * p->bt;
    }
    kvstore_batch_release(j->batch); /* waits if needed, bounded by the op timeout */
    j->batch = NULL;
    kv_pool_reap(pool); /* the pool's thread: saves' pins go back first */
    int32_t got = 0;
    if (kv_seq_max_len(seq) == 0) {
        int32_t n_blocks = j->n_blocks;
        const int64_t room = kv_pool_free_blocks(pool) / ((int64_t)p->L * p->HKV);
        if (n_blocks > room)
            n_blocks = (int32_t)room;
        while (got < n_blocks && job_got(j, got))
            got++;
    }
    /* the blocks are taken here, their bytes copied on the copier: the
     * engine keeps stepping the others and calls again once ready */
    if (got > 0 && (j->pin = kv_seq_reserve(seq, got, NULL))) {
        save_job *w = calloc(1, sizeof *w);
        if (w) {
            j->placing = true;
            j->got = got;
            w->p = p;
            w->restore = j;
            atomic_fetch_add(&j->owners, 1); /* the copier's */
            enqueue(p, w);
            return KVPREFIX_PENDING;
        }
        kv_pin_release(j->pin); /* no copy: give the blocks back */
        j->pin = NULL;
        for (int32_t l = 0; l < p->L; l++)
            for (int32_t h = 0; h < p->HKV; h++)
                kv_seq_keep(seq, l, h, NULL, 0, NULL);
        kv_pool_reap(pool);
    }
    atomic_fetch_add(&p->misses, 1);
    job_put(j); /* the store's done ran before the release returned: ours is the last */
    return 0;
}

int32_t kvprefix_restore(kvprefix *p, kv_seq *seq, const int32_t *tokens, int32_t n,
                         int32_t max_tokens)
{
    if (kv_seq_max_len(seq) != 0)
        return 0;
    kvprefix_job *j = kvprefix_restore_start(p, tokens, n, max_tokens, NULL, NULL);
    if (!j)
        return 0;
    int32_t got = kvprefix_restore_finish(j, seq);
    if (got != KVPREFIX_PENDING)
        return got;
    pthread_mutex_lock(&j->mu); /* the copier's turn */
    while (!atomic_load(&j->copied))
        pthread_cond_wait(&j->cv, &j->mu);
    pthread_mutex_unlock(&j->mu);
    return kvprefix_restore_finish(j, seq);
}

int64_t kvprefix_recall(kvprefix *p, kv_seq *seq, const int32_t *tokens, int32_t n,
                        const kvprefix_recall_req *reqs, int32_t n_reqs, ekv_error *err)
{
    const int32_t n_blocks = n / p->bt, d = p->head_dim;
    for (int32_t q = 0; q < n_reqs; q++) {
        const kvprefix_recall_req *r = &reqs[q];
        if (r->layer < 0 || r->layer >= p->L || r->head < 0 || r->head >= p->HKV || r->n < 0 ||
            (r->n > 0 && !r->pos))
            return ekv_error_set(err, EKV_EINVAL, "kv recall: bad request %d", q), -1;
        for (int32_t j = 0; j < r->n; j++)
            if (r->pos[j] < 0 || r->pos[j] >= n || (j > 0 && r->pos[j] <= r->pos[j - 1]))
                return ekv_error_set(err, EKV_EINVAL,
                                     "kv recall: positions must be increasing and in [0, %d)", n),
                       -1;
    }
    bool *need = calloc((size_t)n_blocks + 1, sizeof *need);
    int32_t *slot = malloc(((size_t)n_blocks + 1) * sizeof *slot);
    if (!need || !slot) {
        free(need);
        free(slot);
        return ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory"), -1;
    }
    for (int32_t q = 0; q < n_reqs; q++)
        for (int32_t j = 0; j < reqs[q].n; j++)
            if (reqs[q].pos[j] / p->bt < n_blocks)
                need[reqs[q].pos[j] / p->bt] = true;
    kv_pool_reap(kv_seq_pool(seq)); /* the pool's thread: saves' pins go back first */
    kvprefix_job *job = job_start(p, tokens, n_blocks, need, NULL, NULL);
    if (job)
        kvstore_batch_release(job->batch); /* waits, bounded by the client's op timeout */
    for (int32_t i = 0, k = 0; i < n_blocks; i++) /* block i's get in the job, or -1 */
        slot[i] = job && need[i] ? k++ : -1;
    int64_t recalled = 0;
    int32_t max_n = 0;
    for (int32_t q = 0; q < n_reqs; q++)
        max_n = reqs[q].n > max_n ? reqs[q].n : max_n;
    ekv_f16 *k = malloc(((size_t)max_n + 1) * d * sizeof *k);
    ekv_f16 *v = malloc(((size_t)max_n + 1) * d * sizeof *v);
    int32_t *pos = malloc(((size_t)max_n + 1) * sizeof *pos);
    if (!k || !v || !pos) {
        recalled = -1;
        ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory");
    }
    const kv_pool *pool = kv_seq_pool(seq);
    for (int32_t q = 0; q < n_reqs && recalled >= 0; q++) {
        const kvprefix_recall_req *r = &reqs[q];
        int32_t m = 0;
        for (int32_t j = 0; j < r->n; j++) {
            const int32_t b = r->pos[j] / p->bt;
            if (b >= n_blocks || slot[b] < 0 || !job_got(job, slot[b]))
                continue; /* not stored, or it did not arrive whole */
            const uint8_t *blk = job->values + (size_t)slot[b] * p->value_bytes +
                                 ((size_t)r->layer * p->HKV + r->head) * p->block_bytes;
            const int32_t at = kv_block_token(pool, blk, r->pos[j] % p->bt, k + (size_t)m * d,
                                              v + (size_t)m * d);
            if (at != r->pos[j])
                continue; /* not the token it should be: never insert it */
            pos[m++] = at;
        }
        if (kv_seq_insert(seq, r->layer, r->head, k, v, pos, m, err) != EKV_OK)
            recalled = -1;
        else
            recalled += m;
    }
    if (recalled > 0)
        atomic_fetch_add(&p->recalled_tokens, (uint64_t)recalled);
    free(k);
    free(v);
    free(pos);
    if (job)
        job_put(job);
    free(need);
    free(slot);
    return recalled;
}

void kvprefix_stats_get(const kvprefix *p, kvprefix_stats *s)
{
    s->recalled_tokens = atomic_load(&p->recalled_tokens);
    s->saved_blocks = atomic_load(&p->saved);
    s->save_skipped = atomic_load(&p->skipped);
    s->restored_blocks = atomic_load(&p->restored);
    s->restore_misses = atomic_load(&p->misses);
    s->restored_tokens = atomic_load(&p->restored_tokens);
}
