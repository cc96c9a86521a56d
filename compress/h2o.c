/*
 * h2o.c - the H2O-style unified eviction baseline of SCOPE's evaluation
 * (`--decode-method h2o`; shared/specs/scope.md section 4 "Baselines").
 *
 * Heavy hitters by ACCUMULATED attention (Zhang et al. 2023, "H2O"), not the
 * single-step logit SCOPE's reference code uses for its own "h2o" row (spec
 * pitfall 2): every decode step adds, to each token a KV head holds, the sum
 * over the head's query heads of this step's softmax probability
 * (kern_attention_probe's probs, from the one attention pass). "Unified":
 * prompt and generated tokens compete for the same slots, unlike SCOPE,
 * which never evicts the prefill pool.
 *
 * Memory equals SCOPE slide's: once the step's decode count reaches W (the
 * scope's `held` reaching its budget), each head keeps P + W tokens, P its
 * prefill length - the last R plus the top P + W - R of the others by
 * accumulated mass (ties to the older token), in position order.
 *
 * Deviations, in docs/COMPRESSION.md: accumulation starts at the first
 * decode step (the prefill's attention is not summed; H2O also scores the
 * prompt's rows); packed (SparK) prompt tokens cannot be dropped
 * (kv_seq_keep refuses), so they are protected like SCOPE's prefill pool and
 * H2O then ranks only the generated tokens.
 */
#include "compress_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct h2o_head {
    float *acc;      /* accumulated mass per held token, in cache order */
    int32_t n, cap;  /* tokens the head held after the last observe */
    int32_t fixed;   /* leading packed tokens: never candidates */
} h2o_head;

struct kvc_h2o {
    int32_t L, HKV;
    h2o_head *h;
    struct cand { float s; int32_t i; } *cand;
    int32_t *keep;
    uint8_t *mark;
    int32_t cap;
};

kvc_h2o *kvc_h2o_create(const kv_seq *seq, ekv_error *err)
{
    kvc_h2o *a = calloc(1, sizeof *a);
    if (!a)
        goto nomem;
    a->L = kv_seq_n_layers(seq);
    a->HKV = kv_seq_n_kv_heads(seq);
    if (!(a->h = calloc((size_t)a->L * a->HKV, sizeof *a->h)))
        goto nomem;
    for (int32_t l = 0; l < a->L; l++)
        for (int32_t k = 0; k < a->HKV; k++) {
            h2o_head *h = &a->h[l * a->HKV + k];
            kern_kv_view v;
            kv_seq_view(seq, l, k, &v);
            h->n = kv_seq_len(seq, l, k);
            h->fixed = v.packed ? v.packed->n : 0;
            h->cap = h->n + 64;
            if (!(h->acc = calloc((size_t)h->cap, sizeof *h->acc)))
                goto nomem;
        }
    return a;
nomem:
    kvc_h2o_free(a);
    ekv_error_set(err, EKV_ENOMEM, "h2o: out of memory");
    return NULL;
}

void kvc_h2o_free(kvc_h2o *a)
{
    if (!a)
        return;
    for (int32_t i = 0; a->h && i < a->L * a->HKV; i++)
        free(a->h[i].acc);
    free(a->h);
    free(a->cand);
    free(a->keep);
    free(a->mark);
    free(a);
}

/* Higher mass first, then the older token. */
static int cand_cmp(const void *x, const void *y)
{
    const struct cand *a = x, *b = y;
    if (a->s != b->s)
        return a->s > b->s ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

static ekv_status grow(kvc_h2o *a, h2o_head *h, int32_t n, ekv_error *err)
{
    if (n > h->cap) {
        float *acc = realloc(h->acc, (size_t)n * 2 * sizeof *acc);
        if (!acc)
            return ekv_error_set(err, EKV_ENOMEM, "h2o: out of memory");
        h->acc = acc;
        h->cap = n * 2;
    }
    if (n > a->cap) {
        const int32_t cap = n * 2;
        struct cand *c = realloc(a->cand, (size_t)cap * sizeof *c);
        if (c)
            a->cand = c;
        int32_t *kp = realloc(a->keep, (size_t)cap * sizeof *kp);
        if (kp)
            a->keep = kp;
        uint8_t *mk = realloc(a->mark, (size_t)cap);
        if (mk)
            a->mark = mk;
        if (!c || !kp || !mk)
            return ekv_error_set(err, EKV_ENOMEM, "h2o: out of memory");
        a->cap = cap;
    }
    return EKV_OK;
}

ekv_status kvc_h2o_observe(kvc_h2o *a, kv_seq *seq, int32_t layer, int32_t head,
                           const float *probs, int32_t n_q, int32_t n_tokens, int32_t keep_total,
                           int32_t recent, int64_t *evicted, ekv_error *err)
{
    h2o_head *h = &a->h[layer * a->HKV + head];
    if (n_tokens != h->n + 1 || n_tokens != kv_seq_len(seq, layer, head))
        return ekv_error_set(err, EKV_EINVAL,
                             "h2o: layer %d head %d attends over %d tokens, expected %d", layer,
                             head, n_tokens, h->n + 1);
    ekv_status rc = grow(a, h, n_tokens, err);
    if (rc)
        return rc;
    h->n = n_tokens;
    h->acc[n_tokens - 1] = 0; /* the token this step appended */
    for (int32_t j = 0; j < n_tokens; j++) {
        float s = 0;
        for (int32_t g = 0; g < n_q; g++)
            s += probs[(size_t)g * n_tokens + j];
        h->acc[j] += s;
    }
    const int32_t F = h->fixed, n_cand = n_tokens - recent - F, k = keep_total - recent - F;
    if (keep_total < 0 || n_cand <= k)
        return EKV_OK; /* no eviction this step, or nothing to evict */
    for (int32_t j = 0; j < n_cand; j++)
        a->cand[j] = (struct cand){h->acc[F + j], F + j};
    qsort(a->cand, (size_t)n_cand, sizeof *a->cand, cand_cmp);
    memset(a->mark, 0, (size_t)n_cand);
    for (int32_t j = 0; j < k; j++)
        a->mark[a->cand[j].i - F] = 1;
    int32_t n_keep = 0;
    for (int32_t i = 0; i < F; i++)
        a->keep[n_keep++] = i;
    for (int32_t j = 0; j < n_cand; j++)
        if (a->mark[j])
            a->keep[n_keep++] = F + j;
    for (int32_t i = n_tokens - recent; i < n_tokens; i++)
        a->keep[n_keep++] = i;
    if ((rc = kv_seq_keep(seq, layer, head, a->keep, n_keep, err)))
        return rc;
    for (int32_t i = 0; i < n_keep; i++) /* the masses follow their tokens */
        h->acc[i] = h->acc[a->keep[i]];
    h->n = n_keep;
    *evicted += n_tokens - n_keep;
    return EKV_OK;
}
