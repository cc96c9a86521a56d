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
#include <sys/types.h>

#include "entrokv/http.h"
#include "openai.h"

#define HTTP_ABORT_MSG "the server is shutting down: the drain timeout cut this request short"

typedef struct http_front http_front;
typedef struct http_tls http_tls;
#define HTTP_FRONT_PATH_MAX 64

struct ekv_http {
    struct MHD_Daemon *d;
    http_front *front;           /* the listener in front of MHD (http_front.c) */
    http_tls *tls;               /* HTTPS: the front's credentials; NULL: plain HTTP */
    /* the front's refuse requests' path; set before MHD starts, so its
     * threads read it without a lock */
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
/* Listens on ai and hands every connection to d (started with
 * MHD_USE_NO_LISTEN_SOCKET) through a relay that checks its framing and
 * puts a request for refuse_path in place of a refused head; at most
 * max_relays at once. With tls, each relay first runs the TLS handshake
 * (within timeout_s; 0: no limit) and then relays the decrypted bytes the
 * same way, so HTTPS requests get the same checks. */
typedef struct http_front_opts {
    const char *refuse_path;
    int max_relays;
    const http_tls *tls;        /* borrowed: outlives the front */
    unsigned timeout_s;
} http_front_opts;
/* A new path for the requests that stand in for refused heads (random, so
 * no client can name it); false when no randomness could be read. */
bool http_front_refuse_path_new(char out[HTTP_FRONT_PATH_MAX]);
http_front *http_front_start(struct MHD_Daemon *d, const struct addrinfo *ai,
                             const http_front_opts *o, ekv_error *err);
int http_front_port(const http_front *fr);
/* Before MHD_stop_daemon: no new connections. */
void http_front_stop_accepting(http_front *fr);
/* After MHD_stop_daemon: waits (5 s at most) for the relays to end, then
 * frees; false when one still runs (fr and its tls are then left alone). */
bool http_front_free(http_front *fr);

/* ---- the relays' client side: plain or TLS (http_tls.c, GnuTLS) ---- */

/* The server's certificate and key (PEM), shared by every session. */
http_tls *http_tls_new(const char *cert_pem, const char *key_pem, ekv_error *err);
void http_tls_free(http_tls *t);

/* One client connection: fd (non-blocking) and, with TLS, its session. */
typedef struct http_peer {
    int fd;
    void *session; /* gnutls_session_t once the handshake is done; NULL: plain */
} http_peer;
/* Runs the server side of the TLS handshake on p->fd: false when it fails,
 * takes longer than timeout_s (0: no limit) or *stop is set. */
bool http_peer_handshake(http_peer *p, const http_tls *t, unsigned timeout_s,
                         const atomic_bool *stop);
/* As recv/send with MSG_DONTWAIT: > 0 bytes, 0 the client's end (recv),
 * -1 with errno (EAGAIN: try again; a send must then be repeated with the
 * same buffer and length). */
ssize_t http_peer_recv(http_peer *p, void *buf, size_t n);
ssize_t http_peer_send(http_peer *p, const void *buf, size_t n);
/* Whether decrypted bytes are waiting that a poll of fd would not show. */
bool http_peer_pending(const http_peer *p);
/* Sends TLS close_notify (not waiting) and frees the session; fd stays open. */
void http_peer_end(http_peer *p);

#endif
