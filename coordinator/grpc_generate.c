/*
 * grpc_generate.c - entrokv.v1.Generation over the gRPC server: Generate
 * (server streaming) and Tokenize (unary).
 *
 * Generate: the request becomes a coord_request and is submitted; the
 * stream's notify hook (grpc_wake, on the engine thread) starts an empty
 * batch on the call, which the C core completes at once as OP_WAKE on the
 * server thread's queue. The server thread then sends everything new as one
 * GenerateResponse; while a send is in flight new tokens accumulate in the
 * stream and go out together when it completes. At most one SEND_MESSAGE
 * is in flight per call, as the C core requires. With n > 1 each message
 * is one choice's (its index); a choice's end is a message with its
 * finish_reason and usage, and the status follows the last choice's.
 *
 * Generate and Tokenize are prepared (chat template, tokenizer, checks,
 * submit) on the preparation pool, not on the server thread (see
 * grpc_internal.h); Worker.Generate, which carries token ids, is cheap and
 * stays inline.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/proto/entrokv.pb-c.h"
#include "grpc_internal.h"

/* ---- request conversion ---- */

typedef struct proto_request {
    coord_request r;
    tok_message *msgs;
    ekv_logit_bias *bias;
    char bad[160];           /* a field refused while converting */
} proto_request;

/* Fields this server does not know (a newer client's) are refused, never
 * ignored: protobuf-c keeps them in the message's unknown_fields. */
static bool unknown_field(const ProtobufCMessage *m, const char *what, char *msg, size_t cap)
{
    if (m->n_unknown_fields == 0)
        return false;
    snprintf(msg, cap, "%s field %u is not supported by this server", what,
             (unsigned)m->unknown_fields[0].tag);
    return true;
}

static bool messages_from_proto(proto_request *pr, Entrokv__V1__Message **m, size_t n)
{
    if (n == 0)
        return true;
    pr->msgs = calloc(n, sizeof *pr->msgs);
    if (!pr->msgs)
        return false;
    for (size_t i = 0; i < n; i++) {
        unknown_field(&m[i]->base, "Message", pr->bad, sizeof pr->bad);
        pr->msgs[i] = (tok_message){m[i]->role, m[i]->content};
    }
    pr->r.messages = pr->msgs;
    pr->r.n_messages = n;
    return true;
}

/* Fills pr from the message; strings point into m, which must outlive pr. */
static bool request_from_proto(ekv_coordinator *coord, const Entrokv__V1__GenerateRequest *m,
                               proto_request *pr)
{
    coord_request *r = &pr->r;
    coord_request_init(coord, r);
    r->protocol = "grpc";
    r->prompt = m->prompt;
    r->prompt_len = strlen(m->prompt);
    ekv_sampler_params *sp = &r->params.sampling;
    if (m->has_max_tokens_case == ENTROKV__V1__GENERATE_REQUEST__HAS_MAX_TOKENS_MAX_TOKENS)
        r->params.max_tokens = m->max_tokens;
    if (m->has_temperature_case == ENTROKV__V1__GENERATE_REQUEST__HAS_TEMPERATURE_TEMPERATURE)
        sp->temperature = m->temperature;
    if (m->has_top_p_case == ENTROKV__V1__GENERATE_REQUEST__HAS_TOP_P_TOP_P)
        sp->top_p = m->top_p;
    if (m->has_top_k_case == ENTROKV__V1__GENERATE_REQUEST__HAS_TOP_K_TOP_K)
        sp->top_k = m->top_k;
    if (m->has_min_p_case == ENTROKV__V1__GENERATE_REQUEST__HAS_MIN_P_MIN_P)
        sp->min_p = m->min_p;
    if (m->has_repeat_penalty_case ==
        ENTROKV__V1__GENERATE_REQUEST__HAS_REPEAT_PENALTY_REPEAT_PENALTY)
        sp->repeat_penalty = m->repeat_penalty;
    if (m->has_seed_case == ENTROKV__V1__GENERATE_REQUEST__HAS_SEED_SEED)
        sp->seed = m->seed;
    if (m->has_presence_penalty_case ==
        ENTROKV__V1__GENERATE_REQUEST__HAS_PRESENCE_PENALTY_PRESENCE_PENALTY)
        sp->presence_penalty = m->presence_penalty;
    if (m->has_frequency_penalty_case ==
        ENTROKV__V1__GENERATE_REQUEST__HAS_FREQUENCY_PENALTY_FREQUENCY_PENALTY)
        sp->frequency_penalty = m->frequency_penalty;
    r->params.stops = (const char *const *)m->stop;
    r->params.n_stops = m->n_stop;
    r->params.ignore_eos = m->ignore_eos;
    if (m->response_format && *m->response_format) {
        r->response_format = m->response_format;
        r->response_format_len = strlen(m->response_format);
    }
    r->params.logprobs = m->logprobs;
    r->params.top_logprobs = m->top_logprobs;
    r->params.prompt_logprobs = m->prompt_logprobs;
    r->n = m->n; /* coord_submit checks it */
    if (m->kv_method && *m->kv_method) /* proto3: "" is unset, the server's default stays */
        r->kv_method = m->kv_method;
    if (m->has_kv_budget_case == ENTROKV__V1__GENERATE_REQUEST__HAS_KV_BUDGET_KV_BUDGET)
        r->kv_budget = m->kv_budget;
    r->decode_method = m->decode_method;
    if (m->has_scope_recent_case == ENTROKV__V1__GENERATE_REQUEST__HAS_SCOPE_RECENT_SCOPE_RECENT)
        r->scope_recent = m->scope_recent;
    if (m->has_scope_window_case == ENTROKV__V1__GENERATE_REQUEST__HAS_SCOPE_WINDOW_SCOPE_WINDOW)
        r->scope_window = m->scope_window;
    if (m->has_spark_ratio_case == ENTROKV__V1__GENERATE_REQUEST__HAS_SPARK_RATIO_SPARK_RATIO)
        r->spark_ratio = m->spark_ratio;
    r->spark_recovery = m->spark_recovery;
    r->recall = m->recall;
    r->recall_every = m->recall_every;
    if (m->has_recall_promote_case ==
        ENTROKV__V1__GENERATE_REQUEST__HAS_RECALL_PROMOTE_RECALL_PROMOTE)
        r->recall_no_promote = !m->recall_promote;
    if (m->has_recall_gather_case ==
        ENTROKV__V1__GENERATE_REQUEST__HAS_RECALL_GATHER_RECALL_GATHER)
        r->recall_gather = m->recall_gather; /* absent: the server's default */
    unknown_field(&m->base, "GenerateRequest", pr->bad, sizeof pr->bad);
    if (m->top_logprobs < 0 || m->top_logprobs > EKV_MAX_TOP_LOGPROBS)
        snprintf(pr->bad, sizeof pr->bad, "top_logprobs must be in [0, %d], got %d",
                 EKV_MAX_TOP_LOGPROBS, (int)m->top_logprobs);
    if (m->n_logit_bias > EKV_MAX_LOGIT_BIAS)
        snprintf(pr->bad, sizeof pr->bad, "logit_bias holds at most %d entries, got %zu",
                 EKV_MAX_LOGIT_BIAS, m->n_logit_bias);
    else if (m->n_logit_bias > 0) {
        if (!(pr->bias = malloc(m->n_logit_bias * sizeof *pr->bias)))
            return false;
        for (size_t i = 0; i < m->n_logit_bias; i++) {
            unknown_field(&m->logit_bias[i]->base, "LogitBias", pr->bad, sizeof pr->bad);
            pr->bias[i] = (ekv_logit_bias){m->logit_bias[i]->token_id, m->logit_bias[i]->bias};
        }
        sp->logit_bias = pr->bias;
        sp->n_logit_bias = m->n_logit_bias;
    }
    return messages_from_proto(pr, m->messages, m->n_messages);
}

static grpc_status_code status_of(ekv_coordinator *coord, ekv_status rc)
{
    switch (rc) {
    case EKV_OK: return GRPC_STATUS_OK;
    case EKV_EINVAL: return GRPC_STATUS_INVALID_ARGUMENT;
    case EKV_EUNAVAILABLE: return GRPC_STATUS_UNAVAILABLE; /* a worker group failed */
    case EKV_EBUSY:
        return coord_draining(coord) || !coord_ready(coord, NULL, 0)
                   ? GRPC_STATUS_UNAVAILABLE
                   : GRPC_STATUS_RESOURCE_EXHAUSTED;
    default: return GRPC_STATUS_INTERNAL;
    }
}

/* ---- Generate ---- */

/* The stream's notify hook, on the engine thread with the stream locked:
 * queue an OP_WAKE for the server thread. */
static void grpc_wake(void *ctx)
{
    rpc_call *c = ctx;
    pthread_mutex_lock(&c->mu);
    if (grpc_call_start_batch(c->call, NULL, 0, &c->t_wake, NULL) == GRPC_CALL_OK)
        c->wakes++;
    pthread_mutex_unlock(&c->mu);
}

/* Submits pr (any thread): the stream, or the status and message why not. */
static ekv_status submit_request(ekv_coordinator *coord, proto_request *pr, bool ok,
                                 coord_stream **stream, ekv_error *err)
{
    *stream = NULL;
    ekv_status rc = !ok        ? ekv_error_set(err, EKV_ENOMEM, "out of memory")
                    : *pr->bad ? ekv_error_set(err, EKV_EINVAL, "%s", pr->bad)
                               : coord_submit(coord, &pr->r, stream, err);
    if (ok && *pr->bad)
        metrics_count_request(coord_metrics(coord), METRICS_INVALID);
    free(pr->msgs);
    free(pr->bias);
    pr->msgs = NULL;
    pr->bias = NULL;
    return rc;
}

/* On the server thread: the call streams from s, or ends with rc. */
static void start_streaming(rpc_call *c, ekv_status rc, const ekv_error *err, coord_stream *s)
{
    if (rc) {
        rpc_finish(c, status_of(c->srv->coord, rc), err->msg, NULL);
        return;
    }
    c->stream = s;
    coord_stream_set_notify(c->stream, grpc_wake, c);
}

/* Submits pr inline; on success the call streams from the request's stream. */
static void generate_submit(rpc_call *c, proto_request *pr, bool ok)
{
    ekv_error err = {0};
    coord_stream *s = NULL;
    ekv_status rc = submit_request(c->srv->coord, pr, ok, &s, &err);
    start_streaming(c, rc, &err, s);
}

/* ---- preparation off the server thread ---- */

typedef struct prep_call {
    prep_job job;
    rpc_call *c;
    ekv_coordinator *coord;
    rpc_method method;
    ProtobufCMessage *m;         /* the request message pr points into (freed by run) */
    proto_request pr;            /* Generate */
    bool ok;
    ekv_status rc;               /* the result, */
    ekv_error err;
    coord_stream *stream;        /* Generate's, */
    int32_t *ids;                /* Tokenize's */
    size_t n_ids;
} prep_call;

/* Hands the result to the server thread: OP_PREPARED. */
static void prep_post(prep_call *p)
{
    rpc_call *c = p->c;
    pthread_mutex_lock(&c->mu);
    c->prepared = &p->job;
    /* an empty batch completes at once (as grpc_wake's); the call is alive:
     * its pending count includes this preparation */
    grpc_call_error e = grpc_call_start_batch(c->call, NULL, 0, &c->t_prep, NULL);
    pthread_mutex_unlock(&c->mu);
    if (e != GRPC_CALL_OK)
        coord_log("grpc: cannot post a prepared request: %s", grpc_call_error_to_string(e));
}

static void tokenize_request(prep_call *p);

static void prep_run(prep_job *j)
{
    prep_call *p = (prep_call *)j;
    if (p->method == M_TOKENIZE)
        tokenize_request(p);
    else
        p->rc = submit_request(p->coord, &p->pr, p->ok, &p->stream, &p->err);
    protobuf_c_message_free_unpacked(p->m, NULL);
    p->m = NULL;
    prep_post(p);
}

/* The server thread's part: count the call pending and queue its work
 * (inline when the pool could not start). */
static void prepare(rpc_call *c, prep_call *p)
{
    p->job.run = prep_run;
    p->c = c;
    p->coord = c->srv->coord;
    p->method = c->method;
    c->pending++; /* OP_PREPARED counts it down */
    if (c->srv->prep)
        prep_pool_submit(c->srv->prep, &p->job);
    else
        prep_run(&p->job);
}

static grpc_byte_buffer *tokenize_response(const int32_t *ids, size_t n);

void rpc_on_prepared(rpc_call *c)
{
    pthread_mutex_lock(&c->mu);
    prep_call *p = (prep_call *)c->prepared;
    c->prepared = NULL;
    pthread_mutex_unlock(&c->mu);
    if (!p)
        return;
    if (p->method == M_TOKENIZE) {
        if (p->rc)
            rpc_finish(c, status_of(p->coord, p->rc), p->err.msg, NULL);
        else
            rpc_finish(c, GRPC_STATUS_OK, "", tokenize_response(p->ids, p->n_ids));
        free(p->ids);
    } else {
        /* a client gone meanwhile: the stream is released (cancelled) with the call */
        start_streaming(c, p->rc, &p->err, p->stream);
    }
    free(p);
}

static void malformed(rpc_call *c, const char *msg)
{
    metrics_count_request(coord_metrics(c->srv->coord), METRICS_INVALID);
    rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, msg, NULL);
}

void rpc_generate_on_request(rpc_call *c, grpc_byte_buffer *b)
{
    char why[256];
    Entrokv__V1__GenerateRequest *m = (Entrokv__V1__GenerateRequest *)rpc_unpack(
        &entrokv__v1__generate_request__descriptor, b, why, sizeof why);
    if (!m) {
        malformed(c, why);
        return;
    }
    prep_call *p = calloc(1, sizeof *p);
    if (!p) {
        protobuf_c_message_free_unpacked(&m->base, NULL);
        rpc_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
        return;
    }
    p->m = &m->base;
    p->ok = request_from_proto(c->srv->coord, m, &p->pr); /* pointers into m: cheap */
    prepare(c, p);
}

/* Worker.Generate: token ids from the coordinator plus the parameters of
 * a GenerateRequest (whose prompt and messages are ignored). */
void rpc_worker_generate_on_request(rpc_call *c, grpc_byte_buffer *b)
{
    char why[256];
    Entrokv__V1__WorkerGenerateRequest *m = (Entrokv__V1__WorkerGenerateRequest *)rpc_unpack(
        &entrokv__v1__worker_generate_request__descriptor, b, why, sizeof why);
    if (!m) {
        malformed(c, why);
        return;
    }
    proto_request pr = {0};
    Entrokv__V1__GenerateRequest none = ENTROKV__V1__GENERATE_REQUEST__INIT;
    Entrokv__V1__GenerateRequest *params = m->params ? m->params : &none;
    bool ok = request_from_proto(c->srv->coord, params, &pr);
    unknown_field(&m->base, "WorkerGenerateRequest", pr.bad, sizeof pr.bad);
    free(pr.msgs); /* messages are ignored here */
    pr.msgs = NULL;
    pr.r.messages = NULL;
    pr.r.n_messages = 0;
    pr.r.prompt = NULL;
    pr.r.prompt_len = 0;
    static const int32_t no_ids[1];
    pr.r.prompt_ids = m->prompt_ids ? m->prompt_ids : no_ids; /* ids mode even when empty */
    pr.r.n_prompt_ids = m->n_prompt_ids;
    pr.r.protocol = "worker";
    generate_submit(c, &pr, ok);
    protobuf_c_message_free_unpacked(&m->base, NULL);
}

void rpc_worker_stats_on_request(rpc_call *c, grpc_byte_buffer *b)
{
    (void)b;
    engine_stats st;
    coord_stats(c->srv->coord, &st);
    if (st.tp_broken) { /* the coordinator's health check: this group is gone */
        rpc_finish(c, GRPC_STATUS_UNAVAILABLE,
                   "tensor-parallel group broken: a rank died or stopped answering", NULL);
        return;
    }
    Entrokv__V1__StatsResponse resp = ENTROKV__V1__STATS_RESPONSE__INIT;
    resp.queued = st.queued;
    resp.running = st.running;
    resp.kv_blocks_total = st.kv_blocks_total;
    resp.kv_blocks_free = st.kv_blocks_free;
    resp.kv_bytes_saved = st.kv_bytes_saved;
    resp.kv_bytes_saved_tokens = st.kv_bytes_saved_tokens;
    resp.kv_bytes_saved_channels = st.kv_bytes_saved_channels;
    resp.kv_bytes_saved_decode = st.kv_bytes_saved_decode;
    resp.preemptions = st.preemptions;
    resp.steps = st.steps;
    resp.kv_blocks_shared = st.kv_blocks_shared;
    resp.kv_cow_copies = st.kv_cow_copies;
    resp.recall_blocks = st.recall_blocks;
    resp.recall_bytes = st.recall_bytes;
    resp.recall_deadline_misses = st.recall_deadline_misses;
    resp.recall_promotions = st.recall_promotions;
    resp.recall_spilled_blocks = st.recall_spilled_blocks;
    resp.recall_rankings = st.recall_rankings;
    resp.max_ctx = coord_max_ctx(c->srv->coord);
    resp.model_identity = (char *)coord_model_identity(c->srv->coord);
    rpc_finish(c, GRPC_STATUS_OK, "", rpc_pack(&resp.base));
}

/* The TokenLogprob messages of n entries, in one allocation that *out
 * owns: pointers, then the messages, then their TopLogprobs (NULL with n 0
 * or out of memory). */
static Entrokv__V1__TokenLogprob **lp_to_proto(const ekv_logprob *lp, int32_t n, void **out)
{
    *out = NULL;
    if (n <= 0)
        return NULL;
    size_t n_top = 0;
    for (int32_t i = 0; i < n; i++)
        n_top += (size_t)lp[i].n_top;
    const size_t N = (size_t)n;
    char *mem = malloc(N * (sizeof(void *) + sizeof(Entrokv__V1__TokenLogprob)) +
                       n_top * (sizeof(void *) + sizeof(Entrokv__V1__TopLogprob)));
    if (!mem)
        return NULL;
    Entrokv__V1__TokenLogprob **ptrs = (Entrokv__V1__TokenLogprob **)mem;
    Entrokv__V1__TopLogprob **top_ptrs = (Entrokv__V1__TopLogprob **)(ptrs + N);
    Entrokv__V1__TokenLogprob *msgs = (Entrokv__V1__TokenLogprob *)(top_ptrs + n_top);
    Entrokv__V1__TopLogprob *tops = (Entrokv__V1__TopLogprob *)(msgs + N);
    size_t t = 0;
    for (size_t i = 0; i < N; i++) {
        Entrokv__V1__TokenLogprob *m = &msgs[i];
        entrokv__v1__token_logprob__init(m);
        m->token_id = lp[i].token;
        if (lp[i].logprob == lp[i].logprob) { /* NaN: the prompt's first token */
            m->has_logprob_case = ENTROKV__V1__TOKEN_LOGPROB__HAS_LOGPROB_LOGPROB;
            m->logprob = lp[i].logprob;
        }
        m->n_top_logprobs = (size_t)lp[i].n_top;
        m->top_logprobs = top_ptrs + t;
        for (int32_t j = 0; j < lp[i].n_top; j++, t++) {
            entrokv__v1__top_logprob__init(&tops[t]);
            tops[t].token_id = lp[i].top_ids[j];
            tops[t].logprob = lp[i].top_logprobs[j];
            top_ptrs[t] = &tops[t];
        }
        ptrs[i] = m;
    }
    *out = mem;
    return ptrs;
}

static grpc_byte_buffer *response_of(const coord_chunk *ch)
{
    Entrokv__V1__GenerateResponse resp = ENTROKV__V1__GENERATE_RESPONSE__INIT;
    Entrokv__V1__Usage usage = ENTROKV__V1__USAGE__INIT;
    resp.text = ch->text ? ch->text : (char *)"";
    resp.index = ch->index;
    resp.n_token_ids = (size_t)ch->n_ids;
    resp.token_ids = ch->ids;
    void *mem_lp = NULL, *mem_plp = NULL;
    if ((resp.logprobs = lp_to_proto(ch->lps, ch->n_lps, &mem_lp)))
        resp.n_logprobs = (size_t)ch->n_lps;
    if ((resp.prompt_logprobs = lp_to_proto(ch->prompt_lps, ch->n_prompt_lps, &mem_plp)))
        resp.n_prompt_logprobs = (size_t)ch->n_prompt_lps;
    if (ch->done) {
        resp.finish_reason = (char *)coord_finish_reason(ch->finish);
        usage.prompt_tokens = ch->usage.prompt_tokens;
        usage.completion_tokens = ch->usage.completion_tokens;
        usage.kv_bytes = ch->usage.kv_bytes;
        usage.kv_bytes_full = ch->usage.kv_bytes_full;
        resp.usage = &usage;
    }
    grpc_byte_buffer *b = rpc_pack(&resp.base);
    free(mem_lp);
    free(mem_plp);
    return b;
}

static void send_message(rpc_call *c, grpc_byte_buffer *b)
{
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = b;
    n++;
    c->send_buf = b;
    if (rpc_start(c, ops, n, &c->t_send)) {
        c->send_busy = true;
    } else {
        grpc_byte_buffer_destroy(b);
        c->send_buf = NULL;
    }
}

void rpc_generate_pump(rpc_call *c)
{
    if (!c->stream || c->send_busy || c->status_started || c->closed)
        return;
    coord_chunk ch;
    if (!coord_stream_take(c->stream, &ch))
        return;
    /* n > 1: a choice's end is a message; the call ends after the last */
    if (!ch.done || (ch.rc == EKV_OK && !ch.last))
        send_message(c, response_of(&ch));
    else if (ch.rc == EKV_OK)
        rpc_finish(c, GRPC_STATUS_OK, "", response_of(&ch));
    else
        rpc_finish(c, status_of(c->srv->coord, ch.rc), ch.msg, NULL);
    coord_chunk_free(&ch);
}

/* ---- Tokenize ---- */

/* On a preparation thread. */
static void tokenize_request(prep_call *p)
{
    Entrokv__V1__TokenizeRequest *m = (Entrokv__V1__TokenizeRequest *)p->m;
    proto_request pr = {0};
    coord_request_init(p->coord, &pr.r);
    pr.r.prompt = m->text;
    pr.r.prompt_len = strlen(m->text);
    p->rc = messages_from_proto(&pr, m->messages, m->n_messages)
                ? coord_tokenize(p->coord, &pr.r, &p->ids, &p->n_ids, &p->err)
                : ekv_error_set(&p->err, EKV_ENOMEM, "out of memory");
    free(pr.msgs);
}

static grpc_byte_buffer *tokenize_response(const int32_t *ids, size_t n)
{
    Entrokv__V1__TokenizeResponse resp = ENTROKV__V1__TOKENIZE_RESPONSE__INIT;
    resp.n_token_ids = n;
    resp.token_ids = (int32_t *)ids;
    return rpc_pack(&resp.base);
}

void rpc_tokenize_on_request(rpc_call *c, grpc_byte_buffer *b)
{
    char why[256];
    Entrokv__V1__TokenizeRequest *m = (Entrokv__V1__TokenizeRequest *)rpc_unpack(
        &entrokv__v1__tokenize_request__descriptor, b, why, sizeof why);
    if (!m) {
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, why, NULL);
        return;
    }
    prep_call *p = calloc(1, sizeof *p);
    if (!p) {
        protobuf_c_message_free_unpacked(&m->base, NULL);
        rpc_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory", NULL);
        return;
    }
    p->m = &m->base;
    prepare(c, p);
}
