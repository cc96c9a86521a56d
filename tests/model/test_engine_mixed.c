/*
 * test_engine_mixed.c - the step engine with mixed compression policies:
 * distinct prompts of different lengths under full, SnapKV, PyramidKV,
 * StreamingLLM and UNComp (fractions and a tiny absolute budget) prefill in
 * one batch and decode together, and each request's greedy tokens equal
 * gen_run of that request alone with its policy.
 *
 * What this catches: a capture that records rows of other sequences of the
 * batch (the observation window's queries of a shorter prompt replaced by
 * a longer prompt's at the same positions), compression applied to the
 * wrong sequence, or budgets that depend on the batch.
 *
 * One batch, deterministically: a full filler request is submitted first
 * with a prompt that leaves the pool too small for the first mixed request,
 * so every mixed request waits in the queue (first come first served) until
 * the filler ends, and then all are admitted in one go and their prompts
 * prefill in one step, in submission order. Prompts grow in that order, so
 * each compressed prompt's window positions are also rows of the next.
 */
#include "engine_harness.h"

#define N_MIXED 7
#define MAX_NEW 24
#define BLOCK 16

static int32_t blocks_of(int32_t n)
{
    return (n + BLOCK - 1) / BLOCK;
}

static void test_mixed_policies_in_one_batch_equal_solo_runs(void)
{
    static const struct {
        const char *fmt;
        kvc_method_id method;
        double budget;
    } spec[N_MIXED] = {
        {"Name %s.", KVC_SNAPKV, 0.3},
        {"Give me one fact about %s.", KVC_UNCOMP, 0.3},
        {"Write a short line about %s, please.", KVC_PYRAMIDKV, 0.3},
        {"In two sentences, tell me why people like %s so much.", KVC_STREAMING, 0.3},
        {"Describe %s in detail, with its history, its uses, and three facts.", KVC_SNAPKV, 10},
        {"Explain %s to a child who has never seen one, step by step, with a short story "
         "and a question at the end.",
         KVC_UNCOMP, 0.2},
        {"Write a poem about %s with four lines, each one rhyming, and then explain what "
         "each line means in plain words, one sentence per line, and end with a title.",
         KVC_FULL, 1},
    };
    prompt ps[N_MIXED];
    gen_params gps[N_MIXED];
    static req_out out[N_MIXED + 1];
    memset(out, 0, sizeof out);
    int32_t total_blocks = 2; /* per head, with room to spare */
    for (int i = 0; i < N_MIXED; i++) {
        ps[i] = topic_prompt(5 * i + 2, spec[i].fmt);
        CHECK(ps[i].ids != NULL);
        if (!ps[i].ids)
            return;
        if (i > 0)
            CHECK(ps[i].n > ps[i - 1].n); /* each window lies inside the next prompt */
        gps[i] = greedy(MAX_NEW);
        gps[i].ignore_eos = true;
        gps[i].kv.method = spec[i].method;
        gps[i].kv.budget = spec[i].budget;
        total_blocks += 1 + blocks_of(ps[i].n + MAX_NEW);
    }
    /* the filler holds all but the first request's blocks */
    const int32_t n_fill = BLOCK * (total_blocks - blocks_of(ps[0].n));
    int32_t *fill = malloc((size_t)n_fill * sizeof *fill);
    for (int32_t i = 0; i < n_fill; i++)
        fill[i] = ps[N_MIXED - 1].ids[i % ps[N_MIXED - 1].n];
    prompt pfill = {fill, n_fill};
    gen_params gfill = greedy(1);

    engine_config cfg = small_config(BLOCK * total_blocks, N_MIXED + 1, 16);
    cfg.max_batch = 512;
    cfg.max_ctx = n_fill + 16;
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &cfg, &err);
    if (!e)
        fprintf(stderr, "engine: %s\n", err.msg);
    CHECK(e != NULL);
    if (!e)
        goto out;
    engine_request rf = make_request(&pfill, &gfill, &out[N_MIXED]);
    CHECK_EQ_INT(engine_submit(e, &rf, NULL, &err), EKV_OK);
    for (int i = 0; i < N_MIXED; i++) {
        engine_request r = make_request(&ps[i], &gps[i], &out[i]);
        CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    }
    CHECK(wait_done(out, N_MIXED + 1));
    CHECK_EQ_INT(out[N_MIXED].rc, EKV_OK);
    engine_stats s;
    engine_stats_get(e, &s);
    /* the filler's prefill, then one step prefilling every mixed prompt
     * (and sampling each one's first token), then MAX_NEW - 1 decode steps
     * of all of them together */
    const int64_t fill_steps = (n_fill + cfg.max_batch - 1) / cfg.max_batch;
    fprintf(stderr, "  prompts %d..%d tokens, filler %d, %lld steps\n", ps[0].n,
            ps[N_MIXED - 1].n, n_fill, (long long)s.steps);
    CHECK_EQ_INT(s.steps, fill_steps + MAX_NEW);
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i < N_MIXED; i++)
        check_equals_solo(&ps[i], &gps[i], &out[i]);
out:
    for (int i = 0; i < N_MIXED; i++)
        free(ps[i].ids);
    free(fill);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_mixed_policies_in_one_batch_equal_solo_runs);
    harness_fini();
    return TEST_EXIT();
}
