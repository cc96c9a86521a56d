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

#include "recall_fake_backend.h"
#include "recall_harness.h"

#define STEPS RH_STEPS
#define N_PROMPT RH_PROMPT

/* The prompt compressed with streaming at 0.2, recall r enabled before
 * compression (outside the budget). */
static kv_seq *prepare(kv_pool *pool, int32_t r, float *logits)
{
    kvc_policy p;
    CHECK(kvc_policy_parse("streaming", 0.2, &p, NULL) == EKV_OK);
    return rh_prepare(pool, &p, r, logits);
}

/* The backend pumped after the steps whose bit is set in the mask. */
typedef struct {
    fake_be *f;
    unsigned mask;
} pumping;

static void pump_after(void *arg, int s)
{
    const pumping *p = arg;
    if (p->f && (p->mask >> s & 1))
        pump(p->f);
}

static void decode(kv_seq *seq, const float *first, float *out, fake_be *f, unsigned pump_mask)
{
    pumping p = {f, pump_mask};
    rh_decode(seq, first, out, pump_after, &p);
}

static void test_cap_zero_large_r_equals_host(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *first = malloc(V * sizeof *first), *ref = malloc(STEPS * V * sizeof *ref);
    float *got = malloc(STEPS * V * sizeof *got);
    kv_pool *ph = rh_pool(4);
    kv_pool *pt = rh_pool(4);
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
    kv_pool *pt = rh_pool(4);
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
    if (rh_open(argc, argv, "test_recall_tier_model"))
        return 1;
    RUN_TEST(test_cap_zero_large_r_equals_host);
    RUN_TEST(test_small_r_with_a_stalled_backend_skips);
    rh_close();
    return TEST_EXIT();
}
