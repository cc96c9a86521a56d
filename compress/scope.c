/*
 * scope.c - SCOPE decode-phase compression of one sequence
 * (shared/specs/scope.md; docs/COMPRESSION.md says where entrokv deviates).
 *
 * The cache of each (layer, KV head) is [prefill pool | decode pool]; the
 * prefill pool is whatever the prefill policy kept, and its true length per
 * head is recorded when the scope is created (spec pitfall 1: the reference
 * protects the configured capacity instead). The decode pool holds at most
 * B(t) tokens after a step that evicts: the top B(t) - R earlier generated
 * tokens by this step's attention logit and the R newest (the token just
 * appended included). The step's attention has already run on the
 * uncompressed cache when the selection happens (spec section 3 step 2), so
 * eviction only changes later steps; the logits are those that attention
 * pass computed (kern_attention_probe), not a second pass.
 *
 * Every head of a sequence appends one token per step and is trimmed to the
 * same B(t), so the decode pool's size is one number per sequence (`held`)
 * and the per-step decision (evict or not; the discontinuous gate) is made
 * once per token in kvc_scope_begin, with counters that belong to this
 * sequence alone (pitfall 4).
 *
 * GQA (pitfall 3): one decode pool per KV head; a candidate's score is the
 * maximum over the head's query heads of its logit. Ties go to the older
 * token (the reference's torch.topk order is unspecified). Survivors stay in
 * position order; the reference gathers them in score order, which attention
 * does not see (RoPE is applied before caching).
 *
 * "recent" is a baseline at the same memory as slide: the decode pool keeps
 * only its W newest tokens (a sliding window over generated text, the
 * prefill pool untouched), so SCOPE's selection can be compared with none.
 * "h2o" is the unified-eviction baseline at the same memory as slide
 * (h2o.c): accumulated attention mass, prompt and generated tokens ranked
 * together; it reads every step's probabilities, not only the evicting
 * steps' logits.
 */
#include "compress_internal.h"

#include <stdlib.h>
#include <string.h>

static const char *const decode_names[KVC_DECODE_N_MODES] = {
    [KVC_DECODE_NONE] = "none",
    [KVC_DECODE_SLIDE] = "scope-slide",
    [KVC_DECODE_ADAPTIVE] = "scope-adaptive",
    [KVC_DECODE_DISCONTINUOUS] = "scope-discontinuous",
    [KVC_DECODE_RECENT] = "recent",
    [KVC_DECODE_H2O] = "h2o",
};

const char *kvc_decode_name(kvc_decode_mode mode)
{
    return mode >= 0 && mode < KVC_DECODE_N_MODES ? decode_names[mode] : NULL;
}

ekv_status kvc_decode_parse(const char *name, int32_t recent, int32_t window,
                            kvc_decode_policy *d, ekv_error *err)
{
    memset(d, 0, sizeof *d);
    d->mode = KVC_DECODE_N_MODES;
    if (!name || !*name)
        d->mode = KVC_DECODE_NONE;
    for (int i = 0; name && *name && i < KVC_DECODE_N_MODES; i++)
        if (!strcmp(name, decode_names[i]))
            d->mode = (kvc_decode_mode)i;
    if (d->mode == KVC_DECODE_N_MODES)
        return ekv_error_set(err, EKV_EINVAL,
                             "unknown decode method '%.64s' (none, scope-slide, scope-adaptive, "
                             "scope-discontinuous, recent, h2o)",
                             name);
    if (d->mode == KVC_DECODE_NONE)
        return EKV_OK;
    if (recent < 1 || window <= recent || window > (1 << 24))
        return ekv_error_set(err, EKV_EINVAL,
                             "scope needs 1 <= recent < window (got recent %d, window %d)", recent,
                             window);
    d->recent = recent;
    d->window = window;
    return EKV_OK;
}

int32_t kvc_scope_delta(const kvc_decode_policy *d, int32_t t_out)
{
    const int64_t num = (int64_t)t_out - d->recent, den = (int64_t)d->window - d->recent;
    const int64_t delta = den > 0 ? num / den : 0; /* num < 0: floor is <= 0 anyway */
    return delta < 1 ? 1 : (int32_t)(delta > INT32_MAX ? INT32_MAX : delta);
}

int32_t kvc_scope_budget(const kvc_decode_policy *d, int32_t delta, int32_t t)
{
    if (d->mode == KVC_DECODE_SLIDE || d->mode == KVC_DECODE_RECENT || d->mode == KVC_DECODE_H2O)
        return d->window;
    return d->recent + t / delta;
}

struct kvc_scope {
    kvc_decode_policy d;
    int32_t L, HKV;
    int32_t *prefill;  /* [layer][head]: true prefill pool length */
    int32_t delta;
    int32_t held;      /* decode tokens per head after the last step */
    int32_t skip;      /* discontinuous: over-budget steps skipped since the last top-k */
    int32_t budget;    /* B(t) of this step */
    bool evict;        /* this step runs the selection */
    int32_t step_held; /* decode tokens per head this step attends over */
    kvc_scope_stats st;
    kvc_h2o *h2o;      /* h2o mode: the accumulated masses */
    /* selection scratch */
    struct cand { float s; int32_t i; } *cand;
    int32_t *keep;
    uint8_t *mark;
    int32_t cap;
    ekv_status rc;
    ekv_error err;
};

kvc_scope *kvc_scope_create(const kvc_decode_policy *d, const kv_seq *seq, int32_t max_new,
                            ekv_error *err)
{
    if (d->mode <= KVC_DECODE_NONE || d->mode >= KVC_DECODE_N_MODES || d->recent < 1 ||
        d->window <= d->recent) {
        ekv_error_set(err, EKV_EINVAL, "scope: bad decode policy (mode %d, recent %d, window %d)",
                      (int)d->mode, d->recent, d->window);
        return NULL;
    }
    kvc_scope *s = calloc(1, sizeof *s);
    if (!s)
        goto nomem;
    s->d = *d;
    s->L = kv_seq_n_layers(seq);
    s->HKV = kv_seq_n_kv_heads(seq);
    if (!(s->prefill = malloc((size_t)s->L * s->HKV * sizeof *s->prefill)))
        goto nomem;
    for (int32_t l = 0; l < s->L; l++)
        for (int32_t h = 0; h < s->HKV; h++)
            s->prefill[l * s->HKV + h] = kv_seq_len(seq, l, h);
    s->delta = kvc_scope_delta(d, d->max_new > 0 ? d->max_new : max_new);
    s->st.delta = s->delta;
    if (d->mode == KVC_DECODE_H2O && !(s->h2o = kvc_h2o_create(seq, err))) {
        kvc_scope_free(s);
        return NULL;
    }
    return s;
nomem:
    kvc_scope_free(s);
    ekv_error_set(err, EKV_ENOMEM, "scope: out of memory");
    return NULL;
}

void kvc_scope_free(kvc_scope *s)
{
    if (!s)
        return;
    free(s->prefill);
    kvc_h2o_free(s->h2o);
    free(s->cand);
    free(s->keep);
    free(s->mark);
    free(s);
}

void kvc_scope_begin(kvc_scope *s, int32_t t)
{
    s->held++; /* this step appends one token to every head */
    s->step_held = s->held;
    if (s->held > s->st.decode_peak)
        s->st.decode_peak = s->held;
    s->budget = kvc_scope_budget(&s->d, s->delta, t);
    s->st.budget = s->budget;
    s->evict = false;
    if (s->held < s->budget) /* spec section 3 step 3 */
        return;
    if (s->d.mode == KVC_DECODE_DISCONTINUOUS && s->skip < s->delta) {
        s->skip++; /* the cache grows by one, no top-k */
        return;
    }
    s->evict = true;
    s->skip = 0;
    s->held = s->budget;
    s->st.topk_calls++;
}

/* Higher score first, then the older token. */
static int cand_cmp(const void *a, const void *b)
{
    const struct cand *x = a, *y = b;
    if (x->s != y->s)
        return x->s > y->s ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static void fail(kvc_scope *s, ekv_status rc, const ekv_error *e)
{
    if (s->rc)
        return;
    s->rc = rc;
    s->err = *e;
}

void kvc_scope_observe(kvc_scope *s, kv_seq *seq, int32_t layer, int32_t head,
                       const float *logits, const float *probs, int32_t n_q, int32_t n_tokens)
{
    if (s->rc || (!s->evict && !s->h2o))
        return;
    ekv_error e = {0};
    const int32_t P = s->prefill[layer * s->HKV + head], R = s->d.recent;
    if (s->h2o) { /* accumulates every step; evicts down to P + W on evicting steps */
        const ekv_status rc =
            kvc_h2o_observe(s->h2o, seq, layer, head, probs, n_q, n_tokens,
                            s->evict ? P + s->budget : -1, R, &s->st.evicted, &e);
        if (rc)
            fail(s, rc, &e);
        return;
    }
    if (n_tokens != kv_seq_len(seq, layer, head) || n_tokens - P != s->step_held) {
        ekv_error_set(&e, EKV_EINVAL,
                      "scope: layer %d head %d holds %d decode tokens, expected %d", layer, head,
                      n_tokens - P, s->step_held);
        fail(s, EKV_EINVAL, &e);
        return;
    }
    const int32_t n_cand = n_tokens - R - P, k = s->budget - R;
    if (n_cand <= k)
        return; /* nothing to evict (the pool just reached its budget) */
    if (n_tokens > s->cap) {
        const int32_t cap = n_tokens * 2;
        struct cand *c = realloc(s->cand, (size_t)cap * sizeof *c);
        if (c)
            s->cand = c;
        int32_t *kp = realloc(s->keep, (size_t)cap * sizeof *kp);
        if (kp)
            s->keep = kp;
        uint8_t *mk = realloc(s->mark, (size_t)cap);
        if (mk)
            s->mark = mk;
        if (!c || !kp || !mk) {
            ekv_error_set(&e, EKV_ENOMEM, "scope: out of memory");
            fail(s, EKV_ENOMEM, &e);
            return;
        }
        s->cap = cap;
    }
    for (int32_t j = 0; j < n_cand; j++) {
        float m = logits[P + j];
        if (s->d.mode == KVC_DECODE_RECENT) { /* the baseline: the newest win */
            s->cand[j] = (struct cand){(float)j, P + j};
            continue;
        }
        for (int32_t g = 1; g < n_q; g++) {
            const float v = logits[(size_t)g * n_tokens + P + j];
            m = v > m ? v : m;
        }
        s->cand[j] = (struct cand){m, P + j};
    }
    qsort(s->cand, (size_t)n_cand, sizeof *s->cand, cand_cmp);
    /* the kept candidates, back in position order */
    uint8_t *mark = s->mark; /* mark[j]: candidate P + j is kept */
    memset(mark, 0, (size_t)n_cand);
    for (int32_t j = 0; j < k; j++)
        mark[s->cand[j].i - P] = 1;
    int32_t n_keep = 0;
    int32_t *keep = s->keep;
    for (int32_t i = 0; i < P; i++)
        keep[n_keep++] = i;
    for (int32_t j = 0; j < n_cand; j++)
        if (mark[j])
            keep[n_keep++] = P + j;
    for (int32_t i = n_tokens - R; i < n_tokens; i++)
        keep[n_keep++] = i;
    const ekv_status rc = kv_seq_keep(seq, layer, head, keep, n_keep, &e);
    if (rc) {
        fail(s, rc, &e);
        return;
    }
    s->st.evicted += n_tokens - n_keep;
}

ekv_status kvc_scope_status(const kvc_scope *s, ekv_error *err)
{
    if (s->rc && err)
        *err = s->err;
    return s->rc;
}

void kvc_scope_get_stats(const kvc_scope *s, kvc_scope_stats *st)
{
    *st = s->st;
    st->decode_held = s->held;
}
