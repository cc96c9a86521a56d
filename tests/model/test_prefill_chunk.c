/*
 * test_prefill_chunk.c - chunked prefill (engine_config.prefill_chunk)
 * changes when a prompt's rows run, never what they compute:
 *
 *  1. A prompt prefilled 7 rows at a time (chunks that cut the observation
 *     window and UNComp's 512-row entropy window mid-way) and in one chunk
 *     gives bit-identical last-row logits, and after compression with
 *     SnapKV, PyramidKV, UNComp (online entropy) and StreamingLLM the same
 *     kept positions in every (layer, KV head) and the same next logits.
 *  2. In the engine, while one stream decodes, prompts get at most
 *     prefill_chunk rows a step: the decoding stream gets a token every
 *     step while they go in, and every request still equals its solo
 *     gen_run (which prefills 64 rows at a time), compressed ones included.
 *
 * What this catches: a capture that misses or double-counts rows cut by a
 * chunk boundary, compression started before the whole prompt is in, a
 * chunk limit that is ignored (the prompts would go in one step beside the
 * decoding stream), or one that starves prompts.
 */
#include "engine_harness.h"

/* ---- 1. the model and the capture over chunk boundaries ---- */

#define N_LONG 600 /* past UNComp's 512-row entropy window */

typedef struct prefilled {
    kv_pool *pool;
    ekv_runtime *rt;
    kv_seq *seq;
    kvc_capture *cap;
    float *logits;
} prefilled;

static void prefilled_free(prefilled *p)
{
    kvc_capture_free(p->cap);
    kv_seq_free(p->seq);
    model_runtime_free(p->rt);
    kv_pool_destroy(p->pool);
    free(p->logits);
}

/* Prefills ids in chunks of `chunk` rows (the runtime's max_batch) with an
 * UNComp capture without a profile, which records what every method needs. */
static bool prefill_chunked(const int32_t *ids, int32_t n, int32_t chunk, prefilled *p)
{
    const ekv_model_config *c = model_config(g_model);
    const kvc_policy rec = {.method = KVC_UNCOMP, .budget = 0.2};
    ekv_error err = {0};
    memset(p, 0, sizeof *p);
    p->pool = model_kv_pool_create(g_model, 4 * (n + 16), &err);
    p->rt = model_runtime_create(g_model, chunk, n + 16, 2, &err);
    p->seq = p->pool ? kv_seq_create(p->pool, c->n_layers, c->n_kv_heads, &err) : NULL;
    p->cap = kvc_capture_create(&rec, g_model, n, 0, &err);
    p->logits = malloc((size_t)c->n_vocab * sizeof *p->logits);
    if (!p->pool || !p->rt || !p->seq || !p->cap || !p->logits ||
        model_prefill(p->rt, p->seq, ids, n, 0, kvc_capture_tap(p->cap, p->seq), p->logits,
                      &err)) {
        fprintf(stderr, "prefill in chunks of %d: %s\n", chunk, err.msg);
        return false;
    }
    return true;
}

/* Compresses a clone of p's sequence with pol; the clone, or NULL. */
static kv_seq *compress_clone(prefilled *p, const kvc_policy *pol)
{
    ekv_error err = {0};
    kvc_report rep;
    kv_seq *s = kv_seq_clone(p->seq, &err);
    if (!s || kvc_capture_set_policy(p->cap, pol, &err) ||
        kvc_capture_compress(p->cap, p->rt, s, &rep, &err)) {
        fprintf(stderr, "compress: %s\n", err.msg);
        kv_seq_free(s);
        return NULL;
    }
    return s;
}

/* The logits of one greedy step after the prompt, on seq. */
static bool next_logits(prefilled *p, kv_seq *seq, int32_t n, float *out)
{
    const int32_t V = model_config(g_model)->n_vocab;
    int32_t id = 0;
    for (int32_t t = 1; t < V; t++)
        if (p->logits[t] > p->logits[id])
            id = t;
    model_batch b = {.n = 1, .tokens = &id, .pos = &n, .seqs = &seq};
    ekv_error err = {0};
    return model_forward(p->rt, &b, out, &err) == EKV_OK;
}

static void test_chunk_boundaries_change_no_logit_and_no_selection(void)
{
    FILE *f = fopen("/usr/share/common-licenses/GPL-3", "rb");
    char text[8192];
    const size_t len = f ? fread(text, 1, sizeof text, f) : 0;
    if (f)
        fclose(f);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    CHECK(tok_encode(model_tokenizer(g_model), text, len, true, false, &ids, &n_ids, NULL) ==
          EKV_OK);
    CHECK(n_ids >= N_LONG);
    if (n_ids < N_LONG) {
        free(ids);
        return;
    }
    const ekv_model_config *c = model_config(g_model);
    const size_t V = (size_t)c->n_vocab;
    prefilled one, seven;
    const bool ok1 = prefill_chunked(ids, N_LONG, N_LONG, &one);
    const bool ok7 = prefill_chunked(ids, N_LONG, 7, &seven);
    CHECK(ok1 && ok7);
    if (ok1 && ok7) {
        CHECK(memcmp(one.logits, seven.logits, V * sizeof(float)) == 0);
        static const struct {
            const char *method;
            double budget;
        } pols[] = {{"snapkv", 0.2}, {"pyramidkv", 0.2}, {"uncomp", 0.2}, {"streaming", 0.2}};
        int32_t *pa = malloc((size_t)N_LONG * sizeof *pa), *pb = malloc((size_t)N_LONG * sizeof *pb);
        float *la = malloc(V * sizeof *la), *lb = malloc(V * sizeof *lb);
        for (size_t m = 0; m < sizeof pols / sizeof *pols; m++) {
            kvc_policy pol;
            CHECK(kvc_policy_parse(pols[m].method, pols[m].budget, &pol, NULL) == EKV_OK);
            kv_seq *a = compress_clone(&one, &pol), *b = compress_clone(&seven, &pol);
            CHECK(a && b);
            int32_t diff_heads = 0;
            for (int32_t l = 0; a && b && l < c->n_layers; l++)
                for (int32_t h = 0; h < c->n_kv_heads; h++) {
                    const int32_t na = kv_seq_positions(a, l, h, pa);
                    const int32_t nb = kv_seq_positions(b, l, h, pb);
                    diff_heads += na != nb || memcmp(pa, pb, (size_t)na * sizeof *pa) != 0;
                }
            if (diff_heads)
                fprintf(stderr, "  %s: %d heads keep other positions in 7-row chunks\n",
                        pols[m].method, diff_heads);
            CHECK_EQ_INT(diff_heads, 0);
            CHECK(a && b && kv_seq_len(a, 0, 0) < N_LONG); /* something was dropped */
            CHECK(a && b && next_logits(&one, a, N_LONG, la) && next_logits(&seven, b, N_LONG, lb));
            CHECK(memcmp(la, lb, V * sizeof(float)) == 0);
            kv_seq_free(a);
            kv_seq_free(b);
        }
        free(pa);
        free(pb);
        free(la);
        free(lb);
    }
    prefilled_free(&one);
    prefilled_free(&seven);
    free(ids);
}

/* ---- 2. the engine's chunk limit beside a decoding stream ---- */

#define CHUNK 5
#define N_LATE 4
#define LONG_GEN 120

/* The decoding stream's token count when each late request was submitted
 * and when it got its first token (under g_mu). */
static req_out g_out[1 + N_LATE];
static int32_t g_first_at[N_LATE];

static void on_tokens_late(void *ctx, const int32_t *ids, int32_t n, const char *text, size_t len)
{
    req_out *o = ctx;
    pthread_mutex_lock(&g_mu);
    const int k = (int)(o - g_out) - 1;
    if (o->n_ids == 0 && n > 0)
        g_first_at[k] = g_out[0].n_ids;
    pthread_mutex_unlock(&g_mu);
    on_tokens(ctx, ids, n, text, len);
}

static void test_prompts_take_chunks_beside_a_decoding_stream(void)
{
    static const struct {
        const char *fmt;
        kvc_method_id method;
        double budget;
    } late[N_LATE] = {
        {"Describe %s in detail, with its history, its uses, and three facts.", KVC_SNAPKV, 0.3},
        {"Explain %s to a child who has never seen one, step by step, with a short story "
         "and a question at the end.",
         KVC_UNCOMP, 0.3},
        {"Write a poem about %s with four lines, each one rhyming, and then explain what "
         "each line means in plain words.",
         KVC_PYRAMIDKV, 0.3},
        {"In two sentences, tell me why people like %s so much.", KVC_FULL, 1},
    };
    engine_config cfg = small_config(4096, 1 + N_LATE, 16);
    cfg.prefill_chunk = CHUNK;
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &cfg, &err);
    CHECK(e != NULL);
    if (!e)
        return;
    memset(g_out, 0, sizeof g_out);
    prompt ps[1 + N_LATE];
    gen_params gps[1 + N_LATE];
    ps[0] = topic_prompt(3, "Write a line about %s");
    gps[0] = greedy(LONG_GEN);
    gps[0].ignore_eos = true;
    engine_request r = make_request(&ps[0], &gps[0], &g_out[0]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    CHECK(wait_tokens(&g_out[0], 2)); /* it decodes now */
    pthread_mutex_lock(&g_mu);
    const int32_t at_submit = g_out[0].n_ids;
    pthread_mutex_unlock(&g_mu);
    int32_t n_late = 0;
    for (int i = 0; i < N_LATE; i++) {
        ps[1 + i] = topic_prompt(7 * i + 1, late[i].fmt);
        gps[1 + i] = greedy(24);
        gps[1 + i].ignore_eos = true;
        gps[1 + i].kv.method = late[i].method;
        gps[1 + i].kv.budget = late[i].budget;
        n_late += ps[1 + i].n;
        r = make_request(&ps[1 + i], &gps[1 + i], &g_out[1 + i]);
        r.on_tokens = on_tokens_late;
        CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    }
    CHECK(wait_done(g_out, 1 + N_LATE));
    /* the prompts went in CHUNK rows a step, each step with a decode row
     * of the stream: it got a token for every step but the last, which
     * samples the last prompt's first token after the stream's */
    int32_t last_first = 0;
    for (int i = 0; i < N_LATE; i++)
        last_first = g_first_at[i] > last_first ? g_first_at[i] : last_first;
    const int32_t steps = (n_late + CHUNK - 1) / CHUNK;
    if (last_first - at_submit < steps - 1)
        fprintf(stderr, "  %d prompt rows in chunks of %d: the stream got only %d tokens\n",
                n_late, CHUNK, last_first - at_submit);
    CHECK(last_first - at_submit >= steps - 1);
    CHECK(last_first < LONG_GEN); /* the stream was still decoding */
    check_idle_pool(e);
    engine_destroy(e);
    for (int i = 0; i < 1 + N_LATE; i++) {
        check_equals_solo(&ps[i], &gps[i], &g_out[i]);
        free(ps[i].ids);
    }
}

static void test_negative_chunk_is_refused(void)
{
    engine_config cfg = small_config(1024, 1, 1);
    cfg.prefill_chunk = -1;
    ekv_error err = {0};
    CHECK(engine_create(g_model, &cfg, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_chunk_boundaries_change_no_logit_and_no_selection);
    RUN_TEST(test_prompts_take_chunks_beside_a_decoding_stream);
    RUN_TEST(test_negative_chunk_is_refused);
    harness_fini();
    return TEST_EXIT();
}
