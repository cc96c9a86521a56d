/*
 * http_tls.c - the client side of the HTTP front's relays (http_front.c):
 * a plain socket, or TLS terminated here with GnuTLS (which libmicrohttpd
 * already links, so no new dependency).
 *
 * Why here and not in libmicrohttpd: with MHD terminating TLS itself, the
 * decrypted bytes go straight into its parser, so the front's framing
 * checks (RFC 9112) could not run on HTTPS requests and a malformed
 * Content-Length got MHD 0.9.75's doubled status line and headers. The
 * relay decrypts, checks and passes plain HTTP to MHD over its socketpair,
 * exactly as for a plain connection.
 *
 * Every call is non-blocking: the relay polls the socket. GnuTLS may hold
 * decrypted bytes the socket no longer shows (http_peer_pending), and a
 * send that returned EAGAIN is retried with the same buffer and length, as
 * GnuTLS requires (the relay's flush does that).
 */
#include <errno.h>
#include <gnutls/gnutls.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "http_internal.h"

struct http_tls {
    gnutls_certificate_credentials_t cred;
};

http_tls *http_tls_new(const char *cert_pem, const char *key_pem, ekv_error *err)
{
    http_tls *t = calloc(1, sizeof *t);
    if (!t) {
        ekv_error_set(err, EKV_ENOMEM, "http: out of memory");
        return NULL;
    }
    int rc = gnutls_certificate_allocate_credentials(&t->cred);
    if (rc < 0) {
        free(t);
        ekv_error_set(err, EKV_ENOMEM, "http: TLS credentials: %s", gnutls_strerror(rc));
        return NULL;
    }
    gnutls_datum_t cert = {(unsigned char *)cert_pem, (unsigned)strlen(cert_pem)};
    gnutls_datum_t key = {(unsigned char *)key_pem, (unsigned)strlen(key_pem)};
    /* (a key that does not match the certificate is refused here too) */
    rc = gnutls_certificate_set_x509_key_mem(t->cred, &cert, &key, GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
        gnutls_certificate_free_credentials(t->cred);
        free(t);
        ekv_error_set(err, EKV_EINVAL, "http: the TLS certificate or key is not valid: %s",
                      gnutls_strerror(rc));
        return NULL;
    }
    return t;
}

void http_tls_free(http_tls *t)
{
    if (!t)
        return;
    gnutls_certificate_free_credentials(t->cred);
    free(t);
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool handshake(gnutls_session_t s, int fd, const http_tls *t, unsigned timeout_s,
                      const atomic_bool *stop)
{
    if (gnutls_set_default_priority(s) < 0 ||
        gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->cred) < 0)
        return false;
    /* no client certificate is asked for: HTTP clients prove themselves
     * with the API key (the Worker service's listener asks for them) */
    gnutls_certificate_server_set_request(s, GNUTLS_CERT_IGNORE);
    gnutls_transport_set_int(s, fd);
    /* the handshake is part of the request head: it gets the same
     * timeout, so a client that stalls mid-handshake holds nothing */
    long long end = timeout_s ? now_ms() + (long long)timeout_s * 1000 : 0;
    for (;;) {
        int rc = gnutls_handshake(s);
        if (rc == GNUTLS_E_SUCCESS)
            return true;
        if (rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED && gnutls_error_is_fatal(rc))
            return false;
        if (atomic_load(stop))
            return false;
        long long left = end ? end - now_ms() : 500;
        if (left <= 0)
            return false;
        struct pollfd pf = {.fd = fd,
                            .events = gnutls_record_get_direction(s) ? POLLOUT : POLLIN};
        if (poll(&pf, 1, left < 500 ? (int)left : 500) < 0 && errno != EINTR)
            return false;
    }
}

bool http_peer_handshake(http_peer *p, const http_tls *t, unsigned timeout_s,
                         const atomic_bool *stop)
{
    gnutls_session_t s;
    if (gnutls_init(&s, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL) < 0)
        return false;
    if (!handshake(s, p->fd, t, timeout_s, stop)) {
        gnutls_deinit(s); /* no alert, no close_notify: there is no session */
        return false;
    }
    p->session = s;
    return true;
}

ssize_t http_peer_recv(http_peer *p, void *buf, size_t n)
{
    if (!p->session)
        return recv(p->fd, buf, n, MSG_DONTWAIT);
    ssize_t k = gnutls_record_recv(p->session, buf, n);
    if (k >= 0)
        return k;
    if (k == GNUTLS_E_AGAIN || k == GNUTLS_E_INTERRUPTED) {
        errno = EAGAIN;
        return -1;
    }
    if (k == GNUTLS_E_PREMATURE_TERMINATION)
        return 0; /* closed without close_notify: most clients do that */
    errno = ECONNRESET; /* a bad record, an alert, a renegotiation attempt */
    return -1;
}

ssize_t http_peer_send(http_peer *p, const void *buf, size_t n)
{
    if (!p->session)
        return send(p->fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    ssize_t k = gnutls_record_send(p->session, buf, n);
    if (k >= 0)
        return k;
    errno = k == GNUTLS_E_AGAIN || k == GNUTLS_E_INTERRUPTED ? EAGAIN : EPIPE;
    return -1;
}

bool http_peer_pending(const http_peer *p)
{
    return p->session && gnutls_record_check_pending(p->session) > 0;
}

void http_peer_end(http_peer *p)
{
    if (!p->session)
        return;
    /* close_notify, once: a client still reading gets a clean end; one that
     * is gone or slow is not waited for (the linger that follows bounds it) */
    gnutls_bye(p->session, GNUTLS_SHUT_WR);
    gnutls_deinit(p->session);
    p->session = NULL;
}
