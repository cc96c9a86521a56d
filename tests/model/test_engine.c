/*
 * test_engine.c - the step engine on the demo GGUF: many concurrent requests
 * give exactly the tokens and text each gives alone through gen_run (greedy
 * and seeded, stop strings included), also when a small pool forces
 * preemption; cancellation, a full queue, bad requests, compression
 * accounting, drain and destroy.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ekv_test.h"
#include "entrokv/engine.h"
#include "entrokv/tokenizer.h"

#define MAX_IDS 512
#define MAX_TEXT 8192
#define WAIT_S 300 /* only reached on a hang (or a very slow sanitizer build) */

static ekv_model *g_model;
static ekv_runtime *g_rt; /* solo reference runs */
static kv_pool *g_kv;

/* ---- what the callbacks saw, guarded by g_mu ---- */

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;

typedef struct req_out {
    int32_t ids[MAX_IDS];
    int32_t n_ids;
    char text[MAX_TEXT];
    size_t text_len;
    int n_done;
    gen_finish finish;
    ekv_status rc;
    char msg[256];
    engine_usage u;
    int64_t free_blocks_at_done; /* the engine's published figure inside on_done */
    ekv_engine *e;
} req_out;

static void on_tokens(void *ctx, const int32_t *ids, int32_t n, const char *text, size_t len)
{
    req_out *o = ctx;
    pthread_mutex_lock(&g_mu);
    for (int32_t i = 0; i < n && o->n_ids < MAX_IDS; i++)
        o->ids[o->n_ids++] = ids[i];
    if (o->text_len + len < MAX_TEXT) {
        memcpy(o->text + o->text_len, text, len);
        o->text_len += len;
    }
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

static void on_done(void *ctx, gen_finish finish, const engine_usage *u, ekv_status rc,
                    const char *msg)
{
    req_out *o = ctx;
    engine_stats s;
    if (o->e)
        engine_stats_get(o->e, &s);
    pthread_mutex_lock(&g_mu);
    o->n_done++;
    o->finish = finish;
    o->rc = rc;
    snprintf(o->msg, sizeof o->msg, "%s", msg ? msg : "(null)");
    o->u = *u;
    o->free_blocks_at_done = o->e ? s.kv_blocks_free : -1;
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

static void deadline_in(struct timespec *ts, int s)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += s;
}

/* Waits until all n have had on_done; false after WAIT_S seconds. */
static bool wait_done(req_out *o, int n)
{
    struct timespec ts;
    deadline_in(&ts, WAIT_S);
    bool ok = true;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < n && ok; i++)
        while (o[i].n_done == 0 && ok)
            ok = pthread_cond_timedwait(&g_cv, &g_mu, &ts) == 0;
    pthread_mutex_unlock(&g_mu);
    return ok;
}

/* Waits until o has streamed at least k tokens (or finished). */
static bool wait_tokens(req_out *o, int32_t k)
{
    struct timespec ts;
    deadline_in(&ts, WAIT_S);
    bool ok = true;
    pthread_mutex_lock(&g_mu);
    while (o->n_ids < k && o->n_done == 0 && ok)
        ok = pthread_cond_timedwait(&g_cv, &g_mu, &ts) == 0;
    pthread_mutex_unlock(&g_mu);
    return ok;
}

/* ---- requests ---- */

typedef struct prompt {
    int32_t *ids;
    int32_t n;
} prompt;

static prompt chat_prompt(const char *user)
{
    const ekv_tokenizer *tok = model_tokenizer(g_model);
    tok_message msg = {"user", user};
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    prompt p = {0};
    if (tok_apply_chat(tok, &msg, 1, true, &text, NULL) ||
        tok_encode(tok, text, strlen(text), tok_add_bos(tok), true, &ids, &n, NULL)) {
        free(text);
        return p;
    }
    free(text);
    p.ids = ids;
    p.n = (int32_t)n;
    return p;
}

static const char *const TOPICS[] = {
    "the moon",     "bread",       "rivers",     "the violin", "owls",       "glass",
    "volcanoes",    "chess",       "honey",      "the desert", "comets",     "paper",
    "tigers",       "rain",        "copper",     "bicycles",   "the ocean",  "salt",
    "mountains",    "clocks",      "bees",       "the wind",   "coffee",     "maps",
    "lighthouses",  "snow",        "penguins",   "trains",     "mushrooms",  "bridges",
    "the alphabet", "thunder",
};
#define N_TOPICS ((int)(sizeof TOPICS / sizeof TOPICS[0]))

static prompt topic_prompt(int i, const char *fmt)
{
    char user[256];
    snprintf(user, sizeof user, fmt, TOPICS[i % N_TOPICS]);
    return chat_prompt(user);
}

static engine_request make_request(const prompt *p, const gen_params *gp, req_out *o)
{
    engine_request r;
    memset(&r, 0, sizeof r);
    r.prompt = p->ids;
    r.n_prompt = p->n;
    r.params = *gp;
    r.kv.method = KVC_FULL;
    r.on_tokens = on_tokens;
    r.on_done = on_done;
    r.ctx = o;
    return r;
}

static gen_params greedy(int32_t max_tokens)
{
    gen_params gp;
    gen_params_default(&gp);
    gp.max_tokens = max_tokens;
    gp.sampling.temperature = 0;
    return gp;
}

static engine_config small_config(int32_t kv_tokens, int32_t max_running, int32_t max_queued)
{
    engine_config c;
    engine_config_default(&c);
    c.n_threads = 2;
    c.max_batch = 64;
    c.max_ctx = 512;
    c.kv_tokens = kv_tokens;
    c.max_running = max_running;
    c.max_queued = max_queued;
    return c;
}

/* o must equal gen_run of the same request alone: ids, text, finish. */
static void check_equals_solo(const prompt *p, const gen_params *gp, const req_out *o)
{
    gen_result ref;
    ekv_error err = {0};
    if (gen_run(g_rt, g_kv, p->ids, p->n, gp, NULL, NULL, &ref, &err)) {
        fprintf(stderr, "gen_run: %s\n", err.msg);
        CHECK(0);
        return;
    }
    CHECK_EQ_INT(o->n_done, 1);
    CHECK_EQ_INT(o->rc, EKV_OK);
    CHECK_EQ_INT(o->finish, ref.finish);
    CHECK_EQ_INT(o->n_ids, ref.n_ids);
    int32_t first_diff = -1;
    for (int32_t i = 0; i < ref.n_ids && i < o->n_ids && first_diff < 0; i++)
        if (o->ids[i] != ref.ids[i])
            first_diff = i;
    CHECK_EQ_INT(first_diff, -1);
    CHECK_EQ_INT(o->text_len, ref.text_len);
    CHECK(o->text_len == ref.text_len && memcmp(o->text, ref.text, ref.text_len) == 0);
    CHECK_EQ_INT(o->u.prompt_tokens, p->n);
    CHECK_EQ_INT(o->u.completion_tokens, ref.n_ids);
    CHECK_EQ_INT(o->u.kv_bytes, o->u.kv_bytes_full);
    CHECK(o->u.queue_s >= 0 && o->u.ttft_s >= o->u.queue_s);
    gen_result_free(&ref);
}

static void check_idle_pool(ekv_engine *e)
{
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.running, 0);
    CHECK_EQ_INT(s.queued, 0);
    CHECK_EQ_INT(s.kv_blocks_free, s.kv_blocks_total);
}

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

/* ---- the prefix cache, with restores the test holds in flight ---- */

/* Keeps the whole blocks of the first prompt saved (every head's blocks,
 * exported) and restores them for a later prompt that starts with all of
 * them. A
 * job lands at once, or, while `hold` is set, only once the test releases
 * it (and calls the engine's wake), so a restore can be kept in flight. */
typedef struct fake_cache {
    pthread_mutex_t mu;
    uint8_t *blocks; /* [n_blocks][layers * kv heads] blocks */
    int32_t *tokens, n_blocks, bt, heads;
    size_t block_bytes;
    bool hold, released;
    void (*wake)(void *);
    void *wake_arg;
    int starts, finishes, discards;
    int32_t restored;
} fake_cache;

static void *fake_start(void *ctx, const int32_t *tokens, int32_t n, int32_t max_tokens,
                        void (*wake)(void *), void *wake_arg)
{
    fake_cache *f = ctx;
    pthread_mutex_lock(&f->mu);
    int32_t b = 0;
    while (b < f->n_blocks && (b + 1) * f->bt <= max_tokens && (b + 1) * f->bt <= n &&
           !memcmp(tokens + (size_t)b * f->bt, f->tokens + (size_t)b * f->bt,
                   (size_t)f->bt * sizeof *tokens))
        b++;
    int32_t want = f->n_blocks;
    if (want > max_tokens / f->bt)
        want = max_tokens / f->bt;
    int32_t *job = NULL; /* only the whole stored prompt: not a shared chat header */
    if (b > 0 && b == want && (job = malloc(sizeof *job))) {
        *job = b;
        f->wake = wake;
        f->wake_arg = wake_arg;
        f->starts++;
    }
    pthread_mutex_unlock(&f->mu);
    return job;
}

static bool fake_ready(void *ctx, void *job)
{
    fake_cache *f = ctx;
    pthread_mutex_lock(&f->mu);
    const bool ready = !f->hold || f->released;
    pthread_mutex_unlock(&f->mu);
    return ready;
}

static int32_t fake_finish(void *ctx, void *job, kv_seq *seq)
{
    fake_cache *f = ctx;
    const int32_t n_blocks = *(int32_t *)job;
    free(job);
    pthread_mutex_lock(&f->mu);
    if (seq)
        f->finishes++;
    else
        f->discards++;
    pthread_mutex_unlock(&f->mu);
    if (!seq)
        return 0;
    const ekv_model_config *c = model_config(g_model);
    for (int32_t b = 0; b < n_blocks; b++)
        for (int32_t l = 0; l < c->n_layers; l++)
            for (int32_t h = 0; h < c->n_kv_heads; h++)
                CHECK(kv_seq_block_import(seq, l, h,
                                          f->blocks + ((size_t)b * f->heads + (size_t)l *
                                                       c->n_kv_heads + h) * f->block_bytes,
                                          f->bt, NULL) == EKV_OK);
    const int32_t got = n_blocks * f->bt;
    pthread_mutex_lock(&f->mu);
    f->restored += got;
    pthread_mutex_unlock(&f->mu);
    return got;
}

static void fake_save(void *ctx, const kv_seq *seq, const int32_t *tokens, int32_t n,
                      int32_t first_block)
{
    fake_cache *f = ctx;
    const ekv_model_config *c = model_config(g_model);
    pthread_mutex_lock(&f->mu);
    if (!f->blocks && n / f->bt > 0) {
        f->n_blocks = n / f->bt;
        f->blocks = malloc((size_t)f->n_blocks * f->heads * f->block_bytes);
        f->tokens = malloc((size_t)f->n_blocks * f->bt * sizeof *tokens);
        memcpy(f->tokens, tokens, (size_t)f->n_blocks * f->bt * sizeof *tokens);
        for (int32_t b = 0; b < f->n_blocks; b++)
            for (int32_t l = 0; l < c->n_layers; l++)
                for (int32_t h = 0; h < c->n_kv_heads; h++)
                    kv_seq_block_export(seq, l, h, b,
                                        f->blocks + ((size_t)b * f->heads + (size_t)l *
                                                     c->n_kv_heads + h) * f->block_bytes);
    }
    pthread_mutex_unlock(&f->mu);
}

static void fake_release(fake_cache *f)
{
    pthread_mutex_lock(&f->mu);
    f->released = true;
    void (*wake)(void *) = f->wake;
    void *arg = f->wake_arg;
    pthread_mutex_unlock(&f->mu);
    if (wake)
        wake(arg);
}

static int fake_count(fake_cache *f, const int *field)
{
    pthread_mutex_lock(&f->mu);
    const int v = *field;
    pthread_mutex_unlock(&f->mu);
    return v;
}

/* A second request with a stored prefix restores it in the background: while
 * its restore is held in flight, another sequence keeps decoding; once it
 * lands, the request gives exactly its solo tokens. A request cancelled
 * while restoring finishes at once and its restore is discarded. */
static void test_prefix_restore_runs_in_the_background(void)
{
    static fake_cache f = {.mu = PTHREAD_MUTEX_INITIALIZER};
    const ekv_model_config *c = model_config(g_model);
    f.bt = kv_pool_block_tokens(g_kv);
    f.heads = c->n_layers * c->n_kv_heads;
    f.block_bytes = kv_pool_block_bytes(g_kv);
    engine_prefix_cache pc = {fake_start, fake_ready, fake_finish, fake_save, &f};
    engine_config cfg = small_config(4096, 4, 8);
    cfg.prefix_cache = &pc;
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &cfg, &err);
    CHECK(e != NULL);
    if (!e)
        return;
    prompt doc = chat_prompt("Here is a list of things: the moon, bread, rivers, the violin, owls, "
                             "glass, volcanoes, chess, honey, the desert, comets, paper, tigers, "
                             "rain, copper and bicycles. Which of them is the heaviest?");
    prompt other = topic_prompt(3, "Write a long story about %s.");
    CHECK(doc.n > 48);
    static req_out out[4];
    memset(out, 0, sizeof out);
    gen_params g8 = greedy(8), g40 = greedy(40);
    g40.ignore_eos = true;
    /* turn 1 stores the prefix */
    engine_request r = make_request(&doc, &g8, &out[0]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    CHECK(wait_done(&out[0], 1));
    CHECK_EQ_INT(f.n_blocks, doc.n / f.bt);
    /* another sequence decodes; turn 2's restore is held in flight */
    pthread_mutex_lock(&f.mu);
    f.hold = true;
    pthread_mutex_unlock(&f.mu);
    r = make_request(&other, &g40, &out[1]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    CHECK(wait_tokens(&out[1], 2));
    r = make_request(&doc, &g8, &out[2]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    while (fake_count(&f, &f.starts) < 1)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    pthread_mutex_lock(&g_mu);
    const int32_t before = out[1].n_ids;
    pthread_mutex_unlock(&g_mu);
    CHECK(wait_tokens(&out[1], before + 10)); /* not stalled by the restore */
    pthread_mutex_lock(&g_mu);
    CHECK_EQ_INT(out[2].n_ids, 0); /* still waiting for its prefix */
    pthread_mutex_unlock(&g_mu);
    fake_release(&f);
    CHECK(wait_done(&out[1], 2));
    CHECK_EQ_INT(fake_count(&f, &f.finishes), 1);
    CHECK_EQ_INT(f.restored, f.n_blocks * f.bt);
    /* cancelled while restoring: finishes, the restore is discarded */
    pthread_mutex_lock(&f.mu);
    f.released = false;
    pthread_mutex_unlock(&f.mu);
    uint64_t id = 0;
    r = make_request(&doc, &g8, &out[3]);
    CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
    while (fake_count(&f, &f.starts) < 2)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    engine_cancel(e, id);
    CHECK(wait_done(&out[3], 1));
    CHECK_EQ_INT(out[3].finish, GEN_FINISH_CANCELLED);
    CHECK_EQ_INT(fake_count(&f, &f.discards), 1);
    check_idle_pool(e);
    engine_destroy(e);
    check_equals_solo(&doc, &g8, &out[2]);
    check_equals_solo(&other, &g40, &out[1]);
    free(doc.ids);
    free(other.ids);
    free(f.blocks);
    free(f.tokens);
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    ekv_error err = {0};
    g_model = model_load(path, &err);
    if (!g_model) {
        fprintf(stderr, "cannot load %s: %s (run scripts/setup.sh)\n", path, err.msg);
        return 1;
    }
    g_rt = model_runtime_create(g_model, 64, 512, 2, &err);
    g_kv = model_kv_pool_create(g_model, 512, &err);
    if (!g_rt || !g_kv) {
        fprintf(stderr, "reference runtime: %s\n", err.msg);
        return 1;
    }
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
    RUN_SELECTED(test_full_queue_says_busy);
    RUN_SELECTED(test_invalid_requests_are_refused);
    RUN_SELECTED(test_compression_policy_saves_kv);
    RUN_SELECTED(test_drain_then_destroy);
    RUN_SELECTED(test_destroy_cancels_in_flight);
    RUN_SELECTED(test_prefix_restore_runs_in_the_background);
    model_runtime_free(g_rt);
    kv_pool_destroy(g_kv);
    model_free(g_model);
    return TEST_EXIT();
}
