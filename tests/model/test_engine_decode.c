/*
 * test_engine_decode.c - SCOPE (decode-phase eviction) and SparK (packed
 * key channels) in generation and in the step engine, on the demo model.
 *
 *  - gen_run: SCOPE slide with W >= the output length gives exactly the
 *    tokens of no decode compression; SparK at ratio 0 exactly those of no
 *    pruning; a long generation under SCOPE holds at most P + W tokens per
 *    head after every step (P the true prefill length), while full KV grows.
 *  - engine: requests under SCOPE (each strategy, after different prefill
 *    policies), the h2o baseline (its masses accumulate every step), SparK (avg and zero-fill, alone and after SnapKV) and full
 *    KV run in one batch, and each equals gen_run of that request alone -
 *    also when a small pool preempts them and they are replayed.
 */
#include "engine_harness.h"

#define MAX_NEW 40

static gen_params decode_params(kvc_method_id m, double budget, kvc_decode_mode d, int32_t recent,
                                int32_t window, double spark, kvc_spark_recovery rec)
{
    gen_params gp = greedy(MAX_NEW);
    gp.ignore_eos = true;
    gp.kv.method = m;
    gp.kv.budget = budget;
    gp.kv.decode = (kvc_decode_policy){.mode = d, .recent = recent, .window = window};
    gp.kv.spark = (kvc_spark_policy){.ratio = spark, .recovery = rec};
    return gp;
}

static bool same_ids(const gen_result *a, const gen_result *b)
{
    return a->n_ids == b->n_ids && !memcmp(a->ids, b->ids, (size_t)a->n_ids * sizeof *a->ids);
}

static void test_neutral_settings_change_nothing(void)
{
    prompt p = topic_prompt(3, "Tell me everything you know about %s.");
    CHECK(p.ids != NULL);
    if (!p.ids)
        return;
    ekv_error err = {0};
    gen_result base, slide, spark0;
    gen_params gp = decode_params(KVC_SNAPKV, 0.5, KVC_DECODE_NONE, 0, 0, 0, KVC_SPARK_AVG);
    CHECK_EQ_INT(gen_run(g_rt, g_kv, p.ids, p.n, &gp, NULL, NULL, &base, &err), EKV_OK);
    gp.kv.decode = (kvc_decode_policy){.mode = KVC_DECODE_SLIDE, .recent = 4, .window = MAX_NEW};
    CHECK_EQ_INT(gen_run(g_rt, g_kv, p.ids, p.n, &gp, NULL, NULL, &slide, &err), EKV_OK);
    gp.kv.decode.mode = KVC_DECODE_NONE;
    gp.kv.spark.ratio = 0;
    CHECK_EQ_INT(gen_run(g_rt, g_kv, p.ids, p.n, &gp, NULL, NULL, &spark0, &err), EKV_OK);
    CHECK(same_ids(&base, &slide));
    CHECK_EQ_INT(slide.scope.evicted, 0);
    CHECK_EQ_INT(slide.kv_bytes, base.kv_bytes);
    CHECK(same_ids(&base, &spark0));
    CHECK_EQ_INT(spark0.kv_bytes, base.kv_bytes);
    gen_result_free(&base);
    gen_result_free(&slide);
    gen_result_free(&spark0);
    free(p.ids);
}

/* 200 generated tokens: SCOPE slide (R 16, W 48) after a SnapKV prompt never
 * holds more than P + W tokens per head; full decode holds P + 200. */
static void test_scope_memory_stays_bounded(void)
{
    prompt p = topic_prompt(7, "Write a very long essay about %s.");
    CHECK(p.ids != NULL);
    if (!p.ids)
        return;
    ekv_error err = {0};
    gen_params gp = decode_params(KVC_SNAPKV, 0.5, KVC_DECODE_SLIDE, 16, 48, 0, KVC_SPARK_AVG);
    gp.max_tokens = 200;
    gen_result r, full;
    CHECK_EQ_INT(gen_run(g_rt, g_kv, p.ids, p.n, &gp, NULL, NULL, &r, &err), EKV_OK);
    gp.kv.decode.mode = KVC_DECODE_NONE;
    CHECK_EQ_INT(gen_run(g_rt, g_kv, p.ids, p.n, &gp, NULL, NULL, &full, &err), EKV_OK);
    const ekv_model_config *c = model_config(g_model);
    const int64_t heads = (int64_t)c->n_layers * c->n_kv_heads;
    const int64_t bb = (int64_t)kv_pool_block_bytes(g_kv), bt = kv_pool_block_tokens(g_kv);
    /* SnapKV at 0.5 keeps the same count in every head: round(0.5 P) */
    const int64_t P = (int64_t)(0.5 * p.n + 0.5);
    const int64_t bound = heads * ((P + 48 + bt - 1) / bt) * bb;
    fprintf(stderr, "  prompt %d, peak %lld bytes (bound %lld), full decode %lld bytes\n", p.n,
            (long long)r.kv_bytes_peak, (long long)bound, (long long)full.kv_bytes);
    CHECK_EQ_INT(r.n_ids, 200);
    CHECK(r.kv_bytes_peak <= bound);
    CHECK_EQ_INT(r.scope.decode_held, 48);
    CHECK_EQ_INT(r.scope.evicted, heads * (199 - 48)); /* 199 decode forwards */
    CHECK(full.kv_bytes > 2 * r.kv_bytes);
    gen_result_free(&r);
    gen_result_free(&full);
    free(p.ids);
}

#define N_REQ 8

static void run_mixed(int32_t kv_tokens, int32_t max_running, bool expect_preemption)
{
    static const char *fmts[N_REQ] = {
        "Name %s.",
        "Give me one fact about %s.",
        "Write a short line about %s, please.",
        "In two sentences, tell me why people like %s so much.",
        "Describe %s in detail, with its history, its uses, and three facts.",
        "Explain %s to a child who has never seen one, step by step.",
        "Write a poem about %s with four lines.",
        "List three questions a scientist might ask about %s.",
    };
    gen_params gps[N_REQ] = {
        decode_params(KVC_SNAPKV, 0.5, KVC_DECODE_SLIDE, 4, 12, 0, KVC_SPARK_AVG),
        decode_params(KVC_FULL, 1, KVC_DECODE_ADAPTIVE, 4, 12, 0, KVC_SPARK_AVG),
        decode_params(KVC_UNCOMP, 0.4, KVC_DECODE_DISCONTINUOUS, 4, 10, 0, KVC_SPARK_AVG),
        decode_params(KVC_SNAPKV, 0.5, KVC_DECODE_NONE, 0, 0, 0.5, KVC_SPARK_AVG),
        decode_params(KVC_FULL, 1, KVC_DECODE_NONE, 0, 0, 0.8, KVC_SPARK_ZERO),
        decode_params(KVC_FULL, 1, KVC_DECODE_NONE, 0, 0, 0, KVC_SPARK_AVG),
        decode_params(KVC_PYRAMIDKV, 0.5, KVC_DECODE_SLIDE, 8, 16, 0.5, KVC_SPARK_AVG),
        decode_params(KVC_STREAMING, 0.5, KVC_DECODE_H2O, 4, 12, 0, KVC_SPARK_AVG),
    };
    prompt ps[N_REQ];
    static req_out out[N_REQ];
    memset(out, 0, sizeof out);
    for (int i = 0; i < N_REQ; i++) {
        ps[i] = topic_prompt(3 * i + 1, fmts[i]);
        CHECK(ps[i].ids != NULL);
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
    fprintf(stderr, "  pool %d tokens: %llu preemptions; saved: tokens %lld, channels %lld, "
                    "decode %lld bytes\n",
            kv_tokens, (unsigned long long)s.preemptions, (long long)s.kv_bytes_saved_tokens,
            (long long)s.kv_bytes_saved_channels, (long long)s.kv_bytes_saved_decode);
    if (expect_preemption)
        CHECK(s.preemptions > 0);
    CHECK(s.kv_bytes_saved_channels > 0);
    CHECK(s.kv_bytes_saved_decode > 0);
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i < N_REQ; i++) {
        check_equals_solo(&ps[i], &gps[i], &out[i]);
        if (gps[i].kv.spark.ratio > 0)
            CHECK(out[i].u.kv_bytes_saved_channels > 0);
        if (gps[i].kv.decode.mode != KVC_DECODE_NONE)
            CHECK(out[i].u.kv_bytes_saved_decode > 0);
        else
            CHECK_EQ_INT(out[i].u.kv_bytes_saved_decode, 0);
        free(ps[i].ids);
    }
}

static void test_mixed_batch_equals_solo_runs(void)
{
    run_mixed(8192, N_REQ, false);
}

/* A pool too small for all of them: sequences are preempted and replayed. */
static void test_mixed_batch_with_preemption_equals_solo_runs(void)
{
    run_mixed(16 * 24, N_REQ, true);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_neutral_settings_change_nothing);
    RUN_TEST(test_scope_memory_stays_bounded);
    RUN_TEST(test_mixed_batch_equals_solo_runs);
    RUN_TEST(test_mixed_batch_with_preemption_equals_solo_runs);
    harness_fini();
    return TEST_EXIT();
}
