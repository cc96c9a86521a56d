/*
 * serve_opts.c - the serving processes' flags (serve_opts.h): the table of
 * which mode takes which flag, --help, parsing and the checks between flags.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve_opts.h"
#include "entrokv/comm.h"
#include "entrokv/compress.h"
#include "entrokv/engine.h"

static const char *mode_name[] = {"serve", "worker", "coordinator"};

const char *serve_mode_name(serve_mode mode)
{
    return mode_name[mode];
}

static void usage_split(FILE *out, serve_mode mode)
{
    if (mode == MODE_WORKER)
        fprintf(out,
                "usage: entrokv worker --model PATH [--listen HOST:PORT] [engine flags]\n"
                "  --listen HOST:PORT    where the Worker gRPC service listens (default\n"
                "                        127.0.0.1:50061; port 0: any free port)\n"
                "  engine flags as for `entrokv serve`: --threads --ctx --kv-tokens\n"
                "  --max-running --max-queued --max-batch --prefill-chunk --kv-reserve-output\n"
                "  --default-max-tokens\n"
                "  --drain-grace --drain-timeout --kvstore-mb --kvstore-peers --recall-host-mb\n"
                "  --kvstore-token-file --kv-profile --config\n"
                "  --device cpu|cuda     where the forward runs (default cpu), as for serve\n"
                "  --tp N                tensor parallelism: N ranks as threads, one worker\n"
                "                        (under mpirun: one rank per process; docs/tp.md)\n"
                "  --tp-timeout-ms N     a rank silent this long breaks the group (10000)\n"
                "  --tls-cert FILE, --tls-key FILE  the listener speaks TLS only\n"
                SERVE_SEC_WORKER_USAGE);
    else
        fprintf(out,
                "usage: entrokv coordinator --model PATH --workers LIST [flags]\n"
                "  --model PATH          GGUF whose tokenizer and chat template to use\n"
                "  --workers LIST        `entrokv worker` groups, comma separated: HOST:PORT,\n"
                "                        or dns:NAME:PORT for one group per A/AAAA record of\n"
                "                        NAME (a headless Service), re-resolved while serving\n"
                "  --dns-interval S      seconds between lookups of dns: entries (default 10)\n"
                "  --host, --grpc-port, --http-port, --ctx, --default-max-tokens,\n"
                "  --kv-method, --kv-budget, --model-name, --max-prompt-bytes, --drain-grace,\n"
                "  --drain-timeout, --config, --tls-cert, --tls-key, --api-key,\n"
                "  --api-key-file, --http-max-connections, --http-max-per-client,\n"
                "  --http-timeout\n"
                "                        as for `entrokv serve`\n"
                SERVE_SEC_COORD_USAGE);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: entrokv serve --model PATH [flags]\n"
            "  --model PATH          GGUF model file\n"
            "  --host H              address to listen on (default 127.0.0.1)\n"
            "  --grpc-port N         gRPC port (default 50051; 0: any free port)\n"
            "  --http-port N         HTTP port (default 8080; 0: any free port)\n"
            "  --threads N           compute threads (default: one per core)\n"
            "  --device cpu|cuda     where the forward runs (default cpu); cuda: GPU 0, its\n"
            "                        KV pool --kv-tokens per head; SCOPE, recall and SparK\n"
            "                        are refused there (docs/cuda.md)\n"
            "  --ctx N               tokens per sequence, prompt + completion (default 2048,\n"
            "                        at most the model's training context)\n"
            "  --kv-tokens N         KV pool size in tokens over all sequences (default 4 x ctx)\n"
            "  --max-running N       sequences decoded together (default 32)\n"
            "  --max-queued N        requests waiting beyond those; more get 429 /\n"
            "                        RESOURCE_EXHAUSTED (default 256)\n"
            "  --max-batch N         rows per forward pass (default 256)\n"
            "  --prefill-chunk N     prompt rows per forward pass while streams decode, so\n"
            "                        their next tokens do not wait behind long prompts\n"
            "                        (default 64; 0: up to --max-batch)\n"
            "  --kv-reserve-output P  percent of each request's remaining max_tokens (at\n"
            "                        its compressed size) that admission keeps free in the\n"
            "                        KV pool: 100 never preempts a request that runs to\n"
            "                        max_tokens (default 0: admit on the prompt, preempt)\n"
            "  --default-max-tokens N  completion length when a request does not say (256)\n"
            "  --kv-method M         KV compression when a request names none: full,\n"
            "                        streaming, snapkv, pyramidkv, uncomp (default full)\n"
            "  --kv-budget B         kv_budget when a request gives none: a fraction of the\n"
            "                        prompt (0.2) or tokens per head (128) (default 1)\n"
            "  --kvstore-mb N        host KV store tier: prompt KV kept for reuse by later\n"
            "                        requests with the same prefix (default 1024; 0: off)\n"
            "  --kvstore-peers H:P,...  kvstore daemons (entrokv kvstore) behind the host tier\n"
            "  --recall-host-mb N    host memory for evicted blocks kept for recall (requests\n"
            "                        with recall), over all sequences; beyond it they go to\n"
            "                        the --kvstore-peers daemons (default: no cap)\n"
            "  --kv-profile P        UNComp profile for kv_method \"uncomp\" (default\n"
            "                        profiles/<model>.uncomp; 'none': online entropy)\n"
            "  --kvstore-token-file F   their shared auth token\n"
            "  --kvstore-namespace NAME  what this server stores and reads in the KV store\n"
            "                        (default: the model's identity)\n"
            "  --kvstore-namespace-key-file F  the namespace's secret key: values are MACed\n"
            "                        and keyed with it (default: the auth token)\n"
            "  --model-name NAME     the model id clients see (default: the file name without .gguf)\n"
            "  --max-prompt-bytes N  longer prompts (or chat messages' text) are refused before\n"
            "                        tokenizing: 400 / INVALID_ARGUMENT (default 1048576)\n"
            "  --drain-grace S       after SIGTERM, seconds new requests are still accepted\n"
            "                        while /readyz already fails (default 5)\n"
            "  --drain-timeout S     seconds after SIGTERM until running streams are cancelled\n"
            "                        (default 30)\n"
            SERVE_SEC_USAGE
            "  --worker-port N       also serve the internal Worker service (for a\n"
            "                        coordinator) on this port; never on --grpc-port\n"
            SERVE_SEC_WORKER_USAGE
            CLI_CONFIG_USAGE
            "The listening ports are logged on stderr: \"listening grpc=HOST:PORT http=HOST:PORT\".\n");
}

/* --listen HOST:PORT (worker) into host and grpc_port. */
static bool take_listen(int argc, char **argv, int *i, serve_opts *o)
{
    const char *v;
    if (!cli_take_str(argc, argv, i, &v))
        return false;
    const char *colon = strrchr(v, ':');
    char *end;
    long port = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || colon == v || !colon[1] || *end || port < 0 || port > 65535 ||
        (size_t)(colon - v) >= sizeof o->listen_host) {
        cli_error("worker", "--listen expects HOST:PORT, got '%s'", v);
        return false;
    }
    snprintf(o->listen_host, sizeof o->listen_host, "%.*s", (int)(colon - v), v);
    o->host = o->listen_host;
    o->grpc_port = (int32_t)port;
    return true;
}

/* Every flag and the modes that take it (also what ENTROKV_* and --config
 * may set, cli_config.c). */
enum { F_SERVE = 1 << MODE_SERVE, F_WORKER = 1 << MODE_WORKER, F_COORD = 1 << MODE_COORDINATOR };
static const struct {
    const char *name;
    int modes;
} serve_flags[] = {
    {"model", F_SERVE | F_WORKER | F_COORD},      {"ctx", F_SERVE | F_WORKER | F_COORD},
    {"default-max-tokens", F_SERVE | F_WORKER | F_COORD},
    {"kv-method", F_SERVE | F_COORD},              {"kv-budget", F_SERVE | F_COORD},
    {"drain-grace", F_SERVE | F_WORKER | F_COORD}, {"drain-timeout", F_SERVE | F_WORKER | F_COORD},
    {"host", F_SERVE | F_COORD},                   {"grpc-port", F_SERVE | F_COORD},
    {"http-port", F_SERVE | F_COORD},              {"model-name", F_SERVE | F_COORD},
    {"listen", F_WORKER},                          {"workers", F_COORD},
    {"dns-interval", F_COORD},                     {"threads", F_SERVE | F_WORKER},
    {"max-prompt-bytes", F_SERVE | F_COORD},
    {"kv-tokens", F_SERVE | F_WORKER},             {"max-running", F_SERVE | F_WORKER},
    {"max-queued", F_SERVE | F_WORKER},            {"max-batch", F_SERVE | F_WORKER},
    {"prefill-chunk", F_SERVE | F_WORKER},         {"kv-reserve-output", F_SERVE | F_WORKER},
    {"tp", F_WORKER},                              {"tp-timeout-ms", F_WORKER},
    {"device", F_SERVE | F_WORKER},
    {"kvstore-mb", F_SERVE | F_WORKER},            {"kvstore-peers", F_SERVE | F_WORKER},
    {"kvstore-token-file", F_SERVE | F_WORKER},   {"recall-host-mb", F_SERVE | F_WORKER},
    {"kv-profile", F_SERVE | F_WORKER},            {"kvstore-namespace", F_SERVE | F_WORKER},
    {"kvstore-namespace-key-file", F_SERVE | F_WORKER},
    {"tls-cert", F_SERVE | F_WORKER | F_COORD},    {"tls-key", F_SERVE | F_WORKER | F_COORD},
    {"tls-client-ca", F_SERVE | F_WORKER},         {"tls-ca", F_COORD},
    {"tls-client-cert", F_COORD},                  {"tls-client-key", F_COORD},
    {"tls-server-name", F_COORD},                  {"worker-port", F_SERVE},
    {"api-key", F_SERVE | F_COORD},                {"api-key-file", F_SERVE | F_COORD},
    {"http-max-connections", F_SERVE | F_COORD},   {"http-max-per-client", F_SERVE | F_COORD},
    {"http-timeout", F_SERVE | F_COORD},
};
#define N_SERVE_FLAGS (sizeof serve_flags / sizeof *serve_flags)

/* Whether mode takes flag ("--name"); unknown flags are not taken. */
static bool mode_allows(serve_mode mode, const char *flag)
{
    for (size_t i = 0; i < N_SERVE_FLAGS; i++)
        if (!strncmp(flag, "--", 2) && !strcmp(flag + 2, serve_flags[i].name))
            return serve_flags[i].modes & (1 << mode);
    return false;
}

_Static_assert(N_SERVE_FLAGS < SERVE_FLAGS_MAX, "SERVE_FLAGS_MAX too small");

void serve_mode_flags(serve_mode mode, cli_flag out[SERVE_FLAGS_MAX])
{
    int n = 0;
    for (size_t i = 0; i < N_SERVE_FLAGS; i++)
        if (serve_flags[i].modes & (1 << mode))
            out[n++] = (cli_flag){serve_flags[i].name, false};
    out[n] = (cli_flag){NULL, false};
}

int serve_opts_parse(int argc, char **argv, serve_mode mode, serve_opts *o)
{
    memset(o, 0, sizeof *o);
    o->mode = mode;
    o->host = "127.0.0.1";
    o->grpc_port = 50051;
    o->http_port = 8080;
    o->max_running = 32;
    o->max_queued = 256;
    o->max_batch = 256;
    o->prefill_chunk = ENGINE_PREFILL_CHUNK;
    o->default_max_tokens = 256;
    o->kv_budget = 1.0f;
    o->kvstore_mb = 1024;
    o->recall_host_mb = -1;
    o->tp_timeout_ms = 10000;
    o->drain_grace = 5;
    o->drain_timeout = 30;
    o->dns_interval = 10;
    if (mode == MODE_WORKER)
        o->grpc_port = 50061;
    serve_sec_defaults(&o->sec);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool ok = true;
        int taken;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (mode == MODE_SERVE)
                usage(stdout);
            else
                usage_split(stdout, mode);
            return -1;
        } else if (!mode_allows(mode, a)) {
            cli_error(mode_name[mode], "unknown flag '%s' (see --help)", a);
            return CLI_USAGE;
        } else if ((taken = serve_sec_take(mode_name[mode], argc, argv, &i, &o->sec))) {
            ok = taken > 0;
        } else if (!strcmp(a, "--listen")) {
            ok = take_listen(argc, argv, &i, o);
        } else if (!strcmp(a, "--workers")) {
            ok = cli_take_str(argc, argv, &i, &o->workers);
        } else if (!strcmp(a, "--model")) {
            ok = cli_take_str(argc, argv, &i, &o->model);
        } else if (!strcmp(a, "--model-name")) {
            ok = cli_take_str(argc, argv, &i, &o->model_name);
        } else if (!strcmp(a, "--host")) {
            ok = cli_take_str(argc, argv, &i, &o->host);
        } else if (!strcmp(a, "--grpc-port")) {
            ok = cli_take_int(argc, argv, &i, 0, 65535, &o->grpc_port);
        } else if (!strcmp(a, "--http-port")) {
            ok = cli_take_int(argc, argv, &i, 0, 65535, &o->http_port);
        } else if (!strcmp(a, "--threads")) {
            ok = cli_take_int(argc, argv, &i, 1, 1024, &o->threads);
        } else if (!strcmp(a, "--ctx")) {
            ok = cli_take_int(argc, argv, &i, 16, 1 << 20, &o->ctx);
        } else if (!strcmp(a, "--kv-tokens")) {
            ok = cli_take_int(argc, argv, &i, 16, 1 << 26, &o->kv_tokens);
        } else if (!strcmp(a, "--max-running")) {
            ok = cli_take_int(argc, argv, &i, 1, 65536, &o->max_running);
        } else if (!strcmp(a, "--max-queued")) {
            ok = cli_take_int(argc, argv, &i, 1, 1 << 20, &o->max_queued);
        } else if (!strcmp(a, "--max-batch")) {
            ok = cli_take_int(argc, argv, &i, 1, 65536, &o->max_batch);
        } else if (!strcmp(a, "--device")) {
            ok = cli_take_device(mode_name[mode], argc, argv, &i, &o->device);
        } else if (!strcmp(a, "--tp")) {
            ok = cli_take_int(argc, argv, &i, 1, COMM_THREADS_MAX, &o->tp);
        } else if (!strcmp(a, "--tp-timeout-ms")) {
            ok = cli_take_int(argc, argv, &i, 100, 3600000, &o->tp_timeout_ms);
        } else if (!strcmp(a, "--prefill-chunk")) {
            ok = cli_take_int(argc, argv, &i, 0, 65536, &o->prefill_chunk);
        } else if (!strcmp(a, "--kv-reserve-output")) {
            ok = cli_take_int(argc, argv, &i, 0, 100, &o->kv_reserve_output);
        } else if (!strcmp(a, "--kvstore-mb")) {
            ok = cli_take_int(argc, argv, &i, 0, 1 << 24, &o->kvstore_mb);
        } else if (!strcmp(a, "--recall-host-mb")) {
            ok = cli_take_int(argc, argv, &i, 0, 1 << 24, &o->recall_host_mb);
        } else if (!strcmp(a, "--kv-profile")) {
            ok = cli_take_str(argc, argv, &i, &o->kv_profile);
        } else if (!strcmp(a, "--kvstore-peers")) {
            ok = cli_take_str(argc, argv, &i, &o->kvstore_peers);
        } else if (!strcmp(a, "--kvstore-token-file")) {
            ok = cli_take_str(argc, argv, &i, &o->kvstore_token_file);
        } else if (!strcmp(a, "--kvstore-namespace")) {
            ok = cli_take_str(argc, argv, &i, &o->kvstore_ns);
        } else if (!strcmp(a, "--kvstore-namespace-key-file")) {
            ok = cli_take_str(argc, argv, &i, &o->kvstore_ns_key_file);
        } else if (!strcmp(a, "--max-prompt-bytes")) {
            ok = cli_take_int(argc, argv, &i, 1, 1 << 30, &o->max_prompt_bytes);
        } else if (!strcmp(a, "--default-max-tokens")) {
            ok = cli_take_int(argc, argv, &i, 1, 1 << 20, &o->default_max_tokens);
        } else if (!strcmp(a, "--kv-method")) {
            ok = cli_take_str(argc, argv, &i, &o->kv_method);
        } else if (!strcmp(a, "--kv-budget")) {
            ok = cli_take_float(argc, argv, &i, 1e-6, 1 << 24, &o->kv_budget);
        } else if (!strcmp(a, "--drain-grace")) {
            ok = cli_take_float(argc, argv, &i, 0, 86400, &o->drain_grace);
        } else if (!strcmp(a, "--drain-timeout")) {
            ok = cli_take_float(argc, argv, &i, 0, 86400, &o->drain_timeout);
        } else if (!strcmp(a, "--dns-interval")) {
            ok = cli_take_float(argc, argv, &i, 0.1, 86400, &o->dns_interval);
        } else {
            cli_error(mode_name[mode], "unknown flag '%s' (see --help)", a);
            return CLI_USAGE;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!o->model) {
        cli_error(mode_name[mode], "--model is required (see --help)");
        return CLI_USAGE;
    }
    kvc_policy kv_default;
    ekv_error kv_err = {0};
    if (kvc_policy_parse(o->kv_method, o->kv_budget, &kv_default, &kv_err)) {
        cli_error(mode_name[mode], "--kv-method/--kv-budget: %s", kv_err.msg);
        return CLI_USAGE;
    }
    if (o->recall_host_mb >= 0 && !o->kvstore_peers) {
        cli_error(mode_name[mode], "--recall-host-mb needs --kvstore-peers (where the rest goes)");
        return CLI_USAGE;
    }
    if (o->kvstore_peers && !o->kvstore_token_file) {
        cli_error(mode_name[mode], "--kvstore-peers needs --kvstore-token-file");
        return CLI_USAGE;
    }
    if (mode == MODE_COORDINATOR && (!o->workers || !*o->workers)) {
        cli_error(mode_name[mode], "--workers is required (see --help)");
        return CLI_USAGE;
    }
    if (mode != MODE_WORKER && o->grpc_port == o->http_port && o->grpc_port != 0) {
        cli_error(mode_name[mode], "--grpc-port and --http-port must differ");
        return CLI_USAGE;
    }
    const int32_t wp = o->sec.worker_port;
    if (wp > 0 && (wp == o->grpc_port || wp == o->http_port)) {
        cli_error(mode_name[mode], "--worker-port must differ from --grpc-port and --http-port");
        return CLI_USAGE;
    }
    if (mode == MODE_SERVE && o->sec.tls_client_ca && wp < 0) {
        cli_error(mode_name[mode], "--tls-client-ca is for the Worker listener: add --worker-port");
        return CLI_USAGE;
    }
    return 0;
}
