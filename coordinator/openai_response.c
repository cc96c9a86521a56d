/*
 * openai_response.c - OpenAI response JSON (see openai.h): whole responses,
 * streamed chunks, usage, errors, and the log-probabilities collected for
 * them (oai_meta). Parsing requests is openai.c.
 */
#include "openai.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

static void add_usage(cJSON *o, const engine_usage *usage)
{
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", usage->prompt_tokens);
    cJSON_AddNumberToObject(u, "completion_tokens", usage->completion_tokens);
    cJSON_AddNumberToObject(u, "total_tokens", usage->prompt_tokens + usage->completion_tokens);
    cJSON_AddNumberToObject(u, "kv_bytes", (double)usage->kv_bytes);
    cJSON_AddNumberToObject(u, "kv_bytes_full", (double)usage->kv_bytes_full);
}

void oai_usage_add(engine_usage *sum, const engine_usage *u, bool first)
{
    if (first)
        sum->prompt_tokens = u->prompt_tokens;
    sum->completion_tokens += u->completion_tokens;
    sum->kv_bytes += u->kv_bytes;
    sum->kv_bytes_full += u->kv_bytes_full;
}

double oai_cumulative_logprob(const oai_meta *m)
{
    double sum = 0;
    for (int32_t i = 0; i < m->n_lps; i++)
        if (!isnan(m->lps[i].logprob)) /* (a prompt's first token; never with best_of) */
            sum += (double)m->lps[i].logprob;
    return sum;
}

void oai_best_of(const oai_meta *m, int32_t best_of, int32_t n, int32_t *order)
{
    int32_t idx[COORD_MAX_N];
    double score[COORD_MAX_N];
    const int32_t k = best_of < COORD_MAX_N ? best_of : COORD_MAX_N;
    for (int32_t i = 0; i < k; i++) {
        idx[i] = i;
        score[i] = oai_cumulative_logprob(&m[i]);
    }
    /* insertion sort, best first; equal scores keep the lower index first */
    for (int32_t i = 1; i < k; i++)
        for (int32_t j = i; j > 0 && score[idx[j]] > score[idx[j - 1]]; j--) {
            int32_t t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    for (int32_t i = 0; i < n && i < k; i++)
        order[i] = idx[i];
}

/* ---- log-probabilities ---- */

bool oai_meta_set(oai_meta *m, const oai_request *r)
{
    m->logprobs = r->logprobs;
    m->top_logprobs = r->top_logprobs;
    m->echo = r->echo;
    m->tok = r->tok;
    if (!r->echo)
        return true;
    size_t len = r->r.prompt ? r->r.prompt_len : 0;
    for (size_t i = 0; !r->r.prompt && i < r->r.n_prompt_ids; i++) {
        const char *piece = tok_piece(r->tok, r->r.prompt_ids[i], NULL);
        len += piece ? strlen(piece) : 0;
    }
    if (!(m->echo_text = malloc(len + 1)))
        return false;
    if (r->r.prompt) {
        memcpy(m->echo_text, r->r.prompt, len);
    } else {
        char *p = m->echo_text;
        for (size_t i = 0; i < r->r.n_prompt_ids; i++) {
            const char *piece = tok_piece(r->tok, r->r.prompt_ids[i], NULL);
            const size_t n = piece ? strlen(piece) : 0;
            memcpy(p, piece ? piece : "", n);
            p += n;
        }
    }
    m->echo_text[len] = 0;
    return true;
}

void oai_meta_free(oai_meta *m)
{
    free(m->echo_text);
    free(m->lps);
    m->echo_text = NULL;
    m->lps = NULL;
    m->n_lps = m->cap_lps = 0;
}

static bool meta_append(oai_meta *m, const ekv_logprob *lp, int32_t n)
{
    if (n <= 0)
        return true;
    if (m->n_lps + n > m->cap_lps) {
        int32_t cap = m->cap_lps ? m->cap_lps : 64;
        while (cap < m->n_lps + n)
            cap *= 2;
        ekv_logprob *p = realloc(m->lps, (size_t)cap * sizeof *p);
        if (!p)
            return false;
        m->lps = p;
        m->cap_lps = cap;
    }
    memcpy(m->lps + m->n_lps, lp, (size_t)n * sizeof *lp);
    m->n_lps += n;
    return true;
}

bool oai_meta_collect(oai_meta *m, const coord_chunk *ch)
{
    return meta_append(m, ch->prompt_lps, ch->n_prompt_lps) && meta_append(m, ch->lps, ch->n_lps);
}

/* A token as JSON text: its bytes when they are valid UTF-8 without NUL,
 * else "bytes:\\xNN..." as OpenAI writes part of a character. */
static cJSON *token_string(const oai_meta *m, int32_t id)
{
    size_t len = 0;
    const char *p = tok_piece(m->tok, id, &len);
    if (!p)
        return cJSON_CreateString("");
    if (strlen(p) == len && coord_utf8_valid(p, len))
        return cJSON_CreateString(p);
    char buf[6 + 4 * 64 + 1] = "bytes:";
    size_t o = 6;
    for (size_t i = 0; i < len && o + 4 < sizeof buf; i++)
        o += (size_t)snprintf(buf + o, sizeof buf - o, "\\x%02x", (unsigned char)p[i]);
    return cJSON_CreateString(buf);
}

static cJSON *token_bytes(const oai_meta *m, int32_t id)
{
    size_t len = 0;
    const char *p = tok_piece(m->tok, id, &len);
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; p && i < len; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((unsigned char)p[i]));
    return a;
}

/* NaN (the prompt's first token) is null; -inf, which JSON cannot carry,
 * is OpenAI's -9999. */
static cJSON *lp_number(float v)
{
    if (isnan(v))
        return cJSON_CreateNull();
    return cJSON_CreateNumber(v < -9999.0f ? -9999.0 : (double)v);
}

/* The legacy completions shape: parallel arrays; top_logprobs maps token
 * text to logprob, with the chosen token added when not among the best, as
 * OpenAI does ("up to logprobs + 1 elements"). */
static cJSON *completion_logprobs(oai_meta *m, const ekv_logprob *const *lists,
                                  const int32_t *counts, int n_lists)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *tokens = cJSON_AddArrayToObject(o, "tokens");
    cJSON *lps = cJSON_AddArrayToObject(o, "token_logprobs");
    cJSON *tops = cJSON_AddArrayToObject(o, "top_logprobs");
    cJSON *offs = cJSON_AddArrayToObject(o, "text_offset");
    for (int l = 0; l < n_lists; l++)
        for (int32_t i = 0; i < counts[l]; i++) {
            const ekv_logprob *lp = &lists[l][i];
            cJSON_AddItemToArray(tokens, token_string(m, lp->token));
            cJSON_AddItemToArray(lps, lp_number(lp->logprob));
            cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)m->offset));
            size_t len = 0;
            tok_piece(m->tok, lp->token, &len);
            m->offset += len;
            if (isnan(lp->logprob)) {
                cJSON_AddItemToArray(tops, cJSON_CreateNull());
                continue;
            }
            cJSON *top = cJSON_CreateObject();
            bool chosen = false;
            for (int32_t j = 0; j < lp->n_top && j < m->top_logprobs; j++) {
                cJSON *k = token_string(m, lp->top_ids[j]);
                cJSON_AddItemToObject(top, k->valuestring, lp_number(lp->top_logprobs[j]));
                cJSON_Delete(k);
                chosen |= lp->top_ids[j] == lp->token;
            }
            if (!chosen) {
                cJSON *k = token_string(m, lp->token);
                cJSON_AddItemToObject(top, k->valuestring, lp_number(lp->logprob));
                cJSON_Delete(k);
            }
            cJSON_AddItemToArray(tops, top);
        }
    return o;
}

/* The chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}. */
static cJSON *chat_logprobs(const oai_meta *m, const ekv_logprob *lp, int32_t n)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *content = cJSON_AddArrayToObject(o, "content");
    for (int32_t i = 0; i < n; i++) {
        cJSON *e = cJSON_CreateObject();
        cJSON_AddItemToObject(e, "token", token_string(m, lp[i].token));
        cJSON_AddItemToObject(e, "logprob", lp_number(lp[i].logprob));
        cJSON_AddItemToObject(e, "bytes", token_bytes(m, lp[i].token));
        cJSON *tops = cJSON_AddArrayToObject(e, "top_logprobs");
        for (int32_t j = 0; j < lp[i].n_top && j < m->top_logprobs; j++) {
            cJSON *t = cJSON_CreateObject();
            cJSON_AddItemToObject(t, "token", token_string(m, lp[i].top_ids[j]));
            cJSON_AddItemToObject(t, "logprob", lp_number(lp[i].top_logprobs[j]));
            cJSON_AddItemToObject(t, "bytes", token_bytes(m, lp[i].top_ids[j]));
            cJSON_AddItemToArray(tops, t);
        }
        cJSON_AddItemToArray(content, e);
    }
    cJSON_AddNullToObject(o, "refusal");
    return o;
}

/* ---- responses ---- */

/* text with the echoed prompt in front (NULL when out of memory). */
static char *with_echo(const char *echo, const char *text, size_t text_len)
{
    const size_t a = echo ? strlen(echo) : 0;
    char *s = malloc(a + text_len + 1);
    if (!s)
        return NULL;
    if (a)
        memcpy(s, echo, a);
    if (text_len)
        memcpy(s + a, text, text_len);
    s[a + text_len] = 0;
    return s;
}

/* One choice of a whole response. */
static cJSON *response_choice(const oai_meta *cm, const char *text, const coord_chunk *done)
{
    oai_meta m = *cm; /* the text offsets count in the copy */
    m.offset = 0;
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddNumberToObject(ch, "index", m.index);
    if (m.kind == OAI_CHAT) {
        cJSON *msg = cJSON_AddObjectToObject(ch, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        cJSON_AddStringToObject(msg, "content", text ? text : "");
        if (m.logprobs)
            cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(&m, m.lps, m.n_lps));
        else
            cJSON_AddNullToObject(ch, "logprobs");
    } else {
        char *full = with_echo(m.echo ? m.echo_text : NULL, text, text ? strlen(text) : 0);
        cJSON_AddStringToObject(ch, "text", full ? full : "");
        free(full);
        const ekv_logprob *lists[1] = {m.lps};
        const int32_t counts[1] = {m.n_lps};
        if (m.logprobs)
            cJSON_AddItemToObject(ch, "logprobs", completion_logprobs(&m, lists, counts, 1));
        else
            cJSON_AddNullToObject(ch, "logprobs");
    }
    cJSON_AddStringToObject(ch, "finish_reason", oai_finish_reason(done->finish));
    return ch;
}

char *oai_response_json(const oai_meta *m, const char *const *text, const coord_chunk *done,
                        int32_t n, const engine_usage *usage)
{
    cJSON *o = base_object(&m[0], m[0].kind == OAI_CHAT ? "chat.completion" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    for (int32_t i = 0; i < n; i++)
        cJSON_AddItemToArray(choices, response_choice(&m[i], text[i], &done[i]));
    add_usage(o, usage);
    return print_and_delete(o);
}

bool oai_chunk_wanted(const oai_meta *m, const coord_chunk *ch)
{
    return ch->text_len > 0 || ch->done || (m->echo && !m->echo_sent) ||
           (m->logprobs && (ch->n_lps > 0 || (ch->n_prompt_lps > 0 && m->kind != OAI_CHAT)));
}

char *oai_chunk_json(oai_meta *m, const coord_chunk *c, bool role_chunk)
{
    bool chat = m->kind == OAI_CHAT;
    const char *text = c && c->text ? c->text : "";
    cJSON *o = base_object(m, chat ? "chat.completion.chunk" : "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *ch = cJSON_CreateObject();
    cJSON_AddItemToArray(choices, ch);
    cJSON_AddNumberToObject(ch, "index", m->index);
    if (chat) {
        cJSON *delta = cJSON_AddObjectToObject(ch, "delta");
        if (role_chunk)
            cJSON_AddStringToObject(delta, "role", "assistant");
        if (role_chunk || *text)
            cJSON_AddStringToObject(delta, "content", text);
        if (m->logprobs && c && c->n_lps > 0)
            cJSON_AddItemToObject(ch, "logprobs", chat_logprobs(m, c->lps, c->n_lps));
        else
            cJSON_AddNullToObject(ch, "logprobs");
    } else {
        const bool echo = m->echo && !m->echo_sent;
        m->echo_sent = true;
        char *full = with_echo(echo ? m->echo_text : NULL, text, c ? c->text_len : 0);
        cJSON_AddStringToObject(ch, "text", full ? full : "");
        free(full);
        if (m->logprobs && c && (c->n_lps > 0 || c->n_prompt_lps > 0)) {
            const ekv_logprob *lists[2] = {c->prompt_lps, c->lps};
            const int32_t counts[2] = {c->n_prompt_lps, c->n_lps};
            cJSON_AddItemToObject(ch, "logprobs", completion_logprobs(m, lists, counts, 2));
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
    }
    if (c && c->done)
        cJSON_AddStringToObject(ch, "finish_reason", oai_finish_reason(c->finish));
    else
        cJSON_AddNullToObject(ch, "finish_reason");
    return print_and_delete(o);
}

char *oai_usage_chunk_json(const oai_meta *m, const engine_usage *usage)
{
    cJSON *o = base_object(m, m->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion");
    cJSON_AddArrayToObject(o, "choices");
    add_usage(o, usage);
    return print_and_delete(o);
}
