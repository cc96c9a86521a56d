/*
 * llama.c - the Llama forward pass over a batch of rows with paged KV.
 *
 * Per layer (Touvron et al. 2023, with GQA from Ainslie et al. 2023):
 *   h = x + Wo . attn(rope(Wq . n1(x)), rope(Wk . n1(x)), Wv . n1(x))
 *   x = h + Wdown . (silu(Wgate . n2(h)) * (Wup . n2(h)))
 * with n1, n2 RMSNorm. Matrix products run over all rows at once (prefill is
 * matrix-matrix); attention runs per (row, KV head), covering the query heads
 * that share that KV head, over the head's own block list.
 */
#include "model_internal.h"

#include "backend.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/kernels.h"
#include "entrokv/kvrecall.h"

struct ekv_runtime {
    const ekv_model *m;
    ekv_pool *pool;
    /* tensor parallelism (shard.c): this rank's heads and MLP rows, the
     * views of its share of each layer, and the group (NULL: one rank) */
    model_shard sh;
    ekv_layer *layers;
    ekv_comm *comm;
    int32_t max_batch;
    int32_t max_ctx;
    /* activations, max_batch rows each */
    float *x, *xb, *q, *k, *v, *att, *gate, *up;
    float *scores; /* KERN_ATTN_SCRATCH(scores_ctx) floats per thread */
    int32_t scores_ctx; /* max_ctx, more while recall blocks join a view */
    /* recall (kvrecall.h): per thread, recall_bytes of view scratch then
     * recall_probe floats where a probed row's attention over its recalled
     * blocks lands before the resident part is copied out */
    uint8_t *recall_buf;
    size_t recall_bytes, recall_probe;
    /* per row: 1 when it is its recalling sequence's only row (a decode
     * step): it tracks its selection and its attention mass promotes */
    uint8_t *recall_track;
    void *mm_scratch;
    size_t mm_scratch_bytes;
    /* decode attention split across the threads (split_plan): 0 off, 1 on
     * from SPLIT_MIN_TOKENS per item, 2 always (EKV_ATTN_SPLIT) */
    int attn_split;
    /* model_probe: per (row, KV head) of the batch, the offset of its
     * [2][G][n_tokens] logits and probabilities in probe_buf (-1: not probed) */
    int64_t *probe_off;
    float *probe_buf;
    size_t probe_cap; /* floats */
    /* NULL: the CPU forward below; else the device backend (backend.h) */
    const model_backend *backend;
    void *backend_state;
};

static void *alloc_floats(size_t n)
{
    return aligned_alloc(64, ((n * sizeof(float)) + 63) & ~(size_t)63);
}

ekv_runtime *model_runtime_create(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                  int n_threads, ekv_error *err)
{
    return model_runtime_create_tp(m, max_batch, max_ctx, n_threads, NULL, err);
}

ekv_runtime *model_runtime_create_tp(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                     int n_threads, ekv_comm *comm, ekv_error *err)
{
    const ekv_model_config *c = &m->cfg;
    if (max_batch <= 0 || max_batch > 65536 || max_ctx <= 0 || max_ctx > (1 << 24)) {
        ekv_error_set(err, EKV_EINVAL, "runtime: max_batch %d / max_ctx %d out of range",
                      max_batch, max_ctx);
        return NULL;
    }
    ekv_runtime *rt = calloc(1, sizeof *rt);
    if (!rt)
        goto nomem;
    rt->m = m;
    rt->comm = comm && comm_size(comm) > 1 ? comm : NULL;
    if (model_shard_plan(m, comm ? comm_rank(comm) : 0, comm ? comm_size(comm) : 1, &rt->sh, err))
        goto fail;
    if (!(rt->layers = malloc((size_t)c->n_layers * sizeof *rt->layers)))
        goto nomem;
    model_shard_layers(m, &rt->sh, rt->layers);
    rt->max_batch = max_batch;
    rt->max_ctx = max_ctx;
    rt->pool = ekv_pool_create(n_threads, err);
    if (!rt->pool)
        goto fail;
    /* activations of this rank's heads and MLP rows only */
    const size_t B = (size_t)max_batch, E = c->n_embd, F = rt->sh.n_ff;
    const size_t Q = (size_t)rt->sh.n_heads * c->head_dim;
    const size_t KV = (size_t)rt->sh.n_kv_heads * c->head_dim;
    rt->x = alloc_floats(B * E);
    rt->xb = alloc_floats(B * (E > Q ? E : Q));
    rt->q = alloc_floats(B * Q);
    rt->k = alloc_floats(B * KV);
    rt->v = alloc_floats(B * KV);
    rt->att = alloc_floats(B * Q);
    rt->gate = alloc_floats(B * F);
    rt->up = alloc_floats(B * F);
    rt->scores = alloc_floats((size_t)ekv_pool_size(rt->pool) * KERN_ATTN_SCRATCH(max_ctx));
    rt->scores_ctx = max_ctx;
    const char *split_env = getenv("EKV_ATTN_SPLIT");
    rt->attn_split = !split_env ? 1 : !strcmp(split_env, "0") ? 0 : !strcmp(split_env, "2") ? 2 : 1;
    /* the largest scratch any of the model's matrix products needs */
    for (int32_t l = 0; l < c->n_layers; l++) {
        const ekv_layer *L = &rt->layers[l];
        const ekv_weight *lw[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof lw / sizeof lw[0]; i++) {
            size_t s = kern_matmul_scratch_bytes(lw[i]->type, max_batch, lw[i]->n_cols);
            if (s > rt->mm_scratch_bytes)
                rt->mm_scratch_bytes = s;
        }
    }
    size_t so = kern_matmul_scratch_bytes(m->output.type, max_batch, m->output.n_cols);
    if (so > rt->mm_scratch_bytes)
        rt->mm_scratch_bytes = so;
    if (rt->mm_scratch_bytes) /* F32-only models need none */
        rt->mm_scratch = aligned_alloc(64, (rt->mm_scratch_bytes + 63) & ~(size_t)63);
    if (!rt->x || !rt->xb || !rt->q || !rt->k || !rt->v || !rt->att || !rt->gate || !rt->up ||
        !rt->scores || (rt->mm_scratch_bytes && !rt->mm_scratch))
        goto nomem;
    return rt;
nomem:
    ekv_error_set(err, EKV_ENOMEM, "runtime: out of memory (batch %d)", max_batch);
fail:
    model_runtime_free(rt);
    return NULL;
}

void model_runtime_free(ekv_runtime *rt)
{
    if (!rt)
        return;
    if (rt->backend)
        rt->backend->destroy(rt->backend_state);
    ekv_pool_destroy(rt->pool);
    free(rt->layers);
    free(rt->x);
    free(rt->xb);
    free(rt->q);
    free(rt->k);
    free(rt->v);
    free(rt->att);
    free(rt->gate);
    free(rt->up);
    free(rt->scores);
    free(rt->mm_scratch);
    free(rt->probe_off);
    free(rt->probe_buf);
    free(rt->recall_buf);
    free(rt->recall_track);
    free(rt);
}

ekv_pool *model_runtime_pool(ekv_runtime *rt) { return rt->pool; }
int32_t model_runtime_max_batch(const ekv_runtime *rt) { return rt->max_batch; }
int32_t model_runtime_max_ctx(const ekv_runtime *rt) { return rt->max_ctx; }
const ekv_model *model_runtime_model(const ekv_runtime *rt) { return rt->m; }
const model_shard *model_runtime_shard(const ekv_runtime *rt) { return &rt->sh; }
ekv_comm *model_runtime_comm(const ekv_runtime *rt) { return rt->comm; }

void model_runtime_set_backend(ekv_runtime *rt, const model_backend *be, void *state)
{
    rt->backend = be;
    rt->backend_state = state;
}

const char *model_runtime_device(const ekv_runtime *rt)
{
    return rt->backend ? rt->backend->name : "cpu";
}

void model_runtime_forget_seq(ekv_runtime *rt, const kv_seq *seq)
{
    if (rt && rt->backend && seq)
        rt->backend->forget_seq(rt->backend_state, seq);
}

/* Sums the ranks' partial products of a row-split projection (n rows of
 * n_embd); nothing with one rank. */
static ekv_status allreduce_rows(ekv_runtime *rt, float *buf, int32_t n, ekv_error *err)
{
    if (!rt->comm)
        return EKV_OK;
    return comm_allreduce_sum_f32(rt->comm, buf, (size_t)n * rt->m->cfg.n_embd, err);
}

static ekv_status matmul(ekv_runtime *rt, const ekv_weight *w, const float *x, int32_t n_rows,
                         float *y, ekv_error *err)
{
    return kern_matmul(rt->pool, w->data, w->type, w->n_rows, w->n_cols, w->stride, x, n_rows, y, w->n_rows,
                       rt->mm_scratch, err);
}

/* ---- row-parallel element-wise steps ---- */

typedef struct rows_task {
    ekv_runtime *rt;
    const model_batch *b;
    const float *norm_w; /* rmsnorm weights (norm step) */
    int32_t layer;       /* attention step */
} rows_task;

static void task_norm(void *p, int ith, int nth)
{
    rows_task *t = p;
    const ekv_model_config *c = &t->rt->m->cfg;
    long lo, hi;
    ekv_split_range(t->b->n, ith, nth, &lo, &hi);
    for (long i = lo; i < hi; i++)
        kern_rmsnorm(t->rt->xb + i * c->n_embd, t->rt->x + i * c->n_embd, t->norm_w, c->n_embd,
                     c->norm_eps);
}

static void task_rope(void *p, int ith, int nth)
{
    rows_task *t = p;
    const ekv_model_config *c = &t->rt->m->cfg;
    const int32_t D = c->head_dim, H = t->rt->sh.n_heads, HKV = t->rt->sh.n_kv_heads;
    long lo, hi;
    ekv_split_range(t->b->n, ith, nth, &lo, &hi);
    float cs[KERN_ROPE_MAX_DIM]; /* one row's angles serve all its heads */
    for (long i = lo; i < hi; i++) {
        const int32_t pos = t->b->pos[i];
        if (c->rope_dim > KERN_ROPE_MAX_DIM) {
            for (int32_t h = 0; h < H; h++)
                kern_rope(t->rt->q + (i * H + h) * D, D, c->rope_dim, pos, c->rope_base, 0);
            for (int32_t h = 0; h < HKV; h++)
                kern_rope(t->rt->k + (i * HKV + h) * D, D, c->rope_dim, pos, c->rope_base, 0);
            continue;
        }
        kern_rope_table(cs, c->rope_dim, pos, c->rope_base);
        for (int32_t h = 0; h < H; h++)
            kern_rope_apply(t->rt->q + (i * H + h) * D, D, c->rope_dim, cs, 0);
        for (int32_t h = 0; h < HKV; h++)
            kern_rope_apply(t->rt->k + (i * HKV + h) * D, D, c->rope_dim, cs, 0);
    }
}

static void task_residual(void *p, int ith, int nth)
{
    rows_task *t = p;
    const int32_t E = t->rt->m->cfg.n_embd;
    long lo, hi;
    ekv_split_range(t->b->n, ith, nth, &lo, &hi);
    for (long i = lo; i < hi; i++)
        kern_add(t->rt->x + i * E, t->rt->xb + i * E, E);
}

/* x += xb row by row; a prefill chunk's rows split over the threads, a few
 * decode rows stay on this one (waking the pool would cost more) */
static void residual_add(ekv_runtime *rt, rows_task *t)
{
    if (t->b->n >= 16) {
        ekv_pool_run(rt->pool, task_residual, t);
        return;
    }
    task_residual(t, 0, 1);
}

/* gate = silu(gate) * up over columns [i0, i1) of every row, on the thread
 * that has just computed them (kern_matmul_multi's rows_done) */
static void swiglu_cols(void *p, int64_t i0, int64_t i1)
{
    const rows_task *t = p;
    const int32_t F = t->rt->sh.n_ff;
    for (int32_t j = 0; j < t->b->n; j++)
        kern_swiglu(t->rt->gate + (size_t)j * F + i0, t->rt->up + (size_t)j * F + i0,
                    (int)(i1 - i0));
}

static kern_mm_op mm_op(const ekv_weight *w, float *y)
{
    return (kern_mm_op){.w = w->data, .wtype = w->type, .n = w->n_rows, .ldw = w->stride,
                        .y = y, .ldy = w->n_rows};
}

/* Attention of a probed row whose view ext is the resident view plus nr
 * recall blocks (placed after the packed prefix): the probe's rows are the
 * resident tokens' entries of ext's, copied from tmp into dst. */
static void attend_probed_recall(ekv_runtime *rt, const kern_kv_view *res, const kern_kv_view *ext,
                                 int32_t nr, const float *q, int32_t G, const int32_t *qpos,
                                 float scale, float *out, float *scores, float *tmp, float *dst)
{
    const int32_t D = rt->m->cfg.head_dim, ne = ext->n_tokens, n = res->n_tokens;
    const int32_t np = res->packed ? res->packed->n : 0, skip = nr * ext->block_tokens;
    const kern_attn_probe pr = {.logits = tmp, .probs = tmp + (size_t)G * ne};
    kern_attention_probe(ext, q, G, D, qpos, scale, out, D, scores, &pr);
    for (int32_t part = 0; part < 2; part++)
        for (int32_t g = 0; g < G; g++) {
            const float *src = tmp + ((size_t)part * G + g) * ne;
            float *d = dst + ((size_t)part * G + g) * n;
            memcpy(d, src, (size_t)np * sizeof *d);
            memcpy(d + np, src + np + skip, (size_t)(n - np) * sizeof *d);
        }
}

/* Sizes the per-thread recall scratch (and the score scratch) for layer l's
 * rows whose sequences recall; EKV_ENOMEM. */
static ekv_status recall_prepare(ekv_runtime *rt, const model_batch *b, int32_t l, ekv_error *err)
{
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t HKV = rt->sh.n_kv_heads, G = c->n_heads / c->n_kv_heads;
    size_t bytes = 0, probe = 0;
    int32_t ctx = rt->scores_ctx;
    if (!rt->recall_track && !(rt->recall_track = calloc((size_t)rt->max_batch, 1)))
        return ekv_error_set(err, EKV_ENOMEM, "runtime: out of memory for recall");
    for (int32_t i = 0; i < b->n; i++) {
        const kv_recall *rec = kv_seq_recall(model_batch_seq(b, i));
        rt->recall_track[i] = 0;
        if (!rec)
            continue;
        int32_t j = 0;
        while (j < b->n && (j == i || model_batch_seq(b, j) != model_batch_seq(b, i)))
            j++;
        rt->recall_track[i] = j == b->n;
        const int32_t bt = kv_pool_block_tokens(kv_seq_pool(model_batch_seq(b, i)));
        for (int32_t h = 0; h < HKV; h++) {
            const int32_t n = kv_seq_len(model_batch_seq(b, i), l, h) + 1; /* + this row, worst case */
            const size_t s = kv_recall_scratch_bytes(rec, l, h, n / bt + 2);
            const int32_t ne = n + kv_recall_r(rec) * bt;
            bytes = s > bytes ? s : bytes;
            ctx = ne > ctx ? ne : ctx;
            if (((b->probe && b->probe->rows[i]) || rt->recall_track[i]) &&
                2 * (size_t)G * ne > probe)
                probe = 2 * (size_t)G * ne;
        }
    }
    if (bytes == 0)
        return EKV_OK;
    ctx = (ctx + 15) & ~15; /* each thread's scores stay 64-byte aligned */
    bytes = (bytes + 63) & ~(size_t)63;
    probe = (probe + 15) & ~(size_t)15;
    const size_t nt = (size_t)ekv_pool_size(rt->pool);
    if (ctx > rt->scores_ctx) {
        float *sc = alloc_floats(nt * KERN_ATTN_SCRATCH(ctx));
        if (!sc)
            return ekv_error_set(err, EKV_ENOMEM, "runtime: out of memory for recall scores");
        free(rt->scores);
        rt->scores = sc;
        rt->scores_ctx = ctx;
    }
    if (bytes > rt->recall_bytes || probe > rt->recall_probe) {
        bytes = bytes > rt->recall_bytes ? bytes : rt->recall_bytes;
        probe = probe > rt->recall_probe ? probe : rt->recall_probe;
        uint8_t *nb = aligned_alloc(64, nt * (bytes + probe * sizeof(float)));
        if (!nb)
            return ekv_error_set(err, EKV_ENOMEM, "runtime: out of memory for recall");
        free(rt->recall_buf);
        rt->recall_buf = nb;
        rt->recall_bytes = bytes;
        rt->recall_probe = probe;
    }
    return EKV_OK;
}

/* Row i's attention over KV head kvh on the per-row path (probed and
 * recalling rows, and rows alone in their tile). */
static void attend_row(const rows_task *t, long i, int32_t kvh, float scale, float *scores,
                       uint8_t *rbuf)
{
    ekv_runtime *rt = t->rt;
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t D = c->head_dim, H = rt->sh.n_heads, HKV = rt->sh.n_kv_heads, G = H / HKV;
    int32_t qpos[64];
    kern_kv_view view;
    kv_seq_view(model_batch_seq(t->b, i), t->layer, kvh, &view);
    for (int32_t g = 0; g < G; g++)
        qpos[g] = t->b->pos[i];
    const size_t off = ((size_t)i * H + (size_t)kvh * G) * D;
    const int64_t po = t->b->probe ? rt->probe_off[i * HKV + kvh] : -1;
    kv_recall *rec = kv_seq_recall(model_batch_seq(t->b, i));
    if (rec) {
        kern_kv_view ext;
        const int track = rt->recall_track[i] ? KV_RECALL_TRACK : 0;
        const int32_t nr = kv_recall_view_at(rec, t->layer, kvh, rt->q + off, G, D, qpos[0],
                                             track, &view, &ext, rbuf);
        float *tmp = (float *)(rbuf + rt->recall_bytes);
        const int32_t np = ext.packed ? ext.packed->n : 0;
        if (nr > 0 && po >= 0) { /* the probe sees the resident tokens only */
            attend_probed_recall(rt, &view, &ext, nr, rt->q + off, G, qpos, scale,
                                 rt->att + off, scores, tmp, rt->probe_buf + po);
            if (track)
                kv_recall_observe(rec, t->layer, kvh, tmp + (size_t)G * ext.n_tokens, G,
                                  ext.n_tokens, np);
            return;
        }
        if (track && po < 0 && kv_recall_promotes(rec)) { /* its mass decides promotion */
            const kern_attn_probe pr = {.probs = tmp};
            kern_attention_probe(&ext, rt->q + off, G, D, qpos, scale, rt->att + off, D,
                                 scores, &pr);
            kv_recall_observe(rec, t->layer, kvh, tmp, G, ext.n_tokens, np);
            return;
        }
        view = ext;
    }
    if (po < 0) {
        kern_attention(&view, rt->q + off, G, D, qpos, scale, rt->att + off, D, scores);
        return;
    }
    const kern_attn_probe pr = {.logits = rt->probe_buf + po,
                                .probs = rt->probe_buf + po + (size_t)G * view.n_tokens};
    kern_attention_probe(&view, rt->q + off, G, D, qpos, scale, rt->att + off, D, scores, &pr);
}

/* Rows of a prefill chunk attend ATT_TILE_ROWS at a time per KV head
 * (kern_attention_rows loads each K/V tile once for several rows). */
#define ATT_TILE_ROWS 6

/* Whether row i may join kern_attention_rows: neither probed nor recalling
 * (those take attend_row). */
static int row_tiles(const rows_task *t, long i)
{
    return !(t->b->probe && t->b->probe->rows[i]) && !kv_seq_recall(model_batch_seq(t->b, i));
}

/* Work items are (tile of ATT_TILE_ROWS rows, KV head), dealt round-robin
 * over the parts so that the long rows at the end of a causal prefill chunk
 * spread over all threads; scratch is per thread, not per part. Within a
 * tile, each run of rows of one sequence goes to kern_attention_rows, which
 * is bit-identical to attend_row. */
static void task_attention(void *p, int ith, int nth)
{
    rows_task *t = p;
    ekv_runtime *rt = t->rt;
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t D = c->head_dim, H = rt->sh.n_heads, HKV = rt->sh.n_kv_heads, G = H / HKV;
    const float scale = 1.0f / sqrtf((float)D);
    const int ti = ekv_pool_thread_index();
    float *scores = rt->scores + (size_t)ti * KERN_ATTN_SCRATCH(rt->scores_ctx);
    uint8_t *rbuf = rt->recall_buf ? rt->recall_buf + (size_t)ti * (rt->recall_bytes +
                                                                   rt->recall_probe * sizeof(float))
                                   : NULL;
    const long n_tiles = ((long)t->b->n + ATT_TILE_ROWS - 1) / ATT_TILE_ROWS;
    for (long item = ith; item < n_tiles * HKV; item += nth) {
        const int32_t kvh = (int32_t)(item % HKV);
        const long r0 = item / HKV * ATT_TILE_ROWS;
        const long r1 = r0 + ATT_TILE_ROWS < t->b->n ? r0 + ATT_TILE_ROWS : t->b->n;
        for (long i = r0, e; i < r1; i = e) {
            e = i + 1;
            if (row_tiles(t, i))
                while (e < r1 && model_batch_seq(t->b, e) == model_batch_seq(t->b, i) &&
                       row_tiles(t, e))
                    e++;
            if (e - i == 1) {
                attend_row(t, i, kvh, scale, scores, rbuf);
                continue;
            }
            kern_kv_view view;
            kv_seq_view(model_batch_seq(t->b, i), t->layer, kvh, &view);
            const size_t off = ((size_t)i * H + (size_t)kvh * G) * D;
            kern_attention_rows(&view, rt->q + off, (int)(e - i), G, H * D, t->b->pos + i, scale,
                                rt->att + off, H * D, scores);
        }
    }
}

/*
 * Decode attention split across the threads. At batch 1 the (row, KV head)
 * items are few - 3 on the demo model, so task_attention leaves one of 2
 * threads with twice the other's tokens, and at long context attention is
 * most of a step. Here every item's tokens are cut across all parts for the
 * scores and the softmax numerators, and its output dimensions for the
 * values (three regions; kern_attention_split_* in kernels.h), with results
 * bit-identical to kern_attention. Batches of many rows keep task_attention.
 */
#define SPLIT_ITEMS_MAX 8
#define SPLIT_PARTS_MAX 16
/* below this many tokens per item two more regions cost more than they save */
#define SPLIT_MIN_TOKENS 256

typedef struct split_item {
    kern_kv_view view;
    const float *q;
    float *out, *scores;
    int32_t qpos;
} split_item;

typedef struct split_task {
    int n_items, g, d, n_parts, n_vparts;
    float scale;
    split_item item[SPLIT_ITEMS_MAX];
    float part_max[SPLIT_ITEMS_MAX][SPLIT_PARTS_MAX][KERN_ATTN_GROUP_MAX];
} split_task;

/* Whether layer l's attention of batch b takes the split path; fills s. */
static int split_plan(ekv_runtime *rt, const model_batch *b, int32_t l, split_task *s)
{
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t D = c->head_dim, H = rt->sh.n_heads, HKV = rt->sh.n_kv_heads, G = H / HKV;
    const int nt = ekv_pool_size(rt->pool);
    const long items = (long)b->n * HKV;
    /* each item's g score rows come from the threads' score scratch */
    if (!rt->attn_split || nt < 2 || b->probe || G > KERN_ATTN_GROUP_MAX ||
        items > SPLIT_ITEMS_MAX || items * G > (long)nt * KERN_ATTN_TILE_Q)
        return 0;
    int64_t tokens = 0;
    for (int32_t i = 0; i < b->n; i++) {
        if (kv_seq_recall(model_batch_seq(b, i)))
            return 0;
        for (int32_t h = 0; h < HKV; h++) {
            split_item *x = &s->item[i * HKV + h];
            kv_seq_view(model_batch_seq(b, i), l, h, &x->view);
            if (!kern_attention_split_ok(&x->view, G) || x->view.n_tokens > rt->scores_ctx)
                return 0;
            tokens += x->view.n_tokens;
            const size_t off = ((size_t)i * H + (size_t)h * G) * D;
            x->q = rt->q + off;
            x->out = rt->att + off;
            x->qpos = b->pos[i];
            x->scores = rt->scores + (size_t)(i * HKV + h) * G * rt->scores_ctx;
        }
    }
    if (rt->attn_split == 1 && tokens < (int64_t)SPLIT_MIN_TOKENS * items)
        return 0;
    s->n_items = (int)items;
    s->g = G;
    s->d = D;
    s->scale = 1.0f / sqrtf((float)D);
    s->n_parts = 2 * nt < SPLIT_PARTS_MAX ? 2 * nt : SPLIT_PARTS_MAX;
    /* whole 64-byte lines of each V row per part where the head has them */
    s->n_vparts = D / 32 < nt ? (D / 32 > 0 ? D / 32 : 1) : nt;
    return 1;
}

static void task_split_scores(void *p, int ith, int nth)
{
    split_task *s = p;
    for (int part = ith; part < s->n_parts; part += nth)
        for (int it = 0; it < s->n_items; it++) {
            const split_item *x = &s->item[it];
            kern_attention_split_scores(&x->view, x->q, s->g, s->d, x->qpos, s->scale, x->scores,
                                        part, s->n_parts, s->part_max[it][part]);
        }
}

static void task_split_exp(void *p, int ith, int nth)
{
    split_task *s = p;
    for (int part = ith; part < s->n_parts; part += nth)
        for (int it = 0; it < s->n_items; it++) {
            float max[KERN_ATTN_GROUP_MAX];
            for (int i = 0; i < s->g; i++) {
                max[i] = s->part_max[it][0][i];
                for (int q = 1; q < s->n_parts; q++)
                    max[i] = s->part_max[it][q][i] > max[i] ? s->part_max[it][q][i] : max[i];
            }
            const split_item *x = &s->item[it];
            kern_attention_split_exp(&x->view, x->scores, s->g, max, part, s->n_parts);
        }
}

static void task_split_values(void *p, int ith, int nth)
{
    split_task *s = p;
    for (int w = ith; w < s->n_items * s->n_vparts; w += nth) {
        const split_item *x = &s->item[w / s->n_vparts];
        kern_attention_split_values(&x->view, x->scores, s->g, x->out, s->d, w % s->n_vparts,
                                    s->n_vparts);
    }
}

/* Lays out the probe's buffer for layer l (each probed row's heads hold
 * their own token counts); EKV_ENOMEM. */
static ekv_status probe_prepare(ekv_runtime *rt, const model_batch *b, int32_t l, ekv_error *err)
{
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t HKV = rt->sh.n_kv_heads, G = c->n_heads / c->n_kv_heads;
    if (!rt->probe_off &&
        !(rt->probe_off = malloc((size_t)rt->max_batch * HKV * sizeof *rt->probe_off)))
        return ekv_error_set(err, EKV_ENOMEM, "runtime: out of memory for the attention probe");
    size_t need = 0;
    for (int32_t i = 0; i < b->n; i++)
        for (int32_t h = 0; h < HKV; h++) {
            const size_t item = (size_t)i * HKV + h;
            if (!b->probe->rows[i]) {
                rt->probe_off[item] = -1;
                continue;
            }
            rt->probe_off[item] = (int64_t)need;
            need += 2 * (size_t)G * kv_seq_len(model_batch_seq(b, i), l, h);
        }
    if (need > rt->probe_cap) {
        float *nb = realloc(rt->probe_buf, need * sizeof *nb);
        if (!nb)
            return ekv_error_set(err, EKV_ENOMEM, "runtime: out of memory for the attention probe");
        rt->probe_buf = nb;
        rt->probe_cap = need;
    }
    return EKV_OK;
}

static void probe_report(ekv_runtime *rt, const model_batch *b, int32_t l)
{
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t HKV = rt->sh.n_kv_heads, G = c->n_heads / c->n_kv_heads;
    for (int32_t i = 0; i < b->n; i++)
        for (int32_t h = 0; h < HKV; h++) {
            const int64_t po = rt->probe_off[(size_t)i * HKV + h];
            if (po < 0)
                continue;
            const int32_t n = kv_seq_len(model_batch_seq(b, i), l, h);
            b->probe->fn(b->probe->ctx, l, i, h, rt->probe_buf + po,
                         rt->probe_buf + po + (size_t)G * n, G, n);
        }
}

/* Checks the batch and that the pool can hold every row's K and V, before
 * anything is modified. */
static ekv_status check_batch(ekv_runtime *rt, const model_batch *b, ekv_error *err)
{
    const ekv_model_config *c = &rt->m->cfg;
    if (b->n <= 0 || b->n > rt->max_batch)
        return ekv_error_set(err, EKV_EINVAL, "batch of %d rows (max %d)", b->n, rt->max_batch);
    if (c->n_heads / c->n_kv_heads > 64)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "more than 64 query heads per KV head");
    if (!b->seqs) { /* sequence ids: each must name a sequence of this rank's table */
        if (!b->seq_ids || !b->seq_table)
            return ekv_error_set(err, EKV_EINVAL, "batch has neither sequences nor sequence ids");
        for (int32_t i = 0; i < b->n; i++)
            if (b->seq_ids[i] < 0 || b->seq_ids[i] >= b->n_seq_table ||
                !b->seq_table[b->seq_ids[i]])
                return ekv_error_set(err, EKV_EINVAL, "row %d: no sequence with id %d", i,
                                     b->seq_ids[i]);
    }
    int64_t need = 0;
    kv_pool *pool = NULL;
    for (int32_t i = 0; i < b->n; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= c->n_vocab)
            return ekv_error_set(err, EKV_EINVAL, "token id %d out of range [0, %d)",
                                 b->tokens[i], c->n_vocab);
        if (b->pos[i] < 0)
            return ekv_error_set(err, EKV_EINVAL, "negative position %d", b->pos[i]);
        int32_t first = 1, count = 0;
        for (int32_t j = 0; j < b->n; j++) {
            if (model_batch_seq(b, j) != model_batch_seq(b, i))
                continue;
            if (j < i) {
                first = 0;
                break;
            }
            count++;
        }
        if (!first)
            continue;
        if (kv_seq_n_layers(model_batch_seq(b, i)) != c->n_layers ||
            kv_seq_n_kv_heads(model_batch_seq(b, i)) != rt->sh.n_kv_heads)
            return ekv_error_set(err, EKV_EINVAL,
                                 "sequence of %d layers x %d KV heads; this runtime runs %d x %d",
                                 kv_seq_n_layers(model_batch_seq(b, i)), kv_seq_n_kv_heads(model_batch_seq(b, i)),
                                 c->n_layers, rt->sh.n_kv_heads);
        const int32_t held = kv_seq_max_len(model_batch_seq(b, i));
        if (held + count > rt->max_ctx)
            return ekv_error_set(err, EKV_ERANGE, "sequence would hold %d tokens (max %d)",
                                 held + count, rt->max_ctx);
        if (pool && kv_seq_pool(model_batch_seq(b, i)) != pool)
            return ekv_error_set(err, EKV_EINVAL, "a batch must draw from one kv pool");
        pool = kv_seq_pool(model_batch_seq(b, i));
        need += kv_seq_blocks_needed(model_batch_seq(b, i), count);
    }
    if (pool && need > kv_pool_free_blocks(pool))
        return ekv_error_set(err, EKV_ENOMEM, "kv pool: batch needs %lld blocks, %lld free",
                             (long long)need, (long long)kv_pool_free_blocks(pool));
    return EKV_OK;
}

static ekv_status append_kv(ekv_runtime *rt, const model_batch *b, int32_t layer, ekv_error *err)
{
    const ekv_model_config *c = &rt->m->cfg;
    const int32_t D = c->head_dim, HKV = rt->sh.n_kv_heads;
    for (int32_t i = 0; i < b->n; i++)
        for (int32_t h = 0; h < HKV; h++) {
            const size_t off = ((size_t)i * HKV + h) * D;
            ekv_status rc = kv_seq_append(model_batch_seq(b, i), layer, h, rt->k + off, rt->v + off,
                                          b->pos[i], err);
            if (rc)
                return rc;
        }
    return EKV_OK;
}

/* A row-parallel step: one row (decode at batch 1) is a few microseconds of
 * work, less than waking the pool's threads for it, so it runs here. */
static void run_rows(ekv_runtime *rt, ekv_task_fn fn, rows_task *t)
{
    if (t->b->n == 1)
        fn(t, 0, 1);
    else
        ekv_pool_run(rt->pool, fn, t);
}

static ekv_status layer_forward(ekv_runtime *rt, const model_batch *b, int32_t l, ekv_error *err)
{
    const ekv_layer *L = &rt->layers[l];
    const int32_t n = b->n;
    rows_task t = {.rt = rt, .b = b, .norm_w = L->attn_norm, .layer = l};
    ekv_status rc;

    run_rows(rt, task_norm, &t);
    const kern_mm_op qkv[3] = {mm_op(&L->wq, rt->q), mm_op(&L->wk, rt->k), mm_op(&L->wv, rt->v)};
    if ((rc = kern_matmul_multi(rt->pool, qkv, 3, L->wq.n_cols, rt->xb, n, rt->mm_scratch, NULL,
                                 NULL, err)))
        return rc;
    run_rows(rt, task_rope, &t);
    if (b->tap)
        b->tap->fn(b->tap->ctx, l, b, rt->q);
    if ((rc = append_kv(rt, b, l, err)))
        return rc;
    if ((b->probe && (rc = probe_prepare(rt, b, l, err))) || (rc = recall_prepare(rt, b, l, err)))
        return rc;
    split_task st;
    if (split_plan(rt, b, l, &st)) {
        ekv_pool_run(rt->pool, task_split_scores, &st);
        ekv_pool_run(rt->pool, task_split_exp, &st);
        ekv_pool_run(rt->pool, task_split_values, &st);
    } else {
        ekv_pool_run(rt->pool, task_attention, &t);
    }
    if (b->probe)
        probe_report(rt, b, l);
    for (int32_t i = 0; rt->recall_track && i < n; i++)
        if (rt->recall_track[i])
            kv_seq_recall_promote(model_batch_seq(b, i), l);
    if ((rc = matmul(rt, &L->wo, rt->att, n, rt->xb, err)) ||
        (rc = allreduce_rows(rt, rt->xb, n, err)))
        return rc;
    residual_add(rt, &t);

    t.norm_w = L->ffn_norm;
    run_rows(rt, task_norm, &t);
    const kern_mm_op gu[2] = {mm_op(&L->w_gate, rt->gate), mm_op(&L->w_up, rt->up)};
    if ((rc = kern_matmul_multi(rt->pool, gu, 2, L->w_gate.n_cols, rt->xb, n, rt->mm_scratch,
                                 swiglu_cols, &t, err)))
        return rc;
    if ((rc = matmul(rt, &L->w_down, rt->gate, n, rt->xb, err)) ||
        (rc = allreduce_rows(rt, rt->xb, n, err)))
        return rc;
    residual_add(rt, &t);
    return EKV_OK;
}

ekv_status model_forward(ekv_runtime *rt, const model_batch *b, float *logits, ekv_error *err)
{
    const ekv_model *m = rt->m;
    const ekv_model_config *c = &m->cfg;
    const int32_t E = c->n_embd;
    ekv_status rc = check_batch(rt, b, err);
    if (rc)
        return rc;
    if (rt->backend)
        return rt->backend->forward(rt->backend_state, rt, b, logits, err);
    for (int32_t i = 0; i < b->n; i++)
        if ((rc = kern_get_row(m->tok_embd.data, m->tok_embd.type, E, b->tokens[i],
                               rt->x + (size_t)i * E, err)))
            return rc;
    for (int32_t l = 0; l < c->n_layers; l++)
        if ((rc = layer_forward(rt, b, l, err)))
            return rc;
    if (!logits)
        return EKV_OK;
    /* final norm of the rows whose logits are wanted, gathered densely */
    int32_t n_out = 0;
    for (int32_t i = 0; i < b->n; i++) {
        const int want = b->want_logits ? b->want_logits[i] != 0 : i == b->n - 1;
        if (want)
            kern_rmsnorm(rt->xb + (size_t)n_out++ * E, rt->x + (size_t)i * E, m->out_norm, E,
                         c->norm_eps);
    }
    if (n_out == 0)
        return EKV_OK;
    return matmul(rt, &m->output, rt->xb, n_out, logits, err);
}

ekv_status model_prefill(ekv_runtime *rt, kv_seq *seq, const int32_t *ids, int32_t n,
                         int32_t pos0, const model_tap *tap, float *logits, ekv_error *err)
{
    const int32_t chunk = rt->max_batch;
    int32_t *pos = malloc((size_t)chunk * sizeof *pos);
    kv_seq **seqs = malloc((size_t)chunk * sizeof *seqs);
    ekv_status rc = EKV_OK;
    if (!pos || !seqs) {
        rc = ekv_error_set(err, EKV_ENOMEM, "out of memory");
        goto out;
    }
    for (int32_t i = 0; i < chunk; i++)
        seqs[i] = seq;
    for (int32_t start = 0; start < n && !rc; start += chunk) {
        const int32_t m = n - start < chunk ? n - start : chunk;
        for (int32_t i = 0; i < m; i++)
            pos[i] = pos0 + start + i;
        model_batch b = {.n = m, .tokens = ids + start, .pos = pos, .seqs = seqs, .tap = tap};
        rc = model_forward(rt, &b, logits, err); /* the chunk's last row */
    }
out:
    free(pos);
    free(seqs);
    return rc;
}
