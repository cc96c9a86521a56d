/*
 * test_kvstore_hostile.c - the client against a daemon that holds the token
 * but lies. A fake daemon (a child process on the UCX API, below)
 * authenticates as the real one does and then answers requests wrongly,
 * one way per test; a real `entrokv kvstore` daemon is the client's second
 * peer. Every lie must cost only the liar's keys: its ops end as a miss or
 * a failure within the op timeout, nothing is written past the caller's
 * buffer, the client says why in its log, and the real daemon's keys keep
 * round-tripping through the same client. A last test turns it round: a
 * client that authenticates, asks for a value and never takes it.
 *
 * Usage: test_kvstore_hostile ENTROKV_BINARY
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memfd_create */
#endif
#include <arpa/inet.h>
#include <sys/mman.h>
#include <ucp/api/ucp.h>

#include "ekv_test.h"
#include "kvtest.h"
#include "kvucx.h"

static const char *g_bin;
static char g_dir[64], g_token_file[128];
static const char *TOKEN = "secret-token";

/* ---- the fake daemon ---- */

typedef enum lie {
    LIE_BAD_PROOF,       /* AUTH_OK with a proof made without the token */
    LIE_BAD_CHECKSUM,    /* stores nothing, answers gets with junk under a wrong checksum */
    LIE_OVERSIZED,       /* a get's value longer than the caller's buffer */
    LIE_WRONG_REQUEST,   /* replies carry request ids nobody asked for */
    LIE_WRONG_OP,        /* a get answered as a put */
    LIE_MALFORMED,       /* a reply whose header is not one */
    LIE_UNSOLICITED,     /* a second challenge in the middle of the session */
    LIE_SILENT,          /* never answers */
    LIE_SPAN_OUTSIDE,    /* maps a region, then points gets past its end */
    LIE_REGION_TOO_BIG,  /* claims a region larger than its file */
    LIE_PUT_SPAN_SHORT,  /* a put answered with room in the region (never asked for) */
    LIE_BAD_MAC,         /* answers gets with junk under a right checksum, a wrong MAC */
    LIE_COUNT
} lie;

static const char *LIE_NAMES[LIE_COUNT] = {
    "bad proof",        "bad checksum", "oversized value", "wrong request id",
    "wrong op",         "malformed",    "unsolicited",     "silent",
    "span outside",     "region too big", "put span short", "bad mac",
};

typedef struct fake {
    lie lie;
    kvx_worker x;
    ucp_listener_h listener;
    ucp_conn_request_h pending[8];
    int n_pending;
    ucp_ep_h ep;
    uint8_t snonce[KVWIRE_NONCE_BYTES];
    uint8_t *region; /* LIE_SPAN_OUTSIDE, LIE_REGION_TOO_BIG, LIE_PUT_SPAN_SHORT */
    int region_fd;
    uint8_t out[64][KVWIRE_HEADER_BYTES + 8192]; /* replies in flight */
    int next_out;
} fake;

#define REGION_BYTES (1u << 20)
#define ID_OFFSET 4096u

static bool direct_lie(lie l)
{
    return l == LIE_SPAN_OUTSIDE || l == LIE_REGION_TOO_BIG || l == LIE_PUT_SPAN_SHORT;
}

static void on_sent(void *req, ucs_status_t status, void *user)
{
    (void)status, (void)user;
    ucp_request_free(req);
}

/* A reply with a payload of up to 8 KiB, from a slot of f->out. */
static void send_big(fake *f, const kvwire_hdr *h, const void *data, size_t len)
{
    uint8_t *buf = f->out[f->next_out++ % 64];
    kvwire_encode(h, buf);
    memcpy(buf + KVWIRE_HEADER_BYTES, data, len);
    ucs_status_ptr_t r = kvx_send(f->ep, buf, buf + KVWIRE_HEADER_BYTES, len, on_sent, NULL);
    (void)r; /* NULL: done; an error: the client sees the op time out */
}

/* A direct reply: where to read or write. */
static void send_span(fake *f, kvwire_hdr *h, uint64_t offset, uint64_t len)
{
    kvwire_span sp = {.offset = offset, .len = len};
    uint8_t p[KVWIRE_SPAN_BYTES];
    kvwire_span_encode(&sp, p);
    h->flags |= KVWIRE_F_DIRECT;
    h->payload_len = KVWIRE_SPAN_BYTES;
    (void)kvx_send_small(&f->x, f->ep, h, p, sizeof p);
}

static void answer(fake *f, const kvwire_hdr *req)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = req->op, .flags = KVWIRE_F_REPLY,
                    .request_id = req->request_id};
    memcpy(h.key, req->key, KVWIRE_KEY_BYTES);
    bool get = req->op == KVWIRE_OP_GET, put = req->op == KVWIRE_OP_PUT;
    uint8_t junk[8192];
    memset(junk, 0x5a, sizeof junk);
    switch (f->lie) {
    case LIE_BAD_CHECKSUM:
    case LIE_BAD_MAC:
    case LIE_OVERSIZED:
        if (get) {
            size_t len = f->lie == LIE_OVERSIZED ? sizeof junk : KVT_BLOCK_BYTES;
            h.payload_len = (uint32_t)len;
            h.checksum = kvstore_checksum(junk, len) ^ (f->lie == LIE_BAD_CHECKSUM);
            memset(h.mac, 0x5a, sizeof h.mac); /* the fake has no namespace key */
            send_big(f, &h, junk, len);
            return;
        }
        break; /* puts, dels: "ok" */
    case LIE_WRONG_REQUEST: h.request_id ^= 0x5a5a0000; break;
    case LIE_WRONG_OP:
        if (get)
            h.op = KVWIRE_OP_PUT;
        break;
    case LIE_MALFORMED: {
        uint8_t bad[KVWIRE_HEADER_BYTES];
        kvwire_encode(&h, bad);
        bad[0] ^= 0xff; /* the magic */
        uint8_t *buf = f->out[f->next_out++ % 64];
        memcpy(buf, bad, sizeof bad);
        (void)kvx_send(f->ep, buf, NULL, 0, on_sent, NULL);
        return;
    }
    case LIE_UNSOLICITED: {
        kvwire_hdr c = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_CHALLENGE,
                        .payload_len = KVWIRE_NONCE_BYTES};
        (void)kvx_send_small(&f->x, f->ep, &c, f->snonce, sizeof f->snonce);
        return;
    }
    case LIE_SILENT: return;
    case LIE_SPAN_OUTSIDE: /* gets only: a put refused here would fail the peer first */
        if (get && (req->flags & KVWIRE_F_DIRECT)) {
            send_span(f, &h, REGION_BYTES - 64, KVT_BLOCK_BYTES);
            return;
        }
        break;
    case LIE_PUT_SPAN_SHORT: /* gets: a span of zeros, which fails its checksum */
        if (put || (get && (req->flags & KVWIRE_F_DIRECT))) {
            send_span(f, &h, 2 * ID_OFFSET, put ? 64 : KVT_BLOCK_BYTES);
            return;
        }
        break;
    case LIE_REGION_TOO_BIG:
        if (get) { /* a direct answer to a get that could not ask for one */
            send_span(f, &h, 0, KVT_BLOCK_BYTES);
            return;
        }
        break;
    default: break;
    }
    h.status = get ? KVWIRE_ST_MISS : KVWIRE_ST_OK;
    (void)kvx_send_small(&f->x, f->ep, &h, NULL, 0);
}

static void on_auth(fake *f, const uint8_t *data)
{
    const uint8_t *cnonce = data;
    uint8_t proof[KVWIRE_MAC_BYTES];
    if (f->lie == LIE_BAD_PROOF)
        kvx_proof((const uint8_t *)"guess", 5, 's', cnonce, f->snonce, proof);
    else
        kvx_proof((const uint8_t *)TOKEN, strlen(TOKEN), 's', cnonce, f->snonce, proof);
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_AUTH_OK,
                    .payload_len = KVWIRE_MAC_BYTES};
    (void)kvx_send_small(&f->x, f->ep, &h, proof, sizeof proof);
}

static void on_direct(fake *f, const kvwire_hdr *req)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_DIRECT, .flags = KVWIRE_F_REPLY,
                    .request_id = req->request_id, .status = KVWIRE_ST_MISS};
    uint8_t p[KVWIRE_DIRECT_BYTES];
    if (f->region) {
        kvwire_direct d = {.pid = (uint32_t)getpid(), .fd = f->region_fd,
                           .region_bytes = REGION_BYTES, .id_offset = ID_OFFSET};
        if (f->lie == LIE_REGION_TOO_BIG)
            d.region_bytes = 64ull * REGION_BYTES;
        memcpy(d.id, f->region + ID_OFFSET, KVWIRE_ID_BYTES);
        kvwire_direct_encode(&d, p);
        h.status = KVWIRE_ST_OK;
        h.payload_len = sizeof p;
    }
    (void)kvx_send_small(&f->x, f->ep, &h, p, h.payload_len);
}

static ucs_status_t on_am(void *arg, const void *header, size_t hlen, void *data, size_t len,
                          const ucp_am_recv_param_t *param)
{
    fake *f = arg;
    kvwire_hdr h;
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) ||
        kvwire_decode(header, hlen, &h, NULL) != EKV_OK ||
        kvwire_check_payload(&h, len, NULL) != EKV_OK)
        return UCS_OK; /* the tests send nothing large */
    if (h.op == KVWIRE_OP_AUTH)
        on_auth(f, data);
    else if (h.op == KVWIRE_OP_DIRECT)
        on_direct(f, &h);
    else if (h.op != KVWIRE_OP_RELEASE && h.op != KVWIRE_OP_COMMIT)
        answer(f, &h);
    return UCS_OK;
}

static void on_conn(ucp_conn_request_h req, void *arg)
{
    fake *f = arg;
    if (f->n_pending < 8)
        f->pending[f->n_pending++] = req;
    else
        ucp_listener_reject(f->listener, req);
}

static void on_ep_error(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)arg, (void)ep, (void)status; /* the next connection replaces it */
}

static void challenge(fake *f)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_CHALLENGE,
                    .payload_len = KVWIRE_NONCE_BYTES};
    (void)kvx_send_small(&f->x, f->ep, &h, f->snonce, sizeof f->snonce);
}

static void on_wired(void *req, ucs_status_t status, void *user)
{
    if (status == UCS_OK)
        challenge(user);
    ucp_request_free(req);
}

/* One connection at a time: a reconnect replaces the last one. */
static void accept_pending(fake *f)
{
    while (f->n_pending) {
        ucp_conn_request_h req = f->pending[--f->n_pending];
        if (f->ep)
            kvx_close(&f->x, f->ep);
        ekv_error err;
        f->ep = kvx_accept(&f->x, req, on_ep_error, f, &err);
        if (!f->ep || kvx_nonce(f->snonce, &err) != EKV_OK)
            continue;
        ucs_status_ptr_t r = kvx_flush(f->ep, on_wired, f);
        if (r == NULL)
            challenge(f);
    }
}

static void make_region(fake *f)
{
    f->region_fd = memfd_create("ekv-fake-region", 0);
    if (f->region_fd < 0 || ftruncate(f->region_fd, REGION_BYTES) != 0)
        _exit(3);
    f->region = mmap(NULL, REGION_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, f->region_fd, 0);
    if (f->region == MAP_FAILED)
        _exit(3);
    kvt_fill(f->region + ID_OFFSET, KVWIRE_ID_BYTES, 77);
}

/* The child: listens on 127.0.0.1, writes its port to fd, serves until
 * killed (or its parent is gone). */
static void fake_main(lie l, int fd)
{
    static fake f;
    f.lie = l;
    if (direct_lie(l))
        make_region(&f);
    ekv_error err;
    if (kvx_worker_init(&f.x, on_am, &f, &err) != EKV_OK)
        _exit(3);
    struct sockaddr_storage sa;
    socklen_t salen;
    if (kvx_parse_addr("127.0.0.1:0", &sa, &salen, &err) != EKV_OK)
        _exit(3);
    ucp_listener_params_t lp = {
        .field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER,
        .sockaddr = {.addr = (struct sockaddr *)&sa, .addrlen = salen},
        .conn_handler = {.cb = on_conn, .arg = &f},
    };
    ucp_listener_attr_t la = {.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR};
    if (ucp_listener_create(f.x.worker, &lp, &f.listener) != UCS_OK ||
        ucp_listener_query(f.listener, &la) != UCS_OK)
        _exit(3);
    int port = ntohs(((struct sockaddr_in *)&la.sockaddr)->sin_port);
    if (write(fd, &port, sizeof port) != sizeof port)
        _exit(3);
    close(fd);
    pid_t parent = getppid();
    while (getppid() == parent) {
        kvx_progress(&f.x);
        accept_pending(&f);
        kvx_wait(&f.x, 10);
    }
    _exit(0);
}

static pid_t fake_start(lie l, int *port)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        fake_main(l, fds[1]);
    }
    close(fds[1]);
    struct pollfd p = {.fd = fds[0], .events = POLLIN};
    bool ok = poll(&p, 1, 5000) == 1 && read(fds[0], port, sizeof *port) == sizeof *port;
    close(fds[0]);
    if (!ok && pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -1;
    }
    return pid;
}

/* ---- the client's side ---- */

typedef struct logbuf {
    char text[16384];
    size_t len;
} logbuf;

static void log_line(void *arg, const char *line)
{
    logbuf *l = arg;
    int n = snprintf(l->text + l->len, sizeof l->text - l->len, "%s\n", line);
    if (n > 0 && l->len + (size_t)n < sizeof l->text)
        l->len += (size_t)n;
    fprintf(stderr, "  [client] %s\n", line);
}

static kvstore_client *client_for(int fake_port, int real_port, bool no_direct, logbuf *log)
{
    char a[64], b[64];
    snprintf(a, sizeof a, "127.0.0.1:%d", fake_port);
    snprintf(b, sizeof b, "127.0.0.1:%d", real_port);
    const char *peers[] = {a, b};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 2;
    cfg.auth_token = (const uint8_t *)TOKEN;
    cfg.auth_token_len = strlen(TOKEN);
    cfg.op_timeout_ms = 300;
    cfg.connect_timeout_ms = 1000;
    cfg.reconnect_ms = 100;
    cfg.no_direct = no_direct;
    cfg.log = log_line;
    cfg.log_arg = log;
    ekv_error err = {0};
    kvstore_client *c = kvstore_client_create(&cfg, &err);
    if (!c)
        fprintf(stderr, "client: %s\n", err.msg);
    return c;
}

/* What the lie must leave in the client's log (the reason it gave up on
 * the fake, or that it left its values on UCX); NULL: nothing to see. */
static const char *expected_log(lie l)
{
    switch (l) {
    case LIE_BAD_PROOF: return "could not prove it holds the token";
    case LIE_WRONG_REQUEST:
    case LIE_WRONG_OP:
    case LIE_SILENT: return "timed out";
    case LIE_MALFORMED: return "malformed message";
    case LIE_UNSOLICITED: return "unexpected message";
    case LIE_SPAN_OUTSIDE: return "a direct get outside the region";
    case LIE_REGION_TOO_BIG: return "the region's size does not match";
    case LIE_PUT_SPAN_SHORT: return "a direct reply to a put";
    default: return NULL;
    }
}

/*
 * One lie: 24 keys, about half on each peer. The real daemon's keys must
 * round-trip; the fake's must end as a miss (get), a failure or a lie we
 * cannot tell from "stored" (put), never a wrong value, within the op
 * timeout plus slack, and without writing past the buffer. Then the real
 * daemon's keys are read again, after whatever the fake did to the client.
 */
static void run_lie(lie l, int real_port)
{
    fprintf(stderr, "-- %s\n", LIE_NAMES[l]);
    int fake_port;
    pid_t pid = fake_start(l, &fake_port);
    CHECK(pid > 0);
    if (pid <= 0)
        return;
    static logbuf log;
    log.len = 0;
    log.text[0] = 0;
    kvstore_client *c = client_for(fake_port, real_port, !direct_lie(l), &log);
    CHECK(c != NULL);
    if (!c)
        goto out;
    CHECK(kvstore_client_peer_up(c, 0) == (l != LIE_BAD_PROOF));
    CHECK(kvstore_client_peer_up(c, 1));
    enum { N = 24 };
    uint8_t v[KVT_BLOCK_BYTES], got[KVT_BLOCK_BYTES + 64];
    int on_fake = 0;
    for (int i = 0; i < N; i++) {
        kvstore_key k = kvt_key(9000 + 100 * (int)l + i);
        bool fake_key = kvstore_client_peer_of(c, &k) == 0;
        on_fake += fake_key;
        kvt_fill(v, sizeof v, i);
        double t0 = kvt_now();
        kvstore_result pr = kvstore_client_put(c, &k, v, sizeof v);
        size_t len = 0;
        memset(got, 0xee, sizeof got);
        kvstore_result gr = kvstore_client_get(c, &k, got, KVT_BLOCK_BYTES, &len);
        double took = kvt_now() - t0;
        CHECK(took < 2 * 0.3 + 1.0); /* two ops, each within its timeout */
        CHECK(got[KVT_BLOCK_BYTES] == 0xee); /* nothing past the buffer */
        if (!fake_key) {
            CHECK_EQ_INT(pr, KVSTORE_OK);
            CHECK_EQ_INT(gr, KVSTORE_OK);
            CHECK(len == sizeof v && !memcmp(got, v, sizeof v));
        } else {
            CHECK(gr == KVSTORE_MISS || (l == LIE_OVERSIZED && gr == KVSTORE_TOOSMALL));
            (void)pr; /* a put the fake acknowledged is one it could have lost */
        }
    }
    CHECK(on_fake > 0 && on_fake < N);
    for (int i = 0; i < N; i++) { /* the real daemon's keys, after all that */
        kvstore_key k = kvt_key(9000 + 100 * (int)l + i);
        if (kvstore_client_peer_of(c, &k) == 0)
            continue;
        size_t len = 0;
        kvt_fill(v, sizeof v, i);
        CHECK_EQ_INT(kvstore_client_get(c, &k, got, KVT_BLOCK_BYTES, &len), KVSTORE_OK);
        CHECK(len == sizeof v && !memcmp(got, v, sizeof v));
    }
    const kvstore_metrics *m = kvstore_client_metrics(c);
    if (l == LIE_BAD_CHECKSUM)
        CHECK(m->checksum_failures > 0);
    if (l == LIE_BAD_MAC)
        CHECK(m->mac_failures > 0 && m->checksum_failures == 0);
    if (expected_log(l) && !strstr(log.text, expected_log(l))) {
        fprintf(stderr, "  client log lacks \"%s\"\n", expected_log(l));
        CHECK(0);
    }
    kvstore_client_destroy(c);
out:
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

static void test_lies_cost_only_the_liars_keys(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/real.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 64, logp) != 0) {
        CHECK(0);
        return;
    }
    for (int l = 0; l < LIE_COUNT; l++)
        run_lie((lie)l, d.port);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

/* ---- a client that never takes its reply ---- */

typedef struct lurker {
    kvx_worker x;
    uint8_t snonce[KVWIRE_NONCE_BYTES];
    bool challenged, authed, answered, rndv;
} lurker;

static ucs_status_t lurker_am(void *arg, const void *header, size_t hlen, void *data, size_t len,
                              const ucp_am_recv_param_t *param)
{
    lurker *l = arg;
    kvwire_hdr h;
    if (kvwire_decode(header, hlen, &h, NULL) != EKV_OK)
        return UCS_OK;
    if (h.op == KVWIRE_OP_CHALLENGE && len == KVWIRE_NONCE_BYTES) {
        memcpy(l->snonce, data, KVWIRE_NONCE_BYTES);
        l->challenged = true;
    } else if (h.op == KVWIRE_OP_AUTH_OK) {
        l->authed = true;
    } else if (h.op == KVWIRE_OP_GET && (h.flags & KVWIRE_F_REPLY)) {
        l->answered = true;
        l->rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
        if (l->rndv) /* keep it unclaimed, like a client that died: never acknowledged */
            return UCS_INPROGRESS;
    }
    return UCS_OK;
}

static void lurker_err(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)arg, (void)ep, (void)status;
}

static bool lurker_wait(lurker *l, const bool *flag)
{
    double end = kvt_now() + 3.0;
    while (!*flag && kvt_now() < end)
        kvx_progress(&l->x);
    return *flag;
}

/* Authenticates over UCX alone (no direct reads), asks for key, lets the
 * rendezvous reply sit, then leaves with a forced close. (UCX then warns
 * "object ... was not returned to mpool mm_recv_desc": expected.) */
static bool lurk(int port, const kvstore_key *key)
{
    lurker l = {0};
    ekv_error err = {0};
    if (kvx_worker_init(&l.x, lurker_am, &l, &err) != EKV_OK)
        return false;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    ucp_ep_h ep = kvx_connect(&l.x, (struct sockaddr *)&a, sizeof a, lurker_err, NULL, &err);
    bool ok = ep && lurker_wait(&l, &l.challenged);
    if (ok) {
        uint8_t payload[KVWIRE_NONCE_BYTES + KVWIRE_MAC_BYTES];
        ok = kvx_nonce(payload, &err) == EKV_OK;
        kvx_proof((const uint8_t *)TOKEN, strlen(TOKEN), 'c', l.snonce, payload,
                  payload + KVWIRE_NONCE_BYTES);
        kvwire_hdr auth = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_AUTH,
                           .payload_len = sizeof payload};
        ok = ok && kvx_send_small(&l.x, ep, &auth, payload, sizeof payload) == EKV_OK &&
             lurker_wait(&l, &l.authed);
    }
    if (ok) {
        kvwire_hdr get = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_GET, .request_id = 7};
        kvstore_key stored; /* the client's default namespace, keyed by the token */
        kvstore_ns_key((const uint8_t *)TOKEN, strlen(TOKEN), "default", key, &stored);
        memcpy(get.key, stored.b, KVWIRE_KEY_BYTES);
        ok = kvx_send_small(&l.x, ep, &get, NULL, 0) == EKV_OK && lurker_wait(&l, &l.answered) &&
             l.rndv;
    }
    if (ep)
        kvx_close(&l.x, ep);
    kvx_worker_fini(&l.x);
    return ok;
}

/* Speaks the protocol itself but answers the challenge with a proof made
 * from the wrong token, then asks for key anyway: returns whether the
 * daemon said AUTH_OK or answered the get (it must do neither). The
 * store's own client cannot make this test: it checks the daemon's proof
 * and would refuse a daemon that let it in. */
static bool impostor_served(int port, const kvstore_key *key)
{
    lurker l = {0};
    ekv_error err = {0};
    if (kvx_worker_init(&l.x, lurker_am, &l, &err) != EKV_OK)
        return true;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    ucp_ep_h ep = kvx_connect(&l.x, (struct sockaddr *)&a, sizeof a, lurker_err, NULL, &err);
    bool challenged = ep && lurker_wait(&l, &l.challenged);
    CHECK(challenged);
    if (challenged) {
        static const char *WRONG = "not-the-token";
        uint8_t payload[KVWIRE_NONCE_BYTES + KVWIRE_MAC_BYTES];
        CHECK_EQ_INT(kvx_nonce(payload, &err), EKV_OK);
        kvx_proof((const uint8_t *)WRONG, strlen(WRONG), 'c', l.snonce, payload,
                  payload + KVWIRE_NONCE_BYTES);
        kvwire_hdr auth = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_AUTH,
                           .payload_len = sizeof payload};
        if (kvx_send_small(&l.x, ep, &auth, payload, sizeof payload) == EKV_OK)
            lurker_wait(&l, &l.authed);
        kvwire_hdr get = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_GET, .request_id = 9};
        memcpy(get.key, key->b, KVWIRE_KEY_BYTES);
        if (kvx_send_small(&l.x, ep, &get, NULL, 0) == EKV_OK)
            lurker_wait(&l, &l.answered);
    }
    if (ep)
        kvx_close(&l.x, ep);
    kvx_worker_fini(&l.x);
    return !challenged || l.authed || l.answered;
}

static void test_a_client_with_the_wrong_token_is_never_served(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/impostor.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 64, logp) != 0) {
        CHECK(0);
        return;
    }
    kvstore_client *c = kvt_client(d.port, TOKEN, 0);
    CHECK(c && kvstore_client_peer_up(c, 0));
    uint8_t v[KVT_BLOCK_BYTES], got[KVT_BLOCK_BYTES];
    kvstore_key k = kvt_key(78000);
    kvt_fill(v, sizeof v, 6);
    if (c)
        CHECK_EQ_INT(kvstore_client_put(c, &k, v, sizeof v), KVSTORE_OK);
    CHECK(!impostor_served(d.port, &k));
    CHECK(kvt_file_has(logp, "wrong token proof"));
    if (c) { /* the daemon serves the rightful client as before */
        size_t len = 0;
        memset(got, ~v[0], sizeof got);
        CHECK_EQ_INT(kvstore_client_get(c, &k, got, sizeof got, &len), KVSTORE_OK);
        CHECK(len == sizeof v && !memcmp(got, v, sizeof v));
        kvstore_client_destroy(c);
    }
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

/* The daemon's reply to a client that never takes it stays in flight in
 * UCX (a client on this host has no peer error handling, and a forced
 * close need not complete what it cut off): the daemon must keep serving
 * the value to others and still free everything when it stops (under
 * ASan, a leak makes it exit non-zero). */
static void test_a_client_that_never_takes_its_reply(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/lurked.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 64, logp) != 0) {
        CHECK(0);
        return;
    }
    kvstore_client *c = kvt_client(d.port, TOKEN, 0);
    CHECK(c && kvstore_client_peer_up(c, 0));
    if (!c) {
        kvt_daemon_stop(&d);
        return;
    }
    enum { BIG = 1 << 20 };
    uint8_t *v = malloc(BIG), *got = malloc(BIG);
    kvstore_key k = kvt_key(77000);
    kvt_fill(v, BIG, 5);
    CHECK_EQ_INT(kvstore_client_put(c, &k, v, BIG), KVSTORE_OK);
    for (int i = 0; i < 3; i++)
        CHECK(lurk(d.port, &k)); /* each leaves a reply in flight */
    size_t len = 0;
    memset(got, 0, BIG);
    CHECK_EQ_INT(kvstore_client_get(c, &k, got, BIG, &len), KVSTORE_OK);
    CHECK(len == BIG && !memcmp(got, v, BIG));
    kvstore_client_destroy(c);
    free(v);
    free(got);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

/*
 * UCX safety (issue 21): every endpoint has peer error handling, so a
 * forced close completes what is outstanding on it, and no buffer is
 * handed back to its owner while a transfer into or out of it may still
 * complete. Gets of 4 MiB by UCX (rendezvous into the caller's buffers)
 * and puts of 4 MiB (read from them) are cut off by stopping the daemon
 * mid-transfer; the client times out, force-closes, and finishes the
 * batch. The test frees every buffer the moment the batch is done, then
 * lets the daemon run again and keeps the client busy: a late byte landing
 * in (or read from) freed memory is a heap-use-after-free under ASan, and
 * a daemon that mishandles its cut-off sends exits non-zero. Three rounds,
 * each stopping at a different moment.
 */
static void test_a_cut_off_transfer_never_touches_a_returned_buffer(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/cutoff.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 256, logp) != 0) {
        CHECK(0);
        return;
    }
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", d.port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.auth_token = (const uint8_t *)TOKEN;
    cfg.auth_token_len = strlen(TOKEN);
    cfg.no_direct = true; /* values by UCX, both ways */
    cfg.op_timeout_ms = 300;
    cfg.reconnect_ms = 50;
    kvstore_client *c = kvstore_client_create(&cfg, NULL);
    kvstore_client *seed = kvt_client(d.port, TOKEN, 0); /* patient: stores the values */
    CHECK(c && kvstore_client_peer_up(c, 0) && seed);
    enum { N = 8, SZ = 4 << 20 };
    uint8_t *v = malloc(SZ);
    for (int round = 0; c && seed && v && round < 3; round++) {
        kvt_fill(v, SZ, round);
        double up = kvt_now() + 3; /* back from the last round's forced close */
        while (!kvstore_client_peer_up(c, 0) && kvt_now() < up)
            kvt_sleep_ms(10);
        kvstore_op ops[2 * N];
        uint8_t *bufs[2 * N];
        for (int i = 0; i < N; i++) { /* stored first, so the gets have values */
            kvstore_key k = kvt_key(88000 + 100 * round + i);
            CHECK_EQ_INT(kvstore_client_put(seed, &k, v, SZ), KVSTORE_OK);
        }
        for (int i = 0; i < 2 * N; i++) {
            bufs[i] = malloc(SZ);
            if (i >= N)
                memcpy(bufs[i], v, SZ);
            ops[i] = (kvstore_op){.kind = i < N ? KVSTORE_GET : KVSTORE_PUT,
                                  .key = kvt_key(88000 + 100 * round + i), .buf = bufs[i],
                                  .len = SZ};
        }
        kvstore_batch *b = NULL;
        CHECK_EQ_INT(kvstore_client_submit(c, ops, 2 * N, NULL, NULL, &b, NULL), EKV_OK);
        kvt_sleep_ms(round == 0 ? 2 : round == 1 ? 25 : 80); /* a different point each round */
        kill(d.pid, SIGSTOP);
        double t0 = kvt_now();
        bool ended = kvstore_batch_wait(b, 5000) == EKV_OK;
        CHECK(ended);
        CHECK(kvt_now() - t0 < 3.0); /* the timeout, not the stall, ended it */
        if (!ended) /* UCX kept a request the close should have completed */
            kill(d.pid, SIGCONT);
        kvstore_batch_release(b);
        int cut = 0;
        for (int i = 0; i < 2 * N; i++) {
            if (ops[i].kind == KVSTORE_GET && ops[i].result == KVSTORE_OK)
                CHECK(!memcmp(bufs[i], v, SZ));
            cut += ops[i].result != KVSTORE_OK;
            free(bufs[i]); /* the caller's again: UCX must be done with it */
        }
        fprintf(stderr, "  round %d: %d of %d ops cut off\n", round, cut, 2 * N);
        kill(d.pid, SIGCONT);
        /* late completions would land now: keep the client's worker busy */
        double end = kvt_now() + 0.4;
        uint8_t small[KVT_BLOCK_BYTES];
        while (kvt_now() < end) {
            kvstore_key k = kvt_key(89000);
            (void)kvstore_client_get(c, &k, small, sizeof small, NULL);
            kvt_sleep_ms(5);
        }
    }
    if (c) { /* and the store works as before */
        uint8_t got[KVT_BLOCK_BYTES], val[KVT_BLOCK_BYTES];
        kvstore_key k = kvt_key(89001);
        kvt_fill(val, sizeof val, 4);
        double end = kvt_now() + 3;
        while (!kvstore_client_peer_up(c, 0) && kvt_now() < end)
            kvt_sleep_ms(10);
        CHECK_EQ_INT(kvstore_client_put(c, &k, val, sizeof val), KVSTORE_OK);
        CHECK_EQ_INT(kvstore_client_get(c, &k, got, sizeof got, NULL), KVSTORE_OK);
        CHECK(!memcmp(got, val, sizeof val));
        kvstore_client_destroy(c);
    }
    kvstore_client_destroy(seed);
    free(v);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0); /* under ASan: nothing leaked or misused */
}

int main(int argc, char **argv)
{
    int rc = kvt_setup(argc, argv, &g_bin, g_dir, "/tmp/ekv-hostile-XXXXXX", g_token_file, TOKEN);
    if (rc)
        return rc;
    RUN_TEST(test_lies_cost_only_the_liars_keys);
    RUN_TEST(test_a_client_that_never_takes_its_reply);
    RUN_TEST(test_a_client_with_the_wrong_token_is_never_served);
    RUN_TEST(test_a_cut_off_transfer_never_touches_a_returned_buffer);
    kvt_scratch_remove(g_dir, ekv_test_failures);
    return TEST_EXIT();
}
