/*
 * shard.c - Megatron-style tensor-parallel sharding of a loaded model
 * (Shoeybi et al. 2019): which heads and which slice of the MLP a rank owns,
 * and the weight views that read its share in place from the mapping.
 *
 * Attention: rank r owns a contiguous group of KV heads and the query heads
 * that share them (GQA keeps a KV head's G query heads together), so its
 * attention needs no communication. Wq, Wk, Wv are split by output rows (a
 * rank's rows are contiguous: a plain view); Wo is split by input columns
 * (every row's columns of this rank's query heads: a strided view) and the
 * ranks' partial products are summed by an allreduce.
 *
 * MLP: W_gate and W_up by output rows [ff0, ff0 + n_ff), W_down by the same
 * input columns (strided), then an allreduce. A strided view must start on a
 * block of the weight's type (32 values; 256 for the K-quants), so the inner
 * dimension is cut in whole blocks of W_down's type and the ranks' shares
 * differ by at most one block (n_ff 1536 in 32-blocks: np = 3 gives 512 each,
 * np = 5 gives 320, 320, 320, 288, 288). Wo is cut at head boundaries,
 * which must fall on blocks of Wo's type: otherwise planning fails with
 * EKV_EUNSUPPORTED (head_dim 64 x 3 query heads per KV head = 192 columns
 * per KV head is fine for 32-blocks, not for 256-blocks).
 *
 * Uneven head counts: the first HKV mod np ranks hold one KV head more
 * (3 KV heads over np = 2: 2 + 1). Every rank must own at least one KV head.
 * Embedding, final norm and output projection stay whole on every rank.
 */
#include "model_internal.h"

#include <string.h>

/* the i-th of np near-equal shares of `units` (the first units % np get one
 * more): its start and length */
static void share(int64_t units, int32_t np, int32_t r, int64_t *start, int64_t *len)
{
    const int64_t base = units / np, extra = units % np;
    *start = r * base + (r < extra ? r : extra);
    *len = base + (r < extra ? 1 : 0);
}

ekv_status model_shard_plan(const ekv_model *m, int32_t rank, int32_t size, model_shard *s,
                            ekv_error *err)
{
    const ekv_model_config *c = &m->cfg;
    memset(s, 0, sizeof *s);
    if (size < 1 || rank < 0 || rank >= size)
        return ekv_error_set(err, EKV_EINVAL, "shard: rank %d of %d", rank, size);
    if (size > c->n_kv_heads)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "shard: %d ranks but the model has %d KV heads (each rank owns at "
                             "least one)", size, c->n_kv_heads);
    const int32_t G = c->n_heads / c->n_kv_heads, D = c->head_dim;
    int64_t start, len;
    share(c->n_kv_heads, size, rank, &start, &len);
    s->rank = rank;
    s->size = size;
    s->kv_head0 = (int32_t)start;
    s->n_kv_heads = (int32_t)len;
    s->head0 = s->kv_head0 * G;
    s->n_heads = s->n_kv_heads * G;
    /* the MLP in whole blocks of the widest block among the layers' W_down */
    int64_t unit = 1;
    for (int32_t l = 0; l < c->n_layers; l++) {
        const ekv_dtype_info *di = ekv_dtype_get(m->layers[l].w_down.type);
        if (di && di->block_elems > unit)
            unit = di->block_elems;
    }
    if (c->n_ff % unit)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "shard: n_ff %d is not whole %lld-blocks",
                             c->n_ff, (long long)unit);
    share(c->n_ff / unit, size, rank, &start, &len);
    s->ff0 = (int32_t)(start * unit);
    s->n_ff = (int32_t)(len * unit);
    if (s->n_ff == 0)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "shard: %d ranks leave rank %d no %lld-block of the MLP", size, rank,
                             (long long)unit);
    /* Wo's columns are cut where the heads are */
    for (int32_t l = 0; l < c->n_layers; l++) {
        const ekv_dtype_info *di = ekv_dtype_get(m->layers[l].wo.type);
        const int64_t be = di ? di->block_elems : 1;
        if (((int64_t)s->head0 * D) % be || ((int64_t)s->n_heads * D) % be)
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "shard: the output projection (%s, blocks of %lld) cannot be cut "
                                 "at column %lld where rank %d's heads start",
                                 di ? di->name : "?", (long long)be, (long long)s->head0 * D,
                                 rank);
    }
    return EKV_OK;
}

/* rows [r0, r0 + n) of w: a dense view */
static ekv_weight rows_view(const ekv_weight *w, int64_t r0, int64_t n)
{
    uint64_t rb = 0;
    ekv_dtype_row_bytes(w->type, (uint64_t)w->n_cols, &rb);
    const size_t stride = w->stride ? w->stride : (size_t)rb;
    ekv_weight v = *w;
    v.data = (const uint8_t *)w->data + (size_t)r0 * stride;
    v.n_rows = n;
    return v;
}

/* columns [c0, c0 + n) of every row of w (c0 and n in whole blocks): a
 * strided view */
static ekv_weight cols_view(const ekv_weight *w, int64_t c0, int64_t n)
{
    uint64_t rb = 0, skip = 0;
    ekv_dtype_row_bytes(w->type, (uint64_t)w->n_cols, &rb);
    ekv_dtype_row_bytes(w->type, (uint64_t)c0, &skip); /* 0 columns: 0 bytes */
    ekv_weight v = *w;
    v.data = (const uint8_t *)w->data + skip;
    v.n_cols = n;
    v.stride = w->stride ? w->stride : (size_t)rb;
    return v;
}

void model_shard_layers(const ekv_model *m, const model_shard *s, ekv_layer *out)
{
    const ekv_model_config *c = &m->cfg;
    const int64_t D = c->head_dim;
    for (int32_t l = 0; l < c->n_layers; l++) {
        const ekv_layer *L = &m->layers[l];
        ekv_layer *o = &out[l];
        *o = *L;
        if (s->size == 1)
            continue; /* the whole matrices, exactly as loaded */
        o->wq = rows_view(&L->wq, s->head0 * D, s->n_heads * D);
        o->wk = rows_view(&L->wk, s->kv_head0 * D, s->n_kv_heads * D);
        o->wv = rows_view(&L->wv, s->kv_head0 * D, s->n_kv_heads * D);
        o->wo = cols_view(&L->wo, s->head0 * D, s->n_heads * D);
        o->w_gate = rows_view(&L->w_gate, s->ff0, s->n_ff);
        o->w_up = rows_view(&L->w_up, s->ff0, s->n_ff);
        o->w_down = cols_view(&L->w_down, s->ff0, s->n_ff);
    }
}

kv_pool *model_kv_pool_create_shard(const ekv_model *m, const model_shard *s, int32_t n_tokens,
                                    ekv_error *err)
{
    const ekv_model_config *c = &m->cfg;
    const int64_t blocks = (int64_t)c->n_layers * s->n_kv_heads *
                           (((int64_t)n_tokens + MODEL_KV_BLOCK_TOKENS - 1) / MODEL_KV_BLOCK_TOKENS);
    return kv_pool_create(MODEL_KV_BLOCK_TOKENS, c->head_dim, blocks, err);
}
