/*
 * cli.h - subcommand entry points and the small flag-parsing helpers they
 * share. Only cli/ (and bench/, which provides `entrokv bench`) may print
 * errors and choose exit codes.
 */
#ifndef ENTROKV_CLI_H
#define ENTROKV_CLI_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#define EKV_DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

int cmd_generate(int argc, char **argv);
int cmd_fetch_model(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_kvstore(int argc, char **argv);    /* cli/cmd_kvstore.c */
int cmd_serve(int argc, char **argv);       /* cli/cmd_serve.c */
int cmd_worker(int argc, char **argv);      /* cli/cmd_serve.c */
int cmd_coordinator(int argc, char **argv); /* cli/cmd_serve.c */
int bench_kvstore(int argc, char **argv);  /* bench/bench_kvstore.c: `bench kvstore` */
int bench_restore(int argc, char **argv);  /* bench/bench_restore.c: `bench restore` */
/* bench/bench_kvstore.c: starts `entrokv kvstore` (this binary) on 127.0.0.1:0
 * with UCX_TLS=tls (NULL: UCX's choice) and returns its pid, *port from its
 * first line; -1 on failure. Stop waits for a clean exit, then SIGKILL. */
pid_t bench_kvstore_daemon_start(const char *tls, const char *token_file, int capacity_mb,
                                 int *port);
void bench_kvstore_daemon_stop(pid_t pid);
int bench_serve(int argc, char **argv);    /* bench/bench_generate.c: runs bench/bench_serve.py */
int bench_soak(int argc, char **argv);     /* bench/bench_generate.c: runs bench/bench_soak.py */
int bench_tp(int argc, char **argv);       /* bench/bench_tp.c: `bench tp` under mpirun */
int bench_membound(int argc, char **argv); /* bench/bench_generate.c: bench/bench_membound.py */
int cmd_eval(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);

/* Exit codes: 0 ok, 1 runtime failure, 2 usage error. */
enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

/* Flag parsing: each returns false (after printing a message naming the flag)
 * when the value is missing or malformed. *i is advanced past the value. */
bool cli_take_str(int argc, char **argv, int *i, const char **out);
bool cli_take_int(int argc, char **argv, int *i, long min, long max, int32_t *out);
bool cli_take_float(int argc, char **argv, int *i, double min, double max, float *out);
bool cli_take_u64(int argc, char **argv, int *i, uint64_t *out);

/* ---- KV compression flags (cli_kv.c), shared by generate, eval and serve ---- */

typedef struct cli_kv_opts {
    const char *method;  /* --kv-method (default full) */
    double budget;       /* --kv-budget (default 1) */
    const char *profile; /* --kv-profile PATH | none (default: profiles/<model>.uncomp) */
    const char *decode;  /* --decode-method none | scope-slide | scope-adaptive | ... */
    int32_t scope_recent, scope_window; /* --scope-recent R, --scope-window W */
    double spark_ratio;  /* --spark-ratio r (0: off) */
    const char *spark_recovery; /* --spark-recovery avg | zero */
    int32_t recall;      /* --recall R: evicted blocks per head rejoining each step (0: off) */
    int32_t recall_every;   /* --recall-every K (0: default) */
    int32_t recall_promote; /* --recall-promote 0|1 (default 1) */
    int32_t recall_channels; /* --recall-channels M (-1: default) */
    int32_t recall_gather;   /* --recall-gather K (default 2; 0: whole blocks) */
} cli_kv_opts;

#define CLI_KV_USAGE                                                                          \
    "  --kv-method M         KV compression: full, streaming, snapkv, pyramidkv, uncomp\n"    \
    "  --kv-budget B         fraction of the prompt (0.1) or tokens per head (128); default 1\n" \
    "  --kv-profile P        UNComp head-group profile, or 'none' for online entropy\n"    \
    "  --decode-method D     decode compression: none, scope-slide, scope-adaptive,\n"       \
    "                        scope-discontinuous (SCOPE), recent, h2o (baselines); default none\n" \
    "  --scope-recent R      SCOPE recent window (default 256)\n"                             \
    "  --scope-window W      SCOPE decode budget incl. R (default 512)\n"                     \
    "  --spark-ratio r       SparK: fraction of key channels pruned per prompt token\n"       \
    "  --spark-recovery M    SparK recovery of pruned channels: avg (default) or zero\n"       \
    "  --recall R            recall: per KV head, the R evicted 16-token blocks whose key\n"  \
    "                        digests bound q.k highest rejoin attention each decode step;\n"  \
    "                        their 16R tokens come out of the budget (default 0: off)\n"  \
    "  --recall-every K      rank the recall blocks every K decode steps (default 1;\n"     \
    "                        whole-block recall only: token recall ranks every step)\n"   \
    "  --recall-promote 0|1  promote recall blocks that keep winning attention mass into\n"  \
    "                        the resident set, demoting the weakest (default 1;\n"        \
    "                        whole-block recall only)\n"                                  \
    "  --recall-channels M   rank recall blocks exactly on the M channels where the query\n" \
    "                        is largest, the digest's min/max box on the rest (default 16;\n" \
    "                        0: the box alone, head_dim: the exact maximum q.k)\n" \
    "  --recall-gather K     token recall: the 16R best tokens by exact q.k of the K x R\n"  \
    "                        best-ranked blocks, same buffer; K in [0, 8] (default 2;\n"  \
    "                        0: whole blocks, with --recall-every and --recall-promote)\n"

void cli_kv_defaults(cli_kv_opts *o);
/* --recall-channels as kvc_policy.recall_channels (0 default, KVC_RECALL_BOX). */
int32_t cli_kv_channels(const cli_kv_opts *o);
/* Consumes argv[*i] if it is one of the --kv-* flags: 1 taken, 0 not a kv
 * flag, -1 bad value (message printed). */
int cli_kv_take(int argc, char **argv, int *i, cli_kv_opts *o);
/* Builds the policy for model_path; loads the UNComp profile into *profile
 * (caller frees with kvc_profile_free). A missing default profile falls back
 * to online mode with a warning; an explicit one that fails is an error.
 * Returns CLI_OK, CLI_USAGE or CLI_FAIL (message printed). */
struct kvc_policy;
struct kvc_profile;
struct ekv_model;
int cli_kv_policy(const char *cmd, const cli_kv_opts *o, const struct ekv_model *m,
                  const char *model_path, struct kvc_policy *policy, struct kvc_profile **profile);

/* ---- flags from the environment and a config file (cli_config.c) ---- */

/* One flag a subcommand takes, without its dashes ("grpc-port"); a switch
 * takes no value. A list ends with {NULL}. */
typedef struct cli_flag {
    const char *name;
    bool is_switch;
} cli_flag;

typedef struct cli_args {
    int argc, cap;
    char **argv;   /* NULL-terminated; each string malloc'd */
    char **origin; /* per argument: NULL (command line), or "ENTROKV_CTX=9" / "key ... of FILE" */
} cli_args;

#define CLI_CONFIG_USAGE                                                                      \
    "  --config FILE         JSON object of flags without dashes ({\"grpc-port\": 50051});\n" \
    "                        every flag can also be ENTROKV_<FLAG> (ENTROKV_GRPC_PORT).\n"     \
    "                        Precedence: command line > environment > file > default\n"

/* The arguments cmd's flag parser should see: argv[0], the flags from the
 * config file (--config FILE, else ENTROKV_CONFIG), then those from
 * ENTROKV_* variables, then argv[1..] without --config; a flag set by a
 * source of higher precedence is left out of the lower ones (parsers also
 * keep the last value of a repeated flag). A key or variable that is not in
 * flags is an error. Returns CLI_OK (free *out with
 * cli_args_free) or CLI_USAGE / CLI_FAIL with the message printed. */
int cli_config_args(const char *cmd, const cli_flag *flags, int argc, char **argv,
                    cli_args *out);
void cli_args_free(cli_args *a);
/* After a usage error: one note per flag that came from the environment
 * or the file, saying which, since the parser's message names only the flag. */
void cli_args_explain(const char *cmd, const cli_args *a);

/* ---- --device (cli_device.c), shared by generate, eval, serve and worker ---- */

struct ekv_error;
struct ekv_runtime;

/* Takes --device's value: "cpu" or "cuda" (false with a message otherwise). */
bool cli_take_device(const char *cmd, int argc, char **argv, int *i, const char **out);
/* Whether dev (NULL: cpu) names the GPU. */
bool cli_device_cuda(const char *dev);
/* A runtime for dev: the CPU forward with threads (model_runtime_create), or
 * CUDA device 0's (model_cuda.h); EKV_EUNSUPPORTED naming why in a build
 * without CUDA or where no device is usable. */
struct ekv_runtime *cli_runtime_create(const char *dev, const struct ekv_model *m,
                                       int32_t max_batch, int32_t max_ctx, int threads,
                                       struct ekv_error *err);
/* engine_config.runtime_create for --device cuda: GPU 0, its KV pool the
 * engine's (cfg->kv_tokens per head); arg unused. */
struct engine_config;
struct ekv_runtime *cli_engine_runtime_cuda(const struct ekv_model *m,
                                            const struct engine_config *cfg, void *arg,
                                            struct ekv_error *err);

/* Prints "entrokv <cmd>: message" to stderr. */
void cli_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
