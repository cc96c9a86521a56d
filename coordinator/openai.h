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
    const ekv_tokenizer *tok;
    cJSON *json;
    tok_message *msgs;
    const char **stops;
    char *response_format; /* response_format printed back to JSON text */
    int32_t *ids;          /* a prompt given as token ids */
    ekv_logit_bias *bias;
} oai_request;

/* What the response JSON needs besides the text, and the log-probabilities
 * collected so far (oai_meta_collect). */
typedef struct oai_meta {
    oai_kind kind;
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
 * unsupported values (n != 1). Free with oai_request_free either way. */
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

/* Each returns malloc'd NUL-terminated JSON, NULL when out of memory. */
char *oai_error_json(const char *message, const char *type);
char *oai_response_json(const oai_meta *m, const char *text, const coord_chunk *done);
/* One streamed chunk: ch's text and log-probabilities (ch may be NULL) and,
 * when ch->done is set, its finish_reason. role_chunk: the chat stream's
 * first chunk (role only). The first chunk of an echo carries the prompt. */
char *oai_chunk_json(oai_meta *m, const coord_chunk *ch, bool role_chunk);
/* Whether ch has anything a chunk would carry (text, log-probabilities, the
 * echo still to send, the finish). */
bool oai_chunk_wanted(const oai_meta *m, const coord_chunk *ch);
/* The final usage-only chunk (stream_options.include_usage). */
char *oai_usage_chunk_json(const oai_meta *m, const coord_chunk *done);

#endif
