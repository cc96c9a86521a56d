/*
 * openai.c - OpenAI-compatible request parsing (see openai.h; the response
 * JSON is openai_response.c). Field names and shapes follow OpenAI's legacy
 * completions and chat completions APIs so the official clients work
 * unchanged; entrokv's extra fields (top_k, min_p, repeat_penalty,
 * kv_method, kv_budget, ignore_eos) sit beside them in the same body. Nothing is ignored: each
 * endpoint has an allow-list (FIELDS below, the table in docs/serving.md),
 * and a field outside it, or a value entrokv cannot honour, is a 400 that
 * names the field.
 */
#include "openai.h"

#include "coord_internal.h"
#include "json_strict.h"
#include "entrokv/kvrecall.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parsing ---- */

static ekv_status bad_type(ekv_error *err, const char *field, const char *want)
{
    return ekv_error_set(err, EKV_EINVAL, "'%s' must be %s", field, want);
}

static ekv_status get_number(const cJSON *o, const char *field, double *out, bool *present,
                             ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, field);
    *present = v && !cJSON_IsNull(v);
    if (!*present)
        return EKV_OK;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return bad_type(err, field, "a number");
    *out = v->valuedouble;
    return EKV_OK;
}

static ekv_status get_int(const cJSON *o, const char *field, double lo, double hi,
                          long long *out, bool *present, ekv_error *err)
{
    double d = 0;
    ekv_status rc = get_number(o, field, &d, present, err);
    if (rc || !*present)
        return rc;
    if (d != floor(d) || d < lo || d > hi)
        return bad_type(err, field, "an integer in range");
    *out = (long long)d;
    return EKV_OK;
}

static ekv_status get_bool(const cJSON *o, const char *field, bool *out, ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, field);
    if (!v || cJSON_IsNull(v))
        return EKV_OK;
    if (!cJSON_IsBool(v))
        return bad_type(err, field, "a boolean");
    *out = cJSON_IsTrue(v);
    return EKV_OK;
}

static ekv_status parse_stop(oai_request *r, ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->json, "stop");
    if (!v || cJSON_IsNull(v))
        return EKV_OK;
    if (cJSON_IsString(v)) {
        r->stops = calloc(1, sizeof *r->stops);
        if (!r->stops)
            return ekv_error_set(err, EKV_ENOMEM, "out of memory");
        r->stops[0] = v->valuestring;
        r->r.params.stops = r->stops;
        r->r.params.n_stops = 1;
        return EKV_OK;
    }
    if (!cJSON_IsArray(v))
        return bad_type(err, "stop", "a string or an array of strings");
    int n = cJSON_GetArraySize(v);
    if (n > COORD_MAX_STOPS)
        return ekv_error_set(err, EKV_EINVAL, "at most %d stop strings, got %d", COORD_MAX_STOPS,
                             n);
    r->stops = calloc((size_t)n + 1, sizeof *r->stops);
    if (!r->stops)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *s;
    cJSON_ArrayForEach(s, v)
    {
        if (!cJSON_IsString(s))
            return bad_type(err, "stop", "a string or an array of strings");
        r->stops[i++] = s->valuestring;
    }
    r->r.params.stops = r->stops;
    r->r.params.n_stops = (size_t)n;
    return EKV_OK;
}

/* A prompt of token ids: [1, 2, 3] (or [[1, 2, 3]] as lm-evaluation-harness
 * sends one); the coordinator checks them against the vocabulary. */
static ekv_status parse_prompt_ids(oai_request *r, const cJSON *v, ekv_error *err)
{
    const int n = cJSON_GetArraySize(v);
    if (!(r->ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *r->ids)))
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, v)
    {
        if (!cJSON_IsNumber(t) || t->valuedouble != floor(t->valuedouble) ||
            t->valuedouble < 0 || t->valuedouble > 2147483647.0)
            return bad_type(err, "prompt", "a string or an array of token ids");
        r->ids[i++] = (int32_t)t->valuedouble;
    }
    if (n == 0)
        return ekv_error_set(err, EKV_EINVAL, "prompt is empty");
    r->r.prompt_ids = r->ids;
    r->r.n_prompt_ids = (size_t)n;
    return EKV_OK;
}

static ekv_status parse_prompt(oai_request *r, ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->json, "prompt");
    if (v && cJSON_IsArray(v) && cJSON_GetArraySize(v) == 1 &&
        !cJSON_IsNumber(cJSON_GetArrayItem(v, 0)))
        v = cJSON_GetArrayItem(v, 0); /* ["text"] or [[ids]] as clients often send it */
    if (v && cJSON_IsArray(v) && cJSON_GetArraySize(v) > 0 &&
        !cJSON_IsNumber(cJSON_GetArrayItem(v, 0)))
        return ekv_error_set(err, EKV_EINVAL, "'prompt': only one prompt per request (n = 1)");
    if (v && cJSON_IsArray(v))
        return parse_prompt_ids(r, v, err);
    if (!v || cJSON_IsNull(v))
        return ekv_error_set(err, EKV_EINVAL, "prompt is empty");
    if (!cJSON_IsString(v))
        return bad_type(err, "prompt", "a string");
    r->r.prompt = v->valuestring;
    r->r.prompt_len = strlen(v->valuestring);
    return EKV_OK;
}

/* content: a string, null, or an array of {"type": "text", "text": ...}
 * parts, joined (the only part type a text model can take). */
static ekv_status message_content(cJSON *m, size_t i, const char **out, ekv_error *err)
{
    cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (!c || cJSON_IsNull(c)) {
        *out = "";
        return EKV_OK;
    }
    if (cJSON_IsString(c)) {
        *out = c->valuestring;
        return EKV_OK;
    }
    if (!cJSON_IsArray(c))
        return ekv_error_set(err, EKV_EINVAL, "messages[%zu].content must be a string", i);
    size_t len = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, c)
    {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(part, "text");
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(part, "type");
        if (!cJSON_IsString(t) || !cJSON_IsString(ty) || strcmp(ty->valuestring, "text"))
            return ekv_error_set(err, EKV_EINVAL,
                                 "messages[%zu].content parts must be {\"type\": \"text\"}", i);
        len += strlen(t->valuestring);
    }
    char *joined = malloc(len + 1), *p = joined;
    if (!joined)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    cJSON_ArrayForEach(part, c)
    {
        const char *t = cJSON_GetObjectItemCaseSensitive(part, "text")->valuestring;
        size_t n = strlen(t);
        memcpy(p, t, n);
        p += n;
    }
    *p = 0;
    /* the joined text replaces the array, so the JSON tree owns it */
    cJSON *s = cJSON_CreateString(joined);
    free(joined);
    if (!s || !cJSON_ReplaceItemInObjectCaseSensitive(m, "content", s)) {
        cJSON_Delete(s);
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    }
    *out = s->valuestring;
    return EKV_OK;
}

static ekv_status parse_messages(oai_request *r, ekv_error *err)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(r->json, "messages");
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0)
        return ekv_error_set(err, EKV_EINVAL, "'messages' must be a non-empty array");
    size_t n = (size_t)cJSON_GetArraySize(v);
    r->msgs = calloc(n, sizeof *r->msgs);
    if (!r->msgs)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    size_t i = 0;
    cJSON *m;
    cJSON_ArrayForEach(m, v)
    {
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsObject(m) || !cJSON_IsString(role))
            return ekv_error_set(err, EKV_EINVAL, "messages[%zu] needs a string 'role'", i);
        const cJSON *f;
        cJSON_ArrayForEach(f, m)
        {
            if (strcmp(f->string, "role") && strcmp(f->string, "content") && !cJSON_IsNull(f))
                return ekv_error_set(err, EKV_EINVAL,
                                     "messages[%zu].%s is not supported (role and content are)",
                                     i, f->string);
        }
        r->msgs[i].role = role->valuestring;
        ekv_status rc = message_content(m, i, &r->msgs[i].content, err);
        if (rc)
            return rc;
        i++;
    }
    r->r.messages = r->msgs;
    r->r.n_messages = n;
    return EKV_OK;
}

static ekv_status parse_sampling(oai_request *r, ekv_error *err)
{
    const cJSON *o = r->json;
    ekv_sampler_params *sp = &r->r.params.sampling;
    double d;
    long long k;
    bool has;
    ekv_status rc;
    /* max_completion_tokens wins when set; null is not set */
    if ((rc = get_int(o, "max_tokens", -2147483648.0, 2147483647.0, &k, &has, err)))
        return rc;
    if (has)
        r->r.params.max_tokens = (int32_t)k;
    if (r->kind == OAI_CHAT &&
        (rc = get_int(o, "max_completion_tokens", -2147483648.0, 2147483647.0, &k, &has, err)))
        return rc;
    if (r->kind == OAI_CHAT && has)
        r->r.params.max_tokens = (int32_t)k;
    const struct {
        const char *name;
        float *dst;
    } floats[] = {{"temperature", &sp->temperature},       {"top_p", &sp->top_p},
                  {"min_p", &sp->min_p},                   {"repeat_penalty", &sp->repeat_penalty},
                  {"repetition_penalty", &sp->repeat_penalty},
                  {"presence_penalty", &sp->presence_penalty},
                  {"frequency_penalty", &sp->frequency_penalty}};
    for (size_t i = 0; i < sizeof floats / sizeof *floats; i++) {
        if ((rc = get_number(o, floats[i].name, &d, &has, err)))
            return rc;
        if (has)
            *floats[i].dst = (float)d;
    }
    if ((rc = get_int(o, "top_k", -2147483648.0, 2147483647.0, &k, &has, err)))
        return rc;
    if (has)
        sp->top_k = (int32_t)k;
    if ((rc = get_number(o, "seed", &d, &has, err)))
        return rc;
    if (has) {
        if (d != floor(d) || d < -9.2e18 || d >= 1.8e19)
            return bad_type(err, "seed", "an integer in range");
        sp->seed = d < 0 ? (uint64_t)(int64_t)d : (uint64_t)d;
    }
    return EKV_OK;
}

/* logit_bias: {"token id": bias in [-100, 100]}; the sampler checks the
 * values, the engine the ids against the vocabulary. */
static ekv_status parse_logit_bias(oai_request *r, ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->json, "logit_bias");
    if (!v || cJSON_IsNull(v))
        return EKV_OK;
    if (!cJSON_IsObject(v))
        return bad_type(err, "logit_bias", "an object of token id strings to numbers");
    const int n = cJSON_GetArraySize(v);
    if (n > EKV_MAX_LOGIT_BIAS)
        return ekv_error_set(err, EKV_EINVAL, "'logit_bias' holds at most %d entries, got %d",
                             EKV_MAX_LOGIT_BIAS, n);
    if (n == 0)
        return EKV_OK;
    if (!(r->bias = malloc((size_t)n * sizeof *r->bias)))
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    int i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, v)
    {
        char *end = NULL;
        const long id = strtol(e->string, &end, 10);
        if (!*e->string || *end || id < 0 || id > 2147483647L)
            return ekv_error_set(err, EKV_EINVAL, "'logit_bias' key '%.32s' is not a token id",
                                 e->string);
        if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble))
            return bad_type(err, "logit_bias", "an object of token id strings to numbers");
        r->bias[i++] = (ekv_logit_bias){(int32_t)id, (float)e->valuedouble};
    }
    r->r.params.sampling.logit_bias = r->bias;
    r->r.params.sampling.n_logit_bias = (size_t)n;
    return EKV_OK;
}

/* Completions: logprobs is the number of alternatives (0-5) and echo a
 * boolean; chat: logprobs a boolean and top_logprobs (0-20). */
static ekv_status parse_logprobs(oai_request *r, ekv_error *err)
{
    const cJSON *o = r->json;
    long long k = 0;
    bool has;
    ekv_status rc;
    if (r->kind == OAI_COMPLETIONS) {
        if ((rc = get_int(o, "logprobs", 0, 5, &k, &has, err)) ||
            (rc = get_bool(o, "echo", &r->echo, err)))
            return rc;
        r->logprobs = has;
    } else {
        if ((rc = get_bool(o, "logprobs", &r->logprobs, err)) ||
            (rc = get_int(o, "top_logprobs", 0, EKV_MAX_TOP_LOGPROBS, &k, &has, err)))
            return rc;
        if (has && !r->logprobs)
            return ekv_error_set(err, EKV_EINVAL, "'top_logprobs' needs 'logprobs': true");
    }
    r->top_logprobs = (int32_t)k;
    gen_params *p = &r->r.params;
    p->logprobs = r->logprobs;
    p->top_logprobs = r->top_logprobs;
    /* echo scores the prompt when asked for logprobs; with max_tokens 0 the
     * prompt's prefill is all there is to run */
    p->prompt_logprobs = r->echo && (r->logprobs || p->max_tokens == 0);
    return EKV_OK;
}

/* The fields each endpoint takes. Those marked (value) are honoured only
 * for some values, checked by refuse_values. */
static const char *const COMPLETION_FIELDS[] = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "user",
    "seed", "best_of", "suffix" /* (value) */,
    "top_k", "min_p", "repeat_penalty", "repetition_penalty", "kv_method", "kv_budget",
    "decode_method", "scope_recent", "scope_window", "spark_ratio", "spark_recovery",
    "recall", "recall_every", "recall_promote", "recall_gather", "ignore_eos", NULL};
static const char *const CHAT_FIELDS[] = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "stream", "stream_options", "logprobs", "top_logprobs", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "user", "seed", "response_format" /* (value) */,
    "tools" /* (value) */, "tool_choice" /* (value) */, "parallel_tool_calls" /* (value) */,
    "top_k", "min_p", "repeat_penalty", "repetition_penalty", "kv_method", "kv_budget",
    "decode_method", "scope_recent", "scope_window", "spark_ratio", "spark_recovery",
    "recall", "recall_every", "recall_promote", "recall_gather", "ignore_eos", NULL};

static ekv_status check_fields(const cJSON *o, const char *const *allowed, const char *what,
                               ekv_error *err)
{
    const cJSON *f;
    cJSON_ArrayForEach(f, o)
    {
        size_t i = 0;
        while (allowed[i] && strcmp(allowed[i], f->string))
            i++;
        if (!allowed[i])
            return ekv_error_set(err, EKV_EINVAL, "'%.64s' is not supported by %s", f->string,
                                 what);
    }
    return EKV_OK;
}

/* Fields entrokv takes only with some values (until the feature lands). */
static ekv_status refuse_values(const cJSON *o, oai_kind kind, ekv_error *err)
{
    const cJSON *v;
    if (kind == OAI_COMPLETIONS) {
        v = cJSON_GetObjectItemCaseSensitive(o, "suffix");
        if (v && !cJSON_IsNull(v) && !(cJSON_IsString(v) && !*v->valuestring))
            return ekv_error_set(err, EKV_EINVAL, "'suffix' is not supported");
        return EKV_OK;
    }
    /* response_format: parse_response_format, then grammar_get in the
     * coordinator, which refuses a schema it cannot honour by name */
    static const char *const tool_fields[] = {"tools", "tool_choice", "parallel_tool_calls"};
    for (size_t i = 0; i < 3; i++) {
        v = cJSON_GetObjectItemCaseSensitive(o, tool_fields[i]);
        const bool none = i == 1 && cJSON_IsString(v) && !strcmp(v->valuestring, "none");
        if (v && !cJSON_IsNull(v) && !none && !(i == 0 && cJSON_IsArray(v) &&
                                                 cJSON_GetArraySize(v) == 0))
            return ekv_error_set(err, EKV_EINVAL,
                                 "'%s': this model's chat template does not support tools "
                                 "(entrokv renders ChatML and Llama 3.0 templates, neither "
                                 "with tool definitions)",
                                 tool_fields[i]);
    }
    return EKV_OK;
}

static ekv_status parse_options(oai_request *r, ekv_error *err)
{
    const cJSON *o = r->json;
    ekv_status rc;
    bool has;
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(o, "user");
    if (u && !cJSON_IsNull(u) && !cJSON_IsString(u))
        return bad_type(err, "user", "a string");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(o, "model");
    if (model && !cJSON_IsNull(model) && !cJSON_IsString(model))
        return bad_type(err, "model", "a string");
    if ((rc = get_bool(o, "stream", &r->stream, err)) ||
        (rc = get_bool(o, "ignore_eos", &r->r.params.ignore_eos, err)))
        return rc;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(o, "stream_options");
    if (so && !cJSON_IsNull(so) && !cJSON_IsObject(so))
        return bad_type(err, "stream_options", "an object");
    if (so && !cJSON_IsNull(so) && !r->stream) /* as OpenAI answers it */
        return ekv_error_set(err, EKV_EINVAL,
                             "'stream_options' is only allowed when 'stream' is true");
    static const char *const so_fields[] = {"include_usage", NULL};
    if (cJSON_IsObject(so) &&
        ((rc = check_fields(so, so_fields, "stream_options", err)) ||
         (rc = get_bool(so, "include_usage", &r->include_usage, err))))
        return rc;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "kv_method");
    if (m && !cJSON_IsNull(m)) {
        if (!cJSON_IsString(m))
            return bad_type(err, "kv_method", "a string");
        r->r.kv_method = m->valuestring;
    }
    double b;
    if ((rc = get_number(o, "kv_budget", &b, &has, err)))
        return rc;
    if (has)
        r->r.kv_budget = b;
    static const char *const strs[] = {"decode_method", "spark_recovery"};
    const char **dst[] = {&r->r.decode_method, &r->r.spark_recovery};
    for (int i = 0; i < 2; i++) {
        const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, strs[i]);
        if (s && !cJSON_IsNull(s) && !cJSON_IsString(s))
            return bad_type(err, strs[i], "a string");
        if (cJSON_IsString(s))
            *dst[i] = s->valuestring;
    }
    static const char *const ints[] = {"scope_recent", "scope_window"};
    int32_t *idst[] = {&r->r.scope_recent, &r->r.scope_window};
    for (int i = 0; i < 2; i++) {
        if ((rc = get_number(o, ints[i], &b, &has, err)))
            return rc;
        if (has && (b != floor(b) || b < 1 || b > (1 << 24)))
            return ekv_error_set(err, EKV_EINVAL, "%s must be a whole number in [1, %d]",
                                 ints[i], 1 << 24);
        if (has)
            *idst[i] = (int32_t)b;
    }
    if ((rc = get_number(o, "spark_ratio", &b, &has, err)))
        return rc;
    if (has)
        r->r.spark_ratio = b;
    if ((rc = get_number(o, "recall", &b, &has, err)))
        return rc;
    if (has && (b != floor(b) || b < 0 || b > KVC_RECALL_MAX))
        return ekv_error_set(err, EKV_EINVAL, "recall must be a whole number in [0, %d]",
                             KVC_RECALL_MAX);
    if (has)
        r->r.recall = (int32_t)b;
    if ((rc = get_number(o, "recall_every", &b, &has, err)))
        return rc;
    if (has && (b != floor(b) || b < 0 || b > KV_RECALL_EVERY_MAX))
        return ekv_error_set(err, EKV_EINVAL, "recall_every must be a whole number in [0, %d]",
                             KV_RECALL_EVERY_MAX);
    if (has)
        r->r.recall_every = (int32_t)b;
    bool promote = true;
    if ((rc = get_bool(o, "recall_promote", &promote, err)))
        return rc;
    r->r.recall_no_promote = !promote;
    if ((rc = get_number(o, "recall_gather", &b, &has, err)))
        return rc;
    if (has && (b != floor(b) || b < 0 || b > KV_RECALL_GATHER_MAX))
        return ekv_error_set(err, EKV_EINVAL,
                             "recall_gather must be a whole number in [0, %d] (0: whole blocks)",
                             KV_RECALL_GATHER_MAX);
    if (has) /* absent: coord_request_init's default */
        r->r.recall_gather = (int32_t)b;
    return EKV_OK;
}

/* response_format goes on as compact JSON text; the coordinator compiles
 * it (grammar_get, cached by that text) and refuses what it cannot honour. */
static ekv_status parse_response_format(oai_request *r, ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->json, "response_format");
    if (!v || cJSON_IsNull(v))
        return EKV_OK;
    if (!cJSON_IsObject(v))
        return bad_type(err, "response_format", "an object");
    if (!(r->response_format = cJSON_PrintUnformatted(v)))
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    r->r.response_format = r->response_format;
    r->r.response_format_len = strlen(r->response_format);
    return EKV_OK;
}

/* n choices, and for completions best_of: best_of are generated (with
 * their log-probabilities, which rank them) and the n with the highest
 * cumulative logprob returned. Like OpenAI: best_of >= n, not streamed. */
static ekv_status parse_choices(oai_request *r, ekv_error *err)
{
    long long n = 1, best_of = 1;
    bool has_n = false, has_best = false;
    ekv_status rc;
    if ((rc = get_int(r->json, "n", -1e9, 1e9, &n, &has_n, err)) ||
        (r->kind == OAI_COMPLETIONS &&
         (rc = get_int(r->json, "best_of", -1e9, 1e9, &best_of, &has_best, err))))
        return rc;
    if (n < 1 || n > COORD_MAX_N)
        return ekv_error_set(err, EKV_EINVAL, "'n' must be in [1, %d], got %lld", COORD_MAX_N, n);
    if (!has_best)
        best_of = n;
    if (best_of < 1 || best_of > COORD_MAX_N)
        return ekv_error_set(err, EKV_EINVAL, "'best_of' must be in [1, %d], got %lld",
                             COORD_MAX_N, best_of);
    if (best_of < n)
        return ekv_error_set(err, EKV_EINVAL, "'best_of' (%lld) must be at least 'n' (%lld)",
                             best_of, n);
    if (best_of > n && r->stream)
        return ekv_error_set(err, EKV_EINVAL, "'best_of' cannot be used with 'stream' "
                                              "(the best are known only at the end)");
    r->n = (int32_t)n;
    r->best_of = best_of > n ? (int32_t)best_of : 1;
    r->r.n = r->best_of > 1 ? r->best_of : r->n;
    if (r->best_of > 1)
        r->r.params.logprobs = true; /* what ranks them; shown only if asked for */
    return EKV_OK;
}

ekv_status oai_parse(ekv_coordinator *c, oai_kind kind, const char *body, size_t len,
                     oai_request *r, ekv_error *err)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    coord_request_init(c, &r->r);
    r->r.protocol = "http";
    r->tok = c->tok;
    ekv_status prc = json_strict_parse(body, len, &r->json, err);
    if (prc)
        return prc;
    if (!cJSON_IsObject(r->json))
        return ekv_error_set(err, EKV_EINVAL, "the body must be a JSON object");
    ekv_status rc = kind == OAI_CHAT ? check_fields(r->json, CHAT_FIELDS, "/v1/chat/completions", err)
                                     : check_fields(r->json, COMPLETION_FIELDS, "/v1/completions",
                                                    err);
    if (rc == EKV_OK)
        rc = refuse_values(r->json, kind, err);
    if (rc == EKV_OK)
        rc = kind == OAI_CHAT ? parse_messages(r, err) : parse_prompt(r, err);
    if (rc == EKV_OK)
        rc = parse_sampling(r, err);
    if (rc == EKV_OK)
        rc = parse_stop(r, err);
    if (rc == EKV_OK)
        rc = parse_options(r, err);
    if (rc == EKV_OK)
        rc = parse_response_format(r, err);
    if (rc == EKV_OK)
        rc = parse_logit_bias(r, err);
    if (rc == EKV_OK)
        rc = parse_logprobs(r, err);
    if (rc == EKV_OK)
        rc = parse_choices(r, err);
    return rc;
}

void oai_request_free(oai_request *r)
{
    cJSON_Delete(r->json);
    free(r->msgs);
    free(r->stops);
    free(r->response_format);
    free(r->ids);
    free(r->bias);
    memset(r, 0, sizeof *r);
}
