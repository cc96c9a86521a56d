/*
 * cmd_kvstore.c - `entrokv kvstore`: run a KV store daemon.
 *
 *   entrokv kvstore --listen ADDR:PORT --capacity-mb N --auth-token-file F
 *                   [--peers HOST:PORT,...] [--auth-timeout-ms MS]
 *                   [--http-listen HOST:PORT]
 *
 * Prints "kvstore: listening on ADDR:PORT ..." on stdout once the listener
 * is bound (port 0 picks one; scripts read the line; with --http-listen the
 * line ends in "http HOST:PORT"), logs one line per event on stderr, and
 * exits 0 on SIGTERM or SIGINT after closing its connections (/readyz says
 * 503 from the signal on).
 */
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "entrokv/kvstore.h"
#include "kvstore_http.h"

static kvstore_daemon *g_daemon;
static volatile sig_atomic_t g_stopping;

static void on_signal(int sig)
{
    (void)sig;
    g_stopping = 1;
    if (g_daemon)
        kvstore_daemon_stop(g_daemon);
}

static void log_line(void *arg, const char *line)
{
    (void)arg;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s\n", tm.tm_year + 1900,
            tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
            line);
}

static void usage(FILE *out)
{
    fprintf(out, "usage: entrokv kvstore --listen ADDR:PORT --auth-token-file FILE\n"
                 "       [--capacity-mb 1024] [--peers HOST:PORT,...] [--auth-timeout-ms 2000]\n"
                 "       [--http-listen HOST:PORT]  GET /livez, /readyz, /metrics (Prometheus)\n");
    fputs(CLI_CONFIG_USAGE, out);
}

/* Splits a comma list in place into at most cap entries. */
static int split_peers(char *s, const char **out, int cap)
{
    int n = 0;
    for (char *tok = strtok(s, ","); tok && n < cap; tok = strtok(NULL, ","))
        if (*tok)
            out[n++] = tok;
    return n;
}

/* Every flag, also what ENTROKV_* and --config may set (cli_config.c):
 * a flag added to the parser below belongs here too. */
static const cli_flag kvstore_flags[] = {
    {"listen", false},      {"auth-token-file", false}, {"peers", false},
    {"capacity-mb", false}, {"auth-timeout-ms", false}, {"http-listen", false},
    {NULL, false},
};

static int kvstore_main(int argc, char **argv);

int cmd_kvstore(int argc, char **argv)
{
    cli_args args;
    int rc = cli_config_args("kvstore", kvstore_flags, argc, argv, &args);
    if (rc)
        return rc;
    rc = kvstore_main(args.argc, args.argv);
    if (rc == CLI_USAGE)
        cli_args_explain("kvstore", &args);
    cli_args_free(&args);
    return rc;
}

static int kvstore_main(int argc, char **argv)
{
    const char *listen = NULL, *token_file = NULL, *peers_arg = NULL, *http_listen = NULL;
    int32_t capacity_mb = 1024, auth_ms = 2000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool ok = true;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return CLI_OK;
        } else if (!strcmp(a, "--listen"))
            ok = cli_take_str(argc, argv, &i, &listen);
        else if (!strcmp(a, "--auth-token-file"))
            ok = cli_take_str(argc, argv, &i, &token_file);
        else if (!strcmp(a, "--peers"))
            ok = cli_take_str(argc, argv, &i, &peers_arg);
        else if (!strcmp(a, "--http-listen"))
            ok = cli_take_str(argc, argv, &i, &http_listen);
        else if (!strcmp(a, "--capacity-mb"))
            ok = cli_take_int(argc, argv, &i, 1, 1 << 30, &capacity_mb);
        else if (!strcmp(a, "--auth-timeout-ms"))
            ok = cli_take_int(argc, argv, &i, 10, 600000, &auth_ms);
        else {
            cli_error("kvstore", "unknown flag '%s'", a);
            ok = false;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!listen || !token_file) {
        cli_error("kvstore", "--listen and --auth-token-file are required");
        usage(stderr);
        return CLI_USAGE;
    }
    ekv_error err = {0};
    uint8_t *token = NULL;
    size_t token_len = 0;
    if (kvstore_token_load(token_file, &token, &token_len, &err) != EKV_OK) {
        cli_error("kvstore", "%s", err.msg);
        return CLI_USAGE;
    }
    char *peers_copy = peers_arg ? strdup(peers_arg) : NULL;
    const char *peers[256];
    int n_peers = peers_copy ? split_peers(peers_copy, peers, 256) : 0;

    /* Values are up to 64 MiB and come and go all the time: keep freed
     * memory in the heap for the next value instead of returning it to the
     * kernel and faulting fresh zeroed pages in on every put. The store's
     * capacity bounds what the heap can grow to. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, capacity_mb > 2047 ? INT32_MAX : capacity_mb << 20);

    kvstore_daemon_config cfg;
    kvstore_daemon_config_default(&cfg);
    cfg.listen = listen;
    cfg.capacity = (uint64_t)capacity_mb << 20;
    cfg.auth_token = token;
    cfg.auth_token_len = token_len;
    cfg.peers = peers;
    cfg.n_peers = n_peers;
    cfg.auth_timeout_ms = auth_ms;
    cfg.log = log_line;
    int rc = CLI_FAIL;
    kvstore_http *http = NULL;
    kvstore_daemon *d = kvstore_daemon_create(&cfg, &err);
    if (!d) {
        cli_error("kvstore", "%s", err.msg);
        goto out;
    }
    if (http_listen && !(http = kvstore_http_start(http_listen, d, &g_stopping, &err))) {
        cli_error("kvstore", "%s", err.msg);
        kvstore_daemon_destroy(d);
        rc = CLI_USAGE;
        goto out;
    }
    g_daemon = d;
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    char host[256];
    snprintf(host, sizeof host, "%s", listen);
    char *colon = strrchr(host, ':');
    if (colon)
        *colon = 0;
    printf("kvstore: listening on %s:%d capacity %d MiB", host, kvstore_daemon_port(d),
           capacity_mb);
    if (http) {
        char hh[256];
        snprintf(hh, sizeof hh, "%s", http_listen);
        char *hc = strrchr(hh, ':');
        if (hc)
            *hc = 0;
        printf(" http %s:%d", hh, kvstore_http_port(http));
    }
    printf("\n");
    fflush(stdout);
    if (kvstore_daemon_run(d, &err) != EKV_OK)
        cli_error("kvstore", "%s", err.msg);
    else
        rc = CLI_OK;
    log_line(NULL, "kvstore: stopped");
    g_daemon = NULL;
    kvstore_http_stop(http); /* before the daemon it reads */
    kvstore_daemon_destroy(d);
out:
    memset(token, 0, token_len);
    free(token);
    free(peers_copy);
    return rc;
}
