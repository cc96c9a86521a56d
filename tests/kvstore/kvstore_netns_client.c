/*
 * kvstore_netns_client.c - the client half of test_kvstore_netns.sh: three
 * daemons in their own network namespaces, reached over veth pairs with
 * UCX_TLS=tcp. Checks that keys spread over the peers, that a stopped peer
 * costs a miss within the op timeout (and comes back), and that killing a
 * peer with -9 while a get from it is in flight (its link throttled so the
 * transfer is still running) gives misses for its keys within the timeout
 * while the other peers keep serving.
 *
 * Usage: kvstore_netns_client TOKEN_FILE HOST:PORT,HOST:PORT,HOST:PORT PID,PID,PID
 * The third peer's link must be throttled (daemon -> client). Exit status:
 * the number of failed checks.
 */
#include "ekv_test.h"
#include "kvtest.h"

#define NP 3
#define N_SMALL 90
#define SMALL (64 << 10)
#define N_BIG 6
#define BIG (4 << 20)
#define OP_TIMEOUT_MS 1500

static kvstore_client *g_c;
static pid_t g_pid[NP];
static uint8_t *g_small;    /* N_SMALL values */
static int g_big_key[N_BIG]; /* key numbers owned by peer 2 */

static kvstore_result get_one(int n, uint8_t *out, size_t cap)
{
    kvstore_key k = kvt_key(n);
    size_t len;
    return kvstore_client_get(g_c, &k, out, cap, &len);
}

/* Gets every small key in one batch; returns seconds taken, fills res. */
static double get_all_small(kvstore_result *res, uint8_t *out)
{
    kvstore_op ops[N_SMALL];
    for (int i = 0; i < N_SMALL; i++)
        ops[i] = (kvstore_op){.kind = KVSTORE_GET, .key = kvt_key(i),
                              .buf = out + (size_t)i * SMALL, .len = SMALL};
    kvstore_batch *b;
    double t0 = kvt_now();
    CHECK_EQ_INT(kvstore_client_submit(g_c, ops, N_SMALL, NULL, NULL, &b, NULL), EKV_OK);
    CHECK_EQ_INT(kvstore_batch_wait(b, OP_TIMEOUT_MS + 3000), EKV_OK);
    double dt = kvt_now() - t0;
    kvstore_batch_release(b);
    for (int i = 0; i < N_SMALL; i++) {
        res[i] = ops[i].result;
        if (res[i] == KVSTORE_OK)
            CHECK(!memcmp(out + (size_t)i * SMALL, g_small + (size_t)i * SMALL, SMALL));
    }
    return dt;
}

static void phase_spread(void)
{
    int per[NP] = {0};
    for (int i = 0; i < N_SMALL; i++) {
        kvt_fill(g_small + (size_t)i * SMALL, SMALL, i);
        kvstore_key k = kvt_key(i);
        CHECK_EQ_INT(kvstore_client_put(g_c, &k, g_small + (size_t)i * SMALL, SMALL), KVSTORE_OK);
        per[kvstore_client_peer_of(g_c, &k)]++;
    }
    fprintf(stderr, "  keys per peer: %d %d %d\n", per[0], per[1], per[2]);
    for (int p = 0; p < NP; p++)
        CHECK(per[p] >= N_SMALL / NP / 2);
    const kvstore_metrics *m = kvstore_client_metrics(g_c);
    CHECK_EQ_INT(m->tier[KVSTORE_TIER_REMOTE].bytes_in, (uint64_t)N_SMALL * SMALL);
}

static void phase_stopped_peer(uint8_t *out)
{
    kvstore_result res[N_SMALL];
    double dt = get_all_small(res, out);
    for (int i = 0; i < N_SMALL; i++)
        CHECK_EQ_INT(res[i], KVSTORE_OK);
    kill(g_pid[0], SIGSTOP);
    dt = get_all_small(res, out);
    int miss_owner = 0, bad = 0;
    for (int i = 0; i < N_SMALL; i++) {
        kvstore_key k = kvt_key(i);
        int owner = kvstore_client_peer_of(g_c, &k);
        if (owner == 0)
            miss_owner += res[i] == KVSTORE_MISS;
        else
            bad += res[i] != KVSTORE_OK;
    }
    fprintf(stderr, "  peer 0 stopped: batch took %.2f s, %d misses on it, %d others failed\n",
            dt, miss_owner, bad);
    CHECK(dt < OP_TIMEOUT_MS / 1000.0 + 1.0);
    CHECK(miss_owner > 0);
    CHECK_EQ_INT(bad, 0);
    kill(g_pid[0], SIGCONT);
    double end = kvt_now() + 8;
    while (!kvstore_client_peer_up(g_c, 0) && kvt_now() < end)
        kvt_sleep_ms(20);
    CHECK(kvstore_client_peer_up(g_c, 0));
    get_all_small(res, out);
    for (int i = 0; i < N_SMALL; i++)
        CHECK_EQ_INT(res[i], KVSTORE_OK); /* its data survived the stop */
}

static void phase_killed_mid_transfer(uint8_t *big)
{
    for (int n = 100000, found = 0; found < N_BIG; n++) {
        kvstore_key k = kvt_key(n);
        if (kvstore_client_peer_of(g_c, &k) == 2)
            g_big_key[found++] = n;
    }
    for (int i = 0; i < N_BIG; i++) {
        kvt_fill(big + (size_t)i * BIG, 4096, g_big_key[i]);
        kvstore_key k = kvt_key(g_big_key[i]);
        CHECK_EQ_INT(kvstore_client_put(g_c, &k, big + (size_t)i * BIG, BIG), KVSTORE_OK);
    }
    kvstore_op ops[N_BIG];
    for (int i = 0; i < N_BIG; i++)
        ops[i] = (kvstore_op){.kind = KVSTORE_GET, .key = kvt_key(g_big_key[i]),
                              .buf = big + (size_t)i * BIG, .len = BIG};
    kvstore_batch *b;
    double t0 = kvt_now();
    CHECK_EQ_INT(kvstore_client_submit(g_c, ops, N_BIG, NULL, NULL, &b, NULL), EKV_OK);
    kvt_sleep_ms(300);
    bool in_flight = !kvstore_batch_done(b);
    kill(g_pid[2], SIGKILL);
    double tk = kvt_now();
    CHECK_EQ_INT(kvstore_batch_wait(b, OP_TIMEOUT_MS + 3000), EKV_OK);
    double dt = kvt_now() - tk;
    kvstore_batch_release(b);
    int miss = 0;
    for (int i = 0; i < N_BIG; i++)
        miss += ops[i].result == KVSTORE_MISS;
    fprintf(stderr, "  peer 2 killed %.2f s into the get (%s in flight): %d/%d misses, %.2f s "
            "after the kill\n", tk - t0, in_flight ? "still" : "NOT", miss, N_BIG, dt);
    CHECK(in_flight);
    CHECK_EQ_INT(miss, N_BIG);
    CHECK(dt < OP_TIMEOUT_MS / 1000.0 + 0.5);
}

static void phase_survivors_serve(uint8_t *out)
{
    kvstore_result res[N_SMALL];
    double dt = get_all_small(res, out);
    int bad = 0, miss2 = 0;
    for (int i = 0; i < N_SMALL; i++) {
        kvstore_key k = kvt_key(i);
        if (kvstore_client_peer_of(g_c, &k) == 2)
            miss2 += res[i] == KVSTORE_MISS;
        else
            bad += res[i] != KVSTORE_OK;
    }
    fprintf(stderr, "  after the kill: %.3f s, %d others failed, %d misses on the dead peer\n", dt,
            bad, miss2);
    CHECK_EQ_INT(bad, 0);
    CHECK(miss2 > 0);
    CHECK(dt < 1.0); /* a dead peer costs nothing: its keys miss at once */
    (void)get_one;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s TOKEN_FILE PEERS PIDS\n", argv[0]);
        return 2;
    }
    uint8_t *token;
    size_t token_len;
    ekv_error err = {0};
    if (kvstore_token_load(argv[1], &token, &token_len, &err) != EKV_OK) {
        fprintf(stderr, "%s\n", err.msg);
        return 2;
    }
    char *peers_s = strdup(argv[2]), *pids_s = strdup(argv[3]);
    const char *peers[NP];
    int np = 0;
    for (char *t = strtok(peers_s, ","); t && np < NP; t = strtok(NULL, ","))
        peers[np++] = t;
    int npid = 0;
    for (char *t = strtok(pids_s, ","); t && npid < NP; t = strtok(NULL, ","))
        g_pid[npid++] = (pid_t)atoi(t);
    if (np != NP || npid != NP)
        return 2;
    for (int i = 0; i < NP; i++)
        if (g_pid[i] <= 1 || g_pid[i] == getpid())
            return 2; /* it signals these: never init or itself */
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = NP;
    cfg.auth_token = token;
    cfg.auth_token_len = token_len;
    cfg.op_timeout_ms = OP_TIMEOUT_MS;
    cfg.connect_timeout_ms = 1500;
    cfg.reconnect_ms = 500;
    cfg.log = kvt_log;
    g_c = kvstore_client_create(&cfg, &err);
    if (!g_c) {
        fprintf(stderr, "client: %s\n", err.msg);
        return 2;
    }
    for (int p = 0; p < NP; p++)
        CHECK(kvstore_client_peer_up(g_c, p));
    g_small = malloc((size_t)N_SMALL * SMALL);
    uint8_t *out = malloc((size_t)N_SMALL * SMALL), *big = calloc(N_BIG, BIG);
    RUN_TEST(phase_spread);
    phase_stopped_peer(out);
    fprintf(stderr, "%s phase_stopped_peer\n", ekv_test_failures ? "FAIL" : "ok  ");
    int before = ekv_test_failures;
    phase_killed_mid_transfer(big);
    fprintf(stderr, "%s phase_killed_mid_transfer\n", ekv_test_failures > before ? "FAIL" : "ok  ");
    before = ekv_test_failures;
    phase_survivors_serve(out);
    fprintf(stderr, "%s phase_survivors_serve\n", ekv_test_failures > before ? "FAIL" : "ok  ");
    kvstore_client_destroy(g_c);
    free(g_small);
    free(out);
    free(big);
    free(peers_s);
    free(pids_s);
    memset(token, 0, token_len);
    free(token);
    return ekv_test_failures;
}
