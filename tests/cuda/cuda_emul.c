/*
 * cuda_emul.c - the cuda.h calls the CUDA forward pass makes
 * (model/cuda/llama_cuda.c), emulated on the host, so that its host logic
 * (block tables, append slots, the device KV cache's sync with the host
 * kv_seq, eviction, the rows of a mixed batch) runs in CI where no GPU is:
 * cuda.test_cuda_forward_emul links this file instead of kernels/cuda/.
 *
 * Each function follows its contract in include/entrokv/cuda.h (written
 * from the header, not from the .cu files): "device memory" is host memory
 * (filled with a garbage pattern when allocated, so a read of something the
 * forward never wrote shows), the pool keeps kv/kvcache.c's block layout
 * and hands ids out 0, 1, 2, ... first, GEMMs take fp16 operands with a
 * double accumulator, decode attention is the plain softmax over each
 * head's tokens with position <= the query's. What it cannot check is the
 * kernels themselves: tests/cuda/test_cuda_*.c do that on a GPU.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/cuda.h"
#include "entrokv/kernels.h"

struct ekv_cuda {
    int device;
};

struct ekv_cuda_kv_pool {
    int32_t bt, d;
    int64_t n_blocks;
    size_t block_bytes;
    uint8_t *mem;
    int32_t *free_ids; /* stack: the top is free_ids[n_free - 1] */
    int64_t n_free;
};

bool ekv_cuda_available(void) { return true; }
const char *ekv_cuda_unavailable_reason(void) { return ""; }

ekv_status ekv_cuda_create(int device, ekv_cuda **out, ekv_error *err)
{
    if (!(*out = calloc(1, sizeof **out)))
        return ekv_error_set(err, EKV_ENOMEM, "emul: out of memory");
    (*out)->device = device;
    return EKV_OK;
}

void ekv_cuda_destroy(ekv_cuda *ctx) { free(ctx); }
ekv_status ekv_cuda_sync(ekv_cuda *ctx, ekv_error *err)
{
    (void)ctx;
    (void)err;
    return EKV_OK;
}

ekv_status ekv_cuda_malloc(ekv_cuda *ctx, size_t bytes, void **dptr, ekv_error *err)
{
    (void)ctx;
    *dptr = malloc(bytes ? bytes : 1);
    if (!*dptr)
        return ekv_error_set(err, EKV_ENOMEM, "emul: cannot allocate %zu bytes", bytes);
    memset(*dptr, 0xA5, bytes); /* NaN-like floats, huge ints: uninitialised reads show */
    return EKV_OK;
}

void ekv_cuda_free(void *dptr) { free(dptr); }

ekv_status ekv_cuda_to_device(ekv_cuda *ctx, void *dst, const void *src, size_t bytes,
                              ekv_error *err)
{
    (void)ctx;
    (void)err;
    memcpy(dst, src, bytes);
    return EKV_OK;
}

ekv_status ekv_cuda_to_host(ekv_cuda *ctx, void *dst, const void *src, size_t bytes,
                            ekv_error *err)
{
    return ekv_cuda_to_device(ctx, dst, src, bytes, err);
}

ekv_status ekv_cuda_memset(ekv_cuda *ctx, void *dptr, int value, size_t bytes, ekv_error *err)
{
    (void)ctx;
    (void)err;
    memset(dptr, value, bytes);
    return EKV_OK;
}

/* ---- weights, GEMM ---- */

bool ekv_cuda_dequant_supports(uint32_t type)
{
    return type == EKV_F32 || type == EKV_F16 || type == EKV_Q4_0 || type == EKV_Q4_1 ||
           type == EKV_Q8_0 || type == EKV_Q4_K || type == EKV_Q6_K;
}

ekv_status ekv_cuda_upload_weight(ekv_cuda *ctx, const void *W, uint32_t type, int64_t n,
                                  int64_t k, ekv_f16 **out, ekv_error *err)
{
    float *row = malloc((size_t)k * sizeof *row);
    ekv_status rc = row ? ekv_cuda_malloc(ctx, (size_t)(n * k) * sizeof(ekv_f16), (void **)out, err)
                        : ekv_error_set(err, EKV_ENOMEM, "emul: out of memory");
    for (int64_t r = 0; r < n && !rc; r++) {
        if ((rc = kern_get_row(W, type, k, r, row, err)))
            break;
        for (int64_t j = 0; j < k; j++)
            (*out)[r * k + j] = ekv_f32_to_f16(row[j]);
    }
    free(row);
    return rc;
}

ekv_status ekv_cuda_matmul(ekv_cuda *ctx, const ekv_f16 *W, int64_t n, int64_t k,
                           const ekv_f16 *X, int64_t m, float *Y, int64_t ldy, ekv_error *err)
{
    (void)ctx;
    (void)err;
    float *w = malloc((size_t)k * sizeof *w), *x = malloc((size_t)(m * k) * sizeof *x);
    if (!w || !x) {
        free(w);
        free(x);
        return ekv_error_set(err, EKV_ENOMEM, "emul: out of memory");
    }
    for (int64_t i = 0; i < m * k; i++)
        x[i] = ekv_f16_to_f32(X[i]);
    for (int64_t j = 0; j < n; j++) {
        for (int64_t c = 0; c < k; c++)
            w[c] = ekv_f16_to_f32(W[j * k + c]);
        for (int64_t i = 0; i < m; i++) {
            double s = 0;
            for (int64_t c = 0; c < k; c++)
                s += (double)w[c] * x[i * k + c];
            Y[i * ldy + j] = (float)s;
        }
    }
    free(w);
    free(x);
    return EKV_OK;
}

ekv_status ekv_cuda_f32_to_f16(ekv_cuda *ctx, const float *src, ekv_f16 *dst, int64_t n,
                               ekv_error *err)
{
    (void)ctx;
    (void)err;
    for (int64_t i = 0; i < n; i++)
        dst[i] = ekv_f32_to_f16(src[i]);
    return EKV_OK;
}

/* ---- element-wise ---- */

ekv_status ekv_cuda_rmsnorm(ekv_cuda *ctx, float *out, const float *x, const float *w,
                            int64_t n_rows, int n, float eps, ekv_error *err)
{
    (void)ctx;
    float *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp)
        return ekv_error_set(err, EKV_ENOMEM, "emul: out of memory");
    for (int64_t r = 0; r < n_rows; r++) { /* out may alias x */
        memcpy(tmp, x + r * n, (size_t)n * sizeof *tmp);
        kern_rmsnorm(out + r * n, tmp, w, n, eps);
    }
    free(tmp);
    return EKV_OK;
}

ekv_status ekv_cuda_rope(ekv_cuda *ctx, float *x, int n_tok, int n_heads, int d, int n_rot,
                         const int32_t *pos, float freq_base, int neox, ekv_error *err)
{
    (void)ctx;
    (void)err;
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_heads; h++)
            kern_rope(x + ((size_t)t * n_heads + h) * d, d, n_rot, pos[t], freq_base, neox);
    return EKV_OK;
}

ekv_status ekv_cuda_swiglu(ekv_cuda *ctx, float *g, const float *u, int64_t n, ekv_error *err)
{
    (void)ctx;
    (void)err;
    kern_swiglu(g, u, (int)n);
    return EKV_OK;
}

ekv_status ekv_cuda_embed(ekv_cuda *ctx, const ekv_f16 *table, int64_t n_vocab, int dim,
                          const int32_t *tokens, int n, float *out, ekv_error *err)
{
    (void)ctx;
    (void)err;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < dim; j++)
            out[(size_t)i * dim + j] = tokens[i] >= 0 && tokens[i] < n_vocab
                                           ? ekv_f16_to_f32(table[(size_t)tokens[i] * dim + j])
                                           : 0.0f;
    return EKV_OK;
}

ekv_status ekv_cuda_add(ekv_cuda *ctx, float *x, const float *y, int64_t n, ekv_error *err)
{
    (void)ctx;
    (void)err;
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
    return EKV_OK;
}

ekv_status ekv_cuda_gather_rows(ekv_cuda *ctx, float *dst, const float *src, const int32_t *rows,
                                int n, int width, ekv_error *err)
{
    (void)ctx;
    (void)err;
    for (int i = 0; i < n; i++)
        memmove(dst + (size_t)i * width, src + (size_t)rows[i] * width,
                (size_t)width * sizeof *dst);
    return EKV_OK;
}

/* ---- the KV pool ---- */

static ekv_f16 *blk_k(const ekv_cuda_kv_pool *p, int32_t id)
{
    return (ekv_f16 *)(p->mem + (size_t)id * p->block_bytes);
}
static ekv_f16 *blk_v(const ekv_cuda_kv_pool *p, int32_t id)
{
    return blk_k(p, id) + (size_t)p->bt * p->d;
}
static int32_t *blk_pos(const ekv_cuda_kv_pool *p, int32_t id)
{
    return (int32_t *)(blk_k(p, id) + 2 * (size_t)p->bt * p->d);
}

ekv_status ekv_cuda_kv_pool_create(ekv_cuda *ctx, int32_t block_tokens, int32_t head_dim,
                                   int64_t n_blocks, ekv_cuda_kv_pool **out, ekv_error *err)
{
    ekv_cuda_kv_pool *p = calloc(1, sizeof *p);
    if (!p)
        return ekv_error_set(err, EKV_ENOMEM, "emul: out of memory");
    p->bt = block_tokens;
    p->d = head_dim;
    p->n_blocks = n_blocks;
    p->block_bytes = ((size_t)4 * block_tokens * head_dim + 4 * (size_t)block_tokens + 63) &
                     ~(size_t)63;
    p->free_ids = malloc((size_t)n_blocks * sizeof *p->free_ids);
    ekv_status rc = p->free_ids ? ekv_cuda_malloc(ctx, (size_t)n_blocks * p->block_bytes,
                                                  (void **)&p->mem, err)
                                : ekv_error_set(err, EKV_ENOMEM, "emul: out of memory");
    if (rc) {
        ekv_cuda_kv_pool_destroy(p);
        return rc;
    }
    for (int64_t i = 0; i < n_blocks; i++) /* 0 on top */
        p->free_ids[i] = (int32_t)(n_blocks - 1 - i);
    p->n_free = n_blocks;
    *out = p;
    return EKV_OK;
}

void ekv_cuda_kv_pool_destroy(ekv_cuda_kv_pool *pool)
{
    if (!pool)
        return;
    free(pool->mem);
    free(pool->free_ids);
    free(pool);
}

int64_t ekv_cuda_kv_free_blocks(const ekv_cuda_kv_pool *pool) { return pool->n_free; }
size_t ekv_cuda_kv_block_bytes(const ekv_cuda_kv_pool *pool) { return pool->block_bytes; }
void *ekv_cuda_kv_base(const ekv_cuda_kv_pool *pool) { return pool->mem; }

ekv_status ekv_cuda_kv_alloc(ekv_cuda_kv_pool *pool, int32_t n, int32_t *ids, ekv_error *err)
{
    if (n > pool->n_free)
        return ekv_error_set(err, EKV_ENOMEM, "emul pool: %d blocks wanted, %lld free", n,
                             (long long)pool->n_free);
    for (int32_t i = 0; i < n; i++)
        ids[i] = pool->free_ids[--pool->n_free];
    return EKV_OK;
}

void ekv_cuda_kv_release(ekv_cuda_kv_pool *pool, const int32_t *ids, int32_t n)
{
    for (int32_t i = 0; i < n; i++) {
        memset(blk_k(pool, ids[i]), 0xA5, pool->block_bytes); /* stale reads show */
        pool->free_ids[pool->n_free++] = ids[i];
    }
}

ekv_status ekv_cuda_kv_upload_view(ekv_cuda_kv_pool *pool, const kern_kv_view *view,
                                   int32_t *ids, ekv_error *err)
{
    if (view->packed && view->packed->n > 0)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "emul: packed view");
    if (view->block_tokens != pool->bt || view->head_dim != pool->d)
        return ekv_error_set(err, EKV_EINVAL, "emul: view geometry");
    const int32_t nb = (view->n_tokens + pool->bt - 1) / pool->bt;
    ekv_status rc = ekv_cuda_kv_alloc(pool, nb, ids, err);
    for (int32_t b = 0; b < nb && !rc; b++)
        for (int32_t s = 0; s < pool->bt; s++) {
            const int in = b * pool->bt + s < view->n_tokens;
            for (int32_t j = 0; j < pool->d; j++) {
                blk_k(pool, ids[b])[j * pool->bt + s] = in ? view->k_blocks[b][j * pool->bt + s] : 0;
                blk_v(pool, ids[b])[s * pool->d + j] = in ? view->v_blocks[b][s * pool->d + j] : 0;
            }
            blk_pos(pool, ids[b])[s] = in ? view->pos_blocks[b][s] : INT32_MAX;
        }
    return rc;
}

ekv_status ekv_cuda_kv_append(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const float *k,
                              const float *v, int n_rows, int n_kv_heads, const int32_t *slot,
                              const int32_t *pos, ekv_error *err)
{
    (void)ctx;
    for (int i = 0; i < n_rows * n_kv_heads; i++) {
        if (slot[i] < 0)
            continue;
        const int32_t id = slot[i] / pool->bt, s = slot[i] % pool->bt;
        if (id >= pool->n_blocks)
            return ekv_error_set(err, EKV_EINVAL, "emul: append slot %d outside the pool",
                                 slot[i]);
        for (int32_t j = 0; j < pool->d; j++) {
            blk_k(pool, id)[j * pool->bt + s] = ekv_f32_to_f16(k[(size_t)i * pool->d + j]);
            blk_v(pool, id)[s * pool->d + j] = ekv_f32_to_f16(v[(size_t)i * pool->d + j]);
        }
        blk_pos(pool, id)[s] = pos[i / n_kv_heads];
    }
    return EKV_OK;
}

/* ---- decode attention ---- */

size_t ekv_cuda_decode_workspace(int n_seq, int n_kv_heads, int n_q_heads, int d,
                                 int32_t max_tokens)
{
    (void)n_seq;
    (void)n_kv_heads;
    (void)n_q_heads;
    (void)d;
    return (size_t)max_tokens * sizeof(float);
}

ekv_status ekv_cuda_decode_attention(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                     const ekv_cuda_kv_heads *heads, int n_seq, int n_kv_heads,
                                     int n_q_heads, const float *Q, const int32_t *q_pos,
                                     int32_t max_tokens, float scale, float *out,
                                     void *workspace, ekv_error *err)
{
    (void)ctx;
    const int d = pool->d, bt = pool->bt, g = n_q_heads / n_kv_heads;
    float *p = workspace;
    for (int s = 0; s < n_seq; s++)
        for (int h = 0; h < n_q_heads; h++) {
            const int hi = s * n_kv_heads + h / g;
            const int32_t n = heads->n_tokens[hi];
            if (n > max_tokens)
                return ekv_error_set(err, EKV_EINVAL, "emul: head of %d tokens > max_tokens %d",
                                     n, max_tokens);
            const int32_t *tab = heads->table + heads->table_off[hi];
            const float *q = Q + ((size_t)s * n_q_heads + h) * d;
            float *o = out + ((size_t)s * n_q_heads + h) * d;
            double mx = -INFINITY, sum = 0;
            for (int32_t t = 0; t < n; t++) {
                const int32_t id = tab[t / bt], sl = t % bt;
                if (id < 0 || id >= pool->n_blocks)
                    return ekv_error_set(err, EKV_EINVAL, "emul: block id %d", id);
                if (blk_pos(pool, id)[sl] > q_pos[s]) {
                    p[t] = -INFINITY;
                    continue;
                }
                double dot = 0;
                for (int j = 0; j < d; j++)
                    dot += (double)q[j] * ekv_f16_to_f32(blk_k(pool, id)[j * bt + sl]);
                p[t] = (float)(dot * scale);
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int j = 0; j < d; j++)
                o[j] = 0.0f;
            if (mx == -INFINITY)
                continue; /* sees nothing: zeros */
            for (int32_t t = 0; t < n; t++) {
                p[t] = p[t] == -INFINITY ? 0.0f : (float)exp(p[t] - mx);
                sum += p[t];
            }
            for (int j = 0; j < d; j++) {
                double acc = 0;
                for (int32_t t = 0; t < n; t++)
                    if (p[t] != 0.0f)
                        acc += p[t] * (double)ekv_f16_to_f32(
                                          blk_v(pool, tab[t / bt])[(t % bt) * d + j]);
                o[j] = (float)(acc / sum);
            }
        }
    return EKV_OK;
}
