/*
 * cmd_calibrate.c - `entrokv calibrate`: the offline UNComp head-group
 * profile of a model from real text (specs/uncomp.md section 2).
 *
 * Each calibration sample is a window of --ctx tokens of one text; its
 * prefill records every query head's truncated matrix entropy, each layer's
 * highest-entropy KV heads get a vote, and the profile keeps the votes.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "entrokv/compress.h"
#include "entrokv/model.h"

#define MAX_TEXTS 64

typedef struct calib_opts {
    const char *model, *out;
    const char *texts[MAX_TEXTS];
    int n_texts;
    int32_t ctx, max_samples, threads;
} calib_opts;

static void usage(FILE *out)
{
    fprintf(out, "usage: entrokv calibrate --model PATH --text FILE [--text FILE ...] --out PROFILE\n"
                 "  [--ctx 2048] tokens per calibration sample\n"
                 "  [--max-samples 24] samples over all texts\n"
                 "  [--threads N]\n"
                 "Use text other than what you evaluate on (Debian's /usr/share/common-licenses\n"
                 "and /usr/share/doc hold long documents).\n");
}

static int parse(int argc, char **argv, calib_opts *o)
{
    memset(o, 0, sizeof *o);
    o->ctx = 2048;
    o->max_samples = 24;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int ok = 1;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return -1;
        } else if (!strcmp(a, "--model")) ok = cli_take_str(argc, argv, &i, &o->model);
        else if (!strcmp(a, "--out")) ok = cli_take_str(argc, argv, &i, &o->out);
        else if (!strcmp(a, "--ctx")) ok = cli_take_int(argc, argv, &i, 64, 1 << 20, &o->ctx);
        else if (!strcmp(a, "--max-samples"))
            ok = cli_take_int(argc, argv, &i, 1, 100000, &o->max_samples);
        else if (!strcmp(a, "--threads")) ok = cli_take_int(argc, argv, &i, 1, 1024, &o->threads);
        else if (!strcmp(a, "--text")) {
            if (o->n_texts == MAX_TEXTS) {
                cli_error("calibrate", "at most %d --text files", MAX_TEXTS);
                return CLI_USAGE;
            }
            ok = cli_take_str(argc, argv, &i, &o->texts[o->n_texts++]);
        } else {
            cli_error("calibrate", "unknown flag '%s' (see --help)", a);
            return CLI_USAGE;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!o->model || !o->out || !o->n_texts) {
        cli_error("calibrate", "--model, --text and --out are required (see --help)");
        return CLI_USAGE;
    }
    return 0;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t cap = 0;
    *len = 0;
    for (;;) {
        if (*len + 65536 > cap) {
            char *b = realloc(buf, cap = cap * 2 + 65536);
            if (!b)
                break;
            buf = b;
        }
        size_t r = fread(buf + *len, 1, cap - *len, f);
        *len += r;
        if (r == 0 || *len > (64u << 20))
            break;
    }
    fclose(f);
    return buf;
}

/* One sample: prefill ids into a fresh sequence and add its entropies. */
static ekv_status sample(ekv_runtime *rt, kv_pool *pool, kvc_calibration *cal, const int32_t *ids,
                         int32_t n, float *logits, ekv_error *err)
{
    const ekv_model *m = model_runtime_model(rt);
    const ekv_model_config *c = model_config(m);
    kvc_policy rec = {.method = KVC_UNCOMP, .budget = 1.0};
    kv_seq *seq = kv_seq_create(pool, c->n_layers, c->n_kv_heads, err);
    kvc_capture *cap = seq ? kvc_capture_create(&rec, m, n, 0, err) : NULL;
    const float *e;
    ekv_status rc = cap ? EKV_OK : (err ? err->code : EKV_ENOMEM);
    if (!rc)
        rc = model_prefill(rt, seq, ids, n, 0, kvc_capture_tap(cap, seq), logits, err);
    if (!rc)
        rc = kvc_capture_entropy(cap, &e, err);
    if (!rc)
        kvc_calibration_add(cal, e);
    kvc_capture_free(cap);
    kv_seq_free(seq);
    return rc;
}

int cmd_calibrate(int argc, char **argv)
{
    calib_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc < 0 ? CLI_OK : rc;
    ekv_error err = {0};
    ekv_runtime *rt = NULL;
    kv_pool *pool = NULL;
    kvc_calibration *cal = NULL;
    float *logits = NULL;
    int samples = 0;
    rc = CLI_FAIL;
    ekv_model *m = model_load(o.model, &err);
    if (!m || !(pool = model_kv_pool_create(m, o.ctx, &err)) ||
        !(rt = model_runtime_create(m, 512, o.ctx, o.threads, &err)) ||
        !(cal = kvc_calibration_create(m, &err)))
        goto fail;
    if (!(logits = malloc((size_t)model_config(m)->n_vocab * sizeof *logits)))
        goto fail;
    for (int t = 0; t < o.n_texts && samples < o.max_samples; t++) {
        size_t len = 0, n = 0;
        int32_t *ids = NULL;
        char *text = read_file(o.texts[t], &len);
        if (!text) {
            cli_error("calibrate", "%s: %s", o.texts[t], strerror(errno));
            rc = CLI_USAGE;
            goto out;
        }
        ekv_status st = tok_encode(model_tokenizer(m), text, len, false, false, &ids, &n, &err);
        free(text);
        if (st)
            goto fail;
        /* consecutive windows of ctx tokens; a short text is one sample */
        for (size_t at = 0; at < n && samples < o.max_samples; at += (size_t)o.ctx) {
            int32_t len_s = (int32_t)(n - at < (size_t)o.ctx ? n - at : (size_t)o.ctx);
            if (len_s < 256 || (at > 0 && len_s < o.ctx / 2))
                break;
            if (sample(rt, pool, cal, ids + at, len_s, logits, &err)) {
                free(ids);
                goto fail;
            }
            samples++;
            fprintf(stderr, "\rcalibrate: %d samples (%s)", samples, o.texts[t]);
        }
        free(ids);
    }
    fputc('\n', stderr);
    if (kvc_calibration_save(cal, o.out, &err))
        goto fail;
    fprintf(stderr, "calibrate: wrote %s from %d samples\n", o.out, samples);
    rc = CLI_OK;
    goto out;
fail:
    cli_error("calibrate", "%s", err.msg[0] ? err.msg : "out of memory");
out:
    free(logits);
    kvc_calibration_free(cal);
    model_runtime_free(rt);
    kv_pool_destroy(pool);
    model_free(m);
    return rc;
}
