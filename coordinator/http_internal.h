/*
 * http_internal.h - what http.c (the server: MHD callbacks, framing, the
 * API key, routes, lifecycle) shares with http_completion.c (the completion
 * replies: SSE streams and whole responses). Not a public interface.
 */
#ifndef EKV_HTTP_INTERNAL_H
#define EKV_HTTP_INTERNAL_H

#include <microhttpd.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include "entrokv/http.h"
#include "openai.h"

#define HTTP_ABORT_MSG "the server is shutting down: the drain timeout cut this request short"

struct ekv_http {
    struct MHD_Daemon *d;
    ekv_coordinator *coord;
    int port;
    ekv_api_key api_key;
    unsigned timeout_s;
    atomic_int active;
    atomic_bool draining, aborting, stopping;
    long long started;
    atomic_llong log_second;     /* on_mhd_log's rate limit: the current second, */
    atomic_int log_lines, log_dropped; /* lines logged in it, lines dropped since */
};

/* Queues body (malloc'd, taken over; NULL answers MHD_NO) as the reply, with
 * Connection: close when close is set. */
enum MHD_Result http_reply(struct MHD_Connection *conn, unsigned code, const char *ctype,
                           char *body, bool close);
/* An OpenAI error body; 413, 503 and anything while draining close. */
enum MHD_Result http_reply_error(ekv_http *h, struct MHD_Connection *conn, unsigned code,
                                 const char *message);

/* A completion request's body (len bytes, NUL-terminated) parsed, submitted
 * and answered: an SSE stream with "stream", else one JSON response once
 * every choice is done. */
enum MHD_Result http_handle_completion(ekv_http *h, struct MHD_Connection *conn,
                                       oai_kind kind, const char *body, size_t len);

#endif
