/*
 * grpc_server.c - the gRPC server on the C core's completion-queue API:
 * one thread, one completion queue, one state machine per call (see
 * grpc_server.h for the design, grpc_internal.h for the state).
 *
 * A call's life: request_call completes (OP_ACCEPT) -> RECV_MESSAGE and
 * RECV_CLOSE_ON_SERVER are started -> the request is handled (Generate
 * streams messages, each SEND_MESSAGE completing as OP_SEND) -> the final
 * batch sends status (OP_STATUS) -> RECV_CLOSE_ON_SERVER completes (OP_CLOSE,
 * `cancelled` set if the client went away or the deadline passed, which
 * cancels the engine request). The call is freed when no batch is in
 * flight and no wake is queued.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "entrokv/proto/health.pb-c.h"
#include "grpc_internal.h"
#include "proto_strings.h"

#define ACCEPT_SLOTS 8                    /* request_call tags kept outstanding */
#define MAX_MESSAGE_BYTES (4 * 1024 * 1024)

/* ---- batches and messages ---- */

bool rpc_start(rpc_call *c, const grpc_op *ops, size_t n, rpc_tag *tag)
{
    pthread_mutex_lock(&c->mu);
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    pthread_mutex_unlock(&c->mu);
    if (e != GRPC_CALL_OK) {
        coord_log("grpc: start_batch failed: %s", grpc_call_error_to_string(e));
        return false;
    }
    c->pending++;
    return true;
}

void rpc_finish(rpc_call *c, grpc_status_code code, const char *msg, grpc_byte_buffer *last)
{
    if (c->status_started || c->closed) {
        if (last)
            grpc_byte_buffer_destroy(last);
        return;
    }
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->md_sent) {
        ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
        n++;
        c->md_sent = true;
    }
    if (last) {
        c->status_buf = last;
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n].data.send_message.send_message = last;
        n++;
    }
    c->status_msg = grpc_slice_from_copied_string(msg ? msg : "");
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n].data.send_status_from_server.status_details = &c->status_msg;
    n++;
    c->status_started = true;
    if (!rpc_start(c, ops, n, &c->t_status)) {
        grpc_slice_unref(c->status_msg);
        c->status_msg = grpc_empty_slice();
        if (c->status_buf)
            grpc_byte_buffer_destroy(c->status_buf);
        c->status_buf = NULL;
    }
}

grpc_byte_buffer *rpc_pack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *b = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return b;
}

ProtobufCMessage *rpc_unpack(const ProtobufCMessageDescriptor *desc, grpc_byte_buffer *b,
                             char *why, size_t why_len)
{
    snprintf(why, why_len, "malformed %s", desc->short_name);
    grpc_byte_buffer_reader r;
    if (!b || !grpc_byte_buffer_reader_init(&r, b))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    const uint8_t *data = GRPC_SLICE_START_PTR(s);
    const size_t len = GRPC_SLICE_LENGTH(s);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, len, data);
    char bad[160];
    if (m && !proto_strings_valid(desc, data, len, bad, sizeof bad)) {
        snprintf(why, why_len, "malformed %s: %s", desc->short_name, bad);
        protobuf_c_message_free_unpacked(m, NULL);
        m = NULL;
    }
    grpc_slice_unref(s);
    return m;
}

/* ---- call lifetime ---- */

static rpc_call *call_new(ekv_grpc *s)
{
    rpc_call *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->srv = s;
    pthread_mutex_init(&c->mu, NULL);
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    c->status_msg = grpc_empty_slice();
    rpc_tag *tags[] = {&c->t_accept, &c->t_recv, &c->t_close, &c->t_send,
                       &c->t_status, &c->t_wake, &c->t_prep};
    rpc_op ops[] = {OP_ACCEPT, OP_RECV, OP_CLOSE, OP_SEND, OP_STATUS, OP_WAKE, OP_PREPARED};
    for (size_t i = 0; i < sizeof tags / sizeof *tags; i++)
        *tags[i] = (rpc_tag){c, ops[i]};
    return c;
}

static void call_destroy(rpc_call *c)
{
    ekv_grpc *s = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else if (s->live == c)
        s->live = c->next;
    if (c->next)
        c->next->prev = c->prev;
    coord_stream_release(c->stream);
    if (c->recv_buf)
        grpc_byte_buffer_destroy(c->recv_buf);
    if (c->send_buf)
        grpc_byte_buffer_destroy(c->send_buf);
    if (c->status_buf)
        grpc_byte_buffer_destroy(c->status_buf);
    grpc_slice_unref(c->status_msg);
    if (c->call)
        grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* Frees c once nothing about it can still arrive on the queue. */
static void call_maybe_free(rpc_call *c)
{
    if (c->pending > 0)
        return;
    if (c->stream)
        coord_stream_set_notify(c->stream, NULL, NULL); /* no new wakes after this */
    pthread_mutex_lock(&c->mu);
    int wakes = c->wakes;
    pthread_mutex_unlock(&c->mu);
    if (wakes == 0)
        call_destroy(c);
}

static void accept_more(ekv_grpc *s)
{
    while (!s->shutdown_started && s->n_accepting < ACCEPT_SLOTS) {
        rpc_call *c = call_new(s);
        if (!c)
            return;
        grpc_call_error e = grpc_server_request_call(s->server, &c->call, &c->details, &c->md,
                                                     s->cq, s->cq, &c->t_accept);
        if (e != GRPC_CALL_OK) {
            call_destroy(c);
            return;
        }
        s->n_accepting++;
    }
}

static rpc_method method_of(const grpc_call_details *d)
{
    static const struct {
        const char *path;
        rpc_method m;
    } table[] = {
        {"/entrokv.v1.Generation/Generate", M_GENERATE},
        {"/entrokv.v1.Generation/Tokenize", M_TOKENIZE},
        {"/grpc.health.v1.Health/Check", M_HEALTH_CHECK},
        {"/grpc.health.v1.Health/Watch", M_HEALTH_WATCH},
        {"/entrokv.v1.Worker/Generate", M_WORKER_GENERATE},
        {"/entrokv.v1.Worker/Stats", M_WORKER_STATS},
    };
    for (size_t i = 0; i < sizeof table / sizeof *table; i++)
        if (grpc_slice_str_cmp(d->method, table[i].path) == 0)
            return table[i].m;
    return M_UNKNOWN;
}

/* Whether this listener offers m (Health everywhere). */
static bool method_offered(const ekv_grpc *s, rpc_method m)
{
    switch (m) {
    case M_GENERATE:
    case M_TOKENIZE: return s->services & EKV_GRPC_GENERATION;
    case M_WORKER_GENERATE:
    case M_WORKER_STATS: return s->services & EKV_GRPC_WORKER;
    case M_HEALTH_CHECK:
    case M_HEALTH_WATCH: return true;
    default: return false;
    }
}

/* Generation's calls carry `authorization: Bearer KEY` when a key is set. */
static bool call_authorized(const ekv_grpc *s, const rpc_call *c)
{
    if (!s->api_key.set || (c->method != M_GENERATE && c->method != M_TOKENIZE))
        return true;
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *m = &c->md.metadata[i];
        if (grpc_slice_str_cmp(m->key, "authorization") == 0)
            return ekv_api_key_check(&s->api_key, (const char *)GRPC_SLICE_START_PTR(m->value),
                                     GRPC_SLICE_LENGTH(m->value));
    }
    return false;
}

static void on_accept(ekv_grpc *s, rpc_call *c)
{
    c->next = s->live;
    if (s->live)
        s->live->prev = c;
    s->live = c;
    c->method = method_of(&c->details);
    grpc_op close_op = {.op = GRPC_OP_RECV_CLOSE_ON_SERVER};
    close_op.data.recv_close_on_server.cancelled = &c->cancelled;
    if (!rpc_start(c, &close_op, 1, &c->t_close))
        return;
    if (!method_offered(s, c->method)) {
        char *path = grpc_slice_to_c_string(c->details.method);
        char msg[300];
        snprintf(msg, sizeof msg, "unknown method %s", path);
        gpr_free(path);
        rpc_finish(c, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
        return;
    }
    if (!call_authorized(s, c)) {
        rpc_finish(c, GRPC_STATUS_UNAUTHENTICATED,
                   "an API key is required: metadata authorization: Bearer KEY", NULL);
        return;
    }
    grpc_op recv = {.op = GRPC_OP_RECV_MESSAGE};
    recv.data.recv_message.recv_message = &c->recv_buf;
    rpc_start(c, &recv, 1, &c->t_recv);
}

#define DRAIN_ABORT_MSG "the server is shutting down: the drain timeout cut this request short"

/* ---- grpc.health.v1.Health ---- */

static bool known_service(const ekv_grpc *s, const char *name)
{
    return !*name ||
           (!strcmp(name, "entrokv.v1.Generation") && (s->services & EKV_GRPC_GENERATION)) ||
           (!strcmp(name, "entrokv.v1.Worker") && (s->services & EKV_GRPC_WORKER)) ||
           !strcmp(name, "grpc.health.v1.Health");
}

static grpc_byte_buffer *health_message(Grpc__Health__V1__HealthCheckResponse__ServingStatus st)
{
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = st;
    return rpc_pack(&resp.base);
}

/* Every service this process serves follows readiness: not draining and
 * (the front) a healthy worker group. */
static Grpc__Health__V1__HealthCheckResponse__ServingStatus serving_status(ekv_grpc *s)
{
    return !atomic_load(&s->drain_req) && coord_ready(s->coord, NULL, 0)
               ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
               : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
}

/* Sends a Watch stream its next status (no send may be in flight). */
static void watch_send(rpc_call *c, Grpc__Health__V1__HealthCheckResponse__ServingStatus st)
{
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    size_t n = 0;
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    c->send_buf = health_message(st);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = c->send_buf;
    c->watch_sent = (int)st;
    if (rpc_start(c, ops, n, &c->t_send))
        c->send_busy = true;
}

static void health_on_request(rpc_call *c, grpc_byte_buffer *b)
{
    char why[256];
    Grpc__Health__V1__HealthCheckRequest *req = (Grpc__Health__V1__HealthCheckRequest *)rpc_unpack(
        &grpc__health__v1__health_check_request__descriptor, b, why, sizeof why);
    if (!req) {
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, why, NULL);
        return;
    }
    bool known = known_service(c->srv, req->service);
    protobuf_c_message_free_unpacked(&req->base, NULL);
    Grpc__Health__V1__HealthCheckResponse__ServingStatus st =
        known ? serving_status(c->srv)
              : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN;
    if (c->method == M_HEALTH_CHECK) {
        if (!known)
            rpc_finish(c, GRPC_STATUS_NOT_FOUND, "unknown service", NULL);
        else
            rpc_finish(c, GRPC_STATUS_OK, "", health_message(st));
        return;
    }
    /* Watch: the current status now, then each change (watch_update); the
     * stream stays open until drain. */
    c->watch_known = known;
    watch_send(c, st);
}

/* A Watch stream whose service's status changed since its last message
 * gets the new one (called from the server loop, every 100 ms at most). */
static void watch_update(rpc_call *c)
{
    if (!c->watch_known || !c->md_sent || c->send_busy || c->status_started || c->closed ||
        c->watch_end)
        return;
    Grpc__Health__V1__HealthCheckResponse__ServingStatus st = serving_status(c->srv);
    if ((int)st != c->watch_sent)
        watch_send(c, st);
}

/* Ends a Watch stream at drain: NOT_SERVING, then status OK. */
static void watch_end(rpc_call *c)
{
    c->watch_end = true;
    if (c->send_busy || c->status_started || c->closed)
        return;
    rpc_finish(c, GRPC_STATUS_OK, "",
               health_message(GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING));
}

/* ---- the completion queue loop ---- */

static void on_recv(rpc_call *c, bool ok)
{
    grpc_byte_buffer *b = c->recv_buf;
    c->recv_buf = NULL;
    if (!ok || !b) {
        if (!c->closed)
            rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "missing request message", NULL);
    } else if (c->method == M_GENERATE) {
        rpc_generate_on_request(c, b);
    } else if (c->method == M_TOKENIZE) {
        rpc_tokenize_on_request(c, b);
    } else if (c->method == M_WORKER_GENERATE) {
        rpc_worker_generate_on_request(c, b);
    } else if (c->method == M_WORKER_STATS) {
        rpc_worker_stats_on_request(c, b);
    } else {
        health_on_request(c, b);
    }
    if (b)
        grpc_byte_buffer_destroy(b);
}

static void on_send(rpc_call *c, bool ok)
{
    c->send_busy = false;
    if (c->send_buf)
        grpc_byte_buffer_destroy(c->send_buf);
    c->send_buf = NULL;
    if (!ok)
        return; /* the call is going away; OP_CLOSE follows */
    if (c->drain_abort)
        rpc_finish(c, GRPC_STATUS_UNAVAILABLE, DRAIN_ABORT_MSG, NULL);
    else if (c->method == M_GENERATE || c->method == M_WORKER_GENERATE)
        rpc_generate_pump(c);
    else if (c->watch_end)
        watch_end(c);
}

static void on_event(ekv_grpc *s, rpc_tag *t, bool ok)
{
    rpc_call *c = t->call;
    switch (t->op) {
    case OP_SHUTDOWN:
        s->shutdown_done = true;
        return;
    case OP_ACCEPT:
        s->n_accepting--;
        if (!ok) {
            call_destroy(c);
            return;
        }
        accept_more(s);
        on_accept(s, c);
        break;
    case OP_RECV:
        c->pending--;
        on_recv(c, ok);
        break;
    case OP_CLOSE:
        c->pending--;
        c->closed = true;
        if (c->cancelled && c->stream)
            coord_stream_cancel(c->stream);
        break;
    case OP_SEND:
        c->pending--;
        on_send(c, ok);
        break;
    case OP_STATUS:
        c->pending--;
        break;
    case OP_PREPARED:
        c->pending--;
        rpc_on_prepared(c);
        break;
    case OP_WAKE:
        pthread_mutex_lock(&c->mu);
        c->wakes--;
        pthread_mutex_unlock(&c->mu);
        if (c->method == M_GENERATE || c->method == M_WORKER_GENERATE)
            rpc_generate_pump(c);
        break;
    }
    call_maybe_free(c);
}

static void begin_shutdown(ekv_grpc *s)
{
    s->shutdown_started = true;
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
    for (rpc_call *c = s->live; c; c = c->next)
        if (c->method == M_HEALTH_WATCH)
            watch_end(c);
}

static void check_requests(ekv_grpc *s)
{
    for (rpc_call *c = s->live; c; c = c->next)
        if (c->method == M_HEALTH_WATCH)
            watch_update(c);
    if (!s->shutdown_started && atomic_load(&s->drain_req)) {
        coord_log("grpc: draining");
        begin_shutdown(s);
    }
    if (s->shutdown_started && !s->cancelled_all && atomic_load(&s->cancel_req)) {
        s->cancelled_all = true;
        s->cancel_all_at = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                        gpr_time_from_millis(500, GPR_TIMESPAN));
        /* each call ends with a status that says why (now, or when its send
         * in flight completes); the C core's own "Cancelling all calls"
         * follows only for what is left after 0.5 s */
        for (rpc_call *c = s->live; c; c = c->next) {
            c->drain_abort = true;
            if (c->stream)
                coord_stream_cancel(c->stream);
            if (!c->send_busy)
                rpc_finish(c, GRPC_STATUS_UNAVAILABLE, DRAIN_ABORT_MSG, NULL);
        }
    }
    if (s->cancelled_all && !s->cancelled_rest &&
        gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), s->cancel_all_at) >= 0) {
        s->cancelled_rest = true;
        grpc_server_cancel_all_calls(s->server);
    }
}

static void *server_main(void *arg)
{
    ekv_grpc *s = arg;
    accept_more(s);
    while (!(s->shutdown_done && !s->live && s->n_accepting == 0)) {
        gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                             gpr_time_from_millis(100, GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(s->cq, deadline, NULL);
        if (ev.type == GRPC_OP_COMPLETE)
            on_event(s, ev.tag, ev.success != 0);
        check_requests(s);
    }
    grpc_completion_queue_shutdown(s->cq);
    for (;;) {
        grpc_event ev =
            grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN)
            break;
    }
    pthread_mutex_lock(&s->done_mu);
    s->finished = true;
    pthread_cond_broadcast(&s->done_cv);
    pthread_mutex_unlock(&s->done_mu);
    coord_log("grpc: stopped");
    return NULL;
}

/* ---- public ---- */

/* TLS credentials from o->tls, or plaintext ones. */
static grpc_server_credentials *server_credentials(const ekv_grpc_opts *o)
{
    if (!ekv_tls_server_on(o->tls))
        return grpc_insecure_server_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {o->tls->key_pem, o->tls->cert_pem};
    return grpc_ssl_server_credentials_create_ex(
        o->tls->client_ca_pem, &pair, 1,
        o->tls->client_ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                              : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
}

static grpc_server *make_server(ekv_grpc *s, const ekv_grpc_opts *o, ekv_error *err)
{
    const char *host = o->host;
    const int port = o->port;
    grpc_arg args[4];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_ALLOW_REUSEPORT; /* a port in use is an error, not shared */
    args[0].value.integer = 0;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].value.integer = MAX_MESSAGE_BYTES;
    /* a coordinator's keepalive pings (every 2 s, remote.c) are welcome,
     * not a reason for GOAWAY "too_many_pings" */
    args[2].type = args[3].type = GRPC_ARG_INTEGER;
    args[2].key = (char *)GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS;
    args[2].value.integer = 1000;
    args[3].key = (char *)GRPC_ARG_HTTP2_MAX_PING_STRIKES;
    args[3].value.integer = 0;
    grpc_channel_args ch = {.num_args = 4, .args = args};
    grpc_server *srv = grpc_server_create(&ch, NULL);
    grpc_server_register_completion_queue(srv, s->cq, NULL);
    char addr[300];
    snprintf(addr, sizeof addr, strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
    grpc_server_credentials *creds = server_credentials(o);
    s->port = creds ? grpc_server_add_http2_port(srv, addr, creds) : 0;
    if (creds)
        grpc_server_credentials_release(creds);
    if (s->port == 0) {
        ekv_error_set(err, EKV_EIO, "grpc: cannot listen on %s%s", addr,
                      ekv_tls_server_on(o->tls)
                          ? " (or the TLS certificate, key or client CA is not valid)"
                          : "");
        grpc_server_shutdown_and_notify(srv, s->cq, &s->t_shutdown);
        grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        grpc_server_destroy(srv);
        return NULL;
    }
    return srv;
}

ekv_grpc *ekv_grpc_start(ekv_coordinator *c, const char *host, int port, ekv_error *err)
{
    ekv_grpc_opts o = {.host = host, .port = port,
                       .services = EKV_GRPC_GENERATION | EKV_GRPC_WORKER};
    return ekv_grpc_start_opts(c, &o, err);
}

ekv_grpc *ekv_grpc_start_opts(ekv_coordinator *c, const ekv_grpc_opts *o, ekv_error *err)
{
    ekv_grpc *s = calloc(1, sizeof *s);
    if (!s) {
        ekv_error_set(err, EKV_ENOMEM, "grpc: out of memory");
        return NULL;
    }
    grpc_init();
    s->coord = c;
    s->services = o->services;
    if (o->api_key)
        s->api_key = *o->api_key;
    s->prep = prep_pool_create(PREP_THREADS);
    s->t_shutdown = (rpc_tag){NULL, OP_SHUTDOWN};
    atomic_init(&s->drain_req, false);
    atomic_init(&s->cancel_req, false);
    pthread_mutex_init(&s->done_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->done_cv, &ca);
    pthread_condattr_destroy(&ca);
    s->cq = grpc_completion_queue_create_for_next(NULL);
    s->server = make_server(s, o, err);
    if (!s->server)
        goto fail;
    grpc_server_start(s->server);
    if (pthread_create(&s->thread, NULL, server_main, s) != 0) {
        ekv_error_set(err, EKV_EIO, "grpc: cannot start the server thread");
        grpc_server_shutdown_and_notify(s->server, s->cq, &s->t_shutdown);
        grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        grpc_server_destroy(s->server);
        goto fail;
    }
    return s;
fail:
    grpc_completion_queue_shutdown(s->cq);
    while (grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(s->cq);
    prep_pool_free(s->prep);
    pthread_mutex_destroy(&s->done_mu);
    pthread_cond_destroy(&s->done_cv);
    free(s);
    grpc_shutdown();
    return NULL;
}

int ekv_grpc_port(const ekv_grpc *s)
{
    return s->port;
}

void ekv_grpc_drain(ekv_grpc *s)
{
    atomic_store(&s->drain_req, true);
}

void ekv_grpc_cancel_all(ekv_grpc *s)
{
    atomic_store(&s->drain_req, true);
    atomic_store(&s->cancel_req, true);
}

bool ekv_grpc_wait(ekv_grpc *s, double timeout_s)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double end = (double)ts.tv_sec + ts.tv_nsec * 1e-9 + timeout_s;
    ts.tv_sec = (time_t)end;
    ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
    pthread_mutex_lock(&s->done_mu);
    while (!s->finished) {
        if (timeout_s < 0)
            pthread_cond_wait(&s->done_cv, &s->done_mu);
        else if (pthread_cond_timedwait(&s->done_cv, &s->done_mu, &ts) != 0)
            break;
    }
    bool finished = s->finished;
    pthread_mutex_unlock(&s->done_mu);
    return finished;
}

void ekv_grpc_free(ekv_grpc *s)
{
    if (!s)
        return;
    ekv_grpc_drain(s);
    if (!ekv_grpc_wait(s, 5.0))
        ekv_grpc_cancel_all(s);
    pthread_join(s->thread, NULL);
    prep_pool_free(s->prep); /* idle: every call, its preparation included, is over */
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    pthread_mutex_destroy(&s->done_mu);
    pthread_cond_destroy(&s->done_cv);
    free(s);
    grpc_shutdown();
}
