/*
 * kvclient.c - the client API: batches in, a worker thread, results out.
 *
 * submit copies nothing but the batch descriptor onto a queue and returns;
 * the worker thread starts each op in the local tier (a memcpy and a
 * checksum) and sends what the local tier cannot answer to the ring
 * (kvremote.c), keeping up to max_inflight remote ops going at once so
 * transfers overlap each other and the caller's compute. A batch completes
 * when its last op has a result; then its callback runs on the worker
 * thread and waiters wake.
 *
 * Tier policy: get - local, then the key's daemon (a remote hit is copied
 * into the local tier if promote_remote_hits); put - local, and the daemon
 * too with write_through; exists / del - both. A put is OK if any tier
 * stored it.
 *
 * Namespaces: every op's key is first turned into the client's namespaced
 * key (kvstore_ns_key), which is what both tiers store under; every value
 * written carries its MAC (kvc_mac) and every value read is accepted only
 * if its MAC verifies (here for the host tier, in kvremote.c for daemons).
 */
#include <stdarg.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvclient_int.h"

void kvc_mac(const kvstore_client *c, const kvc_item *it, const void *buf, size_t len,
             uint8_t mac[KVSTORE_MAC_BYTES])
{
    kvpoly p;
    uint8_t poly[16];
    kvpoly_init(&p, &c->poly_key);
    kvpoly_update(&p, buf, len);
    kvpoly_final(&p, poly);
    kvns_mac_finish(c->ns_key, c->ns_key_len, c->ns, &it->key, len, poly, mac);
}

/* A host-tier get: the value counts only if its MAC verifies; one that
 * does not is dropped and read as a miss (the remote tier may have it). */
static kvstore_result local_get(kvstore_client *c, kvc_item *it, size_t *vl)
{
    kvstore_op *op = it->op;
    uint8_t have[KVSTORE_MAC_BYTES], want[KVSTORE_MAC_BYTES];
    kvstore_result r = kvstore_local_get_mac(c->local, &it->key, op->buf, op->len, vl, have);
    if (r != KVSTORE_OK)
        return r;
    kvc_mac(c, it, op->buf, *vl, want);
    if (hmac_equal(have, want, sizeof want))
        return KVSTORE_OK;
    atomic_fetch_add_explicit(&c->m.mac_failures, 1, memory_order_relaxed);
    kvstore_local_delete(c->local, &it->key);
    return KVSTORE_MISS;
}

void kvstore_client_config_default(kvstore_client_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->op_timeout_ms = 2000;
    cfg->connect_timeout_ms = 2000;
    cfg->reconnect_ms = 1000;
    cfg->vnodes = KVSTORE_RING_DEFAULT_VNODES;
    cfg->max_batches = 256;
    cfg->max_inflight = 256;
    cfg->write_through = true;
    cfg->promote_remote_hits = true;
}

void kvc_log(kvstore_client *c, const char *fmt, ...)
{
    if (!c->cfg.log)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    c->cfg.log(c->cfg.log_arg, line);
}

/* ---- op results ---- */

void kvc_item_finish(kvstore_client *c, kvc_item *it, kvstore_result r, kvstore_tier tier,
                     size_t value_len)
{
    kvstore_op *op = it->op;
    if (tier == KVSTORE_TIER_REMOTE && r != KVSTORE_OK && it->local_ok) {
        r = KVSTORE_OK; /* put / del: the local tier did it */
        tier = KVSTORE_TIER_LOCAL;
    }
    if (r != KVSTORE_OK && r != KVSTORE_TOOSMALL && op->kind != KVSTORE_PUT)
        tier = KVSTORE_TIER_NONE;
    op->result = r;
    op->tier = tier;
    op->value_len = value_len;
    if (op->kind == KVSTORE_GET && r == KVSTORE_OK) {
        uint64_t ns = (uint64_t)((kvx_now() - it->b->t_submit) * 1e9);
        atomic_fetch_add_explicit(&c->m.restore_ns_sum, ns, memory_order_relaxed);
        atomic_fetch_add_explicit(&c->m.restore_count, 1, memory_order_relaxed);
        if (tier == KVSTORE_TIER_REMOTE && c->local && c->cfg.promote_remote_hits)
            (void)kvstore_local_put_mac(c->local, &it->key, op->buf, value_len, it->mac);
    }
    kvstore_batch *b = it->b;
    if (--b->remaining == 0) {
        b->next = c->completed;
        c->completed = b;
    }
}

static void queue_remote(kvstore_client *c, kvc_item *it)
{
    it->next = NULL;
    if (c->rq_tail)
        c->rq_tail->next = it;
    else
        c->rq_head = it;
    c->rq_tail = it;
}

/* The local tier's part of an op; what it cannot settle goes remote. */
static void start_op(kvstore_client *c, kvc_item *it)
{
    kvstore_op *op = it->op;
    kvstore_local *l = c->local;
    bool remote = c->n_peers > 0;
    kvstore_result r = KVSTORE_MISS;
    size_t vl = 0;
    switch (op->kind) {
    case KVSTORE_PUT:
        if (l) {
            uint8_t mac[KVSTORE_MAC_BYTES];
            kvc_mac(c, it, op->buf, op->len, mac);
            r = kvstore_local_put_mac(l, &it->key, op->buf, op->len, mac);
            it->local_ok = r == KVSTORE_OK;
        }
        if (remote && (!l || c->cfg.write_through))
            break;
        kvc_item_finish(c, it, l ? r : KVSTORE_FAILED, KVSTORE_TIER_LOCAL, 0);
        return;
    case KVSTORE_GET:
        if (l && (r = local_get(c, it, &vl)) != KVSTORE_MISS) {
            kvc_item_finish(c, it, r, KVSTORE_TIER_LOCAL, vl);
            return;
        }
        break;
    case KVSTORE_EXISTS:
        if (l && kvstore_local_exists(l, &it->key)) {
            kvc_item_finish(c, it, KVSTORE_OK, KVSTORE_TIER_LOCAL, 0);
            return;
        }
        break;
    case KVSTORE_DEL:
        it->local_ok = l && kvstore_local_delete(l, &it->key);
        if (!remote) {
            kvc_item_finish(c, it, it->local_ok ? KVSTORE_OK : KVSTORE_MISS, KVSTORE_TIER_LOCAL, 0);
            return;
        }
        break;
    default:
        kvc_item_finish(c, it, KVSTORE_FAILED, KVSTORE_TIER_NONE, 0);
        return;
    }
    if (!remote) {
        kvc_item_finish(c, it, KVSTORE_MISS, KVSTORE_TIER_NONE, 0);
        return;
    }
    queue_remote(c, it);
}

static void start_batch(kvstore_client *c, kvstore_batch *b)
{
    c->n_active++;
    b->remaining = b->n;
    if (b->n == 0) {
        b->next = c->completed;
        c->completed = b;
        return;
    }
    for (size_t i = 0; i < b->n; i++) {
        kvc_item *it = &b->items[i];
        *it = (kvc_item){.b = b, .op = &b->ops[i]};
        kvstore_ns_key(c->ns_key, c->ns_key_len, c->ns, &it->op->key, &it->key);
        it->op->result = KVSTORE_MISS;
        it->op->tier = KVSTORE_TIER_NONE;
        it->op->value_len = 0;
    }
    /* items may finish (and the batch complete) while we loop, but the
     * completed list is only drained by the caller of start_batch */
    for (size_t i = 0; i < b->n; i++)
        start_op(c, &b->items[i]);
}

static void finish_batches(kvstore_client *c)
{
    while (c->completed) {
        kvstore_batch *b = c->completed;
        c->completed = b->next;
        c->n_active--;
        if (b->done)
            b->done(b, b->ops, b->n, b->arg);
        pthread_mutex_lock(&c->mu);
        bool auto_free = b->auto_free; /* under mu: kvstore_batch_abandon sets it */
        atomic_store(&b->finished, true);
        c->unfinished--;
        pthread_cond_broadcast(&c->done_cv);
        pthread_mutex_unlock(&c->mu);
        if (auto_free)
            free(b); /* nobody else holds it; with a handle the caller frees */
    }
}

/* ---- the worker thread ---- */

static void first_connect(kvstore_client *c)
{
    kvr_connect_all(c);
    double end = kvx_now() + c->cfg.connect_timeout_ms / 1000.0 + 0.5;
    while (kvr_connecting(c) && kvx_now() < end)
        if (!kvr_progress(c))
            kvr_wait(c, 1);
    pthread_mutex_lock(&c->mu);
    c->connected = true;
    pthread_cond_broadcast(&c->done_cv);
    pthread_mutex_unlock(&c->mu);
}

/* Idle: sleep until a submit, a short timeout (reconnects need the loop). */
static void idle_wait(kvstore_client *c)
{
    if (c->n_peers && kvr_connecting(c)) {
        kvr_wait(c, 1);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 20 * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&c->mu);
    if (!c->sub_head && !c->stopping)
        pthread_cond_timedwait(&c->work_cv, &c->mu, &ts);
    pthread_mutex_unlock(&c->mu);
}

static void *worker_main(void *arg)
{
    kvstore_client *c = arg;
    first_connect(c);
    double last_busy = kvx_now();
    for (;;) {
        kvstore_batch *list = NULL;
        bool stopping = false;
        if (atomic_load_explicit(&c->submitted, memory_order_acquire) > 0 || !c->n_active) {
            pthread_mutex_lock(&c->mu);
            list = c->sub_head;
            c->sub_head = c->sub_tail = NULL;
            atomic_store(&c->submitted, 0);
            stopping = c->stopping;
            pthread_mutex_unlock(&c->mu);
        }
        for (kvstore_batch *b = list, *next; b; b = next) {
            next = b->next;
            start_batch(c, b);
        }
        while (c->rq_head && kvr_issue(c, c->rq_head)) {
            c->rq_head = c->rq_head->next;
            if (!c->rq_head)
                c->rq_tail = NULL;
        }
        bool busy = kvr_progress(c) || list;
        finish_batches(c);
        double now = kvx_now();
        if (busy)
            last_busy = now;
        if (c->n_active == 0 && !c->rq_head) {
            if (stopping && !list)
                break;
            idle_wait(c);
        } else if (now - last_busy > 0.0005) {
            kvr_wait(c, 1); /* ops in flight but quiet (a slow peer): sleep on UCX events */
        } else if (!busy) {
            sched_yield(); /* spinning: let the threads that feed and drain us run */
        }
    }
    return NULL;
}

/* ---- API ---- */

static ekv_status copy_config(kvstore_client *c, const kvstore_client_config *cfg, ekv_error *err)
{
    kvstore_client_config d;
    kvstore_client_config_default(&d);
    c->cfg = *cfg;
    if (c->cfg.op_timeout_ms <= 0) c->cfg.op_timeout_ms = d.op_timeout_ms;
    if (c->cfg.connect_timeout_ms <= 0) c->cfg.connect_timeout_ms = d.connect_timeout_ms;
    if (c->cfg.reconnect_ms <= 0) c->cfg.reconnect_ms = d.reconnect_ms;
    if (c->cfg.vnodes <= 0) c->cfg.vnodes = d.vnodes;
    if (c->cfg.max_batches <= 0) c->cfg.max_batches = d.max_batches;
    if (c->cfg.max_inflight <= 0) c->cfg.max_inflight = d.max_inflight;
    if (c->cfg.max_inflight > 65535) c->cfg.max_inflight = 65535;
    if (cfg->n_peers < 0 || (cfg->n_peers > 0 && (!cfg->peers || !cfg->auth_token ||
                                                  cfg->auth_token_len == 0)))
        return ekv_error_set(err, EKV_EINVAL, "kvstore client: peers need an auth token");
    if (cfg->n_peers > 0) {
        c->token = malloc(cfg->auth_token_len);
        if (!c->token)
            return ekv_error_set(err, EKV_ENOMEM, "kvstore client: out of memory");
        memcpy(c->token, cfg->auth_token, cfg->auth_token_len);
    }
    c->cfg.peers = NULL; /* kvr_init copies the names; the caller's array may go */
    /* the namespace: its key, else the token's holders share one, else (no
     * daemons: nobody outside this process reads the values) a random one */
    if (cfg->ns_key_len && !cfg->ns_key)
        return ekv_error_set(err, EKV_EINVAL, "kvstore client: a namespace key length without a key");
    const char *ns = cfg->ns ? cfg->ns : "default";
    if (strlen(ns) >= sizeof c->ns)
        return ekv_error_set(err, EKV_EINVAL, "kvstore client: namespace name too long");
    strcpy(c->ns, ns);
    c->cfg.ns = NULL;
    c->cfg.ns_key = NULL;
    const uint8_t *key = cfg->ns_key_len ? cfg->ns_key : cfg->n_peers ? cfg->auth_token : NULL;
    c->ns_key_len = cfg->ns_key_len ? cfg->ns_key_len : key ? cfg->auth_token_len : 32;
    if (!(c->ns_key = malloc(c->ns_key_len)))
        return ekv_error_set(err, EKV_ENOMEM, "kvstore client: out of memory");
    if (key)
        memcpy(c->ns_key, key, c->ns_key_len);
    else if (kvx_nonce(c->ns_key, err) != EKV_OK)
        return err ? err->code : EKV_EIO;
    kvns_poly_key(c->ns_key, c->ns_key_len, c->ns, &c->poly_key);
    return EKV_OK;
}

kvstore_client *kvstore_client_create(const kvstore_client_config *cfg, ekv_error *err)
{
    kvstore_client *c = calloc(1, sizeof *c);
    if (!c) {
        ekv_error_set(err, EKV_ENOMEM, "kvstore client: out of memory");
        return NULL;
    }
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work_cv, NULL);
    pthread_cond_init(&c->done_cv, NULL);
    c->x.efd = -1;
    if (copy_config(c, cfg, err) != EKV_OK)
        goto fail;
    c->cfg.peers = cfg->peers;
    ekv_status st = kvr_init(c, err);
    c->cfg.peers = NULL;
    if (st != EKV_OK)
        goto fail;
    if (cfg->local_capacity && !(c->local = kvstore_local_create(cfg->local_capacity, &c->m, err)))
        goto fail;
    if (pthread_create(&c->thread, NULL, worker_main, c) != 0) {
        ekv_error_set(err, EKV_EIO, "kvstore client: cannot start the worker thread");
        goto fail;
    }
    c->thread_started = true;
    pthread_mutex_lock(&c->mu);
    while (!c->connected)
        pthread_cond_wait(&c->done_cv, &c->mu); /* first_connect is time-bounded */
    pthread_mutex_unlock(&c->mu);
    return c;
fail:
    kvstore_client_destroy(c);
    return NULL;
}

void kvstore_client_destroy(kvstore_client *c)
{
    if (!c)
        return;
    if (c->thread_started) {
        pthread_mutex_lock(&c->mu);
        c->stopping = true;
        pthread_cond_signal(&c->work_cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->thread, NULL);
    }
    kvr_fini(c);
    kvstore_local_destroy(c->local);
    pthread_cond_destroy(&c->work_cv);
    pthread_cond_destroy(&c->done_cv);
    pthread_mutex_destroy(&c->mu);
    if (c->token)
        memset(c->token, 0, c->cfg.auth_token_len);
    free(c->token);
    if (c->ns_key)
        memset(c->ns_key, 0, c->ns_key_len);
    free(c->ns_key);
    memset(&c->poly_key, 0, sizeof c->poly_key);
    free(c);
}

ekv_status kvstore_client_submit(kvstore_client *c, kvstore_op *ops, size_t n,
                                 kvstore_done_fn done, void *arg, kvstore_batch **out,
                                 ekv_error *err)
{
    if (n > (SIZE_MAX - sizeof(kvstore_batch)) / sizeof(kvc_item) || (n && !ops))
        return ekv_error_set(err, EKV_EINVAL, "kvstore: bad batch");
    kvstore_batch *b = malloc(sizeof *b + n * sizeof(kvc_item));
    if (!b)
        return ekv_error_set(err, EKV_ENOMEM, "kvstore: out of memory for a batch of %zu", n);
    *b = (kvstore_batch){.c = c, .ops = ops, .n = n, .done = done, .arg = arg,
                         .auto_free = out == NULL, .t_submit = kvx_now()};
    pthread_mutex_lock(&c->mu);
    ekv_status st = EKV_OK;
    if (c->stopping)
        st = ekv_error_set(err, EKV_EINVAL, "kvstore: client is closing");
    else if (c->unfinished >= c->cfg.max_batches)
        st = ekv_error_set(err, EKV_EBUSY, "kvstore: %d batches already in flight",
                           c->unfinished);
    if (st == EKV_OK) {
        if (c->sub_tail)
            c->sub_tail->next = b;
        else
            c->sub_head = b;
        c->sub_tail = b;
        c->unfinished++;
        atomic_fetch_add_explicit(&c->submitted, 1, memory_order_release);
        pthread_cond_signal(&c->work_cv);
        if (out)
            *out = b;
    }
    pthread_mutex_unlock(&c->mu);
    if (st != EKV_OK)
        free(b);
    return st;
}

bool kvstore_batch_done(const kvstore_batch *b)
{
    return atomic_load(&b->finished);
}

ekv_status kvstore_batch_wait(kvstore_batch *b, int timeout_ms)
{
    kvstore_client *c = b->c;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = (long long)ts.tv_nsec + (long long)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
    ts.tv_sec += (time_t)(ns / 1000000000);
    ts.tv_nsec = (long)(ns % 1000000000);
    pthread_mutex_lock(&c->mu);
    while (!atomic_load(&b->finished)) {
        if (timeout_ms < 0)
            pthread_cond_wait(&c->done_cv, &c->mu);
        else if (pthread_cond_timedwait(&c->done_cv, &c->mu, &ts) != 0)
            break;
    }
    pthread_mutex_unlock(&c->mu);
    return atomic_load(&b->finished) ? EKV_OK : EKV_EBUSY;
}

void kvstore_batch_release(kvstore_batch *b)
{
    if (!b)
        return;
    kvstore_batch_wait(b, -1);
    free(b);
}

void kvstore_batch_abandon(kvstore_batch *b)
{
    if (!b)
        return;
    kvstore_client *c = b->c;
    pthread_mutex_lock(&c->mu);
    bool done = atomic_load(&b->finished);
    b->auto_free = !done; /* finish_batches frees it, or we do now */
    pthread_mutex_unlock(&c->mu);
    if (done)
        free(b);
}

static kvstore_result one_op(kvstore_client *c, kvstore_op *op)
{
    kvstore_batch *b = NULL;
    for (int tries = 0; tries < 1000; tries++) {
        ekv_status st = kvstore_client_submit(c, op, 1, NULL, NULL, &b, NULL);
        if (st == EKV_OK)
            break;
        if (st != EKV_EBUSY)
            return KVSTORE_FAILED;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (!b)
        return KVSTORE_FAILED;
    kvstore_batch_release(b);
    return op->result;
}

kvstore_result kvstore_client_put(kvstore_client *c, const kvstore_key *key, const void *val,
                                  size_t len)
{
    kvstore_op op = {.kind = KVSTORE_PUT, .key = *key, .buf = (void *)val, .len = len};
    return one_op(c, &op);
}

kvstore_result kvstore_client_get(kvstore_client *c, const kvstore_key *key, void *buf,
                                  size_t cap, size_t *value_len)
{
    kvstore_op op = {.kind = KVSTORE_GET, .key = *key, .buf = buf, .len = cap};
    kvstore_result r = one_op(c, &op);
    if (value_len)
        *value_len = op.value_len;
    return r;
}

const kvstore_metrics *kvstore_client_metrics(const kvstore_client *c)
{
    return &c->m;
}

int kvstore_client_peer_of(const kvstore_client *c, const kvstore_key *key)
{
    if (!c->ring)
        return -1;
    kvstore_key stored; /* the ring places the namespaced key */
    kvstore_ns_key(c->ns_key, c->ns_key_len, c->ns, key, &stored);
    return kvstore_ring_lookup(c->ring, &stored);
}

bool kvstore_client_peer_up(const kvstore_client *c, int peer)
{
    return peer >= 0 && peer < c->n_peers && atomic_load(&c->peers[peer].up);
}
