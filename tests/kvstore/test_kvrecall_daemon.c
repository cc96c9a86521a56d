/*
 * test_kvrecall_daemon.c - the recall tier (kvrecall_tier.h) against a
 * real `entrokv kvstore` daemon over UCX (kvrecall_store.h), beside a
 * host-only recall store holding the same evicted tokens:
 *   - with a host cap of 0 every complete block is put to the daemon, and a
 *     block fetched back joins attention bit-identical to the host store's
 *     (K, V, positions); when the store is freed its keys are deleted;
 *   - a SIGSTOPped daemon: views never wait (each returns in milliseconds),
 *     the blocks not fetched are skipped and counted, what joins is still
 *     the host store's bytes; after SIGCONT fetches arrive again;
 *   - a daemon killed with SIGKILL: the same, and new spills fail (the
 *     blocks stay in host memory, so views equal the host store's).
 * Usage: test_kvrecall_daemon ENTROKV_BINARY
 */
#include <stdbool.h>

#include "ekv_test.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"
#include "entrokv/kvrecall_store.h"
#include "entrokv/kvrecall_tier.h"
#include "kvstore/kvtest.h"

#define BT 16
#define D 64
#define TOKEN "recall-daemon-token"

static uint64_t g_rng;

static float nrand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 - 0.5) * 4.0f;
}

/* 1 layer x H heads of n random tokens (the same for the same seed), recall
 * r; each head keeps its last `keep`. */
static kv_seq *evicted_seq(kv_pool *pool, int32_t H, int32_t n, int32_t keep, int32_t r,
                           uint64_t seed)
{
    g_rng = seed;
    kv_seq *s = kv_seq_create(pool, 1, H, NULL);
    CHECK(s != NULL);
    CHECK(kv_seq_recall_enable(s, r, NULL) == EKV_OK);
    /* a spilling store ranks by the digest's box alone (its blocks' K may
     * be away); its host-only twin must rank the same way to compare */
    CHECK(kv_recall_set_channels(kv_seq_recall(s), 0, NULL) == EKV_OK);
    float k[D], v[D];
    for (int32_t h = 0; h < H; h++)
        for (int32_t t = 0; t < n; t++) {
            for (int32_t c = 0; c < D; c++) {
                k[c] = nrand() * (c % 5 == 0 ? 6.0f : 1.0f);
                v[c] = nrand();
            }
            CHECK(kv_seq_append(s, 0, h, k, v, t, NULL) == EKV_OK);
        }
    int32_t idx[1024];
    for (int32_t i = 0; i < keep; i++)
        idx[i] = n - keep + i;
    for (int32_t h = 0; h < H; h++)
        CHECK(kv_seq_keep(s, 0, h, idx, keep, NULL) == EKV_OK);
    return s;
}

#define ONE ((size_t)D * BT * 2 * sizeof(ekv_f16) + BT * sizeof(int32_t))

/* The recalled blocks of the view of (0, head) for q, copied flat. */
static int32_t view_of(kv_seq *s, int32_t head, const float *q, int32_t qpos, uint8_t *out,
                       size_t *used, double *took)
{
    kv_recall *rc = kv_seq_recall(s);
    kern_kv_view res, ext;
    kv_seq_view(s, 0, head, &res);
    void *scratch = malloc(kv_recall_scratch_bytes(rc, 0, head, res.n_tokens / BT + 2));
    const double t0 = kvt_now();
    const int32_t nr = kv_recall_view(rc, 0, head, q, 1, D, qpos, &res, &ext, scratch);
    if (took)
        *took = kvt_now() - t0;
    const size_t kb = (size_t)D * BT * sizeof(ekv_f16);
    for (int32_t b = 0; b < nr; b++) {
        memcpy(out + b * ONE, ext.k_blocks[b], kb);
        memcpy(out + b * ONE + kb, ext.v_blocks[b], kb);
        memcpy(out + b * ONE + 2 * kb, ext.pos_blocks[b], BT * sizeof(int32_t));
    }
    *used = (size_t)nr * ONE;
    free(scratch);
    return nr;
}

static bool blocks_within(const uint8_t *a, size_t ua, const uint8_t *b, size_t ub)
{
    for (size_t i = 0; i < ua; i += ONE) {
        bool found = false;
        for (size_t j = 0; !found && j < ub; j += ONE)
            found = !memcmp(a + i, b + j, ONE);
        if (!found)
            return false;
    }
    return true;
}

static void random_q(float *q)
{
    for (int32_t c = 0; c < D; c++)
        q[c] = nrand();
}

/* Waits (at most s seconds) until no op of the tier is in flight. */
static bool settle(kv_recall_tier *t, double s)
{
    const double end = kvt_now() + s;
    kv_recall_tier_stats ts;
    do {
        kv_recall_tier_stats_get(t, &ts);
        if (ts.inflight == 0)
            return true;
        kvt_sleep_ms(2);
    } while (kvt_now() < end);
    return false;
}

int main(int argc, char **argv)
{
    const char *bin;
    char dir[64], token_file[128], log[160];
    int rc = kvt_setup(argc, argv, &bin, dir, "/tmp/ekv-recall-XXXXXX", token_file, TOKEN);
    if (rc)
        return rc;
    snprintf(log, sizeof log, "%s/daemon.log", dir);
    kvt_daemon d;
    if (kvt_daemon_start(&d, bin, NULL, "127.0.0.1", 0, token_file, 64, log))
        return 1;
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", d.port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.local_capacity = 0;
    cfg.promote_remote_hits = false;
    cfg.auth_token = (const uint8_t *)TOKEN;
    cfg.auth_token_len = strlen(TOKEN);
    cfg.op_timeout_ms = 1000;
    cfg.connect_timeout_ms = 1000;
    cfg.reconnect_ms = 300;
    ekv_error err = {0};
    kvstore_client *c = kvstore_client_create(&cfg, &err);
    CHECK(c != NULL);
    kv_recall_backend be;
    kvrecall_store_backend(c, &be);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, &err);
    CHECK(t != NULL);
    kv_pool *pt = kv_pool_create(BT, D, 512, NULL), *ph = kv_pool_create(BT, D, 512, NULL);
    kv_pool_set_recall_tier(pt, t);
    const int32_t H = 2, n = 240, keep = 16, R = 2;
    uint8_t *vt = malloc(16 * ONE), *vh = malloc(16 * ONE);
    size_t ut, uh;
    float q[D];
    kv_recall_tier_stats ts;

    /* 1. bit-identical through the daemon */
    kv_seq *st = evicted_seq(pt, H, n, keep, R, 42), *sh = evicted_seq(ph, H, n, keep, R, 42);
    CHECK(settle(t, 10));
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.spilled_blocks, H * ((n - keep) / BT));
    int compared = 0;
    for (int step = 0; step < 12; step++) {
        random_q(q);
        for (int32_t h = 0; h < H; h++) {
            view_of(st, h, q, n, vt, &ut, NULL); /* may miss: the gets go out */
            CHECK(settle(t, 10));
            const int32_t nt = view_of(st, h, q, n, vt, &ut, NULL);
            const int32_t nh = view_of(sh, h, q, n, vh, &uh, NULL);
            CHECK_EQ_INT(nt, nh);
            CHECK(ut == uh && !memcmp(vt, vh, uh));
            compared++;
        }
    }
    kv_recall_tier_stats_get(t, &ts);
    fprintf(stderr, "  daemon: %lld spilled, %lld fetched, %lld misses, %d views compared\n",
            (long long)ts.spilled_blocks, (long long)ts.fetched_blocks,
            (long long)ts.deadline_misses, compared);
    CHECK(ts.fetched_blocks > 0);
    CHECK_EQ_INT(ts.fetch_failures, 0);
    kv_seq_free(st);
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.live_sets, 0);
    CHECK(ts.deleted_keys >= ts.spilled_blocks);
    CHECK_EQ_INT(ts.delete_failures, 0);

    /* 2. SIGSTOP: views skip, never wait; SIGCONT: fetches again */
    st = evicted_seq(pt, 1, n, keep, R, 42);
    kv_seq_free(sh);
    sh = evicted_seq(ph, 1, n, keep, R, 42);
    CHECK(settle(t, 10));
    random_q(q);
    view_of(st, 0, q, n, vt, &ut, NULL);
    kill(d.pid, SIGSTOP);
    kv_recall_tier_stats before;
    kv_recall_tier_stats_get(t, &before);
    double worst = 0;
    for (int step = 0; step < 20; step++) {
        double took;
        random_q(q);
        const int32_t nt = view_of(st, 0, q, n, vt, &ut, &took);
        view_of(sh, 0, q, n, vh, &uh, NULL);
        CHECK(nt <= R);
        CHECK(blocks_within(vt, ut, vh, uh));
        worst = took > worst ? took : worst;
        kvt_sleep_ms(5);
    }
    kv_recall_tier_stats_get(t, &ts);
    fprintf(stderr, "  stopped daemon: slowest view %.2f ms, %lld misses\n", worst * 1e3,
            (long long)(ts.deadline_misses - before.deadline_misses));
    CHECK(worst < 0.25); /* the op timeout is 1 s: nothing waited on it */
    CHECK(ts.deadline_misses > before.deadline_misses);
    CHECK(settle(t, 5)); /* the gets time out */
    kv_recall_tier_stats_get(t, &ts);
    CHECK(ts.fetch_failures > 0);
    kill(d.pid, SIGCONT);
    bool back = false;
    for (int tries = 0; tries < 50 && !back; tries++) {
        random_q(q);
        view_of(st, 0, q, n, vt, &ut, NULL);
        settle(t, 5);
        const int32_t nt = view_of(st, 0, q, n, vt, &ut, NULL);
        const int32_t nh = view_of(sh, 0, q, n, vh, &uh, NULL);
        back = nt == nh && ut == uh && !memcmp(vt, vh, uh);
        if (!back)
            kvt_sleep_ms(50);
    }
    CHECK(back);

    /* 3. SIGKILL: views skip and never wait; new spills fail and stay in
     * host memory, so those views are the host store's */
    kill(d.pid, SIGKILL);
    waitpid(d.pid, NULL, 0);
    d.pid = 0;
    worst = 0;
    for (int step = 0; step < 20; step++) {
        double took;
        random_q(q);
        view_of(st, 0, q, n, vt, &ut, &took);
        view_of(sh, 0, q, n, vh, &uh, NULL);
        CHECK(blocks_within(vt, ut, vh, uh));
        worst = took > worst ? took : worst;
    }
    CHECK(worst < 0.25);
    kv_seq *s2 = evicted_seq(pt, 1, n, keep, R, 43), *h2 = evicted_seq(ph, 1, n, keep, R, 43);
    CHECK(settle(t, 10));
    kv_recall_tier_stats_get(t, &ts);
    CHECK(ts.spill_failures > 0);
    for (int step = 0; step < 5; step++) {
        random_q(q);
        const int32_t nt = view_of(s2, 0, q, n, vt, &ut, NULL);
        view_of(h2, 0, q, n, vh, &uh, NULL);
        CHECK_EQ_INT(nt, R);
        CHECK(ut == uh && !memcmp(vt, vh, uh));
    }
    kv_seq_free(s2);
    kv_seq_free(h2);
    kv_seq_free(st);
    kv_seq_free(sh);
    const double t0 = kvt_now();
    kvstore_client_destroy(c); /* bounded by the op timeout */
    fprintf(stderr, "  client closed in %.2f s\n", kvt_now() - t0);
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.inflight, 0);
    CHECK_EQ_INT(ts.host_bytes, 0);
    kv_recall_tier_destroy(t);
    kv_pool_destroy(pt);
    kv_pool_destroy(ph);
    free(vt);
    free(vh);
    kvt_scratch_remove(dir, ekv_test_failures);
    return TEST_EXIT();
}
