/*
 * http_front.c - the HTTP listener in front of libmicrohttpd, plain or TLS:
 * every request head's framing is checked before MHD sees it (see
 * http_internal.h).
 *
 * Why: libmicrohttpd 0.9.75 (Debian 12) answers a malformed or oversized
 * Content-Length itself, before any callback of ours runs, and its state
 * machine then builds the response head a second time, so the client gets
 * the status line and headers twice (parse_connection_headers' error is
 * overwritten by the HEADERS_RECEIVED case; fixed in 1.0). No option or
 * callback runs between the two, so the bytes are checked before MHD reads
 * them: each accepted connection gets a socketpair, MHD serves one end
 * (MHD_add_connection, with the client's address for its per-client cap)
 * and a relay thread copies bytes between the client and the other end.
 *
 * Client-to-server bytes go through a framer (RFC 9112): a request head is
 * held until it is complete and checked - CRLF line endings only, no
 * obs-fold, no whitespace before a colon, at most one Content-Length of
 * 1..18 digits, at most one Transfer-Encoding, and it must be "chunked",
 * never both; then the body is passed as its framing says (Content-Length
 * bytes, or chunks up to the last chunk and trailers) and the next head is
 * checked the same way, so keep-alive and pipelined requests get the same
 * check. A head that fails is never passed on: in its place MHD gets a
 * request for the server's secret refuse path naming the reason, which the
 * server answers with one 400 (in order after earlier pipelined requests)
 * and Connection: close; the client's later bytes are dropped. A chunked
 * body that breaks its framing is cut off instead (MHD's end is closed, so
 * the request is dropped) and the client gets one 400 directly.
 *
 * With TLS the relay terminates it (http_tls.c, GnuTLS): the handshake
 * first, within the connection timeout, then the decrypted bytes go through
 * the same framer and MHD gets plain HTTP, so HTTPS requests get exactly
 * the checks and answers plain ones do. MHD never sees TLS.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http_internal.h"

#define FRONT_HEAD_MAX (32u << 10) /* MHD's whole per-connection pool is 32 KiB */
#define FRONT_LINE_MAX 1024u       /* a chunk-size or trailer line */
#define FRONT_IO 16384u
_Static_assert(sizeof(((http_framer *)0)->head) == FRONT_HEAD_MAX, "the framer's head buffer");
_Static_assert(sizeof(((http_framer *)0)->line) == FRONT_LINE_MAX, "the framer's line buffer");
#define FRONT_POLL_MS 500

struct http_front {
    int lfd;
    int port;
    struct MHD_Daemon *d;
    char refuse_path[HTTP_FRONT_PATH_MAX];
    int max_relays;
    const http_tls *tls; /* NULL: plain HTTP */
    unsigned timeout_s;
    pthread_t acceptor;
    atomic_bool stopping, closing;
    atomic_int relays;
};

/* The reasons a head is refused; the refuse request names one by index. */
static const char *const REASONS[] = {
    [FRONT_OK] = "",
    [FRONT_BAD_LINE_END] = "a bare CR, LF or NUL in the request head",
    [FRONT_OBS_FOLD] = "a folded header line (obs-fold)",
    [FRONT_BAD_HEADER] = "a malformed header line",
    [FRONT_TWO_LENGTHS] = "more than one Content-Length header",
    [FRONT_BAD_LENGTH] = "a malformed Content-Length header",
    [FRONT_TWO_ENCODINGS] = "a Transfer-Encoding other than chunked",
    [FRONT_BAD_ENCODING] = "a Transfer-Encoding other than chunked",
    [FRONT_LENGTH_AND_ENCODING] = "Content-Length together with Transfer-Encoding",
    [FRONT_HEAD_TOO_LARGE] = "the request head is larger than 32 KiB",
    [FRONT_BAD_CHUNK] = "malformed chunked encoding in the request body",
};

const char *http_front_reason(int why, unsigned *code)
{
    if (why <= FRONT_OK || why >= FRONT_N_REASONS)
        return NULL;
    *code = why == FRONT_HEAD_TOO_LARGE ? 431 : 400;
    return REASONS[why];
}

/* ---- the framer: which client bytes may go on, request by request ---- */

enum { F_HEAD, F_BODY, F_CHUNK_SIZE, F_CHUNK_DATA, F_CHUNK_CRLF, F_TRAILER };

static bool is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* s[0..n) without leading and trailing spaces and tabs. */
static void trim(const char **s, size_t *n)
{
    while (*n && (**s == ' ' || **s == '\t'))
        (*s)++, (*n)--;
    while (*n && ((*s)[*n - 1] == ' ' || (*s)[*n - 1] == '\t'))
        (*n)--;
}

static int check_head(http_framer *f, const char *h, size_t n)
{
    /* every CR is followed by LF and every LF preceded by CR; no NUL */
    for (size_t i = 0; i < n; i++) {
        if (!h[i] || (h[i] == '\r' && (i + 1 == n || h[i + 1] != '\n')) ||
            (h[i] == '\n' && (i == 0 || h[i - 1] != '\r')))
            return FRONT_BAD_LINE_END;
    }
    int n_length = 0, n_encoding = 0;
    uint64_t length = 0;
    const char *line = memchr(h, '\n', n) + 1; /* past the request line */
    const char *end = h + n - 2;               /* the final CRLF */
    while (line < end) {
        const char *eol = memchr(line, '\r', (size_t)(end - line));
        size_t len = (size_t)(eol - line);
        if (line[0] == ' ' || line[0] == '\t')
            return FRONT_OBS_FOLD;
        const char *colon = memchr(line, ':', len);
        if (!colon || colon == line)
            return FRONT_BAD_HEADER;
        for (const char *p = line; p < colon; p++)
            if (!is_tchar((unsigned char)*p))
                return FRONT_BAD_HEADER; /* whitespace before the colon included */
        size_t name_len = (size_t)(colon - line);
        const char *v = colon + 1;
        size_t vn = len - name_len - 1;
        trim(&v, &vn);
        if (name_len == 14 && !strncasecmp(line, "Content-Length", 14)) {
            if (n_length++)
                return FRONT_TWO_LENGTHS;
            if (vn == 0 || vn > 18)
                return FRONT_BAD_LENGTH;
            for (size_t i = 0; i < vn; i++) {
                if (v[i] < '0' || v[i] > '9')
                    return FRONT_BAD_LENGTH;
                length = length * 10 + (uint64_t)(v[i] - '0');
            }
        } else if (name_len == 17 && !strncasecmp(line, "Transfer-Encoding", 17)) {
            if (n_encoding++)
                return FRONT_TWO_ENCODINGS;
            if (vn != 7 || strncasecmp(v, "chunked", 7))
                return FRONT_BAD_ENCODING;
        }
        line = eol + 2;
    }
    if (n_length && n_encoding)
        return FRONT_LENGTH_AND_ENCODING;
    f->left = length;
    f->state = n_encoding ? F_CHUNK_SIZE : length ? F_BODY : F_HEAD;
    return FRONT_OK;
}

/* A chunk-size line without its CRLF: 1*HEXDIG (at most 15), then nothing
 * or a chunk extension (";..."), with optional spaces before it. */
static bool parse_chunk_size(const char *s, size_t n, uint64_t *size)
{
    size_t i = 0;
    *size = 0;
    for (; i < n && i < 16; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                       : -1;
        if (d < 0)
            break;
        *size = *size * 16 + (uint64_t)d;
    }
    if (i == 0 || i > 15)
        return false;
    while (i < n && (s[i] == ' ' || s[i] == '\t'))
        i++;
    return i == n || s[i] == ';';
}

/* Appends one byte to the line buffer; a whole line (CRLF) sets *done. */
static bool line_byte(http_framer *f, char c, bool *done)
{
    if (f->line_len >= FRONT_LINE_MAX)
        return false;
    f->line[f->line_len++] = c;
    *done = c == '\n';
    if (*done && (f->line_len < 2 || f->line[f->line_len - 2] != '\r'))
        return false;
    return true;
}

size_t http_framer_feed(http_framer *f, const uint8_t *in, size_t n, uint8_t *out,
                        size_t *out_len)
{
    size_t i = 0;
    while (i < n && !f->error) {
        switch (f->state) {
        case F_HEAD: {
            char c = (char)in[i++];
            if (f->head_len == 0 && (c == '\r' || c == '\n'))
                continue; /* empty lines before a request line (RFC 9112 2.2) */
            if (f->head_len >= FRONT_HEAD_MAX) {
                f->error = FRONT_HEAD_TOO_LARGE;
                break;
            }
            f->head[f->head_len++] = c;
            if (c != '\n' || f->head_len < 4 || memcmp(f->head + f->head_len - 4, "\r\n\r\n", 4)) {
                if (c == '\n' && f->head_len >= 2 && f->head[f->head_len - 2] != '\r')
                    f->error = FRONT_BAD_LINE_END; /* (do not wait for a CRLFCRLF) */
                continue;
            }
            int why = check_head(f, f->head, f->head_len);
            if (why) {
                f->error = why;
                break;
            }
            memcpy(out + *out_len, f->head, f->head_len);
            *out_len += f->head_len;
            f->head_len = 0;
            f->requests++;
            break;
        }
        case F_BODY:
        case F_CHUNK_DATA: {
            size_t k = n - i < f->left ? n - i : (size_t)f->left;
            memcpy(out + *out_len, in + i, k);
            *out_len += k;
            i += k;
            f->left -= k;
            if (!f->left)
                f->state = f->state == F_BODY ? F_HEAD : F_CHUNK_CRLF;
            break;
        }
        case F_CHUNK_CRLF:
        case F_CHUNK_SIZE:
        case F_TRAILER: {
            bool done = false;
            if (!line_byte(f, (char)in[i++], &done)) {
                f->error = FRONT_BAD_CHUNK;
                break;
            }
            out[(*out_len)++] = in[i - 1];
            if (!done)
                continue;
            size_t len = f->line_len - 2;
            f->line_len = 0;
            if (f->state == F_CHUNK_CRLF) {
                if (len)
                    f->error = FRONT_BAD_CHUNK;
                f->state = F_CHUNK_SIZE;
            } else if (f->state == F_CHUNK_SIZE) {
                if (!parse_chunk_size(f->line, len, &f->left))
                    f->error = FRONT_BAD_CHUNK;
                f->state = f->left ? F_CHUNK_DATA : F_TRAILER;
            } else if (len == 0) {
                f->state = F_HEAD; /* the empty line after the trailers */
            } else if (f->line[0] == ' ' || f->line[0] == '\t' || !memchr(f->line, ':', len)) {
                f->error = FRONT_BAD_CHUNK;
            }
            break;
        }
        }
    }
    return i;
}

/* ---- the relay: one thread per connection ---- */

typedef struct relay {
    http_front *front;
    http_peer client, mhd; /* (MHD's end is always plain) */
    http_framer f;
    uint8_t up[FRONT_HEAD_MAX + FRONT_IO + 512]; /* checked, for MHD */
    size_t up_len, up_off;
    uint8_t down[FRONT_IO]; /* MHD's answer, for the client */
    size_t down_len, down_off;
} relay;

/* Sends what it can; false when the peer is gone. (After EAGAIN the next
 * call passes the same buffer and length, as a TLS send needs.) */
static bool flush(http_peer *p, const uint8_t *buf, size_t *off, size_t len)
{
    while (*off < len) {
        ssize_t k = http_peer_send(p, buf + *off, len - *off);
        if (k < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        *off += (size_t)k;
    }
    return true;
}

/* Sends all of buf, waiting for the peer at most 2 s in all; false if it
 * could not (a TLS send left half done must not be followed by another). */
static bool send_all(http_peer *p, const uint8_t *buf, size_t len)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t off = 0;
    while (off < len) {
        ssize_t k = http_peer_send(p, buf + off, len - off);
        if (k > 0) {
            off += (size_t)k;
            continue;
        }
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return false;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec >= 2)
            return false;
        struct pollfd pf = {.fd = p->fd, .events = POLLOUT};
        poll(&pf, 1, 100);
    }
    return true;
}

/* In place of a refused head: a request only this process can name. */
static void refuse_in_order(relay *r)
{
    int n = snprintf((char *)r->up + r->up_len, sizeof r->up - r->up_len,
                     "GET %s HTTP/1.1\r\nHost: entrokv\r\n" HTTP_FRONT_REASON_HEADER
                     ": %d\r\nConnection: close\r\n\r\n",
                     r->front->refuse_path, r->f.error);
    if (n > 0 && (size_t)n < sizeof r->up - r->up_len)
        r->up_len += (size_t)n;
}

/* A body cut off mid-way: MHD's end closes (the request is dropped), what
 * MHD already sent goes out, then one 400 of our own. */
static void refuse_direct(relay *r)
{
    shutdown(r->mhd.fd, SHUT_RDWR);
    unsigned code = 400;
    const char *why = http_front_reason(r->f.error, &code);
    char *body = oai_error_json(why ? why : "malformed request", "invalid_request_error");
    char head[256];
    int hn = snprintf(head, sizeof head,
                      "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                      body ? strlen(body) : 0);
    if (send_all(&r->client, r->down + r->down_off, r->down_len - r->down_off) && hn > 0 &&
        send_all(&r->client, (const uint8_t *)head, (size_t)hn) && body)
        send_all(&r->client, (const uint8_t *)body, strlen(body));
    free(body);
}

static void relay_run(relay *r)
{
    bool client_eof = false, mhd_eof = false, up_shut = false, refused = false;
    uint8_t in[FRONT_IO];
    while (!atomic_load(&r->front->closing)) {
        bool up_pending = r->up_off < r->up_len, down_pending = r->down_off < r->down_len;
        if (client_eof && !up_pending && !up_shut) {
            shutdown(r->mhd.fd, SHUT_WR); /* the client's half-close, passed on */
            up_shut = true;
        }
        if (mhd_eof && !down_pending)
            return;
        /* A side with nothing asked of it is left out of the poll, so a
         * hung-up MHD end cannot make poll return at once, again and again,
         * while the client is slow to take the answer. */
        short ce = (short)((!client_eof && !refused && !up_pending ? POLLIN : 0) |
                           (down_pending ? POLLOUT : 0));
        short me = (short)((!mhd_eof && !down_pending ? POLLIN : 0) |
                           (up_pending ? POLLOUT : 0));
        /* bytes GnuTLS has decrypted already do not show on the socket */
        bool buffered = (ce & POLLIN) && http_peer_pending(&r->client);
        struct pollfd p[2] = {{.fd = r->client.fd, .events = ce},
                              {.fd = me ? r->mhd.fd : -1, .events = me}};
        int pr = poll(p, 2, buffered ? 0 : FRONT_POLL_MS);
        if (pr < 0 && errno != EINTR)
            return;
        if (buffered)
            p[0].revents |= POLLIN;
        else if (pr <= 0)
            continue;
        if ((p[0].revents & POLLERR) || ((p[0].revents & POLLHUP) && !(p[0].revents & POLLIN)))
            return; /* the client is gone: MHD's end closes with ours */
        if ((p[0].revents & POLLIN) && (ce & POLLIN)) {
            ssize_t k = http_peer_recv(&r->client, in, sizeof in);
            if (k == 0) {
                client_eof = true;
            } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                return;
            } else if (k > 0) {
                r->up_off = r->up_len = 0;
                http_framer_feed(&r->f, in, (size_t)k, r->up, &r->up_len);
                if (r->f.error) {
                    refused = true;
                    if (r->f.state != F_HEAD) {
                        refuse_direct(r);
                        return;
                    }
                    refuse_in_order(r);
                }
            }
        }
        if (!flush(&r->client, r->down, &r->down_off, r->down_len))
            return;
        if (!flush(&r->mhd, r->up, &r->up_off, r->up_len)) {
            /* MHD closed (it answered with Connection: close): what the
             * client sends now goes nowhere, what MHD sent still goes out */
            r->up_off = r->up_len = 0;
            refused = up_shut = true;
        }
        if ((p[1].revents & (POLLIN | POLLHUP | POLLERR)) && r->down_off == r->down_len) {
            ssize_t k = recv(r->mhd.fd, r->down, sizeof r->down, MSG_DONTWAIT);
            if (k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                mhd_eof = true;
            } else if (k > 0) {
                r->down_off = 0;
                r->down_len = (size_t)k;
                if (!flush(&r->client, r->down, &r->down_off, r->down_len))
                    return;
            }
        }
    }
}

/* Closes fd after its last bytes: the write side first, then what the
 * client still sends is read and dropped for a moment, so the close does
 * not reset the connection (a reset can discard the answer before the
 * client has read it). */
static void linger_close(int fd)
{
    shutdown(fd, SHUT_WR);
    char sink[4096];
    size_t dropped = 0;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0 && errno != EINTR)
            break;
        ssize_t k = recv(fd, sink, sizeof sink, MSG_DONTWAIT);
        if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR))
            break;
        dropped += k > 0 ? (size_t)k : 0;
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (dropped > (1u << 20) || t.tv_sec - t0.tv_sec >= 1)
            break;
    }
    close(fd);
}

static void *relay_main(void *arg)
{
    relay *r = arg;
    http_front *fr = r->front;
    /* MHD's end already counts against the caps and its idle timeout */
    if (!fr->tls || http_peer_handshake(&r->client, fr->tls, fr->timeout_s, &fr->closing))
        relay_run(r);
    http_peer_end(&r->client);
    linger_close(r->client.fd);
    close(r->mhd.fd);
    atomic_fetch_sub(&r->front->relays, 1);
    free(r);
    return NULL;
}

/* ---- accepting ---- */

static void serve_one(http_front *fr, int cfd, const struct sockaddr *sa, socklen_t sl)
{
    int sp[2] = {-1, -1};
    relay *r = NULL;
    if (atomic_load(&fr->relays) >= fr->max_relays ||
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0 ||
        !(r = calloc(1, sizeof *r)))
        goto fail;
    /* MHD takes sp[1] (and closes it) whether or not it keeps it */
    if (MHD_add_connection(fr->d, sp[1], sa, sl) != MHD_YES) {
        sp[1] = -1;
        goto fail;
    }
    fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK);
    /* As libmicrohttpd sets it on sockets it accepts itself: the relay
     * writes what MHD hands it as it comes (over TLS one record per
     * write), and Nagle would hold a small write behind an unacknowledged
     * one (SSE events). */
    int one = 1;
    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(sp[0], F_SETFL, fcntl(sp[0], F_GETFL) | O_NONBLOCK);
    r->front = fr;
    r->client.fd = cfd;
    r->mhd.fd = sp[0];
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    /* The default stack size: glibc puts the process's static TLS on every
     * thread's stack, and with the CUDA libraries loaded (cuBLASLt, cuSOLVER,
     * OpenBLAS) that is about 270 KiB, so a 256 KiB stack made every
     * pthread_create fail and every plain-HTTP connection close unanswered.
     * Untouched pages cost nothing. */
    pthread_t t;
    atomic_fetch_add(&fr->relays, 1);
    if (pthread_create(&t, &at, relay_main, r) != 0) {
        atomic_fetch_sub(&fr->relays, 1);
        pthread_attr_destroy(&at);
        sp[1] = -1;
        goto fail;
    }
    pthread_attr_destroy(&at);
    return;
fail:
    free(r);
    close(cfd);
    if (sp[0] >= 0)
        close(sp[0]);
    if (sp[1] >= 0)
        close(sp[1]);
}

static void *accept_main(void *arg)
{
    http_front *fr = arg;
    while (!atomic_load(&fr->stopping)) {
        struct pollfd p = {.fd = fr->lfd, .events = POLLIN};
        if (poll(&p, 1, FRONT_POLL_MS) <= 0)
            continue;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int cfd = accept4(fr->lfd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
        if (cfd < 0)
            continue; /* EMFILE and the like: the next poll tries again */
        serve_one(fr, cfd, (struct sockaddr *)&ss, sl);
    }
    return NULL;
}

bool http_front_refuse_path_new(char out[HTTP_FRONT_PATH_MAX])
{
    uint8_t rnd[12];
    FILE *ur = fopen("/dev/urandom", "rb");
    bool got = ur && fread(rnd, 1, sizeof rnd, ur) == sizeof rnd;
    if (ur)
        fclose(ur);
    if (!got)
        return false;
    int o = snprintf(out, HTTP_FRONT_PATH_MAX, "/.entrokv-refused-");
    for (size_t i = 0; i < sizeof rnd; i++)
        o += snprintf(out + o, HTTP_FRONT_PATH_MAX - (size_t)o, "%02x", rnd[i]);
    return true;
}

http_front *http_front_start(struct MHD_Daemon *d, const struct addrinfo *ai,
                             const http_front_opts *o, ekv_error *err)
{
    http_front *fr = calloc(1, sizeof *fr);
    if (!fr) {
        ekv_error_set(err, EKV_ENOMEM, "http: out of memory");
        return NULL;
    }
    fr->d = d;
    fr->max_relays = o->max_relays;
    fr->tls = o->tls;
    fr->timeout_s = o->timeout_s;
    snprintf(fr->refuse_path, sizeof fr->refuse_path, "%s", o->refuse_path);
    fr->lfd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fr->lfd < 0 || setsockopt(fr->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fr->lfd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fr->lfd, 511) != 0) {
        if (fr->lfd >= 0)
            close(fr->lfd);
        free(fr);
        ekv_error_set(err, EKV_EIO, "http: cannot listen: %s", strerror(errno));
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fr->lfd, (struct sockaddr *)&ss, &sl);
    fr->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                        : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (pthread_create(&fr->acceptor, NULL, accept_main, fr) != 0) {
        close(fr->lfd);
        free(fr);
        ekv_error_set(err, EKV_EIO, "http: cannot start the accept thread");
        return NULL;
    }
    return fr;
}

int http_front_port(const http_front *fr)
{
    return fr->port;
}

void http_front_stop_accepting(http_front *fr)
{
    atomic_store(&fr->stopping, true);
    pthread_join(fr->acceptor, NULL);
    close(fr->lfd);
}

bool http_front_free(http_front *fr)
{
    /* MHD is stopped: its ends are closed, so every relay sees EOF within a
     * poll; the flag ends any that would not */
    atomic_store(&fr->closing, true);
    for (int i = 0; i < 200 && atomic_load(&fr->relays) > 0; i++) {
        struct timespec ts = {0, 25 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (atomic_load(&fr->relays) > 0)
        return false; /* a relay still holds fr: leaked rather than freed under it */
    free(fr);
    return true;
}
