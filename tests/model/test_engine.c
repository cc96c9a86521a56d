/*
 * test_engine.c - the step engine on the demo GGUF: many concurrent requests
 * give exactly the tokens and text each gives alone through gen_run (greedy
 * and seeded, stop strings included), also when a small pool forces
 * preemption; cancellation, a full queue, bad requests, compression
 * accounting, drain and destroy. (Prefix restores: test_engine_prefix.c.)
 */
#include "engine_harness.h"

/* ---- tests ---- */

#define N_CONCURRENT 32

static void test_concurrent_requests_equal_solo_runs(void)
{
    engine_config cfg = small_config(4096, N_CONCURRENT, 64);
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &cfg, &err);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_CONCURRENT];
    prompt ps[N_CONCURRENT];
    gen_params gps[N_CONCURRENT];
    static const char *const stops[] = {".", "\n"};
    memset(out, 0, sizeof out);
    for (int i = 0; i < N_CONCURRENT; i++) {
        ps[i] = topic_prompt(i, i % 2 ? "Give me one fact about %s." : "Write a line about %s");
        gps[i] = greedy(16);
        if (i % 4 == 3) { /* stop strings go through the same stopper path */
            gps[i].stops = stops;
            gps[i].n_stops = 2;
        }
        if (i % 8 == 5) { /* seeded sampling: the same stream of logits, same draws */
            gps[i].sampling.temperature = 0.8f;
            gps[i].sampling.seed = 1000 + (uint64_t)i;
        }
        engine_request r = make_request(&ps[i], &gps[i], &out[i]);
        uint64_t id = 0;
        CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
        CHECK(id != 0);
    }
    CHECK(wait_done(out, N_CONCURRENT));
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK(s.steps > 0 && s.steps < 16 * N_CONCURRENT); /* the requests really shared steps */
    CHECK_EQ_INT(s.kv_bytes_saved, 0);
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i < N_CONCURRENT; i++) {
        check_equals_solo(&ps[i], &gps[i], &out[i]);
        free(ps[i].ids);
    }
}

static void test_cancel_running_and_queued(void)
{
    engine_config cfg = small_config(1024, 1, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    a.e = b.e = e;
    prompt p = topic_prompt(0, "Tell me a long story about %s.");
    gen_params gp = greedy(400);
    gp.ignore_eos = true;
    engine_request ra = make_request(&p, &gp, &a), rb = make_request(&p, &gp, &b);
    uint64_t ida = 0, idb = 0;
    CHECK_EQ_INT(engine_submit(e, &ra, &ida, NULL), EKV_OK);
    CHECK_EQ_INT(engine_submit(e, &rb, &idb, NULL), EKV_OK);
    CHECK(wait_tokens(&a, 3));
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.running, 1); /* max_running 1: b waits in the queue */
    CHECK_EQ_INT(s.queued, 1);
    CHECK(s.kv_blocks_free < s.kv_blocks_total);
    engine_cancel(e, idb);
    CHECK(wait_done(&b, 1));
    CHECK_EQ_INT(b.finish, GEN_FINISH_CANCELLED);
    CHECK_EQ_INT(b.rc, EKV_OK);
    CHECK_EQ_INT(b.n_ids, 0);
    CHECK_EQ_INT(b.u.completion_tokens, 0);
    engine_cancel(e, ida);
    engine_cancel(e, 987654); /* unknown ids are ignored */
    CHECK(wait_done(&a, 1));
    CHECK_EQ_INT(a.finish, GEN_FINISH_CANCELLED);
    CHECK_EQ_INT(a.rc, EKV_OK);
    CHECK(a.n_ids >= 3 && a.n_ids < 400);
    CHECK_EQ_INT(a.u.completion_tokens, a.n_ids);
    CHECK(a.u.kv_bytes > 0);
    /* on_done comes after the KV is freed */
    engine_stats_get(e, &s);
    CHECK_EQ_INT(a.free_blocks_at_done, s.kv_blocks_total);
    check_idle_pool(e);
    engine_cancel(e, ida); /* finished: ignored */
    engine_destroy(e);
    CHECK_EQ_INT(a.n_done, 1);
    CHECK_EQ_INT(b.n_done, 1);
    free(p.ids);
}

#define N_PREEMPT 6

static void test_small_pool_preempts_and_still_equals_solo(void)
{
    /* 128 tokens per head: two ~40-token prompts are admitted, and growing
     * to 64+ tokens each they run out of blocks. */
    engine_config cfg = small_config(128, 4, 16);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_PREEMPT + 1];
    prompt ps[N_PREEMPT];
    gen_params gps[N_PREEMPT];
    memset(out, 0, sizeof out);
    for (int i = 0; i < N_PREEMPT; i++) {
        ps[i] = topic_prompt(i + 3, "Explain %s to a child.");
        gps[i] = greedy(40);
        gps[i].ignore_eos = true;
        if (i == 1) {
            gps[i].sampling.temperature = 0.9f;
            gps[i].sampling.top_k = 40;
            gps[i].sampling.seed = 7;
        }
        engine_request r = make_request(&ps[i], &gps[i], &out[i]);
        CHECK_EQ_INT(engine_submit(e, &r, NULL, NULL), EKV_OK);
    }
    /* A prompt the whole pool cannot hold fails through on_done. */
    int32_t big[200];
    for (int i = 0; i < 200; i++)
        big[i] = ps[0].ids[i % ps[0].n];
    prompt pbig = {big, 200};
    gen_params gbig = greedy(4);
    engine_request rbig = make_request(&pbig, &gbig, &out[N_PREEMPT]);
    CHECK_EQ_INT(engine_submit(e, &rbig, NULL, NULL), EKV_OK);

    CHECK(wait_done(out, N_PREEMPT + 1));
    engine_stats s;
    engine_stats_get(e, &s);
    fprintf(stderr, "  preemptions %llu, steps %llu\n", (unsigned long long)s.preemptions,
            (unsigned long long)s.steps);
    CHECK(s.preemptions > 0);
    int64_t sum = 0;
    for (int i = 0; i < N_PREEMPT; i++)
        sum += out[i].u.preemptions;
    CHECK_EQ_INT(sum, s.preemptions);
    /* the seeded request is among the first two admitted and the newer of
     * them: the first to be preempted, so its RNG stream is really resumed */
    CHECK(out[1].u.preemptions > 0);
    check_idle_pool(e);
    engine_destroy(e);
    CHECK_EQ_INT(out[N_PREEMPT].n_done, 1);
    CHECK_EQ_INT(out[N_PREEMPT].rc, EKV_ENOMEM);
    CHECK(strstr(out[N_PREEMPT].msg, "pool") != NULL);
    for (int i = 0; i < N_PREEMPT; i++) {
        check_equals_solo(&ps[i], &gps[i], &out[i]);
        CHECK_EQ_INT(out[i].finish, GEN_FINISH_LENGTH);
        free(ps[i].ids);
    }
}

/* reserve_output_pct 100: admission keeps each running request's
 * remaining max_tokens free (a compressed one's at its budget's size once
 * its prompt is in), so the pool that made the test above preempt runs the
 * same requests, fewer at once, with no preemption, each equal to its solo
 * run; a request whose prompt fits but whose completion cannot waits for
 * an empty pool and runs alone to the pool's end. */
static void test_reserve_output_never_preempts(void)
{
    engine_config cfg = small_config(128, 4, 16);
    cfg.reserve_output_pct = 100;
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_PREEMPT + 1];
    prompt ps[N_PREEMPT + 1];
    gen_params gps[N_PREEMPT + 1];
    memset(out, 0, sizeof out);
    for (int i = 0; i <= N_PREEMPT; i++) {
        ps[i] = topic_prompt(i + 3, "Explain %s to a child.");
        gps[i] = greedy(i == N_PREEMPT ? 200 : 40);
        gps[i].ignore_eos = true;
        if (i == 2) {
            gps[i].kv.method = KVC_SNAPKV;
            gps[i].kv.budget = 0.5;
        }
        engine_request r = make_request(&ps[i], &gps[i], &out[i]);
        CHECK_EQ_INT(engine_submit(e, &r, NULL, NULL), EKV_OK);
    }
    CHECK(wait_done(out, N_PREEMPT + 1));
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.preemptions, 0);
    CHECK_EQ_INT(out[N_PREEMPT].rc, EKV_OK);
    CHECK_EQ_INT(out[N_PREEMPT].finish, GEN_FINISH_CONTEXT);
    /* 128 tokens fed fill the pool; the token sampled from the last is not fed */
    CHECK_EQ_INT(ps[N_PREEMPT].n + out[N_PREEMPT].n_ids, 128 + 1);
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i <= N_PREEMPT; i++) {
        if (i < N_PREEMPT)
            check_equals_solo(&ps[i], &gps[i], &out[i]);
        free(ps[i].ids);
    }
    cfg.reserve_output_pct = 101;
    ekv_error err = {0};
    CHECK(engine_create(g_model, &cfg, &err) == NULL && err.code == EKV_EINVAL);
}

#define N_FLOOD 8

static void test_full_queue_says_busy(void)
{
    engine_config cfg = small_config(2048, 1, 2);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_FLOOD];
    memset(out, 0, sizeof out);
    prompt p = topic_prompt(1, "Tell me a long story about %s.");
    gen_params gp = greedy(300);
    gp.ignore_eos = true;
    uint64_t ids[N_FLOOD];
    int accepted = 0, busy = 0;
    ekv_error err = {0};
    for (int i = 0; i < N_FLOOD; i++) {
        engine_request r = make_request(&p, &gp, &out[accepted]);
        ekv_status rc = engine_submit(e, &r, &ids[accepted], &err);
        if (rc == EKV_OK) {
            accepted++;
        } else {
            CHECK_EQ_INT(rc, EKV_EBUSY);
            CHECK(strstr(err.msg, "queue full") != NULL);
            busy++;
        }
    }
    /* 2 queued + at most 1 running; nothing can finish this fast */
    CHECK(accepted >= 2 && accepted <= 3);
    CHECK_EQ_INT(busy, N_FLOOD - accepted);
    for (int i = 0; i < accepted; i++)
        engine_cancel(e, ids[i]);
    CHECK(wait_done(out, accepted));
    for (int i = 0; i < accepted; i++) {
        CHECK_EQ_INT(out[i].finish, GEN_FINISH_CANCELLED);
        CHECK_EQ_INT(out[i].n_done, 1);
    }
    engine_destroy(e);
    free(p.ids);
}

static ekv_status submit_status(ekv_engine *e, engine_request r, const char *want_in_msg)
{
    ekv_error err = {0};
    uint64_t id = 0;
    ekv_status rc = engine_submit(e, &r, &id, &err);
    if (rc && want_in_msg && !strstr(err.msg, want_in_msg)) {
        fprintf(stderr, "  message \"%s\" lacks \"%s\"\n", err.msg, want_in_msg);
        CHECK(0);
    }
    return rc;
}

static void test_invalid_requests_are_refused(void)
{
    engine_config cfg = small_config(512, 4, 4);
    engine_config bad = cfg;
    ekv_error err = {0};
    bad.max_running = bad.max_batch + 1;
    CHECK(engine_create(g_model, &bad, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    bad = cfg;
    bad.kv_tokens = 0;
    CHECK(engine_create(g_model, &bad, NULL) == NULL);

    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out o;
    memset(&o, 0, sizeof o);
    const int32_t n_vocab = model_config(g_model)->n_vocab;
    int32_t ids[600];
    for (int i = 0; i < 600; i++)
        ids[i] = 1 + i % 100;
    prompt p = {ids, 8};
    gen_params gp = greedy(4);
    engine_request ok = make_request(&p, &gp, &o), r;

    r = ok;
    r.n_prompt = 0;
    CHECK_EQ_INT(submit_status(e, r, "empty"), EKV_EINVAL);
    r = ok;
    r.prompt = NULL;
    CHECK_EQ_INT(submit_status(e, r, "empty"), EKV_EINVAL);
    r = ok;
    r.n_prompt = cfg.max_ctx; /* no room for one generated token */
    CHECK_EQ_INT(submit_status(e, r, "context"), EKV_ERANGE);
    r = ok;
    r.params.max_tokens = -1;
    CHECK_EQ_INT(submit_status(e, r, "max_tokens"), EKV_EINVAL);
    r = ok;
    r.params.sampling.temperature = -1;
    CHECK_EQ_INT(submit_status(e, r, "temperature"), EKV_EINVAL);
    r = ok;
    r.params.sampling.top_p = 2;
    CHECK_EQ_INT(submit_status(e, r, "top_p"), EKV_EINVAL);
    const char *empty_stop[] = {""};
    r = ok;
    r.params.stops = empty_stop;
    r.params.n_stops = 1;
    CHECK_EQ_INT(submit_status(e, r, NULL), EKV_EINVAL);
    const char *many[EKV_STOPPER_MAX_STOPS + 1];
    for (int i = 0; i <= EKV_STOPPER_MAX_STOPS; i++)
        many[i] = "x";
    r = ok;
    r.params.stops = many;
    r.params.n_stops = EKV_STOPPER_MAX_STOPS + 1;
    CHECK_EQ_INT(submit_status(e, r, NULL), EKV_EINVAL);
    r = ok;
    r.params.n_stops = 1; /* and no array */
    CHECK_EQ_INT(submit_status(e, r, NULL), EKV_EINVAL);
    int32_t oob[3] = {1, n_vocab, 2}, neg[2] = {-1, 5};
    r = ok;
    r.prompt = oob;
    r.n_prompt = 3;
    CHECK_EQ_INT(submit_status(e, r, "outside"), EKV_EINVAL);
    r.prompt = neg;
    r.n_prompt = 2;
    CHECK_EQ_INT(submit_status(e, r, "outside"), EKV_EINVAL);
    r = ok;
    r.kv.method = (kvc_method_id)99;
    CHECK_EQ_INT(submit_status(e, r, "method"), EKV_EINVAL);
    r = ok;
    r.kv.method = KVC_SNAPKV;
    r.kv.budget = 0;
    CHECK_EQ_INT(submit_status(e, r, "budget"), EKV_EINVAL);
    r = ok; /* 9 tokens per head of an 8-token prompt: refused now, not after prefill */
    r.kv.method = KVC_SNAPKV;
    r.kv.budget = 9;
    CHECK_EQ_INT(submit_status(e, r, "exceeds the prompt"), EKV_ERANGE);
    static req_out at_prompt; /* a budget equal to the prompt is fine */
    memset(&at_prompt, 0, sizeof at_prompt);
    r = make_request(&p, &gp, &at_prompt);
    r.kv.method = KVC_SNAPKV;
    r.kv.budget = 8;
    CHECK_EQ_INT(submit_status(e, r, NULL), EKV_OK);
    CHECK(wait_done(&at_prompt, 1));
    CHECK_EQ_INT(at_prompt.rc, EKV_OK);
    CHECK_EQ_INT(engine_submit(e, NULL, NULL, NULL), EKV_EINVAL);

    /* nothing refused ever reaches on_done; the valid one does, once */
    CHECK_EQ_INT(submit_status(e, ok, NULL), EKV_OK);
    CHECK(wait_done(&o, 1));
    CHECK_EQ_INT(o.rc, EKV_OK);
    engine_destroy(e);
    CHECK_EQ_INT(o.n_done, 1);
}

static void test_compression_policy_saves_kv(void)
{
    engine_config cfg = small_config(2048, 4, 4);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out o[2];
    memset(o, 0, sizeof o);
    prompt p = topic_prompt(4, "Describe %s in detail, with history, uses, and three facts.");
    gen_params gp = greedy(8);
    engine_request r = make_request(&p, &gp, &o[0]);
    r.kv.method = KVC_SNAPKV;
    r.kv.budget = 0.5;
    CHECK_EQ_INT(engine_submit(e, &r, NULL, NULL), EKV_OK);
    engine_request full = make_request(&p, &gp, &o[1]); /* beside it, unaffected */
    CHECK_EQ_INT(engine_submit(e, &full, NULL, NULL), EKV_OK);
    CHECK(wait_done(o, 2));
    CHECK_EQ_INT(o[0].n_done, 1);
    if (o[0].rc)
        fprintf(stderr, "  snapkv: %s\n", o[0].msg);
    CHECK_EQ_INT(o[0].rc, EKV_OK);
    CHECK(o[0].u.kv_bytes > 0 && o[0].u.kv_bytes < o[0].u.kv_bytes_full);
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.kv_bytes_saved, o[0].u.kv_bytes_full - o[0].u.kv_bytes);
    check_idle_pool(e);
    engine_destroy(e);
    check_equals_solo(&p, &gp, &o[1]);
    free(p.ids);
}

#define N_DRAIN 4

static void test_drain_then_destroy(void)
{
    engine_config cfg = small_config(2048, 4, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_DRAIN + 1];
    memset(out, 0, sizeof out);
    prompt ps[N_DRAIN];
    gen_params gp = greedy(8);
    for (int i = 0; i < N_DRAIN; i++) {
        ps[i] = topic_prompt(i + 10, "Name %s in French.");
        engine_request r = make_request(&ps[i], &gp, &out[i]);
        CHECK_EQ_INT(engine_submit(e, &r, NULL, NULL), EKV_OK);
    }
    engine_drain(e);
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < N_DRAIN; i++) {
        CHECK_EQ_INT(out[i].n_done, 1);
        CHECK_EQ_INT(out[i].rc, EKV_OK);
    }
    pthread_mutex_unlock(&g_mu);
    check_idle_pool(e);
    ekv_error err = {0};
    engine_request late = make_request(&ps[0], &gp, &out[N_DRAIN]);
    CHECK_EQ_INT(engine_submit(e, &late, NULL, &err), EKV_EBUSY);
    CHECK(strstr(err.msg, "draining") != NULL);
    engine_destroy(e);
    CHECK_EQ_INT(out[N_DRAIN].n_done, 0);
    for (int i = 0; i < N_DRAIN; i++)
        free(ps[i].ids);
}

#define N_INFLIGHT 6

static void test_destroy_cancels_in_flight(void)
{
    engine_config cfg = small_config(2048, 2, 8);
    ekv_engine *e = engine_create(g_model, &cfg, NULL);
    CHECK(e != NULL);
    if (!e)
        return;
    static req_out out[N_INFLIGHT];
    memset(out, 0, sizeof out);
    prompt p = topic_prompt(20, "Tell me a long story about %s.");
    gen_params gp = greedy(300);
    gp.ignore_eos = true;
    for (int i = 0; i < N_INFLIGHT; i++) {
        engine_request r = make_request(&p, &gp, &out[i]);
        CHECK_EQ_INT(engine_submit(e, &r, NULL, NULL), EKV_OK);
    }
    CHECK(wait_tokens(&out[0], 2));
    engine_destroy(e);
    for (int i = 0; i < N_INFLIGHT; i++) {
        CHECK_EQ_INT(out[i].n_done, 1);
        CHECK_EQ_INT(out[i].finish, GEN_FINISH_CANCELLED);
        CHECK_EQ_INT(out[i].rc, EKV_OK);
    }
    free(p.ids);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    /* argv[2], optional: run only the tests whose name contains it */
    const char *only = argc > 2 ? argv[2] : "";
#define RUN_SELECTED(fn)                                                                   \
    do {                                                                                   \
        if (strstr(#fn, only))                                                             \
            RUN_TEST(fn);                                                                  \
    } while (0)
    RUN_SELECTED(test_concurrent_requests_equal_solo_runs);
    RUN_SELECTED(test_cancel_running_and_queued);
    RUN_SELECTED(test_small_pool_preempts_and_still_equals_solo);
    RUN_SELECTED(test_reserve_output_never_preempts);
    RUN_SELECTED(test_full_queue_says_busy);
    RUN_SELECTED(test_invalid_requests_are_refused);
    RUN_SELECTED(test_compression_policy_saves_kv);
    RUN_SELECTED(test_drain_then_destroy);
    RUN_SELECTED(test_destroy_cancels_in_flight);
    harness_fini();
    return TEST_EXIT();
}
