/*
 * fuzz_http.c - libFuzzer target for the whole HTTP request path: each
 * input is raw bytes written to a real listening ekv_http (libmicrohttpd,
 * coordinator/http.c) over loopback, so the framing, the routing, the body
 * (coordinator/json_strict.c, openai.c), coord_submit's checks and the
 * response writers all run as a client would drive them. A fake worker
 * group on its own thread plays two tokens for each accepted request.
 *
 * Invariants:
 *  - the server answers whatever it is sent (or closes): any bytes that come
 *    back begin with an HTTP/1.x status line with a 3-digit code;
 *  - nothing is a 500 (the fake group never fails, so a 500 is a bug in
 *    the checks: an invalid input must be a 4xx);
 *  - the server keeps serving: the next input gets a connection.
 * One connection per input, written whole and then half-closed, so the
 * per-run cost is a loopback round trip and one MHD thread.
 *
 * Run with scripts/fuzz.sh; seeds live in tests/fuzz/corpus/http/
 * (tests/fuzz/make_http_seeds.py writes them).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "entrokv/coordinator.h"
#include "entrokv/http.h"
#include "fuzz_model.h"

void __sanitizer_set_report_fd(void *fd) __attribute__((weak));

#define MAX_CTX 256
#define QUEUE 64
#define READ_MS 5000

typedef struct fake_engine {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    engine_request q[QUEUE];
    int head, tail;
    uint64_t next_id;
} fake_engine;

static fake_engine eng = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
static ekv_http *http;
static int port;
static int devnull = -1, real_stderr = -1;

static ekv_status fake_submit(void *impl, const engine_request *r, uint64_t *id, ekv_error *err)
{
    fake_engine *e = impl;
    pthread_mutex_lock(&e->mu);
    if (e->tail - e->head == QUEUE) {
        pthread_mutex_unlock(&e->mu);
        return ekv_error_set(err, EKV_EBUSY, "fake group full");
    }
    e->q[e->tail % QUEUE] = *r;
    e->q[e->tail % QUEUE].prompt = NULL; /* the caller's only during submit */
    e->tail++;
    *id = ++e->next_id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return EKV_OK;
}

static void fake_cancel(void *impl, uint64_t id)
{
    (void)impl, (void)id; /* every request ends after two tokens anyway */
}

static void fake_stats(void *impl, engine_stats *s)
{
    (void)impl;
    memset(s, 0, sizeof *s);
}

static const coord_group_ops fake_ops = {fake_submit, fake_cancel, fake_stats, NULL};

static void *engine_main(void *p)
{
    fake_engine *e = p;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (e->head == e->tail)
            pthread_cond_wait(&e->cv, &e->mu);
        engine_request r = e->q[e->head % QUEUE];
        e->head++;
        pthread_mutex_unlock(&e->mu);
        int32_t ids[2] = {100, 101};
        r.on_tokens(r.ctx, ids, 2, "ab", 2);
        engine_usage u = {.prompt_tokens = 1, .completion_tokens = 2};
        r.on_done(r.ctx, GEN_FINISH_LENGTH, &u, EKV_OK, NULL);
    }
    return NULL;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    ekv_tokenizer *tok = fuzz_load_tokenizer("fuzz_http");
    ekv_error err = {0};
    coord_config cfg;
    coord_config_default(&cfg);
    cfg.max_ctx = MAX_CTX;
    cfg.default_max_tokens = 2;
    ekv_coordinator *c = coord_create(tok, &cfg, NULL, &err);
    if (!c || coord_add_group(c, "fake", &fake_ops, &eng, &err) != EKV_OK ||
        !(http = ekv_http_start(c, "127.0.0.1", 0, &err))) {
        fprintf(stderr, "fuzz_http: %s\n", err.msg);
        exit(1);
    }
    port = ekv_http_port(http);
    pthread_t t;
    if (pthread_create(&t, NULL, engine_main, &eng))
        exit(1);
    pthread_detach(t);
    /* the coordinator logs lines per request to fd 2: each input sends fd 2
     * to /dev/null while it runs (libFuzzer's own output, between inputs,
     * keeps the real stderr); sanitizer reports go to a copy of it */
    real_stderr = dup(2);
    devnull = open("/dev/null", O_WRONLY);
    if (real_stderr < 0 || devnull < 0)
        exit(1);
    if (__sanitizer_set_report_fd)
        __sanitizer_set_report_fd((void *)(intptr_t)real_stderr);
    return 0;
}

static int connect_server(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int tries = 0; tries < 100; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            abort();
        if (!connect(fd, (struct sockaddr *)&a, sizeof a))
            return fd;
        close(fd);
        struct timespec pause = {0, 10000000};
        nanosleep(&pause, NULL);
    }
    dup2(real_stderr, 2);
    fprintf(stderr, "fuzz_http: the server stopped accepting connections\n");
    abort();
}

static void check_response(const char *buf, size_t n)
{
    if (n == 0)
        return; /* closed without an answer (e.g. an incomplete request) */
    if (n < 12 || memcmp(buf, "HTTP/1.", 7) || (buf[7] != '0' && buf[7] != '1') ||
        buf[8] != ' ' || buf[9] < '1' || buf[9] > '5' || buf[10] < '0' || buf[10] > '9' ||
        buf[11] < '0' || buf[11] > '9') {
        fprintf(stderr, "fuzz_http: the answer does not start with a status line: %.*s\n",
                (int)(n < 200 ? n : 200), buf);
        abort();
    }
    if (buf[9] == '5' && buf[10] == '0' && buf[11] == '0') {
        fprintf(stderr, "fuzz_http: 500 for an input: %.*s\n", (int)(n < 400 ? n : 400), buf);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    dup2(devnull, 2);
    int fd = connect_server();
    size_t off = 0;
    while (off < size) {
        ssize_t w = send(fd, data + off, size - off, MSG_NOSIGNAL);
        if (w <= 0)
            break; /* the server answered early and closed */
        off += (size_t)w;
    }
    shutdown(fd, SHUT_WR);
    static char buf[1 << 16];
    size_t n = 0;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, READ_MS) <= 0)
            break;
        ssize_t r = recv(fd, buf + n, sizeof buf - 1 - n, 0);
        if (r <= 0)
            break;
        n += (size_t)r;
        if (n == sizeof buf - 1)
            n = 12; /* keep the status line, drop the rest of a long answer */
        struct timespec t1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        if (t1.tv_sec - t0.tv_sec > READ_MS / 1000)
            break;
    }
    close(fd);
    dup2(real_stderr, 2);
    check_response(buf, n);
    return 0;
}
