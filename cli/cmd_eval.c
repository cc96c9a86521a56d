/*
 * cmd_eval.c - `entrokv eval ppl | passkey | sweep`: flags, text loading and
 * the sweep's table and plot. The tasks themselves are in eval_tasks.c.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/generate.h"
#include "eval_opts.h"

#define DEFAULT_TEXT "/usr/share/common-licenses/GPL-3"
#define MAX_POLICIES 64

static void usage(FILE *out)
{
    fprintf(out,
            "usage: entrokv eval ppl|longgen|passkey|sweep --model PATH [flags]\n"
            "  ppl:     --text FILE[,FILE...] --prefix N --continue M [--windows W]\n"
            "           prefill N tokens, compress, teacher-force M more: perplexity (and its\n"
            "           ratio to full KV), mean KL to full KV, top-1 agreement\n"
            "  longgen: --text FILE --prefix N --continue M\n"
            "           the model's own greedy continuation of N tokens of text (M tokens,\n"
            "           full KV) is teacher-forced under each policy, as ppl measures\n"
            "           (for decode compression: --decode-method, --scope-recent/-window)\n"
            "  passkey: --context N --depth D[,D...] --trials T --seed S [--filler FILE]\n"
            "           a random number hidden in real text at depth D; accuracy over trials\n"
            "  sweep:   every method at budgets 5%%,10%%,20%%,50%%,100%% on both tasks;\n"
            "           --out DIR gets sweep.csv and sweep.png (defaults: 4k contexts)\n"
            "  several --text files (ppl, longgen, sweep): W windows of each, averaged\n"
            "  --methods a,b,...     streaming, snapkv, pyramidkv, uncomp, uncomp-online\n"
            "                        (default: all; full KV is always the reference);\n"
            "                        a method may carry +DECODE and +sparkR (+sparkRz: zero\n"
            "                        fill): snapkv+spark0.5, full+h2o, uncomp+spark0.8z\n"
            "  --budgets b,...       fractions or tokens per head (default 0.05,0.1,0.2,0.5,1)\n"
            "  --kv-method M --kv-budget B   one policy instead of the lists\n"
            "  --kv-profile P        UNComp profile for 'uncomp' (default profiles/<model>.uncomp)\n"
            "  --recall R            also run each evicting policy with recall R (+recallR: 16R\n"
            "                        tokens per head of its budget recalled each step)\n"
            "  --threads N           threads (default: one per core)\n"
            "  --device cpu|cuda     where the forward runs (default cpu; cuda: GPU 0, no\n"
            "                        SCOPE / recall / SparK there, docs/cuda.md)\n"
            "text defaults to %s (not used for calibration).\n",
            DEFAULT_TEXT);
}

static int take_list(int argc, char **argv, int *i, double *vals, const char **strs, int *n)
{
    const char *v;
    if (!cli_take_str(argc, argv, i, &v))
        return 0;
    *n = 0;
    for (const char *p = v; *p && *n < EVAL_MAX_LIST;) {
        size_t len = strcspn(p, ",");
        if (strs) {
            strs[*n] = strndup(p, len); /* freed at exit with the process; a few bytes */
        } else {
            char *end;
            vals[*n] = strtod(p, &end);
            if (end != p + len || len == 0) {
                cli_error("eval", "'%s' is not a list of numbers", v);
                return 0;
            }
        }
        (*n)++;
        p += len + (p[len] == ',');
    }
    return *n > 0;
}

static int parse(int argc, char **argv, eval_opts *o)
{
    memset(o, 0, sizeof *o);
    o->text = DEFAULT_TEXT;
    o->prefix = 3968;
    o->cont = 128;
    o->windows = 1;
    o->context = 4096;
    o->trials = 5;
    o->depths[0] = 0.5;
    o->n_depths = 1;
    cli_kv_defaults(&o->kv);
    o->kv.method = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        int ok = 1, k;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return -1;
        } else if (!strcmp(a, "--model")) ok = cli_take_str(argc, argv, &i, &o->model);
        else if (!strcmp(a, "--text")) ok = cli_take_str(argc, argv, &i, &o->text);
        else if (!strcmp(a, "--filler")) ok = cli_take_str(argc, argv, &i, &o->filler);
        else if (!strcmp(a, "--out")) ok = cli_take_str(argc, argv, &i, &o->out_dir);
        else if (!strcmp(a, "--prefix")) ok = cli_take_int(argc, argv, &i, 16, 1 << 20, &o->prefix);
        else if (!strcmp(a, "--continue")) ok = cli_take_int(argc, argv, &i, 1, 4096, &o->cont);
        else if (!strcmp(a, "--windows")) ok = cli_take_int(argc, argv, &i, 1, 64, &o->windows);
        else if (!strcmp(a, "--context")) ok = cli_take_int(argc, argv, &i, 64, 1 << 20, &o->context);
        else if (!strcmp(a, "--trials")) ok = cli_take_int(argc, argv, &i, 1, 10000, &o->trials);
        else if (!strcmp(a, "--seed")) ok = cli_take_u64(argc, argv, &i, &o->seed);
        else if (!strcmp(a, "--threads")) ok = cli_take_int(argc, argv, &i, 1, 1024, &o->threads);
        else if (!strcmp(a, "--device")) ok = cli_take_device("eval", argc, argv, &i, &o->device);
        else if (!strcmp(a, "--depth") || !strcmp(a, "--depths"))
            ok = take_list(argc, argv, &i, o->depths, NULL, &o->n_depths);
        else if (!strcmp(a, "--budgets"))
            ok = take_list(argc, argv, &i, o->budgets, NULL, &o->n_budgets);
        else if (!strcmp(a, "--methods"))
            ok = take_list(argc, argv, &i, NULL, o->methods, &o->n_methods);
        else if ((k = cli_kv_take(argc, argv, &i, &o->kv)) != 0)
            ok = k > 0;
        else {
            cli_error("eval", "unknown flag '%s' (see --help)", a);
            return CLI_USAGE;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!o->model) {
        cli_error("eval", "--model is required (see --help)");
        return CLI_USAGE;
    }
    for (int d = 0; d < o->n_depths; d++)
        if (!(o->depths[d] >= 0 && o->depths[d] <= 1)) {
            cli_error("eval", "--depth must be in [0, 1]");
            return CLI_USAGE;
        }
    if (o->kv.method) { /* one policy */
        o->methods[0] = o->kv.method;
        o->n_methods = 1;
        o->budgets[0] = o->kv.budget;
        o->n_budgets = 1;
    }
    static const char *const all[] = {"streaming", "snapkv", "pyramidkv", "uncomp",
                                      "uncomp-online"};
    static const double budgets[] = {0.05, 0.1, 0.2, 0.5, 1.0};
    if (!o->n_methods)
        for (size_t k2 = 0; k2 < sizeof all / sizeof all[0]; k2++)
            o->methods[o->n_methods++] = all[k2];
    if (!o->n_budgets)
        for (size_t k2 = 0; k2 < sizeof budgets / sizeof budgets[0]; k2++)
            o->budgets[o->n_budgets++] = budgets[k2];
    return 0;
}

/* The whole file, tokenized without BOS (callers add what they need). */
static int load_tokens(const ekv_model *m, const char *path, int32_t **ids, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        cli_error("eval", "%s: %s", path, strerror(errno));
        return CLI_USAGE;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 65536 > cap) {
            char *b = realloc(buf, cap = cap * 2 + 65536);
            if (!b)
                break;
            buf = b;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0 || len > (64u << 20))
            break;
    }
    fclose(f);
    ekv_error err = {0};
    int rc = buf && !tok_encode(model_tokenizer(m), buf, len, false, false, ids, n, &err)
                 ? CLI_OK
                 : CLI_FAIL;
    if (rc)
        cli_error("eval", "%s: %s", path, err.msg[0] ? err.msg : "out of memory");
    free(buf);
    return rc;
}

/* longgen: replaces text[prefix..] with the model's greedy continuation of
 * text[0, prefix) under full KV (cont + 1 tokens, end-of-generation ignored). */
static int own_continuation(const eval_opts *o, const ekv_model *m, ekv_runtime *rt,
                            int32_t *text, size_t *n_text)
{
    ekv_error err = {0};
    kv_pool *pool = model_kv_pool_create(m, o->prefix + o->cont + 64, &err);
    gen_params gp;
    gen_params_default(&gp);
    gp.max_tokens = o->cont + 1;
    gp.sampling.temperature = 0;
    gp.ignore_eos = true;
    gen_result r = {0};
    fprintf(stderr, "longgen: generating %d tokens after %d of text with full KV\n", o->cont + 1,
            o->prefix);
    if (!pool || gen_run(rt, pool, text, o->prefix, &gp, NULL, NULL, &r, &err)) {
        cli_error("eval", "%s", err.msg);
        kv_pool_destroy(pool);
        return CLI_FAIL;
    }
    memcpy(text + o->prefix, r.ids, (size_t)r.n_ids * sizeof *text); /* n_text >= prefix + cont + 1 */
    *n_text = (size_t)o->prefix + (size_t)r.n_ids;
    gen_result_free(&r);
    kv_pool_destroy(pool);
    return CLI_OK;
}

/* ---- sweep: table, CSV and plot ---- */

static int sweep_write(const eval_opts *o, const eval_policy *pols, int n_pols,
                       const eval_metrics *ppl, const eval_metrics *pk)
{
    char path[4096];
    if (mkdir(o->out_dir, 0755) != 0 && errno != EEXIST) {
        cli_error("eval", "%s: %s", o->out_dir, strerror(errno));
        return CLI_FAIL;
    }
    snprintf(path, sizeof path, "%s/sweep.csv", o->out_dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        cli_error("eval", "%s: %s", path, strerror(errno));
        return CLI_FAIL;
    }
    const int total = o->trials * o->n_depths;
    fprintf(f, "method,budget,kv_bytes_ppl,kv_fraction_ppl,ppl_ratio,kl,top1,kv_bytes_passkey,"
               "passkey_accuracy,kv_bytes_held\n");
    fprintf(stderr, "\n%-14s %7s %12s %8s %10s %8s %7s %8s\n", "method", "budget", "KV MiB/seq",
            "KV frac", "ppl ratio", "KL", "top-1", "passkey");
    for (int i = 0; i < n_pols; i++) {
        const double budget = pols[i].p.method == KVC_FULL ? 1.0 : pols[i].p.budget;
        const double frac = ppl[i].kv_bytes_full ? (double)ppl[i].kv_bytes / ppl[i].kv_bytes_full
                                                 : 1.0;
        fprintf(f, "%s,%g,%lld,%.4f,%.5f,%.5f,%.4f,%lld,%.4f,%.0f\n", pols[i].label, budget,
                (long long)ppl[i].kv_bytes, frac, ppl[i].ppl, ppl[i].kl, ppl[i].top1,
                (long long)pk[i].kv_bytes, (double)pk[i].passkey_ok / total,
                ppl[i].kv_bytes_mean);
        fprintf(stderr, "%-14s %7g %12.2f %8.3f %10.4f %8.4f %7.3f %8.2f\n", pols[i].label, budget,
                ppl[i].kv_bytes / 1048576.0, frac, ppl[i].ppl, ppl[i].kl, ppl[i].top1,
                (double)pk[i].passkey_ok / total);
    }
    fclose(f);
    fprintf(stderr, "wrote %s\n", path);
    char cmd[8192];
    const char *py = access(EKV_SOURCE_DIR "/.venv/bin/python", X_OK) == 0
                         ? EKV_SOURCE_DIR "/.venv/bin/python"
                         : "python3";
    snprintf(cmd, sizeof cmd, "'%s' '%s/scripts/plot_sweep.py' '%s/sweep.csv' '%s/sweep.png'", py,
             EKV_SOURCE_DIR, o->out_dir, o->out_dir);
    if (system(cmd) != 0) {
        cli_error("eval", "plotting failed (%s); the CSV is complete", cmd);
        return CLI_FAIL;
    }
    fprintf(stderr, "wrote %s/sweep.png\n", o->out_dir);
    return CLI_OK;
}

int cmd_eval(int argc, char **argv)
{
    if (argc < 2 || (strcmp(argv[1], "ppl") && strcmp(argv[1], "passkey") &&
                     strcmp(argv[1], "sweep") && strcmp(argv[1], "longgen"))) {
        if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
            usage(stdout);
            return CLI_OK;
        }
        usage(stderr);
        return CLI_USAGE;
    }
    const char *task = argv[1];
    const int sweep = !strcmp(task, "sweep");
    eval_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc < 0 ? CLI_OK : rc;
    if (sweep && !o.out_dir)
        o.out_dir = "eval-out";
    ekv_error err = {0};
    ekv_runtime *rt = NULL;
    int32_t *text = NULL, *filler = NULL;
    size_t n_text = 0, n_filler = 0;
    char *texts = strdup(o.text), *next = NULL; /* a comma-separated list */
    int n_texts = 0;
    eval_policy *pols = calloc(MAX_POLICIES, sizeof *pols);
    eval_metrics *ppl = calloc(MAX_POLICIES, sizeof *ppl), *pk = calloc(MAX_POLICIES, sizeof *pk);
    int n_pols = 0;
    ekv_model *m = model_load(o.model, &err);
    rc = CLI_FAIL;
    if (!m) {
        cli_error("eval", "%s", err.msg);
        goto out;
    }
    if (!pols || !ppl || !pk || (rc = eval_build_policies(&o, m, pols, &n_pols)))
        goto out;
    const int longgen = !strcmp(task, "longgen");
    const int want_ppl = sweep || longgen || !strcmp(task, "ppl"),
              want_pk = sweep || !strcmp(task, "passkey");
    if (!texts)
        goto out;
    char first[4096]; /* passkey's filler defaults to the first text */
    snprintf(first, sizeof first, "%.*s", (int)strcspn(o.text, ","), o.text);
    if (want_pk && (rc = load_tokens(m, o.filler ? o.filler : first, &filler, &n_filler)))
        goto out;
    rc = CLI_USAGE;
    if (want_pk && n_filler < 64) {
        cli_error("eval", "the filler text is too short (%zu tokens)", n_filler);
        goto out;
    }
    const int32_t ctx = (o.prefix + o.cont > o.context ? o.prefix + o.cont : o.context) + 64;
    rc = CLI_FAIL;
    if (!(rt = cli_runtime_create(o.device, m, 512, ctx, o.threads, &err))) {
        cli_error("eval", "%s", err.msg);
        goto out;
    }
    rc = CLI_OK;
    if (longgen)
        o.windows = 1;
    for (char *t = strtok_r(texts, ",", &next); want_ppl && t && !rc;
         t = strtok_r(NULL, ",", &next)) {
        free(text);
        text = NULL;
        if ((rc = load_tokens(m, t, &text, &n_text)))
            goto out;
        if (n_text < (size_t)(o.prefix + o.cont + 1)) {
            cli_error("eval", "%s has %zu tokens; --prefix + --continue + 1 = %d", t, n_text,
                      o.prefix + o.cont + 1);
            rc = CLI_USAGE;
            goto out;
        }
        /* longgen: the text's first prefix tokens, then the model's own continuation */
        if (longgen && (rc = own_continuation(&o, m, rt, text, &n_text)))
            goto out;
        o.text_now = t;
        rc = eval_run_ppl(&o, rt, text, (int32_t)n_text, pols, n_pols, ppl, 1);
        n_texts++;
    }
    for (int i = 0; i < n_pols && n_texts > 1; i++) { /* each text counts once */
        ppl[i].ppl /= n_texts;
        ppl[i].kl /= n_texts;
        ppl[i].top1 /= n_texts;
        ppl[i].kv_bytes /= n_texts;
        ppl[i].kv_bytes_full /= n_texts;
        ppl[i].kv_bytes_mean /= n_texts;
        ppl[i].kv_bytes_end /= n_texts;
        ppl[i].compress_s /= n_texts;
    }
    if (!rc && want_pk)
        rc = eval_run_passkey(&o, rt, filler, (int32_t)n_filler, pols, n_pols, pk, 1);
    if (!rc && sweep)
        rc = sweep_write(&o, pols, n_pols, ppl, pk);
out:
    model_runtime_free(rt);
    kvc_profile_free(o.profile);
    model_free(m);
    free(text);
    free(texts);
    free(filler);
    free(pols);
    free(ppl);
    free(pk);
    return rc;
}
