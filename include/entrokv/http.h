/*
 * http.h - the HTTP front of the coordinator on libmicrohttpd: the
 * OpenAI-compatible POST /v1/completions and /v1/chat/completions (JSON or
 * SSE streams), GET /v1/models, GET /livez (the process answers), GET /readyz
 * (coord_ready and not draining; 503 with {"status","reason"} otherwise;
 * GET /health is the same) and GET /metrics (Prometheus).
 * See docs/serving.md for the API.
 *
 * Threads: one per connection (MHD_USE_THREAD_PER_CONNECTION), so a
 * streaming response simply blocks its own thread on the request's
 * coord_stream; a client that disconnects is noticed from its socket and
 * its request cancelled, which frees its KV. Connections are capped in all
 * and per client address, and one that sits idle (a half-sent request, a
 * client that stops reading) is closed after the timeout; the time a
 * request waits for the engine does not count as idle.
 *
 * With an API key, every route but /livez, /readyz, /health and /metrics
 * needs `Authorization: Bearer KEY` (401 with WWW-Authenticate otherwise).
 *
 * Ownership: the server borrows the coordinator, which must outlive it.
 */
#ifndef ENTROKV_HTTP_H
#define ENTROKV_HTTP_H

#include <stdbool.h>

#include "entrokv/coordinator.h"
#include "entrokv/security.h"
#include "entrokv/status.h"

#define HTTP_MAX_BODY (4 * 1024 * 1024) /* larger bodies get 413 */
#define HTTP_MAX_CONNECTIONS 512
#define HTTP_MAX_PER_CLIENT 256
#define HTTP_TIMEOUT_S 60

typedef struct ekv_http ekv_http;

/* Where and how to listen (ekv_http_opts_default fills the defaults). */
typedef struct ekv_http_opts {
    const char *host;
    int port;                    /* 0: an ephemeral one, see ekv_http_port */
    const ekv_tls_server *tls;   /* HTTPS with its cert and key; NULL or none: plain HTTP.
                                  * Must outlive the server (client_ca is not used) */
    const ekv_api_key *api_key;  /* copied; NULL or unset: no key asked for */
    unsigned max_connections;    /* over all clients; more are closed at accept */
    unsigned max_per_client;     /* per client address; 0: no cap */
    unsigned timeout_s;          /* a connection idle this long is closed (headers
                                  * and body trickling in, keep-alive between
                                  * requests, a client not reading its answer), and a
                                  * request body must arrive within it; 0: never */
} ekv_http_opts;

void ekv_http_opts_default(ekv_http_opts *o);
/* Listens as o says; NULL with err filled when it cannot. */
ekv_http *ekv_http_start_opts(ekv_coordinator *c, const ekv_http_opts *o, ekv_error *err);
/* Plain HTTP on host:port with the defaults. */
ekv_http *ekv_http_start(ekv_coordinator *c, const char *host, int port, ekv_error *err);
int ekv_http_port(const ekv_http *h);
/* New requests get 503 (/livez, /readyz, /health and /metrics still
 * answer; /readyz says "draining"); requests in progress (streams
 * included) go on. */
void ekv_http_drain(ekv_http *h);
/* After drain, past the drain timeout: requests still running end now, SSE
 * streams with an error event and [DONE], whole completions with a 503;
 * their requests are cancelled. Returns at once (see ekv_http_active). */
void ekv_http_abort(ekv_http *h);
/* Requests in progress (bodies being read, responses being written). */
int ekv_http_active(const ekv_http *h);
/* Closes every connection and frees. Call after drain and active == 0 for
 * a clean stop; otherwise streams are cut. */
void ekv_http_stop(ekv_http *h);

#endif
