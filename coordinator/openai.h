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
    cJSON *json;
    tok_message *msgs;
    const char **stops;
} oai_request;

/* What the response JSON needs besides the text. */
typedef struct oai_meta {
    oai_kind kind;
    char id[48];           /* "cmpl-N" / "chatcmpl-N" */
    long long created;     /* unix seconds */
    const char *model;
} oai_meta;

/* Parses and type-checks body into r (values are checked later by
 * coord_submit). EKV_EINVAL with a message for malformed JSON, wrong types,
 * unsupported options (n != 1). Free with oai_request_free either way. */
ekv_status oai_parse(ekv_coordinator *c, oai_kind kind, const char *body, size_t len,
                     oai_request *r, ekv_error *err);
void oai_request_free(oai_request *r);

/* The OpenAI finish_reason: "stop" or "length" (a full context is "length"). */
const char *oai_finish_reason(gen_finish f);

/* Each returns malloc'd NUL-terminated JSON, NULL when out of memory. */
char *oai_error_json(const char *message, const char *type);
char *oai_response_json(const oai_meta *m, const char *text, const coord_chunk *done);
/* One streamed chunk: text (may be NULL) and, when done is set, its
 * finish_reason. role_chunk: the chat stream's first chunk (role only). */
char *oai_chunk_json(const oai_meta *m, const char *text, const coord_chunk *done,
                     bool role_chunk);
/* The final usage-only chunk (stream_options.include_usage). */
char *oai_usage_chunk_json(const oai_meta *m, const coord_chunk *done);

#endif
