/*
 * test_engine_choices.c - n > 1 choices of one request (engine_request.n):
 * the prompt is prefilled once and its KV blocks are shared by the n
 * continuations (the pool's shared-block counter says so, and the blocks in
 * use stay at what sharing needs); choice i with a seed equals a solo
 * gen_run with seed + i token for token, also when a small pool preempts
 * forked choices; one cancel ends all n; bad n is refused.
 */
#include "engine_harness.h"

#define N_CHOICES 3

/* Peaks of the engine's pool figures, read from inside the callbacks. */
static int64_t g_peak_used, g_peak_shared;

static void on_tokens_peek(void *ctx, const int32_t *ids, int32_t n, const char *text, size_t len)
{
    req_out *o = ctx;
    engine_stats s;
    engine_stats_get(o->e, &s);
    pthread_mutex_lock(&g_mu);
    if (s.kv_blocks_total - s.kv_blocks_free > g_peak_used)
        g_peak_used = s.kv_blocks_total - s.kv_blocks_free;
    if (s.kv_blocks_shared > g_peak_shared)
        g_peak_shared = s.kv_blocks_shared;
    pthread_mutex_unlock(&g_mu);
    on_tokens(ctx, ids, n, text, len);
}

static engine_request choices_request(const prompt *p, const gen_params *gp, req_out *out,
                                      void **ctxs, int32_t n)
{
    engine_request r = make_request(p, gp, &out[0]);
    for (int32_t i = 0; i < n; i++)
        ctxs[i] = &out[i];
    r.n = n;
    r.choice_ctx = ctxs;
    return r;
}

static prompt long_prompt(void)
{
    return chat_prompt("Here is a short note about rivers. Rivers carry water from mountains "
                       "to the sea, shape valleys, feed farms and cities, and move sand and "
                       "stones along their beds. Many old towns grew beside them. Write one "
                       "more sentence that continues this note in the same calm style.");
}

static void test_seeded_choices_equal_solo_runs_and_share_the_prompt(void)
{
    engine_config cfg = small_config(2048, 4, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_CHOICES];
    memset(out, 0, sizeof out);
    void *ctxs[N_CHOICES];
    prompt p = long_prompt();
    CHECK(p.n > 64);
    gen_params gp = greedy(12);
    gp.sampling.temperature = 0.9f;
    gp.sampling.seed = 4242;
    gp.ignore_eos = true; /* every choice runs its 12 tokens: the block count is exact */
    for (int i = 0; i < N_CHOICES; i++)
        out[i].e = e;
    g_peak_used = g_peak_shared = 0;
    engine_request r = choices_request(&p, &gp, out, ctxs, N_CHOICES);
    r.on_tokens = on_tokens_peek;
    uint64_t id = 0;
    CHECK_EQ_INT(engine_submit(e, &r, &id, NULL), EKV_OK);
    CHECK(wait_done(out, N_CHOICES));
    engine_stats s;
    engine_stats_get(e, &s);
    check_idle_pool(e);
    CHECK_EQ_INT(s.kv_blocks_shared, 0);
    engine_destroy(e);
    /* choice i is the request with seed + i, alone */
    int n_distinct = 0;
    for (int i = 0; i < N_CHOICES; i++) {
        gen_params gi = gp;
        gi.sampling.seed = gp.sampling.seed + (uint64_t)i;
        check_equals_solo(&p, &gi, &out[i]);
        if (i > 0 && (out[i].n_ids != out[0].n_ids ||
                      memcmp(out[i].ids, out[0].ids, (size_t)out[0].n_ids * sizeof(int32_t))))
            n_distinct++;
    }
    CHECK(n_distinct > 0); /* different seeds, different draws */
    /* the prompt's whole blocks are shared by all three; each choice holds
     * its own copy of the last prompt block and its new tokens */
    const ekv_model_config *c = model_config(g_model);
    const int64_t bps = (int64_t)c->n_layers * c->n_kv_heads;
    const int64_t bt = kv_pool_block_tokens(g_kv);
    const int64_t full = p.n / bt, own = (p.n + gp.max_tokens + bt - 1) / bt - full;
    fprintf(stderr, "  n=%d, %d prompt tokens: peak %lld blocks in use, %lld shared "
                    "(3 separate requests: %lld)\n",
            N_CHOICES, p.n, (long long)g_peak_used, (long long)g_peak_shared,
            (long long)(N_CHOICES * bps * (full + own)));
    CHECK(g_peak_shared >= bps * full);
    CHECK(g_peak_used <= bps * (full + N_CHOICES * own));
    CHECK(s.kv_cow_copies > 0);
    free(p.ids);
}

static void test_preempted_choices_still_equal_solo_runs(void)
{
    /* 160 tokens per head: the ~90-token prompt fits, three choices growing
     * 40 tokens each do not fit together */
    engine_config cfg = small_config(160, 4, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_CHOICES];
    memset(out, 0, sizeof out);
    void *ctxs[N_CHOICES];
    prompt p = long_prompt();
    gen_params gp = greedy(40);
    gp.sampling.temperature = 0.7f;
    gp.sampling.seed = 9;
    gp.ignore_eos = true;
    engine_request r = choices_request(&p, &gp, out, ctxs, N_CHOICES);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, NULL), EKV_OK);
    CHECK(wait_done(out, N_CHOICES));
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK(s.preemptions > 0);
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i < N_CHOICES; i++) {
        gen_params gi = gp;
        gi.sampling.seed = gp.sampling.seed + (uint64_t)i;
        check_equals_solo(&p, &gi, &out[i]);
    }
    free(p.ids);
}

static void test_cancel_ends_every_choice(void)
{
    engine_config cfg = small_config(2048, 4, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_CHOICES];
    memset(out, 0, sizeof out);
    void *ctxs[N_CHOICES];
    prompt p = topic_prompt(3, "Tell me a long story about %s.");
    gen_params gp = greedy(400);
    gp.ignore_eos = true;
    engine_request r = choices_request(&p, &gp, out, ctxs, N_CHOICES);
    uint64_t id = 0;
    CHECK_EQ_INT(engine_submit(e, &r, &id, NULL), EKV_OK);
    CHECK(wait_tokens(&out[N_CHOICES - 1], 2));
    engine_cancel(e, id);
    CHECK(wait_done(out, N_CHOICES));
    for (int i = 0; i < N_CHOICES; i++) {
        CHECK_EQ_INT(out[i].n_done, 1);
        CHECK_EQ_INT(out[i].finish, GEN_FINISH_CANCELLED);
        CHECK(out[i].n_ids < 400);
    }
    /* greedy: every choice draws the same tokens */
    CHECK(out[1].n_ids >= 2 && memcmp(out[1].ids, out[0].ids, 2 * sizeof(int32_t)) == 0);
    check_idle_pool(e);
    engine_destroy(e);
    free(p.ids);
}

/* A queued n-request (its choices not yet forked) cancelled: all n end. */
static void test_cancel_while_queued_ends_every_choice(void)
{
    engine_config cfg = small_config(2048, 3, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out one, out[N_CHOICES];
    memset(&one, 0, sizeof one);
    memset(out, 0, sizeof out);
    void *ctxs[N_CHOICES];
    prompt p = topic_prompt(5, "Tell me a long story about %s.");
    gen_params gp = greedy(400);
    gp.ignore_eos = true;
    engine_request r1 = make_request(&p, &gp, &one);
    uint64_t id1 = 0, id = 0;
    CHECK_EQ_INT(engine_submit(e, &r1, &id1, NULL), EKV_OK);
    CHECK(wait_tokens(&one, 1));
    /* three choices need three running slots: one is taken, so it waits */
    engine_request r = choices_request(&p, &gp, out, ctxs, N_CHOICES);
    CHECK_EQ_INT(engine_submit(e, &r, &id, NULL), EKV_OK);
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.queued, 1);
    CHECK_EQ_INT(s.running, 1);
    engine_cancel(e, id);
    CHECK(wait_done(out, N_CHOICES));
    for (int i = 0; i < N_CHOICES; i++) {
        CHECK_EQ_INT(out[i].n_done, 1);
        CHECK_EQ_INT(out[i].finish, GEN_FINISH_CANCELLED);
        CHECK_EQ_INT(out[i].n_ids, 0);
    }
    engine_cancel(e, id1);
    CHECK(wait_done(&one, 1));
    check_idle_pool(e);
    engine_destroy(e);
    free(p.ids);
}

static void test_bad_n_is_refused(void)
{
    engine_config cfg = small_config(1024, 2, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_CHOICES];
    memset(out, 0, sizeof out);
    void *ctxs[N_CHOICES];
    prompt p = topic_prompt(1, "Write a line about %s");
    gen_params gp = greedy(4);
    engine_request r = choices_request(&p, &gp, out, ctxs, N_CHOICES);
    ekv_error err = {0};
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_EINVAL); /* more than max_running */
    r.n = 2;
    r.choice_ctx = NULL;
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_EINVAL);
    r.n = -1;
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_EINVAL);
    r.n = 2;
    r.choice_ctx = ctxs;
    r.params.prompt_logprobs = true;
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_EUNSUPPORTED);
    engine_destroy(e);
    for (int i = 0; i < N_CHOICES; i++)
        CHECK_EQ_INT(out[i].n_done, 0);
    free(p.ids);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_seeded_choices_equal_solo_runs_and_share_the_prompt);
    RUN_TEST(test_preempted_choices_still_equal_solo_runs);
    RUN_TEST(test_cancel_ends_every_choice);
    RUN_TEST(test_cancel_while_queued_ends_every_choice);
    RUN_TEST(test_bad_n_is_refused);
    harness_fini();
    return TEST_EXIT();
}
