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
#include <stdint.h>

#include "entrokv/http.h"
#include "openai.h"

#define HTTP_ABORT_MSG "the server is shutting down: the drain timeout cut this request short"

typedef struct http_front http_front;
#define HTTP_FRONT_PATH_MAX 64

struct ekv_http {
    struct MHD_Daemon *d;
    http_front *front;           /* plain HTTP: the listener in front of MHD; TLS: NULL */
    /* the front's refuse requests' path ("" with TLS); set before MHD
     * starts, so its threads read it without a lock */
    char refuse_path[HTTP_FRONT_PATH_MAX];
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

/* ---- the plain-HTTP front (http_front.c) ---- */

/* Why a request's framing was refused (0: it was not). */
enum {
    FRONT_OK,
    FRONT_BAD_LINE_END,
    FRONT_OBS_FOLD,
    FRONT_BAD_HEADER,
    FRONT_TWO_LENGTHS,
    FRONT_BAD_LENGTH,
    FRONT_TWO_ENCODINGS,
    FRONT_BAD_ENCODING,
    FRONT_LENGTH_AND_ENCODING,
    FRONT_HEAD_TOO_LARGE,
    FRONT_BAD_CHUNK,
    FRONT_N_REASONS
};

/* The header of a refuse request that names the reason (its index). */
#define HTTP_FRONT_REASON_HEADER "X-Entrokv-Refused"

/* Where a client's byte stream is: the request head so far, or how much of
 * a body is still to pass. Zeroed is at the start of a connection. */
typedef struct http_framer {
    int state;
    char head[32u << 10];
    size_t head_len;
    uint64_t left;        /* body or chunk bytes still to pass */
    char line[1024];      /* a chunk-size or trailer line so far */
    size_t line_len;
    int error;            /* FRONT_*: set, nothing more is taken */
    uint64_t requests;    /* heads checked and passed */
} http_framer;

/* Takes in[0..n) (returns how much; less than n only on an error) and
 * appends to out what may be passed on: whole checked heads and body bytes.
 * out needs room for n + 32 KiB. */
size_t http_framer_feed(http_framer *f, const uint8_t *in, size_t n, uint8_t *out,
                        size_t *out_len);
/* The message and status code (400, or 431) of reason why; NULL if it is
 * not a reason. */
const char *http_front_reason(int why, unsigned *code);

struct addrinfo;
/* A new path for the requests that stand in for refused heads (random, so
 * no client can name it); false when no randomness could be read. */
bool http_front_refuse_path_new(char out[HTTP_FRONT_PATH_MAX]);
/* Listens on ai and hands every connection to d (started with
 * MHD_USE_NO_LISTEN_SOCKET) through a relay that checks its framing and
 * puts a request for refuse_path in place of a refused head; at most
 * max_relays at once. */
http_front *http_front_start(struct MHD_Daemon *d, const struct addrinfo *ai,
                             const char *refuse_path, int max_relays, ekv_error *err);
int http_front_port(const http_front *fr);
/* Before MHD_stop_daemon: no new connections. */
void http_front_stop_accepting(http_front *fr);
/* After MHD_stop_daemon: waits for the relays to end, then frees. */
void http_front_free(http_front *fr);

#endif
