/*
 * http.c - the HTTP server on libmicrohttpd (see http.h): framing checks,
 * the API key, routing, request bodies, /livez, /readyz (and /health, its
 * old name), /v1/models and /metrics. The completion replies (SSE streams
 * and whole responses) are in http_completion.c.
 *
 * Every request has an http_conn (MHD's per-request pointer) that collects
 * the body; the last call of the access handler answers.
 */
#include <microhttpd.h>
#include <netdb.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http_internal.h"

#define HTTP_DISCARD_LIMIT (64u << 20)

typedef struct http_conn {
    char *body;
    size_t len, cap;
    bool too_big;
    bool refused; /* a framing error already answered */
    double t_headers; /* when the headers were in (the body's deadline counts from it) */
} http_conn;

/* ---- small helpers ---- */

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

enum MHD_Result http_reply(struct MHD_Connection *conn, unsigned code, const char *ctype,
                           char *body, bool close)
{
    if (!body)
        return MHD_NO;
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (close)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result http_reply_error(ekv_http *h, struct MHD_Connection *conn, unsigned code,
                                 const char *message)
{
    const char *type = code == 429   ? "rate_limit_error"
                       : code == 503 ? "service_unavailable"
                       : code >= 500 ? "server_error"
                                     : "invalid_request_error";
    return http_reply(conn, code, "application/json", oai_error_json(message, type),
                      code == 503 || code == 413 || atomic_load(&h->draining));
}

static enum MHD_Result reply_json(struct MHD_Connection *conn, unsigned code, char *json)
{
    return http_reply(conn, code, "application/json", json, false);
}

/* ---- routes ---- */

static enum MHD_Result handle_models(ekv_http *h, struct MHD_Connection *conn)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddItemToArray(data, m);
    cJSON_AddStringToObject(m, "id", coord_model_name(h->coord));
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)h->started);
    cJSON_AddStringToObject(m, "owned_by", "entrokv");
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return reply_json(conn, 200, s);
}

static enum MHD_Result handle_metrics(ekv_http *h, struct MHD_Connection *conn)
{
    metrics_gauges g;
    coord_gauges(h->coord, &g);
    char *text = metrics_render(coord_metrics(h->coord), &g, NULL);
    return http_reply(conn, 200, "text/plain; version=0.0.4; charset=utf-8", text, false);
}

/* /readyz: whether to send this process traffic. */
static enum MHD_Result handle_ready(ekv_http *h, struct MHD_Connection *conn)
{
    char why[128];
    bool ready = coord_ready(h->coord, why, sizeof why);
    if (ready && atomic_load(&h->draining)) {
        ready = false;
        snprintf(why, sizeof why, "draining");
    }
    if (ready)
        return http_reply(conn, 200, "application/json", strdup("{\"status\":\"ok\"}"), false);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", "unavailable");
    cJSON_AddStringToObject(o, "reason", why);
    char *body = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return http_reply(conn, 503, "application/json", body, atomic_load(&h->draining));
}

static enum MHD_Result route(ekv_http *h, struct MHD_Connection *conn, const char *url,
                             const char *method, http_conn *hc)
{
    bool get = !strcmp(method, MHD_HTTP_METHOD_GET), post = !strcmp(method, MHD_HTTP_METHOD_POST);
    if (!strcmp(url, "/livez") && get) /* answering at all is the point */
        return http_reply(conn, 200, "application/json", strdup("{\"status\":\"alive\"}"), false);
    if ((!strcmp(url, "/readyz") || !strcmp(url, "/health")) && get)
        return handle_ready(h, conn);
    if (!strcmp(url, "/metrics") && get)
        return handle_metrics(h, conn);
    if (atomic_load(&h->draining))
        return http_reply_error(h, conn, 503, "the server is shutting down");
    if (!strcmp(url, "/v1/models") && get)
        return handle_models(h, conn);
    bool completions = !strcmp(url, "/v1/completions");
    bool chat = !strcmp(url, "/v1/chat/completions");
    if ((completions || chat) && post) {
        if (hc->too_big)
            return http_reply_error(h, conn, 413, "the request body is larger than 4 MiB");
        return http_handle_completion(h, conn, chat ? OAI_CHAT : OAI_COMPLETIONS,
                                      hc->body ? hc->body : "", hc->len);
    }
    if (completions || chat || !strcmp(url, "/v1/models") || !strcmp(url, "/health") ||
        !strcmp(url, "/metrics") || !strcmp(url, "/livez") || !strcmp(url, "/readyz"))
        return http_reply_error(h, conn, 405, "method not allowed");
    char msg[160];
    snprintf(msg, sizeof msg, "no route for %s %.100s", method, url);
    return http_reply_error(h, conn, 404, msg);
}

/* ---- MHD callbacks ---- */

static bool body_append(http_conn *hc, const char *data, size_t n)
{
    if (hc->too_big || hc->len + n > HTTP_MAX_BODY) {
        hc->too_big = true;
        return true;
    }
    if (hc->len + n + 1 > hc->cap) {
        size_t cap = hc->cap ? hc->cap : 4096;
        while (cap < hc->len + n + 1)
            cap *= 2;
        char *p = realloc(hc->body, cap);
        if (!p)
            return false;
        hc->body = p;
        hc->cap = cap;
    }
    memcpy(hc->body + hc->len, data, n);
    hc->len += n;
    hc->body[hc->len] = 0;
    return true;
}

/* ---- framing ----
 * libmicrohttpd 0.9.75 takes the first of two Content-Length headers, reads
 * a malformed one its own way and lets Content-Length ride with
 * Transfer-Encoding; a proxy in front may frame the same bytes differently
 * (request smuggling). So the raw headers are checked here, before any body
 * is read, and anything RFC 9112 section 6 leaves ambiguous is refused. */

typedef struct framing {
    int n_length, n_encoding;
    bool bad_length, bad_encoding;
} framing;

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
    (void)kind;
    framing *f = cls;
    if (!strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH)) {
        f->n_length++;
        /* 1*DIGIT and nothing else, at most 18 digits (no overflow) */
        size_t n = value ? strlen(value) : 0;
        f->bad_length |= n == 0 || n > 18 || strspn(value, "0123456789") != n;
    } else if (!strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING)) {
        f->n_encoding++;
        f->bad_encoding |= !value || strcasecmp(value, "chunked");
    }
    return MHD_YES;
}

/* The message naming what is wrong with the request's framing, or NULL. */
static const char *framing_error(struct MHD_Connection *conn)
{
    framing f = {0};
    MHD_get_connection_values(conn, MHD_HEADER_KIND, count_framing, &f);
    if (f.n_length > 1)
        return "more than one Content-Length header";
    if (f.bad_length)
        return "a malformed Content-Length header";
    if (f.n_length && f.n_encoding)
        return "Content-Length together with Transfer-Encoding";
    if (f.n_encoding > 1 || f.bad_encoding)
        return "a Transfer-Encoding other than chunked";
    return NULL;
}

/* ---- the API key ---- */

/* Probes and metrics stay open: a kubelet or Prometheus has no key. */
static bool open_route(const char *url)
{
    return !strcmp(url, "/livez") || !strcmp(url, "/readyz") || !strcmp(url, "/health") ||
           !strcmp(url, "/metrics");
}

static bool authorized(ekv_http *h, struct MHD_Connection *conn, const char *url)
{
    if (!h->api_key.set || open_route(url))
        return true;
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION);
    return v && ekv_api_key_check(&h->api_key, v, strlen(v));
}

/* 401 as RFC 6750 writes it, with OpenAI's error body. */
static enum MHD_Result reply_unauthorized(struct MHD_Connection *conn, bool given)
{
    char *body = oai_error_json(given ? "the API key is not valid"
                                      : "an API key is required: Authorization: Bearer KEY",
                                "authentication_error");
    if (!body)
        return MHD_NO;
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE,
                            given ? "Bearer realm=\"entrokv\", error=\"invalid_token\""
                                  : "Bearer realm=\"entrokv\"");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_UNAUTHORIZED, r);
    MHD_destroy_response(r);
    return ret;
}

/* The request the front put in place of a head it refused: the 400 (431
 * for a head too large) it names, then the connection closes. */
static enum MHD_Result reply_front_refused(struct MHD_Connection *conn)
{
    const char *v =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, HTTP_FRONT_REASON_HEADER);
    unsigned code = 400;
    const char *why = v ? http_front_reason(atoi(v), &code) : NULL;
    return http_reply(conn, code, "application/json",
                      oai_error_json(why ? why : "malformed request framing",
                                     "invalid_request_error"),
                      true);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_size, void **con_cls)
{
    (void)version;
    ekv_http *h = cls;
    http_conn *hc = *con_cls;
    if (!hc) {
        hc = calloc(1, sizeof *hc);
        if (!hc)
            return MHD_NO;
        *con_cls = hc;
        hc->t_headers = mono_s();
        atomic_fetch_add(&h->active, 1);
        if (h->refuse_path[0] && !strcmp(url, h->refuse_path))
            return reply_front_refused(conn);
        const char *bad = framing_error(conn);
        if (bad) {
            hc->refused = true; /* the 400 is the answer: any body is dropped */
            return http_reply(conn, 400, "application/json",
                         oai_error_json(bad, "invalid_request_error"), true);
        }
        if (!authorized(h, conn, url)) {
            hc->refused = true; /* the body is not read, let alone parsed */
            return reply_unauthorized(conn, MHD_lookup_connection_value(
                                                conn, MHD_HEADER_KIND,
                                                MHD_HTTP_HEADER_AUTHORIZATION) != NULL);
        }
        /* A body a little over the cap is read and dropped so the client sees
         * the 413; a huge one is refused at once and the connection closed. */
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > HTTP_DISCARD_LIMIT) {
            hc->too_big = true;
            return http_reply_error(h, conn, 413, "the request body is larger than 4 MiB");
        }
        return MHD_YES;
    }
    if (hc->refused) {
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size && h->timeout_s && mono_s() - hc->t_headers > h->timeout_s)
        return MHD_NO; /* a body trickled in, each piece inside the idle timeout: closed
                        * (libmicrohttpd 0.9.75 cannot answer before the body is in) */
    if (*upload_size) {
        bool ok = body_append(hc, upload_data, *upload_size);
        *upload_size = 0;
        return ok ? MHD_YES : MHD_NO;
    }
    return route(h, conn, url, method, hc);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    (void)toe;
    ekv_http *h = cls;
    http_conn *hc = *con_cls;
    if (!hc)
        return;
    free(hc->body);
    free(hc);
    *con_cls = NULL;
    atomic_fetch_sub(&h->active, 1);
}

/* libmicrohttpd logs each connection it refuses (a cap reached, a failed
 * TLS handshake): a flood of those would be a flood of lines, so at most
 * MHD_LOG_PER_S get through each second and the next one counts the rest. */
#define MHD_LOG_PER_S 10
/* What libmicrohttpd says of the front's socketpair ends (http_front.c) on
 * every response: they are Unix sockets, with no TCP options to set and
 * nothing held back by one, so these lines say nothing. */
static bool socketpair_noise(const char *line)
{
    return !strncmp(line, "Setting TCP_NODELAY option", 26) ||
           !strncmp(line, "Setting TCP_CORK option", 23) ||
           !strncmp(line, "Failed to push the data from buffers to the network", 51);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    ekv_http *h = cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    if (h->refuse_path[0] && socketpair_noise(line))
        return;
    long long now = (long long)mono_s(), was = atomic_load(&h->log_second);
    if (now != was && atomic_compare_exchange_strong(&h->log_second, &was, now))
        atomic_store(&h->log_lines, 0);
    if (atomic_fetch_add(&h->log_lines, 1) >= MHD_LOG_PER_S) {
        atomic_fetch_add(&h->log_dropped, 1);
        return;
    }
    size_t n = strlen(line);
    while (n && line[n - 1] == '\n')
        line[--n] = 0;
    int dropped = atomic_exchange(&h->log_dropped, 0);
    if (dropped)
        coord_log("http: %s (%d lines before it dropped: at most %d a second)", line, dropped,
                  MHD_LOG_PER_S);
    else
        coord_log("http: %s", line);
}

/* ---- lifecycle ---- */

void ekv_http_opts_default(ekv_http_opts *o)
{
    memset(o, 0, sizeof *o);
    o->host = "127.0.0.1";
    o->max_connections = HTTP_MAX_CONNECTIONS;
    o->max_per_client = HTTP_MAX_PER_CLIENT;
    o->timeout_s = HTTP_TIMEOUT_S;
}

ekv_http *ekv_http_start(ekv_coordinator *c, const char *host, int port, ekv_error *err)
{
    ekv_http_opts o;
    ekv_http_opts_default(&o);
    o.host = host;
    o.port = port;
    return ekv_http_start_opts(c, &o, err);
}

ekv_http *ekv_http_start_opts(ekv_coordinator *c, const ekv_http_opts *o, ekv_error *err)
{
    const char *host = o->host;
    const int port = o->port;
    const bool tls = ekv_tls_server_on(o->tls);
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE}, *ai = NULL;
    if (getaddrinfo(host, service, &hints, &ai) != 0 || !ai) {
        ekv_error_set(err, EKV_EINVAL, "http: cannot resolve host '%s'", host);
        return NULL;
    }
    ekv_http *h = calloc(1, sizeof *h);
    if (!h) {
        freeaddrinfo(ai);
        ekv_error_set(err, EKV_ENOMEM, "http: out of memory");
        return NULL;
    }
    h->coord = c;
    h->started = (long long)time(NULL);
    h->timeout_s = o->timeout_s;
    if (o->api_key)
        h->api_key = *o->api_key;
    if (!http_front_refuse_path_new(h->refuse_path)) {
        freeaddrinfo(ai);
        free(h);
        ekv_error_set(err, EKV_EIO, "http: cannot read /dev/urandom");
        return NULL;
    }
    /* TLS is terminated by the front (http_tls.c), so MHD only ever reads
     * plain HTTP that the front has checked */
    if (tls && !(h->tls = http_tls_new(o->tls->cert_pem, o->tls->key_pem, err))) {
        freeaddrinfo(ai);
        free(h);
        return NULL;
    }
    /* connections come from the front (http_front.c), never a listener */
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_POLL | MHD_USE_ITC | MHD_USE_ERROR_LOG |
                     (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0) | MHD_USE_NO_LISTEN_SOCKET;
    h->d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_request, h,
                            MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, h,
                            MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
                            MHD_OPTION_CONNECTION_LIMIT, o->max_connections,
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT, o->max_per_client,
                            MHD_OPTION_CONNECTION_TIMEOUT, o->timeout_s, MHD_OPTION_END);
    if (!h->d) {
        freeaddrinfo(ai);
        http_tls_free(h->tls);
        ekv_error_set(err, EKV_EIO, "http: cannot start libmicrohttpd for %s:%d", host, port);
        free(h);
        return NULL;
    }
    /* a few relays over the cap: MHD refuses those connections itself */
    ekv_error ferr = {0};
    http_front_opts fo = {.refuse_path = h->refuse_path,
                          .max_relays = (int)o->max_connections + 64,
                          .tls = h->tls,
                          .timeout_s = o->timeout_s};
    h->front = http_front_start(h->d, ai, &fo, &ferr);
    freeaddrinfo(ai);
    if (!h->front) {
        MHD_stop_daemon(h->d);
        http_tls_free(h->tls);
        ekv_error_set(err, EKV_EIO, "http: cannot listen on %s:%d (%s)", host, port, ferr.msg);
        free(h);
        return NULL;
    }
    h->port = http_front_port(h->front);
    return h;
}

int ekv_http_port(const ekv_http *h)
{
    return h->port;
}

void ekv_http_drain(ekv_http *h)
{
    /* The listener stays open: probes of /livez and /readyz keep getting
     * answers while the running streams finish. */
    if (!atomic_exchange(&h->draining, true))
        coord_log("http: draining");
}

void ekv_http_abort(ekv_http *h)
{
    atomic_store(&h->draining, true);
    atomic_store(&h->aborting, true);
}

int ekv_http_active(const ekv_http *h)
{
    return atomic_load(&h->active);
}

void ekv_http_stop(ekv_http *h)
{
    if (!h)
        return;
    atomic_store(&h->stopping, true);
    http_front_stop_accepting(h->front);
    MHD_stop_daemon(h->d);
    /* a relay that outlives this (see http_front_free) keeps the front and
     * the credentials it reads: both are then left, never freed under it */
    if (http_front_free(h->front))
        http_tls_free(h->tls);
    coord_log("http: stopped");
    free(h);
}
