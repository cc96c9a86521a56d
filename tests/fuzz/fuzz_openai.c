/*
 * fuzz_openai.c - libFuzzer target for the OpenAI request path of
 * /v1/completions and /v1/chat/completions: the body as oai_parse reads it
 * (coordinator/openai.c), then coord_submit's checks, chat template and
 * tokenization, into a fake worker group that records what it is given.
 *
 * Every input is tried as both kinds of request. Invariants:
 *  - a rejection (from either step) has a code and a message, and is
 *    EKV_EINVAL (or EKV_ENOMEM), never something internal;
 *  - a parsed request has a prompt whose prompt_len is its length, or
 *    1..n messages with a role and a content each, and at most
 *    COORD_MAX_STOPS stop strings, none NULL;
 *  - what reaches the group is sane: max_tokens in [1, max_ctx], a prompt
 *    of 1..max_ctx-1 ids inside the vocab, sampling values that
 *    sampler_params_check accepts, non-empty stops; and an integer
 *    max_tokens in the body is the one the group sees;
 *  - the response and chunk JSON for an accepted request parse back.
 * The tokenizer is the demo model's (EKV_MODEL, else the path compiled in).
 *
 * Run with scripts/fuzz.sh; seeds live in tests/fuzz/corpus/openai/
 * (tests/fuzz/make_openai_seeds.py writes them).
 */
#include "openai.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "entrokv/sampler.h"
#include "fuzz_model.h"

/* Sanitizer reports go to a copy of fd 2, which the coordinator's
 * per-request log lines are sent away from while it runs. Weak: the
 * corpus replay (replay_corpus.c) may be built without a sanitizer. */
void __sanitizer_set_report_fd(void *fd) __attribute__((weak));

#define MAX_CTX 256

static ekv_tokenizer *tok;
static ekv_coordinator *coord;
static int devnull = -1, real_stderr = -1;

typedef struct seen {
    int n;
    engine_request r;
    int32_t prompt[MAX_CTX]; /* the prompt is the caller's only during submit */
} seen;
static seen group;

static ekv_status fake_submit(void *impl, const engine_request *r, uint64_t *id, ekv_error *err)
{
    seen *g = impl;
    if (r->n_prompt < 1 || r->n_prompt > MAX_CTX)
        return ekv_error_set(err, EKV_EINVAL, "fake group: %d prompt tokens", r->n_prompt);
    g->r = *r;
    memcpy(g->prompt, r->prompt, (size_t)r->n_prompt * sizeof *g->prompt);
    g->r.prompt = g->prompt;
    g->n++;
    *id = (uint64_t)g->n;
    return EKV_OK;
}

static void fake_cancel(void *impl, uint64_t id)
{
    (void)impl, (void)id;
}

static void fake_stats(void *impl, engine_stats *s)
{
    (void)impl;
    memset(s, 0, sizeof *s);
}

static const coord_group_ops fake_ops = {fake_submit, fake_cancel, fake_stats, NULL};

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    tok = fuzz_load_tokenizer("fuzz_openai");
    ekv_error err = {0};
    coord_config cfg;
    coord_config_default(&cfg);
    cfg.max_ctx = MAX_CTX;
    cfg.default_max_tokens = 16;
    coord = coord_create(tok, &cfg, NULL, &err);
    if (!coord || coord_add_group(coord, "fake", &fake_ops, &group, &err) != EKV_OK) {
        fprintf(stderr, "fuzz_openai: %s\n", err.msg);
        exit(1);
    }
    devnull = open("/dev/null", O_WRONLY);
    real_stderr = dup(2);
    if (devnull < 0 || real_stderr < 0)
        exit(1);
    if (__sanitizer_set_report_fd)
        __sanitizer_set_report_fd((void *)(intptr_t)real_stderr);
    return 0;
}

static void check_error(ekv_status rc, const ekv_error *err)
{
    if (err->code != rc || !err->msg[0] || (rc != EKV_EINVAL && rc != EKV_ENOMEM)) {
        fprintf(stderr, "rejection %d (error code %d) with message '%s'\n", rc, err->code,
                err->msg);
        abort();
    }
}

static void check_parsed(const oai_request *r)
{
    if (r->kind == OAI_CHAT) {
        if (!r->r.messages || r->r.n_messages == 0 || r->r.prompt)
            abort();
        for (size_t i = 0; i < r->r.n_messages; i++)
            if (!r->r.messages[i].role || !r->r.messages[i].content)
                abort();
    } else if (!r->r.prompt || r->r.prompt_len != strlen(r->r.prompt) || r->r.n_messages) {
        abort();
    }
    if (r->r.params.n_stops > COORD_MAX_STOPS || (r->r.params.n_stops && !r->r.params.stops))
        abort();
    for (size_t i = 0; i < r->r.params.n_stops; i++)
        if (!r->r.params.stops[i])
            abort();
}

/* The integer max_tokens (or max_completion_tokens) the body asks for, if
 * it is one: the group must see exactly that. */
static int body_max_tokens(const oai_request *r, long long *out)
{
    const cJSON *v = NULL;
    if (r->kind == OAI_CHAT)
        v = cJSON_GetObjectItemCaseSensitive(r->json, "max_completion_tokens");
    if (!v)
        v = cJSON_GetObjectItemCaseSensitive(r->json, "max_tokens");
    if (!cJSON_IsNumber(v))
        return 0;
    *out = (long long)v->valuedouble;
    return 1;
}

static void check_accepted(const oai_request *r, const engine_request *er)
{
    const gen_params *p = &er->params;
    if (p->max_tokens < 1 || p->max_tokens > MAX_CTX)
        abort();
    long long want;
    if (body_max_tokens(r, &want) && want != p->max_tokens)
        abort();
    if (!er->prompt || er->n_prompt < 1 || er->n_prompt > MAX_CTX - 1)
        abort();
    for (int32_t i = 0; i < er->n_prompt; i++)
        if (er->prompt[i] < 0 || er->prompt[i] >= tok_vocab_size(tok))
            abort();
    ekv_error err = {0};
    if (sampler_params_check(&p->sampling, &err) != EKV_OK)
        abort();
    if (p->n_stops > COORD_MAX_STOPS)
        abort();
    for (size_t i = 0; i < p->n_stops; i++)
        if (!p->stops[i] || !p->stops[i][0])
            abort();
    if (!er->on_done || !er->on_tokens || !er->ctx)
        abort();
    if (er->n < 0 || er->n > COORD_MAX_N || (er->n > 1 && !er->choice_ctx))
        abort();
}

static void check_responses(oai_kind kind, const coord_chunk *done)
{
    oai_meta m = {.kind = kind, .created = 1, .model = coord_model_name(coord)};
    snprintf(m.id, sizeof m.id, "cmpl-1");
    coord_chunk text = {.text = "t", .text_len = 1};
    const char *texts[1] = {"text"};
    char *s[4] = {oai_response_json(&m, texts, done, 1, &done->usage),
                  oai_chunk_json(&m, &text, true), oai_chunk_json(&m, done, false),
                  oai_usage_chunk_json(&m, &done->usage)};
    for (int i = 0; i < 4; i++) {
        cJSON *j = s[i] ? cJSON_Parse(s[i]) : NULL;
        if (!j)
            abort();
        cJSON_Delete(j);
        free(s[i]);
    }
}

static void one_request(oai_kind kind, const uint8_t *data, size_t size)
{
    oai_request r;
    ekv_error err = {0};
    ekv_status rc = oai_parse(coord, kind, (const char *)data, size, &r, &err);
    if (rc != EKV_OK) {
        check_error(rc, &err);
        oai_request_free(&r);
        return;
    }
    check_parsed(&r);
    int before = group.n;
    coord_stream *s = NULL;
    /* coord_submit logs one line per request to fd 2 */
    dup2(devnull, 2);
    rc = coord_submit(coord, &r.r, &s, &err);
    dup2(real_stderr, 2);
    if (rc != EKV_OK) {
        check_error(rc, &err);
        if (s || group.n != before)
            abort();
        oai_request_free(&r);
        return;
    }
    if (!s || group.n != before + 1)
        abort();
    check_accepted(&r, &group.r);
    /* play the engine: one token, then done, per choice; the stream must
     * hand each back once, tagged with its choice */
    int32_t id = group.r.prompt[0];
    engine_usage u = {.prompt_tokens = group.r.n_prompt, .completion_tokens = 1};
    const int32_t n = group.r.n > 1 ? group.r.n : 1;
    if (coord_stream_choices(s) != n)
        abort();
    dup2(devnull, 2); /* on_done logs too */
    for (int32_t i = 0; i < n; i++) {
        void *ctx = n > 1 ? group.r.choice_ctx[i] : group.r.ctx;
        group.r.on_tokens(ctx, &id, 1, "x", 1);
        group.r.on_done(ctx, GEN_FINISH_LENGTH, &u, EKV_OK, NULL);
    }
    dup2(real_stderr, 2);
    bool got[COORD_MAX_N] = {0};
    for (int32_t i = 0; i < n; i++) {
        coord_chunk c;
        if (!coord_stream_take(s, &c) || !c.done || c.n_ids != 1 || c.ids[0] != id ||
            c.index < 0 || c.index >= n || got[c.index] || c.last != (i == n - 1))
            abort();
        got[c.index] = true;
        check_responses(kind, &c);
        coord_chunk_free(&c);
    }
    coord_stream_release(s);
    oai_request_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    one_request(OAI_CHAT, data, size);
    one_request(OAI_COMPLETIONS, data, size);
    return 0;
}
