/*
 * http_completion.c - the completion replies of the HTTP server (http.c):
 * a request's body parsed, submitted and answered.
 *
 * Without "stream" the connection's thread blocks until every choice is
 * done and answers one JSON response; with "stream" the response is an SSE
 * callback (sse_read) that blocks on the request's coord_stream and writes
 * `data: {...}\n\n` per batch of new text, then `data: [DONE]\n\n`. While
 * waiting, both poll the socket, so a client that goes away is noticed
 * within SOCKET_POLL_S and its request cancelled.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "http_internal.h"

#define SOCKET_POLL_S 0.2
#define SSE_BLOCK 16384

typedef struct sse_state {
    ekv_http *h;
    struct MHD_Connection *conn;
    coord_stream *s;
    oai_meta meta[COORD_MAX_N];  /* one per choice */
    bool role_sent[COORD_MAX_N];
    int32_t n;
    engine_usage usage;          /* the choices' sum */
    int32_t n_done;
    bool include_usage;
    int fd;
    char *out;
    size_t len, off, cap;
    bool finished;
} sse_state;

/* ---- small helpers ---- */

/* Restarts the connection's idle timer: the time a request spent waiting
 * for the engine is not the client's idleness. (MHD restarts the timer
 * when a connection's timeout goes from 0 to a value.) */
static void idle_timer_restart(ekv_http *h, struct MHD_Connection *conn)
{
    if (!h->timeout_s)
        return;
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
    MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, h->timeout_s);
}

static enum MHD_Result reply_json(struct MHD_Connection *conn, unsigned code, char *json)
{
    return http_reply(conn, code, "application/json", json, false);
}

static unsigned http_code_of(ekv_coordinator *c, ekv_status rc)
{
    switch (rc) {
    case EKV_EINVAL: return 400;
    case EKV_EUNAVAILABLE: return 503; /* a worker group failed */
    case EKV_EBUSY: return coord_draining(c) || !coord_ready(c, NULL, 0) ? 503 : 429;
    default: return 500;
    }
}

static int connection_fd(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

/* Whether the peer closed or reset the connection. */
static bool client_gone(int fd)
{
    if (fd < 0)
        return false;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static void meta_init(oai_meta *m, ekv_coordinator *c, oai_kind kind, coord_stream *s,
                      int32_t index)
{
    m->kind = kind;
    m->index = index;
    snprintf(m->id, sizeof m->id, "%s-%llu", kind == OAI_CHAT ? "chatcmpl" : "cmpl",
             (unsigned long long)coord_stream_id(s));
    m->created = (long long)time(NULL);
    m->model = coord_model_name(c);
}

/* ---- SSE streaming ---- */

static bool sse_append(sse_state *st, const char *data, size_t n)
{
    if (st->len + n > st->cap) {
        size_t cap = st->cap ? st->cap : 4096;
        while (cap < st->len + n)
            cap *= 2;
        char *p = realloc(st->out, cap);
        if (!p)
            return false;
        st->out = p;
        st->cap = cap;
    }
    memcpy(st->out + st->len, data, n);
    st->len += n;
    return true;
}

static bool sse_event(sse_state *st, char *json)
{
    bool ok = json && sse_append(st, "data: ", 6) && sse_append(st, json, strlen(json)) &&
              sse_append(st, "\n\n", 2);
    free(json);
    return ok;
}

/* Formats one take of the stream (one choice's news) as SSE events. */
static bool sse_format(sse_state *st, const coord_chunk *ch)
{
    if (ch->index < 0 || ch->index >= st->n)
        return false;
    oai_meta *m = &st->meta[ch->index];
    if (m->kind == OAI_CHAT && !st->role_sent[ch->index]) {
        st->role_sent[ch->index] = true;
        if (!sse_event(st, oai_chunk_json(m, NULL, true)))
            return false;
    }
    if (ch->done && ch->rc != EKV_OK) {
        st->finished = true; /* (release cancels the other choices) */
        return sse_event(st, oai_error_json(ch->msg, "server_error")) &&
               sse_append(st, "data: [DONE]\n\n", 14);
    }
    if (oai_chunk_wanted(m, ch)) {
        if (!sse_event(st, oai_chunk_json(m, ch, false)))
            return false;
    }
    if (!ch->done)
        return true;
    oai_usage_add(&st->usage, &ch->usage, st->n_done++ == 0);
    if (!ch->last)
        return true;
    st->finished = true;
    if (st->include_usage && !sse_event(st, oai_usage_chunk_json(m, &st->usage)))
        return false;
    return sse_append(st, "data: [DONE]\n\n", 14);
}

static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    sse_state *st = cls;
    while (st->off == st->len) {
        if (st->finished)
            return MHD_CONTENT_READER_END_OF_STREAM;
        st->off = st->len = 0;
        if (atomic_load(&st->h->aborting)) { /* past the drain timeout: say so, then end */
            st->finished = true;
            if (!sse_event(st, oai_error_json(HTTP_ABORT_MSG, "service_unavailable")) ||
                !sse_append(st, "data: [DONE]\n\n", 14))
                return MHD_CONTENT_READER_END_WITH_ERROR;
            continue;
        }
        if (!coord_stream_wait(st->s, SOCKET_POLL_S)) {
            if (client_gone(st->fd) || atomic_load(&st->h->stopping))
                return MHD_CONTENT_READER_END_WITH_ERROR;
            continue;
        }
        coord_chunk ch;
        coord_stream_take(st->s, &ch);
        bool ok = sse_format(st, &ch);
        coord_chunk_free(&ch);
        if (!ok)
            return MHD_CONTENT_READER_END_WITH_ERROR;
    }
    size_t n = st->len - st->off < max ? st->len - st->off : max;
    memcpy(buf, st->out + st->off, n);
    st->off += n;
    idle_timer_restart(st->h, st->conn);
    return (ssize_t)n;
}

/* Called by MHD when the response is done with, finished or not: a stream
 * still running here lost its client, and release cancels it. */
static void sse_free(void *cls)
{
    sse_state *st = cls;
    coord_stream_release(st->s);
    for (int32_t i = 0; i < st->n; i++)
        oai_meta_free(&st->meta[i]);
    free(st->out);
    free(st);
}

static enum MHD_Result reply_stream(ekv_http *h, struct MHD_Connection *conn, coord_stream *s,
                                    const oai_request *req)
{
    sse_state *st = calloc(1, sizeof *st);
    if (!st) {
        coord_stream_release(s);
        return MHD_NO;
    }
    st->h = h;
    st->conn = conn;
    st->s = s;
    st->include_usage = req->include_usage;
    st->fd = connection_fd(conn);
    bool ok = true;
    for (; ok && st->n < coord_stream_choices(s) && st->n < COORD_MAX_N; st->n++) {
        meta_init(&st->meta[st->n], h->coord, req->kind, s, st->n);
        ok = oai_meta_set(&st->meta[st->n], req);
    }
    if (!ok) {
        sse_free(st);
        return MHD_NO;
    }
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, SSE_BLOCK, sse_read, st, sse_free);
    if (!r) {
        sse_free(st);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- whole (non-streamed) completions ---- */

typedef struct collected {
    char *text;
    size_t len, cap;
    coord_chunk done;
} collected;

static bool collect(collected *c, const coord_chunk *ch)
{
    if (c->len + ch->text_len + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 1024;
        while (cap < c->len + ch->text_len + 1)
            cap *= 2;
        char *p = realloc(c->text, cap);
        if (!p)
            return false;
        c->text = p;
        c->cap = cap;
    }
    if (ch->text_len)
        memcpy(c->text + c->len, ch->text, ch->text_len);
    c->len += ch->text_len;
    c->text[c->len] = 0;
    if (ch->done)
        c->done = *ch;
    return true;
}

/* Each choice's text, done record and log-probabilities, until the last. */
typedef struct whole {
    int32_t n;
    collected c[COORD_MAX_N];
    oai_meta meta[COORD_MAX_N];
    engine_usage usage;
    int32_t n_done;
    const coord_chunk *failed;   /* the first choice that failed, or NULL */
    bool over;                   /* every choice's done record is in */
} whole;

static void whole_free(whole *w)
{
    for (int32_t i = 0; i < w->n; i++) {
        oai_meta_free(&w->meta[i]);
        free(w->c[i].text);
    }
}

static bool whole_take(whole *w, const coord_chunk *ch)
{
    if (ch->index < 0 || ch->index >= w->n)
        return false;
    collected *c = &w->c[ch->index];
    if (!collect(c, ch) || !oai_meta_collect(&w->meta[ch->index], ch))
        return false;
    if (ch->done) {
        oai_usage_add(&w->usage, &ch->usage, w->n_done++ == 0);
        if (ch->rc != EKV_OK && !w->failed)
            w->failed = &c->done;
        w->over = ch->last || w->failed;
    }
    return true;
}

/* The response of w: all its choices, or with best_of the n best. */
static char *whole_json(whole *w, const oai_request *req)
{
    int32_t order[COORD_MAX_N];
    const int32_t n = req->best_of > 1 ? req->n : w->n;
    if (req->best_of > 1)
        oai_best_of(w->meta, w->n, n, order);
    else
        for (int32_t i = 0; i < n; i++)
            order[i] = i;
    oai_meta m[COORD_MAX_N];
    const char *text[COORD_MAX_N];
    coord_chunk done[COORD_MAX_N];
    for (int32_t i = 0; i < n; i++) {
        m[i] = w->meta[order[i]];
        m[i].index = i;
        text[i] = w->c[order[i]].text;
        done[i] = w->c[order[i]].done;
    }
    return oai_response_json(m, text, done, n, &w->usage);
}

static enum MHD_Result reply_whole(ekv_http *h, struct MHD_Connection *conn, coord_stream *s,
                                   const oai_request *req)
{
    int fd = connection_fd(conn);
    whole *w = calloc(1, sizeof *w);
    bool ok = w != NULL;
    for (; ok && w->n < coord_stream_choices(s) && w->n < COORD_MAX_N; w->n++) {
        meta_init(&w->meta[w->n], h->coord, req->kind, s, w->n);
        ok = oai_meta_set(&w->meta[w->n], req);
    }
    while (ok && !w->over && !atomic_load(&h->aborting)) {
        if (!coord_stream_wait(s, SOCKET_POLL_S)) {
            if (client_gone(fd) || atomic_load(&h->stopping))
                ok = false;
            continue;
        }
        coord_chunk ch;
        coord_stream_take(s, &ch);
        ok = whole_take(w, &ch);
        coord_chunk_free(&ch);
    }
    coord_stream_release(s); /* cancels the request if the client went away */
    idle_timer_restart(h, conn);
    enum MHD_Result ret = MHD_NO;
    if (ok && !w->over) /* past the drain timeout */
        ret = http_reply_error(h, conn, 503, HTTP_ABORT_MSG);
    else if (ok && w->failed)
        ret = http_reply_error(h, conn, http_code_of(h->coord, w->failed->rc), w->failed->msg);
    else if (ok)
        ret = reply_json(conn, 200, whole_json(w, req));
    if (w)
        whole_free(w);
    free(w);
    return ret;
}

/* ---- the request ---- */

enum MHD_Result http_handle_completion(ekv_http *h, struct MHD_Connection *conn, oai_kind kind,
                                       const char *body, size_t len)
{
    ekv_error err = {0};
    oai_request req;
    ekv_status rc = oai_parse(h->coord, kind, body, len, &req, &err);
    coord_stream *s = NULL;
    if (rc == EKV_OK)
        rc = coord_submit(h->coord, &req.r, &s, &err);
    else
        metrics_count_request(coord_metrics(h->coord), METRICS_INVALID);
    enum MHD_Result ret;
    if (rc)
        ret = http_reply_error(h, conn, http_code_of(h->coord, rc), err.msg);
    else if (req.stream)
        ret = reply_stream(h, conn, s, &req);
    else
        ret = reply_whole(h, conn, s, &req);
    oai_request_free(&req);
    return ret;
}
