/*
 * grpc_server.h - the gRPC front of the coordinator, on the gRPC C core:
 * entrokv.v1.Generation (Generate, Tokenize) and grpc.health.v1.Health
 * (Check, Watch), see proto/ and docs/serving.md.
 *
 * One thread drains one completion queue and owns every call's state
 * machine. Generated tokens reach it from the engine thread through the
 * call's coord_stream: the stream's notify hook starts an empty batch on the
 * call, which the C core completes at once by posting the call's wake tag
 * to the queue, so the server thread wakes and sends what is new.
 *
 * Ownership: the server borrows the coordinator, which must outlive it.
 */
#ifndef ENTROKV_GRPC_SERVER_H
#define ENTROKV_GRPC_SERVER_H

#include <stdbool.h>

#include "entrokv/coordinator.h"
#include "entrokv/security.h"
#include "entrokv/status.h"

typedef struct ekv_grpc ekv_grpc;

/* The services a listener offers besides Health: the public
 * entrokv.v1.Generation, the internal entrokv.v1.Worker, or both (what
 * `entrokv worker` listens with). A call to one not offered is
 * UNIMPLEMENTED. */
enum { EKV_GRPC_GENERATION = 1, EKV_GRPC_WORKER = 2 };

typedef struct ekv_grpc_opts {
    const char *host;
    int port;                   /* 0: an ephemeral one, see ekv_grpc_port */
    unsigned services;          /* EKV_GRPC_* bits */
    const ekv_tls_server *tls;  /* TLS with its cert and key, and with client_ca_pem
                                 * every client must present a certificate it
                                 * signed; NULL or none: plaintext. Read at start */
    const ekv_api_key *api_key; /* copied; Generation's calls need `authorization:
                                 * Bearer KEY` metadata (UNAUTHENTICATED otherwise);
                                 * Health and Worker never ask for it */
} ekv_grpc_opts;

/* Binds as o says and starts the server thread. NULL with err filled when
 * the port cannot be bound or the TLS files are not valid. */
ekv_grpc *ekv_grpc_start_opts(ekv_coordinator *c, const ekv_grpc_opts *o, ekv_error *err);
/* Plaintext on host:port with Generation and Worker, no API key. */
ekv_grpc *ekv_grpc_start(ekv_coordinator *c, const char *host, int port, ekv_error *err);
int ekv_grpc_port(const ekv_grpc *s);
/* Stops accepting calls, turns health to NOT_SERVING and ends Watch
 * streams; Generate streams in progress run to their end. Returns at once. */
void ekv_grpc_drain(ekv_grpc *s);
/* Cancels every call still in progress (a second signal; after drain). */
void ekv_grpc_cancel_all(ekv_grpc *s);
/* Waits up to timeout_s (< 0: forever) for the server thread to finish,
 * i.e. for drain to complete. True when it has. */
bool ekv_grpc_wait(ekv_grpc *s, double timeout_s);
/* Drains (cancelling what is left), joins the thread and frees. */
void ekv_grpc_free(ekv_grpc *s);

#endif
