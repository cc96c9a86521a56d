/*
 * bench_tp.c - `entrokv bench tp`: decode tokens/s and bytes communicated per
 * token of a tensor-parallel group (docs/tp.md), for each group size.
 *
 * Two roles in one command (a process that mpirun started is always a rank,
 * so `mpirun -np N entrokv bench tp --model M` measures one group):
 *  - the driver (run by the user, not under mpirun): for each repetition and
 *    each --np N, in alternation (1 2 3 1 2 3 ...), starts
 *    `mpirun -np N --oversubscribe --bind-to none THIS bench tp --rank-run ...`
 *    (OpenMPI's root variables set when run as root), reads rank 0's JSON
 *    line, and prints it, then a summary per N: median, min and max tokens/s,
 *    the bytes measured, and the bytes the model of docs/scaling.md predicts
 *    from the model's shape (every rank sends 2 (N-1)/N x 4 n_embd bytes per
 *    allreduce, two allreduces per layer, plus rank 0's 4-byte token
 *    broadcast to N - 1 peers);
 *  - a rank (--rank-run, under mpirun): opens the MPI communicator, loads the
 *    model with this rank's shard (model_runtime_create_tp), prefills the
 *    prompt (real text: Debian's GPL-3), then decodes greedily: rank 0
 *    computes the logits, takes the argmax and broadcasts the token (the
 *    smallest step plan), every rank runs the step. The decode phase's
 *    comm_bytes_sent and calls are the numbers per token; comm_allgather
 *    collects every rank's so rank 0 can print the group's total.
 * N = 1 runs the same code with one rank (no communication): the reference
 * the other sizes are a ratio against. On this 2-core machine no speed-up is
 * expected (docs/scaling.md); the point is the volume and correctness: the
 * driver also reports how many of the N-rank greedy tokens equal N = 1's.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/comm.h"
#include "entrokv/generate.h"
#include "entrokv/kvcache.h"
#include "entrokv/model.h"
#include "entrokv/tokenizer.h"

#ifndef EKV_SOURCE_DIR
#define EKV_SOURCE_DIR "."
#endif

#define TP_MAX_NP 8
#define TP_MAX_REPS 50
#define TP_MAX_DECODE 4096

typedef struct tp_opts {
    const char *model, *text, *mpirun;
    int32_t np[TP_MAX_NP];
    int n_np;
    int32_t prompt_tokens, n_decode, reps, threads, timeout_ms;
    bool json, rank_run;
} tp_opts;

static int usage(FILE *f, int rc)
{
    fprintf(f,
            "usage: entrokv bench tp --model PATH [--np 1,2,3] [--prompt-tokens 128]\n"
            "       [--n-decode 32] [--reps 3] [--threads T] [--text FILE]\n"
            "       [--mpirun PATH] [--timeout-ms 30000] [--json]\n"
            "  Decode tokens/s and bytes communicated per token of a tensor-parallel\n"
            "  group for each size in --np, each started with mpirun (sizes alternate\n"
            "  over --reps). --threads: per rank (default: this machine's cores / N,\n"
            "  at least 1). Output: one JSON line per run (\"tp\"), per size (\"tp_summary\").\n");
    return rc;
}

static int parse(int argc, char **argv, tp_opts *o)
{
    *o = (tp_opts){.text = "/usr/share/common-licenses/GPL-3", .mpirun = "mpirun",
                   .prompt_tokens = 128, .n_decode = 32, .reps = 3, .threads = 0,
                   .timeout_ms = 30000, .np = {1, 2, 3}, .n_np = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h"))
            return usage(stdout, -1);
        else if (!strcmp(a, "--model")) {
            if (!cli_take_str(argc, argv, &i, &o->model))
                return CLI_USAGE;
        } else if (!strcmp(a, "--text")) {
            if (!cli_take_str(argc, argv, &i, &o->text))
                return CLI_USAGE;
        } else if (!strcmp(a, "--mpirun")) {
            if (!cli_take_str(argc, argv, &i, &o->mpirun))
                return CLI_USAGE;
        } else if (!strcmp(a, "--np")) {
            const char *list;
            if (!cli_take_str(argc, argv, &i, &list))
                return CLI_USAGE;
            o->n_np = 0;
            for (const char *p = list; *p;) {
                char *end;
                errno = 0;
                long v = strtol(p, &end, 10);
                if (end == p || errno || v < 1 || v > COMM_THREADS_MAX || o->n_np == TP_MAX_NP ||
                    (*end && *end != ',')) {
                    cli_error("bench", "--np: a comma-separated list of at most %d sizes, "
                                       "each 1..%d ('%s')", TP_MAX_NP, COMM_THREADS_MAX, list);
                    return CLI_USAGE;
                }
                o->np[o->n_np++] = (int32_t)v;
                p = *end ? end + 1 : end;
            }
            if (!o->n_np) {
                cli_error("bench", "--np is empty");
                return CLI_USAGE;
            }
        } else if (!strcmp(a, "--prompt-tokens")) {
            if (!cli_take_int(argc, argv, &i, 1, 1 << 16, &o->prompt_tokens))
                return CLI_USAGE;
        } else if (!strcmp(a, "--n-decode")) {
            if (!cli_take_int(argc, argv, &i, 1, TP_MAX_DECODE, &o->n_decode))
                return CLI_USAGE;
        } else if (!strcmp(a, "--reps")) {
            if (!cli_take_int(argc, argv, &i, 1, TP_MAX_REPS, &o->reps))
                return CLI_USAGE;
        } else if (!strcmp(a, "--threads")) {
            if (!cli_take_int(argc, argv, &i, 1, 1024, &o->threads))
                return CLI_USAGE;
        } else if (!strcmp(a, "--timeout-ms")) {
            if (!cli_take_int(argc, argv, &i, 1, 3600000, &o->timeout_ms))
                return CLI_USAGE;
        } else if (!strcmp(a, "--json")) {
            o->json = true;
        } else if (!strcmp(a, "--rank-run")) {
            o->rank_run = true;
        } else {
            cli_error("bench", "tp: unknown flag %s", a);
            return usage(stderr, CLI_USAGE);
        }
    }
    if (!o->model) {
        cli_error("bench", "tp: --model is required");
        return CLI_USAGE;
    }
    return 0;
}

/* n ids of real text: the file's tokens, repeated as often as needed. */
static int32_t *text_ids(const ekv_tokenizer *tok, const char *path, int32_t n, ekv_error *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        ekv_error_set(err, EKV_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(1 << 20);
    size_t len = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    fclose(f);
    int32_t *ids = NULL, *out = malloc((size_t)n * sizeof *out);
    size_t n_ids = 0;
    if (!buf || !out || tok_encode(tok, buf, len, false, false, &ids, &n_ids, err) || !n_ids) {
        if (buf && out && !n_ids)
            ekv_error_set(err, EKV_EINVAL, "%s holds no text", path);
        free(out);
        out = NULL;
    } else {
        for (int32_t i = 0; i < n; i++)
            out[i] = ids[i % n_ids];
    }
    free(ids);
    free(buf);
    return out;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* ---- one rank, under mpirun ---- */

static int rank_run(const tp_opts *o)
{
    ekv_error err = {0};
    int ret = CLI_FAIL;
    ekv_model *m = NULL;
    ekv_runtime *rt = NULL;
    kv_pool *kv = NULL;
    kv_seq *seq = NULL;
    float *logits = NULL;
    int32_t *prompt = NULL, *out_ids = NULL;
    uint64_t *all = NULL;
    ekv_comm *c = comm_open_mpi(o->timeout_ms, &err);
    if (!c)
        goto fail;
    const int me = comm_rank(c), np = comm_size(c);
    int threads = o->threads ? o->threads : (int)(sysconf(_SC_NPROCESSORS_ONLN) / np);
    if (threads < 1)
        threads = 1;
    const int32_t max_ctx = o->prompt_tokens + o->n_decode + 1;
    if (!(m = model_load(o->model, &err)))
        goto fail;
    const ekv_model_config *cfg = model_config(m);
    if (!(rt = model_runtime_create_tp(m, 64, max_ctx, threads, c, &err)))
        goto fail;
    const model_shard *sh = model_runtime_shard(rt);
    if (!(kv = model_kv_pool_create_shard(m, sh, max_ctx, &err)) ||
        !(seq = kv_seq_create(kv, cfg->n_layers, sh->n_kv_heads, &err)))
        goto fail;
    logits = malloc((size_t)cfg->n_vocab * sizeof *logits);
    out_ids = malloc((size_t)o->n_decode * sizeof *out_ids);
    all = malloc(2 * sizeof *all * (size_t)np);
    if (!logits || !out_ids || !all) {
        ekv_error_set(&err, EKV_ENOMEM, "out of memory");
        goto fail;
    }
    if (!(prompt = text_ids(model_tokenizer(m), o->text, o->prompt_tokens, &err)))
        goto fail;
    double t0 = gen_now();
    if (model_prefill(rt, seq, prompt, o->prompt_tokens, 0, NULL, logits, &err))
        goto fail;
    double t1 = gen_now();
    /* the decode phase alone: a barrier so every rank starts it together */
    if (comm_barrier(c, &err))
        goto fail;
    const uint64_t bytes0 = comm_bytes_sent(c), calls0 = comm_calls(c);
    double t2 = gen_now();
    for (int32_t i = 0; i < o->n_decode; i++) {
        int32_t id = me == 0 ? argmax(logits, cfg->n_vocab) : 0, p = o->prompt_tokens + i;
        if (comm_broadcast(c, &id, sizeof id, 0, &err))
            goto fail;
        out_ids[i] = id;
        model_batch b = {.n = 1, .tokens = &id, .pos = &p, .seqs = &seq};
        if (model_forward(rt, &b, me == 0 ? logits : NULL, &err))
            goto fail;
    }
    double t3 = gen_now();
    uint64_t mine[2] = {comm_bytes_sent(c) - bytes0, comm_calls(c) - calls0};
    /* the communicator alone: allreduces of one decode row (n_embd floats),
     * the latency docs/scaling.md puts beside the compute per token */
    enum { AR_CALLS = 200 };
    for (int32_t i = 0; i < cfg->n_embd; i++)
        logits[i] = (float)i;
    if (comm_barrier(c, &err))
        goto fail;
    double t4 = gen_now();
    for (int i = 0; i < AR_CALLS; i++)
        if (comm_allreduce_sum_f32(c, logits, (size_t)cfg->n_embd, &err))
            goto fail;
    double allreduce_us = (gen_now() - t4) * 1e6 / AR_CALLS;
    if (comm_allgather(c, mine, sizeof mine, all, &err))
        goto fail;
    if (me == 0) {
        uint64_t total = 0;
        for (int r = 0; r < np; r++)
            total += all[2 * r];
        printf("{\"bench\":\"tp\",\"np\":%d,\"comm\":\"%s\",\"threads_per_rank\":%d,"
               "\"prompt_tokens\":%d,\"decode_tokens\":%d,\"prefill_tokens_per_s\":%.2f,"
               "\"decode_tokens_per_s\":%.3f,\"bytes_per_token_rank0\":%.1f,"
               "\"bytes_per_token_total\":%.1f,\"collectives_per_token\":%.2f,"
               "\"allreduce_row_us\":%.2f,\"bytes_per_token_per_rank\":[",
               np, comm_backend_name(c), threads, o->prompt_tokens, o->n_decode,
               o->prompt_tokens / (t1 - t0), o->n_decode / (t3 - t2),
               (double)mine[0] / o->n_decode, (double)total / o->n_decode,
               (double)mine[1] / o->n_decode, allreduce_us);
        for (int r = 0; r < np; r++)
            printf("%s%.1f", r ? "," : "", (double)all[2 * r] / o->n_decode);
        printf("],\"model\":{\"n_layers\":%d,\"n_embd\":%d,\"n_vocab\":%d},\"tokens\":[",
               cfg->n_layers, cfg->n_embd, cfg->n_vocab);
        for (int32_t i = 0; i < o->n_decode; i++)
            printf("%s%d", i ? "," : "", out_ids[i]);
        printf("]}\n");
        fflush(stdout);
    }
    ret = CLI_OK;
    goto out;
fail:
    cli_error("bench", "tp rank %d: %s", c ? comm_rank(c) : -1, err.msg);
out:
    free(all);
    free(out_ids);
    free(prompt);
    free(logits);
    kv_seq_free(seq);
    kv_pool_destroy(kv);
    model_runtime_free(rt);
    model_free(m);
    if (c && comm_broken(c)) {
        /* MPI stays unfinalized after a failed collective (comm.h): leave at once */
        fflush(NULL);
        _exit(ret);
    }
    comm_free(c);
    return ret;
}

/* ---- the driver ---- */

typedef struct tp_run {
    double decode_tps;
    double bytes_rank0, bytes_total, calls, ar_us;
    int32_t tokens[TP_MAX_DECODE];
    int32_t n_tokens;
    bool ok;
} tp_run;

/* Pulls "key":number out of a JSON line (the line is ours, flat numbers). */
static bool json_num(const char *line, const char *key, double *v)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    if (!p)
        return false;
    char *end;
    *v = strtod(p + strlen(pat), &end);
    return end != p + strlen(pat);
}

static bool run_group(const tp_opts *o, const char *self, int np, tp_run *r)
{
    char cmd[8192];
    char threads[32] = "";
    if (o->threads)
        snprintf(threads, sizeof threads, " --threads %d", o->threads);
    /* the same flags deploy/mpi/run.sh sets (docs/tp.md) */
    int n = snprintf(cmd, sizeof cmd,
                     "'%s' -np %d --oversubscribe --bind-to none '%s' bench tp --rank-run "
                     "--model '%s' --text '%s' --prompt-tokens %d --n-decode %d "
                     "--timeout-ms %d%s",
                     o->mpirun, np, self, o->model, o->text, o->prompt_tokens, o->n_decode,
                     o->timeout_ms, threads);
    if (n < 0 || (size_t)n >= sizeof cmd || strchr(o->model, '\'') || strchr(o->text, '\'') ||
        strchr(o->mpirun, '\'')) {
        cli_error("bench", "tp: paths with quotes or over 8 KiB are not supported");
        return false;
    }
    FILE *p = popen(cmd, "r");
    if (!p) {
        cli_error("bench", "tp: cannot run %s: %s", o->mpirun, strerror(errno));
        return false;
    }
    static char line[1 << 16];
    *r = (tp_run){0};
    while (fgets(line, sizeof line, p)) {
        if (strncmp(line, "{\"bench\":\"tp\"", 13) != 0)
            continue;
        double v;
        r->ok = json_num(line, "decode_tokens_per_s", &r->decode_tps) &&
                json_num(line, "bytes_per_token_rank0", &r->bytes_rank0) &&
                json_num(line, "bytes_per_token_total", &r->bytes_total) &&
                json_num(line, "collectives_per_token", &r->calls) &&
                json_num(line, "allreduce_row_us", &r->ar_us) && json_num(line, "np", &v) &&
                (int)v == np;
        const char *t = strstr(line, "\"tokens\":[");
        if (t) {
            t += 10;
            while (*t && *t != ']' && r->n_tokens < TP_MAX_DECODE) {
                char *end;
                long id = strtol(t, &end, 10);
                if (end == t)
                    break;
                r->tokens[r->n_tokens++] = (int32_t)id;
                t = *end == ',' ? end + 1 : end;
            }
        }
        fputs(line, stdout);
        fflush(stdout);
    }
    int st = pclose(p);
    if (st != 0 || !r->ok) {
        cli_error("bench", "tp: the group of %d did not finish (mpirun status %d)", np, st);
        return false;
    }
    return true;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int driver(const tp_opts *o)
{
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        cli_error("bench", "cannot find this binary's path");
        return CLI_FAIL;
    }
    self[n] = 0;
    ekv_error err = {0};
    ekv_model *m = model_load(o->model, &err);
    if (!m) {
        cli_error("bench", "%s", err.msg);
        return CLI_FAIL;
    }
    const ekv_model_config cfg = *model_config(m);
    model_free(m);
    if (geteuid() == 0) { /* containers and CI run as root; OpenMPI refuses without these */
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    }
    tp_run *runs = calloc((size_t)o->reps * (size_t)o->n_np, sizeof *runs);
    if (!runs)
        return CLI_FAIL;
    int ret = CLI_FAIL;
    for (int rep = 0; rep < o->reps; rep++)
        for (int k = 0; k < o->n_np; k++)
            if (!run_group(o, self, o->np[k], &runs[rep * o->n_np + k]))
                goto out;
    /* the reference: the first size (N = 1 by default), its first run's tokens */
    const tp_run *ref = &runs[0];
    double med[TP_MAX_NP], lo[TP_MAX_NP], hi[TP_MAX_NP], ar[TP_MAX_NP];
    for (int k = 0; k < o->n_np; k++) {
        double v[TP_MAX_REPS], a[TP_MAX_REPS];
        for (int rep = 0; rep < o->reps; rep++) {
            v[rep] = runs[rep * o->n_np + k].decode_tps;
            a[rep] = runs[rep * o->n_np + k].ar_us;
        }
        qsort(v, (size_t)o->reps, sizeof *v, cmp_double);
        qsort(a, (size_t)o->reps, sizeof *a, cmp_double);
        med[k] = o->reps % 2 ? v[o->reps / 2] : (v[o->reps / 2 - 1] + v[o->reps / 2]) / 2;
        ar[k] = o->reps % 2 ? a[o->reps / 2] : (a[o->reps / 2 - 1] + a[o->reps / 2]) / 2;
        lo[k] = v[0];
        hi[k] = v[o->reps - 1];
    }
    if (!o->json)
        fprintf(stderr, "\n%-4s %-26s %-18s %-18s %-18s %-12s %s\n", "np",
                "decode tok/s med (min-max)", "bytes/token rank0", "predicted rank0",
                "bytes/token total", "allreduce us", "tokens = first np's");
    for (int k = 0; k < o->n_np; k++) {
        const int np = o->np[k];
        const tp_run *r = &runs[k];
        int same = 0;
        while (same < r->n_tokens && same < ref->n_tokens && r->tokens[same] == ref->tokens[same])
            same++;
        /* docs/scaling.md: per allreduce of n floats a rank sends
         * 4 ((n - len) + (N - 1) len), len its chunk (rank 0: n/N rounded
         * up); two allreduces of n_embd per layer; rank 0 also broadcasts
         * the 4-byte token to N - 1 peers */
        double pred0 = 0;
        if (np > 1) {
            const double len = (double)(cfg.n_embd / np + (cfg.n_embd % np ? 1 : 0));
            pred0 = 2.0 * cfg.n_layers * 4.0 * ((cfg.n_embd - len) + (np - 1) * len) +
                    4.0 * (np - 1);
        }
        printf("{\"bench\":\"tp_summary\",\"np\":%d,\"reps\":%d,\"decode_tokens_per_s\":"
               "{\"median\":%.3f,\"min\":%.3f,\"max\":%.3f},\"ratio_vs\":\"np=%d\","
               "\"decode_ratio\":%.3f,\"bytes_per_token_rank0\":%.1f,"
               "\"predicted_bytes_per_token_rank0\":%.1f,\"bytes_per_token_total\":%.1f,"
               "\"collectives_per_token\":%.2f,\"allreduce_row_us_median\":%.2f,"
               "\"greedy_tokens_equal_to_first\":%d,\"decode_tokens\":%d}\n",
               np, o->reps, med[k], lo[k], hi[k], o->np[0], med[k] / med[0], r->bytes_rank0,
               pred0, r->bytes_total, r->calls, ar[k], same, r->n_tokens);
        if (!o->json)
            fprintf(stderr, "%-4d %8.2f (%.2f-%.2f)        %-18.0f %-18.0f %-18.0f %-12.1f %d of %d\n",
                    np, med[k], lo[k], hi[k], r->bytes_rank0, pred0, r->bytes_total, ar[k], same,
                    r->n_tokens);
    }
    fflush(stdout);
    ret = CLI_OK;
out:
    free(runs);
    return ret;
}

int bench_tp(int argc, char **argv)
{
    tp_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc < 0 ? CLI_OK : rc;
    /* started by mpirun (`mpirun -np N entrokv bench tp ...`): be one rank
     * of that group rather than a driver starting groups of its own */
    if (getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK"))
        o.rank_run = true;
    return o.rank_run ? rank_run(&o) : driver(&o);
}
