/*
 * test_kvprefix.c - prompt KV through the store tier on the demo model: a
 * second request with the same prefix restores it (from the in-process tier,
 * then from a real daemon over UCX with no local tier) and its logits are
 * bit-identical to recomputing everything; a corrupted block or a dead
 * daemon is a miss that falls back to recomputation, never a wrong answer;
 * tokens compression evicted are recalled by key and the sequence is whole
 * again.
 * Usage: test_kvprefix ENTROKV_BIN MODEL.gguf
 */
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/kvprefix.h"
#include "entrokv/model.h"
#include "kvstore/kvtest.h"

#define N_PREFIX 300 /* 18 whole blocks + 12 tokens */
#define N_TOTAL 340

static ekv_model *g_model;
static int32_t g_tokens[N_TOTAL];
static _Atomic int g_saves_done; /* saves whose puts have all finished */

static void on_saved(void *arg)
{
    atomic_fetch_add(&g_saves_done, 1);
}

/* Saves tokens[0, n) of seq and waits (10 s at most) until the store has
 * finished its puts: saves run in the background (kvprefix_on_saved). */
static void save_and_wait(kvprefix *p, const kv_seq *seq, int32_t n)
{
    const int before = atomic_load(&g_saves_done);
    kvprefix_on_saved(p, on_saved, NULL);
    kvprefix_save(p, seq, g_tokens, n, 0);
    const double end = kvt_now() + 10;
    while (atomic_load(&g_saves_done) == before && kvt_now() < end)
        kvt_sleep_ms(2);
    CHECK(atomic_load(&g_saves_done) > before);
}

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
    save_and_wait(p, s1, N_PREFIX);
    kv_seq_free(s1);
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
    kv_pool_reap(pool); /* the saves' pins, released by the copier */
    CHECK_EQ_INT(kv_pool_pins(pool), 0);
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
    char dir[] = "/tmp/ekv_kvprefix_XXXXXX", tokfile[200], logf[200];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(tokfile, sizeof tokfile, "%s/token", dir);
    snprintf(logf, sizeof logf, "%s/daemon.log", dir);
    kvt_write_file(tokfile, "kvprefix-test-secret\n");
    kvt_daemon d;
    if (kvt_daemon_start(&d, bin, NULL, "127.0.0.1", 0, tokfile, 256, logf) != 0) {
        CHECK(0);
        return;
    }
    kvstore_client *client = kvt_client(d.port, "kvprefix-test-secret", 0); /* all over UCX */
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

/* One greedy-free decode step: token `id` at position `pos`; its logits. */
static float *step(ekv_runtime *rt, kv_seq *seq, int32_t id, int32_t pos)
{
    float *logits = malloc((size_t)model_config(g_model)->n_vocab * sizeof *logits);
    model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq};
    ekv_error err = {0};
    CHECK(model_forward(rt, &b, logits, &err) == EKV_OK);
    return logits;
}

/* Every prompt position (layer, head) does not hold, as recall requests;
 * pos_out needs room for L * HKV * n. Returns the positions requested. */
static int64_t evicted(const kv_seq *seq, int32_t n, int32_t layer_lo, int32_t layer_hi,
                       kvprefix_recall_req *reqs, int32_t *n_reqs, int32_t *pos_out)
{
    const ekv_model_config *c = model_config(g_model);
    int32_t *held = malloc((size_t)n * sizeof *held);
    int64_t total = 0;
    *n_reqs = 0;
    for (int32_t l = layer_lo; l < layer_hi; l++)
        for (int32_t h = 0; h < c->n_kv_heads; h++) {
            const int32_t n_held = kv_seq_positions(seq, l, h, held);
            int32_t *out = pos_out + total, m = 0;
            for (int32_t t = 0, i = 0; t < n; t++) {
                while (i < n_held && held[i] < t)
                    i++;
                if (i >= n_held || held[i] != t)
                    out[m++] = t;
            }
            reqs[(*n_reqs)++] = (kvprefix_recall_req){.layer = l, .head = h, .pos = out, .n = m};
            total += m;
        }
    free(held);
    return total;
}

/* Compression evicts 80% of a 288-token prompt; recalling every evicted
 * token by key from the store makes the sequence the full one again: the
 * next step's logits are bit-identical to never having compressed. */
static void test_recall_brings_back_what_compression_evicted(void)
{
    enum { N = 288 }; /* whole blocks: every token is recallable */
    const ekv_model_config *c = model_config(g_model);
    const int32_t heads = c->n_layers * c->n_kv_heads;
    ekv_error err = {0};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.local_capacity = 64u << 20;
    kvstore_client *client = kvstore_client_create(&cfg, NULL);
    kv_pool *pool = model_kv_pool_create(g_model, 3 * N, &err);
    ekv_runtime *rt = model_runtime_create(g_model, 128, N + 16, 2, &err);
    kvprefix *p = kvprefix_create(g_model, client, 0, 1, &err);
    kvc_policy pol;
    CHECK(kvc_policy_parse("snapkv", 0.2, &pol, &err) == EKV_OK);
    kvc_capture *cap = kvc_capture_create(&pol, g_model, N, 0, &err);
    kvprefix_recall_req *reqs = malloc((size_t)heads * sizeof *reqs);
    int32_t *pos = malloc((size_t)heads * N * sizeof *pos);
    CHECK(client && pool && rt && p && cap);
    if (!client || !pool || !rt || !p || !cap)
        return;
    /* the reference: full KV */
    kv_seq *ref = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    free(prefill_from(rt, ref, 0, N));
    float *want = step(rt, ref, g_tokens[N], N);
    kv_seq_free(ref);
    /* prefill, save the full prompt, compress */
    kv_seq *s = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    CHECK(model_prefill(rt, s, g_tokens, N, 0, kvc_capture_tap(cap, s), logits, &err) == EKV_OK);
    save_and_wait(p, s, N);
    kvc_report rep;
    CHECK(kvc_capture_compress(cap, rt, s, &rep, &err) == EKV_OK);
    CHECK(kv_seq_max_len(s) < N / 2);
    /* a bad request changes nothing */
    int32_t n_reqs;
    evicted(s, N, 0, 1, reqs, &n_reqs, pos);
    int32_t held0 = kv_seq_len(s, 0, 0), bad_pos[N];
    kv_seq_positions(s, 0, 0, bad_pos); /* bad_pos[0]: a position it holds */
    kvprefix_recall_req bad = {.layer = 0, .head = 0, .pos = bad_pos, .n = 1};
    CHECK_EQ_INT(kvprefix_recall(p, s, g_tokens, N, &bad, 1, &err), -1);
    bad = (kvprefix_recall_req){.layer = c->n_layers, .head = 0, .pos = bad_pos, .n = 1};
    CHECK_EQ_INT(kvprefix_recall(p, s, g_tokens, N, &bad, 1, &err), -1);
    CHECK_EQ_INT(kv_seq_len(s, 0, 0), held0);
    /* layer 0 only: exactly its heads grow back to the whole prompt */
    const int64_t n0 = evicted(s, N, 0, 1, reqs, &n_reqs, pos);
    CHECK_EQ_INT(kvprefix_recall(p, s, g_tokens, N, reqs, n_reqs, &err), n0);
    for (int32_t h = 0; h < c->n_kv_heads; h++)
        CHECK_EQ_INT(kv_seq_len(s, 0, h), N);
    CHECK(kv_seq_len(s, 1, 0) < N);
    /* then every other head: the full sequence again */
    const int64_t rest = evicted(s, N, 1, c->n_layers, reqs, &n_reqs, pos);
    CHECK_EQ_INT(kvprefix_recall(p, s, g_tokens, N, reqs, n_reqs, &err), rest);
    CHECK_EQ_INT(kv_seq_max_len(s), N);
    float *have = step(rt, s, g_tokens[N], N);
    CHECK(memcmp(want, have, (size_t)c->n_vocab * sizeof *want) == 0);
    kvprefix_stats st;
    kvprefix_stats_get(p, &st);
    CHECK_EQ_INT(st.recalled_tokens, n0 + rest);
    free(have);
    kv_seq_free(s);
    /* an empty store: nothing recalled, nothing changed */
    kvstore_client_config empty_cfg;
    kvstore_client_config_default(&empty_cfg);
    empty_cfg.local_capacity = 1u << 20;
    kvstore_client *empty = kvstore_client_create(&empty_cfg, NULL);
    kvprefix *pe = kvprefix_create(g_model, empty, 0, 1, &err);
    kv_seq *s2 = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    kvc_capture *cap2 = kvc_capture_create(&pol, g_model, N, 0, &err);
    CHECK(empty && pe && s2 && cap2);
    if (!empty || !pe || !s2 || !cap2) {
        fprintf(stderr, "error: %s\n", err.msg);
        return;
    }
    CHECK(model_prefill(rt, s2, g_tokens, N, 0, kvc_capture_tap(cap2, s2), logits, &err) ==
          EKV_OK);
    CHECK(kvc_capture_compress(cap2, rt, s2, &rep, &err) == EKV_OK);
    const int64_t blocks = kv_seq_blocks(s2);
    evicted(s2, N, 0, c->n_layers, reqs, &n_reqs, pos);
    CHECK_EQ_INT(kvprefix_recall(pe, s2, g_tokens, N, reqs, n_reqs, &err), 0);
    CHECK_EQ_INT(kv_seq_blocks(s2), blocks);
    kv_seq_free(s2);
    kvc_capture_free(cap2);
    kvprefix_destroy(pe);
    kvstore_client_destroy(empty);
    kv_pool_reap(pool); /* the save's pins, released by the copier */
    CHECK_EQ_INT(kv_pool_pins(pool), 0);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), kv_pool_total_blocks(pool));
    free(want);
    free(logits);
    free(reqs);
    free(pos);
    kvc_capture_free(cap);
    kvprefix_destroy(p);
    model_runtime_free(rt);
    kv_pool_destroy(pool);
    kvstore_client_destroy(client);
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
    RUN_TEST(test_recall_brings_back_what_compression_evicted);
    test_restore_from_a_daemon_and_a_dead_daemon_is_a_miss(argv[1]);
    fprintf(stderr, "%s test_restore_from_a_daemon_and_a_dead_daemon_is_a_miss\n",
            ekv_test_failures ? "FAIL" : "ok  ");
    model_free(g_model);
    return TEST_EXIT();
}
