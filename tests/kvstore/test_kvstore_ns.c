/*
 * test_kvstore_ns.c - namespaces against a real `entrokv kvstore` daemon:
 * what a client that holds the store's token but not a namespace's key can
 * do to that namespace (docs/kvstore.md, "Threat model").
 *
 *   - Its gets miss the namespace's values, and its puts never land on them.
 *   - A value it writes under the namespace's stored key (as if the key's
 *     name had leaked), with a correct checksum but a MAC made without the
 *     namespace key, is refused by every reader: by UCX and from the
 *     daemon's shared region alike. The same write with the right MAC is
 *     accepted: the refusal is the MAC's doing.
 *   - The daemon's region, which a client on this host may map, cannot be
 *     mapped writable or written, even through a read-write open; a direct
 *     put is refused.
 *
 * The raw client below speaks the wire itself (kvucx.h, as
 * test_kvstore_hostile.c does): the store's own client would never send
 * these.
 *
 * Usage: test_kvstore_ns ENTROKV_BINARY
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <sys/mman.h>
#include <ucp/api/ucp.h>

#include "ekv_test.h"
#include "entrokv/hmac.h"
#include "kvpoly.h"
#include "kvtest.h"
#include "kvucx.h"

static const char *g_bin;
static char g_dir[64], g_token_file[128];
static const char *TOKEN = "store-token";
static const char *KEY_A = "namespace-key-of-tenant-a", *KEY_B = "a-different-key";

/* A client of one namespace (ns, key) of the daemon on port. */
static kvstore_client *ns_client(int port, const char *ns, const char *key, bool no_direct)
{
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.auth_token = (const uint8_t *)TOKEN;
    cfg.auth_token_len = strlen(TOKEN);
    cfg.ns = ns;
    cfg.ns_key = (const uint8_t *)key;
    cfg.ns_key_len = strlen(key);
    cfg.no_direct = no_direct;
    ekv_error err = {0};
    kvstore_client *c = kvstore_client_create(&cfg, &err);
    if (!c)
        fprintf(stderr, "client: %s\n", err.msg);
    return c;
}

static uint64_t mac_failures(const kvstore_client *c)
{
    return atomic_load(&kvstore_client_metrics(c)->mac_failures);
}

/* ---- a raw client ---- */

typedef struct raw {
    kvx_worker x;
    ucp_ep_h ep;
    uint8_t snonce[KVWIRE_NONCE_BYTES];
    bool challenged, authed, replied;
    kvwire_hdr reply;
    uint8_t payload[64];
    uint8_t *out; /* a message in flight: header, then payload */
    bool sent;
} raw;

static ucs_status_t raw_am(void *arg, const void *header, size_t hlen, void *data, size_t len,
                           const ucp_am_recv_param_t *param)
{
    (void)param;
    raw *r = arg;
    kvwire_hdr h;
    if (kvwire_decode(header, hlen, &h, NULL) != EKV_OK)
        return UCS_OK;
    if (h.op == KVWIRE_OP_CHALLENGE && len == KVWIRE_NONCE_BYTES) {
        memcpy(r->snonce, data, KVWIRE_NONCE_BYTES);
        r->challenged = true;
    } else if (h.op == KVWIRE_OP_AUTH_OK) {
        r->authed = true;
    } else if (h.flags & KVWIRE_F_REPLY) {
        r->reply = h;
        memcpy(r->payload, data, len < sizeof r->payload ? len : sizeof r->payload);
        r->replied = true;
    }
    return UCS_OK;
}

static void raw_err(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    (void)arg, (void)ep, (void)status;
}

static bool raw_wait(raw *r, const bool *flag)
{
    double end = kvt_now() + 3.0;
    while (!*flag && kvt_now() < end)
        kvx_progress(&r->x);
    return *flag;
}

/* Connects and authenticates with the store's token. */
static bool raw_open(raw *r, int port)
{
    memset(r, 0, sizeof *r);
    ekv_error err = {0};
    if (kvx_worker_init(&r->x, raw_am, r, &err) != EKV_OK)
        return false;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    r->ep = kvx_connect(&r->x, (struct sockaddr *)&a, sizeof a, raw_err, NULL, &err);
    if (!r->ep || !raw_wait(r, &r->challenged))
        return false;
    uint8_t payload[KVWIRE_NONCE_BYTES + KVWIRE_MAC_BYTES];
    if (kvx_nonce(payload, &err) != EKV_OK)
        return false;
    kvx_proof((const uint8_t *)TOKEN, strlen(TOKEN), 'c', r->snonce, payload,
              payload + KVWIRE_NONCE_BYTES);
    kvwire_hdr auth = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_AUTH,
                       .payload_len = sizeof payload};
    return kvx_send_small(&r->x, r->ep, &auth, payload, sizeof payload) == EKV_OK &&
           raw_wait(r, &r->authed);
}

static void raw_close(raw *r)
{
    if (r->ep)
        kvx_close(&r->x, r->ep);
    kvx_worker_fini(&r->x);
    free(r->out);
}

static void raw_sent(void *req, ucs_status_t status, void *user)
{
    (void)req, (void)status, (void)user; /* raw_call frees the request */
}

/* Sends h (with payload) and waits for its reply; false when none comes. */
static bool raw_call(raw *r, kvwire_hdr *h, const void *payload, size_t len)
{
    r->replied = false;
    free(r->out);
    if (!(r->out = malloc(KVWIRE_HEADER_BYTES + len)))
        return false;
    kvwire_encode(h, r->out);
    if (len)
        memcpy(r->out + KVWIRE_HEADER_BYTES, payload, len);
    ucs_status_ptr_t s = kvx_send(r->ep, r->out, len ? r->out + KVWIRE_HEADER_BYTES : NULL, len,
                                  raw_sent, NULL);
    if (UCS_PTR_IS_ERR(s))
        return false;
    bool ok = raw_wait(r, &r->replied);
    if (UCS_PTR_IS_PTR(s)) {
        while (ucp_request_check_status(s) == UCS_INPROGRESS)
            kvx_progress(&r->x);
        ucp_request_free(s);
    }
    return ok;
}

/* Stores value under the stored key sk with a correct checksum and the
 * MAC made with mac_key: what a token holder can send. */
static bool raw_put(raw *r, const kvstore_key *sk, const uint8_t *value, size_t len,
                    const char *ns, const char *mac_key)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_PUT, .request_id = 11,
                    .payload_len = (uint32_t)len, .checksum = kvstore_checksum(value, len)};
    memcpy(h.key, sk->b, KVWIRE_KEY_BYTES);
    kvstore_value_mac((const uint8_t *)mac_key, strlen(mac_key), ns, sk, value, len, h.mac);
    return raw_call(r, &h, value, len) && r->reply.status == KVWIRE_ST_OK;
}

/* ---- tests ---- */

static void test_a_client_without_the_namespace_key_misses_its_values(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/isolated.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 64, logp) != 0) {
        CHECK(0);
        return;
    }
    kvstore_client *a = ns_client(d.port, "tenant", KEY_A, false);
    kvstore_client *a2 = ns_client(d.port, "tenant", KEY_A, true);
    kvstore_client *b = ns_client(d.port, "tenant", KEY_B, false);
    kvstore_client *other = ns_client(d.port, "other", KEY_A, false);
    CHECK(a && a2 && b && other);
    if (a && a2 && b && other) {
        uint8_t va[KVT_BLOCK_BYTES], vb[KVT_BLOCK_BYTES], got[KVT_BLOCK_BYTES];
        kvstore_key k = kvt_key(1);
        kvt_fill(va, sizeof va, 1);
        kvt_fill(vb, sizeof vb, 2);
        size_t len = 0;
        CHECK_EQ_INT(kvstore_client_put(a, &k, va, sizeof va), KVSTORE_OK);
        /* the namespace's other clients read it, from the region and by UCX */
        memset(got, 0, sizeof got);
        CHECK_EQ_INT(kvstore_client_get(a, &k, got, sizeof got, &len), KVSTORE_OK);
        CHECK(len == sizeof va && !memcmp(got, va, sizeof va));
        CHECK(atomic_load(&kvstore_client_metrics(a)->direct_gets) == 1);
        memset(got, 0, sizeof got);
        CHECK_EQ_INT(kvstore_client_get(a2, &k, got, sizeof got, &len), KVSTORE_OK);
        CHECK(!memcmp(got, va, sizeof va));
        /* a wrong key or another namespace: a miss, never the value */
        memset(got, 0, sizeof got);
        CHECK_EQ_INT(kvstore_client_get(b, &k, got, sizeof got, &len), KVSTORE_MISS);
        CHECK_EQ_INT(kvstore_client_get(other, &k, got, sizeof got, &len), KVSTORE_MISS);
        CHECK(memcmp(got, va, 64) != 0);
        /* and what they put under the same key does not replace it */
        CHECK_EQ_INT(kvstore_client_put(b, &k, vb, sizeof vb), KVSTORE_OK);
        CHECK_EQ_INT(kvstore_client_put(other, &k, vb, sizeof vb), KVSTORE_OK);
        memset(got, 0, sizeof got);
        CHECK_EQ_INT(kvstore_client_get(a, &k, got, sizeof got, &len), KVSTORE_OK);
        CHECK(!memcmp(got, va, sizeof va));
        memset(got, 0, sizeof got);
        CHECK_EQ_INT(kvstore_client_get(b, &k, got, sizeof got, &len), KVSTORE_OK);
        CHECK(!memcmp(got, vb, sizeof vb));
    }
    kvstore_client_destroy(a);
    kvstore_client_destroy(a2);
    kvstore_client_destroy(b);
    kvstore_client_destroy(other);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

static void test_a_value_without_the_right_mac_is_refused_by_every_reader(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/poisoned.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 64, logp) != 0) {
        CHECK(0);
        return;
    }
    kvstore_client *direct = ns_client(d.port, "tenant", KEY_A, false);
    kvstore_client *byucx = ns_client(d.port, "tenant", KEY_A, true);
    raw r;
    bool opened = raw_open(&r, d.port);
    CHECK(opened && direct && byucx);
    if (opened && direct && byucx) {
        /* a block, and a value of 1 MiB (hashed in steps, sent by rendezvous) */
        enum { BIG = 1 << 20 };
        uint8_t *good = malloc(BIG), *bad = malloc(BIG), *got = malloc(BIG);
        for (int i = 0; i < 4 && good && bad && got; i++) {
            size_t sz = i < 2 ? KVT_BLOCK_BYTES : BIG;
            kvt_fill(good, sz, 3 + i);
            kvt_fill(bad, sz, 40 + i);
            kvstore_key k = kvt_key(100 + i), sk;
            kvstore_ns_key((const uint8_t *)KEY_A, strlen(KEY_A), "tenant", &k, &sk);
            kvstore_client *reader = i % 2 ? byucx : direct;
            size_t len = 0;
            CHECK_EQ_INT(kvstore_client_put(reader, &k, good, sz), KVSTORE_OK);
            /* the poisoner overwrites the stored key; the daemon takes it */
            CHECK(raw_put(&r, &sk, bad, sz, "tenant", KEY_B));
            uint64_t before = mac_failures(reader);
            CHECK_EQ_INT(kvstore_client_get(reader, &k, got, sz, &len), KVSTORE_MISS);
            CHECK(mac_failures(reader) == before + 1);
            /* a MAC made without any key (the token as key) is no better */
            CHECK(raw_put(&r, &sk, bad, sz, "tenant", TOKEN));
            CHECK_EQ_INT(kvstore_client_get(reader, &k, got, sz, &len), KVSTORE_MISS);
            /* positive control: the same write with the namespace key is read
             * (so the reader's MAC is the spec's, every byte of it) */
            CHECK(raw_put(&r, &sk, bad, sz, "tenant", KEY_A));
            memset(got, 0, sz);
            CHECK_EQ_INT(kvstore_client_get(reader, &k, got, sz, &len), KVSTORE_OK);
            CHECK(len == sz && !memcmp(got, bad, sz));
        }
        free(good);
        free(bad);
        free(got);
        CHECK(atomic_load(&kvstore_client_metrics(direct)->direct_gets) >= 1);
        CHECK(atomic_load(&kvstore_client_metrics(byucx)->direct_gets) == 0);
    }
    if (opened)
        raw_close(&r);
    kvstore_client_destroy(direct);
    kvstore_client_destroy(byucx);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

static void test_a_client_cannot_write_the_daemons_region(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/region.log", g_dir);
    if (kvt_daemon_start(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 64, logp) != 0) {
        CHECK(0);
        return;
    }
    raw r;
    bool opened = raw_open(&r, d.port);
    CHECK(opened);
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_DIRECT, .request_id = 5};
    if (opened && raw_call(&r, &h, NULL, 0) && r.reply.status == KVWIRE_ST_OK) {
        kvwire_direct dr;
        kvwire_direct_decode(r.payload, &dr);
        char path[64];
        snprintf(path, sizeof path, "/proc/%u/fd/%d", dr.pid, dr.fd);
        /* the same user may open the file read-write ... */
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0)
            fd = open(path, O_RDONLY | O_CLOEXEC);
        CHECK(fd >= 0);
        if (fd >= 0) {
            /* ... but neither map it writable nor write it */
            void *w = mmap(NULL, dr.region_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            CHECK(w == MAP_FAILED);
            if (w != MAP_FAILED)
                munmap(w, dr.region_bytes);
            uint8_t junk[16] = {0};
            CHECK(pwrite(fd, junk, sizeof junk, (off_t)dr.id_offset) < 0);
            CHECK(ftruncate(fd, 0) != 0);
            /* reading works, and it is the daemon's */
            const uint8_t *m = mmap(NULL, dr.region_bytes, PROT_READ, MAP_SHARED, fd, 0);
            CHECK(m != MAP_FAILED);
            if (m != MAP_FAILED) {
                CHECK(!memcmp(m + dr.id_offset, dr.id, KVWIRE_ID_BYTES));
                /* nor can a read-only mapping be made writable */
                CHECK(mprotect((void *)m, 4096, PROT_READ | PROT_WRITE) != 0);
                munmap((void *)m, dr.region_bytes);
            }
            close(fd);
        }
        /* a direct put (room in the region for the client to write) is refused */
        uint8_t lenb[KVWIRE_LEN_BYTES];
        kvwire_len_encode(4096, lenb);
        kvwire_hdr put = {.version = KVWIRE_VERSION, .op = KVWIRE_OP_PUT,
                          .flags = KVWIRE_F_DIRECT, .request_id = 6,
                          .payload_len = KVWIRE_LEN_BYTES};
        CHECK(!raw_call(&r, &put, lenb, sizeof lenb) || r.reply.status != KVWIRE_ST_OK);
        kvt_sleep_ms(100);
        CHECK(kvt_file_has(logp, "values are written by the daemon only"));
    } else {
        CHECK(0); /* a client on this host is offered the region */
    }
    if (opened)
        raw_close(&r);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

/* GF(2^128) modulo x^128 + x^7 + x^2 + x + 1, bit i of the little-endian
 * 128-bit number the coefficient of x^i: shift and add, written from the
 * definition, independently of kvstore/kvpoly.c. */
static void gf128_mul(uint64_t r[2], const uint64_t a[2], const uint64_t b[2])
{
    uint64_t z[2] = {0, 0}, v[2] = {a[0], a[1]};
    for (int i = 0; i < 128; i++) {
        if ((b[i / 64] >> (i % 64)) & 1)
            z[0] ^= v[0], z[1] ^= v[1];
        bool top = v[1] >> 63;
        v[1] = v[1] << 1 | v[0] >> 63;
        v[0] <<= 1;
        if (top)
            v[0] ^= 0x87;
    }
    r[0] = z[0], r[1] = z[1];
}

static void le_halves(const uint8_t b[16], uint64_t out[2])
{
    out[0] = out[1] = 0;
    for (int i = 7; i >= 0; i--) {
        out[0] = out[0] << 8 | b[i];
        out[1] = out[1] << 8 | b[8 + i];
    }
}

/* The namespaced key and the MAC are what docs/kvstore.md says, byte for
 * byte (HMAC-SHA256 over the documented encoding, computed here from the
 * RFC-tested HMAC and the field multiply above), and they depend on every
 * input. */
static void test_derivations_follow_the_spec(void)
{
    const char *key = KEY_A, *ns = "tenant";
    kvstore_key k = kvt_key(7), sk, sk2, want;
    kvstore_ns_key((const uint8_t *)key, strlen(key), ns, &k, &sk);
    uint8_t msg[7 + 4 + 6 + 32];
    memcpy(msg, "ekv-ns1", 7);
    msg[7] = 6, msg[8] = msg[9] = msg[10] = 0;
    memcpy(msg + 11, ns, 6);
    memcpy(msg + 17, k.b, 32);
    hmac_sha256(key, strlen(key), msg, sizeof msg, want.b);
    CHECK(!memcmp(sk.b, want.b, 32));
    kvstore_ns_key((const uint8_t *)KEY_B, strlen(KEY_B), ns, &k, &sk2);
    CHECK(memcmp(sk.b, sk2.b, 32) != 0);
    kvstore_ns_key((const uint8_t *)key, strlen(key), "tenanu", &k, &sk2);
    CHECK(memcmp(sk.b, sk2.b, 32) != 0);

    uint8_t value[100], mac[32], wmac[32];
    kvt_fill(value, sizeof value, 9);
    kvstore_value_mac((const uint8_t *)key, strlen(key), ns, &sk, value, sizeof value, mac);
    /* K: the first 16 bytes of HMAC(key, "ekv-poly1" || 6 || "tenant") */
    uint8_t m1[9 + 4 + 6] = {0}, kfull[32];
    memcpy(m1, "ekv-poly1", 9);
    m1[9] = 6;
    memcpy(m1 + 13, ns, 6);
    hmac_sha256(key, strlen(key), m1, sizeof m1, kfull);
    uint64_t pk[2];
    le_halves(kfull, pk);
    /* P: the value's 16-byte blocks (the last zero-padded), Horner at K */
    uint64_t x[2] = {0, 0};
    for (size_t i = 0; i < sizeof value; i += 16) {
        uint8_t b[16] = {0};
        memcpy(b, value + i, sizeof value - i < 16 ? sizeof value - i : 16);
        uint64_t bb[2];
        le_halves(b, bb);
        bb[0] ^= x[0], bb[1] ^= x[1];
        gf128_mul(x, bb, pk);
    }
    uint8_t m2[8 + 4 + 6 + 32 + 8 + 16] = {0};
    memcpy(m2, "ekv-val2", 8);
    m2[8] = 6;
    memcpy(m2 + 12, ns, 6);
    memcpy(m2 + 18, sk.b, 32);
    m2[50] = sizeof value;
    for (int i = 0; i < 8; i++) {
        m2[58 + i] = (uint8_t)(x[0] >> (8 * i));
        m2[66 + i] = (uint8_t)(x[1] >> (8 * i));
    }
    hmac_sha256(key, strlen(key), m2, sizeof m2, wmac);
    CHECK(!memcmp(mac, wmac, 32));
    value[99] ^= 1;
    kvstore_value_mac((const uint8_t *)key, strlen(key), ns, &sk, value, sizeof value, wmac);
    CHECK(memcmp(mac, wmac, 32) != 0);
}

/* The polynomial hash (sixteen, four or one block per reduction) against
 * the bit-serial field multiply above, at every length up to 300 bytes and
 * a few large ones, fed in random pieces; and the field itself: x * x^127
 * is x^7 + x^2 + x + 1. */
static void test_the_polynomial_hash_is_the_fields(void)
{
    uint64_t xa[2] = {2, 0}, x127[2] = {0, 1ull << 63}, r[2];
    gf128_mul(r, xa, x127);
    CHECK(r[0] == 0x87 && r[1] == 0);
    enum { MAX = 1 << 17 };
    uint8_t *m = malloc(MAX);
    kvt_fill(m, MAX, 11);
    unsigned seed = 5;
    int bad = 0;
    for (size_t len = 0; len < 300 + 4 && m; len++) {
        size_t n = len < 300 ? len : (size_t)MAX - (len - 300) * 7;
        uint8_t key[16], got[16];
        for (int i = 0; i < 16; i++)
            key[i] = (uint8_t)rand_r(&seed);
        kvpoly_key pk;
        kvpoly_key_init(&pk, key);
        kvpoly p;
        kvpoly_init(&p, &pk);
        for (size_t off = 0; off < n;) { /* large ones in pieces of up to 4 KiB (the
                                             sixteen-block path), small ones of bytes */
            size_t step = (size_t)rand_r(&seed) % (len < 300 ? 200 : 4096);
            step = step > n - off ? n - off : step;
            kvpoly_update(&p, m + off, step);
            off += step;
        }
        kvpoly_final(&p, got);
        uint64_t k[2], x[2] = {0, 0};
        le_halves(key, k);
        for (size_t i = 0; i < n; i += 16) {
            uint8_t b[16] = {0};
            memcpy(b, m + i, n - i < 16 ? n - i : 16);
            uint64_t bb[2];
            le_halves(b, bb);
            bb[0] ^= x[0], bb[1] ^= x[1];
            gf128_mul(x, bb, k);
        }
        uint8_t want[16];
        for (int i = 0; i < 8; i++) {
            want[i] = (uint8_t)(x[0] >> (8 * i));
            want[8 + i] = (uint8_t)(x[1] >> (8 * i));
        }
        bad += memcmp(got, want, 16) != 0;
    }
    CHECK_EQ_INT(bad, 0);
    free(m);
}

int main(int argc, char **argv)
{
    int rc = kvt_setup(argc, argv, &g_bin, g_dir, "/tmp/ekv-ns-XXXXXX", g_token_file, TOKEN);
    if (rc)
        return rc;
    RUN_TEST(test_the_polynomial_hash_is_the_fields);
    RUN_TEST(test_derivations_follow_the_spec);
    RUN_TEST(test_a_client_without_the_namespace_key_misses_its_values);
    RUN_TEST(test_a_value_without_the_right_mac_is_refused_by_every_reader);
    RUN_TEST(test_a_client_cannot_write_the_daemons_region);
    kvt_scratch_remove(g_dir, ekv_test_failures);
    return TEST_EXIT();
}
