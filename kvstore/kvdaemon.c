/*
 * kvdaemon.c - the KV store daemon: a kvstore_local served over UCX active
 * messages to clients that proved they hold the shared token.
 *
 * One thread (kvstore_daemon_run) owns the UCX worker, the listener and
 * every connection; all message handling happens in the active message
 * callback on that thread. A connection starts CHALLENGED: the daemon sends
 * a nonce and accepts exactly one message, a valid AUTH, within
 * auth_timeout_ms. Anything else - an unknown endpoint, a malformed header,
 * a payload whose length disagrees with it, any request before auth, a
 * rendezvous where only eager data is allowed - is logged in one line and
 * the connection is force-closed; other connections are untouched.
 *
 * Values move without extra copies, and the daemon hashes none of them. By
 * UCX, a PUT's rendezvous data lands directly in an entry reserved in the
 * store (committed when it is complete) and a GET's reply is sent from the
 * pinned entry, with the checksum and the MAC the writer put, which the
 * client that gets it verifies (it also asks us to DEL a value that failed,
 * since our copy may be the spoilt one). The daemon holds no namespace key:
 * MACs are the writers' and the readers' business (docs/kvstore.md, "Threat
 * model"). The store's values live in a shared region that a client on
 * this host may map read-only (the region is sealed against writable
 * mappings) and read itself (get_direct): the daemon then only pins, and the
 * client checks what it copied. Every value is written by the daemon:
 * direct puts are refused.
 */
#include "entrokv/kvstore.h"

#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "entrokv/hmac.h"
#include "kvucx.h"

enum { CONN_CHALLENGED, CONN_READY, CONN_DEAD };

/* Direct gets one connection may have unreleased: beyond this, gets go by
 * UCX, so one client cannot pin the whole store. */
#define KVD_MAX_PINS 1024

/* A value a direct get exposed: pinned until the client's RELEASE of that
 * request id, or until the connection goes. */
typedef struct kvd_pin {
    uint64_t request_id;
    kvstore_entry *e;
} kvd_pin;

typedef struct kvd_conn {
    kvstore_daemon *d;
    ucp_ep_h ep;
    int state;
    int refs; /* 1 for the connection itself + 1 per PUT receive or flush in flight */
    uint8_t snonce[KVWIRE_NONCE_BYTES];
    double auth_deadline;
    bool same_host; /* kvx_addr_is_local: may map our value region (handle_direct) */
    bool direct;    /* mapped our value region: gets may answer with a span */
    kvd_pin *pins;  /* direct gets the client is still reading */
    int n_pins;
    char peer[64];
} kvd_conn;

struct kvstore_daemon {
    uint8_t *token;
    size_t token_len;
    int auth_timeout_ms, max_conns;
    kvstore_log_fn log;
    void *log_arg;
    kvx_worker x;
    ucp_listener_h listener;
    int port;
    kvstore_local *store;
    kvwire_direct region; /* what DIRECT answers: region_bytes 0 when values are private */
    kvstore_metrics m;
    kvd_conn **conns;
    int n_conns, cap_conns;
    ucp_conn_request_h pending[64]; /* accepted in the main loop, not in the callback */
    int n_pending;
    struct kvd_xfer *xfers; /* values moving by UCX */
    volatile sig_atomic_t stop;
};

/* A value moving by UCX: a GET reply sent from a pinned entry, or a PUT's
 * rendezvous data arriving in a reserved one. UCX does not promise to
 * complete what a forced close cut off (an endpoint to a client on this
 * host has no peer error handling, so a reply whose client left before
 * acknowledging it stays in flight), so every transfer is on the daemon's
 * list. When its connection goes it only lets go of the connection: its
 * entry stays pinned (or reserved) while UCX may still touch the memory,
 * and is released by the callback if that ever comes, else when the
 * daemon is destroyed, after the worker. */
typedef struct kvd_xfer {
    struct kvd_xfer *prev, *next;
    kvstore_daemon *d;
    kvd_conn *c;      /* NULL once its connection is gone */
    kvstore_entry *e; /* pinned (GET) or reserved (PUT) until the transfer ends */
    bool put;         /* a PUT's receive (holds a conn ref), else a GET's send */
    uint64_t request_id;
    kvstore_key key;
    uint8_t hdr[KVWIRE_HEADER_BYTES];
} kvd_xfer;

static void logf_(kvstore_daemon *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(kvstore_daemon *d, const char *fmt, ...)
{
    if (!d->log)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    d->log(d->log_arg, line);
}

void kvstore_daemon_config_default(kvstore_daemon_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->listen = "127.0.0.1:0";
    cfg->capacity = 1ull << 30;
    cfg->auth_timeout_ms = 2000;
    cfg->max_conns = 256;
}

/* ---- connections ---- */

static void conn_unref(kvd_conn *c)
{
    if (--c->refs == 0)
        free(c);
}

static kvd_xfer *xfer_new(kvd_conn *c, kvstore_entry *e, bool put, const kvwire_hdr *h)
{
    kvd_xfer *x = malloc(sizeof *x);
    if (!x)
        return NULL;
    kvstore_daemon *d = c->d;
    *x = (kvd_xfer){.next = d->xfers, .d = d, .c = c, .e = e, .put = put,
                    .request_id = h->request_id};
    memcpy(x->key.b, h->key, KVWIRE_KEY_BYTES);
    if (d->xfers)
        d->xfers->prev = x;
    d->xfers = x;
    if (put)
        c->refs++;
    return x;
}

static void xfer_free(kvd_xfer *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        x->d->xfers = x->next;
    if (x->next)
        x->next->prev = x->prev;
    free(x);
}

/* Ends a transfer: its entry released (GET) or aborted (PUT), then freed. */
static void xfer_end(kvd_xfer *x)
{
    if (x->put)
        kvstore_local_abort(x->d->store, x->e);
    else
        kvstore_local_release(x->d->store, x->e);
    xfer_free(x);
}

/* Every transfer of c (dying) lets go of it. */
static void xfer_detach_all(kvstore_daemon *d, kvd_conn *c)
{
    for (kvd_xfer *x = d->xfers; x; x = x->next) {
        if (x->c != c)
            continue;
        x->c = NULL;
        if (x->put)
            conn_unref(c); /* never the last ref: the connection holds its own */
    }
}

/* Marks c dead; the main loop closes its endpoint and drops it. */
static void conn_kill(kvd_conn *c)
{
    c->state = CONN_DEAD;
}

static void conn_reject(kvd_conn *c, const char *what, const char *why)
{
    kvstore_daemon *d = c->d;
    atomic_fetch_add_explicit(&d->m.rejected, 1, memory_order_relaxed);
    if (c->state == CONN_CHALLENGED) /* it never proved the token */
        atomic_fetch_add_explicit(&d->m.auth_failures, 1, memory_order_relaxed);
    logf_(d, "kvstore: dropped %s from %s: %s; closing the connection", what, c->peer, why);
    conn_kill(c);
}

static kvd_conn *conn_find(kvstore_daemon *d, ucp_ep_h ep)
{
    for (int i = 0; i < d->n_conns; i++)
        if (d->conns[i]->ep == ep && d->conns[i]->state != CONN_DEAD)
            return d->conns[i];
    return NULL;
}

/* arg is the daemon, not the connection: UCX may report an error for an
 * endpoint we already closed (and whose connection is freed), so the
 * endpoint is looked up among the live ones. */
static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    kvd_conn *c = conn_find(arg, ep);
    if (!c)
        return;
    logf_(c->d, "kvstore: connection from %s lost: %s", c->peer, ucs_status_string(status));
    conn_kill(c);
}

static void on_conn_request(ucp_conn_request_h req, void *arg)
{
    kvstore_daemon *d = arg;
    if (d->n_pending == (int)(sizeof d->pending / sizeof d->pending[0])) {
        ucp_listener_reject(d->listener, req);
        return;
    }
    d->pending[d->n_pending++] = req;
}

static void send_challenge(kvd_conn *c)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_CHALLENGE,
                    .payload_len = KVWIRE_NONCE_BYTES};
    if (kvx_send_small(&c->d->x, c->ep, &h, c->snonce, sizeof c->snonce) != EKV_OK)
        conn_kill(c);
}

static void on_wired(void *req, ucs_status_t status, void *user)
{
    kvd_conn *c = user;
    if (c->state == CONN_CHALLENGED && status == UCS_OK)
        send_challenge(c);
    else
        conn_kill(c);
    ucp_request_free(req);
    conn_unref(c);
}

static void accept_one(kvstore_daemon *d, ucp_conn_request_h req)
{
    char peer[64] = "?";
    bool same_host = false;
    ucp_conn_request_attr_t attr = {.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR};
    if (ucp_conn_request_query(req, &attr) == UCS_OK) {
        kvx_addr_str((struct sockaddr *)&attr.client_address, peer, sizeof peer);
        same_host = kvx_addr_is_local((struct sockaddr *)&attr.client_address);
    }
    if (d->n_conns >= d->max_conns) {
        logf_(d, "kvstore: refused %s: %d connections already", peer, d->n_conns);
        atomic_fetch_add_explicit(&d->m.rejected, 1, memory_order_relaxed);
        ucp_listener_reject(d->listener, req);
        return;
    }
    if (d->n_conns == d->cap_conns) {
        int cap = d->cap_conns ? 2 * d->cap_conns : 16;
        kvd_conn **cs = realloc(d->conns, (size_t)cap * sizeof *cs);
        if (!cs) {
            ucp_listener_reject(d->listener, req);
            return;
        }
        d->conns = cs;
        d->cap_conns = cap;
    }
    kvd_conn *c = calloc(1, sizeof *c);
    ekv_error err;
    if (!c || kvx_nonce(c->snonce, &err) != EKV_OK) {
        free(c);
        ucp_listener_reject(d->listener, req);
        return;
    }
    c->d = d;
    c->refs = 1;
    c->state = CONN_CHALLENGED;
    c->auth_deadline = kvx_now() + d->auth_timeout_ms / 1000.0;
    snprintf(c->peer, sizeof c->peer, "%s", peer);
    c->same_host = same_host;
    c->ep = kvx_accept(&d->x, req, on_ep_error, d, &err);
    if (!c->ep) {
        logf_(d, "kvstore: accepting %s: %s", peer, err.msg);
        free(c);
        return;
    }
    d->conns[d->n_conns++] = c;
    /* The challenge waits for the endpoint's wireup: UCX 1.13 replays
     * messages queued during wireup with the limits of the lanes they were
     * queued for, which the shared-memory lanes then refuse. */
    c->refs++;
    ucs_status_ptr_t r = kvx_flush(c->ep, on_wired, c);
    if (r == NULL)
        send_challenge(c);
    else if (UCS_PTR_IS_ERR(r))
        conn_kill(c);
    if (!UCS_PTR_IS_PTR(r))
        conn_unref(c);
}

/* Closes dead connections and those that did not authenticate in time. */
static void sweep_conns(kvstore_daemon *d, double now)
{
    int k = 0;
    for (int i = 0; i < d->n_conns; i++) {
        kvd_conn *c = d->conns[i];
        if (c->state == CONN_CHALLENGED && now > c->auth_deadline)
            conn_reject(c, "connection", "no authentication in time");
        if (c->state != CONN_DEAD) {
            d->conns[k++] = c;
            continue;
        }
        kvx_close(&d->x, c->ep);
        c->ep = NULL;
        xfer_detach_all(d, c);
        for (int j = 0; j < c->n_pins; j++)
            kvstore_local_release(d->store, c->pins[j].e);
        free(c->pins);
        c->pins = NULL;
        c->n_pins = 0;
        conn_unref(c);
    }
    d->n_conns = k;
}

/* ---- requests ---- */

static void reply(kvd_conn *c, const kvwire_hdr *req, kvwire_status st)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = req->op, .flags = KVWIRE_F_REPLY,
                    .request_id = req->request_id, .status = (uint16_t)st};
    memcpy(h.key, req->key, KVWIRE_KEY_BYTES);
    if (kvx_send_small(&c->d->x, c->ep, &h, NULL, 0) != EKV_OK)
        conn_kill(c);
}

static void handle_auth(kvd_conn *c, const kvwire_hdr *h, const uint8_t *data)
{
    kvstore_daemon *d = c->d;
    uint8_t want[KVWIRE_MAC_BYTES], proof[KVWIRE_MAC_BYTES];
    const uint8_t *cnonce = data, *got = data + KVWIRE_NONCE_BYTES;
    kvx_proof(d->token, d->token_len, 'c', c->snonce, cnonce, want);
    if (!hmac_equal(want, got, sizeof want)) {
        conn_reject(c, "auth", "wrong token proof");
        return;
    }
    kvx_proof(d->token, d->token_len, 's', cnonce, c->snonce, proof);
    kvwire_hdr ok = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_AUTH_OK,
                     .request_id = h->request_id, .payload_len = KVWIRE_MAC_BYTES};
    c->state = CONN_READY;
    if (kvx_send_small(&c->d->x, c->ep, &ok, proof, sizeof proof) != EKV_OK)
        conn_kill(c);
    else
        logf_(d, "kvstore: %s authenticated", c->peer);
}

/* Commits or aborts a PUT's entry and answers the client. */
static void put_finish(kvd_conn *c, kvstore_entry *e, const kvwire_hdr *req, bool ok)
{
    kvwire_hdr h = {.op = KVWIRE_OP_PUT, .request_id = req->request_id};
    memcpy(h.key, req->key, KVWIRE_KEY_BYTES);
    if (ok)
        kvstore_local_commit(c->d->store, e);
    else
        kvstore_local_abort(c->d->store, e);
    if (c->state != CONN_DEAD)
        reply(c, &h, ok ? KVWIRE_ST_OK : KVWIRE_ST_ERROR);
}

static void put_done(kvd_xfer *x, bool ok)
{
    kvd_conn *c = x->c;
    if (!c) { /* its client is gone: nobody to answer, nothing committed */
        xfer_end(x);
        return;
    }
    kvwire_hdr h = {.request_id = x->request_id};
    memcpy(h.key, x->key.b, KVWIRE_KEY_BYTES);
    put_finish(c, x->e, &h, ok);
    conn_unref(c);
    xfer_free(x);
}

static void on_put_data(void *req, ucs_status_t status, size_t length, void *user)
{
    kvd_xfer *x = user;
    put_done(x, status == UCS_OK && length == kvstore_entry_len(x->e));
    ucp_request_free(req);
}

static void handle_put(kvd_conn *c, const kvwire_hdr *h, void *data, size_t len, bool rndv)
{
    kvstore_daemon *d = c->d;
    kvstore_result why;
    kvstore_key key;
    memcpy(key.b, h->key, KVWIRE_KEY_BYTES);
    kvstore_entry *e = kvstore_local_reserve(d->store, &key, len, h->checksum, &why);
    if (!e) {
        reply(c, h, KVWIRE_ST_NOSPACE);
        return; /* an unclaimed rendezvous is released by UCX */
    }
    kvstore_entry_set_mac(e, h->mac); /* the writer's; readers check it */
    if (!rndv) {
        memcpy(kvstore_entry_data(e), data, len);
        put_finish(c, e, h, true);
        return;
    }
    kvd_xfer *x = xfer_new(c, e, true, h);
    if (!x) {
        put_finish(c, e, h, false);
        return;
    }
    ucp_request_param_t p = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.recv_am = on_put_data,
        .user_data = x,
    };
    ucs_status_ptr_t s = ucp_am_recv_data_nbx(d->x.worker, data, kvstore_entry_data(e), len, &p);
    if (s == NULL || UCS_PTR_IS_ERR(s))
        put_done(x, s == NULL);
}

static void on_get_sent(void *req, ucs_status_t status, void *user)
{
    xfer_end(user);
    ucp_request_free(req);
}

/* A direct get: the client copies the value out of its read-only mapping
 * of our region and checks it (checksum and MAC), so the daemon only says
 * where it lies and keeps it pinned until the client's RELEASE. Records e
 * as held for request h and answers with its span of the region. false
 * (nothing recorded) when out of memory. */
static bool reply_span(kvd_conn *c, const kvwire_hdr *h, kvstore_entry *e)
{
    kvstore_daemon *d = c->d;
    if (!c->pins && !(c->pins = malloc(KVD_MAX_PINS * sizeof *c->pins)))
        return false;
    c->pins[c->n_pins++] = (kvd_pin){.request_id = h->request_id, .e = e};
    uint8_t *base = NULL, *label;
    size_t bytes;
    int fd;
    kvstore_local_region(d->store, (void **)&base, &bytes, &fd, &label);
    kvwire_span span = {.offset = (uint64_t)((uint8_t *)kvstore_entry_data(e) - base),
                        .len = kvstore_entry_len(e)};
    uint8_t payload[KVWIRE_SPAN_BYTES];
    kvwire_span_encode(&span, payload);
    kvwire_hdr r = {.version = KVWIRE_VERSION, .op = h->op,
                    .flags = KVWIRE_F_REPLY | KVWIRE_F_DIRECT, .request_id = h->request_id,
                    .payload_len = KVWIRE_SPAN_BYTES, .status = KVWIRE_ST_OK,
                    .checksum = kvstore_entry_checksum(e)};
    memcpy(r.key, h->key, KVWIRE_KEY_BYTES);
    memcpy(r.mac, kvstore_entry_mac(e), KVWIRE_MAC_BYTES);
    if (kvx_send_small(&c->d->x, c->ep, &r, payload, sizeof payload) != EKV_OK)
        conn_kill(c); /* the sweep releases its pins */
    return true;
}

static void get_direct(kvd_conn *c, const kvwire_hdr *h, kvstore_entry *e)
{
    kvstore_daemon *d = c->d;
    if (!reply_span(c, h, e)) {
        kvstore_local_release(d->store, e);
        reply(c, h, KVWIRE_ST_ERROR);
        return;
    }
    atomic_fetch_add_explicit(&d->m.tier[KVSTORE_TIER_LOCAL].hits, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&d->m.tier[KVSTORE_TIER_LOCAL].bytes_out, kvstore_entry_len(e),
                              memory_order_relaxed);
}

static void handle_release(kvd_conn *c, const kvwire_hdr *h)
{
    for (int i = 0; i < c->n_pins; i++) {
        if (c->pins[i].request_id != h->request_id)
            continue;
        kvstore_local_release(c->d->store, c->pins[i].e);
        c->pins[i] = c->pins[--c->n_pins];
        return;
    }
    /* not pinned (the client's op timed out before the reply): nothing to do */
}

/* A client on this host may map our value region read-only and read
 * direct gets from it; answer where it is, or ERROR when values are
 * private or the client is on another host. */
static void handle_direct(kvd_conn *c, const kvwire_hdr *h)
{
    kvstore_daemon *d = c->d;
    if (!c->same_host || d->region.region_bytes == 0) {
        reply(c, h, KVWIRE_ST_ERROR);
        return;
    }
    uint8_t payload[KVWIRE_DIRECT_BYTES];
    kvwire_direct_encode(&d->region, payload);
    kvwire_hdr r = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_DIRECT, .flags = KVWIRE_F_REPLY,
                    .request_id = h->request_id, .payload_len = KVWIRE_DIRECT_BYTES,
                    .status = KVWIRE_ST_OK};
    c->direct = true;
    if (kvx_send_small(&c->d->x, c->ep, &r, payload, sizeof payload) != EKV_OK)
        conn_kill(c);
}

static void handle_get(kvd_conn *c, const kvwire_hdr *h)
{
    kvstore_daemon *d = c->d;
    kvstore_key key;
    memcpy(key.b, h->key, KVWIRE_KEY_BYTES);
    kvstore_entry *e = kvstore_local_acquire(d->store, &key);
    if (e && (h->flags & KVWIRE_F_DIRECT) && c->direct && c->n_pins < KVD_MAX_PINS) {
        get_direct(c, h, e);
        return;
    }
    kvd_xfer *s = e ? xfer_new(c, e, false, h) : NULL;
    if (!s) {
        if (e)
            kvstore_local_release(d->store, e);
        atomic_fetch_add_explicit(&d->m.tier[KVSTORE_TIER_LOCAL].misses, 1, memory_order_relaxed);
        reply(c, h, KVWIRE_ST_MISS);
        return;
    }
    size_t len = kvstore_entry_len(e);
    /* the client checks the value against the checksum that goes with it */
    kvwire_hdr r = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_GET, .flags = KVWIRE_F_REPLY,
                    .request_id = h->request_id, .payload_len = (uint32_t)len,
                    .status = KVWIRE_ST_OK, .checksum = kvstore_entry_checksum(e)};
    memcpy(r.key, h->key, KVWIRE_KEY_BYTES);
    memcpy(r.mac, kvstore_entry_mac(e), KVWIRE_MAC_BYTES);
    kvwire_encode(&r, s->hdr);
    atomic_fetch_add_explicit(&d->m.tier[KVSTORE_TIER_LOCAL].hits, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&d->m.tier[KVSTORE_TIER_LOCAL].bytes_out, len, memory_order_relaxed);
    ucs_status_ptr_t st = kvx_send(c->ep, s->hdr, kvstore_entry_data(e), len, on_get_sent, s);
    if (st == NULL || UCS_PTR_IS_ERR(st)) {
        xfer_end(s);
        if (UCS_PTR_IS_ERR(st))
            conn_kill(c);
    }
}

static void handle_request(kvd_conn *c, const kvwire_hdr *h, void *data, size_t len, bool rndv)
{
    kvstore_daemon *d = c->d;
    kvstore_key key;
    memcpy(key.b, h->key, KVWIRE_KEY_BYTES);
    switch (h->op) {
    case KVWIRE_OP_PUT:
        if (h->flags & KVWIRE_F_DIRECT) /* clients map the region read-only */
            conn_reject(c, "direct put", "values are written by the daemon only");
        else
            handle_put(c, h, data, len, rndv);
        break;
    case KVWIRE_OP_GET: handle_get(c, h); break;
    case KVWIRE_OP_EXISTS:
        reply(c, h, kvstore_local_exists(d->store, &key) ? KVWIRE_ST_OK : KVWIRE_ST_MISS);
        break;
    case KVWIRE_OP_DEL:
        reply(c, h, kvstore_local_delete(d->store, &key) ? KVWIRE_ST_OK : KVWIRE_ST_MISS);
        break;
    case KVWIRE_OP_DIRECT: handle_direct(c, h); break;
    case KVWIRE_OP_RELEASE: handle_release(c, h); break;
    case KVWIRE_OP_COMMIT: conn_reject(c, "commit", "there are no direct puts"); break;
    default: conn_reject(c, kvwire_op_name(h->op), "handshake message after authentication");
    }
}

static ucs_status_t on_am(void *arg, const void *header, size_t hlen, void *data, size_t len,
                          const ucp_am_recv_param_t *param)
{
    kvstore_daemon *d = arg;
    bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    ucp_ep_h ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : NULL;
    kvd_conn *c = ep ? conn_find(d, ep) : NULL;
    if (!c) {
        atomic_fetch_add_explicit(&d->m.rejected, 1, memory_order_relaxed);
        logf_(d, "kvstore: dropped a message from an unknown endpoint");
        return UCS_OK;
    }
    kvwire_hdr h;
    ekv_error err;
    if (kvwire_decode(header, hlen, &h, &err) != EKV_OK ||
        kvwire_check_payload(&h, len, &err) != EKV_OK) {
        conn_reject(c, "message", err.msg);
        return UCS_OK;
    }
    atomic_fetch_add_explicit(&d->m.requests[h.op], 1, memory_order_relaxed);
    if (h.flags & KVWIRE_F_REPLY) {
        conn_reject(c, kvwire_op_name(h.op), "a reply sent to the daemon");
        return UCS_OK;
    }
    if (rndv && (h.op != KVWIRE_OP_PUT || (h.flags & KVWIRE_F_DIRECT))) {
        conn_reject(c, kvwire_op_name(h.op), "rendezvous data where none is allowed");
        return UCS_OK;
    }
    if (c->state != CONN_READY) {
        if (h.op == KVWIRE_OP_AUTH)
            handle_auth(c, &h, data);
        else
            conn_reject(c, kvwire_op_name(h.op), "request before authentication");
        return UCS_OK;
    }
    handle_request(c, &h, data, len, rndv);
    return UCS_OK;
}

/* ---- lifecycle ---- */

/* Values in a shared region that clients on this host can map (see
 * get_direct); private memory, and gets by UCX only, where that fails. */
static kvstore_local *open_store(kvstore_daemon *d, uint64_t capacity, ekv_error *err)
{
    ekv_error why = {0};
    kvstore_local *s = kvstore_local_create_shared(capacity, &d->m, &why);
    uint8_t *base, *label;
    size_t bytes;
    int fd;
    if (s && kvstore_local_region(s, (void **)&base, &bytes, &fd, &label) &&
        kvx_nonce(label, &why) == EKV_OK) {
        d->region = (kvwire_direct){.pid = (uint32_t)getpid(), .fd = fd,
                                    .region_bytes = bytes,
                                    .id_offset = (uint64_t)(label - base)};
        memcpy(d->region.id, label, KVWIRE_ID_BYTES);
        return s;
    }
    kvstore_local_destroy(s);
    logf_(d, "kvstore: values in private memory (clients on this host read them by UCX): %s",
          why.msg);
    return kvstore_local_create(capacity, &d->m, err);
}

kvstore_daemon *kvstore_daemon_create(const kvstore_daemon_config *cfg, ekv_error *err)
{
    if (!cfg->auth_token || cfg->auth_token_len == 0) {
        ekv_error_set(err, EKV_EINVAL, "kvstore daemon: an auth token is required");
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    if (kvx_parse_addr(cfg->listen, &ss, &sl, err) != EKV_OK)
        return NULL;
    kvstore_daemon *d = calloc(1, sizeof *d);
    if (!d || !(d->token = malloc(cfg->auth_token_len))) {
        free(d);
        ekv_error_set(err, EKV_ENOMEM, "kvstore daemon: out of memory");
        return NULL;
    }
    memcpy(d->token, cfg->auth_token, cfg->auth_token_len);
    d->token_len = cfg->auth_token_len;
    d->auth_timeout_ms = cfg->auth_timeout_ms > 0 ? cfg->auth_timeout_ms : 2000;
    d->max_conns = cfg->max_conns > 0 ? cfg->max_conns : 256;
    d->log = cfg->log;
    d->log_arg = cfg->log_arg;
    d->x.efd = -1;
    if (!(d->store = open_store(d, cfg->capacity, err)))
        goto fail;
    if (kvx_worker_init(&d->x, on_am, d, err) != EKV_OK)
        goto fail;
    ucp_listener_params_t lp = {
        .field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
        .sockaddr = {.addr = (struct sockaddr *)&ss, .addrlen = sl},
        .conn_handler = {.cb = on_conn_request, .arg = d},
    };
    ucs_status_t st = ucp_listener_create(d->x.worker, &lp, &d->listener);
    if (st != UCS_OK) {
        ekv_error_set(err, EKV_EIO, "kvstore daemon: listening on %s: %s", cfg->listen,
                      ucs_status_string(st));
        goto fail;
    }
    ucp_listener_attr_t la = {.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR};
    if (ucp_listener_query(d->listener, &la) == UCS_OK) {
        const struct sockaddr *sa = (const struct sockaddr *)&la.sockaddr;
        d->port = sa->sa_family == AF_INET ? ntohs(((const struct sockaddr_in *)sa)->sin_port)
                                           : ntohs(((const struct sockaddr_in6 *)sa)->sin6_port);
    }
    for (int i = 0; i < cfg->n_peers; i++)
        logf_(d, "kvstore: ring peer %s", cfg->peers[i]);
    return d;
fail:
    kvstore_daemon_destroy(d);
    return NULL;
}

int kvstore_daemon_port(const kvstore_daemon *d)
{
    return d->port;
}

kvstore_local *kvstore_daemon_store(kvstore_daemon *d)
{
    return d->store;
}

const kvstore_metrics *kvstore_daemon_metrics(const kvstore_daemon *d)
{
    return &d->m;
}

void kvstore_daemon_stop(kvstore_daemon *d)
{
    d->stop = 1;
}

ekv_status kvstore_daemon_run(kvstore_daemon *d, ekv_error *err)
{
    double last_busy = kvx_now(), last_sweep = 0;
    while (!d->stop) {
        bool busy = kvx_progress(&d->x);
        for (int i = 0; i < d->n_pending; i++)
            accept_one(d, d->pending[i]);
        busy |= d->n_pending > 0;
        d->n_pending = 0;
        double now = kvx_now();
        if (busy)
            last_busy = now;
        if (now - last_sweep > 0.01) {
            sweep_conns(d, now);
            last_sweep = now;
        }
        /* spin while traffic flows (latency), sleep on the event fd when idle */
        if (now - last_busy > 0.002)
            kvx_wait(&d->x, 100);
        else if (!busy)
            sched_yield(); /* spinning: let the clients on this host run */
    }
    for (int i = 0; i < d->n_conns; i++)
        conn_kill(d->conns[i]);
    sweep_conns(d, kvx_now());
    return EKV_OK;
}

void kvstore_daemon_destroy(kvstore_daemon *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->n_conns; i++)
        conn_kill(d->conns[i]);
    if (d->x.worker)
        sweep_conns(d, kvx_now());
    for (int i = 0; i < d->n_pending && d->listener; i++)
        ucp_listener_reject(d->listener, d->pending[i]);
    if (d->listener)
        ucp_listener_destroy(d->listener);
    if (d->x.worker)
        kvx_worker_fini(&d->x); /* completes what the closes cancelled */
    while (d->xfers) /* UCX never completed them, and can touch nothing now */
        xfer_end(d->xfers);
    kvstore_local_destroy(d->store);
    free(d->conns);
    if (d->token)
        memset(d->token, 0, d->token_len);
    free(d->token);
    free(d);
}
