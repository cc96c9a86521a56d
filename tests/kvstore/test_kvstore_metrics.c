/*
 * test_kvstore_metrics.c - `entrokv kvstore --http-listen`: health and the
 * Prometheus counters, scraped with curl after a known history.
 *
 * A daemon of 1 MiB gets 8 puts of 200 KiB (each takes a 256 KiB block:
 * the store cannot hold them all, so the oldest are evicted), 8 gets (the
 * evicted keys miss, the rest hit) and one client with the wrong token.
 * Every count the contract names (issue 18) is checked against that
 * history, not against what the daemon happens to say: requests by op,
 * evictions + entries = puts, one auth failure, capacity, bytes within
 * the capacity and at least the values' blocks. promtool checks the text
 * where it is installed.
 *
 * Usage: test_kvstore_metrics ENTROKV_BINARY
 */
#include "ekv_test.h"
#include "kvtest.h"

static const char *g_bin;
static char g_dir[64], g_token_file[128];
static const char *TOKEN = "metrics-token";

/* GET url with curl: the body into out, the status code returned (-1:
 * curl failed). */
static int http_get(int port, const char *path, char *out, size_t cap)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "curl -s -m 5 -w '\\n%%{http_code}' http://127.0.0.1:%d%s", port,
             path);
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    if (pclose(p) != 0)
        return -1;
    char *nl = strrchr(out, '\n');
    if (!nl)
        return -1;
    *nl = 0;
    return atoi(nl + 1);
}

/* The value of the sample `series` (a name, or a name with its labels) in
 * a Prometheus text; -1 when absent. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *l = text; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL)
        if (!strncmp(l, series, n) && l[n] == ' ')
            return atof(l + n + 1);
    return -1;
}

static kvstore_client *client(int port, const char *token)
{
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.auth_token = (const uint8_t *)token;
    cfg.auth_token_len = strlen(token);
    cfg.no_direct = true;    /* no DIRECT / RELEASE: the op counts stay simple */
    cfg.reconnect_ms = 60000; /* one handshake per client */
    return kvstore_client_create(&cfg, NULL);
}

static void test_metrics_count_what_happened(void)
{
    kvt_daemon d;
    char logp[128];
    snprintf(logp, sizeof logp, "%s/metrics.log", g_dir);
    if (kvt_daemon_start_http(&d, g_bin, NULL, "127.0.0.1", 0, g_token_file, 1, logp,
                              "127.0.0.1:0") != 0) {
        CHECK(0);
        return;
    }
    CHECK(d.http_port > 0);
    static char body[16384];
    CHECK_EQ_INT(http_get(d.http_port, "/livez", body, sizeof body), 200);
    CHECK(strstr(body, "\"alive\"") != NULL);
    CHECK_EQ_INT(http_get(d.http_port, "/readyz", body, sizeof body), 200);
    CHECK_EQ_INT(http_get(d.http_port, "/nope", body, sizeof body), 404);

    kvstore_client *bad = client(d.port, "not-the-token");
    CHECK(bad && !kvstore_client_peer_up(bad, 0));
    kvstore_client_destroy(bad);

    enum { N = 8, SZ = 200 << 10 };
    kvstore_client *c = client(d.port, TOKEN);
    CHECK(c && kvstore_client_peer_up(c, 0));
    uint8_t *v = malloc(SZ), *got = malloc(SZ);
    int hits = 0;
    if (c && v && got) {
        for (int i = 0; i < N; i++) {
            kvstore_key k = kvt_key(i);
            kvt_fill(v, SZ, i);
            CHECK_EQ_INT(kvstore_client_put(c, &k, v, SZ), KVSTORE_OK);
        }
        for (int i = 0; i < N; i++) {
            kvstore_key k = kvt_key(i);
            size_t len = 0;
            kvstore_result r = kvstore_client_get(c, &k, got, SZ, &len);
            CHECK(r == KVSTORE_OK || r == KVSTORE_MISS);
            kvt_fill(v, SZ, i);
            if (r == KVSTORE_OK)
                CHECK(len == SZ && !memcmp(got, v, SZ));
            hits += r == KVSTORE_OK;
        }
    }
    CHECK_EQ_INT(http_get(d.http_port, "/metrics", body, sizeof body), 200);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_capacity_bytes"), 1 << 20);
    double entries = sample(body, "entrokv_kvstore_entries");
    double evictions = sample(body, "entrokv_kvstore_evictions_total");
    double bytes = sample(body, "entrokv_kvstore_bytes");
    CHECK(entries >= 1 && evictions >= 1);
    CHECK_EQ_INT((int)(entries + evictions), N); /* nothing was deleted */
    CHECK_EQ_INT((int)entries, hits);            /* the ones kept are the ones read */
    CHECK(bytes >= entries * (256 << 10) && bytes <= (1 << 20));
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_auth_failures_total"), 1);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_requests_total{op=\"auth\"}"), 2);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_requests_total{op=\"put\"}"), N);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_requests_total{op=\"get\"}"), N);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_requests_total{op=\"del\"}"), 0);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_requests_total{op=\"direct\"}"), 0);
    CHECK(sample(body, "entrokv_kvstore_rejected_total") >= 1);
    CHECK_EQ_INT((int)sample(body, "entrokv_kvstore_pinned_bytes"), 0);
    if (system("command -v promtool >/dev/null 2>&1") == 0) {
        char path[128], cmd[256];
        snprintf(path, sizeof path, "%s/metrics.txt", g_dir);
        CHECK_EQ_INT(kvt_write_file(path, body), 0);
        snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
        CHECK_EQ_INT(system(cmd), 0);
    } else {
        fprintf(stderr, "  promtool not installed: the text's format is not checked\n");
    }
    kvstore_client_destroy(c);
    free(v);
    free(got);
    CHECK_EQ_INT(kvt_daemon_stop(&d), 0);
}

int main(int argc, char **argv)
{
    int rc = kvt_setup(argc, argv, &g_bin, g_dir, "/tmp/ekv-metrics-XXXXXX", g_token_file, TOKEN);
    if (rc)
        return rc;
    RUN_TEST(test_metrics_count_what_happened);
    kvt_scratch_remove(g_dir, ekv_test_failures);
    return TEST_EXIT();
}
