/*
 * kvucx.c - UCX worker, endpoints and auth proofs shared by the daemon
 * (kvdaemon.c) and the client (kvclient.c).
 *
 * Every endpoint uses UCP_ERR_HANDLING_MODE_PEER, on both sides: a dead
 * peer surfaces as an error callback, and a forced close completes every
 * request still outstanding on the endpoint with an error. That is what
 * lets a store close an endpoint without waiting for its peer (a stopped
 * or hung process) and still never hand a buffer back to its owner while
 * UCX could move bytes into or out of it: UCX defines a forced close only
 * under this mode. UCX 1.13 will not put shared-memory lanes under it
 * (posix and sysv lack peer-failure support, cma lacks memory
 * invalidation), so values between processes on one host move over tcp
 * (docs/kvstore.md: gets there read the daemon's mapped region instead).
 */
#include "kvucx.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "entrokv/hmac.h"

double kvx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

ekv_status kvx_worker_init(kvx_worker *w, ucp_am_recv_callback_t cb, void *arg, ekv_error *err)
{
    memset(w, 0, sizeof *w);
    w->efd = -1;
    ucp_config_t *config;
    ucs_status_t st = ucp_config_read(NULL, NULL, &config);
    if (st != UCS_OK)
        return ekv_error_set(err, EKV_EIO, "ucx: reading config: %s", ucs_status_string(st));
    /* UCX 1.13's tcp transport asserts (tcp_ep.c, PUT_TX_WAITING_ACK) and
     * aborts the process when a peer stops in the middle of a put-zcopy
     * rendezvous and its endpoint is then closed: one stalled client could
     * take a daemon down (test_kvstore_hostile, cut-off transfers: 2 runs
     * in 4 before this, none in 8 after). Rendezvous over tcp without it
     * goes as active-message fragments. UCX_TCP_PUT_ENABLE still decides
     * where it is set. (ucp_config_modify takes a transport's setting by
     * its name without the transport's prefix; only tcp has this one.) */
    if (!getenv("UCX_TCP_PUT_ENABLE") &&
        (st = ucp_config_modify(config, "PUT_ENABLE", "n")) != UCS_OK) {
        ucp_config_release(config);
        return ekv_error_set(err, EKV_EIO, "ucx: PUT_ENABLE: %s", ucs_status_string(st));
    }
    /* A daemon killed with connections open leaves its port's sockets in
     * TIME_WAIT / FIN_WAIT for up to a minute, and without SO_REUSEADDR
     * its restart on the same port fails to bind ("Address already in
     * use"). Linux still refuses a second listener on a port that one
     * holds, so a port in use stays an error. This is the tcp connection
     * manager's UCX_TCP_CM_REUSEADDR ("CM_REUSEADDR" under the tcp prefix),
     * which still decides where it is set; the rdma one
     * (UCX_RDMA_CM_REUSEADDR) is left to the environment. */
    if (!getenv("UCX_TCP_CM_REUSEADDR") &&
        (st = ucp_config_modify(config, "CM_REUSEADDR", "y")) != UCS_OK) {
        ucp_config_release(config);
        return ekv_error_set(err, EKV_EIO, "ucx: REUSEADDR: %s", ucs_status_string(st));
    }
    ucp_params_t params = {
        .field_mask = UCP_PARAM_FIELD_FEATURES,
        .features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP,
    };
    st = ucp_init(&params, config, &w->ctx);
    ucp_config_release(config);
    if (st != UCS_OK)
        return ekv_error_set(err, EKV_EIO, "ucx: ucp_init: %s", ucs_status_string(st));
    ucp_worker_params_t wp = {
        .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
        .thread_mode = UCS_THREAD_MODE_SINGLE,
    };
    st = ucp_worker_create(w->ctx, &wp, &w->worker);
    if (st != UCS_OK) {
        ucp_cleanup(w->ctx);
        return ekv_error_set(err, EKV_EIO, "ucx: worker: %s", ucs_status_string(st));
    }
    if (ucp_worker_get_efd(w->worker, &w->efd) != UCS_OK)
        w->efd = -1;
    ucp_am_handler_param_t hp = {
        .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                      UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS,
        .id = KVWIRE_AM_ID,
        .flags = UCP_AM_FLAG_WHOLE_MSG,
        .cb = cb,
        .arg = arg,
    };
    st = ucp_worker_set_am_recv_handler(w->worker, &hp);
    if (st != UCS_OK) {
        kvx_worker_fini(w);
        return ekv_error_set(err, EKV_EIO, "ucx: am handler: %s", ucs_status_string(st));
    }
    return EKV_OK;
}

bool kvx_progress(kvx_worker *w)
{
    /* bounded: a transport that always reports progress must not keep the
     * caller from its deadlines and its stop flag */
    bool any = false;
    for (int i = 0; i < 256 && ucp_worker_progress(w->worker); i++)
        any = true;
    int k = 0;
    for (int i = 0; i < w->n_closing; i++) {
        void *req = w->closing[i];
        if (ucp_request_check_status(req) == UCS_INPROGRESS) {
            w->closing[k++] = req;
            continue;
        }
        ucp_request_free(req);
        any = true;
    }
    w->n_closing = k;
    return any;
}

void kvx_wait(kvx_worker *w, int timeout_ms)
{
    if (kvx_progress(w)) {
        w->empty_wakeups = 0;
        return;
    }
    /* A transport whose fd stays readable with nothing to progress (seen
     * once with a half-dead tcp endpoint) would turn this into a busy loop:
     * after many empty wakeups in a row, nap instead. */
    if (w->efd < 0 || ++w->empty_wakeups > 64) {
        struct timespec ts = {0, w->efd < 0 ? 200 * 1000 : 1000 * 1000};
        nanosleep(&ts, NULL);
        return;
    }
    if (ucp_worker_arm(w->worker) == UCS_ERR_BUSY)
        return; /* events arrived meanwhile */
    struct pollfd p = {.fd = w->efd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) == 0)
        w->empty_wakeups = 0; /* a real sleep */
}

/* A short message in flight, with its bytes; on the worker's list until
 * UCX completes it (freed by kvx_worker_fini if UCX never does: a forced
 * close need not complete what it cut off). */
typedef struct kvx_small {
    struct kvx_small *prev, *next;
    kvx_worker *w;
    uint8_t hdr[KVWIRE_HEADER_BYTES];
    uint8_t payload[64];
} kvx_small;

static void small_free(kvx_small *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        s->w->smalls = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s);
}

void kvx_worker_fini(kvx_worker *w)
{
    if (w->worker) {
        double end = kvx_now() + 2.0;
        while (w->n_closing > 0 && kvx_now() < end)
            kvx_progress(w);
        for (int i = 0; i < w->n_closing; i++) {
            ucp_request_cancel(w->worker, w->closing[i]);
            ucp_request_free(w->closing[i]);
        }
        ucp_worker_destroy(w->worker);
    }
    while (w->smalls) /* sends UCX never completed */
        small_free(w->smalls);
    if (w->ctx)
        ucp_cleanup(w->ctx);
    free(w->closing);
    memset(w, 0, sizeof *w);
    w->efd = -1;
}

ekv_status kvx_parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len,
                          ekv_error *err)
{
    char host[256];
    const char *colon = strrchr(s, ':');
    const char *h = s;
    size_t hl = colon ? (size_t)(colon - s) : 0;
    if (!colon || hl == 0 || hl >= sizeof host || !colon[1])
        return ekv_error_set(err, EKV_EINVAL, "address '%s' is not HOST:PORT", s);
    if (h[0] == '[' && hl >= 2 && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    memcpy(host, h, hl);
    host[hl] = 0;
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || *end || port < 0 || port > 65535)
        return ekv_error_set(err, EKV_EINVAL, "address '%s': bad port", s);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0)
        return ekv_error_set(err, EKV_EINVAL, "address '%s': %s", s, gai_strerror(rc));
    memset(ss, 0, sizeof *ss);
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    return EKV_OK;
}

void kvx_addr_str(const struct sockaddr *sa, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, ip, sizeof ip);
        port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in->sin6_addr, ip, sizeof ip);
        port = ntohs(in->sin6_port);
    }
    snprintf(out, n, "%s:%d", ip, port);
}

static ucp_ep_h ep_create(kvx_worker *w, ucp_ep_params_t *p, ucp_err_handler_cb_t on_err,
                          void *arg, ekv_error *err)
{
    p->field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p->err_mode = UCP_ERR_HANDLING_MODE_PEER; /* see the top of this file */
    p->err_handler.cb = on_err;
    p->err_handler.arg = arg;
    ucp_ep_h ep;
    ucs_status_t st = ucp_ep_create(w->worker, p, &ep);
    if (st != UCS_OK) {
        ekv_error_set(err, EKV_EIO, "ucx: endpoint: %s", ucs_status_string(st));
        return NULL;
    }
    return ep;
}

ucp_ep_h kvx_connect(kvx_worker *w, const struct sockaddr *sa, socklen_t len,
                     ucp_err_handler_cb_t on_err, void *arg, ekv_error *err)
{
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR,
        .flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER,
        .sockaddr = {.addr = sa, .addrlen = len},
    };
    return ep_create(w, &p, on_err, arg, err);
}

ucp_ep_h kvx_accept(kvx_worker *w, ucp_conn_request_h req, ucp_err_handler_cb_t on_err,
                    void *arg, ekv_error *err)
{
    ucp_ep_params_t p = {
        .field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST,
        .conn_request = req,
    };
    return ep_create(w, &p, on_err, arg, err);
}

bool kvx_addr_is_local(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET &&
        (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127)
        return true;
    if (sa->sa_family == AF_INET6 &&
        IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)sa)->sin6_addr))
        return true;
    struct ifaddrs *ifs;
    if (getifaddrs(&ifs) != 0)
        return false;
    bool local = false;
    for (struct ifaddrs *i = ifs; i && !local; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != sa->sa_family)
            continue;
        if (sa->sa_family == AF_INET)
            local = ((const struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr ==
                    ((const struct sockaddr_in *)sa)->sin_addr.s_addr;
        else if (sa->sa_family == AF_INET6)
            local = !memcmp(&((const struct sockaddr_in6 *)i->ifa_addr)->sin6_addr,
                            &((const struct sockaddr_in6 *)sa)->sin6_addr, sizeof(struct in6_addr));
    }
    freeifaddrs(ifs);
    return local;
}

ucs_status_ptr_t kvx_flush(ucp_ep_h ep, ucp_send_nbx_callback_t cb, void *user)
{
    ucp_request_param_t p = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
        .cb.send = cb,
        .user_data = user,
    };
    return ucp_ep_flush_nbx(ep, &p);
}

void kvx_close(kvx_worker *w, ucp_ep_h ep)
{
    ucp_request_param_t p = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                             .flags = UCP_EP_CLOSE_FLAG_FORCE};
    void *req = ucp_ep_close_nbx(ep, &p);
    if (req == NULL || UCS_PTR_IS_ERR(req))
        return;
    if (w->n_closing == w->cap_closing) {
        int cap = w->cap_closing ? 2 * w->cap_closing : 16;
        void **c = realloc(w->closing, (size_t)cap * sizeof *c);
        if (!c) { /* cannot track it: wait for it here, bounded */
            double end = kvx_now() + 1.0;
            while (ucp_request_check_status(req) == UCS_INPROGRESS && kvx_now() < end)
                ucp_worker_progress(w->worker);
            ucp_request_free(req);
            return;
        }
        w->closing = c;
        w->cap_closing = cap;
    }
    w->closing[w->n_closing++] = req;
}

ucs_status_ptr_t kvx_send(ucp_ep_h ep, const uint8_t *hdr, const void *data, size_t len,
                          ucp_send_nbx_callback_t cb, void *user)
{
    ucp_request_param_t p = {
        .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA |
                        UCP_OP_ATTR_FIELD_FLAGS,
        .cb.send = cb,
        .user_data = user,
        .flags = UCP_AM_SEND_FLAG_REPLY,
    };
    return ucp_am_send_nbx(ep, KVWIRE_AM_ID, hdr, KVWIRE_HEADER_BYTES, data, len, &p);
}

static void small_send_done(void *req, ucs_status_t status, void *user)
{
    small_free(user);
    ucp_request_free(req);
}

ekv_status kvx_send_small(kvx_worker *w, ucp_ep_h ep, const kvwire_hdr *h, const void *payload,
                          size_t len)
{
    kvx_small *s = len <= sizeof s->payload ? malloc(sizeof *s) : NULL;
    if (!s)
        return EKV_ENOMEM;
    *s = (kvx_small){.next = w->smalls, .w = w};
    if (w->smalls)
        w->smalls->prev = s;
    w->smalls = s;
    kvwire_encode(h, s->hdr);
    if (len)
        memcpy(s->payload, payload, len);
    ucs_status_ptr_t r = kvx_send(ep, s->hdr, len ? s->payload : NULL, len, small_send_done, s);
    if (r == NULL || UCS_PTR_IS_ERR(r)) {
        small_free(s);
        return r == NULL ? EKV_OK : EKV_EIO;
    }
    return EKV_OK;
}

ekv_status kvx_nonce(uint8_t out[KVWIRE_NONCE_BYTES], ekv_error *err)
{
    size_t got = 0;
    while (got < KVWIRE_NONCE_BYTES) {
        ssize_t n = getrandom(out + got, KVWIRE_NONCE_BYTES - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return ekv_error_set(err, EKV_EIO, "getrandom: %s", strerror(errno));
        got += (size_t)n;
    }
    return EKV_OK;
}

void kvx_proof(const uint8_t *token, size_t token_len, char role,
               const uint8_t first[KVWIRE_NONCE_BYTES], const uint8_t second[KVWIRE_NONCE_BYTES],
               uint8_t out[KVWIRE_MAC_BYTES])
{
    const char *label = role == 'c' ? "ekv-auth1-client" : "ekv-auth1-server";
    ekv_hmac h;
    hmac_sha256_init(&h, token, token_len);
    hmac_sha256_update(&h, label, strlen(label));
    hmac_sha256_update(&h, first, KVWIRE_NONCE_BYTES);
    hmac_sha256_update(&h, second, KVWIRE_NONCE_BYTES);
    hmac_sha256_final(&h, out);
}
