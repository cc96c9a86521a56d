/*
 * test_coordinator.c - the coordinator without a network or an engine:
 * fake worker groups record what is submitted to them and the test plays
 * the engine's callbacks by hand. Checks routing (least loaded, prefix
 * affinity, ties in turn, retries, health and readiness), request checks,
 * the stream's coalescing, notify and reference counting (under ASan: no
 * leak, no use after free), and the metrics text.
 * Usage: test_coordinator MODEL.gguf (the tokenizer comes from the model).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h" /* coord_set_group_healthy */
#include "entrokv/coordinator.h"
#include "entrokv/metrics.h"
#include "entrokv/model.h"

static int failures;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);           \
            failures++;                                                                        \
        }                                                                                      \
    } while (0)

/* ---- a fake worker group ---- */

#define MAX_SUBMITS 64

typedef struct fake_group {
    int index;
    ekv_status next_rc;          /* what submit answers */
    int n_submits, n_cancels;
    engine_request reqs[MAX_SUBMITS];
    uint64_t cancelled[MAX_SUBMITS];
} fake_group;

static ekv_status fake_submit(void *impl, const engine_request *r, uint64_t *id, ekv_error *err)
{
    fake_group *g = impl;
    if (g->next_rc)
        return ekv_error_set(err, g->next_rc, "fake group says no");
    if (g->n_submits == MAX_SUBMITS)
        return ekv_error_set(err, EKV_EBUSY, "fake group full");
    g->reqs[g->n_submits] = *r;
    g->reqs[g->n_submits].prompt = NULL; /* not ours after submit */
    *id = (uint64_t)g->n_submits++;
    return EKV_OK;
}

static void fake_cancel(void *impl, uint64_t id)
{
    fake_group *g = impl;
    g->cancelled[g->n_cancels++] = id;
}

static void fake_stats(void *impl, engine_stats *s)
{
    memset(s, 0, sizeof *s);
    s->kv_blocks_total = 100;
    s->kv_blocks_free = 90 - ((fake_group *)impl)->index;
    s->running = 1;
    s->preemptions = 3 + (uint64_t)((fake_group *)impl)->index;
}

static const coord_group_ops fake_ops = {fake_submit, fake_cancel, fake_stats, NULL};

/* Plays the engine finishing request i of g. */
static void fake_finish(fake_group *g, int i, gen_finish f)
{
    engine_usage u = {.prompt_tokens = 5, .completion_tokens = 2, .kv_bytes = 10,
                      .kv_bytes_full = 20};
    g->reqs[i].on_done(g->reqs[i].ctx, f, &u, EKV_OK, NULL);
}

static coord_request prompt_request(ekv_coordinator *c, const char *prompt)
{
    coord_request r;
    coord_request_init(c, &r);
    r.prompt = prompt;
    r.prompt_len = strlen(prompt);
    r.params.max_tokens = 8;
    r.protocol = "test";
    return r;
}

static const char *long_prefix =
    "The history of the region begins with the earliest settlements along the river, "
    "where farmers grew wheat and barley and traded with the towns upstream. ";

/* ---- tests ---- */

static void test_routing_least_loaded_then_prefix_affinity(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g[3] = {{.index = 0}, {.index = 1}, {.index = 2}};
    for (int i = 0; i < 3; i++)
        CHECK(coord_add_group(c, "fake", &fake_ops, &g[i], NULL) == EKV_OK);
    /* short prompts: no affinity, strictly least loaded -> round robin */
    coord_stream *s[16];
    int n = 0;
    for (int i = 0; i < 6; i++) {
        coord_request r = prompt_request(c, i % 2 ? "Hello" : "Hi there");
        CHECK(coord_submit(c, &r, &s[n++], NULL) == EKV_OK);
    }
    CHECK(g[0].n_submits == 2 && g[1].n_submits == 2 && g[2].n_submits == 2);
    /* a long prompt goes to group 0 (ties: round-robin, and it is group 0's
     * turn after six requests), and its prefix stays there */
    char buf[512];
    snprintf(buf, sizeof buf, "%sQuestion one?", long_prefix);
    coord_request r = prompt_request(c, buf);
    CHECK(coord_submit(c, &r, &s[n++], NULL) == EKV_OK);
    CHECK(g[0].n_submits == 3);
    snprintf(buf, sizeof buf, "%sA different question?", long_prefix);
    r = prompt_request(c, buf);
    CHECK(coord_submit(c, &r, &s[n++], NULL) == EKV_OK);
    CHECK(g[0].n_submits == 4); /* affinity beats least loaded within the slack */
    /* once the affine group is busier than the slack allows, load wins */
    for (int i = 0; i < COORD_AFFINITY_SLACK + 1; i++) {
        r = prompt_request(c, buf);
        CHECK(coord_submit(c, &r, &s[n++], NULL) == EKV_OK);
    }
    CHECK(g[1].n_submits + g[2].n_submits > 4);
    for (int i = 0; i < n; i++)
        coord_stream_release(s[i]);
    /* released before done: every request was cancelled, then finishes */
    CHECK(g[0].n_cancels + g[1].n_cancels + g[2].n_cancels == n);
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < g[k].n_submits; i++)
            fake_finish(&g[k], i, GEN_FINISH_CANCELLED);
    coord_free(c);
    metrics_free(m);
}

static int notified;

static void count_notify(void *ctx)
{
    (void)ctx;
    notified++;
}

static void test_stream_coalesces_and_notifies_once_per_take(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g = {0};
    coord_add_group(c, "fake", &fake_ops, &g, NULL);
    coord_request r = prompt_request(c, "Hello");
    coord_stream *s;
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    coord_stream_set_notify(s, count_notify, NULL);
    CHECK(notified == 0);
    engine_request *er = &g.reqs[0];
    int32_t a[2] = {11, 12}, b[1] = {13};
    er->on_tokens(er->ctx, a, 2, "ab", 2);
    er->on_tokens(er->ctx, b, 1, "c", 1);
    CHECK(notified == 1); /* once until the consumer takes */
    coord_chunk ch;
    CHECK(coord_stream_take(s, &ch));
    CHECK(ch.n_ids == 3 && ch.ids[2] == 13 && ch.text_len == 3 && !memcmp(ch.text, "abc", 3));
    CHECK(!ch.done);
    coord_chunk_free(&ch);
    CHECK(!coord_stream_take(s, &ch));
    CHECK(!coord_stream_wait(s, 0.01));
    fake_finish(&g, 0, GEN_FINISH_STOP);
    CHECK(notified == 2);
    CHECK(coord_stream_wait(s, 0.01));
    CHECK(coord_stream_take(s, &ch) && ch.done && ch.n_ids == 0);
    CHECK(ch.usage.completion_tokens == 2 && !strcmp(coord_finish_reason(ch.finish), "stop"));
    coord_chunk_free(&ch);
    CHECK(!coord_stream_take(s, &ch)); /* done is reported once */
    coord_stream_release(s);
    CHECK(g.n_cancels == 0); /* finished requests are not cancelled */
    char *text = metrics_render(m, NULL, NULL);
    CHECK(text && strstr(text, "entrokv_requests_total{status=\"ok\"} 1\n"));
    CHECK(text && strstr(text, "entrokv_generated_tokens_total 2\n"));
    CHECK(text && strstr(text, "entrokv_ttft_seconds_count 1\n"));
    CHECK(text && strstr(text, "entrokv_inter_token_latency_seconds_count 2\n"));
    free(text);
    coord_free(c);
    metrics_free(m);
}

/* n choices: one engine request with a ctx per choice, counted in flight n
 * times for routing; each choice's news comes out tagged with its index,
 * its done record once, `last` on the final one; the request is counted
 * once in the metrics, its prompt once, every choice's completion. */
static void test_stream_of_n_choices(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g[2] = {{.index = 0}, {.index = 1}};
    for (int i = 0; i < 2; i++)
        CHECK(coord_add_group(c, "fake", &fake_ops, &g[i], NULL) == EKV_OK);
    coord_request r = prompt_request(c, "Hello");
    r.n = 3;
    coord_stream *s, *o[2];
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    CHECK(coord_stream_choices(s) == 3);
    CHECK(g[0].n_submits == 1 && g[0].reqs[0].n == 3 && g[0].reqs[0].choice_ctx);
    /* three in flight on group 0: the next two single requests go to group 1 */
    coord_request one = prompt_request(c, "Hi");
    CHECK(coord_submit(c, &one, &o[0], NULL) == EKV_OK);
    CHECK(coord_submit(c, &one, &o[1], NULL) == EKV_OK);
    CHECK(g[1].n_submits == 2);
    void *ctx[3];
    for (int i = 0; i < 3; i++)
        ctx[i] = g[0].reqs[0].choice_ctx[i];
    CHECK(ctx[0] != ctx[1] && ctx[1] != ctx[2]);
    engine_request *er = &g[0].reqs[0];
    int32_t a = 11, b = 12;
    er->on_tokens(ctx[2], &b, 1, "c", 1);
    er->on_tokens(ctx[0], &a, 1, "a", 1);
    coord_chunk ch;
    bool seen[3] = {false, false, false};
    for (int k = 0; k < 2; k++) {
        CHECK(coord_stream_take(s, &ch) && !ch.done && ch.n_ids == 1);
        CHECK(ch.index == 0 || ch.index == 2);
        if (ch.index == 0 || ch.index == 2) {
            CHECK(!seen[ch.index]);
            seen[ch.index] = true;
            CHECK(ch.ids[0] == (ch.index == 0 ? 11 : 12));
            CHECK(ch.text_len == 1 && ch.text[0] == (ch.index == 0 ? 'a' : 'c'));
        }
        coord_chunk_free(&ch);
    }
    CHECK(!coord_stream_take(s, &ch));
    engine_usage u = {.prompt_tokens = 5, .completion_tokens = 2, .kv_bytes = 10};
    for (int i = 1; i < 3; i++)
        er->on_done(ctx[(i + 1) % 3], GEN_FINISH_STOP, &u, EKV_OK, NULL);
    int dones = 0, lasts = 0;
    while (coord_stream_take(s, &ch)) {
        CHECK(ch.done && ch.index >= 0 && ch.index < 3);
        dones++;
        lasts += ch.last;
        coord_chunk_free(&ch);
    }
    CHECK(dones == 2 && lasts == 0);
    er->on_done(ctx[1], GEN_FINISH_LENGTH, &u, EKV_OK, NULL);
    CHECK(coord_stream_take(s, &ch) && ch.done && ch.last && ch.index == 1);
    CHECK(!strcmp(coord_finish_reason(ch.finish), "length"));
    coord_chunk_free(&ch);
    coord_stream_release(s);
    CHECK(g[0].n_cancels == 0);
    char *text = metrics_render(m, NULL, NULL);
    CHECK(text && strstr(text, "entrokv_requests_total{status=\"ok\"} 1\n"));
    CHECK(text && strstr(text, "entrokv_prompt_tokens_total 5\n"));
    CHECK(text && strstr(text, "entrokv_generated_tokens_total 6\n"));
    free(text);
    for (int i = 0; i < 2; i++) {
        coord_stream_release(o[i]);
        fake_finish(&g[1], i, GEN_FINISH_CANCELLED);
    }
    /* out of range: refused before any group sees it */
    r.n = COORD_MAX_N + 1;
    ekv_error err = {0};
    CHECK(coord_submit(c, &r, &s, &err) == EKV_EINVAL && strstr(err.msg, "n must be"));
    r.n = -1;
    CHECK(coord_submit(c, &r, &s, &err) == EKV_EINVAL);
    CHECK(g[0].n_submits == 1);
    coord_free(c);
    metrics_free(m);
}

static void expect_invalid(ekv_coordinator *c, coord_request *r, const char *needle)
{
    coord_stream *s = NULL;
    ekv_error err = {0};
    ekv_status rc = coord_submit(c, r, &s, &err);
    CHECK(rc == EKV_EINVAL && s == NULL);
    if (!strstr(err.msg, needle)) {
        fprintf(stderr, "message '%s' does not mention '%s'\n", err.msg, needle);
        failures++;
    }
}

static void test_bad_requests_are_einval_with_a_message(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    cfg.max_ctx = 64;
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g = {0};
    coord_add_group(c, "fake", &fake_ops, &g, NULL);
    coord_request r = prompt_request(c, "");
    expect_invalid(c, &r, "empty");
    r = prompt_request(c, "caf\xc3");
    expect_invalid(c, &r, "UTF-8");
    r = prompt_request(c, long_prefix);
    r.prompt = "word word word word word word word word word word word word word word word word "
               "word word word word word word word word word word word word word word word word "
               "word word word word word word word word word word word word word word word word "
               "word word word word word word word word word word word word word word word word ";
    r.prompt_len = strlen(r.prompt);
    expect_invalid(c, &r, "context");
    r = prompt_request(c, "Hello");
    r.params.max_tokens = 0;
    expect_invalid(c, &r, "max_tokens");
    r.params.max_tokens = 65;
    expect_invalid(c, &r, "max_tokens");
    r = prompt_request(c, "Hello");
    r.params.sampling.temperature = -1;
    expect_invalid(c, &r, "temperature");
    r = prompt_request(c, "Hello");
    r.kv_method = "zip";
    expect_invalid(c, &r, "zip");
    r = prompt_request(c, "Hello");
    tok_message msgs[1] = {{"", "hi"}};
    r.messages = msgs;
    r.n_messages = 1;
    r.prompt = NULL;
    r.prompt_len = 0;
    expect_invalid(c, &r, "role");
    CHECK(g.n_submits == 0);
    /* a full group is EKV_EBUSY, and so is a draining coordinator */
    g.next_rc = EKV_EBUSY;
    r = prompt_request(c, "Hello");
    coord_stream *s = NULL;
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_EBUSY && !s);
    g.next_rc = EKV_OK;
    coord_drain(c);
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_EBUSY && !s && coord_draining(c));
    char *text = metrics_render(m, NULL, NULL);
    CHECK(text && strstr(text, "entrokv_requests_total{status=\"invalid\"} 8\n"));
    CHECK(text && strstr(text, "entrokv_requests_total{status=\"rejected\"} 2\n"));
    free(text);
    coord_free(c);
    metrics_free(m);
}

static void test_gauges_sum_groups_and_kvstore_counters_render(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g[2] = {{.index = 0}, {.index = 1}};
    coord_add_group(c, "a", &fake_ops, &g[0], NULL);
    coord_add_group(c, "b", &fake_ops, &g[1], NULL);
    metrics_gauges gg;
    coord_gauges(c, &gg);
    CHECK(gg.running_sequences == 2 && gg.kv_blocks_free == 179 && gg.kv_blocks_used == 21);
    atomic_fetch_add(&metrics_kvstore_counters(m)->hits, 3);
    char *text = metrics_render(m, &gg, NULL);
    CHECK(text && strstr(text, "entrokv_kv_blocks_used 21\n"));
    CHECK(gg.preemptions == 7 && text && strstr(text, "entrokv_preemptions_total 7\n"));
    CHECK(text && strstr(text, "entrokv_kvstore_hits_total 3\n"));
    CHECK(text && strstr(text, "entrokv_kvstore_misses_total 0\n"));
    free(text);
    coord_free(c);
    metrics_free(m);
}

/* Which group of g[0..n) took one more request since before[]; -1: none. */
static int took(const fake_group *g, int n, int *before)
{
    int k = -1;
    for (int i = 0; i < n; i++) {
        if (g[i].n_submits > before[i])
            k = i;
        before[i] = g[i].n_submits;
    }
    return k;
}

static void fail_unavailable(fake_group *g, int i)
{
    g->reqs[i].on_done(g->reqs[i].ctx, GEN_FINISH_CANCELLED, NULL, EKV_EUNAVAILABLE,
                       "worker x: Socket closed");
}

static void test_ties_take_turns_and_failed_groups_are_retried(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g[2] = {{.index = 0}, {.index = 1}};
    for (int i = 0; i < 2; i++)
        CHECK(coord_add_group(c, "fake", &fake_ops, &g[i], NULL) == EKV_OK);
    int before[2] = {0, 0};
    /* one at a time, each done before the next: every choice is a tie */
    int per_group[2] = {0, 0};
    for (int i = 0; i < 4; i++) {
        coord_request r = prompt_request(c, "Hello");
        coord_stream *s = NULL;
        CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
        int k = took(g, 2, before);
        CHECK(k >= 0);
        if (k < 0)
            return;
        per_group[k]++;
        fake_finish(&g[k], g[k].n_submits - 1, GEN_FINISH_LENGTH);
        coord_stream_release(s);
    }
    CHECK(per_group[0] == 2 && per_group[1] == 2);

    /* failed before any output: resubmitted to the other group, same prompt */
    coord_request r = prompt_request(c, "Hello there");
    coord_stream *s = NULL;
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    int a = took(g, 2, before), n_prompt = g[a].reqs[g[a].n_submits - 1].n_prompt;
    fail_unavailable(&g[a], g[a].n_submits - 1);
    int b = took(g, 2, before);
    CHECK(b == 1 - a);
    if (b != 1 - a)
        return;
    engine_request *rb = &g[b].reqs[g[b].n_submits - 1];
    CHECK(rb->n_prompt == n_prompt && rb->params.max_tokens == 8);
    coord_chunk ch;
    CHECK(!coord_stream_take(s, &ch)); /* the client saw nothing of it */
    coord_chunk_free(&ch);
    int32_t ids[2] = {5, 6};
    rb->on_tokens(rb->ctx, ids, 2, "ab", 2);
    fake_finish(&g[b], g[b].n_submits - 1, GEN_FINISH_LENGTH);
    CHECK(coord_stream_take(s, &ch) && ch.n_ids == 2 && ch.done && ch.rc == EKV_OK);
    coord_chunk_free(&ch);
    coord_stream_release(s);

    /* failed after output: the stream ends UNAVAILABLE, nothing resubmitted */
    r = prompt_request(c, "Hello again");
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    a = took(g, 2, before);
    engine_request *ra = &g[a].reqs[g[a].n_submits - 1];
    ra->on_tokens(ra->ctx, ids, 1, "a", 1);
    fail_unavailable(&g[a], g[a].n_submits - 1);
    CHECK(took(g, 2, before) == -1);
    CHECK(coord_stream_take(s, &ch) && ch.n_ids == 1 && ch.done && ch.rc == EKV_EUNAVAILABLE &&
          strstr(ch.msg, "Socket closed"));
    coord_chunk_free(&ch);
    coord_stream_release(s);

    /* both groups fail it: after each was tried once, the error ends it */
    r = prompt_request(c, "Hello once more");
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    a = took(g, 2, before);
    fail_unavailable(&g[a], g[a].n_submits - 1);
    b = took(g, 2, before);
    CHECK(b == 1 - a);
    if (b == 1 - a)
        fail_unavailable(&g[b], g[b].n_submits - 1);
    CHECK(took(g, 2, before) == -1);
    CHECK(coord_stream_take(s, &ch) && ch.done && ch.rc == EKV_EUNAVAILABLE);
    coord_chunk_free(&ch);
    coord_stream_release(s);

    /* a refusal (queue full) is not retried: it is the client's to see */
    r = prompt_request(c, "Hello, busy");
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    a = took(g, 2, before);
    g[a].reqs[g[a].n_submits - 1].on_done(g[a].reqs[g[a].n_submits - 1].ctx,
                                          GEN_FINISH_CANCELLED, NULL, EKV_EBUSY, "full");
    CHECK(took(g, 2, before) == -1);
    CHECK(coord_stream_take(s, &ch) && ch.done && ch.rc == EKV_EBUSY);
    coord_chunk_free(&ch);
    coord_stream_release(s);

    char *text = metrics_render(m, NULL, NULL);
    CHECK(text && strstr(text, "entrokv_request_retries_total 2\n"));
    free(text);
    coord_free(c);
    metrics_free(m);
}

/* Issue 21 part 1: a group's health (set by its own checks, as remote.c's
 * Stats calls do) decides both where requests go and /readyz: an unhealthy
 * group takes no request, not even a retry, and with none healthy the
 * coordinator is not ready and refuses with "no healthy worker group". */
static void test_health_decides_routing_and_readiness(const ekv_tokenizer *tok)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_coordinator *c = coord_create(tok, &cfg, m, NULL);
    fake_group g[2] = {{.index = 0}, {.index = 1}};
    for (int i = 0; i < 2; i++)
        CHECK(coord_add_group(c, "fake", &fake_ops, &g[i], NULL) == EKV_OK);
    char why[64];
    CHECK(coord_ready(c, why, sizeof why) && !strcmp(why, ""));
    int before[2] = {0, 0};

    /* group 0 unhealthy: every request goes to group 1, still ready */
    coord_set_group_healthy(c, &g[0], false);
    CHECK(coord_ready(c, why, sizeof why));
    for (int i = 0; i < 4; i++) {
        coord_request r = prompt_request(c, "Hello");
        coord_stream *s = NULL;
        CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
        int k = took(g, 2, before);
        CHECK(k == 1);
        if (k >= 0)
            fake_finish(&g[k], g[k].n_submits - 1, GEN_FINISH_LENGTH);
        coord_stream_release(s);
    }

    /* a request that fails before its first token is not retried on the
     * unhealthy group: it ends UNAVAILABLE */
    coord_request r = prompt_request(c, "Hello there");
    coord_stream *s = NULL;
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    int a = took(g, 2, before);
    CHECK(a == 1);
    if (a < 0)
        return;
    fail_unavailable(&g[a], g[a].n_submits - 1);
    CHECK(took(g, 2, before) == -1);
    coord_chunk ch;
    CHECK(coord_stream_take(s, &ch) && ch.done && ch.rc == EKV_EUNAVAILABLE);
    coord_chunk_free(&ch);
    coord_stream_release(s);

    /* none healthy: not ready, and a request is refused with the reason */
    coord_set_group_healthy(c, &g[1], false);
    CHECK(!coord_ready(c, why, sizeof why) && !strcmp(why, "no healthy worker group"));
    r = prompt_request(c, "Hello");
    s = NULL;
    ekv_error err = {0};
    CHECK(coord_submit(c, &r, &s, &err) == EKV_EBUSY && !s &&
          strstr(err.msg, "no healthy worker group"));
    CHECK(took(g, 2, before) == -1);

    /* group 0 back: ready again and it takes the next request */
    coord_set_group_healthy(c, &g[0], true);
    CHECK(coord_ready(c, why, sizeof why));
    r = prompt_request(c, "Hello");
    CHECK(coord_submit(c, &r, &s, NULL) == EKV_OK);
    int k = took(g, 2, before);
    CHECK(k == 0);
    if (k >= 0)
        fake_finish(&g[k], g[k].n_submits - 1, GEN_FINISH_LENGTH);
    coord_stream_release(s);
    coord_free(c);
    metrics_free(m);
}

static void test_utf8_validation(void)
{
    CHECK(coord_utf8_valid("", 0));
    CHECK(coord_utf8_valid("h\xc3\xa9llo \xf0\x9f\x98\x80", 11));
    CHECK(!coord_utf8_valid("\xc3", 1));         /* truncated */
    CHECK(!coord_utf8_valid("\xc0\xaf", 2));     /* overlong */
    CHECK(!coord_utf8_valid("\xed\xa0\x80", 3)); /* surrogate */
    CHECK(!coord_utf8_valid("\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
    CHECK(!coord_utf8_valid("\xff", 1));
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_coordinator MODEL.gguf\n");
        return 2;
    }
    ekv_error err = {0};
    ekv_model *model = model_load(argv[1], &err);
    if (!model) {
        fprintf(stderr, "loading %s: %s\n", argv[1], err.msg);
        return 1;
    }
    const ekv_tokenizer *tok = model_tokenizer(model);
    test_routing_least_loaded_then_prefix_affinity(tok);
    test_stream_coalesces_and_notifies_once_per_take(tok);
    test_stream_of_n_choices(tok);
    test_bad_requests_are_einval_with_a_message(tok);
    test_gauges_sum_groups_and_kvstore_counters_render(tok);
    test_ties_take_turns_and_failed_groups_are_retried(tok);
    test_health_decides_routing_and_readiness(tok);
    test_utf8_validation();
    model_free(model);
    printf("%s: %d failure(s)\n", failures ? "FAIL" : "ok", failures);
    return failures ? 1 : 0;
}
