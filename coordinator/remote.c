/*
 * remote.c - a worker group reached over gRPC: the client side of the
 * internal entrokv.v1.Worker service, as a coord_group_ops implementation,
 * so the router treats it like an in-process engine.
 *
 * One client thread drains the group's completion queue. submit (any
 * thread) creates the call and starts its first batches; every later batch
 * is started by the client thread. Each call's start_batch calls are
 * serialised by the call's mutex. Responses become the engine callbacks:
 * every GenerateResponse is one on_tokens (to the ctx of the choice its
 * index names: n > 1 goes to the worker, whose engine forks the choices),
 * and each choice's on_done follows once both the status and the end of
 * the message stream have arrived. A refusal by
 * the worker (queue full, bad request) arrives as a status and becomes
 * on_done with EKV_EBUSY / EKV_EINVAL, since the router cannot learn it
 * synchronously. The cached Stats figures are refreshed once a second,
 * and the same call is the group's health check: the group is healthy
 * (routed to) from the first Stats that answers within STATS_DEADLINE_S
 * with a context of at least the coordinator's, until STATS_FAILURES fail
 * in a row. A worker that is not up yet is not an error:
 * the group stays unhealthy until it answers. A worker whose Stats name
 * another model than the coordinator's (model_identity) is refused: never
 * routed to, with one log line, until it answers with the right model.
 *
 * A worker that dies (kill -9) resets its connection; one that stops
 * answering (SIGSTOP, a network partition) misses the channel's keepalive
 * pings (KEEPALIVE_MS, then KEEPALIVE_TIMEOUT_MS): either way gRPC fails
 * the running calls with UNAVAILABLE, which becomes EKV_EUNAVAILABLE, and
 * the coordinator resubmits a request that produced nothing yet
 * (stream.c). No Generate call can hang on a silent worker.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "coord_internal.h"
#include "entrokv/proto/entrokv.pb-c.h"

#define STATS_DEADLINE_S 2.0
#define STATS_PERIOD_S 1.0
#define KEEPALIVE_MS 2000         /* a ping after this long without a frame from the worker */
#define KEEPALIVE_TIMEOUT_MS 3000 /* unanswered this long: the connection and its calls fail */
#define STATS_FAILURES 3 /* in a row before a healthy group is unhealthy (a busy
                          * machine may miss one deadline; a dead worker fails
                          * fast, so this is about 3 s) */

typedef enum rop { ROP_START, ROP_RECV, ROP_STATUS, ROP_STATS } rop;

typedef struct rcall rcall;
typedef struct rtag {
    rcall *call;
    rop op;
} rtag;

typedef struct remote_group remote_group;

struct rcall {
    remote_group *g;
    grpc_call *call;
    uint64_t id;
    pthread_mutex_t mu;
    engine_request req;          /* callbacks and ctx only */
    int32_t n;                   /* choices: responses carry their index */
    void *ctxs[COORD_MAX_N];     /* each choice's ctx (req.choice_ctx, copied) */
    rtag t_start, t_recv, t_status;
    grpc_metadata_array init_md, trail_md;
    grpc_byte_buffer *send_buf, *recv_buf;
    grpc_status_code status;
    grpc_slice details;
    int pending;
    bool got_status, stream_ended;
    bool got_final[COORD_MAX_N]; /* per choice: its finish_reason and usage arrived */
    gen_finish finish[COORD_MAX_N];
    engine_usage usage[COORD_MAX_N];
    rcall *prev, *next;
};

struct remote_group {
    char target[256];
    grpc_channel *channel;
    grpc_completion_queue *cq;
    pthread_t thread;
    pthread_mutex_t mu;          /* calls, next_id, stats */
    rcall *calls;
    uint64_t next_id;
    engine_stats stats;
    int32_t max_ctx;
    bool stats_ok;
    ekv_coordinator *coord;
    int32_t need_ctx;            /* the coordinator's context */
    char identity[160];          /* the model the worker's last Stats named */
    int health;                  /* -1 unknown, 0 unhealthy, 1 healthy (client thread) */
    int failures;                /* Stats failed in a row */
    bool refused_logged;         /* another model: said once, not every second */
    bool thread_started;
    atomic_bool stop;
    /* the one Stats call in flight (client thread only) */
    grpc_call *stats_call;
    grpc_metadata_array stats_init_md, stats_trail_md;
    grpc_byte_buffer *stats_send, *stats_recv;
    grpc_status_code stats_status;
    grpc_slice stats_details;
    rtag t_stats;
};

static gpr_timespec in_seconds(double s)
{
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis((int64_t)(s * 1000), GPR_TIMESPAN));
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    grpc_slice s = grpc_slice_malloc(n);
    protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
    grpc_byte_buffer *b = grpc_raw_byte_buffer_create(&s, 1);
    grpc_slice_unref(s);
    return b;
}

static ProtobufCMessage *unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *b)
{
    grpc_byte_buffer_reader r;
    if (!b || !grpc_byte_buffer_reader_init(&r, b))
        return NULL;
    grpc_slice s = grpc_byte_buffer_reader_readall(&r);
    grpc_byte_buffer_reader_destroy(&r);
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s),
                                                    GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    return m;
}

/* ---- Stats ---- */

/* After each Stats: publish the group's health, logging each change. */
static void set_health(remote_group *g)
{
    char why[160] = "";
    if (!g->stats_ok) {
        char *d = grpc_slice_to_c_string(g->stats_details);
        snprintf(why, sizeof why, "Stats failed (%d): %.100s", g->stats_status, d);
        gpr_free(d);
    } else if (g->max_ctx < g->need_ctx) {
        snprintf(why, sizeof why, "its context is %d tokens, less than the coordinator's %d",
                 g->max_ctx, g->need_ctx);
    }
    const char *want = coord_model_identity(g->coord);
    bool refused = g->stats_ok && *want && strcmp(g->identity, want);
    if (refused && !g->refused_logged)
        coord_log("coordinator: worker %s refused: it serves model %s, this coordinator %s",
                  g->target, *g->identity ? g->identity : "(none)", want);
    g->refused_logged = refused;
    if (refused) {
        g->failures = 0;
        g->health = 0;
        coord_set_group_healthy(g->coord, g, false);
        return;
    }
    g->failures = g->stats_ok ? 0 : g->failures + 1;
    int h = why[0] ? 0 : 1;
    if (h == 0 && g->health == 1 && !g->stats_ok && g->failures < STATS_FAILURES)
        return; /* one missed deadline is not a dead worker */
    if (h != g->health) {
        if (h)
            coord_log("coordinator: worker %s healthy", g->target);
        else
            coord_log("coordinator: worker %s unhealthy: %s", g->target, why);
    }
    g->health = h;
    coord_set_group_healthy(g->coord, g, h == 1);
    /* Calls still waiting on a worker that stopped answering would wait
     * for the reconnect (up to gRPC's 20 s connect timeout): fail them now,
     * so the router moves those that produced nothing to another group. */
    if (h == 0 && !g->stats_ok) {
        pthread_mutex_lock(&g->mu);
        for (rcall *c = g->calls; c; c = c->next)
            grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNAVAILABLE,
                                         "the worker stopped answering its health checks", NULL);
        pthread_mutex_unlock(&g->mu);
    }
}

static void stats_start(remote_group *g, double timeout_s)
{
    grpc_slice method = grpc_slice_from_static_string("/entrokv.v1.Worker/Stats");
    g->stats_call = grpc_channel_create_call(g->channel, NULL, GRPC_PROPAGATE_DEFAULTS, g->cq,
                                             method, NULL, in_seconds(timeout_s), NULL);
    Entrokv__V1__StatsRequest req = ENTROKV__V1__STATS_REQUEST__INIT;
    g->stats_send = pack(&req.base);
    grpc_metadata_array_init(&g->stats_init_md);
    grpc_metadata_array_init(&g->stats_trail_md);
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = g->stats_send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &g->stats_init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &g->stats_recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &g->stats_trail_md;
    ops[5].data.recv_status_on_client.status = &g->stats_status;
    ops[5].data.recv_status_on_client.status_details = &g->stats_details;
    if (grpc_call_start_batch(g->stats_call, ops, 6, &g->t_stats, NULL) != GRPC_CALL_OK) {
        grpc_call_unref(g->stats_call);
        g->stats_call = NULL;
    }
}

static void stats_done(remote_group *g)
{
    Entrokv__V1__StatsResponse *r = NULL;
    if (g->stats_status == GRPC_STATUS_OK)
        r = (Entrokv__V1__StatsResponse *)unpack(&entrokv__v1__stats_response__descriptor,
                                                 g->stats_recv);
    pthread_mutex_lock(&g->mu);
    g->stats_ok = r != NULL;
    if (r) {
        g->stats = (engine_stats){.queued = r->queued, .running = r->running,
                                  .kv_blocks_total = r->kv_blocks_total,
                                  .kv_blocks_free = r->kv_blocks_free,
                                  .kv_bytes_saved = r->kv_bytes_saved,
                                  .kv_bytes_saved_tokens = r->kv_bytes_saved_tokens,
                                  .kv_bytes_saved_channels = r->kv_bytes_saved_channels,
                                  .kv_bytes_saved_decode = r->kv_bytes_saved_decode,
                                  .preemptions = r->preemptions, .steps = r->steps,
                                  .kv_blocks_shared = r->kv_blocks_shared,
                                  .kv_cow_copies = r->kv_cow_copies,
                                  .recall_blocks = r->recall_blocks,
                                  .recall_bytes = r->recall_bytes,
                                  .recall_deadline_misses = r->recall_deadline_misses,
                                  .recall_promotions = r->recall_promotions,
                                  .recall_spilled_blocks = r->recall_spilled_blocks,
                                  .recall_rankings = r->recall_rankings};
        g->max_ctx = r->max_ctx;
        snprintf(g->identity, sizeof g->identity, "%s", r->model_identity);
    }
    pthread_mutex_unlock(&g->mu);
    if (r)
        protobuf_c_message_free_unpacked(&r->base, NULL);
    set_health(g);
    if (g->stats_recv)
        grpc_byte_buffer_destroy(g->stats_recv);
    grpc_byte_buffer_destroy(g->stats_send);
    grpc_metadata_array_destroy(&g->stats_init_md);
    grpc_metadata_array_destroy(&g->stats_trail_md);
    grpc_slice_unref(g->stats_details);
    grpc_call_unref(g->stats_call);
    g->stats_call = NULL;
    g->stats_recv = g->stats_send = NULL;
}

/* ---- Generate calls ---- */

static bool call_start(rcall *c, const grpc_op *ops, size_t n, rtag *tag)
{
    pthread_mutex_lock(&c->mu);
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
    if (e == GRPC_CALL_OK)
        c->pending++;
    pthread_mutex_unlock(&c->mu);
    return e == GRPC_CALL_OK;
}

static void start_recv(rcall *c)
{
    grpc_op op = {.op = GRPC_OP_RECV_MESSAGE};
    op.data.recv_message.recv_message = &c->recv_buf;
    if (!call_start(c, &op, 1, &c->t_recv))
        c->stream_ended = true;
}

static gen_finish finish_of(const char *s)
{
    if (!strcmp(s, "length"))
        return GEN_FINISH_LENGTH;
    if (!strcmp(s, "context"))
        return GEN_FINISH_CONTEXT;
    if (!strcmp(s, "cancelled"))
        return GEN_FINISH_CANCELLED;
    return GEN_FINISH_STOP;
}

/* A response's TokenLogprobs to on_logprobs, one at a time. */
static void forward_logprobs(rcall *c, void *ctx, Entrokv__V1__TokenLogprob **v, size_t n,
                             bool prompt)
{
    for (size_t i = 0; i < n; i++) {
        ekv_logprob lp = {.token = v[i]->token_id, .logprob = NAN};
        if (v[i]->has_logprob_case == ENTROKV__V1__TOKEN_LOGPROB__HAS_LOGPROB_LOGPROB)
            lp.logprob = v[i]->logprob;
        for (size_t j = 0; j < v[i]->n_top_logprobs && j < EKV_MAX_TOP_LOGPROBS; j++) {
            lp.top_ids[j] = v[i]->top_logprobs[j]->token_id;
            lp.top_logprobs[j] = v[i]->top_logprobs[j]->logprob;
            lp.n_top++;
        }
        c->req.on_logprobs(ctx, &lp, 1, prompt);
    }
}

/* One GenerateResponse: its tokens out, and the finish if it is the last. */
static void on_message(rcall *c)
{
    Entrokv__V1__GenerateResponse *m = (Entrokv__V1__GenerateResponse *)unpack(
        &entrokv__v1__generate_response__descriptor, c->recv_buf);
    grpc_byte_buffer_destroy(c->recv_buf);
    c->recv_buf = NULL;
    /* a worker naming a choice we did not ask for, or speaking after a
     * choice's end, is not to be trusted with the rest */
    const int32_t i = m ? m->index : -1;
    if (!m || i < 0 || i >= c->n || c->got_final[i]) {
        if (m)
            protobuf_c_message_free_unpacked(&m->base, NULL);
        grpc_call_cancel(c->call, NULL);
        return;
    }
    void *ctx = c->ctxs[i];
    if (c->req.on_logprobs) {
        forward_logprobs(c, ctx, m->prompt_logprobs, m->n_prompt_logprobs, true);
        forward_logprobs(c, ctx, m->logprobs, m->n_logprobs, false);
    }
    if (m->n_token_ids > 0 || *m->text)
        c->req.on_tokens(ctx, m->token_ids, (int32_t)m->n_token_ids, m->text, strlen(m->text));
    if (*m->finish_reason) {
        c->got_final[i] = true;
        c->finish[i] = finish_of(m->finish_reason);
        if (m->usage)
            c->usage[i] = (engine_usage){.prompt_tokens = m->usage->prompt_tokens,
                                         .completion_tokens = m->usage->completion_tokens,
                                         .kv_bytes = m->usage->kv_bytes,
                                         .kv_bytes_full = m->usage->kv_bytes_full};
    }
    protobuf_c_message_free_unpacked(&m->base, NULL);
}

static ekv_status status_to_ekv(grpc_status_code s)
{
    switch (s) {
    case GRPC_STATUS_OK:
    case GRPC_STATUS_CANCELLED: return EKV_OK;
    case GRPC_STATUS_INVALID_ARGUMENT: return EKV_EINVAL;
    case GRPC_STATUS_RESOURCE_EXHAUSTED: return EKV_EBUSY; /* its queue is full */
    /* the worker died, stopped answering (keepalive) or is draining */
    case GRPC_STATUS_UNAVAILABLE:
    case GRPC_STATUS_DEADLINE_EXCEEDED: return EKV_EUNAVAILABLE;
    default: return EKV_EIO;
    }
}

static void call_done(rcall *c)
{
    char msg[256];
    char *d = grpc_slice_to_c_string(c->details);
    snprintf(msg, sizeof msg, "worker %.64s: %.160s", c->g->target, d);
    gpr_free(d);
    ekv_status rc = status_to_ekv(c->status);
    for (int32_t i = 0; i < c->n; i++) {
        gen_finish f = c->got_final[i] && c->status == GRPC_STATUS_OK ? c->finish[i]
                                                                       : GEN_FINISH_CANCELLED;
        c->req.on_done(c->ctxs[i], f, &c->usage[i], rc, rc ? msg : NULL);
    }
}

static void call_free(rcall *c)
{
    remote_group *g = c->g;
    pthread_mutex_lock(&g->mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        g->calls = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&g->mu);
    if (c->send_buf)
        grpc_byte_buffer_destroy(c->send_buf);
    if (c->recv_buf)
        grpc_byte_buffer_destroy(c->recv_buf);
    grpc_metadata_array_destroy(&c->init_md);
    grpc_metadata_array_destroy(&c->trail_md);
    grpc_slice_unref(c->details);
    grpc_call_unref(c->call);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

static void on_call_event(rcall *c, rop op, bool ok)
{
    pthread_mutex_lock(&c->mu); /* also waits for submit to finish starting batches */
    int pending = --c->pending;
    pthread_mutex_unlock(&c->mu);
    if (op == ROP_RECV) {
        if (ok && c->recv_buf) {
            on_message(c);
            start_recv(c);
        } else {
            c->stream_ended = true;
        }
    } else if (op == ROP_STATUS) {
        c->got_status = true;
    }
    if (c->got_status && (c->stream_ended || c->status != GRPC_STATUS_OK) && pending == 0) {
        call_done(c);
        call_free(c);
    }
}

/* ---- the client thread ---- */

static void *client_main(void *arg)
{
    remote_group *g = arg;
    gpr_timespec next_stats = in_seconds(1);
    for (;;) {
        pthread_mutex_lock(&g->mu);
        bool idle = !g->calls;
        pthread_mutex_unlock(&g->mu);
        if (atomic_load(&g->stop) && idle && !g->stats_call)
            break;
        grpc_event ev = grpc_completion_queue_next(g->cq, in_seconds(0.2), NULL);
        if (ev.type == GRPC_OP_COMPLETE) {
            rtag *t = ev.tag;
            if (t->op == ROP_STATS)
                stats_done(g);
            else
                on_call_event(t->call, t->op, ev.success != 0);
        }
        if (!g->stats_call && !atomic_load(&g->stop) &&
            gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), next_stats) >= 0) {
            stats_start(g, STATS_DEADLINE_S);
            next_stats = in_seconds(STATS_PERIOD_S);
        }
    }
    return NULL;
}

/* ---- coord_group_ops ---- */

static grpc_byte_buffer *request_of(const engine_request *r)
{
    Entrokv__V1__GenerateRequest p = ENTROKV__V1__GENERATE_REQUEST__INIT;
    const ekv_sampler_params *sp = &r->params.sampling;
    p.has_max_tokens_case = ENTROKV__V1__GENERATE_REQUEST__HAS_MAX_TOKENS_MAX_TOKENS;
    p.max_tokens = r->params.max_tokens;
    p.has_temperature_case = ENTROKV__V1__GENERATE_REQUEST__HAS_TEMPERATURE_TEMPERATURE;
    p.temperature = sp->temperature;
    p.has_top_p_case = ENTROKV__V1__GENERATE_REQUEST__HAS_TOP_P_TOP_P;
    p.top_p = sp->top_p;
    p.has_top_k_case = ENTROKV__V1__GENERATE_REQUEST__HAS_TOP_K_TOP_K;
    p.top_k = sp->top_k;
    p.has_min_p_case = ENTROKV__V1__GENERATE_REQUEST__HAS_MIN_P_MIN_P;
    p.min_p = sp->min_p;
    p.has_repeat_penalty_case = ENTROKV__V1__GENERATE_REQUEST__HAS_REPEAT_PENALTY_REPEAT_PENALTY;
    p.repeat_penalty = sp->repeat_penalty;
    p.has_seed_case = ENTROKV__V1__GENERATE_REQUEST__HAS_SEED_SEED;
    p.seed = sp->seed;
    p.n_stop = r->params.n_stops;
    p.stop = (char **)r->params.stops;
    p.ignore_eos = r->params.ignore_eos;
    p.response_format = (char *)grammar_source(r->params.grammar); /* "" for none */
    p.has_presence_penalty_case = ENTROKV__V1__GENERATE_REQUEST__HAS_PRESENCE_PENALTY_PRESENCE_PENALTY;
    p.presence_penalty = sp->presence_penalty;
    p.has_frequency_penalty_case =
        ENTROKV__V1__GENERATE_REQUEST__HAS_FREQUENCY_PENALTY_FREQUENCY_PENALTY;
    p.frequency_penalty = sp->frequency_penalty;
    p.logprobs = r->params.logprobs;
    p.top_logprobs = r->params.top_logprobs;
    p.prompt_logprobs = r->params.prompt_logprobs;
    p.n = r->n > 1 ? r->n : 0; /* the worker forks the choices itself */
    Entrokv__V1__LogitBias bias[EKV_MAX_LOGIT_BIAS], *bias_ptrs[EKV_MAX_LOGIT_BIAS];
    for (size_t i = 0; i < sp->n_logit_bias && i < EKV_MAX_LOGIT_BIAS; i++) {
        entrokv__v1__logit_bias__init(&bias[i]);
        bias[i].token_id = sp->logit_bias[i].token;
        bias[i].bias = sp->logit_bias[i].bias;
        bias_ptrs[i] = &bias[i];
    }
    p.n_logit_bias = sp->n_logit_bias < EKV_MAX_LOGIT_BIAS ? sp->n_logit_bias : EKV_MAX_LOGIT_BIAS;
    p.logit_bias = bias_ptrs;
    p.kv_method = (char *)kvc_method_name(r->kv.method);
    p.has_kv_budget_case = ENTROKV__V1__GENERATE_REQUEST__HAS_KV_BUDGET_KV_BUDGET;
    p.kv_budget = (float)r->kv.budget;
    p.decode_method = (char *)kvc_decode_name(r->kv.decode.mode);
    p.has_scope_recent_case = ENTROKV__V1__GENERATE_REQUEST__HAS_SCOPE_RECENT_SCOPE_RECENT;
    p.scope_recent = r->kv.decode.recent;
    p.has_scope_window_case = ENTROKV__V1__GENERATE_REQUEST__HAS_SCOPE_WINDOW_SCOPE_WINDOW;
    p.scope_window = r->kv.decode.window;
    p.has_spark_ratio_case = ENTROKV__V1__GENERATE_REQUEST__HAS_SPARK_RATIO_SPARK_RATIO;
    p.spark_ratio = (float)r->kv.spark.ratio;
    p.spark_recovery = r->kv.spark.recovery == KVC_SPARK_ZERO ? "zero" : "avg";
    p.recall = r->kv.recall;
    p.recall_every = r->kv.recall_every;
    p.has_recall_promote_case = ENTROKV__V1__GENERATE_REQUEST__HAS_RECALL_PROMOTE_RECALL_PROMOTE;
    p.recall_promote = !r->kv.recall_no_promote;
    p.has_recall_gather_case = ENTROKV__V1__GENERATE_REQUEST__HAS_RECALL_GATHER_RECALL_GATHER;
    p.recall_gather = r->kv.recall_gather;
    Entrokv__V1__WorkerGenerateRequest w = ENTROKV__V1__WORKER_GENERATE_REQUEST__INIT;
    w.n_prompt_ids = (size_t)r->n_prompt;
    w.prompt_ids = (int32_t *)r->prompt;
    w.params = &p;
    return pack(&w.base);
}

static ekv_status remote_submit(void *impl, const engine_request *r, uint64_t *id,
                                ekv_error *err)
{
    remote_group *g = impl;
    if (r->n > COORD_MAX_N || (r->n > 1 && !r->choice_ctx))
        return ekv_error_set(err, EKV_EINVAL, "n must be in [1, %d], got %d", COORD_MAX_N, r->n);
    rcall *c = calloc(1, sizeof *c);
    if (!c)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    c->g = g;
    c->req = *r;
    c->req.prompt = NULL;
    c->n = r->n > 1 ? r->n : 1;
    for (int32_t i = 0; i < c->n; i++)
        c->ctxs[i] = r->n > 1 ? r->choice_ctx[i] : r->ctx;
    c->req.choice_ctx = NULL;
    c->t_start = (rtag){c, ROP_START};
    c->t_recv = (rtag){c, ROP_RECV};
    c->t_status = (rtag){c, ROP_STATUS};
    c->details = grpc_empty_slice();
    pthread_mutex_init(&c->mu, NULL);
    grpc_metadata_array_init(&c->init_md);
    grpc_metadata_array_init(&c->trail_md);
    c->send_buf = request_of(r);
    grpc_slice method = grpc_slice_from_static_string("/entrokv.v1.Worker/Generate");
    c->call = grpc_channel_create_call(g->channel, NULL, GRPC_PROPAGATE_DEFAULTS, g->cq, method,
                                       NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    pthread_mutex_lock(&g->mu);
    c->id = ++g->next_id;
    c->next = g->calls;
    if (g->calls)
        g->calls->prev = c;
    g->calls = c;
    pthread_mutex_unlock(&g->mu);
    *id = c->id;
    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = c->send_buf;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &c->init_md;
    grpc_op st = {.op = GRPC_OP_RECV_STATUS_ON_CLIENT};
    st.data.recv_status_on_client.trailing_metadata = &c->trail_md;
    st.data.recv_status_on_client.status = &c->status;
    st.data.recv_status_on_client.status_details = &c->details;
    /* The client thread may see these complete before we return: it frees
     * the call only after all three, and the status one is started last. */
    call_start(c, ops, 4, &c->t_start);
    start_recv(c);
    call_start(c, &st, 1, &c->t_status);
    return EKV_OK;
}

static void remote_cancel(void *impl, uint64_t id)
{
    remote_group *g = impl;
    pthread_mutex_lock(&g->mu);
    for (rcall *c = g->calls; c; c = c->next)
        if (c->id == id)
            grpc_call_cancel(c->call, NULL);
    pthread_mutex_unlock(&g->mu);
}

static void remote_stats(void *impl, engine_stats *s)
{
    remote_group *g = impl;
    pthread_mutex_lock(&g->mu);
    *s = g->stats;
    pthread_mutex_unlock(&g->mu);
}

static void remote_destroy(void *impl)
{
    remote_group *g = impl;
    pthread_mutex_lock(&g->mu);
    for (rcall *c = g->calls; c; c = c->next)
        grpc_call_cancel(c->call, NULL);
    pthread_mutex_unlock(&g->mu);
    atomic_store(&g->stop, true);
    if (g->thread_started)
        pthread_join(g->thread, NULL);
    grpc_completion_queue_shutdown(g->cq);
    while (grpc_completion_queue_next(g->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(g->cq);
    grpc_channel_destroy(g->channel);
    pthread_mutex_destroy(&g->mu);
    free(g);
    grpc_shutdown();
}

static const coord_group_ops remote_ops = {
    .submit = remote_submit,
    .cancel = remote_cancel,
    .stats = remote_stats,
    .destroy = remote_destroy,
};

void coord_set_worker_tls(ekv_coordinator *c, const ekv_tls_client *tls)
{
    c->worker_tls = tls;
}

/* TLS to the workers when a CA is configured (and a client certificate for
 * workers that require one), else plaintext. */
static grpc_channel_credentials *channel_credentials(const ekv_tls_client *t)
{
    if (!t || !t->ca_pem)
        return grpc_insecure_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {t->key_pem, t->cert_pem};
    return grpc_ssl_credentials_create(t->ca_pem, t->cert_pem ? &pair : NULL, NULL, NULL);
}

ekv_status coord_add_remote_slot(ekv_coordinator *c, const char *target, int *slot,
                                 ekv_error *err)
{
    remote_group *g = calloc(1, sizeof *g);
    if (!g)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    grpc_init();
    snprintf(g->target, sizeof g->target, "%s", target);
    pthread_mutex_init(&g->mu, NULL);
    atomic_init(&g->stop, false);
    g->coord = c;
    g->need_ctx = coord_max_ctx(c);
    g->health = -1;
    g->t_stats = (rtag){NULL, ROP_STATS};
    g->stats_details = grpc_empty_slice();
    g->cq = grpc_completion_queue_create_for_next(NULL);
    /* A worker that is down is retried every few seconds, not after gRPC's
     * default backoff of up to two minutes: it should be routed to soon
     * after it comes up. */
    grpc_arg args[7];
    memset(args, 0, sizeof args);
    for (int i = 0; i < 6; i++)
        args[i].type = GRPC_ARG_INTEGER;
    args[0].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
    args[0].value.integer = 250;
    args[1].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
    args[1].value.integer = 2000;
    /* keepalive: a stopped worker fails its calls instead of hanging them
     * (the worker's server accepts pings this often: grpc_server.c) */
    args[2].key = (char *)GRPC_ARG_KEEPALIVE_TIME_MS;
    args[2].value.integer = KEEPALIVE_MS;
    args[3].key = (char *)GRPC_ARG_KEEPALIVE_TIMEOUT_MS;
    args[3].value.integer = KEEPALIVE_TIMEOUT_MS;
    args[4].key = (char *)GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS;
    args[4].value.integer = 1;
    args[5].key = (char *)GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA;
    args[5].value.integer = 0; /* no cap: a long prefill sends no data for a while */
    grpc_channel_args ch = {.num_args = 6, .args = args};
    const ekv_tls_client *tls = c->worker_tls;
    if (tls && tls->ca_pem && tls->server_name) { /* the name the workers' certificates carry */
        args[6].type = GRPC_ARG_STRING;
        args[6].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        args[6].value.string = tls->server_name;
        ch.num_args = 7;
    }
    grpc_channel_credentials *creds = channel_credentials(tls);
    g->channel = grpc_channel_create(target, creds, &ch);
    grpc_channel_credentials_release(creds);
    int at = -1;
    /* added unhealthy: the client thread's first Stats decides */
    ekv_status rc = coord_add_group_slot(c, target, &remote_ops, g, false, &at, err);
    g->thread_started = rc == EKV_OK && pthread_create(&g->thread, NULL, client_main, g) == 0;
    if (rc == EKV_OK && !g->thread_started) {
        coord_retire_group(c, at); /* never routed to: it was never healthy */
        rc = ekv_error_set(err, EKV_EIO, "cannot start the client thread");
    }
    if (rc == EKV_OK) {
        if (slot)
            *slot = at;
        return EKV_OK;
    }
    if (at >= 0)
        return rc; /* the retired slot owns g now; coord_reap_groups frees it */
    grpc_completion_queue_shutdown(g->cq);
    while (grpc_completion_queue_next(g->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(g->cq);
    grpc_channel_destroy(g->channel);
    pthread_mutex_destroy(&g->mu);
    free(g);
    grpc_shutdown();
    return rc;
}

ekv_status coord_add_remote(ekv_coordinator *c, const char *target, ekv_error *err)
{
    return coord_add_remote_slot(c, target, NULL, err);
}
