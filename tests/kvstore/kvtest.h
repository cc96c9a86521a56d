/*
 * kvtest.h - helpers shared by the KV store integration tests: block-shaped
 * values, keys, a token file, and `entrokv kvstore` daemons as child
 * processes (started, their port read from stdout, stopped with SIGTERM).
 */
#ifndef EKV_KVTEST_H
#define EKV_KVTEST_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "entrokv/kvstore.h"

/* One kvcache block of SmolLM2 geometry: 16 tokens x head_dim 64, fp16 K
 * and V, int32 positions. */
#define KVT_BLOCK_BYTES (2 * 16 * 64 * 2 + 16 * 4)

static inline double kvt_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline kvstore_key kvt_key(int n)
{
    int32_t tok[16];
    for (int i = 0; i < 16; i++)
        tok[i] = n * 16 + i;
    kvstore_key k;
    kvstore_key_make("kvtest", NULL, tok, 16, n % 30, n % 3, 0, 1, &k);
    return k;
}

static inline void kvt_fill(uint8_t *b, size_t n, int seed)
{
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(seed + 1);
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        b[i] = (uint8_t)x;
    }
}

static inline void kvt_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* The key a client of the default namespace (no namespace key: the token
 * keys it) stores k under: what the daemon's store holds. */
static inline kvstore_key kvt_stored_key(const char *token, const kvstore_key *k)
{
    kvstore_key sk;
    kvstore_ns_key((const uint8_t *)token, strlen(token), "default", k, &sk);
    return sk;
}

typedef struct kvt_daemon {
    pid_t pid;
    int port;
    int http_port; /* with http_listen: the bound --http-listen port */
    char log[256]; /* its stderr */
} kvt_daemon;

/* Starts `bin kvstore --listen host:0 ...` (and --http-listen http_listen
 * unless NULL), optionally under `ip netns exec ns`, and reads the bound
 * ports from its first stdout line (5 s limit). */
static inline int kvt_daemon_start_http(kvt_daemon *d, const char *bin, const char *ns,
                                        const char *host, int port, const char *token_file,
                                        int capacity_mb, const char *log_path,
                                        const char *http_listen)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    memset(d, 0, sizeof *d);
    snprintf(d->log, sizeof d->log, "%s", log_path);
    char listen[128], cap[32];
    snprintf(listen, sizeof listen, "%s:%d", host, port);
    snprintf(cap, sizeof cap, "%d", capacity_mb);
    d->pid = fork();
    if (d->pid == 0) {
        dup2(fds[1], 1);
        int lf = open(log_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (lf >= 0)
            dup2(lf, 2);
        close(fds[0]);
        if (ns)
            execlp("ip", "ip", "netns", "exec", ns, bin, "kvstore", "--listen", listen,
                   "--capacity-mb", cap, "--auth-token-file", token_file, (char *)NULL);
        else if (http_listen)
            execl(bin, bin, "kvstore", "--listen", listen, "--capacity-mb", cap,
                  "--auth-token-file", token_file, "--http-listen", http_listen, (char *)NULL);
        else
            execl(bin, bin, "kvstore", "--listen", listen, "--capacity-mb", cap,
                  "--auth-token-file", token_file, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    char line[256] = {0};
    size_t got = 0;
    double end = kvt_now() + 5.0;
    while (got < sizeof line - 1 && !strchr(line, '\n') && kvt_now() < end) {
        struct pollfd p = {.fd = fds[0], .events = POLLIN};
        if (poll(&p, 1, 100) <= 0)
            continue;
        ssize_t n = read(fds[0], line + got, sizeof line - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fds[0]);
    const char *p = strstr(line, "listening on ");
    const char *colon = p ? strchr(p + 13, ':') : NULL;
    if (!colon) {
        fprintf(stderr, "kvtest: daemon did not start: '%s'\n", line);
        kill(d->pid, SIGKILL);
        waitpid(d->pid, NULL, 0);
        d->pid = 0;
        return -1;
    }
    d->port = atoi(colon + 1);
    const char *http = strstr(line, " http ");
    const char *hcolon = http ? strrchr(http, ':') : NULL;
    d->http_port = hcolon ? atoi(hcolon + 1) : 0;
    return 0;
}

static inline int kvt_daemon_start(kvt_daemon *d, const char *bin, const char *ns,
                                   const char *host, int port, const char *token_file,
                                   int capacity_mb, const char *log_path)
{
    return kvt_daemon_start_http(d, bin, ns, host, port, token_file, capacity_mb, log_path,
                                 NULL);
}

/* A client of the one daemon on 127.0.0.1:port, defaults otherwise;
 * local_capacity bytes of host tier in front (0: everything over UCX).
 * NULL (and why on stderr) when it cannot be made. */
static inline kvstore_client *kvt_client(int port, const char *token, uint64_t local_capacity)
{
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.local_capacity = local_capacity;
    cfg.auth_token = (const uint8_t *)token;
    cfg.auth_token_len = strlen(token);
    ekv_error err = {0};
    kvstore_client *c = kvstore_client_create(&cfg, &err);
    if (!c)
        fprintf(stderr, "kvtest: client: %s\n", err.msg);
    return c;
}

/* Prints the last lines of the daemon's log to stderr (a failed check's
 * context: the log file is removed with the test's scratch directory). */
static inline void kvt_daemon_log_tail(const kvt_daemon *d, int lines)
{
    FILE *f = fopen(d->log, "r");
    if (!f)
        return;
    char ring[16][512];
    int n = 0;
    if (lines > 16)
        lines = 16;
    while (fgets(ring[n % lines], sizeof ring[0], f))
        n++;
    fclose(f);
    for (int i = n > lines ? n - lines : 0; i < n; i++)
        fprintf(stderr, "  [daemon] %s", ring[i % lines]);
}

/* SIGTERM, then up to 10 s for a clean exit (SIGKILL after). Returns the
 * exit status, or -1 when it had to be killed or died of a signal; either
 * way a failure says why and shows the end of the daemon's log. */
static inline int kvt_daemon_stop(kvt_daemon *d)
{
    if (d->pid <= 0)
        return -1;
    kill(d->pid, SIGCONT);
    kill(d->pid, SIGTERM);
    int status = 0, rc = -1;
    double t0 = kvt_now();
    pid_t r = 0;
    while (kvt_now() < t0 + 10.0 && (r = waitpid(d->pid, &status, WNOHANG)) == 0)
        kvt_sleep_ms(20);
    if (r == d->pid && WIFEXITED(status)) {
        rc = WEXITSTATUS(status);
        if (rc != 0)
            fprintf(stderr, "kvtest: daemon %d exited %d after SIGTERM\n", (int)d->pid, rc);
    } else if (r == d->pid) {
        fprintf(stderr, "kvtest: daemon %d died of signal %d after SIGTERM\n", (int)d->pid,
                WTERMSIG(status));
    } else {
        fprintf(stderr, "kvtest: daemon %d still running %.1f s after SIGTERM: killed\n",
                (int)d->pid, kvt_now() - t0);
        kill(d->pid, SIGKILL);
        waitpid(d->pid, NULL, 0);
    }
    if (rc != 0)
        kvt_daemon_log_tail(d, 12);
    d->pid = 0;
    return rc;
}

static inline int kvt_write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    return fclose(f);
}

/* Whether the file contains needle. */
static inline int kvt_file_has(const char *path, const char *needle)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    char line[1024];
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* The start of a test that runs daemons: `argv[0] ENTROKV_BINARY` (into
 * *bin), SIGPIPE ignored, and a scratch directory (mkdtemp of tmpl, into
 * dir) holding the token file the daemons read: token and a newline, at
 * token_file. 0 on success, else the exit status to return. */
static inline int kvt_setup(int argc, char **argv, const char **bin, char dir[64],
                            const char *tmpl, char token_file[128], const char *token)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s ENTROKV_BINARY\n", argv[0]);
        return 2;
    }
    *bin = argv[1];
    signal(SIGPIPE, SIG_IGN);
    snprintf(dir, 64, "%s", tmpl);
    if (!mkdtemp(dir))
        return 2;
    char text[128];
    snprintf(token_file, 128, "%s/token", dir);
    snprintf(text, sizeof text, "%s\n", token);
    return kvt_write_file(token_file, text) == 0 ? 0 : 2;
}

/* Removes the scratch directory, unless a check failed: then its daemon
 * logs stay for a look. */
static inline void kvt_scratch_remove(const char *dir, int failures)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (!failures && system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
}

static inline void kvt_log(void *arg, const char *line)
{
    fprintf(stderr, "  [%s] %s\n", arg ? (const char *)arg : "client", line);
}

#endif
