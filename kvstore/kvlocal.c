/*
 * kvlocal.c - the in-process host pool: a hash index over entries plus an
 * LRU list, with a hard byte capacity.
 *
 * A private store's entry is one allocation: header then value. A shared
 * store (the daemon's) keeps headers private and values in one memfd region
 * (kvarena.c) that clients on this host map read-only. An entry's charge
 * (header + value, or header + the value's block) counts against capacity
 * from reserve until it is freed, so `used` never exceeds `capacity`
 * whatever is pinned. Pins keep a value's bytes
 * alive while a reader (a UCX send, a get's copy) uses them: evicting or
 * replacing a pinned entry unlinks it from the index and the LRU list, and
 * the last release frees it. `pinned` sums the charges of pinned entries so
 * make_room knows, before evicting anything, whether eviction can help.
 *
 * One mutex guards the index, the list and the counters; copies and
 * checksums run outside it, on pinned entries.
 */
#include "entrokv/kvstore.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "kvarena.h"

typedef struct lru_link {
    struct lru_link *prev, *next; /* LRU list, most recent first */
} lru_link;

struct kvstore_entry {
    lru_link lru;         /* first: an entry is its link */
    kvstore_entry *hnext; /* hash chain */
    kvstore_key key;
    uint64_t checksum;
    uint8_t mac[KVSTORE_MAC_BYTES]; /* kept for the reader to check (kvstore_local_put_mac) */
    size_t len;
    size_t charge;
    int32_t pins;
    bool linked; /* visible: in the index and the LRU list */
    uint8_t *data; /* just past the header, or a block of the shared region */
};

/* A private entry's value starts here, 64-byte aligned. */
#define HDR_BYTES ((sizeof(kvstore_entry) + 63) & ~(size_t)63)

struct kvstore_local {
    pthread_mutex_t mu;
    uint64_t capacity, used, pinned;
    uint64_t n_entries, evictions;
    kvstore_entry **buckets;
    size_t n_buckets; /* a power of two */
    lru_link lru; /* sentinel: lru.next is the most recent */
    kvstore_metrics *m;
    kvarena *arena; /* shared store: where values live */
    uint8_t *label; /* shared store: a page of the region outside any value */
};

#define ADD(field, v)                                                                              \
    do {                                                                                           \
        if (s->m)                                                                                  \
            atomic_fetch_add_explicit(&s->m->field, (v), memory_order_relaxed);                    \
    } while (0)

kvstore_local *kvstore_local_create(uint64_t capacity, kvstore_metrics *metrics, ekv_error *err)
{
    kvstore_local *s = calloc(1, sizeof *s);
    if (s)
        s->buckets = calloc(1024, sizeof *s->buckets);
    if (!s || !s->buckets) {
        free(s);
        ekv_error_set(err, EKV_ENOMEM, "kvstore: out of memory creating the local store");
        return NULL;
    }
    pthread_mutex_init(&s->mu, NULL);
    s->n_buckets = 1024;
    s->capacity = capacity;
    s->lru.next = s->lru.prev = &s->lru;
    s->m = metrics;
    return s;
}

static void entry_free(kvstore_local *s, kvstore_entry *e)
{
    s->used -= e->charge;
    if (s->arena)
        kvarena_free(s->arena, e->data);
    free(e);
}

void kvstore_local_destroy(kvstore_local *s)
{
    if (!s)
        return;
    for (lru_link *l = s->lru.next, *n; l != &s->lru; l = n) {
        n = l->next;
        entry_free(s, (kvstore_entry *)l);
    }
    pthread_mutex_destroy(&s->mu);
    kvarena_destroy(s->arena);
    free(s->buckets);
    free(s);
}

kvstore_local *kvstore_local_create_shared(uint64_t capacity, kvstore_metrics *metrics,
                                           ekv_error *err)
{
    kvstore_local *s = kvstore_local_create(capacity, metrics, err);
    if (s && !(s->arena = kvarena_create(capacity, err))) {
        kvstore_local_destroy(s);
        return NULL;
    }
    if (s && !(s->label = kvarena_alloc(s->arena, 1, NULL))) {
        ekv_error_set(err, EKV_ENOMEM, "kvstore: no room for the region's label");
        kvstore_local_destroy(s);
        return NULL;
    }
    return s;
}

bool kvstore_local_region(const kvstore_local *s, void **base, size_t *bytes, int *fd,
                          uint8_t **label)
{
    if (!s->arena)
        return false;
    *base = kvarena_base(s->arena);
    *bytes = kvarena_size(s->arena);
    *fd = kvarena_fd(s->arena);
    *label = s->label;
    return true;
}

static size_t bucket_of(const kvstore_local *s, const kvstore_key *key)
{
    uint64_t h;
    memcpy(&h, key->b, sizeof h); /* keys are SHA-256 outputs: already uniform */
    return (size_t)h & (s->n_buckets - 1);
}

static kvstore_entry *find(const kvstore_local *s, const kvstore_key *key)
{
    for (kvstore_entry *e = s->buckets[bucket_of(s, key)]; e; e = e->hnext)
        if (!memcmp(e->key.b, key->b, KVSTORE_KEY_BYTES))
            return e;
    return NULL;
}

/* Doubles the index when it gets crowded; on allocation failure the chains
 * just grow longer. */
static void maybe_grow(kvstore_local *s)
{
    if (s->n_entries < s->n_buckets || s->n_buckets > ((size_t)1 << 40))
        return;
    size_t n = s->n_buckets * 2;
    kvstore_entry **b = calloc(n, sizeof *b);
    if (!b)
        return;
    kvstore_entry **old = s->buckets;
    size_t old_n = s->n_buckets;
    s->buckets = b;
    s->n_buckets = n;
    for (size_t i = 0; i < old_n; i++) {
        for (kvstore_entry *e = old[i], *next; e; e = next) {
            next = e->hnext;
            size_t j = bucket_of(s, &e->key);
            e->hnext = b[j];
            b[j] = e;
        }
    }
    free(old);
}

static void lru_remove(kvstore_entry *e)
{
    e->lru.prev->next = e->lru.next;
    e->lru.next->prev = e->lru.prev;
}

static void lru_push_front(kvstore_local *s, kvstore_entry *e)
{
    e->lru.next = s->lru.next;
    e->lru.prev = &s->lru;
    s->lru.next->prev = &e->lru;
    s->lru.next = &e->lru;
}

/* Makes e invisible; frees it unless pinned (the last release frees it). */
static void unlink_entry(kvstore_local *s, kvstore_entry *e)
{
    kvstore_entry **pp = &s->buckets[bucket_of(s, &e->key)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    lru_remove(e);
    e->linked = false;
    s->n_entries--;
    if (e->pins == 0)
        entry_free(s, e);
}

static void pin(kvstore_local *s, kvstore_entry *e)
{
    if (e->pins++ == 0)
        s->pinned += e->charge;
}

/* Evicts unpinned entries, oldest first, until charge more bytes fit.
 * false (and nothing evicted) when even evicting all of them cannot. */
static bool make_room(kvstore_local *s, uint64_t charge)
{
    if (charge > s->capacity || s->pinned > s->capacity - charge)
        return false;
    lru_link *l = s->lru.prev;
    while (s->used + charge > s->capacity && l != &s->lru) {
        lru_link *prev = l->prev;
        kvstore_entry *e = (kvstore_entry *)l;
        if (e->pins == 0) {
            unlink_entry(s, e);
            s->evictions++;
            ADD(evictions, 1);
        }
        l = prev;
    }
    return s->used + charge <= s->capacity;
}

/* Evicts the oldest unpinned entry; false when there is none. */
static bool evict_oldest(kvstore_local *s)
{
    for (lru_link *l = s->lru.prev; l != &s->lru; l = l->prev) {
        kvstore_entry *e = (kvstore_entry *)l;
        if (e->pins == 0) {
            unlink_entry(s, e);
            s->evictions++;
            ADD(evictions, 1);
            return true;
        }
    }
    return false;
}

/* A block of the shared region for len bytes; a fragmented region can
 * lack one with room to spare, so evict (oldest first) until one frees. */
static uint8_t *region_alloc(kvstore_local *s, size_t len)
{
    uint8_t *p;
    while (!(p = kvarena_alloc(s->arena, len ? len : 1, NULL)) && evict_oldest(s))
        ;
    return p;
}

/* What an entry of len bytes counts against capacity. */
static size_t charge_of(const kvstore_local *s, size_t len)
{
    if (!s->arena)
        return HDR_BYTES + ((len + 63) & ~(size_t)63);
    size_t block = (size_t)1 << KVARENA_MIN_ORDER;
    while (block < len)
        block <<= 1;
    return HDR_BYTES + block;
}

kvstore_entry *kvstore_local_reserve(kvstore_local *s, const kvstore_key *key, size_t len,
                                     uint64_t checksum, kvstore_result *why)
{
    *why = KVSTORE_NOSPACE;
    if (len > (s->arena ? (size_t)1 << KVARENA_MAX_ORDER : SIZE_MAX / 2))
        return NULL;
    size_t charge = charge_of(s, len);
    kvstore_entry *e = s->arena ? malloc(sizeof *e) : aligned_alloc(64, charge);
    if (!e)
        return NULL;
    memset(e, 0, sizeof *e);
    e->data = (uint8_t *)e + HDR_BYTES;
    pthread_mutex_lock(&s->mu);
    bool ok = make_room(s, charge);
    if (ok && s->arena)
        ok = (e->data = region_alloc(s, len)) != NULL;
    if (ok) {
        s->used += charge;
        s->pinned += charge;
    }
    pthread_mutex_unlock(&s->mu);
    if (!ok) {
        free(e);
        return NULL;
    }
    e->key = *key;
    e->checksum = checksum;
    e->len = len;
    e->charge = charge;
    e->pins = 1;
    *why = KVSTORE_OK;
    return e;
}

void kvstore_local_commit(kvstore_local *s, kvstore_entry *e)
{
    pthread_mutex_lock(&s->mu);
    kvstore_entry *old = find(s, &e->key);
    if (old)
        unlink_entry(s, old);
    size_t b = bucket_of(s, &e->key);
    e->hnext = s->buckets[b];
    s->buckets[b] = e;
    lru_push_front(s, e);
    e->linked = true;
    s->n_entries++;
    if (--e->pins == 0)
        s->pinned -= e->charge;
    maybe_grow(s);
    pthread_mutex_unlock(&s->mu);
    ADD(tier[KVSTORE_TIER_LOCAL].bytes_in, e->len);
}

void kvstore_local_abort(kvstore_local *s, kvstore_entry *e)
{
    pthread_mutex_lock(&s->mu);
    s->pinned -= e->charge;
    entry_free(s, e);
    pthread_mutex_unlock(&s->mu);
}

kvstore_entry *kvstore_local_acquire(kvstore_local *s, const kvstore_key *key)
{
    pthread_mutex_lock(&s->mu);
    kvstore_entry *e = find(s, key);
    if (e) {
        pin(s, e);
        lru_remove(e);
        lru_push_front(s, e);
    }
    pthread_mutex_unlock(&s->mu);
    return e;
}

void kvstore_local_release(kvstore_local *s, kvstore_entry *e)
{
    pthread_mutex_lock(&s->mu);
    if (--e->pins == 0) {
        s->pinned -= e->charge;
        if (!e->linked)
            entry_free(s, e);
    }
    pthread_mutex_unlock(&s->mu);
}

void *kvstore_entry_data(kvstore_entry *e) { return e->data; }
size_t kvstore_entry_len(const kvstore_entry *e) { return e->len; }
uint64_t kvstore_entry_checksum(const kvstore_entry *e) { return e->checksum; }
void kvstore_entry_set_checksum(kvstore_entry *e, uint64_t checksum) { e->checksum = checksum; }
const uint8_t *kvstore_entry_mac(const kvstore_entry *e) { return e->mac; }
void kvstore_entry_set_mac(kvstore_entry *e, const uint8_t mac[KVSTORE_MAC_BYTES])
{
    memcpy(e->mac, mac, KVSTORE_MAC_BYTES);
}

kvstore_result kvstore_local_put_mac(kvstore_local *s, const kvstore_key *key, const void *val,
                                     size_t len, const uint8_t mac[KVSTORE_MAC_BYTES])
{
    kvstore_result why;
    kvstore_entry *e = kvstore_local_reserve(s, key, len, 0, &why);
    if (!e)
        return why;
    /* one pass, and the checksum is of the bytes stored */
    e->checksum = kvstore_checksum_copy_nt(e->data, val, len);
    if (mac)
        memcpy(e->mac, mac, KVSTORE_MAC_BYTES);
    kvstore_local_commit(s, e);
    return KVSTORE_OK;
}

kvstore_result kvstore_local_put(kvstore_local *s, const kvstore_key *key, const void *val,
                                 size_t len)
{
    return kvstore_local_put_mac(s, key, val, len, NULL);
}

/* Drops e from the index if it is still there (it failed its checksum). */
static void drop_if_linked(kvstore_local *s, kvstore_entry *e)
{
    pthread_mutex_lock(&s->mu);
    if (e->linked)
        unlink_entry(s, e); /* the caller's pin keeps the bytes until release */
    pthread_mutex_unlock(&s->mu);
}

kvstore_result kvstore_local_get(kvstore_local *s, const kvstore_key *key, void *buf, size_t cap,
                                 size_t *value_len)
{
    return kvstore_local_get_mac(s, key, buf, cap, value_len, NULL);
}

kvstore_result kvstore_local_get_mac(kvstore_local *s, const kvstore_key *key, void *buf,
                                     size_t cap, size_t *value_len,
                                     uint8_t mac[KVSTORE_MAC_BYTES])
{
    kvstore_entry *e = kvstore_local_acquire(s, key);
    if (!e) {
        ADD(tier[KVSTORE_TIER_LOCAL].misses, 1);
        return KVSTORE_MISS;
    }
    size_t len = e->len;
    if (value_len)
        *value_len = len;
    if (len > cap) {
        kvstore_local_release(s, e);
        return KVSTORE_TOOSMALL;
    }
    bool good = kvstore_checksum_copy(buf, e->data, len) == e->checksum;
    if (mac)
        memcpy(mac, e->mac, KVSTORE_MAC_BYTES);
    if (!good)
        drop_if_linked(s, e);
    kvstore_local_release(s, e);
    if (!good) {
        ADD(checksum_failures, 1);
        ADD(tier[KVSTORE_TIER_LOCAL].misses, 1);
        return KVSTORE_MISS;
    }
    ADD(tier[KVSTORE_TIER_LOCAL].hits, 1);
    ADD(tier[KVSTORE_TIER_LOCAL].bytes_out, len);
    return KVSTORE_OK;
}

bool kvstore_local_exists(kvstore_local *s, const kvstore_key *key)
{
    pthread_mutex_lock(&s->mu);
    bool found = find(s, key) != NULL;
    pthread_mutex_unlock(&s->mu);
    return found;
}

bool kvstore_local_delete(kvstore_local *s, const kvstore_key *key)
{
    pthread_mutex_lock(&s->mu);
    kvstore_entry *e = find(s, key);
    if (e)
        unlink_entry(s, e);
    pthread_mutex_unlock(&s->mu);
    return e != NULL;
}

void kvstore_local_stats_get(kvstore_local *s, kvstore_local_stats *out)
{
    pthread_mutex_lock(&s->mu);
    out->capacity = s->capacity;
    out->used = s->used;
    out->entries = s->n_entries;
    out->evictions = s->evictions;
    out->pinned = s->pinned;
    pthread_mutex_unlock(&s->mu);
}

bool kvstore_local_debug_corrupt(kvstore_local *s, const kvstore_key *key, size_t offset)
{
    pthread_mutex_lock(&s->mu);
    kvstore_entry *e = find(s, key);
    bool ok = e && offset < e->len;
    if (ok)
        e->data[offset] ^= 0x01;
    pthread_mutex_unlock(&s->mu);
    return ok;
}
