/*
 * test_recall_tier_model.c - recall with its blocks behind a host cap of 0
 * (kvrecall_tier.h, an in-process backend the test completes between
 * steps) on the demo model: with R large enough to recall every evicted
 * block, decode logits are bit-identical to the host-only store's at every
 * step, however the puts complete (before the first step, between steps, or
 * not until later), with no deadline miss; with a small R, blocks the
 * backend has not delivered are skipped (counted), and decode goes on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/kvrecall.h"
#include "entrokv/model.h"
#include "recall_fake_backend.h"

#define STEPS 6
#define N_PROMPT 320

static ekv_model *g_model;
static int32_t *g_prompt;
static ekv_runtime *g_rt;

static int32_t argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* The prompt prefilled into pool, compressed with streaming at 0.2, recall
 * r enabled before compression (outside the budget). */
static kv_seq *prepare(kv_pool *pool, int32_t r, float *logits)
{
    const ekv_model_config *c = model_config(g_model);
    ekv_error err = {0};
    kvc_policy p;
    CHECK(kvc_policy_parse("streaming", 0.2, &p, NULL) == EKV_OK);
    kv_seq *seq = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    kvc_capture *cap = kvc_capture_create(&p, g_model, N_PROMPT, 0, &err);
    CHECK(seq && cap);
    CHECK(model_prefill(g_rt, seq, g_prompt, N_PROMPT, 0, kvc_capture_tap(cap, seq), logits,
                        &err) == EKV_OK);
    CHECK(kv_seq_recall_enable(seq, r, &err) == EKV_OK);
    kvc_report rep;
    CHECK(kvc_capture_compress(cap, g_rt, seq, &rep, &err) == EKV_OK);
    if (err.code)
        fprintf(stderr, "error: %s\n", err.msg);
    kvc_capture_free(cap);
    return seq;
}

/* STEPS greedy steps, every step's logits into out; the backend is pumped
 * after the steps whose bit is set in pump_mask. */
static void decode(kv_seq *seq, const float *first, float *out, fake_be *f, unsigned pump_mask)
{
    const int32_t V = model_config(g_model)->n_vocab;
    const float *prev = first;
    for (int s = 0; s < STEPS; s++) {
        int32_t id = argmax(prev, V);
        const int32_t pos = N_PROMPT + s;
        model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq};
        CHECK(model_forward(g_rt, &b, out + (size_t)s * V, NULL) == EKV_OK);
        prev = out + (size_t)s * V;
        if (f && (pump_mask >> s & 1))
            pump(f);
    }
}

static void test_cap_zero_large_r_equals_host(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *first = malloc(V * sizeof *first), *ref = malloc(STEPS * V * sizeof *ref);
    float *got = malloc(STEPS * V * sizeof *got);
    kv_pool *ph = model_kv_pool_create(g_model, 4 * (N_PROMPT + STEPS + 16), NULL);
    kv_pool *pt = model_kv_pool_create(g_model, 4 * (N_PROMPT + STEPS + 16), NULL);
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, NULL);
    kv_pool_set_recall_tier(pt, t);
    const int32_t R = (N_PROMPT + 15) / 16;
    kv_seq *host = prepare(ph, R, first);
    decode(host, first, ref, NULL, 0);
    /* puts done before the first step / after every other step / never */
    static const struct {
        bool before;
        unsigned mask;
    } runs[] = {{true, 0}, {false, 0x15}, {false, 0}};
    for (size_t i = 0; i < sizeof runs / sizeof *runs; i++) {
        kv_seq *seq = prepare(pt, R, first);
        if (runs[i].before)
            pump(f);
        decode(seq, first, got, f, runs[i].mask);
        CHECK(memcmp(got, ref, STEPS * V * sizeof *got) == 0);
        kv_seq_free(seq);
        pump(f);
        CHECK_EQ_INT(f->ne, 0); /* the sequence's keys are gone */
    }
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    fprintf(stderr, "  %lld blocks spilled, %lld recalled, %lld misses\n",
            (long long)ts.spilled_blocks, (long long)ts.blocks_recalled,
            (long long)ts.deadline_misses);
    CHECK(ts.spilled_blocks > 0);
    CHECK_EQ_INT(ts.deadline_misses, 0);
    CHECK_EQ_INT(ts.host_bytes, 0);
    kv_seq_free(host);
    kv_pool_destroy(ph);
    kv_pool_destroy(pt);
    kv_recall_tier_destroy(t);
    free(f);
    free(first);
    free(ref);
    free(got);
}

/* R = 2 with a backend that stops once the blocks are stored: the blocks
 * that are not in the slots are skipped (counted), and decode completes. */
static void test_small_r_with_a_stalled_backend_skips(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *first = malloc(V * sizeof *first), *got = malloc(STEPS * V * sizeof *got);
    kv_pool *pt = model_kv_pool_create(g_model, 4 * (N_PROMPT + STEPS + 16), NULL);
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, NULL);
    kv_pool_set_recall_tier(pt, t);
    kv_seq *seq = prepare(pt, 2, first);
    pump(f);
    f->mode = MODE_STALL;
    decode(seq, first, got, f, 0x3f);
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    CHECK(ts.deadline_misses > 0);
    CHECK(ts.blocks_recalled > 0); /* those the first step kept in the slots */
    kv_seq_free(seq);
    f->mode = MODE_OK;
    pump(f);
    CHECK_EQ_INT(f->ne, 0);
    kv_pool_destroy(pt);
    kv_recall_tier_destroy(t);
    free(f);
    free(first);
    free(got);
}

int main(int argc, char **argv)
{
    ekv_error err = {0};
    if (argc < 2 || !(g_model = model_load(argv[1], &err))) {
        fprintf(stderr, "usage: test_recall_tier_model MODEL.gguf (%s)\n", err.msg);
        return 1;
    }
    kern_init();
    FILE *fp = fopen("/usr/share/common-licenses/GPL-3", "rb");
    char text[8192];
    size_t len = fp ? fread(text, 1, sizeof text, fp) : 0;
    if (fp)
        fclose(fp);
    size_t n = 0;
    if (tok_encode(model_tokenizer(g_model), text, len, false, false, &g_prompt, &n, &err) ||
        n < N_PROMPT) {
        fprintf(stderr, "cannot build the prompt: %s\n", err.msg);
        return 1;
    }
    g_rt = model_runtime_create(g_model, 64, N_PROMPT + STEPS + 16, 2, &err);
    if (!g_rt) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    RUN_TEST(test_cap_zero_large_r_equals_host);
    RUN_TEST(test_small_r_with_a_stalled_backend_skips);
    model_runtime_free(g_rt);
    free(g_prompt);
    model_free(g_model);
    return TEST_EXIT();
}
