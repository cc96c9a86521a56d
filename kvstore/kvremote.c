/*
 * kvremote.c - the client's remote tier: one authenticated UCX endpoint per
 * daemon, the hash ring that picks the daemon for a key, and the table of
 * ops in flight, each with a deadline.
 *
 * A peer goes DOWN -> WAIT_CHALLENGE (endpoint created) -> WAIT_AUTH_OK
 * (our proof sent) -> [WAIT_DIRECT: same host, asked whether its value
 * region can be mapped] -> READY (the daemon's proof checked). Ops for a peer
 * that is not READY finish at once as a miss (get, exists) or a failure
 * (put, del), so a dead daemon costs nothing but its keys. A peer that
 * errors, sends a malformed message or lets an op pass its deadline is
 * force-closed: UCX then completes its outstanding sends and rendezvous
 * receives with an error, which is what lets a get that was landing in the
 * caller's buffer finish safely as a miss. It is retried after
 * reconnect_ms, without blocking anything else.
 */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "entrokv/hmac.h"
#include "kvclient_int.h"

#define SLOT_BITS 16

static kvstore_result fail_result(kvstore_op_kind k)
{
    return k == KVSTORE_GET || k == KVSTORE_EXISTS ? KVSTORE_MISS : KVSTORE_FAILED;
}

static void add(_Atomic uint64_t *ctr, uint64_t v)
{
    atomic_fetch_add_explicit(ctr, v, memory_order_relaxed);
}

/* ---- slots ---- */

static void slot_free(kvstore_client *c, kvc_slot *s)
{
    s->id = 0;
    c->free_slots[c->n_free++] = (int)(s - c->slots);
    c->n_inflight--;
}

/* Finishes the op once its reply (or failure) is in and UCX holds no
 * request that still points into the slot or the caller's buffer. */
static void maybe_complete(kvstore_client *c, kvc_slot *s)
{
    if (!s->replied || s->send_req || s->recv_req || s->hashing)
        return;
    kvstore_tier_metrics *tm = &c->m.tier[KVSTORE_TIER_REMOTE];
    kvstore_op *op = s->it->op;
    if (op->kind == KVSTORE_GET) {
        add(s->result == KVSTORE_OK ? &tm->hits : &tm->misses, 1);
        if (s->result == KVSTORE_OK)
            add(&tm->bytes_out, s->value_len);
        if (s->result == KVSTORE_OK && s->direct_hit)
            add(&c->m.direct_gets, 1);
    } else if (op->kind == KVSTORE_PUT && s->result == KVSTORE_OK) {
        add(&tm->bytes_in, op->len);
    }
    kvc_item *it = s->it;
    kvstore_result r = s->result;
    size_t vl = s->value_len;
    slot_free(c, s);
    kvc_item_finish(c, it, r, KVSTORE_TIER_REMOTE, vl);
}

static void fail_slot(kvc_slot *s)
{
    if (!s->replied) {
        s->replied = true;
        s->result = fail_result(s->it->op->kind);
    }
}

/* ---- peers ---- */

static void unmap_region(kvc_peer *p)
{
    if (p->region)
        munmap((void *)p->region, p->region_bytes);
    p->region = NULL;
    p->region_bytes = 0;
}

/* The daemon's DIRECT answer: map its value region through
 * /proc/<pid>/fd/<fd> and check the id it wrote there, which tells us it
 * is the region of the process we authenticated (the pid may mean another
 * process in our namespace). Read-only: the daemon sealed it against
 * writable mappings, and puts go by UCX. Any failure leaves gets on UCX. */
static void map_region(kvstore_client *c, int pi, const kvwire_hdr *h, const uint8_t *data)
{
    kvc_peer *p = &c->peers[pi];
    if (h->status != KVWIRE_ST_OK)
        return;
    kvwire_direct d;
    kvwire_direct_decode(data, &d);
    const char *why = NULL;
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/fd/%d", d.pid, d.fd);
    int fd = d.fd >= 0 ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    struct stat st;
    void *m = MAP_FAILED;
    if (fd < 0)
        why = "cannot open the daemon's region";
    else if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < d.region_bytes || d.region_bytes == 0 ||
             d.region_bytes > SIZE_MAX || d.id_offset > d.region_bytes - KVWIRE_ID_BYTES)
        why = "the region's size does not match";
    else if ((m = mmap(NULL, d.region_bytes, PROT_READ, MAP_SHARED, fd, 0)) == MAP_FAILED)
        why = "cannot map the region";
    else if (memcmp((const uint8_t *)m + d.id_offset, d.id, KVWIRE_ID_BYTES) != 0)
        why = "the region is not the daemon's";
    if (fd >= 0)
        close(fd);
    if (why) {
        if (m != MAP_FAILED)
            munmap(m, d.region_bytes);
        kvc_log(c, "kvstore: peer %s: gets go by UCX: %s", p->name, why);
        return;
    }
    p->region = m;
    p->region_bytes = d.region_bytes;
    kvc_log(c, "kvstore: peer %s: reading values in its shared memory", p->name);
}


static void peer_fail(kvstore_client *c, int pi, const char *why)
{
    kvc_peer *p = &c->peers[pi];
    p->fail = NULL;
    if (p->state == PEER_DOWN)
        return;
    if (!c->stopping_remote) {
        kvc_log(c, "kvstore: peer %s down: %s", p->name, why);
        add(&c->m.peer_failures, 1);
    }
    atomic_store(&p->up, false);
    p->state = PEER_DOWN;
    unmap_region(p);
    p->retry_at = kvx_now() + c->cfg.reconnect_ms / 1000.0;
    for (int i = 0; i < c->n_slots; i++)
        if (c->slots[i].id && c->slots[i].peer == pi)
            fail_slot(&c->slots[i]);
    ucp_ep_h ep = p->ep;
    p->ep = NULL;
    /* The endpoint has peer error handling (kvucx.c), so the forced close
     * completes every send and rendezvous receive still on it with an
     * error, now or in a later progress: an op whose request UCX still
     * holds waits for that callback (maybe_complete), and only then is the
     * caller's buffer the caller's again. */
    kvx_close(&c->x, ep);
    for (int i = 0; i < c->n_slots; i++) {
        kvc_slot *s = &c->slots[i];
        if (s->id && s->peer == pi)
            maybe_complete(c, s);
    }
}

static void on_peer_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    kvc_peer *p = arg;
    if (p->ep != ep)
        return; /* an endpoint this peer already closed */
    if (!p->fail)
        p->fail = ucs_status_string(status);
}

static void peer_connect(kvstore_client *c, int pi)
{
    kvc_peer *p = &c->peers[pi];
    ekv_error err;
    p->fail = NULL;
    p->same_host = kvx_addr_is_local((struct sockaddr *)&p->sa);
    p->ep = kvx_connect(&c->x, (struct sockaddr *)&p->sa, p->salen, on_peer_error, p, &err);
    if (!p->ep) {
        kvc_log(c, "kvstore: peer %s: %s", p->name, err.msg);
        p->retry_at = kvx_now() + c->cfg.reconnect_ms / 1000.0;
        return;
    }
    p->state = PEER_WAIT_CHALLENGE;
    p->deadline = kvx_now() + c->cfg.connect_timeout_ms / 1000.0;
}

void kvr_connect_all(kvstore_client *c)
{
    for (int i = 0; i < c->n_peers; i++)
        peer_connect(c, i);
}

bool kvr_connecting(const kvstore_client *c)
{
    for (int i = 0; i < c->n_peers; i++)
        if (c->peers[i].state != PEER_DOWN && c->peers[i].state != PEER_READY)
            return true;
    return false;
}

static void on_challenge(kvstore_client *c, int pi, const uint8_t *snonce)
{
    kvc_peer *p = &c->peers[pi];
    uint8_t payload[KVWIRE_NONCE_BYTES + KVWIRE_MAC_BYTES];
    ekv_error err;
    if (kvx_nonce(p->cnonce, &err) != EKV_OK) {
        p->fail = "no random nonce";
        return;
    }
    memcpy(p->snonce_copy, snonce, KVWIRE_NONCE_BYTES);
    memcpy(payload, p->cnonce, KVWIRE_NONCE_BYTES);
    kvx_proof(c->token, c->cfg.auth_token_len, 'c', snonce, p->cnonce,
              payload + KVWIRE_NONCE_BYTES);
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_AUTH,
                    .payload_len = sizeof payload};
    if (kvx_send_small(&c->x, p->ep, &h, payload, sizeof payload) != EKV_OK)
        p->fail = "sending auth failed";
    else
        p->state = PEER_WAIT_AUTH_OK;
}

static void peer_ready(kvstore_client *c, int pi)
{
    kvc_peer *p = &c->peers[pi];
    p->state = PEER_READY;
    atomic_store(&p->up, true);
    kvc_log(c, "kvstore: peer %s connected", p->name);
}

static void on_direct(kvstore_client *c, int pi, const kvwire_hdr *h, const uint8_t *data)
{
    map_region(c, pi, h, data);
    peer_ready(c, pi);
}

static void on_auth_ok(kvstore_client *c, int pi, const uint8_t *proof)
{
    kvc_peer *p = &c->peers[pi];
    uint8_t want[KVWIRE_MAC_BYTES];
    kvx_proof(c->token, c->cfg.auth_token_len, 's', p->cnonce, p->snonce_copy, want);
    if (!hmac_equal(want, proof, sizeof want)) {
        p->fail = "the daemon could not prove it holds the token";
        return;
    }
    if (p->same_host && !c->cfg.no_direct) {
        /* ready once we know whether values go through its region */
        kvwire_hdr d = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_DIRECT};
        if (kvx_send_small(&c->x, p->ep, &d, NULL, 0) != EKV_OK)
            p->fail = "sending direct failed";
        else
            p->state = PEER_WAIT_DIRECT;
        return;
    }
    peer_ready(c, pi);
}

/* ---- checksums, a step at a time ----
 *
 * This thread also drives UCX, and hashing a large value in one go (a
 * MiB: 35 us hot, 100 us cold) would leave every transfer in flight
 * unattended meanwhile, the socket drained and the peer waiting. So a value
 * larger than HASH_STEP - a put's before it is sent, a get's once it has
 * landed - joins the hash list, and each turn of the loop hashes one step
 * of its head between UCX progress calls (kvr_progress). */
#define HASH_STEP (64u << 10)

/* Starts the value's MAC (under the op's namespaced key, for len bytes). */
static void mac_start(kvstore_client *c, kvc_slot *s, size_t len)
{
    kvpoly_init(&s->poly, &c->poly_key);
    s->mac_len = len;
    s->mac_done = 0;
}

/* The value's MAC, once all of it went through s->poly. */
static void mac_finish(kvstore_client *c, kvc_slot *s, uint8_t mac[KVSTORE_MAC_BYTES])
{
    uint8_t poly[16];
    kvpoly_final(&s->poly, poly);
    kvns_mac_finish(c->ns_key, c->ns_key_len, c->ns, &s->it->key, s->mac_len, poly, mac);
}

static void hash_enqueue(kvstore_client *c, kvc_slot *s, size_t len, bool mac_only)
{
    kvstore_sum_init(&s->sum);
    mac_start(c, s, len);
    s->mac_only = mac_only;
    s->hashing = true;
    s->hash_next = -1;
    int idx = (int)(s - c->slots);
    if (c->hash_tail >= 0)
        c->slots[c->hash_tail].hash_next = idx;
    else
        c->hash_head = idx;
    c->hash_tail = idx;
}

/* Asks the daemon to drop a value that failed its checksum here (it may
 * have been spoilt in its memory). Fire and forget: request id 0 is no
 * op's, so the reply is dropped as a late one. */
static void drop_remote(kvstore_client *c, kvc_slot *s)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_DEL, .request_id = 0};
    memcpy(h.key, s->it->key.b, KVWIRE_KEY_BYTES);
    if (c->peers[s->peer].state == PEER_READY)
        (void)kvx_send_small(&c->x, c->peers[s->peer].ep, &h, NULL, 0);
}

/* A get's value has landed in the caller's buffer: good if it hashes to
 * the checksum that came with it and its MAC (finished here) is the one the
 * writer made: a value written without our namespace key is a miss, as is
 * a spoilt one. */
static void get_checked(kvstore_client *c, kvc_slot *s, uint64_t sum)
{
    uint8_t mac[KVSTORE_MAC_BYTES];
    mac_finish(c, s, mac);
    if (sum != s->checksum) {
        add(&c->m.checksum_failures, 1);
    } else if (!hmac_equal(mac, s->want_mac, sizeof mac)) {
        add(&c->m.mac_failures, 1);
    } else {
        memcpy(s->it->mac, mac, sizeof mac); /* for the host tier, if promoted */
        s->result = KVSTORE_OK;
        return;
    }
    s->result = KVSTORE_MISS;
    drop_remote(c, s);
}

/* A value in buf whose checksum is sum (known) or still to compute: its
 * MAC (and checksum) now, or a step at a time when it is large. */
static void verify_get(kvstore_client *c, kvc_slot *s, bool have_sum, uint64_t sum)
{
    const uint8_t *v = s->it->op->buf;
    if (s->value_len > HASH_STEP) {
        s->checksum_got = sum;
        hash_enqueue(c, s, s->value_len, have_sum);
        return;
    }
    mac_start(c, s, s->value_len);
    kvpoly_update(&s->poly, v, s->value_len);
    get_checked(c, s, have_sum ? sum : kvstore_checksum(v, s->value_len));
}

static void send_request(kvstore_client *c, kvc_slot *s, uint64_t checksum);

/* One step of len bytes of v: the checksum (unless only the MAC is left)
 * and the MAC over the same bytes. true once the whole value is done. */
static bool value_step(kvc_slot *s, const uint8_t *v, size_t len, uint64_t *sum)
{
    size_t to;
    bool done;
    if (s->mac_only) {
        to = len - s->mac_done > HASH_STEP ? s->mac_done + HASH_STEP : len;
        done = to == len;
        *sum = s->checksum_got;
    } else {
        done = kvstore_sum_step(&s->sum, v, len, HASH_STEP, sum);
        to = done ? len : s->sum.done;
    }
    kvpoly_update(&s->poly, v + s->mac_done, to - s->mac_done);
    s->mac_done = to;
    return done;
}

/* One step of the value at the head of the hash list; true if there was
 * one. A put that failed meanwhile (peer down, timed out) is not sent. */
static bool hash_step(kvstore_client *c)
{
    if (c->hash_head < 0)
        return false;
    kvc_slot *s = &c->slots[c->hash_head];
    kvstore_op *op = s->it->op;
    bool put = op->kind == KVSTORE_PUT;
    bool dropped = put && s->replied;
    uint64_t sum = 0;
    if (!dropped && !value_step(s, op->buf, put ? op->len : s->value_len, &sum))
        return true;
    c->hash_head = s->hash_next;
    if (c->hash_head < 0)
        c->hash_tail = -1;
    s->hashing = false;
    if (put && !dropped) {
        send_request(c, s, sum);
        return true;
    }
    if (!put)
        get_checked(c, s, sum);
    maybe_complete(c, s);
    return true;
}

/* ---- replies ---- */

static void on_get_data(void *req, ucs_status_t status, size_t length, void *user)
{
    kvc_slot *s = user;
    kvstore_client *c = s->it->b->c;
    s->recv_req = NULL;
    ucp_request_free(req);
    if (status == UCS_OK && length == s->value_len)
        verify_get(c, s, false, 0);
    else
        s->result = KVSTORE_MISS;
    maybe_complete(c, s);
}

/* A span lies inside the mapped region. */
static bool span_ok(const kvc_peer *p, const kvwire_span *sp)
{
    return p->region && sp->offset <= p->region_bytes && sp->len <= p->region_bytes - sp->offset;
}

/* Tells the daemon we are done with a direct get's span. */
static void release_span(kvstore_client *c, int pi, uint64_t request_id)
{
    kvwire_hdr r = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_RELEASE,
                    .request_id = request_id};
    if (kvx_send_small(&c->x, c->peers[pi].ep, &r, NULL, 0) != EKV_OK)
        c->peers[pi].fail = "sending release failed";
}

/* A direct get's answer: the value's span in the region we mapped. One
 * pass copies it into the caller's buffer and checksums what was copied,
 * so bytes the daemon reused meanwhile (it gave up on us) are a miss. A
 * value of NT_GET_BYTES or more is streamed past the cache: it would not
 * stay there for the caller anyway (a restore moves many), and skipping the
 * read of the destination's lines raised 1 MiB gets from 0.59 to 0.74 of
 * ucx_perftest (docs/kvstore.md). */
#define NT_GET_BYTES (256u << 10)

static void get_direct(kvstore_client *c, kvc_slot *s, const kvwire_hdr *h, const uint8_t *data)
{
    kvc_peer *p = &c->peers[s->peer];
    kvstore_op *op = s->it->op;
    kvwire_span span;
    kvwire_span_decode(data, &span);
    if (!span_ok(p, &span)) {
        p->fail = "a direct get outside the region";
        return;
    }
    s->value_len = (size_t)span.len;
    if (span.len > op->len) {
        s->result = KVSTORE_TOOSMALL;
    } else {
        s->checksum = h->checksum;
        memcpy(s->want_mac, h->mac, KVSTORE_MAC_BYTES);
        const uint8_t *src = p->region + span.offset;
        /* the checksum and the MAC are of the copy: what the caller got */
        verify_get(c, s, true,
                   s->value_len >= NT_GET_BYTES
                       ? kvstore_checksum_copy_nt(op->buf, src, s->value_len)
                       : kvstore_checksum_copy(op->buf, src, s->value_len));
        s->direct_hit = true; /* counted once the MAC verifies (maybe_complete) */
    }
    release_span(c, s->peer, h->request_id);
}

static void get_reply(kvstore_client *c, kvc_slot *s, const kvwire_hdr *h, void *data,
                      size_t len, bool rndv)
{
    kvstore_op *op = s->it->op;
    s->result = KVSTORE_MISS;
    if (h->flags & KVWIRE_F_DIRECT) {
        if (!s->direct)
            c->peers[s->peer].fail = "a direct reply to a get that did not ask";
        else if (h->status == KVWIRE_ST_OK)
            get_direct(c, s, h, data);
        return;
    }
    if (h->status == KVWIRE_ST_BADSUM)
        add(&c->m.checksum_failures, 1);
    if (h->status != KVWIRE_ST_OK)
        return;
    s->value_len = len;
    if (len > op->len) {
        s->result = KVSTORE_TOOSMALL;
        return; /* an unclaimed rendezvous is released by UCX */
    }
    s->checksum = h->checksum;
    memcpy(s->want_mac, h->mac, KVSTORE_MAC_BYTES);
    if (!rndv) {
        memcpy(op->buf, data, len);
        verify_get(c, s, false, 0);
        return;
    }
    ucp_request_param_t p = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.recv_am = on_get_data,
        .user_data = s,
    };
    ucs_status_ptr_t r = ucp_am_recv_data_nbx(c->x.worker, data, op->buf, len, &p);
    if (r == NULL)
        verify_get(c, s, false, 0);
    else if (!UCS_PTR_IS_ERR(r))
        s->recv_req = r;
}

static void on_reply(kvstore_client *c, int pi, const kvwire_hdr *h, void *data, size_t len,
                     bool rndv)
{
    uint64_t idx = h->request_id & ((1u << SLOT_BITS) - 1);
    kvc_slot *s = idx < (uint64_t)c->n_slots ? &c->slots[idx] : NULL;
    if (!s || !s->id || s->id != h->request_id || s->peer != pi || s->replied ||
        (int)s->it->op->kind != (int)(h->op - KVWIRE_OP_PUT + KVSTORE_PUT)) {
        /* a late reply to an op that already timed out; a span it carries
         * is still pinned for us */
        if (h->op == KVWIRE_OP_GET && (h->flags & KVWIRE_F_DIRECT) && h->status == KVWIRE_ST_OK)
            release_span(c, pi, h->request_id);
        return;
    }
    s->replied = true;
    switch (h->op) {
    case KVWIRE_OP_GET: get_reply(c, s, h, data, len, rndv); break;
    case KVWIRE_OP_PUT:
        if (h->flags & KVWIRE_F_DIRECT) { /* we never ask for one */
            s->result = KVSTORE_FAILED;
            c->peers[pi].fail = "a direct reply to a put";
            break;
        }
        s->result = h->status == KVWIRE_ST_OK        ? KVSTORE_OK
                    : h->status == KVWIRE_ST_NOSPACE ? KVSTORE_NOSPACE
                                                     : KVSTORE_FAILED;
        break;
    default: s->result = h->status == KVWIRE_ST_OK ? KVSTORE_OK : KVSTORE_MISS;
    }
    maybe_complete(c, s);
}

static int peer_of_ep(const kvstore_client *c, ucp_ep_h ep)
{
    for (int i = 0; ep && i < c->n_peers; i++)
        if (c->peers[i].ep == ep)
            return i;
    return -1;
}

static ucs_status_t on_am(void *arg, const void *header, size_t hlen, void *data, size_t len,
                          const ucp_am_recv_param_t *param)
{
    kvstore_client *c = arg;
    ucp_ep_h ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : NULL;
    int pi = peer_of_ep(c, ep);
    if (pi < 0)
        return UCS_OK; /* from an endpoint already closed */
    kvc_peer *p = &c->peers[pi];
    bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    kvwire_hdr h;
    ekv_error err;
    if (kvwire_decode(header, hlen, &h, &err) != EKV_OK ||
        kvwire_check_payload(&h, len, &err) != EKV_OK) {
        kvc_log(c, "kvstore: peer %s sent a malformed message: %s", p->name, err.msg);
        p->fail = "malformed message";
        return UCS_OK;
    }
    bool reply = (h.flags & KVWIRE_F_REPLY) != 0;
    if (h.op == KVWIRE_OP_CHALLENGE && p->state == PEER_WAIT_CHALLENGE && !rndv)
        on_challenge(c, pi, data);
    else if (h.op == KVWIRE_OP_AUTH_OK && p->state == PEER_WAIT_AUTH_OK && !rndv)
        on_auth_ok(c, pi, data);
    else if (h.op == KVWIRE_OP_DIRECT && reply && p->state == PEER_WAIT_DIRECT && !rndv)
        on_direct(c, pi, &h, data);
    else if (reply && p->state == PEER_READY &&
             h.op >= KVWIRE_OP_PUT && h.op <= KVWIRE_OP_DEL &&
             (!rndv || (h.op == KVWIRE_OP_GET && !(h.flags & KVWIRE_F_DIRECT))))
        on_reply(c, pi, &h, data, len, rndv);
    else
        p->fail = "unexpected message";
    return UCS_OK;
}

/* ---- issuing ---- */

static void on_sent(void *req, ucs_status_t status, void *user)
{
    kvc_slot *s = user;
    kvstore_client *c = s->it->b->c;
    s->send_req = NULL;
    ucp_request_free(req);
    if (status != UCS_OK) {
        fail_slot(s);
        if (!c->peers[s->peer].fail)
            c->peers[s->peer].fail = "send failed";
    }
    maybe_complete(c, s);
}

bool kvr_issue(kvstore_client *c, kvc_item *it)
{
    kvstore_op *op = it->op;
    int pi = kvstore_ring_lookup(c->ring, &it->key);
    if (pi < 0 || c->peers[pi].state != PEER_READY) {
        kvc_item_finish(c, it, fail_result(op->kind), KVSTORE_TIER_REMOTE, 0);
        return true;
    }
    if (op->kind == KVSTORE_PUT && (op->len == 0 || op->len > KVWIRE_MAX_PAYLOAD)) {
        kvc_item_finish(c, it, op->len ? KVSTORE_NOSPACE : KVSTORE_FAILED, KVSTORE_TIER_REMOTE, 0);
        return true;
    }
    if (c->n_free == 0)
        return false;
    int idx = c->free_slots[--c->n_free];
    kvc_slot *s = &c->slots[idx];
    memset(s, 0, sizeof *s);
    s->id = (++c->seq << SLOT_BITS) | (uint64_t)idx;
    s->it = it;
    s->peer = pi;
    s->deadline = kvx_now() + c->cfg.op_timeout_ms / 1000.0;
    c->n_inflight++;
    bool put = op->kind == KVSTORE_PUT;
    s->direct = op->kind == KVSTORE_GET && c->peers[pi].region;
    if (put && op->len > HASH_STEP) {
        hash_enqueue(c, s, op->len, false); /* sent once hashed (hash_step) */
    } else if (put) {
        mac_start(c, s, op->len);
        kvpoly_update(&s->poly, op->buf, op->len);
        send_request(c, s, kvstore_checksum(op->buf, op->len));
    } else {
        send_request(c, s, 0);
    }
    return true;
}

/* The op's request over UCX; a put's value with it, under its checksum
 * and its MAC (finished here). */
static void send_request(kvstore_client *c, kvc_slot *s, uint64_t checksum)
{
    kvstore_op *op = s->it->op;
    bool put = op->kind == KVSTORE_PUT;
    kvwire_hdr h = {.version = KVWIRE_VERSION,
                    .op = (uint8_t)(KVWIRE_OP_PUT + (op->kind - KVSTORE_PUT)),
                    .flags = s->direct ? KVWIRE_F_DIRECT : 0,
                    .request_id = s->id,
                    .payload_len = put ? (uint32_t)op->len : 0,
                    .checksum = checksum};
    memcpy(h.key, s->it->key.b, KVWIRE_KEY_BYTES);
    if (put)
        mac_finish(c, s, h.mac);
    kvwire_encode(&h, s->hdr);
    ucs_status_ptr_t r = kvx_send(c->peers[s->peer].ep, s->hdr, put ? op->buf : NULL,
                                  put ? op->len : 0, on_sent, s);
    if (UCS_PTR_IS_ERR(r)) {
        fail_slot(s);
        c->peers[s->peer].fail = "send failed";
        maybe_complete(c, s);
    } else if (r != NULL) {
        s->send_req = r;
    }
}

/* ---- the loop's housekeeping ---- */

static void sweep(kvstore_client *c, double now)
{
    for (int i = 0; i < c->n_slots; i++) {
        kvc_slot *s = &c->slots[i];
        if (!s->id || now <= s->deadline)
            continue;
        s->deadline = INFINITY; /* count it once */
        add(&c->m.timeouts, 1);
        fail_slot(s);
        if (s->send_req || s->recv_req)
            c->peers[s->peer].fail = "an op timed out mid-transfer";
        else if (!c->peers[s->peer].fail)
            c->peers[s->peer].fail = "an op timed out";
        maybe_complete(c, s);
    }
    for (int i = 0; i < c->n_peers; i++) {
        kvc_peer *p = &c->peers[i];
        if (p->state != PEER_DOWN && p->state != PEER_READY && now > p->deadline && !p->fail)
            p->fail = "connect / authentication timed out";
        if (p->fail)
            peer_fail(c, i, p->fail);
        if (p->state == PEER_DOWN && now >= p->retry_at && !c->stopping_remote)
            peer_connect(c, i);
    }
}

bool kvr_progress(kvstore_client *c)
{
    if (c->n_peers == 0)
        return false;
    bool any = kvx_progress(&c->x);
    any |= hash_step(c);
    double now = kvx_now();
    bool fails = false;
    for (int i = 0; i < c->n_peers; i++)
        fails |= c->peers[i].fail != NULL;
    if (fails || now - c->last_sweep > 0.001) {
        sweep(c, now);
        c->last_sweep = now;
    }
    return any;
}

void kvr_wait(kvstore_client *c, int ms)
{
    if (c->n_peers)
        kvx_wait(&c->x, ms);
}

/* ---- setup ---- */

ekv_status kvr_init(kvstore_client *c, ekv_error *err)
{
    int n = c->cfg.n_peers;
    if (n == 0)
        return EKV_OK;
    c->peers = calloc((size_t)n, sizeof *c->peers);
    c->n_slots = c->cfg.max_inflight;
    c->slots = calloc((size_t)c->n_slots, sizeof *c->slots);
    c->free_slots = calloc((size_t)c->n_slots, sizeof *c->free_slots);
    if (!c->peers || !c->slots || !c->free_slots)
        return ekv_error_set(err, EKV_ENOMEM, "kvstore client: out of memory");
    for (int i = 0; i < c->n_slots; i++)
        c->free_slots[c->n_free++] = c->n_slots - 1 - i;
    c->hash_head = c->hash_tail = -1;
    if (!(c->ring = kvstore_ring_create(c->cfg.vnodes, err)))
        return err ? err->code : EKV_EINVAL;
    for (int i = 0; i < n; i++) {
        kvc_peer *p = &c->peers[i];
        const char *name = c->cfg.peers[i];
        if (!name || strlen(name) >= sizeof p->name)
            return ekv_error_set(err, EKV_EINVAL, "kvstore client: bad peer address");
        strcpy(p->name, name);
        if (kvx_parse_addr(name, &p->sa, &p->salen, err) != EKV_OK ||
            kvstore_ring_add(c->ring, name, i, err) != EKV_OK)
            return err ? err->code : EKV_EINVAL;
    }
    c->n_peers = n;
    return kvx_worker_init(&c->x, on_am, c, err);
}

void kvr_fini(kvstore_client *c)
{
    c->stopping_remote = true;
    for (int i = 0; i < c->n_peers; i++)
        if (c->peers[i].state != PEER_DOWN)
            peer_fail(c, i, "client closing");
    if (c->x.worker)
        kvx_worker_fini(&c->x);
    kvstore_ring_destroy(c->ring);
    free(c->peers);
    free(c->slots);
    free(c->free_slots);
}
