/*
 * kvucx.h - private to kvstore/: the UCX pieces the daemon and the client
 * share (worker setup, sockaddr endpoints, one active message id, forced
 * endpoint close, the auth proofs).
 *
 * Everything here runs on the one thread that owns the worker
 * (UCS_THREAD_MODE_SINGLE); UCX callbacks run inside kvx_progress.
 */
#ifndef ENTROKV_KVUCX_H
#define ENTROKV_KVUCX_H

#include <stdbool.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>

#include "entrokv/kvwire.h"
#include "entrokv/status.h"

typedef struct kvx_worker {
    ucp_context_h ctx;
    ucp_worker_h worker;
    int efd;           /* wakeup fd; -1 when the transports offer none */
    void **closing;    /* endpoint close requests still in progress */
    int n_closing, cap_closing;
    int empty_wakeups; /* kvx_wait calls in a row that found nothing */
    struct kvx_small *smalls; /* kvx_send_small messages in flight */
} kvx_worker;

/* A worker with the KVWIRE_AM_ID handler cb(arg, ...) installed. */
ekv_status kvx_worker_init(kvx_worker *w, ucp_am_recv_callback_t cb, void *arg, ekv_error *err);
/* Closes what is still closing (bounded wait), then destroys the worker. */
void kvx_worker_fini(kvx_worker *w);
/* Progresses until idle (at most 256 rounds). Returns whether anything
 * happened. */
bool kvx_progress(kvx_worker *w);
/* Progresses; when idle, sleeps up to timeout_ms for the next event. */
void kvx_wait(kvx_worker *w, int timeout_ms);

/* "host:port" (IPv4 dotted quad or a name; "[v6]:port") -> sockaddr. */
ekv_status kvx_parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len,
                          ekv_error *err);
void kvx_addr_str(const struct sockaddr *sa, char *out, size_t n);

/* True when sa is a loopback address or one of this host's interfaces:
 * the peer runs on this host, and may map the daemon's value region. */
bool kvx_addr_is_local(const struct sockaddr *sa);

/* Endpoints with peer error handling (UCP_ERR_HANDLING_MODE_PEER): a
 * forced close (kvx_close) completes their outstanding requests. */
ucp_ep_h kvx_connect(kvx_worker *w, const struct sockaddr *sa, socklen_t len,
                     ucp_err_handler_cb_t on_err, void *arg, ekv_error *err);
ucp_ep_h kvx_accept(kvx_worker *w, ucp_conn_request_h req, ucp_err_handler_cb_t on_err,
                    void *arg, ekv_error *err);
/* Completes (cb) once ep's wireup is done and everything sent on it is
 * out. Returns NULL when already done (cb not called), a request, or an
 * error pointer. */
ucs_status_ptr_t kvx_flush(ucp_ep_h ep, ucp_send_nbx_callback_t cb, void *user);
/* Force-closes ep: its outstanding requests complete with an error (their
 * callbacks run in this call or in a later progress). */
void kvx_close(kvx_worker *w, ucp_ep_h ep);

/* Sends hdr (which must stay valid until cb runs) with data as one active
 * message, asking for a reply endpoint. Returns NULL when done at once (cb
 * not called), a request, or an error pointer. */
ucs_status_ptr_t kvx_send(ucp_ep_h ep, const uint8_t *hdr, const void *data, size_t len,
                          ucp_send_nbx_callback_t cb, void *user);

/* Sends a header-only or small-payload message (len <= 64) from a copy,
 * so nothing of the caller's needs to outlive the call; w is ep's worker,
 * which frees the copy if UCX never completes the send. */
ekv_status kvx_send_small(kvx_worker *w, ucp_ep_h ep, const kvwire_hdr *h, const void *payload,
                          size_t len);

/* 32 random bytes from getrandom(2). */
ekv_status kvx_nonce(uint8_t out[KVWIRE_NONCE_BYTES], ekv_error *err);
/* HMAC-SHA256(token, label(role) || first || second): role 'c' is the
 * client's proof (server nonce, client nonce), 's' the daemon's (client
 * nonce, server nonce). */
void kvx_proof(const uint8_t *token, size_t token_len, char role,
               const uint8_t first[KVWIRE_NONCE_BYTES], const uint8_t second[KVWIRE_NONCE_BYTES],
               uint8_t out[KVWIRE_MAC_BYTES]);

double kvx_now(void); /* monotonic seconds */

#endif
