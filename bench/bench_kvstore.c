/*
 * bench_kvstore.c - `entrokv bench kvstore`: put and get bandwidth of the KV
 * store client against a daemon this command starts on 127.0.0.1, for block
 * sizes 16 KiB .. 4 MiB, over shared memory and over TCP, with ucx_perftest
 * (ucp_am_bw, Debian's ucx-utils) run in the same invocation on the same
 * UCX_TLS and sizes as the reference.
 *
 * Ours is the whole path: batches through kvstore_client_submit, checksum
 * on put and verification on get, request / reply for gets; up to `window`
 * ops in flight in two alternating batches. Each point is the median of
 * --reps runs (perftest's too), in two working sets (see measure).
 * Bandwidth is in MiB/s (2^20 bytes, as ucx_perftest prints it). One JSON
 * line per measurement on stdout, a table on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/kvstore.h"

typedef struct kvb_opts {
    size_t sizes[16];
    int n_sizes;
    const char *transports[4];
    int n_transports;
    double mib_per_point; /* bytes moved per measurement */
    int reps;             /* measurements per point; the median is reported */
    bool reference;
    const char *perftest;
} kvb_opts;

typedef struct kvb_transport {
    const char *name, *tls;
    bool direct; /* gets read the daemon's mapped region (kvremote.c) */
} kvb_transport;

static const kvb_transport TRANSPORTS[] = {
    /* shared memory: puts by UCX over posix / cma (tcp only carries the
     * sockaddr handshake), gets straight out of the daemon's region */
    {"shm", "posix,cma,tcp", true},
    {"tcp", "tcp", false},
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static const kvb_transport *find_transport(const char *name)
{
    for (size_t i = 0; i < sizeof TRANSPORTS / sizeof TRANSPORTS[0]; i++)
        if (!strcmp(TRANSPORTS[i].name, name))
            return &TRANSPORTS[i];
    return NULL;
}

/* ---- child processes ---- */

/* Runs argv with UCX_TLS=tls; stdout into *out (malloc'd) when out is set.
 * Gives up after limit_s. Returns the exit status, -1 on failure. */
static int run_capture(char *const argv[], const char *tls, char **out, double limit_s)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        setenv("UCX_TLS", tls, 1);
        dup2(fds[1], 1);
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0)
            dup2(devnull, 2);
        close(fds[0]);
        execvp(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    double end = now_s() + limit_s;
    for (;;) {
        struct pollfd p = {.fd = fds[0], .events = POLLIN};
        int r = poll(&p, 1, 100);
        if (r > 0) {
            if (len + 1024 > cap)
                buf = realloc(buf, cap *= 2);
            ssize_t n = read(fds[0], buf + len, cap - len - 1);
            if (n <= 0)
                break;
            len += (size_t)n;
        }
        if (now_s() > end) {
            kill(pid, SIGKILL);
            break;
        }
    }
    close(fds[0]);
    buf[len] = 0;
    int status;
    waitpid(pid, &status, 0);
    if (out)
        *out = buf;
    else
        free(buf);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Starts `entrokv kvstore` on 127.0.0.1, port read from its first line (cli.h). */
pid_t bench_kvstore_daemon_start(const char *tls, const char *token_file, int capacity_mb,
                                 int *port)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    char cap[32];
    snprintf(cap, sizeof cap, "%d", capacity_mb);
    pid_t pid = fork();
    if (pid == 0) {
        if (tls)
            setenv("UCX_TLS", tls, 1);
        dup2(fds[1], 1);
        close(fds[0]);
        execl("/proc/self/exe", "entrokv", "kvstore", "--listen", "127.0.0.1:0", "--capacity-mb",
              cap, "--auth-token-file", token_file, (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    char line[256] = {0};
    size_t got = 0;
    double end = now_s() + 5;
    while (!strchr(line, '\n') && got < sizeof line - 1 && now_s() < end) {
        struct pollfd p = {.fd = fds[0], .events = POLLIN};
        if (poll(&p, 1, 100) <= 0)
            continue;
        ssize_t n = read(fds[0], line + got, sizeof line - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fds[0]);
    const char *colon = strstr(line, "127.0.0.1:");
    if (!colon) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -1;
    }
    *port = atoi(colon + 10);
    return pid;
}

void bench_kvstore_daemon_stop(pid_t pid)
{
    kill(pid, SIGTERM);
    for (int i = 0; i < 100; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        struct timespec ts = {0, 20000000};
        nanosleep(&ts, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* ---- the reference ---- */

/* ucx_perftest ucp_am_bw for one size: the bandwidth (MiB/s, "overall"
 * column of the final line), or 0 when it could not run. */
static double perftest(const kvb_opts *o, const char *tls, size_t size, long iters, int port)
{
    char sz[32], n[32], w[32], p[16];
    snprintf(sz, sizeof sz, "%zu", size);
    snprintf(n, sizeof n, "%ld", iters);
    snprintf(w, sizeof w, "%ld", iters / 10 + 1);
    snprintf(p, sizeof p, "%d", port);
    pid_t server = fork();
    if (server == 0) {
        setenv("UCX_TLS", tls, 1);
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execlp(o->perftest, o->perftest, "-p", p, (char *)NULL);
        _exit(127);
    }
    struct timespec ts = {0, 300000000};
    nanosleep(&ts, NULL); /* the server binds its port */
    char *argv[] = {(char *)o->perftest, "127.0.0.1", "-p", p, "-t", "ucp_am_bw", "-s", sz,
                    "-n", n, "-w", w, "-f", NULL};
    char *out = NULL;
    int rc = run_capture(argv, tls, &out, 60);
    kill(server, SIGKILL);
    waitpid(server, NULL, 0);
    double bw = 0;
    for (char *line = out ? strtok(out, "\n") : NULL; rc == 0 && line; line = strtok(NULL, "\n")) {
        double f[8];
        if (sscanf(line, " %lf %lf %lf %lf %lf %lf %lf %lf", &f[0], &f[1], &f[2], &f[3], &f[4],
                   &f[5], &f[6], &f[7]) == 8)
            bw = f[5];
    }
    free(out);
    return bw;
}

/* ---- ours ---- */

typedef struct kvb_run {
    kvstore_client *c;
    size_t size;
    int window, n_keys;
    uint8_t *src, *dst; /* src: one value; dst: 2 x window buffers */
    kvstore_op *ops;    /* 2 x window */
    long failures;
} kvb_run;

static kvstore_key bench_key(size_t size, int i)
{
    int32_t t[2] = {(int32_t)size, i};
    kvstore_key k;
    kvstore_key_make("bench", NULL, t, 2, 0, 0, 0, 1, &k);
    return k;
}

static void fill_batch(kvb_run *r, int half, kvstore_op_kind kind, long *next)
{
    for (int i = 0; i < r->window; i++) {
        kvstore_op *op = &r->ops[half * r->window + i];
        int key = (int)(*next % r->n_keys);
        (*next)++;
        *op = (kvstore_op){.kind = kind, .key = bench_key(r->size, key), .len = r->size,
                           .buf = kind == KVSTORE_PUT ? r->src
                                                      : r->dst + (size_t)(half * r->window + i) *
                                                                     r->size};
    }
}

static void count_failures(kvb_run *r, int half)
{
    for (int i = 0; i < r->window; i++)
        r->failures += r->ops[half * r->window + i].result != KVSTORE_OK;
}

/* n_ops ops of one kind, two batches in flight; returns seconds. */
static double pump(kvb_run *r, kvstore_op_kind kind, long n_ops)
{
    kvstore_batch *b[2] = {NULL, NULL};
    long next = 0, done = 0;
    double t0 = now_s();
    int half = 0;
    while (done < n_ops) {
        if (b[half]) {
            kvstore_batch_release(b[half]);
            count_failures(r, half);
            done += r->window;
            b[half] = NULL;
        }
        if (next < n_ops) {
            fill_batch(r, half, kind, &next);
            if (kvstore_client_submit(r->c, r->ops + half * r->window, (size_t)r->window, NULL,
                                      NULL, &b[half], NULL) != EKV_OK) {
                r->failures += r->window;
                done += r->window;
                next += 0;
            }
        }
        half ^= 1;
    }
    return now_s() - t0;
}

/* One point: medians over reps of our bandwidth, perftest's, and the
 * ratio of each rep's pair. */
typedef struct kvb_point {
    double put, get, ref, put_ratio, get_ratio;
    long n_ops, failures;
} kvb_point;

static void print_point(const char *tr, const char *tls, const char *set, double set_mib,
                        const char *op, size_t size, int reps, const kvb_point *pt,
                        double mib_s, double ratio)
{
    printf("{\"bench\":\"kvstore\",\"transport\":\"%s\",\"ucx_tls\":\"%s\","
           "\"working_set\":\"%s\",\"working_set_mib\":%.0f,\"op\":\"%s\","
           "\"block_bytes\":%zu,\"ops\":%ld,\"reps\":%d,\"mib_per_s\":%.1f,"
           "\"failures\":%ld,\"reference\":\"ucx_perftest ucp_am_bw\",\"ref_mib_per_s\":%.1f,"
           "\"ratio\":%.3f}\n",
           tr, tls, set, set_mib, op, size, pt->n_ops, reps, mib_s, pt->failures, pt->ref, ratio);
    fflush(stdout);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Ops per batch (two batches alternate): about 4 MiB of values, at least 2
 * ops, at most 64. More in flight does not add bandwidth here; it only
 * pushes the working set out of cache. */
static int window_for(size_t size)
{
    int w = (int)(4.0 * 1048576 / (double)size);
    return w < 2 ? 2 : w > 64 ? 64 : w;
}

/*
 * One block size, one working set: `reps` rounds of ucx_perftest, n_ops
 * puts, then n_ops gets, back to back, so each of our figures has a
 * reference measured seconds apart; this VM's bandwidth drifts by 2x over
 * minutes, and the median of per-round ratios is what that drift leaves
 * alone. "cache" keeps the data where ucx_perftest keeps its own (it sends
 * from and receives into one buffer each): 2 x window keys and buffers, at
 * most 16 MiB. "spread" cycles over 512 MiB of keys, which is what a store
 * full of cold blocks costs; perftest has no such mode, so that row's ratio
 * is against the same reference.
 */
static bool measure(const kvb_opts *o, const kvb_transport *t, kvstore_client *c, size_t size,
                    bool spread, int port_base, kvb_point *pt)
{
    kvb_run r = {.c = c, .size = size, .window = window_for(size)};
    long n_ops = (long)(o->mib_per_point * 1048576 / (double)size);
    n_ops = (n_ops + r.window - 1) / r.window * r.window;
    r.n_keys = spread ? (int)((512.0 * 1048576) / (double)size) : 2 * r.window;
    if (r.n_keys > n_ops)
        r.n_keys = (int)n_ops;
    r.src = aligned_alloc(64, size); /* as KV memory is, and perftest's buffers */
    r.dst = aligned_alloc(64, 2 * (size_t)r.window * size);
    r.ops = calloc(2 * (size_t)r.window, sizeof *r.ops);
    for (size_t i = 0; i < size; i++)
        r.src[i] = (uint8_t)(i * 131 + 7);
    memset(r.dst, 0, 2 * (size_t)r.window * size);
    pump(&r, KVSTORE_PUT, r.n_keys); /* warm-up and populate what gets will read */
    r.failures = 0;
    double put[16], get[16], ref[16], put_ratio[16], get_ratio[16];
    double mib = (double)n_ops * (double)size / 1048576;
    for (int i = 0; i < o->reps; i++) {
        ref[i] = o->reference ? perftest(o, t->tls, size, n_ops, port_base + i) : 0;
        put[i] = mib / pump(&r, KVSTORE_PUT, n_ops);
        get[i] = mib / pump(&r, KVSTORE_GET, n_ops);
        put_ratio[i] = ref[i] > 0 ? put[i] / ref[i] : 0;
        get_ratio[i] = ref[i] > 0 ? get[i] / ref[i] : 0;
    }
    *pt = (kvb_point){.put = median(put, o->reps), .get = median(get, o->reps),
                      .ref = median(ref, o->reps), .put_ratio = median(put_ratio, o->reps),
                      .get_ratio = median(get_ratio, o->reps), .n_ops = n_ops,
                      .failures = r.failures};
    free(r.src);
    free(r.dst);
    free(r.ops);
    return r.failures == 0;
}

static int bench_transport(const kvb_opts *o, const kvb_transport *t, const char *token_file)
{
    setenv("UCX_TLS", t->tls, 1); /* the client's context reads it at creation */
    int port;
    pid_t d = bench_kvstore_daemon_start(t->tls, token_file, 1200, &port);
    if (d < 0) {
        cli_error("bench", "could not start a kvstore daemon (UCX_TLS=%s)", t->tls);
        return CLI_FAIL;
    }
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
    const char *peers[] = {peer};
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.peers = peers;
    cfg.n_peers = 1;
    cfg.auth_token = (const uint8_t *)"bench-token";
    cfg.auth_token_len = 11;
    cfg.op_timeout_ms = 10000;
    /* the tcp row measures TCP: gets from this host's daemon would
     * otherwise be read from its shared memory */
    cfg.no_direct = !t->direct;
    ekv_error err = {0};
    kvstore_client *c = kvstore_client_create(&cfg, &err);
    int rc = CLI_FAIL;
    if (!c || !kvstore_client_peer_up(c, 0)) {
        cli_error("bench", "client could not connect over UCX_TLS=%s: %s", t->tls, err.msg);
        goto out;
    }
    for (int s = 0; s < o->n_sizes; s++) {
        size_t size = o->sizes[s];
        for (int spread = 0; spread < 2; spread++) {
            const char *set = spread ? "spread" : "cache";
            double set_mib = spread ? 512 : 2.0 * window_for(size) * (double)size / 1048576;
            kvb_point pt;
            bool ok = measure(o, t, c, size, spread, 13400 + (s * 2 + spread) * 16, &pt);
            print_point(t->name, t->tls, set, set_mib, "put", size, o->reps, &pt, pt.put,
                        pt.put_ratio);
            print_point(t->name, t->tls, set, set_mib, "get", size, o->reps, &pt, pt.get,
                        pt.get_ratio);
            fprintf(stderr, "%-4s %-6s %6zu KiB  put %7.0f MiB/s  get %7.0f MiB/s  "
                            "ucx_perftest %7.0f MiB/s  ratio put %.2f get %.2f%s\n",
                    t->name, set, size >> 10, pt.put, pt.get, pt.ref, pt.put_ratio, pt.get_ratio,
                    ok ? "" : "  (FAILURES)");
            if (!ok)
                goto out;
        }
    }
    rc = CLI_OK;
out:
    kvstore_client_destroy(c);
    bench_kvstore_daemon_stop(d);
    return rc;
}

static bool parse_sizes(const char *s, kvb_opts *o)
{
    char *copy = strdup(s), *save = NULL;
    o->n_sizes = 0;
    for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        char *end;
        unsigned long v = strtoul(t, &end, 10);
        if (*end == 'K' || *end == 'k')
            v <<= 10, end++;
        else if (*end == 'M' || *end == 'm')
            v <<= 20, end++;
        if (*end || v == 0 || v > (32ul << 20) || o->n_sizes == 16) {
            free(copy);
            return false;
        }
        o->sizes[o->n_sizes++] = v;
    }
    free(copy);
    return o->n_sizes > 0;
}

int bench_kvstore(int argc, char **argv)
{
    kvb_opts o = {.mib_per_point = 256, .reps = 5, .reference = true,
                  .perftest = "ucx_perftest"};
    parse_sizes("16K,64K,256K,1M,4M", &o);
    o.transports[o.n_transports++] = "shm";
    o.transports[o.n_transports++] = "tcp";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "--json")) {
            continue; /* JSON lines always go to stdout; the table to stderr */
        } else if (!strcmp(a, "--no-reference")) {
            o.reference = false;
        } else if (!strcmp(a, "--sizes")) {
            if (!cli_take_str(argc, argv, &i, &v) || !parse_sizes(v, &o)) {
                cli_error("bench", "--sizes expects a list like 16K,1M,4M");
                return CLI_USAGE;
            }
        } else if (!strcmp(a, "--transports")) {
            if (!cli_take_str(argc, argv, &i, &v))
                return CLI_USAGE;
            o.n_transports = 0;
            if (strstr(v, "shm"))
                o.transports[o.n_transports++] = "shm";
            if (strstr(v, "tcp"))
                o.transports[o.n_transports++] = "tcp";
            if (!o.n_transports) {
                cli_error("bench", "--transports expects shm, tcp or shm,tcp");
                return CLI_USAGE;
            }
        } else if (!strcmp(a, "--mib")) {
            float f;
            if (!cli_take_float(argc, argv, &i, 1, 65536, &f))
                return CLI_USAGE;
            o.mib_per_point = f;
        } else if (!strcmp(a, "--reps")) {
            if (!cli_take_int(argc, argv, &i, 1, 16, &o.reps))
                return CLI_USAGE;
        } else if (!strcmp(a, "--perftest")) {
            if (!cli_take_str(argc, argv, &i, &o.perftest))
                return CLI_USAGE;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: entrokv bench kvstore [--json] [--sizes 16K,64K,256K,1M,4M]\n"
                   "       [--transports shm,tcp] [--mib 256] [--reps 5] [--no-reference] "
                   "[--perftest ucx_perftest]\n");
            return CLI_OK;
        } else {
            cli_error("bench", "unknown flag '%s'", a);
            return CLI_USAGE;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    char token_file[] = "/tmp/entrokv-bench-token-XXXXXX";
    int fd = mkstemp(token_file);
    if (fd < 0 || write(fd, "bench-token\n", 12) != 12) {
        cli_error("bench", "cannot write a token file: %s", strerror(errno));
        return CLI_FAIL;
    }
    close(fd);
    fprintf(stderr, "kvstore bandwidth vs ucx_perftest ucp_am_bw (same UCX_TLS, sizes, bytes)\n");
    int rc = CLI_OK;
    for (int t = 0; t < o.n_transports && rc == CLI_OK; t++)
        rc = bench_transport(&o, find_transport(o.transports[t]), token_file);
    unlink(token_file);
    return rc;
}
