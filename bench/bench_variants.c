/*
 * bench_variants.c - `entrokv bench generate --decode-variants LIST`: one
 * prefill, then decode steps under several KV configurations on clones of
 * the same sequence, alternated for --reps rounds (the order rotating each
 * round), so an A/B at long context pays the prefill once and the
 * configurations share the machine's drift.
 *
 * Variants: `full` (the uncompressed prompt), `norecall` (the policy
 * without recall at the same budget: resident KV only) and `M:fast` /
 * `M:scalar` (the policy with recall, ranking with M exact channels, 0 the
 * box; fast the batched, pruned ranking, scalar every block one call at a
 * time: kv_recall_set_rank_scalar). Each run prints a JSON line with its
 * decode rate, the recall counters and a hash of the tokens it generated:
 * fast and scalar runs of one M must generate the same tokens (the same
 * blocks are recalled at every step).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_ref.h"
#include "entrokv/compress.h"
#include "entrokv/generate.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"
#include "entrokv/model.h"

#define MAX_VARIANTS 16

typedef struct variant {
    char name[24];
    int kind; /* 0 full, 1 norecall, 2 recall */
    int32_t m;
    bool scalar;
} variant;

static int parse_variants(const char *list, variant *v, ekv_error *err)
{
    int n = 0;
    const char *p = list;
    while (*p) {
        const size_t len = strcspn(p, ",");
        if (n == MAX_VARIANTS || len == 0 || len >= sizeof v->name) {
            ekv_error_set(err, EKV_EINVAL, "--decode-variants: bad list '%s'", list);
            return -1;
        }
        variant *x = &v[n++];
        memcpy(x->name, p, len);
        x->name[len] = 0;
        char mode[16];
        int used = 0;
        if (!strcmp(x->name, "full"))
            x->kind = 0;
        else if (!strcmp(x->name, "norecall"))
            x->kind = 1;
        else if (sscanf(x->name, "%d:%15[a-z]%n", &x->m, mode, &used) == 2 &&
                 used == (int)len && x->m >= 0 && x->m <= KV_RECALL_CHANNELS_MAX &&
                 (!strcmp(mode, "fast") || !strcmp(mode, "scalar"))) {
            x->kind = 2;
            x->scalar = !strcmp(mode, "scalar");
        } else {
            ekv_error_set(err, EKV_EINVAL,
                          "--decode-variants: '%s' is not full, norecall or M:fast|scalar",
                          x->name);
            return -1;
        }
        p += len + (p[len] == ',');
    }
    return n;
}

static int32_t argmax_row(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* Decodes n_decode greedy steps on a clone of src; prints the JSON line. */
static ekv_status run_one(ekv_runtime *rt, const kv_seq *src, const variant *v,
                          const float *logits0, int32_t n_prompt, int32_t n_decode, int round,
                          int threads, ekv_error *err)
{
    const ekv_model_config *c = model_config(model_runtime_model(rt));
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    kv_seq *s = kv_seq_clone(src, err);
    ekv_status rc = EKV_OK;
    if (!logits || !s) {
        rc = s ? ekv_error_set(err, EKV_ENOMEM, "out of memory") : err->code;
        goto out;
    }
    memcpy(logits, logits0, (size_t)c->n_vocab * sizeof *logits);
    kv_recall *rec = kv_seq_recall(s);
    if (v->kind == 2) {
        if (!rec) {
            rc = ekv_error_set(err, EKV_EINVAL, "--decode-variants %s: the policy has no recall",
                               v->name);
            goto out;
        }
        if ((rc = kv_recall_set_channels(rec, v->m, err)))
            goto out;
        kv_recall_set_rank_scalar(rec, v->scalar);
    }
    kv_recall_stats st0 = {0}, st1 = {0};
    if (rec)
        kv_recall_get_stats(rec, &st0);
    uint64_t hash = 1469598103934665603ull; /* FNV-1a over the generated ids */
    const double t0 = gen_now();
    for (int32_t i = 0; i < n_decode && !rc; i++) {
        int32_t id = argmax_row(logits, c->n_vocab), p = n_prompt + i;
        hash = (hash ^ (uint64_t)(uint32_t)id) * 1099511628211ull;
        model_batch b = {.n = 1, .tokens = &id, .pos = &p, .seqs = &s};
        rc = model_forward(rt, &b, logits, err);
    }
    const double t1 = gen_now();
    if (rc)
        goto out;
    if (getenv("EKV_PERF_MARKS")) /* as bench generate's: a perf profile per run */
        fprintf(stderr, "perf-mark variant-%s-%d %.6f %.6f\n", v->name, round, t0, t1);
    if (rec)
        kv_recall_get_stats(rec, &st1);
    printf("{\"bench\":\"decode_variant\",\"variant\":\"%s\",\"round\":%d,\"prompt_tokens\":%d,"
           "\"decode_tokens\":%d,\"decode_tokens_per_s\":%.3f,\"kv_resident_bytes\":%lld,"
           "\"tokens_hash\":\"%016llx\"",
           v->name, round, n_prompt, n_decode, n_decode / (t1 - t0), (long long)kv_seq_bytes(s),
           (unsigned long long)hash);
    if (rec && v->kind == 2) {
        const double nd = n_decode;
        printf(",\"recall_bytes_per_token\":%.1f,\"recall_rank_bytes_per_token\":%.1f,"
               "\"recall_rank_k_blocks\":%lld,\"recall_rankings\":%lld,"
               "\"recall_digest_blocks\":%lld,\"recall_select_s\":%.6f,"
               "\"recall_select_share\":%.4f",
               (st1.bytes_recalled - st0.bytes_recalled) / nd,
               (st1.rank_bytes - st0.rank_bytes) / nd,
               (long long)(st1.rank_k_blocks - st0.rank_k_blocks),
               (long long)(st1.selections - st0.selections), (long long)st1.digest_blocks,
               st1.select_s - st0.select_s,
               /* of the decode's thread time */
               (st1.select_s - st0.select_s) /
                   ((t1 - t0) * threads));
    }
    printf("}\n");
    fflush(stdout);
out:
    if (s) {
        model_runtime_forget_seq(rt, s);
        kv_seq_free(s);
    }
    free(logits);
    return rc;
}

ekv_status bench_decode_variants(ekv_runtime *rt, kv_pool *kv, const kvc_policy *pol,
                                 const int32_t *prompt, int32_t n_prompt, int32_t n_decode,
                                 int rounds, const char *list, int threads, ekv_error *err)
{
    variant v[MAX_VARIANTS];
    const int nv = parse_variants(list, v, err);
    if (nv < 0)
        return err->code;
    const ekv_model *m = model_runtime_model(rt);
    const ekv_model_config *c = model_config(m);
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    kv_seq *full = kv_seq_create(kv, c->n_layers, c->n_kv_heads, err), *rseq = NULL, *nr = NULL;
    kvc_capture *cap = NULL;
    ekv_status rc = EKV_OK;
    if (!logits || !full) {
        rc = full ? ekv_error_set(err, EKV_ENOMEM, "out of memory") : err->code;
        goto out;
    }
    const double t0 = gen_now();
    if (!(cap = kvc_capture_create(pol, m, n_prompt, 0, err))) {
        rc = err->code;
        goto out;
    }
    if ((rc = model_prefill(rt, full, prompt, n_prompt, 0, kvc_capture_tap(cap, full), logits,
                            err)))
        goto out;
    fprintf(stderr, "decode variants: prefill of %d tokens in %.1f s\n", n_prompt,
            gen_now() - t0);
    kvc_report rep;
    if (!(rseq = kv_seq_clone(full, err)) || (rc = kvc_capture_compress(cap, rt, rseq, &rep, err))) {
        rc = rc ? rc : err->code;
        goto out;
    }
    for (int i = 0; i < nv; i++)
        if (v[i].kind == 1 && !nr) { /* the same budget, no recall buffer */
            kvc_policy p2 = *pol;
            p2.recall = 0;
            if ((rc = kvc_capture_set_policy(cap, &p2, err)) || !(nr = kv_seq_clone(full, err)) ||
                (rc = kvc_capture_compress(cap, rt, nr, &rep, err))) {
                rc = rc ? rc : err->code;
                goto out;
            }
        }
    for (int round = 0; round < rounds && !rc; round++)
        for (int k = 0; k < nv && !rc; k++) {
            const variant *x = &v[(k + round) % nv];
            rc = run_one(rt, x->kind == 0 ? full : x->kind == 1 ? nr : rseq, x, logits, n_prompt,
                         n_decode, round, threads, err);
        }
out:
    kvc_capture_free(cap);
    kv_seq *seqs[3] = {full, rseq, nr};
    for (int i = 0; i < 3; i++)
        if (seqs[i]) {
            model_runtime_forget_seq(rt, seqs[i]);
            kv_seq_free(seqs[i]);
        }
    free(logits);
    return rc;
}
