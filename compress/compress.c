/*
 * compress.c - recording a prompt's queries during prefill and compressing
 * its KV afterwards (see compress.h).
 *
 * During prefill the capture's tap keeps, per layer, the post-RoPE queries
 * of the last KVC_WINDOW prompt tokens (the observation window) and, when
 * the method needs online entropy, folds every query into a d x d Gram
 * matrix per query head, a window of KVC_ENTROPY_WINDOW tokens at a time.
 * After prefill, kvc_capture_compress asks the method for a budget per
 * (layer, KV head), computes each head's window scores and selection in
 * parallel, then applies the selections one head at a time (kv_seq_keep
 * returns blocks to the pool, which is single-threaded).
 */
#include "compress_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/generate.h"
#include "entrokv/kvrecall.h"

/* Prompt tokens whose queries are centred together for the entropy. */
#define KVC_ENTROPY_WINDOW 512

static const kvc_method *const methods[KVC_N_METHODS] = {
    [KVC_FULL] = &kvc_method_full,           [KVC_STREAMING] = &kvc_method_streaming,
    [KVC_SNAPKV] = &kvc_method_snapkv,       [KVC_PYRAMIDKV] = &kvc_method_pyramidkv,
    [KVC_UNCOMP] = &kvc_method_uncomp,
};

const char *kvc_method_name(kvc_method_id id)
{
    return id >= 0 && id < KVC_N_METHODS ? methods[id]->name : NULL;
}

ekv_status kvc_policy_parse(const char *method, double budget, kvc_policy *p, ekv_error *err)
{
    memset(p, 0, sizeof *p);
    p->method = KVC_N_METHODS;
    if (!method || !*method)
        p->method = KVC_FULL;
    for (int i = 0; method && *method && i < KVC_N_METHODS; i++)
        if (!strcmp(method, methods[i]->name))
            p->method = (kvc_method_id)i;
    if (p->method == KVC_N_METHODS)
        return ekv_error_set(err, EKV_EINVAL,
                             "unknown kv method '%.64s' (full, streaming, snapkv, pyramidkv, uncomp)",
                             method);
    if (!isfinite(budget) || budget <= 0)
        return ekv_error_set(err, EKV_EINVAL,
                             "kv budget must be a fraction in (0, 1] or a token count > 1, got %g",
                             budget);
    if (budget > 1 && (budget != floor(budget) || budget > 1e9))
        return ekv_error_set(err, EKV_EINVAL,
                             "kv budget above 1 is a whole number of tokens per head, got %g", budget);
    p->budget = budget;
    return EKV_OK;
}

static ekv_status mean_tokens(const kvc_policy *p, int32_t n_prompt, int32_t *mean,
                              ekv_error *err)
{
    if (p->method == KVC_FULL) {
        *mean = n_prompt;
        return EKV_OK;
    }
    if (p->budget > 1) {
        if (p->budget > n_prompt)
            return ekv_error_set(err, EKV_ERANGE,
                                 "kv budget of %.0f tokens per head exceeds the prompt (%d tokens)",
                                 p->budget, n_prompt);
        *mean = (int32_t)p->budget;
        return EKV_OK;
    }
    int32_t m = (int32_t)floor(p->budget * n_prompt + 0.5);
    *mean = m < 1 ? 1 : m > n_prompt ? n_prompt : m;
    return EKV_OK;
}

ekv_status kvc_policy_mean_tokens(const kvc_policy *p, int32_t n_prompt, int32_t *mean,
                                  ekv_error *err)
{
    ekv_status rc = mean_tokens(p, n_prompt, mean, err);
    if (rc || p->method == KVC_FULL || p->recall <= 0)
        return rc;
    if ((int64_t)p->recall * KVC_RECALL_BLOCK >= *mean)
        return ekv_error_set(err, EKV_ERANGE,
                             "recall of %d blocks (%d tokens per head) leaves no resident KV "
                             "from a budget of %d tokens per head",
                             p->recall, p->recall * KVC_RECALL_BLOCK, *mean);
    return EKV_OK;
}

ekv_status kvc_policy_check(const kvc_policy *p, ekv_error *err)
{
    const kvc_decode_policy *d = &p->decode;
    if ((int)d->mode < 0 || d->mode >= KVC_DECODE_N_MODES)
        return ekv_error_set(err, EKV_EINVAL, "unknown decode method %d", (int)d->mode);
    if (d->mode != KVC_DECODE_NONE && (d->recent < 1 || d->window <= d->recent || d->max_new < 0))
        return ekv_error_set(err, EKV_EINVAL,
                             "scope needs 1 <= recent < window (got recent %d, window %d)",
                             d->recent, d->window);
    if (!isfinite(p->spark.ratio) || p->spark.ratio < 0 || p->spark.ratio >= 1)
        return ekv_error_set(err, EKV_EINVAL, "spark ratio must be in [0, 1), got %g",
                             p->spark.ratio);
    if (p->spark.recovery != KVC_SPARK_AVG && p->spark.recovery != KVC_SPARK_ZERO)
        return ekv_error_set(err, EKV_EINVAL, "unknown spark recovery %d", (int)p->spark.recovery);
    if (p->recall < 0 || p->recall > KVC_RECALL_MAX)
        return ekv_error_set(err, EKV_EINVAL, "recall must be in [0, %d] blocks, got %d",
                             KVC_RECALL_MAX, p->recall);
    if (p->recall_channels < KVC_RECALL_BOX || p->recall_channels > KV_RECALL_CHANNELS_MAX)
        return ekv_error_set(err, EKV_EINVAL, "recall_channels must be in [%d, %d], got %d",
                             KVC_RECALL_BOX, KV_RECALL_CHANNELS_MAX, p->recall_channels);
    if (p->recall_gather < 0 || p->recall_gather > KV_RECALL_GATHER_MAX)
        return ekv_error_set(err, EKV_EINVAL, "recall_gather must be in [0, %d], got %d",
                             KV_RECALL_GATHER_MAX, p->recall_gather);
    if (p->recall_every < 0 || p->recall_every > KV_RECALL_EVERY_MAX)
        return ekv_error_set(err, EKV_EINVAL, "recall_every must be in [0, %d], got %d",
                             KV_RECALL_EVERY_MAX, p->recall_every);
    return EKV_OK;
}

int32_t kvc_policy_rows(const kvc_policy *p)
{
    if (p->spark.ratio > 0)
        return KVC_SPARK_WINDOW;
    return p->method != KVC_FULL ? KVC_WINDOW : 1;
}

struct kvc_capture {
    kvc_policy policy;
    const kvc_method *method;
    int32_t L, H, HKV, D; /* H, HKV: this rank's heads (model_shard) */
    int32_t HKV_all, kv0; /* the model's KV heads; this rank's first */
    int32_t shard_size;
    int32_t n_prompt, pos0, window;
    kv_seq *seq;
    model_tap tap;
    float *wq; /* [L][window][H][D] */
    int32_t spark_window;
    float *sq; /* SparK: [L][spark_window][H][D], the last 32 prompt queries */
    /* online entropy */
    bool want_entropy;
    float *ebuf;     /* [L][H][KVC_ENTROPY_WINDOW][D] */
    double *gram;    /* [L][H][D][D] */
    int32_t *folded;   /* per layer: prompt rows added to the Gram so far */
    int32_t *next_row; /* per layer: the prompt row expected next */
    float *entropy;  /* [L][H] once computed */
};

void kvc_capture_free(kvc_capture *c)
{
    if (!c)
        return;
    free(c->wq);
    free(c->sq);
    free(c->ebuf);
    free(c->gram);
    free(c->folded);
    free(c->next_row);
    free(c->entropy);
    free(c);
}

kvc_capture *kvc_capture_create(const kvc_policy *p, const ekv_model *m, int32_t n_prompt,
                                int32_t pos0, ekv_error *err)
{
    const model_shard whole = {.size = 1, .n_kv_heads = model_config(m)->n_kv_heads,
                               .n_heads = model_config(m)->n_heads};
    return kvc_capture_create_shard(p, m, &whole, n_prompt, pos0, err);
}

kvc_capture *kvc_capture_create_shard(const kvc_policy *p, const ekv_model *m,
                                      const model_shard *s, int32_t n_prompt, int32_t pos0,
                                      ekv_error *err)
{
    const ekv_model_config *cfg = model_config(m);
    if (p->method < 0 || p->method >= KVC_N_METHODS) {
        ekv_error_set(err, EKV_EINVAL, "kv policy: bad method %d", (int)p->method);
        return NULL;
    }
    if (n_prompt <= 0 || pos0 < 0) {
        ekv_error_set(err, EKV_EINVAL, "kv capture: prompt of %d tokens at %d", n_prompt, pos0);
        return NULL;
    }
    if (cfg->head_dim > KVC_MAX_HEAD_DIM) {
        ekv_error_set(err, EKV_EUNSUPPORTED, "kv compression: head_dim %d > %d", cfg->head_dim,
                      KVC_MAX_HEAD_DIM);
        return NULL;
    }
    kvc_capture *c = calloc(1, sizeof *c);
    if (!c)
        goto nomem;
    c->policy = *p;
    c->method = methods[p->method];
    c->L = cfg->n_layers;
    c->H = s->n_heads;
    c->HKV = s->n_kv_heads;
    c->HKV_all = cfg->n_kv_heads;
    c->kv0 = s->kv_head0;
    c->shard_size = s->size;
    c->D = cfg->head_dim;
    c->n_prompt = n_prompt;
    c->pos0 = pos0;
    c->window = n_prompt < KVC_WINDOW ? n_prompt : KVC_WINDOW;
    const size_t row = (size_t)c->H * c->D;
    if (c->method->needs_scores && !(c->wq = calloc((size_t)c->L * c->window * row, sizeof(float))))
        goto nomem;
    c->spark_window = n_prompt < KVC_SPARK_WINDOW ? n_prompt : KVC_SPARK_WINDOW;
    if (p->spark.ratio > 0 &&
        !(c->sq = calloc((size_t)c->L * c->spark_window * row, sizeof(float))))
        goto nomem;
    c->want_entropy = c->method->needs_entropy && !p->profile;
    if (c->want_entropy) {
        const int32_t ew = n_prompt < KVC_ENTROPY_WINDOW ? n_prompt : KVC_ENTROPY_WINDOW;
        c->ebuf = malloc((size_t)c->L * c->H * ew * c->D * sizeof(float));
        c->gram = calloc((size_t)c->L * c->H * c->D * c->D, sizeof(double));
        c->folded = calloc((size_t)c->L, sizeof(int32_t));
        c->next_row = calloc((size_t)c->L, sizeof(int32_t));
        if (!c->ebuf || !c->gram || !c->folded || !c->next_row)
            goto nomem;
    }
    return c;
nomem:
    kvc_capture_free(c);
    ekv_error_set(err, EKV_ENOMEM, "kv capture: out of memory");
    return NULL;
}

/* Adds the buffered rows [start, end) of the prompt to layer l's Grams. */
static void fold_window(kvc_capture *c, int32_t l, int32_t start, int32_t end)
{
    const int32_t ew = c->n_prompt < KVC_ENTROPY_WINDOW ? c->n_prompt : KVC_ENTROPY_WINDOW;
    for (int32_t h = 0; h < c->H; h++) {
        const float *rows = c->ebuf + ((size_t)l * c->H + h) * ew * c->D;
        kvc_gram_add(c->gram + ((size_t)l * c->H + h) * c->D * c->D, rows, end - start, c->D, c->D);
    }
    c->folded[l] = end;
}

static void capture_tap(void *ctx, int32_t layer, const model_batch *b, const float *q)
{
    kvc_capture *c = ctx;
    const size_t row = (size_t)c->H * c->D;
    const int32_t ew = c->n_prompt < KVC_ENTROPY_WINDOW ? c->n_prompt : KVC_ENTROPY_WINDOW;
    for (int32_t i = 0; i < b->n; i++) {
        if (model_batch_seq(b, i) != c->seq)
            continue;
        const int32_t idx = b->pos[i] - c->pos0;
        if (idx < 0 || idx >= c->n_prompt)
            continue;
        const float *qi = q + (size_t)i * row;
        const int32_t w0 = c->n_prompt - c->window;
        if (c->wq && idx >= w0)
            memcpy(c->wq + ((size_t)layer * c->window + (idx - w0)) * row, qi, row * sizeof(float));
        const int32_t s0 = c->n_prompt - c->spark_window;
        if (c->sq && idx >= s0)
            memcpy(c->sq + ((size_t)layer * c->spark_window + (idx - s0)) * row, qi,
                   row * sizeof(float));
        if (!c->want_entropy || idx != c->next_row[layer])
            continue; /* prefill rows arrive in prompt order, each once */
        c->next_row[layer]++;
        const int32_t slot = idx - c->folded[layer];
        for (int32_t h = 0; h < c->H; h++)
            memcpy(c->ebuf + (((size_t)layer * c->H + h) * ew + slot) * c->D, qi + (size_t)h * c->D,
                   (size_t)c->D * sizeof(float));
        if (slot == ew - 1 || idx == c->n_prompt - 1)
            fold_window(c, layer, c->folded[layer], idx + 1);
    }
}

const model_tap *kvc_capture_tap(kvc_capture *c, kv_seq *seq)
{
    if (!c->wq && !c->sq && !c->want_entropy)
        return NULL;
    c->seq = seq;
    c->tap.fn = capture_tap;
    c->tap.ctx = c;
    return &c->tap;
}

ekv_status kvc_capture_entropy(kvc_capture *c, const float **entropy, ekv_error *err)
{
    if (c->entropy) {
        *entropy = c->entropy;
        return EKV_OK;
    }
    if (!c->want_entropy)
        return ekv_error_set(err, EKV_EINVAL, "kv capture: this policy records no entropy");
    for (int32_t l = 0; l < c->L; l++)
        if (c->folded[l] != c->n_prompt)
            return ekv_error_set(err, EKV_EINVAL,
                                 "kv capture: layer %d saw %d of the %d prompt tokens", l,
                                 c->folded[l], c->n_prompt);
    float *e = malloc((size_t)c->L * c->H * sizeof *e);
    double *a = malloc((size_t)c->D * c->D * sizeof *a);
    ekv_status rc = EKV_OK;
    if (!e || !a) {
        rc = ekv_error_set(err, EKV_ENOMEM, "kv capture: out of memory");
        goto out;
    }
    for (int32_t i = 0; i < c->L * c->H && !rc; i++) {
        double v = 0;
        memcpy(a, c->gram + (size_t)i * c->D * c->D, (size_t)c->D * c->D * sizeof *a);
        rc = kvc_entropy(a, c->D, kvc_entropy_rank(c->D), &v, err);
        e[i] = (float)v;
    }
    if (!rc) {
        c->entropy = e;
        e = NULL;
        *entropy = c->entropy;
    }
out:
    free(e);
    free(a);
    return rc;
}

ekv_status kvc_capture_set_policy(kvc_capture *c, const kvc_policy *p, ekv_error *err)
{
    if (p->method < 0 || p->method >= KVC_N_METHODS)
        return ekv_error_set(err, EKV_EINVAL, "kv policy: bad method %d", (int)p->method);
    const kvc_method *m = methods[p->method];
    if (m->needs_scores && !c->wq)
        return ekv_error_set(err, EKV_EINVAL, "kv capture: %s needs the window queries", m->name);
    if (m->needs_entropy && !p->profile && !c->want_entropy)
        return ekv_error_set(err, EKV_EINVAL, "kv capture: %s needs the prompt's entropy", m->name);
    if (p->spark.ratio > 0 && !c->sq)
        return ekv_error_set(err, EKV_EINVAL, "kv capture: spark needs the window queries");
    c->policy = *p;
    c->method = m;
    return EKV_OK;
}

/* ---- compression ---- */

typedef struct select_task {
    kvc_capture *c;
    const kvc_ctx *ctx;
    kv_seq *seq;
    const int32_t *budget;
    const int64_t *offset; /* into keep */
    int32_t *keep;
    float *scratch;        /* per thread */
    size_t scratch_floats;
    int32_t q_pos[KVC_WINDOW];
} select_task;

static void task_select(void *p, int ith, int nth)
{
    select_task *t = p;
    kvc_capture *c = t->c;
    const int32_t n = t->ctx->n_tokens, G = c->H / c->HKV;
    float *scores = t->scratch + (size_t)ekv_pool_thread_index() * t->scratch_floats;
    float *work = scores + n;
    for (long item = ith; item < (long)c->L * c->HKV; item += nth) {
        const int32_t l = (int32_t)(item / c->HKV), g = (int32_t)(item % c->HKV);
        if (t->budget[item] >= n)
            continue;
        if (c->method->needs_scores) {
            /* a budget under 2 windows shrinks the window to budget / 2, and
             * only its queries score (specs/uncomp.md section 3 step 1) */
            const int32_t w = t->budget[item] / 2 < c->window ? t->budget[item] / 2 : c->window;
            const int32_t skip = c->window - w;
            kern_kv_view view;
            kv_seq_view(t->seq, l, g, &view);
            const size_t row = (size_t)c->H * c->D;
            kvc_window_scores(&view,
                              c->wq + ((size_t)l * c->window + skip) * row + (size_t)g * G * c->D,
                              row, w, G, t->q_pos + skip, scores, work);
        }
        c->method->select(t->ctx, c->method->needs_scores ? scores : NULL, t->budget[item],
                          t->keep + t->offset[item], work);
    }
}

/* kv_entropy[L][HKV_all]: every KV head's entropy. Under tensor
 * parallelism each rank measures its own heads and the ranks allgather
 * them, so all derive the same budgets. A rank's block is padded to the
 * largest rank's head count (allgather moves equal blocks). */
static ekv_status kv_entropy_of(kvc_capture *c, ekv_comm *comm, float *kv_entropy, ekv_error *err)
{
    const float *e;
    ekv_status rc = kvc_capture_entropy(c, &e, err);
    if (rc)
        return rc;
    const int32_t G = c->H / c->HKV;
    const int32_t np = comm ? comm_size(comm) : 1;
    const int32_t per = (c->HKV_all + np - 1) / np; /* the most any rank holds */
    float *mine = calloc((size_t)c->L * per, sizeof *mine);
    float *all = calloc((size_t)c->L * per * np, sizeof *all);
    if (!mine || !all) {
        rc = ekv_error_set(err, EKV_ENOMEM, "kv compress: out of memory");
        goto out;
    }
    for (int32_t l = 0; l < c->L; l++)
        for (int32_t g = 0; g < c->HKV; g++) {
            double s = 0;
            for (int32_t i = 0; i < G; i++)
                s += e[l * c->H + g * G + i];
            mine[l * per + g] = (float)(s / G); /* deviation 1: mean of the group */
        }
    const size_t bytes = (size_t)c->L * per * sizeof *mine;
    if (comm && np > 1)
        rc = comm_allgather(comm, mine, bytes, all, err);
    else
        memcpy(all, mine, bytes);
    if (rc)
        goto out;
    /* rank r's heads start where the ranks before it end (model_shard_plan) */
    for (int32_t r = 0, h0 = 0; r < np; r++) {
        const int32_t nr = c->HKV_all / np + (r < c->HKV_all % np);
        for (int32_t l = 0; l < c->L; l++)
            for (int32_t g = 0; g < nr; g++)
                kv_entropy[l * c->HKV_all + h0 + g] = all[((size_t)r * c->L + l) * per + g];
        h0 += nr;
    }
out:
    free(mine);
    free(all);
    return rc;
}

ekv_status kvc_capture_compress(kvc_capture *c, ekv_runtime *rt, kv_seq *seq, kvc_report *rep,
                                ekv_error *err)
{
    const double t0 = gen_now();
    /* nh: this rank's heads; na: the model's, over which budgets are split */
    const int32_t n = kv_seq_len(seq, 0, 0), nh = c->L * c->HKV, na = c->L * c->HKV_all;
    const model_shard *sh = model_runtime_shard(rt);
    ekv_comm *comm = model_runtime_comm(rt);
    memset(rep, 0, sizeof *rep);
    rep->n_prompt = c->n_prompt;
    rep->blocks_before = rep->blocks_after = kv_seq_blocks(seq);
    rep->bytes_before = rep->bytes_tokens = rep->bytes_after = kv_seq_bytes(seq);
    for (int32_t i = 0; i < nh; i++)
        if (kv_seq_len(seq, i / c->HKV, i % c->HKV) != n)
            return ekv_error_set(err, EKV_EINVAL, "kv compress: heads hold different lengths");
    if (n < c->n_prompt)
        return ekv_error_set(err, EKV_EINVAL, "kv compress: %d tokens held, prompt has %d", n,
                             c->n_prompt);
    if (sh->size != c->shard_size || sh->kv_head0 != c->kv0 || sh->n_kv_heads != c->HKV)
        return ekv_error_set(err, EKV_EINVAL, "kv compress: the capture's shard is not the runtime's");
    kvc_ctx ctx = {.n_layers = c->L, .n_kv_heads = c->HKV_all, .n_tokens = n,
                   .profile = c->policy.profile};
    ekv_status rc = kvc_policy_mean_tokens(&c->policy, n, &ctx.mean, err);
    if (rc)
        return rc;
    if (c->policy.recall > 0 && c->policy.method != KVC_FULL) {
        /* the recall buffer comes out of the budget; what is dropped from
         * here on goes to the sequence's recall store */
        if (kv_pool_block_tokens(kv_seq_pool(seq)) != KVC_RECALL_BLOCK)
            return ekv_error_set(err, EKV_EINVAL, "kv recall needs %d-token blocks",
                                 KVC_RECALL_BLOCK);
        ctx.mean -= c->policy.recall * KVC_RECALL_BLOCK;
        if ((rc = kv_seq_recall_enable(seq, c->policy.recall, err)) ||
            (rc = kv_recall_set_mode(kv_seq_recall(seq),
                                     c->policy.recall_every ? c->policy.recall_every : 1,
                                     !c->policy.recall_no_promote, err)) ||
            (c->policy.recall_channels &&
             (rc = kv_recall_set_channels(kv_seq_recall(seq),
                                          c->policy.recall_channels == KVC_RECALL_BOX
                                              ? 0
                                              : c->policy.recall_channels,
                                          err))) ||
            (rc = kv_recall_set_gather(kv_seq_recall(seq), c->policy.recall_gather, err)))
            return rc;
    }
    ctx.total = (int64_t)ctx.mean * na;
    rep->budget_total = ctx.total;
    int32_t *budget = malloc((size_t)na * sizeof *budget);
    int64_t *offset = malloc((size_t)(nh + 1) * sizeof *offset);
    float *kv_entropy = NULL;
    int32_t *keep = NULL;
    select_task t = {.c = c, .ctx = &ctx, .seq = seq, .budget = budget, .offset = offset};
    if (!budget || !offset) {
        rc = ekv_error_set(err, EKV_ENOMEM, "kv compress: out of memory");
        goto out;
    }
    if (c->method->needs_entropy && !c->policy.profile) {
        if (!(kv_entropy = malloc((size_t)na * sizeof *kv_entropy))) {
            rc = ekv_error_set(err, EKV_ENOMEM, "kv compress: out of memory");
            goto out;
        }
        if ((rc = kv_entropy_of(c, comm, kv_entropy, err)))
            goto out;
        ctx.kv_entropy = kv_entropy;
    }
    c->method->allocate(&ctx, budget);
    /* every rank allocated over all heads; keep this rank's, [L][HKV] */
    if (c->HKV != c->HKV_all)
        for (int32_t l = 0; l < c->L; l++)
            memmove(budget + (size_t)l * c->HKV, budget + (size_t)l * c->HKV_all + c->kv0,
                    (size_t)c->HKV * sizeof *budget);
    offset[0] = 0;
    for (int32_t i = 0; i < nh; i++)
        offset[i + 1] = offset[i] + (budget[i] < n ? budget[i] : 0);
    ekv_pool *pool = model_runtime_pool(rt);
    const int32_t G = c->H / c->HKV;
    t.scratch_floats = (size_t)n * (1 + 2 + (size_t)c->window * G);
    keep = malloc((size_t)(offset[nh] ? offset[nh] : 1) * sizeof *keep);
    t.keep = keep;
    t.scratch = malloc((size_t)ekv_pool_size(pool) * t.scratch_floats * sizeof(float));
    if (!keep || !t.scratch) {
        rc = ekv_error_set(err, EKV_ENOMEM, "kv compress: out of memory");
        goto out;
    }
    for (int32_t r = 0; r < c->window; r++)
        t.q_pos[r] = c->pos0 + c->n_prompt - c->window + r;
    ekv_pool_run(pool, task_select, &t);
    for (int32_t i = 0; i < nh && !rc; i++)
        if (budget[i] < n)
            rc = kv_seq_keep(seq, i / c->HKV, i % c->HKV, keep + offset[i], budget[i], err);
    rep->kept_total = 0;
    for (int32_t i = 0; i < nh; i++)
        rep->kept_total += kv_seq_len(seq, i / c->HKV, i % c->HKV);
    rep->bytes_tokens = kv_seq_bytes(seq);
    if (!rc && c->policy.spark.ratio > 0)
        rc = kvc_spark_apply(&c->policy.spark, seq, c->sq, c->spark_window, c->H, err);
    rep->blocks_after = kv_seq_blocks(seq);
    rep->bytes_after = kv_seq_bytes(seq);
out:
    rep->seconds = gen_now() - t0;
    free(budget);
    free(offset);
    free(kv_entropy);
    free(keep);
    free(t.scratch);
    return rc;
}
