/*
 * engine_harness.h - what the step engine's tests share: the demo model and
 * a solo reference runtime, callbacks that record each request's stream,
 * waits, prompts, and the check that a request equals its solo gen_run.
 * Included by tests/model/test_engine*.c; harness_init loads the model.
 */
#ifndef EKV_ENGINE_HARNESS_H
#define EKV_ENGINE_HARNESS_H

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

static inline void on_tokens(void *ctx, const int32_t *ids, int32_t n, const char *text, size_t len)
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

static inline void on_done(void *ctx, gen_finish finish, const engine_usage *u, ekv_status rc,
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

static inline void deadline_in(struct timespec *ts, int s)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += s;
}

/* Waits until all n have had on_done; false after WAIT_S seconds. */
static inline bool wait_done(req_out *o, int n)
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
static inline bool wait_tokens(req_out *o, int32_t k)
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

static inline prompt chat_prompt(const char *user)
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

static inline prompt topic_prompt(int i, const char *fmt)
{
    char user[256];
    snprintf(user, sizeof user, fmt, TOPICS[i % N_TOPICS]);
    return chat_prompt(user);
}

static inline engine_request make_request(const prompt *p, const gen_params *gp, req_out *o)
{
    engine_request r;
    memset(&r, 0, sizeof r);
    r.prompt = p->ids;
    r.n_prompt = p->n;
    r.params = *gp;
    r.kv = gp->kv; /* the policy check_equals_solo's gen_run applies */
    r.on_tokens = on_tokens;
    r.on_done = on_done;
    r.ctx = o;
    return r;
}

static inline gen_params greedy(int32_t max_tokens)
{
    gen_params gp;
    gen_params_default(&gp);
    gp.max_tokens = max_tokens;
    gp.sampling.temperature = 0;
    return gp;
}

static inline engine_config small_config(int32_t kv_tokens, int32_t max_running, int32_t max_queued)
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

/* o must equal gen_run of the same request (policy included) alone: ids,
 * text, finish, and the KV the same compression leaves. */
static inline void check_equals_solo(const prompt *p, const gen_params *gp, const req_out *o)
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
    if (first_diff >= 0)
        fprintf(stderr, "  a request of %d prompt tokens: token %d differs from its solo run\n",
                p->n, first_diff);
    CHECK_EQ_INT(first_diff, -1);
    CHECK_EQ_INT(o->text_len, ref.text_len);
    CHECK(o->text_len == ref.text_len && memcmp(o->text, ref.text, ref.text_len) == 0);
    CHECK_EQ_INT(o->u.prompt_tokens, p->n);
    CHECK_EQ_INT(o->u.completion_tokens, ref.n_ids);
    CHECK_EQ_INT(o->u.kv_bytes, ref.kv_bytes);
    if (gp->kv.method == KVC_FULL && gp->kv.decode.mode == KVC_DECODE_NONE &&
        gp->kv.spark.ratio <= 0)
        CHECK_EQ_INT(o->u.kv_bytes, o->u.kv_bytes_full);
    else
        CHECK(o->u.kv_bytes < o->u.kv_bytes_full);
    CHECK(o->u.queue_s >= 0 && o->u.ttft_s >= o->u.queue_s);
    gen_result_free(&ref);
}

static inline void check_idle_pool(ekv_engine *e)
{
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.running, 0);
    CHECK_EQ_INT(s.queued, 0);
    CHECK_EQ_INT(s.kv_blocks_free, s.kv_blocks_total);
}


/* Loads argv[1] (default: the demo GGUF) and the solo reference runtime. */
static inline bool harness_init(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    ekv_error err = {0};
    g_model = model_load(path, &err);
    if (!g_model) {
        fprintf(stderr, "cannot load %s: %s (run scripts/setup.sh)\n", path, err.msg);
        return false;
    }
    g_rt = model_runtime_create(g_model, 64, 512, 2, &err);
    g_kv = model_kv_pool_create(g_model, 512, &err);
    if (!g_rt || !g_kv) {
        fprintf(stderr, "reference runtime: %s\n", err.msg);
        return false;
    }
    return true;
}

static inline void harness_fini(void)
{
    model_runtime_free(g_rt);
    kv_pool_destroy(g_kv);
    model_free(g_model);
}

#endif
