/*
 * serve_opts.h - the flags of `entrokv serve`, `entrokv worker` and
 * `entrokv coordinator` (cmd_serve.c runs them; docs/serving.md): which
 * mode takes which flag, their defaults, --help, and the checks made before
 * anything starts. The security flags are serve_security.h's.
 */
#ifndef ENTROKV_CLI_SERVE_OPTS_H
#define ENTROKV_CLI_SERVE_OPTS_H

#include <stdint.h>

#include "cli.h"
#include "serve_security.h"

typedef enum serve_mode { MODE_SERVE, MODE_WORKER, MODE_COORDINATOR } serve_mode;

/* "serve", "worker" or "coordinator": the name messages start with. */
const char *serve_mode_name(serve_mode mode);

typedef struct serve_opts {
    serve_mode mode;
    const char *model, *host, *model_name, *workers;
    char listen_host[128];
    int32_t grpc_port, http_port, threads, ctx, kv_tokens, max_running, max_queued, max_batch;
    int32_t prefill_chunk;
    int32_t tp, tp_timeout_ms;          /* worker --tp N (docs/tp.md) */
    int32_t kv_reserve_output;          /* percent of max_tokens admission keeps free */
    int32_t default_max_tokens;
    int32_t max_prompt_bytes;           /* 0: the coordinator's default */
    const char *kv_method;              /* request defaults (--kv-method / --kv-budget) */
    float kv_budget;
    int32_t kvstore_mb;                 /* host tier; 0: off */
    int32_t recall_host_mb;             /* recall blocks in host memory; -1: no cap */
    const char *kvstore_peers, *kvstore_token_file;
    const char *kvstore_ns, *kvstore_ns_key_file; /* namespace (docs/kvstore.md) */
    const char *kv_profile; /* --kv-profile PATH | none */
    const char *device;     /* --device cpu | cuda (NULL: cpu) */
    float drain_grace, drain_timeout, dns_interval; /* seconds */
    serve_sec_opts sec;                 /* TLS, API key, HTTP caps (serve_security.h) */
} serve_opts;

/* At least the number of flags any mode takes, plus the terminator. */
#define SERVE_FLAGS_MAX 64

/* The flags of mode, NULL-terminated, for cli_config_args (ENTROKV_* and
 * --config may set exactly these). */
void serve_mode_flags(serve_mode mode, cli_flag out[SERVE_FLAGS_MAX]);

/* Parses mode's argv (after cli_config_args) into *o with the defaults:
 * 0, -1 after printing --help (exit 0), or CLI_USAGE after a message. */
int serve_opts_parse(int argc, char **argv, serve_mode mode, serve_opts *o);

#endif
