/*
 * forward.cu - the small kernels the CUDA forward pass (model/cuda/
 * llama_cuda.c) needs beside the others: the residual add, appending a
 * batch's K and V rows into the device KV pool, and gathering the rows whose
 * logits are wanted.
 *
 * References: kern_add (x += y in float), kv_seq_append (K and V rounded to
 * fp16 with round-to-nearest-even, K stored transposed [head_dim][bt], V
 * [bt][head_dim], then the int32 position), and a plain row copy.
 */
#include "cuda_internal.cuh"

__global__ void add_kernel(float *x, const float *y, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], y[i]); /* no contraction: kern_add's exact sum */
}

ekv_status ekv_cuda_add(ekv_cuda *ctx, float *x, const float *y, int64_t n, ekv_error *err)
{
    if (n < 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda add: bad length");
    if (n == 0)
        return EKV_OK;
    const unsigned grid = n / 256 + 1 < 65536 ? (unsigned)(n / 256 + 1) : 65535u;
    add_kernel<<<grid, 256, 0, ctx->stream>>>(x, y, n);
    return ekv_cuda_launched("add", err);
}

/* One thread block per (row, KV head) item, a thread per dimension. slot
 * = block id * bt + index in the block; a negative slot writes nothing. */
__global__ void kv_append_kernel(uint8_t *pool, size_t bb, int bt, int d, const float *k,
                                 const float *v, const int32_t *slot, const int32_t *pos,
                                 int n_kv_heads)
{
    const int item = blockIdx.x;
    const int32_t sl = slot[item];
    if (sl < 0)
        return;
    const int32_t id = sl / bt;
    const int s = sl % bt;
    __half *kd = (__half *)kv_k_block(pool, bb, id);
    __half *vd = (__half *)kv_v_block(pool, bb, id, bt, d);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        kd[(size_t)j * bt + s] = __float2half_rn(k[(size_t)item * d + j]);
        vd[(size_t)s * d + j] = __float2half_rn(v[(size_t)item * d + j]);
    }
    if (threadIdx.x == 0)
        ((int32_t *)kv_pos_block(pool, bb, id, bt, d))[s] = pos[item / n_kv_heads];
}

ekv_status ekv_cuda_kv_append(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const float *k,
                              const float *v, int n_rows, int n_kv_heads, const int32_t *slot,
                              const int32_t *pos, ekv_error *err)
{
    if (n_rows < 0 || n_kv_heads <= 0 || (int64_t)n_rows * n_kv_heads > INT32_MAX)
        return ekv_error_set(err, EKV_EINVAL, "cuda kv append: bad shape");
    if (n_rows == 0)
        return EKV_OK;
    const int d = pool->head_dim;
    kv_append_kernel<<<(unsigned)(n_rows * n_kv_heads), d < 256 ? d : 256, 0, ctx->stream>>>(
        pool->mem, pool->block_bytes, pool->block_tokens, d, k, v, slot, pos, n_kv_heads);
    return ekv_cuda_launched("kv append", err);
}

__global__ void gather_rows_kernel(float *dst, const float *src, const int32_t *rows, int width)
{
    const float *s = src + (size_t)rows[blockIdx.x] * width;
    float *o = dst + (size_t)blockIdx.x * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x)
        o[j] = s[j];
}

ekv_status ekv_cuda_gather_rows(ekv_cuda *ctx, float *dst, const float *src, const int32_t *rows,
                                int n, int width, ekv_error *err)
{
    if (n < 0 || width <= 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda gather rows: bad shape");
    if (n == 0)
        return EKV_OK;
    gather_rows_kernel<<<(unsigned)n, 256, 0, ctx->stream>>>(dst, src, rows, width);
    return ekv_cuda_launched("gather rows", err);
}
