/*
 * model.c - loading a Llama-family GGUF: hyper-parameters, tensor lookup and
 * validation, tokenizer.
 *
 * Every tensor the forward pass touches is checked here (presence, shape,
 * type) so that model_forward can trust the layout. Weights stay in the
 * mapping.
 */
#include "model_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/kernels.h"

static ekv_status get_u32(const gguf_file *f, const char *arch, const char *key, int32_t *out,
                          bool required, int32_t dflt, ekv_error *err)
{
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    uint32_t v;
    if (!gguf_get_u32(f, full, &v)) {
        if (required)
            return ekv_error_set(err, EKV_EFORMAT, "missing or invalid metadata %s", full);
        *out = dflt;
        return EKV_OK;
    }
    if (v == 0 || v > (1u << 24))
        return ekv_error_set(err, EKV_EFORMAT, "metadata %s = %u is out of range", full, v);
    *out = (int32_t)v;
    return EKV_OK;
}

static ekv_status get_f32(const gguf_file *f, const char *arch, const char *key, float *out,
                          float dflt)
{
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    if (!gguf_get_f32(f, full, out))
        *out = dflt;
    return EKV_OK;
}

static ekv_status read_config(ekv_model *m, ekv_error *err)
{
    ekv_model_config *c = &m->cfg;
    gguf_str s;
    if (!gguf_get_str(m->gguf, "general.architecture", &s) || s.len == 0 ||
        s.len >= sizeof c->arch)
        return ekv_error_set(err, EKV_EFORMAT, "missing general.architecture");
    memcpy(c->arch, s.ptr, s.len);
    c->arch[s.len] = 0;
    if (strcmp(c->arch, "llama") != 0)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "architecture '%s' is not supported (supported: llama)", c->arch);
    if (gguf_get_str(m->gguf, "general.name", &s)) {
        size_t n = s.len < sizeof c->name - 1 ? s.len : sizeof c->name - 1;
        memcpy(c->name, s.ptr, n);
        c->name[n] = 0;
    }
    ekv_status rc;
    const gguf_file *f = m->gguf;
    if ((rc = get_u32(f, c->arch, "block_count", &c->n_layers, true, 0, err)) ||
        (rc = get_u32(f, c->arch, "embedding_length", &c->n_embd, true, 0, err)) ||
        (rc = get_u32(f, c->arch, "feed_forward_length", &c->n_ff, true, 0, err)) ||
        (rc = get_u32(f, c->arch, "attention.head_count", &c->n_heads, true, 0, err)) ||
        (rc = get_u32(f, c->arch, "attention.head_count_kv", &c->n_kv_heads, false, c->n_heads,
                      err)) ||
        (rc = get_u32(f, c->arch, "context_length", &c->n_ctx_train, false, 2048, err)))
        return rc;
    if (c->n_embd % c->n_heads || c->n_heads % c->n_kv_heads)
        return ekv_error_set(err, EKV_EFORMAT, "heads (%d, kv %d) do not divide embedding %d",
                             c->n_heads, c->n_kv_heads, c->n_embd);
    c->head_dim = c->n_embd / c->n_heads;
    if ((rc = get_u32(f, c->arch, "rope.dimension_count", &c->rope_dim, false, c->head_dim, err)))
        return rc;
    if (c->rope_dim > c->head_dim || c->rope_dim % 2)
        return ekv_error_set(err, EKV_EFORMAT, "rope dimension %d invalid for head_dim %d",
                             c->rope_dim, c->head_dim);
    get_f32(f, c->arch, "rope.freq_base", &c->rope_base, 10000.0f);
    get_f32(f, c->arch, "attention.layer_norm_rms_epsilon", &c->norm_eps, 1e-5f);
    if (!(c->rope_base > 0.0f) || !(c->norm_eps > 0.0f) || c->norm_eps > 1.0f)
        return ekv_error_set(err, EKV_EFORMAT, "rope base %g / norm eps %g out of range",
                             c->rope_base, c->norm_eps);
    return EKV_OK;
}

/* Finds name and checks it is a 2-D (or 1-D when cols == 0) tensor of the
 * given shape; ne[0] is the input (contiguous) dimension. */
static ekv_status find_weight(ekv_model *m, const char *name, int64_t cols, int64_t rows,
                              bool optional, ekv_weight *w, ekv_error *err)
{
    const gguf_tensor *t = gguf_find_tensor(m->gguf, name);
    memset(w, 0, sizeof *w);
    if (!t) {
        if (optional)
            return EKV_OK;
        return ekv_error_set(err, EKV_EFORMAT, "tensor %s is missing", name);
    }
    if ((int64_t)t->ne[0] != cols || (int64_t)t->ne[1] != rows || t->ne[2] != 1 || t->ne[3] != 1)
        return ekv_error_set(err, EKV_EFORMAT,
                             "tensor %s has shape [%llu, %llu, %llu, %llu], expected [%lld, %lld]",
                             name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                             (unsigned long long)t->ne[2], (unsigned long long)t->ne[3],
                             (long long)cols, (long long)rows);
    if (!kern_matmul_supports(t->type)) {
        const ekv_dtype_info *info = ekv_dtype_get(t->type);
        return ekv_error_set(err, EKV_EUNSUPPORTED, "tensor %s has type %s, which has no kernel",
                             name, info ? info->name : "unknown");
    }
    w->data = t->data;
    w->type = t->type;
    w->n_rows = rows;
    w->n_cols = cols;
    m->weight_bytes += t->nbytes;
    return EKV_OK;
}

static ekv_status find_norm(ekv_model *m, const char *name, int64_t n, const float **out,
                            ekv_error *err)
{
    const gguf_tensor *t = gguf_find_tensor(m->gguf, name);
    if (!t)
        return ekv_error_set(err, EKV_EFORMAT, "tensor %s is missing", name);
    if (t->type != EKV_F32 || (int64_t)t->ne[0] != n || t->ne[1] != 1 || t->ne[2] != 1 ||
        t->ne[3] != 1)
        return ekv_error_set(err, EKV_EFORMAT, "tensor %s must be F32 of %lld elements", name,
                             (long long)n);
    *out = t->data;
    m->weight_bytes += t->nbytes;
    return EKV_OK;
}

static ekv_status find_layer(ekv_model *m, int32_t l, ekv_error *err)
{
    const ekv_model_config *c = &m->cfg;
    ekv_layer *L = &m->layers[l];
    const int64_t E = c->n_embd, Q = (int64_t)c->n_heads * c->head_dim,
                  KV = (int64_t)c->n_kv_heads * c->head_dim, F = c->n_ff;
    char name[96];
    ekv_status rc;
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d." suffix, l), name)
    if ((rc = find_norm(m, NAME("attn_norm.weight"), E, &L->attn_norm, err)) ||
        (rc = find_weight(m, NAME("attn_q.weight"), E, Q, false, &L->wq, err)) ||
        (rc = find_weight(m, NAME("attn_k.weight"), E, KV, false, &L->wk, err)) ||
        (rc = find_weight(m, NAME("attn_v.weight"), E, KV, false, &L->wv, err)) ||
        (rc = find_weight(m, NAME("attn_output.weight"), Q, E, false, &L->wo, err)) ||
        (rc = find_norm(m, NAME("ffn_norm.weight"), E, &L->ffn_norm, err)) ||
        (rc = find_weight(m, NAME("ffn_gate.weight"), E, F, false, &L->w_gate, err)) ||
        (rc = find_weight(m, NAME("ffn_up.weight"), E, F, false, &L->w_up, err)) ||
        (rc = find_weight(m, NAME("ffn_down.weight"), F, E, false, &L->w_down, err)))
        return rc;
#undef NAME
    return EKV_OK;
}

ekv_model *model_load(const char *path, ekv_error *err)
{
    kern_init();
    ekv_model *m = calloc(1, sizeof *m);
    if (!m) {
        ekv_error_set(err, EKV_ENOMEM, "out of memory");
        return NULL;
    }
    m->gguf = gguf_open(path, err);
    if (!m->gguf)
        goto fail;
    if (read_config(m, err))
        goto fail;
    ekv_model_config *c = &m->cfg;
    const gguf_tensor *emb = gguf_find_tensor(m->gguf, "token_embd.weight");
    if (!emb) {
        ekv_error_set(err, EKV_EFORMAT, "tensor token_embd.weight is missing");
        goto fail;
    }
    if (emb->ne[1] == 0 || emb->ne[1] > (1u << 24)) {
        ekv_error_set(err, EKV_EFORMAT, "token_embd.weight has an implausible vocabulary");
        goto fail;
    }
    c->n_vocab = (int32_t)emb->ne[1];
    if (find_weight(m, "token_embd.weight", c->n_embd, c->n_vocab, false, &m->tok_embd, err) ||
        find_norm(m, "output_norm.weight", c->n_embd, &m->out_norm, err) ||
        find_weight(m, "output.weight", c->n_embd, c->n_vocab, true, &m->output, err))
        goto fail;
    if (!m->output.data)
        m->output = m->tok_embd; /* tied embeddings */
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) {
        ekv_error_set(err, EKV_ENOMEM, "out of memory");
        goto fail;
    }
    for (int32_t l = 0; l < c->n_layers; l++)
        if (find_layer(m, l, err))
            goto fail;
    m->tok = tok_load(m->gguf, err);
    if (!m->tok)
        goto fail;
    if (tok_vocab_size(m->tok) != c->n_vocab) {
        ekv_error_set(err, EKV_EFORMAT, "tokenizer has %d tokens but the embedding has %d rows",
                      tok_vocab_size(m->tok), c->n_vocab);
        goto fail;
    }
    return m;
fail:
    ekv_error_wrap(err, "%s", path);
    model_free(m);
    return NULL;
}

void model_free(ekv_model *m)
{
    if (!m)
        return;
    tok_free(m->tok);
    free(m->layers);
    gguf_close(m->gguf);
    free(m);
}

const ekv_model_config *model_config(const ekv_model *m) { return &m->cfg; }
const ekv_tokenizer *model_tokenizer(const ekv_model *m) { return m->tok; }
const gguf_file *model_gguf(const ekv_model *m) { return m->gguf; }
uint64_t model_weight_bytes(const ekv_model *m) { return m->weight_bytes; }

kv_pool *model_kv_pool_create(const ekv_model *m, int32_t n_tokens, ekv_error *err)
{
    const model_shard whole = {.size = 1, .n_kv_heads = m->cfg.n_kv_heads};
    return model_kv_pool_create_shard(m, &whole, n_tokens, err);
}
