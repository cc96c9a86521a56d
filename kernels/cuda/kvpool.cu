/*
 * kvpool.cu - the device KV block pool: kv/kvcache.c's block layout in
 * GPU memory, a host-side free stack of block ids, uploads from host views,
 * gather / scatter of whole blocks to contiguous (pinned host) buffers for
 * the KV store tier, and out-of-place compaction after selection.
 *
 * Block = K [head_dim][bt] fp16 (transposed), V [bt][head_dim] fp16, pos [bt]
 * int32, rounded up to 64 bytes: a block copied to the host byte for byte is
 * a kv/kvcache.c block.
 */
#include "cuda_internal.cuh"

#include <stdlib.h>
#include <string.h>

ekv_status ekv_cuda_kv_pool_create(ekv_cuda *ctx, int32_t block_tokens, int32_t head_dim,
                                   int64_t n_blocks, ekv_cuda_kv_pool **out, ekv_error *err)
{
    *out = NULL;
    if (block_tokens <= 0 || head_dim <= 0 || n_blocks <= 0 || n_blocks > INT32_MAX ||
        block_tokens > 4096 || head_dim > 4096)
        return ekv_error_set(err, EKV_EINVAL, "cuda kv pool: bad geometry");
    ekv_cuda_kv_pool *p = (ekv_cuda_kv_pool *)calloc(1, sizeof *p);
    if (!p)
        return ekv_error_set(err, EKV_ENOMEM, "cuda kv pool: out of host memory");
    p->ctx = ctx;
    p->block_tokens = block_tokens;
    p->head_dim = head_dim;
    p->n_blocks = n_blocks;
    const size_t bytes = 2 * (size_t)block_tokens * head_dim * 2 + (size_t)block_tokens * 4;
    p->block_bytes = (bytes + 63) & ~(size_t)63;
    p->free_ids = (int32_t *)malloc((size_t)n_blocks * sizeof *p->free_ids);
    ekv_status rc = p->free_ids ? EKV_OK
                                : ekv_error_set(err, EKV_ENOMEM, "cuda kv pool: out of host memory");
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)n_blocks * p->block_bytes, (void **)&p->mem, err);
    if (rc != EKV_OK) {
        ekv_cuda_kv_pool_destroy(p);
        return rc;
    }
    for (int64_t i = 0; i < n_blocks; i++) /* pop order 0, 1, 2, ... */
        p->free_ids[i] = (int32_t)(n_blocks - 1 - i);
    p->n_free = n_blocks;
    *out = p;
    return EKV_OK;
}

void ekv_cuda_kv_pool_destroy(ekv_cuda_kv_pool *pool)
{
    if (!pool)
        return;
    ekv_cuda_free(pool->mem);
    free(pool->free_ids);
    free(pool);
}

size_t ekv_cuda_kv_block_bytes(const ekv_cuda_kv_pool *pool) { return pool->block_bytes; }
int64_t ekv_cuda_kv_free_blocks(const ekv_cuda_kv_pool *pool) { return pool->n_free; }
void *ekv_cuda_kv_base(const ekv_cuda_kv_pool *pool) { return pool->mem; }

ekv_status ekv_cuda_kv_alloc(ekv_cuda_kv_pool *pool, int32_t n, int32_t *ids, ekv_error *err)
{
    if (n < 0 || n > pool->n_free)
        return ekv_error_set(err, EKV_ENOMEM, "cuda kv pool: %d blocks wanted, %lld free", n,
                             (long long)pool->n_free);
    for (int32_t i = 0; i < n; i++)
        ids[i] = pool->free_ids[--pool->n_free];
    return EKV_OK;
}

void ekv_cuda_kv_release(ekv_cuda_kv_pool *pool, const int32_t *ids, int32_t n)
{
    for (int32_t i = 0; i < n && pool->n_free < pool->n_blocks; i++)
        pool->free_ids[pool->n_free++] = ids[i];
}

/* Stages one block on the host in the device layout, then copies it. */
static ekv_status upload_block(ekv_cuda_kv_pool *pool, const kern_kv_view *view, int32_t b,
                               int32_t id, uint8_t *stage, ekv_error *err)
{
    const int32_t bt = pool->block_tokens, d = pool->head_dim;
    const int32_t rows = view->n_tokens - b * bt < bt ? view->n_tokens - b * bt : bt;
    memset(stage, 0, pool->block_bytes);
    ekv_f16 *k = (ekv_f16 *)stage, *v = (ekv_f16 *)(stage + kv_v_offset(bt, d));
    int32_t *pos = (int32_t *)(stage + kv_pos_offset(bt, d));
    for (int32_t r = 0; r < bt; r++)
        pos[r] = r < rows ? view->pos_blocks[b][r] : INT32_MAX;
    for (int32_t j = 0; j < d; j++)
        for (int32_t r = 0; r < rows; r++)
            k[(size_t)j * bt + r] = view->k_blocks[b][(size_t)j * bt + r];
    memcpy(v, view->v_blocks[b], (size_t)rows * d * sizeof(ekv_f16));
    return ekv_cuda_to_device(pool->ctx, pool->mem + (size_t)id * pool->block_bytes, stage,
                              pool->block_bytes, err);
}

ekv_status ekv_cuda_kv_upload_view(ekv_cuda_kv_pool *pool, const kern_kv_view *view,
                                   int32_t *ids, ekv_error *err)
{
    const int32_t bt = pool->block_tokens;
    if (view->block_tokens != bt || view->head_dim != pool->head_dim || view->n_tokens < 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda kv upload: view geometry differs from the pool");
    if (view->packed) /* SparK's packed rows have no block layout: spark.cu holds them */
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "cuda kv upload: the head holds packed keys (ekv_cuda_kv_upload_packed)");
    const int32_t n_blocks = (view->n_tokens + bt - 1) / bt;
    ekv_status rc = ekv_cuda_kv_alloc(pool, n_blocks, ids, err);
    if (rc != EKV_OK)
        return rc;
    uint8_t *stage = (uint8_t *)malloc(pool->block_bytes);
    if (!stage)
        rc = ekv_error_set(err, EKV_ENOMEM, "cuda kv upload: out of host memory");
    for (int32_t b = 0; rc == EKV_OK && b < n_blocks; b++)
        rc = upload_block(pool, view, b, ids[b], stage, err);
    free(stage);
    if (rc != EKV_OK)
        ekv_cuda_kv_release(pool, ids, n_blocks);
    return rc;
}

ekv_status ekv_cuda_kv_download_block(ekv_cuda_kv_pool *pool, int32_t id, ekv_f16 *k,
                                      ekv_f16 *v, int32_t *pos, ekv_error *err)
{
    const int32_t bt = pool->block_tokens, d = pool->head_dim;
    if (id < 0 || id >= pool->n_blocks)
        return ekv_error_set(err, EKV_EINVAL, "cuda kv download: bad block id %d", id);
    const uint8_t *src = pool->mem + (size_t)id * pool->block_bytes;
    ekv_status rc = ekv_cuda_to_host(pool->ctx, k, src, (size_t)bt * d * 2, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_host(pool->ctx, v, src + kv_v_offset(bt, d), (size_t)bt * d * 2, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_host(pool->ctx, pos, src + kv_pos_offset(bt, d), (size_t)bt * 4, err);
    return rc;
}

/* One thread block per copied block, 16-byte words (block_bytes % 64 == 0). */
__global__ void block_copy_kernel(uint8_t *pool, size_t bb, const int32_t *ids, uint8_t *buf,
                                  int to_buf)
{
    uint4 *pb = (uint4 *)(pool + (size_t)ids[blockIdx.x] * bb);
    uint4 *cb = (uint4 *)(buf + (size_t)blockIdx.x * bb);
    for (size_t w = threadIdx.x; w < bb / 16; w += blockDim.x) {
        if (to_buf)
            cb[w] = pb[w];
        else
            pb[w] = cb[w];
    }
}

ekv_status ekv_cuda_kv_gather(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const int32_t *ids, int32_t n,
                              void *dst, ekv_error *err)
{
    if (n <= 0)
        return EKV_OK;
    block_copy_kernel<<<n, 256, 0, ctx->stream>>>(pool->mem, pool->block_bytes, ids,
                                                 (uint8_t *)dst, 1);
    return ekv_cuda_launched("kv gather", err);
}

ekv_status ekv_cuda_kv_scatter(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const int32_t *ids,
                               int32_t n, const void *src, ekv_error *err)
{
    if (n <= 0)
        return EKV_OK;
    block_copy_kernel<<<n, 256, 0, ctx->stream>>>(pool->mem, pool->block_bytes, ids,
                                                 (uint8_t *)src, 0);
    return ekv_cuda_launched("kv scatter", err);
}

/*
 * grid (ceil(max_keep / bt), n_heads): thread block (x, h) fills destination
 * block x of head h: for its bt slots, K element j (transposed) and V row
 * from the source token keep[..]; slots past n_keep get zeros and position
 * INT32_MAX, as an upload does.
 */
__global__ void compact_kernel(uint8_t *base, size_t bb, int bt, int d, const int32_t *table,
                               const int32_t *table_off, const int32_t *keep,
                               const int32_t *keep_off, const int32_t *n_keep,
                               const int32_t *dst_table, const int32_t *dst_off)
{
    const int h = blockIdx.y, x = blockIdx.x;
    const int32_t nk = n_keep[h];
    if (x * bt >= nk)
        return;
    const int32_t *kp = keep + keep_off[h];
    const int32_t *src_tab = table + table_off[h];
    uint8_t *dst = base + (size_t)dst_table[dst_off[h] + x] * bb;
    __half *dk = (__half *)dst, *dv = (__half *)(dst + (size_t)bt * d * 2);
    int32_t *dpos = (int32_t *)(dst + 2 * (size_t)bt * d * 2);
    for (int e = threadIdx.x; e < bt * d; e += blockDim.x) {
        const int r = e / d, j = e % d; /* V: row r, dim j; K: dim j, slot r */
        const int32_t t = x * bt + r;
        __half kv = __float2half(0.0f), vv = __float2half(0.0f);
        if (t < nk) {
            const int32_t s = kp[t], sb = src_tab[s / bt], sr = s % bt;
            const uint8_t *src = base + (size_t)sb * bb;
            kv = ((const __half *)src)[(size_t)j * bt + sr];
            vv = ((const __half *)(src + (size_t)bt * d * 2))[(size_t)sr * d + j];
        }
        dk[(size_t)j * bt + r] = kv;
        dv[(size_t)r * d + j] = vv;
    }
    for (int r = threadIdx.x; r < bt; r += blockDim.x) {
        const int32_t t = x * bt + r;
        int32_t p = INT32_MAX;
        if (t < nk) {
            const int32_t s = kp[t];
            p = ((const int32_t *)(base + (size_t)src_tab[s / bt] * bb + 2 * (size_t)bt * d * 2))[s % bt];
        }
        dpos[r] = p;
    }
}

ekv_status ekv_cuda_kv_compact(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const ekv_cuda_kv_heads *src,
                               const int32_t *keep, const int32_t *keep_off,
                               const int32_t *n_keep, const int32_t *dst_table,
                               const int32_t *dst_off, int32_t max_keep, ekv_error *err)
{
    if (src->n_heads <= 0 || max_keep <= 0)
        return EKV_OK;
    const int bt = pool->block_tokens;
    dim3 grid((unsigned)((max_keep + bt - 1) / bt), (unsigned)src->n_heads);
    compact_kernel<<<grid, 256, 0, ctx->stream>>>(pool->mem, pool->block_bytes, bt, pool->head_dim,
                                                 src->table, src->table_off, keep, keep_off, n_keep,
                                                 dst_table, dst_off);
    return ekv_cuda_launched("kv compact", err);
}
