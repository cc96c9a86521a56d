/*
 * kvrecall_tier.c - the host-memory cap of the recall stores and the
 * backend tier behind it: spilling complete blocks, fetching them back into
 * per-head slots, deadline misses, and deleting a set's keys at its end
 * (see kvrecall_tier.h).
 */
#include "entrokv/kvrecall_tier.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "entrokv/sha256.h"

struct kv_recall_tier {
    kv_recall_backend be;
    bool has_be;
    int64_t cap;
    uint8_t nonce[16];
    _Atomic int64_t host_bytes, putting_bytes;
    _Atomic uint64_t next_set;
    _Atomic int64_t blocks_recalled, bytes_recalled, misses, promotions, rankings, spilled,
        spill_failures, fetched, fetched_bytes, fetch_failures, deleted, delete_failures,
        live_sets, inflight;
};

/* One store's spilled blocks: the keys to delete once nobody reads them. */
typedef struct rt_set {
    kv_recall_tier *t;
    uint64_t id;
    int32_t n_layers, n_kv_heads;
    _Atomic int32_t *hi; /* per (layer, head): 1 + the highest block stored */
    _Atomic int refs;
} rt_set;

enum { B_HOST = 0, B_PUTTING, B_STORED, B_FAILED, B_REMOTE };
enum { S_EMPTY = 0, S_FETCHING, S_READY, S_FAILED };

typedef struct rt_blk {
    uint8_t st;
    rt_set *set; /* the set its key belongs to (a reference), once put */
} rt_blk;

typedef struct rt_slot {
    int32_t b; /* the block it holds or fetches */
    uint8_t st;
    uint8_t *mem;
    int64_t used; /* the head's view count when a view last read it */
} rt_slot;

/* Slots per head, per recalled block: a block that leaves the top R and
 * comes back a few steps later (the ranking's churn) is still there. */
#define SLOTS_PER_R 2

typedef struct rt_head {
    pthread_mutex_t mu;
    rt_blk *blk;
    int32_t n, cap;
    rt_slot *slot; /* n_slots of them */
    int64_t views;
} rt_head;

struct kvrt_seq {
    kv_recall_tier *t;
    int32_t n_layers, n_kv_heads, r, n_slots;
    size_t bb;
    rt_head *heads;
    rt_set *own; /* where this store's puts go; created at the first */
    _Atomic int refs; /* the store, and every op in flight */
    _Atomic int64_t misses;
};

typedef struct rt_job {
    kvrt_seq *s;
    rt_set *set;
    int32_t layer, head, idx; /* idx: the block (put) or the slot (get) */
    uint8_t *buf;             /* a put's copy of the block */
} rt_job;

#define ADD(field, n) atomic_fetch_add_explicit(&(field), (n), memory_order_relaxed)

kv_recall_tier *kv_recall_tier_create(int64_t host_cap, const kv_recall_backend *be,
                                      ekv_error *err)
{
    kv_recall_tier *t = calloc(1, sizeof *t);
    if (!t) {
        ekv_error_set(err, EKV_ENOMEM, "recall tier: out of memory");
        return NULL;
    }
    if (be && be->put && be->get && be->del) {
        t->be = *be;
        t->has_be = true;
    }
    t->cap = host_cap;
    /* distinct keys for every tier ever made, across processes and restarts */
    size_t got = 0;
    while (got < sizeof t->nonce) {
        const ssize_t n = getrandom(t->nonce + got, sizeof t->nonce - got, 0);
        if (n <= 0) {
            free(t);
            ekv_error_set(err, EKV_EIO, "recall tier: no random bytes for its keys");
            return NULL;
        }
        got += (size_t)n;
    }
    return t;
}

void kv_recall_tier_destroy(kv_recall_tier *t)
{
    if (!t)
        return;
    /* callbacks still owed hold the tier: wait for them (the backend's op
     * timeouts bound this; 30 s more and we leak instead of crashing) */
    for (int i = 0; i < 30000 && atomic_load(&t->inflight) > 0; i++)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    if (atomic_load(&t->inflight) > 0)
        return;
    free(t);
}

void kv_recall_tier_stats_get(const kv_recall_tier *t, kv_recall_tier_stats *st)
{
    memset(st, 0, sizeof *st);
    kv_recall_tier *m = (kv_recall_tier *)t; /* atomic loads only */
    st->blocks_recalled = atomic_load(&m->blocks_recalled);
    st->bytes_recalled = atomic_load(&m->bytes_recalled);
    st->deadline_misses = atomic_load(&m->misses);
    st->promotions = atomic_load(&m->promotions);
    st->rankings = atomic_load(&m->rankings);
    st->host_bytes = atomic_load(&m->host_bytes);
    st->host_cap = t->cap;
    st->spilled_blocks = atomic_load(&m->spilled);
    st->spill_failures = atomic_load(&m->spill_failures);
    st->fetched_blocks = atomic_load(&m->fetched);
    st->fetched_bytes = atomic_load(&m->fetched_bytes);
    st->fetch_failures = atomic_load(&m->fetch_failures);
    st->deleted_keys = atomic_load(&m->deleted);
    st->delete_failures = atomic_load(&m->delete_failures);
    st->live_sets = atomic_load(&m->live_sets);
    st->inflight = atomic_load(&m->inflight);
}

void kv_recall_tier_count_promotions(kv_recall_tier *t, int64_t n) { ADD(t->promotions, n); }
void kv_recall_tier_count_rankings(kv_recall_tier *t, int64_t n) { ADD(t->rankings, n); }

/* ---- keys and sets ---- */

static void put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void block_key(const rt_set *set, int32_t layer, int32_t head, int32_t b,
                      uint8_t key[KV_RECALL_KEY_BYTES])
{
    uint8_t msg[11 + 16 + 8 + 12];
    memcpy(msg, "ekv-recall1", 11);
    memcpy(msg + 11, set->t->nonce, 16);
    for (int i = 0; i < 8; i++)
        msg[27 + i] = (uint8_t)(set->id >> (8 * i));
    put_u32(msg + 35, (uint32_t)layer);
    put_u32(msg + 39, (uint32_t)head);
    put_u32(msg + 43, (uint32_t)b);
    ekv_sha256 s;
    sha256_init(&s);
    sha256_update(&s, msg, sizeof msg);
    sha256_final(&s, key);
}

static rt_set *set_create(kv_recall_tier *t, int32_t n_layers, int32_t n_kv_heads)
{
    rt_set *set = calloc(1, sizeof *set);
    if (set)
        set->hi = calloc((size_t)n_layers * n_kv_heads, sizeof *set->hi);
    if (!set || !set->hi) {
        free(set);
        return NULL;
    }
    set->t = t;
    set->id = atomic_fetch_add(&t->next_set, 1);
    set->n_layers = n_layers;
    set->n_kv_heads = n_kv_heads;
    atomic_init(&set->refs, 1);
    ADD(t->live_sets, 1);
    return set;
}

static void set_ref(rt_set *set) { atomic_fetch_add(&set->refs, 1); }

/* The last reference: every key the set may hold is deleted. */
static void set_unref(rt_set *set)
{
    if (!set || atomic_fetch_sub(&set->refs, 1) != 1)
        return;
    kv_recall_tier *t = set->t;
    size_t n = 0;
    const size_t heads = (size_t)set->n_layers * set->n_kv_heads;
    for (size_t i = 0; i < heads; i++)
        n += (size_t)atomic_load(&set->hi[i]);
    uint8_t(*keys)[KV_RECALL_KEY_BYTES] = n ? malloc(n * sizeof *keys) : NULL;
    if (n && keys) {
        size_t k = 0;
        for (int32_t l = 0; l < set->n_layers; l++)
            for (int32_t h = 0; h < set->n_kv_heads; h++)
                for (int32_t b = 0; b < atomic_load(&set->hi[(size_t)l * set->n_kv_heads + h]); b++)
                    block_key(set, l, h, b, keys[k++]);
        if (t->be.del(t->be.ctx, (const uint8_t(*)[KV_RECALL_KEY_BYTES])keys, n))
            ADD(t->deleted, (int64_t)n);
        else
            ADD(t->delete_failures, (int64_t)n);
    } else if (n) {
        ADD(t->delete_failures, (int64_t)n);
    }
    free(keys);
    ADD(t->live_sets, -1);
    free(set->hi);
    free(set);
}

/* ---- the per-store state ---- */

static kvrt_seq *seq_new(kv_recall_tier *t, int32_t n_layers, int32_t n_kv_heads, int32_t r,
                         size_t bb, ekv_error *err)
{
    kvrt_seq *s = calloc(1, sizeof *s);
    if (s)
        s->heads = calloc((size_t)n_layers * n_kv_heads, sizeof *s->heads);
    bool ok = s && s->heads;
    for (int32_t i = 0; ok && i < n_layers * n_kv_heads; i++) {
        s->heads[i].slot = calloc((size_t)r * SLOTS_PER_R, sizeof *s->heads[i].slot);
        ok = s->heads[i].slot != NULL;
        if (ok)
            pthread_mutex_init(&s->heads[i].mu, NULL);
        else
            s->n_layers = i; /* for the cleanup below: heads [0, i) are set up */
    }
    if (!ok) {
        if (s && s->heads) {
            for (int32_t i = 0; i < s->n_layers; i++) {
                pthread_mutex_destroy(&s->heads[i].mu);
                free(s->heads[i].slot);
            }
            free(s->heads);
        }
        free(s);
        ekv_error_set(err, EKV_ENOMEM, "recall tier: out of memory");
        return NULL;
    }
    s->t = t;
    s->n_layers = n_layers;
    s->n_kv_heads = n_kv_heads;
    s->r = r;
    s->n_slots = r * SLOTS_PER_R;
    s->bb = bb;
    atomic_init(&s->refs, 1);
    return s;
}

kvrt_seq *kvrt_attach(kv_recall_tier *t, int32_t n_layers, int32_t n_kv_heads, int32_t r,
                      size_t blk_bytes, ekv_error *err)
{
    return seq_new(t, n_layers, n_kv_heads, r, blk_bytes, err);
}

kv_recall_tier *kvrt_tier(const kvrt_seq *s) { return s->t; }

bool kvrt_spills(const kvrt_seq *s) { return s->t->has_be && s->t->cap >= 0; }

static rt_head *head_of(kvrt_seq *s, int32_t layer, int32_t head)
{
    return &s->heads[(size_t)layer * s->n_kv_heads + head];
}

static bool head_grow(rt_head *h, int32_t n)
{
    if (n > h->cap) {
        const int32_t cap = n > 2 * h->cap ? n : 2 * h->cap;
        rt_blk *p = realloc(h->blk, (size_t)cap * sizeof *p);
        if (!p)
            return false;
        h->blk = p;
        h->cap = cap;
    }
    for (int32_t b = h->n; b < n; b++)
        h->blk[b] = (rt_blk){B_HOST, NULL};
    if (n > h->n)
        h->n = n;
    return true;
}

static void seq_unref(kvrt_seq *s)
{
    if (atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    for (int32_t i = 0; i < s->n_layers * s->n_kv_heads; i++) {
        rt_head *h = &s->heads[i];
        for (int32_t b = 0; b < h->n; b++)
            set_unref(h->blk[b].set);
        for (int32_t j = 0; j < s->n_slots; j++)
            free(h->slot[j].mem);
        free(h->slot);
        free(h->blk);
        pthread_mutex_destroy(&h->mu);
    }
    set_unref(s->own);
    free(s->heads);
    free(s);
}

kvrt_seq *kvrt_clone(kvrt_seq *src, int64_t host_blocks, ekv_error *err)
{
    kvrt_seq *s = seq_new(src->t, src->n_layers, src->n_kv_heads, src->r, src->bb, err);
    if (!s)
        return NULL;
    for (int32_t i = 0; i < src->n_layers * src->n_kv_heads; i++) {
        rt_head *sh = &src->heads[i], *h = &s->heads[i];
        pthread_mutex_lock(&sh->mu);
        const bool ok = head_grow(h, sh->n);
        for (int32_t b = 0; ok && b < sh->n; b++)
            if (sh->blk[b].st == B_REMOTE) { /* its key stays the parent's */
                h->blk[b] = sh->blk[b];
                set_ref(h->blk[b].set);
            }
        pthread_mutex_unlock(&sh->mu);
        if (!ok) {
            seq_unref(s);
            ekv_error_set(err, EKV_ENOMEM, "recall tier: out of memory");
            return NULL;
        }
    }
    ADD(s->t->host_bytes, host_blocks * (int64_t)s->bb);
    return s;
}

void kvrt_detach(kvrt_seq *s, int64_t host_blocks)
{
    if (!s)
        return;
    kv_recall_tier *t = s->t;
    int64_t putting = 0;
    for (int32_t i = 0; i < s->n_layers * s->n_kv_heads; i++) {
        rt_head *h = &s->heads[i];
        pthread_mutex_lock(&h->mu);
        for (int32_t b = 0; b < h->n; b++)
            if (h->blk[b].st == B_PUTTING || h->blk[b].st == B_STORED ||
                h->blk[b].st == B_FAILED) {
                putting++;
                h->blk[b].st = B_HOST; /* the job's callback finds nothing to change */
            }
        pthread_mutex_unlock(&h->mu);
    }
    ADD(t->putting_bytes, -putting * (int64_t)s->bb);
    ADD(t->host_bytes, -host_blocks * (int64_t)s->bb);
    seq_unref(s);
}

/* ---- jobs ---- */

static void put_done(void *arg, bool ok)
{
    rt_job *j = arg;
    kvrt_seq *s = j->s;
    kv_recall_tier *t = s->t;
    rt_head *h = head_of(s, j->layer, j->head);
    pthread_mutex_lock(&h->mu);
    if (h->blk[j->idx].st == B_PUTTING) /* else the store is gone (detach) */
        h->blk[j->idx].st = ok ? B_STORED : B_FAILED;
    pthread_mutex_unlock(&h->mu);
    if (ok) {
        _Atomic int32_t *hi = &j->set->hi[(size_t)j->layer * s->n_kv_heads + j->head];
        int32_t cur = atomic_load(hi);
        while (cur < j->idx + 1 && !atomic_compare_exchange_weak(hi, &cur, j->idx + 1)) {
        }
        ADD(t->spilled, 1);
    } else {
        ADD(t->spill_failures, 1);
    }
    free(j->buf);
    set_unref(j->set);
    seq_unref(s);
    free(j);
    ADD(t->inflight, -1);
}

static void get_done(void *arg, bool ok)
{
    rt_job *j = arg;
    kvrt_seq *s = j->s;
    kv_recall_tier *t = s->t;
    rt_head *h = head_of(s, j->layer, j->head);
    pthread_mutex_lock(&h->mu);
    h->slot[j->idx].st = ok ? S_READY : S_FAILED;
    pthread_mutex_unlock(&h->mu);
    if (ok) {
        ADD(t->fetched, 1);
        ADD(t->fetched_bytes, (int64_t)s->bb);
    } else {
        ADD(t->fetch_failures, 1);
    }
    seq_unref(s);
    free(j);
    ADD(t->inflight, -1);
}

/* ---- the store's hooks ---- */

/* Puts that failed since the last look: host blocks again, to be tried
 * later. (Stored ones keep their host copy until a view, which knows
 * whether it reads them, lets it go: kvrt_view_end.) Under h->mu. */
static void reap_failed(kvrt_seq *s, rt_head *h)
{
    for (int32_t b = 0; b < h->n; b++)
        if (h->blk[b].st == B_FAILED) {
            h->blk[b].st = B_HOST;
            ADD(s->t->putting_bytes, -(int64_t)s->bb);
        }
}

bool kvrt_added(kvrt_seq *s, int32_t layer, int32_t head, uint8_t **blk, int32_t n_blocks,
                int32_t n_full, int32_t new_blocks)
{
    kv_recall_tier *t = s->t;
    rt_head *h = head_of(s, layer, head);
    pthread_mutex_lock(&h->mu);
    if (!head_grow(h, n_blocks)) {
        pthread_mutex_unlock(&h->mu);
        return false;
    }
    ADD(t->host_bytes, new_blocks * (int64_t)s->bb);
    reap_failed(s, h);
    const int64_t bb = (int64_t)s->bb;
    for (int32_t b = 0; t->has_be && t->cap >= 0 && b < n_full; b++) {
        if (atomic_load(&t->host_bytes) - atomic_load(&t->putting_bytes) <= t->cap)
            break;
        if (h->blk[b].st != B_HOST || !blk[b])
            continue;
        if (!s->own && !(s->own = set_create(t, s->n_layers, s->n_kv_heads)))
            break;
        rt_job *j = malloc(sizeof *j);
        uint8_t *copy = j ? malloc(s->bb) : NULL;
        if (!copy) {
            free(j);
            break;
        }
        memcpy(copy, blk[b], s->bb);
        *j = (rt_job){s, s->own, layer, head, b, copy};
        uint8_t key[KV_RECALL_KEY_BYTES];
        block_key(s->own, layer, head, b, key);
        h->blk[b].st = B_PUTTING;
        if (!h->blk[b].set) {
            h->blk[b].set = s->own;
            set_ref(s->own);
        }
        set_ref(s->own);
        atomic_fetch_add(&s->refs, 1);
        ADD(t->putting_bytes, bb);
        ADD(t->inflight, 1);
        if (!t->be.put(t->be.ctx, key, copy, s->bb, put_done, j)) {
            h->blk[b].st = B_HOST;
            ADD(t->putting_bytes, -bb);
            ADD(t->inflight, -1);
            ADD(t->spill_failures, 1);
            set_unref(s->own);
            atomic_fetch_sub(&s->refs, 1);
            free(copy);
            free(j);
            break; /* the backend is busy: the next add tries again */
        }
    }
    pthread_mutex_unlock(&h->mu);
    return true;
}

void kvrt_view_begin(kvrt_seq *s, int32_t layer, int32_t head, uint8_t **blk, int32_t n_blocks)
{
    (void)blk;
    (void)n_blocks;
    rt_head *h = head_of(s, layer, head);
    pthread_mutex_lock(&h->mu);
    h->views++;
}

static bool in_top(const int32_t *top, int32_t n_top, int32_t b)
{
    int32_t lo = 0, hi = n_top; /* top is ascending */
    while (lo < hi) {
        const int32_t mid = (lo + hi) / 2;
        if (top[mid] < b)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n_top && top[lo] == b;
}

/* A slot that this view does not read and no get writes into, the least
 * recently read of them; -1: none. */
static int32_t free_slot(const kvrt_seq *s, const rt_head *h, const int32_t *top, int32_t n_top)
{
    int32_t best = -1;
    for (int32_t j = 0; j < s->n_slots; j++) {
        const rt_slot *sl = &h->slot[j];
        if (sl->st == S_EMPTY || sl->st == S_FAILED)
            return j;
        if (sl->st == S_READY && !in_top(top, n_top, sl->b) &&
            (best < 0 || sl->used < h->slot[best].used))
            best = j;
    }
    return best;
}

const uint8_t *kvrt_fetch(kvrt_seq *s, int32_t layer, int32_t head, int32_t b, const int32_t *top,
                          int32_t n_top)
{
    kv_recall_tier *t = s->t;
    rt_head *h = head_of(s, layer, head);
    for (int32_t j = 0; j < s->n_slots; j++) {
        rt_slot *sl = &h->slot[j];
        if (sl->b != b || sl->st == S_EMPTY)
            continue;
        if (sl->st == S_READY) {
            sl->used = h->views;
            return sl->mem;
        }
        if (sl->st == S_FETCHING) {
            ADD(t->misses, 1);
            ADD(s->misses, 1);
            return NULL;
        }
        sl->st = S_EMPTY; /* failed: ask again */
    }
    ADD(t->misses, 1);
    ADD(s->misses, 1);
    const int32_t j = t->has_be && b < h->n && h->blk[b].set ? free_slot(s, h, top, n_top) : -1;
    if (j < 0)
        return NULL;
    rt_slot *sl = &h->slot[j];
    if (!sl->mem && !(sl->mem = malloc(s->bb)))
        return NULL;
    rt_job *job = malloc(sizeof *job);
    if (!job)
        return NULL;
    *job = (rt_job){s, NULL, layer, head, j, NULL};
    uint8_t key[KV_RECALL_KEY_BYTES];
    block_key(h->blk[b].set, layer, head, b, key);
    sl->b = b;
    sl->st = S_FETCHING;
    atomic_fetch_add(&s->refs, 1);
    ADD(t->inflight, 1);
    if (!t->be.get(t->be.ctx, key, sl->mem, s->bb, get_done, job)) {
        sl->st = S_EMPTY;
        atomic_fetch_sub(&s->refs, 1);
        ADD(t->inflight, -1);
        ADD(t->fetch_failures, 1);
        free(job);
    }
    return NULL;
}

void kvrt_view_end(kvrt_seq *s, int32_t layer, int32_t head, uint8_t **blk, const int32_t *top,
                   int32_t n_top, int32_t n_recalled)
{
    kv_recall_tier *t = s->t;
    rt_head *h = head_of(s, layer, head);
    /* stored blocks this view reads move into a slot (the prediction for
     * the next step is this step's top R); the rest lose their host copy */
    for (int32_t i = 0; i < n_top; i++) {
        const int32_t b = top[i];
        if (b >= h->n || h->blk[b].st != B_STORED)
            continue;
        const int32_t j = free_slot(s, h, top, n_top);
        if (j < 0)
            break;
        rt_slot *sl = &h->slot[j];
        free(sl->mem);
        sl->mem = blk[b];
        sl->b = b;
        sl->st = S_READY;
        sl->used = h->views;
        blk[b] = NULL;
        h->blk[b].st = B_REMOTE;
        ADD(t->host_bytes, -(int64_t)s->bb);
        ADD(t->putting_bytes, -(int64_t)s->bb);
    }
    /* the others (and any in the top R that found no free slot: they stay
     * until a later view); nothing reads them now */
    for (int32_t b = 0; b < h->n; b++) {
        if (h->blk[b].st == B_STORED && !in_top(top, n_top, b)) {
            free(blk[b]);
            blk[b] = NULL;
            h->blk[b].st = B_REMOTE;
            ADD(t->host_bytes, -(int64_t)s->bb);
            ADD(t->putting_bytes, -(int64_t)s->bb);
        } else if (h->blk[b].st == B_FAILED) {
            h->blk[b].st = B_HOST;
            ADD(t->putting_bytes, -(int64_t)s->bb);
        }
    }
    ADD(t->blocks_recalled, n_recalled);
    ADD(t->bytes_recalled, (int64_t)n_recalled * (int64_t)s->bb);
    pthread_mutex_unlock(&h->mu);
}

void kvrt_count_recalled(kvrt_seq *s, int32_t n)
{
    ADD(s->t->blocks_recalled, n);
    ADD(s->t->bytes_recalled, (int64_t)n * (int64_t)s->bb);
}

int64_t kvrt_misses(const kvrt_seq *s) { return atomic_load(&((kvrt_seq *)s)->misses); }
