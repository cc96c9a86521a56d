/*
 * eval_tasks.c - the ppl and passkey tasks of `entrokv eval` over a list of
 * policies: prompts built from real text, one JSON line per result on
 * stdout, a progress bar on stderr. Flags and the sweep are in cmd_eval.c.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "entrokv/generate.h"
#include "eval.h"
#include "eval_opts.h"

#define MAX_POLICIES 64

/* ---- progress bar ---- */

typedef struct progress {
    const char *what;
    int done, total;
} progress;

static void progress_draw(void *ctx, int done_in_task)
{
    progress *p = ctx;
    (void)done_in_task;
    p->done++;
    const int width = 30, fill = p->total ? p->done * width / p->total : width;
    fprintf(stderr, "\r%-8s [", p->what);
    for (int i = 0; i < width; i++)
        fputc(i < fill ? '#' : '.', stderr);
    fprintf(stderr, "] %d/%d", p->done, p->total);
    if (p->done >= p->total)
        fputc('\n', stderr);
    fflush(stderr);
}

/* ---- policies: full first, then every method x budget ---- */

/* A --methods entry "base[+decode][+sparkR[z]]" ("snapkv+spark0.5",
 * "full+h2o", "uncomp+spark0.8z"): the token method's name into base and
 * what the suffixes set into decode and spark (left as given otherwise), so
 * one run compares compositions on the same prompts. */
static int split_method(const char *name, char *base, size_t cap, kvc_decode_policy *decode,
                        kvc_spark_policy *spark, const eval_opts *o)
{
    const char *plus = strchr(name, '+');
    const size_t len = plus ? (size_t)(plus - name) : strlen(name);
    snprintf(base, cap, "%.*s", (int)len, name);
    ekv_error err = {0};
    for (const char *p = plus; p && *p == '+';) {
        const char *end = strchr(p + 1, '+');
        char part[32];
        snprintf(part, sizeof part, "%.*s", (int)(end ? end - p - 1 : (long)strlen(p + 1)), p + 1);
        if (!strncmp(part, "spark", 5)) {
            char *e;
            const double r = strtod(part + 5, &e);
            const char *rec = !strcmp(e, "z") ? "zero" : !*e ? "avg" : NULL;
            if (e == part + 5 || !rec || kvc_spark_parse(r, rec, spark, &err)) {
                cli_error("eval", "'%s': bad SparK part '%s' (sparkR or sparkRz, R in [0, 1))%s%s",
                          name, part, err.msg[0] ? ": " : "", err.msg);
                return CLI_USAGE;
            }
        } else if (kvc_decode_parse(part, o->kv.scope_recent, o->kv.scope_window, decode, &err)) {
            cli_error("eval", "'%s': %s", name, err.msg);
            return CLI_USAGE;
        }
        p = end;
    }
    return CLI_OK;
}

int eval_build_policies(eval_opts *o, const ekv_model *m, eval_policy *pols, int *n_pols)
{
    int n = 0;
    /* --decode-method / --spark-* apply to every policy but the reference;
     * with them, "full" in --methods is full prefill plus the mechanism */
    kvc_decode_policy decode;
    kvc_spark_policy spark;
    ekv_error err = {0};
    if (kvc_decode_parse(o->kv.decode, o->kv.scope_recent, o->kv.scope_window, &decode, &err) ||
        kvc_spark_parse(o->kv.spark_ratio, o->kv.spark_recovery, &spark, &err)) {
        cli_error("eval", "%s", err.msg);
        return CLI_USAGE;
    }
    pols[n].p.method = KVC_FULL;
    pols[n].p.budget = 1.0;
    snprintf(pols[n++].label, sizeof pols[0].label, "full");
    for (int mi = 0; mi < o->n_methods; mi++) {
        char name[32];
        kvc_decode_policy own_decode = decode;
        kvc_spark_policy own_spark = spark;
        const int composed = strchr(o->methods[mi], '+') != NULL;
        if (split_method(o->methods[mi], name, sizeof name, &own_decode, &own_spark, o))
            return CLI_USAGE;
        const bool extra = own_decode.mode != KVC_DECODE_NONE || own_spark.ratio > 0;
        const int online = !strcmp(name, "uncomp-online");
        for (int bi = 0; bi < o->n_budgets; bi++) {
            if (n == MAX_POLICIES) {
                cli_error("eval", "at most %d policies", MAX_POLICIES);
                return CLI_USAGE;
            }
            if (!strcmp(name, "full") && !extra)
                break; /* full KV alone is the reference */
            cli_kv_opts kv = {.method = online ? "uncomp" : name, .budget = o->budgets[bi],
                              .profile = online ? "none" : o->kv.profile};
            int rc;
            if (!online && !strcmp(name, "uncomp") && !o->profile_loaded) {
                if ((rc = cli_kv_policy("eval", &kv, m, o->model, &pols[n].p, &o->profile)))
                    return rc;
                o->profile_loaded = 1;
                if (!o->profile)
                    o->uncomp_is_online = 1;
            } else if ((rc = cli_kv_policy("eval", &(cli_kv_opts){.method = kv.method,
                                                                   .budget = kv.budget,
                                                                   .profile = "none"},
                                           m, o->model, &pols[n].p, &(kvc_profile *){NULL}))) {
                return rc;
            }
            if (!online && !strcmp(name, "uncomp"))
                pols[n].p.profile = o->profile;
            snprintf(pols[n].label, sizeof pols[0].label, "%s",
                     !online && !strcmp(name, "uncomp") && o->uncomp_is_online ? "uncomp-online"
                                                                               : name);
            pols[n].p.decode = own_decode;
            pols[n].p.spark = own_spark;
            if (composed) { /* as written: "snapkv+spark0.5" */
                snprintf(pols[n].label, sizeof pols[0].label, "%s", o->methods[mi]);
            } else if (extra) { /* "snapkv+scope-slide", "full+spark0.8z" */
                char tail[24] = "";
                if (own_decode.mode != KVC_DECODE_NONE)
                    snprintf(tail, sizeof tail, "+%s",
                             kvc_decode_name(own_decode.mode) +
                                 (strncmp(kvc_decode_name(own_decode.mode), "scope-", 6) ? 0 : 6));
                if (own_spark.ratio > 0)
                    snprintf(tail + strlen(tail), sizeof tail - strlen(tail), "+spark%g%s",
                             own_spark.ratio, own_spark.recovery == KVC_SPARK_ZERO ? "z" : "");
                const size_t used = strlen(pols[n].label);
                snprintf(pols[n].label + used, sizeof pols[0].label - used, "%s", tail);
            }
            n++;
            if (o->kv.recall > 0 && pols[n - 1].p.method != KVC_FULL) { /* + recall */
                if (n == MAX_POLICIES) {
                    cli_error("eval", "at most %d policies", MAX_POLICIES);
                    return CLI_USAGE;
                }
                pols[n] = pols[n - 1];
                pols[n].p.recall = o->kv.recall;
                pols[n].p.recall_every = o->kv.recall_every;
                pols[n].p.recall_no_promote = !o->kv.recall_promote;
                pols[n].p.recall_channels = cli_kv_channels(&o->kv);
                pols[n].p.recall_gather = o->kv.recall_gather;
                const size_t used = strlen(pols[n].label);
                snprintf(pols[n].label + used, sizeof pols[0].label - used, "+recall%d%s",
                         o->kv.recall, o->kv.recall_promote ? "" : "np");
                if (o->kv.recall_every > 1)
                    snprintf(pols[n].label + strlen(pols[n].label),
                             sizeof pols[0].label - strlen(pols[n].label), "k%d",
                             o->kv.recall_every);
                if (o->kv.recall_gather > 0)
                    snprintf(pols[n].label + strlen(pols[n].label),
                             sizeof pols[0].label - strlen(pols[n].label), "g%d",
                             o->kv.recall_gather);
                n++;
            }
            if (!strcmp(name, "full"))
                break; /* its budget is always 1 */
        }
    }
    *n_pols = n;
    return CLI_OK;
}

/* ---- output ---- */

static void emit(cJSON *o)
{
    char *s = cJSON_PrintUnformatted(o);
    if (s)
        puts(s);
    fflush(stdout);
    free(s);
    cJSON_Delete(o);
}

static cJSON *result_json(const char *task, const eval_policy *pol, const eval_metrics *r)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "task", task);
    cJSON_AddStringToObject(o, "method", pol->label);
    cJSON_AddNumberToObject(o, "budget", pol->p.method == KVC_FULL ? 1.0 : pol->p.budget);
    cJSON_AddNumberToObject(o, "kv_bytes", (double)r->kv_bytes);
    cJSON_AddNumberToObject(o, "kv_fraction",
                            r->kv_bytes_full ? (double)r->kv_bytes / r->kv_bytes_full : 1.0);
    if (pol->p.recall > 0) {
        cJSON_AddNumberToObject(o, "recall", pol->p.recall);
        cJSON_AddNumberToObject(o, "recall_blocks", (double)r->recall_blocks);
        cJSON_AddNumberToObject(o, "recall_bytes_per_token", r->recall_bytes_token);
        cJSON_AddNumberToObject(o, "recall_evicted_tokens", (double)r->recall_evicted);
        cJSON_AddNumberToObject(o, "recall_buffer_bytes", (double)r->recall_buffer_bytes);
        cJSON_AddNumberToObject(o, "recall_select_s", r->recall_select_s);
        /* the mode that ran: token recall ranks every step and promotes nothing */
        const bool tokens = pol->p.recall_gather > 0;
        cJSON_AddStringToObject(o, "recall_mode", tokens ? "tokens" : "blocks");
        cJSON_AddNumberToObject(o, "recall_every",
                                tokens || !pol->p.recall_every ? 1 : pol->p.recall_every);
        cJSON_AddNumberToObject(o, "recall_promote", !tokens && !pol->p.recall_no_promote);
        cJSON_AddNumberToObject(o, "recall_gather", pol->p.recall_gather);
        cJSON_AddNumberToObject(o, "recall_channels",
                                pol->p.recall_channels == KVC_RECALL_BOX ? 0
                                : pol->p.recall_channels ? pol->p.recall_channels
                                                         : KV_RECALL_EXACT_CHANNELS);
        cJSON_AddNumberToObject(o, "recall_rankings", (double)r->recall_rankings);
        cJSON_AddNumberToObject(o, "recall_promotions", (double)r->recall_promotions);
    }
    return o;
}

/* ---- tasks ---- */

int eval_run_ppl(eval_opts *o, ekv_runtime *rt, const int32_t *tokens, int32_t n_tokens,
                 const eval_policy *pols, int n_pols, eval_metrics *sum, int print)
{
    ekv_error err = {0};
    eval_metrics *r = calloc((size_t)n_pols, sizeof *r);
    progress pr = {.what = "ppl", .total = n_pols * o->windows};
    int rc = CLI_OK;
    if (!r)
        return CLI_FAIL;
    for (int w = 0; w < o->windows && rc == CLI_OK; w++) {
        const int32_t need = o->prefix + o->cont + 1;
        const int32_t start = o->windows > 1 ? (int32_t)((int64_t)(n_tokens - need) * w /
                                                         (o->windows - 1))
                                             : 0;
        if (eval_ppl(rt, tokens + start, o->prefix, o->cont, pols, n_pols, r, progress_draw, &pr,
                     &err)) {
            cli_error("eval", "%s", err.msg);
            rc = CLI_FAIL;
            break;
        }
        for (int i = 0; i < n_pols; i++) {
            sum[i].ppl += r[i].ppl / r[0].ppl / o->windows; /* the ratio to full KV */
            sum[i].kl += r[i].kl / o->windows;
            sum[i].top1 += r[i].top1 / o->windows;
            sum[i].kv_bytes += r[i].kv_bytes / o->windows;
            sum[i].kv_bytes_full += r[i].kv_bytes_full / o->windows;
            sum[i].compress_s += r[i].compress_s / o->windows;
            sum[i].kv_bytes_end += r[i].kv_bytes_end / o->windows;
            sum[i].kv_bytes_mean += r[i].kv_bytes_mean / o->windows;
            if (!print)
                continue;
            cJSON *j = result_json("ppl", &pols[i], &r[i]);
            if (o->text_now)
                cJSON_AddStringToObject(j, "text", o->text_now);
            cJSON_AddNumberToObject(j, "window_start", start);
            cJSON_AddNumberToObject(j, "prefix", o->prefix);
            cJSON_AddNumberToObject(j, "continue", o->cont);
            cJSON_AddNumberToObject(j, "ppl", r[i].ppl);
            cJSON_AddNumberToObject(j, "ppl_ratio", r[i].ppl / r[0].ppl);
            cJSON_AddNumberToObject(j, "kl", r[i].kl);
            cJSON_AddNumberToObject(j, "top1", r[i].top1);
            cJSON_AddNumberToObject(j, "compress_s", r[i].compress_s);
            cJSON_AddNumberToObject(j, "kv_bytes_end", (double)r[i].kv_bytes_end);
            cJSON_AddNumberToObject(j, "kv_bytes_mean", r[i].kv_bytes_mean);
            emit(j);
        }
    }
    free(r);
    return rc;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* intro + filler + needle at depth + filler + question, context tokens. */
static int passkey_prompt(const ekv_tokenizer *tok, const int32_t *filler, int32_t n_filler,
                          int32_t context, double depth, uint64_t *rng, int32_t *out,
                          char *key, size_t key_cap)
{
    static const char intro[] = "There is an important piece of information hidden inside a lot "
                                "of irrelevant text. Find it and memorize it. I will quiz you "
                                "about it.\n\n";
    char needle[160];
    const unsigned k = 10000 + (unsigned)(splitmix(rng) % 90000);
    snprintf(key, key_cap, "%u", k);
    snprintf(needle, sizeof needle, "\n\nThe pass key is %u. Remember it. %u is the pass key.\n\n",
             k, k);
    static const char question[] = "\n\nWhat is the pass key? The pass key is";
    int32_t *a = NULL, *b = NULL, *c = NULL;
    size_t na = 0, nb = 0, nc = 0;
    int ok = 0;
    if (tok_encode(tok, intro, strlen(intro), tok_add_bos(tok), false, &a, &na, NULL) ||
        tok_encode(tok, needle, strlen(needle), false, false, &b, &nb, NULL) ||
        tok_encode(tok, question, strlen(question), false, false, &c, &nc, NULL))
        goto out;
    const int32_t fill = context - (int32_t)(na + nb + nc);
    if (fill < 16)
        goto out;
    const int32_t before = (int32_t)(fill * depth);
    const int32_t off = (int32_t)(splitmix(rng) % (uint64_t)n_filler);
    int32_t n = 0;
    memcpy(out + n, a, na * sizeof *a);
    n += (int32_t)na;
    for (int32_t i = 0; i < fill; i++) {
        if (i == before) {
            memcpy(out + n, b, nb * sizeof *b);
            n += (int32_t)nb;
        }
        out[n++] = filler[(off + i) % n_filler];
    }
    if (before >= fill) {
        memcpy(out + n, b, nb * sizeof *b);
        n += (int32_t)nb;
    }
    memcpy(out + n, c, nc * sizeof *c);
    ok = 1;
out:
    free(a);
    free(b);
    free(c);
    return ok;
}

int eval_run_passkey(eval_opts *o, ekv_runtime *rt, const int32_t *filler, int32_t n_filler,
                     const eval_policy *pols, int n_pols, eval_metrics *acc, int print)
{
    const ekv_tokenizer *tok = model_tokenizer(model_runtime_model(rt));
    ekv_error err = {0};
    eval_metrics *r = calloc((size_t)n_pols, sizeof *r);
    int32_t *prompt = malloc((size_t)o->context * sizeof *prompt);
    progress pr = {.what = "passkey", .total = n_pols * o->trials * o->n_depths};
    uint64_t rng = o->seed;
    int rc = CLI_OK;
    if (!r || !prompt) {
        free(r);
        free(prompt);
        return CLI_FAIL;
    }
    const int total = o->trials * o->n_depths;
    for (int d = 0; d < o->n_depths && rc == CLI_OK; d++)
        for (int t = 0; t < o->trials && rc == CLI_OK; t++) {
            char key[16];
            if (!passkey_prompt(tok, filler, n_filler, o->context, o->depths[d], &rng, prompt, key,
                                sizeof key)) {
                cli_error("eval", "passkey: context %d is too short for the prompt", o->context);
                rc = CLI_USAGE;
                break;
            }
            if (eval_passkey(rt, prompt, o->context, key, 8, pols, n_pols, r, progress_draw, &pr,
                             &err)) {
                cli_error("eval", "%s", err.msg);
                rc = CLI_FAIL;
                break;
            }
            for (int i = 0; i < n_pols; i++) {
                acc[i].passkey_ok += r[i].passkey_ok;
                acc[i].kv_bytes += r[i].kv_bytes / total;
                acc[i].kv_bytes_full += r[i].kv_bytes_full / total;
                if (!print)
                    continue;
                cJSON *j = result_json("passkey", &pols[i], &r[i]);
                cJSON_AddNumberToObject(j, "context", o->context);
                cJSON_AddNumberToObject(j, "depth", o->depths[d]);
                cJSON_AddNumberToObject(j, "trial", t);
                cJSON_AddStringToObject(j, "key", key);
                cJSON_AddStringToObject(j, "answer", r[i].answer);
                cJSON_AddBoolToObject(j, "correct", r[i].passkey_ok);
                emit(j);
            }
        }
    for (int i = 0; i < n_pols && rc == CLI_OK && print; i++) {
        cJSON *j = result_json("passkey_summary", &pols[i], &acc[i]);
        cJSON_AddNumberToObject(j, "accuracy", (double)acc[i].passkey_ok / total);
        cJSON_AddNumberToObject(j, "trials", total);
        emit(j);
    }
    free(r);
    free(prompt);
    return rc;
}
