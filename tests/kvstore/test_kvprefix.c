/*
 * test_kvprefix.c - prompt KV through the store tier on the demo model: a
 * second request with the same prefix restores it (from the in-process tier,
 * then from a real daemon over UCX with no local tier) and its logits are
 * bit-identical to recomputing everything; a corrupted block or a dead
 * daemon is a miss that falls back to recomputation, never a wrong answer.
 * Usage: test_kvprefix ENTROKV_BIN MODEL.gguf
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ekv_test.h"
#include "entrokv/kvprefix.h"
#include "entrokv/model.h"
#include "kvstore/kvtest.h"

#define N_PREFIX 300 /* 18 whole blocks + 12 tokens */
#define N_TOTAL 340

static ekv_model *g_model;
static int32_t g_tokens[N_TOTAL];

/* Prefills tokens[from, n) into seq and returns the last row's logits. */
static float *prefill_from(ekv_runtime *rt, kv_seq *seq, int32_t from, int32_t n)
{
    float *logits = malloc((size_t)model_config(g_model)->n_vocab * sizeof *logits);
    ekv_error err = {0};
    CHECK(model_prefill(rt, seq, g_tokens + from, n - from, from, NULL, logits, &err) == EKV_OK);
    return logits;
}

/* Saves the first request's prompt, then serves the second (prefix + more
 * tokens) by restoring; expects `want` restored tokens and identical logits. */
static void round_trip(kvstore_client *client, int32_t want_restored, int probe_first)
{
    const ekv_model_config *c = model_config(g_model);
    ekv_error err = {0};
    kv_pool *pool = model_kv_pool_create(g_model, 3 * N_TOTAL, &err);
    ekv_runtime *rt = model_runtime_create(g_model, 128, N_TOTAL, 2, &err);
    kvprefix *p = kvprefix_create(g_model, client, 0, 1, &err);
    CHECK(pool && rt && p);
    /* turn 1: the prefix alone, stored */
    kv_seq *s1 = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    free(prefill_from(rt, s1, 0, N_PREFIX));
    kvprefix_save(p, s1, g_tokens, N_PREFIX, 0);
    kv_seq_free(s1);
    kvt_sleep_ms(300); /* the save is asynchronous */
    if (probe_first) { /* restoring does not consume the stored blocks */
        kv_seq *probe = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
        CHECK_EQ_INT(kvprefix_restore(p, probe, g_tokens, N_TOTAL, N_TOTAL), 288);
        kv_seq_free(probe);
    }
    /* turn 2: reference by full recompute, then restore + the rest */
    kv_seq *ref = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    float *want = prefill_from(rt, ref, 0, N_TOTAL);
    kv_seq *s2 = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    const int32_t got = kvprefix_restore(p, s2, g_tokens, N_TOTAL, N_TOTAL - 8);
    CHECK_EQ_INT(got, want_restored);
    CHECK_EQ_INT(kv_seq_max_len(s2), got);
    float *have = prefill_from(rt, s2, got, N_TOTAL);
    CHECK(memcmp(want, have, (size_t)c->n_vocab * sizeof *want) == 0);
    kvprefix_stats st;
    kvprefix_stats_get(p, &st);
    CHECK_EQ_INT(st.saved_blocks, 18);
    free(want);
    free(have);
    kv_seq_free(ref);
    kv_seq_free(s2);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), kv_pool_total_blocks(pool));
    kvprefix_destroy(p);
    model_runtime_free(rt);
    kv_pool_destroy(pool);
}

static void test_restore_from_the_local_tier_equals_recompute(void)
{
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.local_capacity = 64u << 20;
    kvstore_client *client = kvstore_client_create(&cfg, NULL);
    CHECK(client != NULL);
    round_trip(client, 288, 1);
    kvstore_client_destroy(client);
}

static void test_a_store_too_small_restores_nothing_and_recompute_still_matches(void)
{
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.local_capacity = 100000; /* smaller than one block-row (374 KB) */
    kvstore_client *client = kvstore_client_create(&cfg, NULL);
    round_trip(client, 0, 0);
    kvstore_client_destroy(client);
}

static void test_restore_from_a_daemon_and_a_dead_daemon_is_a_miss(const char *bin)
{
    char dir[] = "/tmp/ekv_kvprefix_XXXXXX", tokfile[200], logf[200], peer[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(tokfile, sizeof tokfile, "%s/token", dir);
    snprintf(logf, sizeof logf, "%s/daemon.log", dir);
    kvt_write_file(tokfile, "kvprefix-test-secret\n");
    kvt_daemon d;
    if (kvt_daemon_start(&d, bin, NULL, "127.0.0.1", 0, tokfile, 256, logf) != 0) {
        CHECK(0);
        return;
    }
    snprintf(peer, sizeof peer, "127.0.0.1:%d", d.port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.local_capacity = 0; /* everything over UCX */
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.auth_token = (const uint8_t *)"kvprefix-test-secret";
    cfg.auth_token_len = strlen("kvprefix-test-secret");
    kvstore_client *client = kvstore_client_create(&cfg, NULL);
    CHECK(client != NULL);
    round_trip(client, 288, 0);
    /* the daemon dies: restores are misses within the op timeout */
    kill(d.pid, SIGKILL);
    kvt_sleep_ms(100);
    const ekv_model_config *c = model_config(g_model);
    kv_pool *pool = model_kv_pool_create(g_model, N_TOTAL, NULL);
    kvprefix *p = kvprefix_create(g_model, client, 0, 1, NULL);
    kv_seq *s = kv_seq_create(pool, c->n_layers, c->n_kv_heads, NULL);
    const double t0 = kvt_now();
    CHECK_EQ_INT(kvprefix_restore(p, s, g_tokens, N_TOTAL, N_TOTAL), 0);
    CHECK(kvt_now() - t0 < 5.0);
    kv_seq_free(s);
    kvprefix_destroy(p);
    kv_pool_destroy(pool);
    kvstore_client_destroy(client);
    kvt_daemon_stop(&d);
    unlink(tokfile);
    unlink(logf);
    rmdir(dir);
}

int main(int argc, char **argv)
{
    ekv_error err = {0};
    if (argc < 3 || !(g_model = model_load(argv[2], &err))) {
        fprintf(stderr, "usage: test_kvprefix ENTROKV MODEL.gguf (%s)\n", err.msg);
        return 1;
    }
    FILE *f = fopen("/usr/share/common-licenses/MPL-2.0", "rb");
    char text[8192];
    size_t len = f ? fread(text, 1, sizeof text, f) : 0;
    if (f)
        fclose(f);
    int32_t *ids = NULL;
    size_t n = 0;
    if (tok_encode(model_tokenizer(g_model), text, len, false, false, &ids, &n, &err) ||
        n < N_TOTAL)
        return 1;
    memcpy(g_tokens, ids, sizeof g_tokens);
    free(ids);
    RUN_TEST(test_restore_from_the_local_tier_equals_recompute);
    RUN_TEST(test_a_store_too_small_restores_nothing_and_recompute_still_matches);
    test_restore_from_a_daemon_and_a_dead_daemon_is_a_miss(argv[1]);
    fprintf(stderr, "%s test_restore_from_a_daemon_and_a_dead_daemon_is_a_miss\n",
            ekv_test_failures ? "FAIL" : "ok  ");
    model_free(g_model);
    return TEST_EXIT();
}
