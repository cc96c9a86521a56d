/*
 * test_engine_recall.c - recall (kvrecall.h) in the step engine, on the demo
 * model: requests with recall (after SnapKV, after UNComp, and under SCOPE,
 * whose per-step evictions also go to the store and whose probe then sees
 * the resident tokens only) run in one batch beside requests without it,
 * and each equals gen_run of that request alone - also when a small pool
 * preempts them and they are replayed (the replay rebuilds its store).
 */
#include "engine_harness.h"

#define MAX_NEW 24
#define N_REQ 5

static gen_params recall_params(kvc_method_id m, double budget, int32_t recall,
                                kvc_decode_mode d)
{
    gen_params gp = greedy(MAX_NEW);
    gp.ignore_eos = true;
    gp.kv.method = m;
    gp.kv.budget = budget;
    gp.kv.recall = recall;
    if (d != KVC_DECODE_NONE)
        gp.kv.decode = (kvc_decode_policy){.mode = d, .recent = 4, .window = 12};
    return gp;
}

/* A chat prompt asking about a stretch of a licence text (~200 tokens). */
static prompt text_prompt(int i)
{
    static char text[1100];
    FILE *f = fopen("/usr/share/common-licenses/GPL-3", "rb");
    size_t len = 0;
    if (f) {
        fseek(f, 2000L + 1500L * i, SEEK_SET);
        len = fread(text, 1, 800, f);
        fclose(f);
    }
    text[len] = 0;
    char user[1200];
    snprintf(user, sizeof user, "%s\n\nWhat does the text above say about %s?", text,
             TOPICS[i % N_TOPICS]);
    return chat_prompt(user);
}

static void run_mixed(int32_t kv_tokens, int32_t max_running, bool expect_preemption)
{
    gen_params gps[N_REQ] = {
        recall_params(KVC_SNAPKV, 0.5, 2, KVC_DECODE_NONE),
        recall_params(KVC_SNAPKV, 0.5, 0, KVC_DECODE_NONE),
        recall_params(KVC_UNCOMP, 0.5, 3, KVC_DECODE_NONE),
        recall_params(KVC_FULL, 1, 0, KVC_DECODE_NONE),
        recall_params(KVC_SNAPKV, 0.5, 2, KVC_DECODE_SLIDE),
    };
    prompt ps[N_REQ];
    static req_out out[N_REQ];
    memset(out, 0, sizeof out);
    for (int i = 0; i < N_REQ; i++) {
        ps[i] = text_prompt(i);
        CHECK(ps[i].ids != NULL && ps[i].n > 150);
        if (!ps[i].ids)
            return;
    }
    engine_config cfg = small_config(kv_tokens, max_running, 16);
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &cfg, &err);
    CHECK(e != NULL);
    if (!e)
        return;
    for (int i = 0; i < N_REQ; i++) {
        out[i].e = e;
        engine_request r = make_request(&ps[i], &gps[i], &out[i]);
        CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    }
    CHECK(wait_done(out, N_REQ));
    engine_stats s;
    engine_stats_get(e, &s);
    fprintf(stderr, "  pool %d tokens: %llu preemptions\n", kv_tokens,
            (unsigned long long)s.preemptions);
    if (expect_preemption)
        CHECK(s.preemptions > 0);
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i < N_REQ; i++) {
        check_equals_solo(&ps[i], &gps[i], &out[i]);
        free(ps[i].ids);
    }
}

static void test_recall_in_a_mixed_batch_equals_solo_runs(void)
{
    run_mixed(8192, N_REQ, false);
}

static void test_recall_with_preemption_equals_solo_runs(void)
{
    run_mixed(16 * 20, N_REQ, true);
}

/* The solo runs recall: gen_run reports the store's counters. */
static void test_gen_run_reports_recall(void)
{
    prompt p = text_prompt(7);
    gen_params gp = recall_params(KVC_SNAPKV, 0.5, 2, KVC_DECODE_NONE);
    gen_result r;
    ekv_error err = {0};
    CHECK_EQ_INT(gen_run(g_rt, g_kv, p.ids, p.n, &gp, NULL, NULL, &r, &err), EKV_OK);
    const ekv_model_config *c = model_config(g_model);
    const int64_t heads = (int64_t)c->n_layers * c->n_kv_heads;
    CHECK(r.recall.evicted_tokens > 0);
    CHECK_EQ_INT(r.recall.selections, heads * (MAX_NEW - 1)); /* decode forwards */
    CHECK(r.recall.blocks_recalled > 0 && r.recall.blocks_recalled <= 2 * r.recall.selections);
    CHECK_EQ_INT(r.recall.deadline_misses, 0);
    gen_result_free(&r);
    free(p.ids);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_gen_run_reports_recall);
    RUN_TEST(test_recall_in_a_mixed_batch_equals_solo_runs);
    RUN_TEST(test_recall_with_preemption_equals_solo_runs);
    harness_fini();
    return TEST_EXIT();
}
