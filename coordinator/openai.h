/*
 * openai.h - the OpenAI-compatible JSON of /v1/completions and
 * /v1/chat/completions: request bodies to coord_request, results and SSE
 * chunks to JSON text. Private to coordinator/ (http.c is its one user).
 */
#ifndef ENTROKV_OPENAI_H
#define ENTROKV_OPENAI_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "entrokv/coordinator.h"

typedef enum oai_kind { OAI_COMPLETIONS, OAI_CHAT } oai_kind;

typedef struct oai_request {
    oai_kind kind;
    coord_request r;       /* strings point into json */
    bool stream;
    bool include_usage;    /* stream_options.include_usage */
    bool echo;             /* completions: the prompt comes back before the completion */
    bool logprobs;         /* log-probabilities in the response */
    int32_t top_logprobs;  /* alternatives per token (completions: its `logprobs`) */
    int32_t n;             /* choices in the response */
    int32_t best_of;       /* completions: choices generated (r.n), the n with the highest
                            * cumulative logprob returned; 1 when not asked for */
    const ekv_tokenizer *tok;
    cJSON *json;
    tok_message *msgs;
    const char **stops;
    char *response_format; /* response_format printed back to JSON text */
    int32_t *ids;          /* a prompt given as token ids */
    ekv_logit_bias *bias;
} oai_request;

/* What the response JSON of one choice needs besides the text, and the
 * log-probabilities collected so far (oai_meta_collect). */
typedef struct oai_meta {
    oai_kind kind;
    int32_t index;         /* the choice's index in the response */
    char id[48];           /* "cmpl-N" / "chatcmpl-N" */
    long long created;     /* unix seconds */
    const char *model;
    bool logprobs, echo;
    int32_t top_logprobs;
    const ekv_tokenizer *tok;
    char *echo_text;       /* the prompt's text (echo), malloc'd */
    bool echo_sent;        /* streamed already */
    size_t offset;         /* text_offset of the next token (completions) */
    ekv_logprob *lps;      /* collected: the prompt's (echo), then the generated */
    int32_t n_lps, cap_lps;
} oai_meta;

/* Parses and type-checks body into r (values are checked later by
 * coord_submit). EKV_EINVAL with a message naming the field for malformed
 * JSON, wrong types, a field the endpoint does not have or entrokv does
 * not support (the allow-lists in openai.c and docs/serving.md), and
 * unsupported values (n or best_of outside [1, COORD_MAX_N], best_of < n
 * or with stream). Free with oai_request_free either way. */
ekv_status oai_parse(ekv_coordinator *c, oai_kind kind, const char *body, size_t len,
                     oai_request *r, ekv_error *err);
void oai_request_free(oai_request *r);

/* Copies r's response options into m (after m's id, created and model are
 * set); false when out of memory. oai_meta_free releases what it holds. */
bool oai_meta_set(oai_meta *m, const oai_request *r);
void oai_meta_free(oai_meta *m);
/* Appends ch's log-probabilities (prompt first) for oai_response_json;
 * false when out of memory. */
bool oai_meta_collect(oai_meta *m, const coord_chunk *ch);

/* The OpenAI finish_reason: "stop" or "length" (a full context is "length"). */
const char *oai_finish_reason(gen_finish f);

/* Adds a choice's usage u into the request's sum: the prompt once (first:
 * u is the first choice's), completion tokens and KV bytes of every
 * choice, as OpenAI counts n and best_of. */
void oai_usage_add(engine_usage *sum, const engine_usage *u, bool first);
/* The choice's cumulative log-probability: the sum over its sampled
 * tokens' (the end-of-generation token's included), what best_of ranks by. */
double oai_cumulative_logprob(const oai_meta *m);
/* best_of: order[0..n) gets the indices of the n of the best_of choices
 * with the highest cumulative logprob, best first (ties: lower index). */
void oai_best_of(const oai_meta *m, int32_t best_of, int32_t n, int32_t *order);

/* Each returns malloc'd NUL-terminated JSON, NULL when out of memory. */
char *oai_error_json(const char *message, const char *type);
/* The whole response of n choices: m[i], text[i] and done[i] are choice i's
 * (its index is m[i].index); usage the request's sum (oai_usage_add). */
char *oai_response_json(const oai_meta *m, const char *const *text, const coord_chunk *done,
                        int32_t n, const engine_usage *usage);
/* One streamed chunk of choice m->index: ch's text and log-probabilities
 * (ch may be NULL) and, when ch->done is set, its finish_reason.
 * role_chunk: the choice's first chunk in a chat stream (role only). The
 * first chunk of an echo carries the prompt. */
char *oai_chunk_json(oai_meta *m, const coord_chunk *ch, bool role_chunk);
/* Whether ch has anything a chunk would carry (text, log-probabilities, the
 * echo still to send, the finish). */
bool oai_chunk_wanted(const oai_meta *m, const coord_chunk *ch);
/* The final usage-only chunk (stream_options.include_usage): the sum. */
char *oai_usage_chunk_json(const oai_meta *m, const engine_usage *usage);

#endif
