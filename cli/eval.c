/*
 * eval.c - the measurements behind `entrokv eval` (see eval.h).
 */
#include "eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/generate.h"
#include "entrokv/kvrecall.h"
#include "entrokv/tokenizer.h"

/* A prefilled sequence and the capture that recorded its prompt. */
typedef struct prefilled {
    kv_pool *pool;
    kv_seq *seq;
    kvc_capture *cap;
    float *logits; /* the prompt's last row */
} prefilled;

static void prefilled_free(prefilled *p)
{
    kvc_capture_free(p->cap);
    kv_seq_free(p->seq);
    kv_pool_destroy(p->pool);
    free(p->logits);
    memset(p, 0, sizeof *p);
}

/* Prefills n tokens into a pool big enough for it, one clone and extra tokens. */
static ekv_status prefill(ekv_runtime *rt, const int32_t *ids, int32_t n, int32_t extra,
                          prefilled *p, ekv_error *err)
{
    const ekv_model *m = model_runtime_model(rt);
    const ekv_model_config *c = model_config(m);
    /* records the window queries and the entropy: enough for every method */
    kvc_policy rec = {.method = KVC_UNCOMP, .budget = 1.0, .spark = {.ratio = 0.5}};
    memset(p, 0, sizeof *p);
    ekv_status rc;
    p->logits = malloc((size_t)c->n_vocab * sizeof *p->logits);
    if (!(p->pool = model_kv_pool_create(m, 2 * n + extra + 64, err)) ||
        !(p->seq = kv_seq_create(p->pool, c->n_layers, c->n_kv_heads, err)) ||
        !(p->cap = kvc_capture_create(&rec, m, n, 0, err))) {
        rc = err ? err->code : EKV_ENOMEM;
        goto fail;
    }
    if (!p->logits) {
        rc = ekv_error_set(err, EKV_ENOMEM, "eval: out of memory");
        goto fail;
    }
    if ((rc = model_prefill(rt, p->seq, ids, n, 0, kvc_capture_tap(p->cap, p->seq), p->logits,
                            err)))
        goto fail;
    return EKV_OK;
fail:
    prefilled_free(p);
    return rc;
}

/* A clone of the prefilled sequence compressed with pol. */
static kv_seq *compressed_clone(ekv_runtime *rt, prefilled *p, const eval_policy *pol,
                                eval_metrics *out, ekv_error *err)
{
    kv_seq *s = kv_seq_clone(p->seq, err);
    if (!s)
        return NULL;
    out->kv_bytes_full = kv_seq_bytes(s);
    if (pol->p.method != KVC_FULL || pol->p.spark.ratio > 0) {
        kvc_report rep;
        if (kvc_capture_set_policy(p->cap, &pol->p, err) ||
            kvc_capture_compress(p->cap, rt, s, &rep, err)) {
            model_runtime_forget_seq(rt, s);
            kv_seq_free(s);
            return NULL;
        }
        out->compress_s = rep.seconds;
    }
    out->kv_bytes = kv_seq_bytes(s);
    return s;
}

/* The recall store's counters after n forwarded tokens into out. */
static void recall_metrics(const kv_seq *s, int32_t n, eval_metrics *out)
{
    const kv_recall *rc = kv_seq_recall(s);
    if (!rc)
        return;
    kv_recall_stats st;
    kv_recall_get_stats(rc, &st);
    out->recall_blocks = st.blocks_recalled;
    out->recall_bytes_token = n > 0 ? (double)st.bytes_recalled / n : 0;
    out->recall_evicted = st.evicted_tokens;
    out->recall_buffer_bytes = st.buffer_bytes;
    out->recall_select_s = st.select_s;
    out->recall_rankings = st.selections;
    out->recall_promotions = st.promotions;
}

/* Logits of every row of tokens[0, n) at positions pos0.., appended to s,
 * chunk rows per forward. */
static ekv_status forward_all(ekv_runtime *rt, kv_seq *s, const int32_t *tokens, int32_t n,
                              int32_t pos0, float *logits, int32_t chunk, ekv_error *err)
{
    const int32_t V = model_config(model_runtime_model(rt))->n_vocab;
    int32_t *pos = malloc((size_t)chunk * sizeof *pos);
    kv_seq **seqs = malloc((size_t)chunk * sizeof *seqs);
    uint8_t *want = malloc((size_t)chunk);
    ekv_status rc = EKV_OK;
    if (!pos || !seqs || !want)
        rc = ekv_error_set(err, EKV_ENOMEM, "eval: out of memory");
    for (int32_t start = 0; start < n && !rc; start += chunk) {
        const int32_t m = n - start < chunk ? n - start : chunk;
        for (int32_t i = 0; i < m; i++) {
            pos[i] = pos0 + start + i;
            seqs[i] = s;
            want[i] = 1;
        }
        model_batch b = {.n = m, .tokens = tokens + start, .pos = pos, .seqs = seqs,
                         .want_logits = want};
        rc = model_forward(rt, &b, logits + (size_t)start * V, err);
    }
    free(pos);
    free(seqs);
    free(want);
    return rc;
}

static void scope_probe_fn(void *ctx, int32_t layer, int32_t row, int32_t kv_head,
                           const float *logits, const float *probs, int32_t n_q, int32_t n_tokens)
{
    (void)row;
    void **sp = ctx; /* {scope, seq} */
    kvc_scope_observe(sp[0], sp[1], layer, kv_head, logits, probs, n_q, n_tokens);
}

/* The mean of what s holds after each of the next n appended tokens, with
 * no eviction (what forward_decode measures step by step). */
static double mean_bytes_growing(const kv_seq *s, int32_t n)
{
    const kv_pool *pool = kv_seq_pool(s);
    const int64_t bt = kv_pool_block_tokens(pool), bb = (int64_t)kv_pool_block_bytes(pool);
    const int64_t fixed = kv_seq_packed_bytes(s);
    double sum = 0;
    for (int32_t i = 1; i <= n; i++) {
        int64_t blocks = 0;
        for (int32_t l = 0; l < kv_seq_n_layers(s); l++)
            for (int32_t h = 0; h < kv_seq_n_kv_heads(s); h++) {
                kern_kv_view v;
                kv_seq_view(s, l, h, &v);
                const int64_t in_blocks = v.n_tokens - (v.packed ? v.packed->n : 0);
                blocks += (in_blocks + i + bt - 1) / bt;
            }
        sum += (double)(fixed + blocks * bb);
    }
    return n ? sum / n : 0;
}

/* forward_all for a decode policy: one token per forward, SCOPE evicting
 * after each step's attention as in generation (decode step t = i). */
static ekv_status forward_decode(ekv_runtime *rt, kv_seq *s, const kvc_decode_policy *d,
                                 const int32_t *tokens, int32_t n, int32_t pos0, float *logits,
                                 eval_metrics *out, ekv_error *err)
{
    const int32_t V = model_config(model_runtime_model(rt))->n_vocab;
    kvc_scope *scope = kvc_scope_create(d, s, n, err);
    if (!scope)
        return err ? err->code : EKV_ENOMEM;
    void *sp[2] = {scope, s};
    const uint8_t row = 1;
    const model_probe probe = {.rows = &row, .fn = scope_probe_fn, .ctx = sp};
    ekv_status rc = EKV_OK;
    double bytes = 0;
    for (int32_t i = 0; i < n && !rc; i++) {
        const int32_t pos = pos0 + i;
        model_batch b = {.n = 1, .tokens = tokens + i, .pos = &pos, .seqs = &s, .probe = &probe};
        kvc_scope_begin(scope, i);
        rc = model_forward(rt, &b, logits + (size_t)i * V, err);
        if (!rc)
            rc = kvc_scope_status(scope, err);
        bytes += (double)kv_seq_bytes(s);
    }
    out->kv_bytes_mean = n ? bytes / n : 0;
    kvc_scope_free(scope);
    return rc;
}

/* log-softmax of n logits into out (double). */
static void log_softmax(const float *x, int32_t n, double *out)
{
    double mx = x[0], sum = 0;
    for (int32_t i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int32_t i = 0; i < n; i++)
        sum += exp(x[i] - mx);
    const double lse = mx + log(sum);
    for (int32_t i = 0; i < n; i++)
        out[i] = x[i] - lse;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* Perplexity of targets, KL to ref and top-1 agreement, over cont rows. */
static void score_rows(const float *logits, const float *ref, const int32_t *targets,
                       int32_t cont, int32_t V, double *lp, double *lq, eval_metrics *out)
{
    double nll = 0, kl = 0;
    int32_t agree = 0;
    for (int32_t i = 0; i < cont; i++) {
        const float *row = logits + (size_t)i * V, *rrow = ref + (size_t)i * V;
        log_softmax(rrow, V, lp);
        log_softmax(row, V, lq);
        nll -= lq[targets[i]];
        double k = 0;
        for (int32_t t = 0; t < V; t++)
            k += exp(lp[t]) * (lp[t] - lq[t]);
        kl += k;
        agree += argmax(row, V) == argmax(rrow, V);
    }
    out->ppl = exp(nll / cont);
    out->kl = kl / cont;
    out->top1 = (double)agree / cont;
}

ekv_status eval_ppl(ekv_runtime *rt, const int32_t *tokens, int32_t prefix, int32_t cont,
                    const eval_policy *pols, int n_pols, eval_metrics *out,
                    eval_progress_fn progress, void *pctx, ekv_error *err)
{
    const int32_t V = model_config(model_runtime_model(rt))->n_vocab;
    if (n_pols < 1 || pols[0].p.method != KVC_FULL)
        return ekv_error_set(err, EKV_EINVAL, "eval: the first policy must be full KV");
    prefilled p;
    ekv_status rc = prefill(rt, tokens, prefix, cont, &p, err);
    if (rc)
        return rc;
    float *ref = malloc((size_t)cont * V * sizeof *ref);
    float *logits = malloc((size_t)cont * V * sizeof *logits);
    double *lp = malloc((size_t)V * sizeof *lp), *lq = malloc((size_t)V * sizeof *lq);
    if (!ref || !logits || !lp || !lq) {
        rc = ekv_error_set(err, EKV_ENOMEM, "eval: out of memory");
        goto out;
    }
    for (int i = 0; i < n_pols && !rc; i++) {
        memset(&out[i], 0, sizeof out[i]);
        kv_seq *s = compressed_clone(rt, &p, &pols[i], &out[i], err);
        if (!s) {
            rc = err ? err->code : EKV_ENOMEM;
            break;
        }
        float *dst = i == 0 ? ref : logits;
        if (pols[i].p.decode.mode != KVC_DECODE_NONE) {
            rc = forward_decode(rt, s, &pols[i].p.decode, tokens + prefix, cont, prefix, dst,
                                &out[i], err);
        } else {
            /* recall decodes one token per forward, as generation does: a
             * row alone in its step ranks every K steps and promotes
             * (kvrecall.h); a teacher-forced batch would do neither */
            out[i].kv_bytes_mean = mean_bytes_growing(s, cont);
            rc = forward_all(rt, s, tokens + prefix, cont, prefix, dst,
                             pols[i].p.recall > 0 ? 1 : model_runtime_max_batch(rt), err);
        }
        out[i].kv_bytes_end = kv_seq_bytes(s);
        recall_metrics(s, cont, &out[i]);
        model_runtime_forget_seq(rt, s);
        kv_seq_free(s);
        if (!rc)
            score_rows(i == 0 ? ref : logits, ref, tokens + prefix + 1, cont, V, lp, lq, &out[i]);
        if (progress)
            progress(pctx, i + 1);
    }
out:
    free(ref);
    free(logits);
    free(lp);
    free(lq);
    prefilled_free(&p);
    return rc;
}

/* Greedy continuation of s from the prompt's last logits; the text goes to out. */
static ekv_status greedy(ekv_runtime *rt, kv_seq *s, const float *first_logits, int32_t pos0,
                         int32_t max_new, char *text, size_t cap, ekv_error *err)
{
    const ekv_model *m = model_runtime_model(rt);
    const ekv_tokenizer *tok = model_tokenizer(m);
    const int32_t V = model_config(m)->n_vocab;
    float *logits = malloc((size_t)V * sizeof *logits);
    if (!logits)
        return ekv_error_set(err, EKV_ENOMEM, "eval: out of memory");
    memcpy(logits, first_logits, (size_t)V * sizeof *logits);
    tok_stream ts;
    tok_stream_init(&ts, false);
    size_t len = 0;
    ekv_status rc = EKV_OK;
    for (int32_t i = 0; i < max_new && !rc && len + 512 < cap; i++) {
        int32_t id = argmax(logits, V);
        if (tok_is_eog(tok, id))
            break;
        len += tok_stream_push(&ts, tok, id, text + len, cap - len - 1);
        const int32_t pos = pos0 + i;
        model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &s};
        if (i + 1 < max_new)
            rc = model_forward(rt, &b, logits, err);
    }
    len += tok_stream_flush(&ts, text + len, cap - len - 1);
    text[len] = 0;
    free(logits);
    return rc;
}

/* True when the first run of digits in text is exactly key. */
static int first_number_is(const char *text, const char *key)
{
    while (*text && (*text < '0' || *text > '9'))
        text++;
    size_t n = 0;
    while (text[n] >= '0' && text[n] <= '9')
        n++;
    return n == strlen(key) && !strncmp(text, key, n);
}

ekv_status eval_passkey(ekv_runtime *rt, const int32_t *prompt, int32_t n, const char *key,
                        int32_t max_new, const eval_policy *pols, int n_pols, eval_metrics *out,
                        eval_progress_fn progress, void *pctx, ekv_error *err)
{
    prefilled p;
    ekv_status rc = prefill(rt, prompt, n, max_new, &p, err);
    if (rc)
        return rc;
    for (int i = 0; i < n_pols && !rc; i++) {
        memset(&out[i], 0, sizeof out[i]);
        kv_seq *s = compressed_clone(rt, &p, &pols[i], &out[i], err);
        if (!s) {
            rc = err ? err->code : EKV_ENOMEM;
            break;
        }
        char text[2048];
        rc = greedy(rt, s, p.logits, n, max_new, text, sizeof text, err);
        recall_metrics(s, max_new, &out[i]);
        model_runtime_forget_seq(rt, s);
        kv_seq_free(s);
        snprintf(out[i].answer, sizeof out[i].answer, "%.63s", text);
        out[i].passkey_ok = first_number_is(text, key);
        if (progress)
            progress(pctx, i + 1);
    }
    prefilled_free(&p);
    return rc;
}
