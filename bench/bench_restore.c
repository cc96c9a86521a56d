/*
 * bench_restore.c - `entrokv bench restore`: time to first token of a
 * conversation's second turn over a long shared prefix, restored from the
 * KV store tier versus recomputed, in the same run.
 *
 * Turn 1 is a document (real text, --prefix tokens) plus a question; its
 * prompt KV is saved (kvprefix). Turn 2 is the same document plus another
 * question. TTFT is measured from the request to the first token's logits:
 *   recompute   prefill all of turn 2;
 *   local       restore the document's blocks from the in-process tier,
 *               prefill only the rest;
 *   daemon      the same from an `entrokv kvstore` daemon over UCX on
 *               127.0.0.1 (no local tier).
 * With --kv-method, every variant also compresses turn 2's prompt for its
 * own question (restored KV is compressed again, not reused compressed).
 * One JSON line per measurement (median of --repeats) and a summary.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/compress.h"
#include "entrokv/generate.h"
#include "entrokv/kvprefix.h"

typedef struct restore_opts {
    const char *model, *text;
    int32_t prefix, repeats, threads;
    cli_kv_opts kv;
    int json, no_daemon;
} restore_opts;

static const char q1[] = "\n\nQuestion: what does this document say about warranty? Answer:";
static const char q2[] = "\n\nQuestion: who may distribute copies of this document? Answer:";

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct bench_ctx {
    ekv_runtime *rt;
    kv_pool *pool;
    const ekv_model *m;
    const kvc_policy *pol;
    float *logits;
} bench_ctx;

/* One turn: optional restore, prefill of the rest (with a capture when
 * compressing), compression. Returns seconds to the first token's logits;
 * *restored gets the tokens restored. */
static double turn(bench_ctx *b, kvprefix *pfx, const int32_t *ids, int32_t n, int save,
                   int32_t *restored, ekv_error *err)
{
    const ekv_model_config *c = model_config(b->m);
    kv_seq *seq = kv_seq_create(b->pool, c->n_layers, c->n_kv_heads, err);
    const double t0 = gen_now();
    int32_t from = 0;
    if (pfx && !save)
        from = kvprefix_restore(pfx, seq, ids, n, n - 8);
    kvc_capture *cap = NULL;
    if (b->pol->method != KVC_FULL)
        cap = kvc_capture_create(b->pol, b->m, n - from, from, err);
    ekv_status rc = model_prefill(b->rt, seq, ids + from, n - from, from,
                                  cap ? kvc_capture_tap(cap, seq) : NULL, b->logits, err);
    if (!rc && pfx && save)
        kvprefix_save(pfx, seq, ids, n, 0);
    kvc_report rep;
    if (!rc && cap)
        rc = kvc_capture_compress(cap, b->rt, seq, &rep, err);
    const double dt = gen_now() - t0;
    kvc_capture_free(cap);
    kv_seq_free(seq);
    *restored = from;
    return rc ? -1 : dt;
}

static int run(const restore_opts *o)
{
    ekv_error err = {0};
    int ret = CLI_FAIL;
    kvc_policy pol;
    kvc_profile *profile = NULL;
    int32_t *doc = NULL, *t1 = NULL, *t2 = NULL, *qa = NULL, *qb = NULL;
    size_t n_doc = 0, n_qa = 0, n_qb = 0;
    kvstore_client *local = NULL, *remote = NULL;
    kvprefix *p_local = NULL, *p_remote = NULL;
    pid_t daemon = -1;
    char token_file[] = "/tmp/ekv_bench_restore_XXXXXX";
    int token_fd = -1;
    bench_ctx b = {0};
    ekv_model *m = model_load(o->model, &err);
    if (!m)
        goto fail;
    b.m = m;
    if ((ret = cli_kv_policy("bench", &o->kv, m, o->model, &pol, &profile)) != CLI_OK)
        goto out;
    ret = CLI_FAIL;
    b.pol = &pol;
    FILE *f = fopen(o->text, "rb");
    char *text = f ? malloc(1 << 22) : NULL;
    size_t len = text ? fread(text, 1, (1 << 22) - 1, f) : 0;
    if (f)
        fclose(f);
    const ekv_tokenizer *tok = model_tokenizer(m);
    if (!text || tok_encode(tok, text, len, tok_add_bos(tok), false, &doc, &n_doc, &err) ||
        tok_encode(tok, q1, strlen(q1), false, false, &qa, &n_qa, &err) ||
        tok_encode(tok, q2, strlen(q2), false, false, &qb, &n_qb, &err)) {
        free(text);
        cli_error("bench", "%s: %s", o->text, err.msg[0] ? err.msg : "cannot read");
        goto out;
    }
    free(text);
    if (n_doc < (size_t)o->prefix) {
        cli_error("bench", "%s has %zu tokens, fewer than --prefix %d", o->text, n_doc, o->prefix);
        ret = CLI_USAGE;
        goto out;
    }
    const int32_t n1 = o->prefix + (int32_t)n_qa, n2 = o->prefix + (int32_t)n_qb;
    t1 = malloc((size_t)n1 * sizeof *t1);
    t2 = malloc((size_t)n2 * sizeof *t2);
    b.logits = malloc((size_t)model_config(m)->n_vocab * sizeof *b.logits);
    if (!t1 || !t2 || !b.logits)
        goto fail;
    memcpy(t1, doc, (size_t)o->prefix * sizeof *t1);
    memcpy(t1 + o->prefix, qa, n_qa * sizeof *t1);
    memcpy(t2, doc, (size_t)o->prefix * sizeof *t2);
    memcpy(t2 + o->prefix, qb, n_qb * sizeof *t2);
    const int32_t ctx = (n1 > n2 ? n1 : n2) + 16;
    if (!(b.pool = model_kv_pool_create(m, ctx, &err)) ||
        !(b.rt = model_runtime_create(m, 512, ctx, o->threads, &err)))
        goto fail;
    kvstore_client_config cfg;
    kvstore_client_config_default(&cfg);
    cfg.local_capacity = 1ull << 30;
    if (!(local = kvstore_client_create(&cfg, &err)) ||
        !(p_local = kvprefix_create(m, local, 0, 1, &err)))
        goto fail;
    static const char secret[] = "bench-restore-token";
    if (!o->no_daemon) {
        int port = 0;
        if ((token_fd = mkstemp(token_file)) < 0 ||
            write(token_fd, secret, sizeof secret - 1) != (ssize_t)(sizeof secret - 1) ||
            (daemon = bench_kvstore_daemon_start(NULL, token_file, 2048, &port)) < 0) {
            cli_error("bench", "could not start a kvstore daemon (use --no-daemon)");
            goto out;
        }
        char peer[64];
        snprintf(peer, sizeof peer, "127.0.0.1:%d", port);
        const char *peers[] = {peer};
        cfg.local_capacity = 0;
        cfg.peers = peers;
        cfg.n_peers = 1;
        cfg.auth_token = (const uint8_t *)secret;
        cfg.auth_token_len = sizeof secret - 1;
        cfg.op_timeout_ms = 10000;
        if (!(remote = kvstore_client_create(&cfg, &err)) ||
            !(p_remote = kvprefix_create(m, remote, 0, 1, &err)))
            goto fail;
    }
    /* turn 1 once per store (its KV saved), then the repeats of turn 2 */
    int32_t restored = 0, r_local = 0, r_remote = 0;
    if (turn(&b, p_local, t1, n1, 1, &restored, &err) < 0 ||
        (p_remote && turn(&b, p_remote, t1, n1, 1, &restored, &err) < 0))
        goto fail;
    kvprefix_drain(p_local); /* the saves handed to the stores... */
    kvprefix_drain(p_remote);
    usleep(500000); /* ...and their puts landed */
    double rec[32], loc[32], rem[32];
    const int reps = o->repeats;
    for (int i = 0; i < reps; i++) {
        if ((rec[i] = turn(&b, NULL, t2, n2, 0, &restored, &err)) < 0 ||
            (loc[i] = turn(&b, p_local, t2, n2, 0, &r_local, &err)) < 0 ||
            (p_remote && (rem[i] = turn(&b, p_remote, t2, n2, 0, &r_remote, &err)) < 0))
            goto fail;
        fprintf(stderr, "\rbench restore: %d/%d", i + 1, reps);
    }
    fputc('\n', stderr);
    qsort(rec, (size_t)reps, sizeof *rec, cmp_double);
    qsort(loc, (size_t)reps, sizeof *loc, cmp_double);
    qsort(rem, (size_t)reps, sizeof *rem, cmp_double);
    const double mr = rec[reps / 2], ml = loc[reps / 2], md = p_remote ? rem[reps / 2] : 0;
    const char *meth = kvc_method_name(pol.method);
    printf("{\"bench\":\"restore\",\"variant\":\"recompute\",\"kv_method\":\"%s\",\"kv_budget\":%g,"
           "\"prompt_tokens\":%d,\"restored_tokens\":0,\"ttft_s\":%.4f}\n",
           meth, pol.budget, n2, mr);
    printf("{\"bench\":\"restore\",\"variant\":\"local\",\"kv_method\":\"%s\",\"kv_budget\":%g,"
           "\"prompt_tokens\":%d,\"restored_tokens\":%d,\"ttft_s\":%.4f,\"speedup\":%.2f}\n",
           meth, pol.budget, n2, r_local, ml, mr / ml);
    if (p_remote)
        printf("{\"bench\":\"restore\",\"variant\":\"daemon_ucx\",\"kv_method\":\"%s\","
               "\"kv_budget\":%g,\"prompt_tokens\":%d,\"restored_tokens\":%d,\"ttft_s\":%.4f,"
               "\"speedup\":%.2f}\n",
               meth, pol.budget, n2, r_remote, md, mr / md);
    fprintf(stderr,
            "second turn over a %d-token shared prefix (%s), median of %d:\n"
            "  recompute     TTFT %.3f s\n"
            "  local tier    TTFT %.3f s  (%d tokens restored)  %.1fx faster\n",
            o->prefix, meth, reps, mr, ml, r_local, mr / ml);
    if (p_remote)
        fprintf(stderr, "  daemon (UCX)  TTFT %.3f s  (%d tokens restored)  %.1fx faster\n", md,
                r_remote, mr / md);
    ret = CLI_OK;
    goto out;
fail:
    cli_error("bench", "%s", err.msg[0] ? err.msg : "out of memory");
out:
    kvprefix_destroy(p_local);
    kvprefix_destroy(p_remote);
    kvstore_client_destroy(local);
    kvstore_client_destroy(remote);
    if (daemon > 0)
        bench_kvstore_daemon_stop(daemon);
    if (token_fd >= 0) {
        close(token_fd);
        unlink(token_file);
    }
    model_runtime_free(b.rt);
    kv_pool_destroy(b.pool);
    kvc_profile_free(profile);
    model_free(m);
    free(doc);
    free(qa);
    free(qb);
    free(t1);
    free(t2);
    free(b.logits);
    return ret;
}

int bench_restore(int argc, char **argv)
{
    restore_opts o = {.text = "/usr/share/common-licenses/GPL-3", .prefix = 4096, .repeats = 3};
    cli_kv_defaults(&o.kv);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int ok = 1, k;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: entrokv bench restore --model PATH [--prefix 4096] [--text FILE]\n"
                   "       [--repeats 3] [--threads N] [--no-daemon] [--json]\n%s",
                   CLI_KV_USAGE);
            return CLI_OK;
        } else if (!strcmp(a, "--model")) ok = cli_take_str(argc, argv, &i, &o.model);
        else if (!strcmp(a, "--text")) ok = cli_take_str(argc, argv, &i, &o.text);
        else if (!strcmp(a, "--prefix")) ok = cli_take_int(argc, argv, &i, 64, 1 << 20, &o.prefix);
        else if (!strcmp(a, "--repeats")) ok = cli_take_int(argc, argv, &i, 1, 31, &o.repeats);
        else if (!strcmp(a, "--threads")) ok = cli_take_int(argc, argv, &i, 1, 1024, &o.threads);
        else if (!strcmp(a, "--no-daemon")) o.no_daemon = 1;
        else if (!strcmp(a, "--json")) o.json = 1;
        else if ((k = cli_kv_take(argc, argv, &i, &o.kv)) != 0) ok = k > 0;
        else {
            cli_error("bench", "unknown flag '%s'", a);
            return CLI_USAGE;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!o.model) {
        cli_error("bench", "--model is required");
        return CLI_USAGE;
    }
    return run(&o);
}
