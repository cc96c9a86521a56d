/*
 * kvstore_http.c - health and Prometheus metrics of a KV store daemon
 * (see kvstore_http.h), on libmicrohttpd as the coordinator's HTTP front.
 *
 * The daemon's own thread never waits for this one: the counters are
 * relaxed atomics and the store's stats take its mutex for a moment. One
 * internal polling thread serves every connection (no thread per
 * connection), with few connections per client and a short idle timeout:
 * a scraper that stalls cannot hold the endpoint. Bodies are refused:
 * everything here is a GET.
 */
#include "kvstore_http.h"

#include <microhttpd.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/kvwire.h"

struct kvstore_http {
    struct MHD_Daemon *mhd;
    kvstore_daemon *d;
    const volatile sig_atomic_t *stopping;
    int port;
};

/* Appends to out[*n..cap) like snprintf, never past cap. */
static void put(char *out, size_t cap, size_t *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void put(char *out, size_t cap, size_t *n, const char *fmt, ...)
{
    if (*n >= cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(out + *n, cap - *n, fmt, ap);
    va_end(ap);
    if (k > 0)
        *n = *n + (size_t)k < cap ? *n + (size_t)k : cap - 1;
}

static void metric(char *out, size_t cap, size_t *n, const char *name, const char *type,
                   const char *help, uint64_t v)
{
    put(out, cap, n, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", name, help, name, type, name,
        (unsigned long long)v);
}

size_t kvstore_metrics_text(kvstore_daemon *d, char *out, size_t cap)
{
    static const struct {
        uint8_t op;
        const char *name;
    } ops[] = {{KVWIRE_OP_AUTH, "auth"},       {KVWIRE_OP_PUT, "put"},
               {KVWIRE_OP_GET, "get"},         {KVWIRE_OP_EXISTS, "exists"},
               {KVWIRE_OP_DEL, "del"},         {KVWIRE_OP_DIRECT, "direct"},
               {KVWIRE_OP_RELEASE, "release"}, {KVWIRE_OP_COMMIT, "commit"}};
    const kvstore_metrics *m = kvstore_daemon_metrics(d);
    kvstore_local_stats st;
    kvstore_local_stats_get(kvstore_daemon_store(d), &st);
    size_t n = 0;
    out[0] = 0;
    metric(out, cap, &n, "entrokv_kvstore_capacity_bytes", "gauge",
           "Bytes the store may hold (--capacity-mb).", st.capacity);
    metric(out, cap, &n, "entrokv_kvstore_bytes", "gauge",
           "Bytes held: values (each a power-of-two block) plus entry overhead.", st.used);
    metric(out, cap, &n, "entrokv_kvstore_entries", "gauge", "Values stored.", st.entries);
    metric(out, cap, &n, "entrokv_kvstore_pinned_bytes", "gauge",
           "Bytes of values a transfer or a direct read holds.", st.pinned);
    metric(out, cap, &n, "entrokv_kvstore_evictions_total", "counter",
           "Values evicted (least recently used) to make room.", atomic_load(&m->evictions));
    metric(out, cap, &n, "entrokv_kvstore_auth_failures_total", "counter",
           "Connections that failed or skipped the token handshake.",
           atomic_load(&m->auth_failures));
    metric(out, cap, &n, "entrokv_kvstore_rejected_total", "counter",
           "Messages and connections dropped (authentication, malformed, refused).",
           atomic_load(&m->rejected));
    put(out, cap, &n,
        "# HELP entrokv_kvstore_requests_total Requests received, by operation.\n"
        "# TYPE entrokv_kvstore_requests_total counter\n");
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        put(out, cap, &n, "entrokv_kvstore_requests_total{op=\"%s\"} %llu\n", ops[i].name,
            (unsigned long long)atomic_load(&m->requests[ops[i].op]));
    return n;
}

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned code, const char *ctype,
                               const char *body)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), (void *)body,
                                                             MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_size, void **con_cls)
{
    (void)version, (void)upload_data;
    kvstore_http *h = cls;
    static int first;
    if (!*con_cls) { /* headers only so far: answer once they are all in */
        *con_cls = &first;
        return MHD_YES;
    }
    if (*upload_size) /* a body: nothing here takes one */
        return MHD_NO;
    static const char *JSON = "application/json";
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return respond(conn, 405, JSON, "{\"error\":\"only GET\"}\n");
    if (!strcmp(url, "/livez"))
        return respond(conn, 200, JSON, "{\"status\":\"alive\"}\n");
    if (!strcmp(url, "/readyz")) {
        if (*h->stopping)
            return respond(conn, 503, JSON, "{\"status\":\"stopping\"}\n");
        return respond(conn, 200, JSON, "{\"status\":\"ready\"}\n");
    }
    if (!strcmp(url, "/metrics")) {
        char body[8192];
        kvstore_metrics_text(h->d, body, sizeof body);
        return respond(conn, 200, "text/plain; version=0.0.4; charset=utf-8", body);
    }
    return respond(conn, 404, JSON, "{\"error\":\"not found\"}\n");
}

kvstore_http *kvstore_http_start(const char *listen, kvstore_daemon *d,
                                 const volatile sig_atomic_t *stopping, ekv_error *err)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    size_t hl = colon ? (size_t)(colon - listen) : 0;
    if (!colon || hl == 0 || hl >= sizeof host || !colon[1]) {
        ekv_error_set(err, EKV_EINVAL, "--http-listen '%s' is not HOST:PORT", listen);
        return NULL;
    }
    memcpy(host, listen, hl);
    host[hl] = 0;
    if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV}, *ai = NULL;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0 || !ai) {
        ekv_error_set(err, EKV_EINVAL, "--http-listen '%s': cannot resolve", listen);
        return NULL;
    }
    kvstore_http *h = calloc(1, sizeof *h);
    if (!h) {
        freeaddrinfo(ai);
        ekv_error_set(err, EKV_ENOMEM, "kvstore http: out of memory");
        return NULL;
    }
    h->d = d;
    h->stopping = stopping;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ITC |
                     (ai->ai_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    h->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h, MHD_OPTION_SOCK_ADDR,
                              ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, 64u,
                              MHD_OPTION_PER_IP_CONNECTION_LIMIT, 8u,
                              MHD_OPTION_CONNECTION_TIMEOUT, 10u,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)32768,
                              MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!h->mhd) {
        ekv_error_set(err, EKV_EIO, "--http-listen %s: cannot listen", listen);
        free(h);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : 0;
    return h;
}

int kvstore_http_port(const kvstore_http *h)
{
    return h->port;
}

void kvstore_http_stop(kvstore_http *h)
{
    if (!h)
        return;
    MHD_stop_daemon(h->mhd);
    free(h);
}
