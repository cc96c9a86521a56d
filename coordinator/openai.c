/*
 * openai.c - OpenAI-compatible request parsing and response JSON (see
 * openai.h). Field names and shapes follow OpenAI's legacy completions and
 * chat completions APIs so the official clients work unchanged; entrokv's
 * extra fields (top_k, min_p, repeat_penalty, kv_method, kv_budget,
 * ignore_eos) sit beside them in the same body. Fields OpenAI defines that
 * entrokv does not use (frequency_penalty, user, ...) are ignored.
 */
#include "openai.h"

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

static ekv_status parse_prompt(oai_request *r, ekv_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->json, "prompt");
    if (v && cJSON_IsArray(v) && cJSON_GetArraySize(v) == 1)
        v = cJSON_GetArrayItem(v, 0); /* ["text"] as clients often send it */
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
    const char *max_field = r->kind == OAI_CHAT && cJSON_GetObjectItemCaseSensitive(
                                                       o, "max_completion_tokens")
                                ? "max_completion_tokens"
                                : "max_tokens";
    if ((rc = get_int(o, max_field, -2147483648.0, 2147483647.0, &k, &has, err)))
        return rc;
    if (has)
        r->r.params.max_tokens = (int32_t)k;
    const struct {
        const char *name;
        float *dst;
    } floats[] = {{"temperature", &sp->temperature},       {"top_p", &sp->top_p},
                  {"min_p", &sp->min_p},                   {"repeat_penalty", &sp->repeat_penalty},
                  {"repetition_penalty", &sp->repeat_penalty}};
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

static ekv_status parse_options(oai_request *r, ekv_error *err)
{
    const cJSON *o = r->json;
    ekv_status rc;
    long long n = 1;
    bool has;
    if ((rc = get_int(o, "n", -1e9, 1e9, &n, &has, err)))
        return rc;
    if (n != 1)
        return ekv_error_set(err, EKV_EINVAL, "only n = 1 is supported");
    if ((rc = get_bool(o, "stream", &r->stream, err)) ||
        (rc = get_bool(o, "ignore_eos", &r->r.params.ignore_eos, err)))
        return rc;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(o, "stream_options");
    if (cJSON_IsObject(so) && (rc = get_bool(so, "include_usage", &r->include_usage, err)))
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
    return EKV_OK;
}

ekv_status oai_parse(ekv_coordinator *c, oai_kind kind, const char *body, size_t len,
                     oai_request *r, ekv_error *err)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    coord_request_init(c, &r->r);
    r->r.protocol = "http";
    r->json = cJSON_ParseWithLength(body, len);
    if (!r->json)
        return ekv_error_set(err, EKV_EINVAL, "the body is not valid JSON");
    if (!cJSON_IsObject(r->json))
        return ekv_error_set(err, EKV_EINVAL, "the body must be a JSON object");
    ekv_status rc = kind == OAI_CHAT ? parse_messages(r, err) : parse_prompt(r, err);
    if (rc == EKV_OK)
        rc = parse_sampling(r, err);
    if (rc == EKV_OK)
        rc = parse_stop(r, err);
    if (rc == EKV_OK)
        rc = parse_options(r, err);
    return rc;
}

void oai_request_free(oai_request *r)
{
    cJSON_Delete(r->json);
    free(r->msgs);
    free(r->stops);
    memset(r, 0, sizeof *r);
}

/* ---- responses ---- */

const char *oai_finish_reason(gen_finish f)
{
    return f == GEN_FINISH_LENGTH || f == GEN_FINISH_CONTEXT ? "length" : "stop";
}

static char *print_and_delete(cJSON *o)
{
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

char *oai_error_json(const char *message, const char *type)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *e = cJSON_AddObjectToObject(o, "error");
    cJSON_AddStringToObject(e, "message", message ? message : "");
    cJSON_AddStringToObject(e, "type", type);
    cJSON_AddNullToObject(e, "param");
    cJSON_AddNullToObject(e, "code");
    return print_and_delete(o);
}

static cJSON *base_object(const oai_meta *m, const char *object)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", m->id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddNumberToObject(o, "created", (double)m->created);
    cJSON_AddStringToObject(o, "model", m->model);
    return o;
}

static void add_usage(cJSON *o, const coord_chunk *done)
{
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", done->usage.prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", done->usage.completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens",
                            done->usage.prompt_tokens + done->usage.completion_tokens);
    cJSON_AddNumberToObject(u, "kv_bytes", (double)done->usage.kv_bytes);
    cJSON_AddNumberToObject(u, "kv_bytes_full", (double)done->usage.kv_bytes_full);
}

char *oai_response_json(const oai_meta *m, const char *text, const coord_chunk *done)
{
    bool chat = m->kind == OAI_CHAT;
    cJSON *o = base_object(m, chat ? "chat.completion" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", 0);
    if (chat) {
        cJSON *msg = cJSON_AddObjectToObject(ch, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        cJSON_AddStringToObject(msg, "content", text ? text : "");
    } else {
        cJSON_AddStringToObject(ch, "text", text ? text : "");
        cJSON_AddNullToObject(ch, "logprobs");
    }
    cJSON_AddStringToObject(ch, "finish_reason", oai_finish_reason(done->finish));
    add_usage(o, done);
    return print_and_delete(o);
}

char *oai_chunk_json(const oai_meta *m, const char *text, const coord_chunk *done,
                     bool role_chunk)
{
    bool chat = m->kind == OAI_CHAT;
    cJSON *o = base_object(m, chat ? "chat.completion.chunk" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", 0);
    if (chat) {
        cJSON *delta = cJSON_AddObjectToObject(ch, "delta");
        if (role_chunk)
            cJSON_AddStringToObject(delta, "role", "assistant");
        if (role_chunk || (text && *text))
            cJSON_AddStringToObject(delta, "content", text ? text : "");
    } else {
        cJSON_AddStringToObject(ch, "text", text ? text : "");
        cJSON_AddNullToObject(ch, "logprobs");
    }
    if (done)
        cJSON_AddStringToObject(ch, "finish_reason", oai_finish_reason(done->finish));
    else
        cJSON_AddNullToObject(ch, "finish_reason");
    return print_and_delete(o);
}

char *oai_usage_chunk_json(const oai_meta *m, const coord_chunk *done)
{
    cJSON *o = base_object(m, m->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion");
    cJSON_AddArrayToObject(o, "choices");
    add_usage(o, done);
    return print_and_delete(o);
}
