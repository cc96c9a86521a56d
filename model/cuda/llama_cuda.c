/*
 * llama_cuda.c - the Llama forward pass on a CUDA device, behind the backend
 * seam (model/backend.h) of an ordinary ekv_runtime (model_cuda.h).
 *
 * The same equations as model/llama.c, per layer:
 *   h = x + Wo . attn(rope(Wq . n1(x)), rope(Wk . n1(x)), Wv . n1(x))
 *   x = h + Wdown . (silu(Wgate . n2(h)) * (Wup . n2(h)))
 * with every step on the device: weights dequantized to fp16 once, GEMMs by
 * cuBLAS (fp16 inputs, fp32 accumulation and output: activations are
 * rounded to fp16 on their way into each product), RMSNorm / RoPE / SwiGLU
 * / residual in fp32, K and V appended to a device KV pool with the host
 * pool's block layout, and attention by the paged decode kernel for every
 * row: a prefill chunk's rows each attend the sequence's head with all the
 * chunk's tokens appended, masked by position, exactly as the CPU forward
 * appends first and masks by position.
 *
 * Device KV is a cache of the host kv_seq (backend.h): each sequence of a
 * batch has an entry (its block ids per (layer, KV head) and lengths); an
 * entry whose lengths differ from the host's (compression dropped tokens,
 * or a new sequence at a freed one's address) is rebuilt from the host
 * views before the forward. The K and V the device computed are copied back
 * and appended to the host sequence after the forward.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../backend.h"
#include "../model_internal.h"
#include "entrokv/cuda.h"
#include "entrokv/kvrecall.h"
#include "entrokv/model_cuda.h"

typedef struct cuda_layer {
    float *attn_norm, *ffn_norm;
    ekv_f16 *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down;
} cuda_layer;

/* The device copy of one host sequence's KV. */
typedef struct cuda_seq {
    const kv_seq *seq;  /* key (never dereferenced once stale) */
    int32_t *n_tok;     /* [L * HKV] tokens held on the device */
    int32_t *n_blk;     /* [L * HKV] blocks held */
    int32_t *ids;       /* [L * HKV][max_blocks] block ids */
    uint64_t used;      /* forward count when last in a batch (LRU) */
} cuda_seq;

typedef struct cuda_fwd {
    ekv_cuda *ctx;
    ekv_cuda_kv_pool *pool;
    const ekv_model *m;
    int32_t B, max_ctx, L, E, H, HKV, D, F, V, bt, max_blocks;
    /* weights */
    ekv_f16 *tok_embd, *output; /* output == tok_embd when tied */
    float *out_norm;
    cuda_layer *layers;
    /* device activations, B rows each */
    float *x, *xb, *q, *att, *gate, *up, *logits;
    ekv_f16 *xh;
    float *kbuf, *vbuf; /* [L][B][HKV * D]: each layer's K and V, copied back */
    void *dec_ws;
    int32_t *meta_d; /* device ints of one forward (meta_layout) */
    size_t meta_cap;
    /* host staging */
    int32_t *meta_h;
    float *k_host, *v_host, *q_host;
    /* device sequences */
    cuda_seq *seqs;
    int32_t n_seqs, cap_seqs;
    uint64_t clock;
} cuda_fwd;

static void seq_release(cuda_fwd *f, cuda_seq *s)
{
    for (int32_t i = 0; i < f->L * f->HKV; i++) {
        ekv_cuda_kv_release(f->pool, s->ids + (size_t)i * f->max_blocks, s->n_blk[i]);
        s->n_blk[i] = s->n_tok[i] = 0;
    }
}

static void seq_drop(cuda_fwd *f, int32_t idx)
{
    cuda_seq *s = &f->seqs[idx];
    seq_release(f, s);
    free(s->n_tok);
    free(s->n_blk);
    free(s->ids);
    f->seqs[idx] = f->seqs[--f->n_seqs];
}

static void fwd_forget(void *state, const kv_seq *seq)
{
    cuda_fwd *f = state;
    for (int32_t i = 0; i < f->n_seqs; i++)
        if (f->seqs[i].seq == seq) {
            seq_drop(f, i);
            return;
        }
}

static void fwd_destroy(void *state)
{
    cuda_fwd *f = state;
    if (!f)
        return;
    while (f->n_seqs > 0)
        seq_drop(f, f->n_seqs - 1);
    free(f->seqs);
    if (f->layers)
        for (int32_t l = 0; l < f->L; l++) {
            cuda_layer *cl = &f->layers[l];
            void *p[] = {cl->attn_norm, cl->ffn_norm, cl->wq, cl->wk, cl->wv,
                         cl->wo, cl->w_gate, cl->w_up, cl->w_down};
            for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
                ekv_cuda_free(p[i]);
        }
    free(f->layers);
    if (f->output != f->tok_embd)
        ekv_cuda_free(f->output);
    ekv_cuda_free(f->tok_embd);
    void *dev[] = {f->out_norm, f->x, f->xb, f->q, f->att, f->gate, f->up, f->logits,
                   f->xh, f->kbuf, f->vbuf, f->dec_ws, f->meta_d};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        ekv_cuda_free(dev[i]);
    free(f->meta_h);
    free(f->k_host);
    free(f->v_host);
    free(f->q_host);
    ekv_cuda_kv_pool_destroy(f->pool);
    ekv_cuda_destroy(f->ctx);
    free(f);
}

/* ---- creation: checks, weight upload, buffers ---- */

static ekv_status upload_matrix(cuda_fwd *f, const ekv_weight *w, ekv_f16 **out, ekv_error *err)
{
    if (w->stride != 0)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "cuda forward: strided weight views (a "
                                                     "tensor-parallel shard) are not supported");
    if (!ekv_cuda_dequant_supports(w->type))
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "cuda forward: no device dequantizer for GGUF type %u", w->type);
    return ekv_cuda_upload_weight(f->ctx, w->data, w->type, w->n_rows, w->n_cols, out, err);
}

static ekv_status upload_floats(cuda_fwd *f, const float *src, int64_t n, float **out,
                                ekv_error *err)
{
    ekv_status rc = ekv_cuda_malloc(f->ctx, (size_t)n * sizeof(float), (void **)out, err);
    return rc ? rc : ekv_cuda_to_device(f->ctx, *out, src, (size_t)n * sizeof(float), err);
}

static ekv_status dev_alloc(cuda_fwd *f, size_t bytes, void *out, ekv_error *err)
{
    return ekv_cuda_malloc(f->ctx, bytes ? bytes : 16, (void **)out, err);
}

static ekv_status fwd_upload(cuda_fwd *f, ekv_error *err)
{
    const ekv_model *m = f->m;
    ekv_status rc;
    if ((rc = upload_matrix(f, &m->tok_embd, &f->tok_embd, err)))
        return rc;
    if (m->output.data == m->tok_embd.data && m->output.type == m->tok_embd.type)
        f->output = f->tok_embd;
    else if ((rc = upload_matrix(f, &m->output, &f->output, err)))
        return rc;
    if ((rc = upload_floats(f, m->out_norm, f->E, &f->out_norm, err)))
        return rc;
    if (!(f->layers = calloc((size_t)f->L, sizeof *f->layers)))
        return ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
    for (int32_t l = 0; l < f->L; l++) {
        const ekv_layer *L = &m->layers[l];
        cuda_layer *cl = &f->layers[l];
        if ((rc = upload_floats(f, L->attn_norm, f->E, &cl->attn_norm, err)) ||
            (rc = upload_floats(f, L->ffn_norm, f->E, &cl->ffn_norm, err)) ||
            (rc = upload_matrix(f, &L->wq, &cl->wq, err)) ||
            (rc = upload_matrix(f, &L->wk, &cl->wk, err)) ||
            (rc = upload_matrix(f, &L->wv, &cl->wv, err)) ||
            (rc = upload_matrix(f, &L->wo, &cl->wo, err)) ||
            (rc = upload_matrix(f, &L->w_gate, &cl->w_gate, err)) ||
            (rc = upload_matrix(f, &L->w_up, &cl->w_up, err)) ||
            (rc = upload_matrix(f, &L->w_down, &cl->w_down, err)))
            return rc;
    }
    return EKV_OK;
}

static ekv_status fwd_buffers(cuda_fwd *f, int64_t kv_tokens, ekv_error *err)
{
    const size_t B = (size_t)f->B, Qd = (size_t)f->H * f->D, KV = (size_t)f->HKV * f->D;
    size_t wide = (size_t)f->E;
    wide = Qd > wide ? Qd : wide;
    wide = (size_t)f->F > wide ? (size_t)f->F : wide;
    const int64_t per_head = (kv_tokens + f->bt - 1) / f->bt + 1; /* + a partly filled block */
    ekv_status rc;
    if ((rc = ekv_cuda_kv_pool_create(f->ctx, f->bt, f->D, per_head * f->L * f->HKV, &f->pool,
                                      err)) ||
        (rc = dev_alloc(f, B * f->E * sizeof(float), &f->x, err)) ||
        (rc = dev_alloc(f, B * wide * sizeof(float), &f->xb, err)) ||
        (rc = dev_alloc(f, B * Qd * sizeof(float), &f->q, err)) ||
        (rc = dev_alloc(f, B * Qd * sizeof(float), &f->att, err)) ||
        (rc = dev_alloc(f, B * f->F * sizeof(float), &f->gate, err)) ||
        (rc = dev_alloc(f, B * f->F * sizeof(float), &f->up, err)) ||
        (rc = dev_alloc(f, B * f->V * sizeof(float), &f->logits, err)) ||
        (rc = dev_alloc(f, B * wide * sizeof(ekv_f16), &f->xh, err)) ||
        (rc = dev_alloc(f, (size_t)f->L * B * KV * sizeof(float), &f->kbuf, err)) ||
        (rc = dev_alloc(f, (size_t)f->L * B * KV * sizeof(float), &f->vbuf, err)) ||
        (rc = dev_alloc(f, ekv_cuda_decode_workspace(f->B, f->HKV, f->H, f->D, f->max_ctx),
                        &f->dec_ws, err)))
        return rc;
    /* The decode kernel masks a block's slots past the head's length, but
     * its tensor-core path multiplies them by zero first: NaN bit patterns
     * left in fresh device memory would survive that, so start from zeros
     * (appends and uploads only ever write finite values). */
    if ((rc = ekv_cuda_memset(f->ctx, ekv_cuda_kv_base(f->pool), 0,
                              (size_t)per_head * f->L * f->HKV * ekv_cuda_kv_block_bytes(f->pool),
                              err)))
        return rc;
    f->k_host = malloc((size_t)f->L * B * KV * sizeof(float));
    f->v_host = malloc((size_t)f->L * B * KV * sizeof(float));
    f->q_host = malloc(B * Qd * sizeof(float));
    if (!f->k_host || !f->v_host || !f->q_host)
        return ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
    return EKV_OK;
}

static ekv_status fwd_forward(void *state, ekv_runtime *rt, const model_batch *b, float *logits,
                              ekv_error *err);

static const model_backend CUDA_BACKEND = {
    .name = "cuda",
    .forward = fwd_forward,
    .forget_seq = fwd_forget,
    .destroy = fwd_destroy,
};

ekv_runtime *model_runtime_create_cuda(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                       int device, int64_t kv_tokens, ekv_error *err)
{
    const ekv_model_config *c = model_config(m);
    if (!ekv_cuda_available()) {
        ekv_error_set(err, EKV_EUNSUPPORTED, "no usable CUDA device: %s",
                      ekv_cuda_unavailable_reason());
        return NULL;
    }
    const int32_t G = c->n_kv_heads > 0 ? c->n_heads / c->n_kv_heads : 0;
    if (G < 1 || G > 8 || c->n_heads % c->n_kv_heads ||
        (c->head_dim != 64 && c->head_dim != 128 && c->head_dim != 256) ||
        c->rope_dim > c->head_dim) {
        ekv_error_set(err, EKV_EUNSUPPORTED,
                      "cuda forward: %d query heads over %d KV heads of dimension %d (the "
                      "decode kernel takes groups up to 8 and head_dim 64 / 128 / 256)",
                      c->n_heads, c->n_kv_heads, c->head_dim);
        return NULL;
    }
    /* the CPU runtime holds the host side (validation, the tap's threads);
     * one thread: nothing heavy runs on the host */
    ekv_runtime *rt = model_runtime_create(m, max_batch, max_ctx, 1, err);
    if (!rt)
        return NULL;
    cuda_fwd *f = calloc(1, sizeof *f);
    if (!f) {
        ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
        model_runtime_free(rt);
        return NULL;
    }
    *f = (cuda_fwd){.m = m, .B = max_batch, .max_ctx = max_ctx, .L = c->n_layers,
                    .E = c->n_embd, .H = c->n_heads, .HKV = c->n_kv_heads, .D = c->head_dim,
                    .F = c->n_ff, .V = c->n_vocab, .bt = MODEL_KV_BLOCK_TOKENS};
    f->max_blocks = (max_ctx + f->bt - 1) / f->bt;
    ekv_status rc = ekv_cuda_create(device, &f->ctx, err);
    if (!rc)
        rc = fwd_upload(f, err);
    if (!rc)
        rc = fwd_buffers(f, kv_tokens > 0 ? kv_tokens : max_ctx, err);
    if (rc) {
        fwd_destroy(f);
        model_runtime_free(rt);
        return NULL;
    }
    model_runtime_set_backend(rt, &CUDA_BACKEND, f);
    return rt;
}

/* ---- the device sequences ---- */

static cuda_seq *seq_find(cuda_fwd *f, const kv_seq *seq)
{
    for (int32_t i = 0; i < f->n_seqs; i++)
        if (f->seqs[i].seq == seq)
            return &f->seqs[i];
    return NULL;
}

static cuda_seq *seq_add(cuda_fwd *f, const kv_seq *seq, ekv_error *err)
{
    if (f->n_seqs == f->cap_seqs) {
        const int32_t cap = f->cap_seqs ? 2 * f->cap_seqs : 8;
        cuda_seq *ns = realloc(f->seqs, (size_t)cap * sizeof *ns);
        if (!ns)
            goto nomem;
        f->seqs = ns;
        f->cap_seqs = cap;
    }
    const size_t nh = (size_t)f->L * f->HKV;
    cuda_seq s = {.seq = seq, .n_tok = calloc(nh, sizeof(int32_t)),
                  .n_blk = calloc(nh, sizeof(int32_t)),
                  .ids = malloc(nh * f->max_blocks * sizeof(int32_t))};
    if (!s.n_tok || !s.n_blk || !s.ids) {
        free(s.n_tok);
        free(s.n_blk);
        free(s.ids);
        goto nomem;
    }
    f->seqs[f->n_seqs] = s;
    return &f->seqs[f->n_seqs++];
nomem:
    ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
    return NULL;
}

/* Frees device blocks by dropping the least recently used sequences that
 * are not in this forward (used < f->clock) until `need` blocks are free. */
static bool evict_for(cuda_fwd *f, int64_t need)
{
    while (ekv_cuda_kv_free_blocks(f->pool) < need) {
        int32_t victim = -1;
        for (int32_t i = 0; i < f->n_seqs; i++)
            if (f->seqs[i].used < f->clock &&
                (victim < 0 || f->seqs[i].used < f->seqs[victim].used))
                victim = i;
        if (victim < 0)
            return false;
        seq_drop(f, victim);
    }
    return true;
}

/* Makes the device copy of seq equal to the host's (rebuilt from the host
 * views when any head's length differs). */
static ekv_status seq_sync(cuda_fwd *f, cuda_seq *s, const kv_seq *seq, ekv_error *err)
{
    const int32_t nh = f->L * f->HKV;
    bool same = true;
    int64_t need = 0;
    for (int32_t i = 0; i < nh; i++) {
        const int32_t n = kv_seq_len(seq, i / f->HKV, i % f->HKV);
        same = same && n == s->n_tok[i];
        need += (n + f->bt - 1) / f->bt;
    }
    if (same)
        return EKV_OK;
    seq_release(f, s);
    if (!evict_for(f, need))
        return ekv_error_set(err, EKV_ENOMEM, "cuda forward: device KV pool: a sequence of "
                                              "%lld blocks does not fit (%lld free)",
                             (long long)need, (long long)ekv_cuda_kv_free_blocks(f->pool));
    for (int32_t i = 0; i < nh; i++) {
        kern_kv_view view;
        kv_seq_view(seq, i / f->HKV, i % f->HKV, &view);
        if (view.n_tokens == 0)
            continue;
        ekv_status rc = ekv_cuda_kv_upload_view(f->pool, &view, s->ids + (size_t)i * f->max_blocks,
                                                err);
        if (rc)
            return rc;
        s->n_tok[i] = view.n_tokens;
        s->n_blk[i] = (view.n_tokens + f->bt - 1) / f->bt;
    }
    return EKV_OK;
}

/* ---- one forward ---- */

/* The batch's distinct sequences in order of first appearance, each with
 * its device entry and its row count. */
typedef struct batch_seq {
    const kv_seq *seq;
    int32_t entry; /* index into f->seqs (stable within a forward: no drops after prepare) */
    int32_t count;
    int32_t seen;  /* rows placed so far */
} batch_seq;

/* Where a forward's ints live in meta (host and device alike). */
typedef struct meta_layout {
    size_t tokens, pos, slot, table, table_off, n_tokens, out_rows, total;
    size_t n_table;
} meta_layout;

static ekv_status check_support(const model_batch *b, ekv_error *err)
{
    if (b->probe)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "cuda forward: decode-time attention probes (SCOPE) run on the CPU "
                             "only");
    for (int32_t i = 0; i < b->n; i++)
        if (kv_seq_recall(model_batch_seq(b, i)))
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "cuda forward: recall (kv.recall) runs on the CPU only");
    return EKV_OK;
}

/* Syncs every sequence of the batch, takes the blocks the new rows need
 * and fills the host meta: tokens, positions, each (layer, row, head)'s
 * append slot, the block tables and per (layer, row, head) table offset and
 * length after the append, and the rows whose logits are wanted. On error
 * the batch's device entries are dropped (rebuilt from the host later). */
static ekv_status prepare(cuda_fwd *f, const model_batch *b, batch_seq *bs, int32_t *n_bs,
                          meta_layout *ml, int32_t *n_out, int32_t *max_tokens, ekv_error *err)
{
    const int32_t n = b->n, L = f->L, HKV = f->HKV, nh = L * HKV;
    ekv_status rc = EKV_OK;
    int32_t u = 0;
    for (int32_t i = 0; i < n; i++) {
        const kv_seq *seq = model_batch_seq(b, i);
        int32_t j = 0;
        while (j < u && bs[j].seq != seq)
            j++;
        if (j == u)
            bs[u++] = (batch_seq){.seq = seq, .entry = -1};
        bs[j].count++;
    }
    *n_bs = u;
    f->clock++;
    for (int32_t j = 0; j < u; j++) { /* mark first: eviction spares the whole batch */
        cuda_seq *s = seq_find(f, bs[j].seq);
        if (s)
            s->used = f->clock;
    }
    for (int32_t j = 0; j < u && !rc; j++) {
        cuda_seq *s = seq_find(f, bs[j].seq);
        if (!s && !(s = seq_add(f, bs[j].seq, err)))
            return EKV_ENOMEM;
        s->used = f->clock;
        rc = seq_sync(f, s, bs[j].seq, err);
    }
    int64_t need = 0;
    for (int32_t j = 0; j < u && !rc; j++) {
        cuda_seq *s = seq_find(f, bs[j].seq);
        bs[j].entry = (int32_t)(s - f->seqs);
        for (int32_t i = 0; i < nh; i++) {
            const int32_t after = s->n_tok[i] + bs[j].count;
            if (after > f->max_blocks * f->bt)
                rc = ekv_error_set(err, EKV_ERANGE, "cuda forward: %d tokens in a head (max %d)",
                                   after, f->max_ctx);
            need += (after + f->bt - 1) / f->bt - s->n_blk[i];
        }
    }
    if (!rc && !evict_for(f, need))
        rc = ekv_error_set(err, EKV_ENOMEM,
                           "cuda forward: device KV pool: the batch needs %lld blocks, %lld free",
                           (long long)need, (long long)ekv_cuda_kv_free_blocks(f->pool));
    /* entries may have moved in f->seqs while evicting: look them up again */
    ml->n_table = 0;
    for (int32_t j = 0; j < u && !rc; j++) {
        cuda_seq *s = seq_find(f, bs[j].seq);
        bs[j].entry = (int32_t)(s - f->seqs);
        for (int32_t i = 0; i < nh && !rc; i++) {
            const int32_t want = (s->n_tok[i] + bs[j].count + f->bt - 1) / f->bt;
            const int32_t more = want - s->n_blk[i];
            if (more > 0 && !(rc = ekv_cuda_kv_alloc(f->pool, more,
                                                     s->ids + (size_t)i * f->max_blocks +
                                                         s->n_blk[i],
                                                     err)))
                s->n_blk[i] = want;
            ml->n_table += (size_t)want;
        }
    }
    if (rc)
        goto fail;
    /* layout */
    const size_t items = (size_t)n * HKV;
    ml->tokens = 0;
    ml->pos = ml->tokens + (size_t)n;
    ml->slot = ml->pos + (size_t)n;
    ml->table = ml->slot + (size_t)L * items;
    ml->table_off = ml->table + ml->n_table;
    ml->n_tokens = ml->table_off + (size_t)L * items;
    ml->out_rows = ml->n_tokens + (size_t)L * items;
    ml->total = ml->out_rows + (size_t)n;
    if (ml->total > f->meta_cap) {
        int32_t *nh_ = realloc(f->meta_h, ml->total * sizeof *nh_);
        if (!nh_) {
            rc = ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
            goto fail;
        }
        f->meta_h = nh_;
        ekv_cuda_free(f->meta_d);
        f->meta_d = NULL;
        f->meta_cap = 0;
        if ((rc = ekv_cuda_malloc(f->ctx, ml->total * sizeof(int32_t), (void **)&f->meta_d, err)))
            goto fail;
        f->meta_cap = ml->total;
    }
    int32_t *mh = f->meta_h;
    memcpy(mh + ml->tokens, b->tokens, (size_t)n * sizeof *mh);
    memcpy(mh + ml->pos, b->pos, (size_t)n * sizeof *mh);
    /* tables: each (sequence, layer, head)'s run, and where it starts */
    size_t *run = malloc((size_t)u * nh * sizeof *run);
    if (!run) {
        rc = ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
        goto fail;
    }
    size_t t = 0;
    for (int32_t j = 0; j < u; j++) {
        const cuda_seq *s = &f->seqs[bs[j].entry];
        for (int32_t i = 0; i < nh; i++) {
            run[(size_t)j * nh + i] = t;
            memcpy(mh + ml->table + t, s->ids + (size_t)i * f->max_blocks,
                   (size_t)s->n_blk[i] * sizeof *mh);
            t += (size_t)s->n_blk[i];
        }
    }
    *max_tokens = 0;
    for (int32_t r = 0; r < n; r++) {
        const kv_seq *seq = model_batch_seq(b, r);
        int32_t j = 0;
        while (bs[j].seq != seq)
            j++;
        const cuda_seq *s = &f->seqs[bs[j].entry];
        const int32_t k = bs[j].seen++; /* the row's place among its sequence's rows */
        for (int32_t l = 0; l < L; l++)
            for (int32_t h = 0; h < HKV; h++) {
                const int32_t i = l * HKV + h;
                const int32_t idx = s->n_tok[i] + k, after = s->n_tok[i] + bs[j].count;
                const size_t it = (size_t)l * items + (size_t)r * HKV + h;
                mh[ml->slot + it] = s->ids[(size_t)i * f->max_blocks + idx / f->bt] * f->bt +
                                    idx % f->bt;
                mh[ml->table_off + it] = (int32_t)run[(size_t)j * nh + i];
                mh[ml->n_tokens + it] = after;
                if (after > *max_tokens)
                    *max_tokens = after;
            }
    }
    free(run);
    *n_out = 0;
    for (int32_t r = 0; r < n; r++)
        if (b->want_logits ? b->want_logits[r] != 0 : r == n - 1)
            mh[ml->out_rows + (*n_out)++] = r;
    /* the new rows count from here: the device append below fills them */
    for (int32_t j = 0; j < u; j++) {
        cuda_seq *s = &f->seqs[bs[j].entry];
        for (int32_t i = 0; i < nh; i++)
            s->n_tok[i] += bs[j].count;
    }
    return ekv_cuda_to_device(f->ctx, f->meta_d, mh, ml->total * sizeof *mh, err);
fail:
    for (int32_t j = 0; j < u; j++)
        fwd_forget(f, bs[j].seq);
    return rc;
}

static ekv_status matmul(cuda_fwd *f, const ekv_f16 *W, int64_t n_out, int64_t k, const float *x,
                         int32_t n, float *y, ekv_error *err)
{
    ekv_status rc = ekv_cuda_f32_to_f16(f->ctx, x, f->xh, (int64_t)n * k, err);
    return rc ? rc : ekv_cuda_matmul(f->ctx, W, n_out, k, f->xh, n, y, n_out, err);
}

static ekv_status layer_forward(cuda_fwd *f, const model_batch *b, const meta_layout *ml,
                                int32_t l, int32_t max_tokens, ekv_error *err)
{
    const cuda_layer *cl = &f->layers[l];
    const int32_t n = b->n, E = f->E, Qd = f->H * f->D, KV = f->HKV * f->D;
    const size_t items = (size_t)n * f->HKV;
    float *k = f->kbuf + (size_t)l * f->B * KV, *v = f->vbuf + (size_t)l * f->B * KV;
    const int32_t *pos = f->meta_d + ml->pos;
    const ekv_model_config *c = model_config(f->m);
    ekv_status rc;
    if ((rc = ekv_cuda_rmsnorm(f->ctx, f->xb, f->x, cl->attn_norm, n, E, c->norm_eps, err)) ||
        (rc = matmul(f, cl->wq, Qd, E, f->xb, n, f->q, err)) ||
        (rc = ekv_cuda_matmul(f->ctx, cl->wk, KV, E, f->xh, n, k, KV, err)) ||
        (rc = ekv_cuda_matmul(f->ctx, cl->wv, KV, E, f->xh, n, v, KV, err)) ||
        (rc = ekv_cuda_rope(f->ctx, f->q, n, f->H, f->D, c->rope_dim, pos, c->rope_base, 0, err)) ||
        (rc = ekv_cuda_rope(f->ctx, k, n, f->HKV, f->D, c->rope_dim, pos, c->rope_base, 0, err)))
        return rc;
    if (b->tap) {
        if ((rc = ekv_cuda_to_host(f->ctx, f->q_host, f->q, (size_t)n * Qd * sizeof(float), err)))
            return rc;
        b->tap->fn(b->tap->ctx, l, b, f->q_host);
    }
    const ekv_cuda_kv_heads heads = {.n_heads = (int32_t)items,
                                     .table = f->meta_d + ml->table,
                                     .table_off = f->meta_d + ml->table_off + (size_t)l * items,
                                     .n_tokens = f->meta_d + ml->n_tokens + (size_t)l * items};
    if ((rc = ekv_cuda_kv_append(f->ctx, f->pool, k, v, n, f->HKV,
                                 f->meta_d + ml->slot + (size_t)l * items, pos, err)) ||
        (rc = ekv_cuda_decode_attention(f->ctx, f->pool, &heads, n, f->HKV, f->H, f->q, pos,
                                        max_tokens, 1.0f / sqrtf((float)f->D), f->att, f->dec_ws,
                                        err)) ||
        (rc = matmul(f, cl->wo, E, Qd, f->att, n, f->xb, err)) ||
        (rc = ekv_cuda_add(f->ctx, f->x, f->xb, (int64_t)n * E, err)) ||
        (rc = ekv_cuda_rmsnorm(f->ctx, f->xb, f->x, cl->ffn_norm, n, E, c->norm_eps, err)) ||
        (rc = matmul(f, cl->w_gate, f->F, E, f->xb, n, f->gate, err)) ||
        (rc = ekv_cuda_matmul(f->ctx, cl->w_up, f->F, E, f->xh, n, f->up, f->F, err)) ||
        (rc = ekv_cuda_swiglu(f->ctx, f->gate, f->up, (int64_t)n * f->F, err)) ||
        (rc = matmul(f, cl->w_down, E, f->F, f->gate, n, f->xb, err)))
        return rc;
    return ekv_cuda_add(f->ctx, f->x, f->xb, (int64_t)n * E, err);
}

/* Appends the batch's K and V (copied back from the device) to the host
 * sequences, layer by layer, row by row, as llama.c's append_kv does. */
static ekv_status host_append(cuda_fwd *f, const model_batch *b, ekv_error *err)
{
    const int32_t n = b->n, KV = f->HKV * f->D;
    const size_t stride = (size_t)f->B * KV;
    ekv_status rc;
    for (int32_t l = 0; l < f->L; l++)
        if ((rc = ekv_cuda_to_host(f->ctx, f->k_host + l * stride, f->kbuf + l * stride,
                                   (size_t)n * KV * sizeof(float), err)) ||
            (rc = ekv_cuda_to_host(f->ctx, f->v_host + l * stride, f->vbuf + l * stride,
                                   (size_t)n * KV * sizeof(float), err)))
            return rc;
    for (int32_t l = 0; l < f->L; l++)
        for (int32_t i = 0; i < n; i++)
            for (int32_t h = 0; h < f->HKV; h++) {
                const size_t off = l * stride + ((size_t)i * f->HKV + h) * f->D;
                if ((rc = kv_seq_append(model_batch_seq(b, i), l, h, f->k_host + off,
                                        f->v_host + off, b->pos[i], err)))
                    return rc;
            }
    return EKV_OK;
}

static ekv_status fwd_forward(void *state, ekv_runtime *rt, const model_batch *b, float *logits,
                              ekv_error *err)
{
    cuda_fwd *f = state;
    (void)rt;
    const ekv_model_config *c = model_config(f->m);
    ekv_status rc = check_support(b, err);
    if (rc)
        return rc;
    batch_seq *bs = calloc(b->n > 0 ? (size_t)b->n : 1, sizeof *bs); /* n > 0: check_batch */
    if (!bs)
        return ekv_error_set(err, EKV_ENOMEM, "cuda forward: out of host memory");
    meta_layout ml = {0};
    int32_t n_bs = 0, n_out = 0, max_tokens = 0;
    if ((rc = prepare(f, b, bs, &n_bs, &ml, &n_out, &max_tokens, err)))
        goto drop;
    if ((rc = ekv_cuda_embed(f->ctx, f->tok_embd, f->V, f->E, f->meta_d + ml.tokens, b->n, f->x,
                             err)))
        goto drop;
    for (int32_t l = 0; l < f->L; l++)
        if ((rc = layer_forward(f, b, &ml, l, max_tokens, err)))
            goto drop;
    if (logits && n_out > 0) {
        if ((rc = ekv_cuda_gather_rows(f->ctx, f->xb, f->x, f->meta_d + ml.out_rows, n_out, f->E,
                                       err)) ||
            (rc = ekv_cuda_rmsnorm(f->ctx, f->xb, f->xb, f->out_norm, n_out, f->E, c->norm_eps,
                                   err)) ||
            (rc = matmul(f, f->output, f->V, f->E, f->xb, n_out, f->logits, err)) ||
            (rc = ekv_cuda_to_host(f->ctx, logits, f->logits,
                                   (size_t)n_out * f->V * sizeof(float), err)))
            goto drop;
    }
    if ((rc = ekv_cuda_sync(f->ctx, err)) || (rc = host_append(f, b, err)))
        goto drop;
    goto out;
drop: /* the device copies are ahead of the host now: rebuild them next time */
    for (int32_t j = 0; j < n_bs; j++)
        fwd_forget(f, bs[j].seq);
out:
    free(bs);
    return rc;
}
