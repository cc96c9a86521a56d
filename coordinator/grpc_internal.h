/*
 * grpc_internal.h - the gRPC server's call state, shared by grpc_server.c
 * (the completion queue loop, accept, Health) and grpc_generate.c
 * (Generation's Generate and Tokenize). Private to coordinator/.
 *
 * Every field of an rpc_call is owned by the server thread except `wakes`,
 * which the engine thread increments under `mu`, and `prepared`, which a
 * preparation thread sets under `mu`. `mu` also serialises every
 * grpc_call_start_batch on the call, as the C core requires.
 *
 * Preparation (tokenizing, chat rendering, the checks: prep_pool.c): a
 * Generate or Tokenize request is handed to the pool with the call's
 * `pending` counted up; the pool thread does the work, stores its result
 * in `prepared` and starts an empty batch (tag t_prep), which completes as
 * OP_PREPARED on the server thread: that counts `pending` down and
 * answers or starts the stream.
 */
#ifndef ENTROKV_GRPC_INTERNAL_H
#define ENTROKV_GRPC_INTERNAL_H

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <protobuf-c/protobuf-c.h>
#include <pthread.h>
#include <stdatomic.h>

#include "entrokv/grpc_server.h"

typedef enum rpc_op {
    OP_ACCEPT,   /* grpc_server_request_call completed */
    OP_RECV,     /* the request message arrived (or the client closed) */
    OP_CLOSE,    /* RECV_CLOSE_ON_SERVER: the call is over; `cancelled` says how */
    OP_SEND,     /* a streamed message was written */
    OP_STATUS,   /* the final batch (last message + status) completed */
    OP_WAKE,     /* empty batch from the notify hook: the stream has news */
    OP_PREPARED, /* empty batch from a preparation thread: its result is in `prepared` */
    OP_SHUTDOWN, /* grpc_server_shutdown_and_notify completed */
} rpc_op;

typedef enum rpc_method {
    M_UNKNOWN,
    M_GENERATE,
    M_TOKENIZE,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
    M_WORKER_GENERATE,
    M_WORKER_STATS,
} rpc_method;

typedef struct rpc_call rpc_call;

/* A unit of work for the preparation pool: run on a pool thread. */
typedef struct prep_job {
    struct prep_job *next;
    void (*run)(struct prep_job *j);
} prep_job;

#define PREP_MAX_THREADS 8
#define PREP_THREADS 2            /* one huge prompt holds one; the other stays free */
typedef struct prep_pool prep_pool;

typedef struct rpc_tag {
    rpc_call *call;
    rpc_op op;
} rpc_tag;

struct rpc_call {
    ekv_grpc *srv;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    rpc_method method;
    pthread_mutex_t mu;
    int wakes;                 /* wake batches in the queue (under mu) */
    rpc_tag t_accept, t_recv, t_close, t_send, t_status, t_wake, t_prep;
    prep_job *prepared;        /* a finished preparation (under mu) */
    grpc_byte_buffer *recv_buf;
    grpc_byte_buffer *send_buf;
    grpc_byte_buffer *status_buf;
    grpc_slice status_msg;
    int cancelled;             /* set by RECV_CLOSE_ON_SERVER */
    int pending;               /* batches in flight, wakes excluded */
    bool md_sent, send_busy, status_started, closed, watch_end;
    bool drain_abort;          /* past the drain timeout: end with UNAVAILABLE */
    bool watch_known;          /* Health/Watch: the service is one of ours */
    int watch_sent;            /* Health/Watch: the last status sent */
    coord_stream *stream;
    rpc_call *prev, *next;     /* the server's list of accepted calls */
};

struct ekv_grpc {
    ekv_coordinator *coord;
    prep_pool *prep;             /* NULL: requests are prepared inline */
    grpc_server *server;
    grpc_completion_queue *cq;
    pthread_t thread;
    int port;
    unsigned services;           /* EKV_GRPC_* */
    ekv_api_key api_key;         /* for Generation's calls */
    atomic_bool drain_req, cancel_req;
    bool shutdown_started, shutdown_done, cancelled_all, cancelled_rest;
    gpr_timespec cancel_all_at;  /* cancelled_all: when to cancel what is left */
    rpc_call *live;
    int n_accepting;
    rpc_tag t_shutdown;
    pthread_mutex_t done_mu;
    pthread_cond_t done_cv;
    bool finished;
};

/* grpc_server.c */
bool rpc_start(rpc_call *c, const grpc_op *ops, size_t n, rpc_tag *tag);
/* Ends the call: [initial metadata], [last message (taken)], status. */
void rpc_finish(rpc_call *c, grpc_status_code code, const char *msg, grpc_byte_buffer *last);
grpc_byte_buffer *rpc_pack(const ProtobufCMessage *m);
/* Unpacks b with desc; NULL when malformed or when a string field holds a
 * NUL or is not UTF-8 (proto_strings.h), with the message for the client
 * in why. Free with protobuf_c_message_free_unpacked. */
ProtobufCMessage *rpc_unpack(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *b,
                             char *why, size_t why_len);

/* prep_pool.c: n_threads (at most PREP_MAX_THREADS) started; NULL when
 * none could be. prep_pool_free runs what is queued, then joins. */
prep_pool *prep_pool_create(int n_threads);
void prep_pool_submit(prep_pool *p, prep_job *j);
void prep_pool_free(prep_pool *p);

/* grpc_generate.c */
/* OP_PREPARED: the call's finished preparation answered or started. */
void rpc_on_prepared(rpc_call *c);
void rpc_generate_on_request(rpc_call *c, grpc_byte_buffer *b);
void rpc_generate_pump(rpc_call *c);
void rpc_tokenize_on_request(rpc_call *c, grpc_byte_buffer *b);
void rpc_worker_generate_on_request(rpc_call *c, grpc_byte_buffer *b);
void rpc_worker_stats_on_request(rpc_call *c, grpc_byte_buffer *b);

#endif
