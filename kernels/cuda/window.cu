/*
 * window.cu - observation-window scores (kvc_window_scores, compress/score.c)
 * over the paged KV pool: for each head, the sum over the window's last w
 * queries and the GQA group's query heads of each one's softmax over the
 * head's tokens, masked by position.
 *
 * The softmax rows are recomputed from the cached K rather than kept from
 * prefill (which never materialises them): pass 1, one thread block per
 * (head, window row), reduces each row's max and sum into a log-sum-exp;
 * pass 2, one thread per token, re-scores the token against every window row
 * and adds exp(s - lse) in a fixed order (deterministic: no atomics). Both
 * passes read K in the pool's transposed layout, so consecutive threads
 * (tokens of a block) read consecutive halves. Memory: w * group floats of
 * workspace per head, never N x N.
 */
#include "cuda_internal.cuh"

#define WIN_THREADS 128
#define WIN_ROWS_MAX 64 /* window rows x group */

size_t ekv_cuda_window_workspace(int n_heads, int n_window, int n_group)
{
    return (size_t)n_heads * n_window * n_group * sizeof(float);
}

/* q . k for token t of a head (K transposed in its block). */
__device__ __forceinline__ float score_token(const uint8_t *base, size_t bb, int bt, int d,
                                             const int32_t *tab, int32_t t, const float *q)
{
    const __half *k = kv_k_block(base, bb, tab[t / bt]) + t % bt;
    float s = 0.0f;
    for (int j = 0; j < d; j++)
        s += q[j] * __half2float(k[(size_t)j * bt]);
    return s;
}

/* grid (head, row): lse of row `row` (= r * n_group + g) of head `head` */
__global__ void window_lse_kernel(const uint8_t *base, size_t bb, int bt, int d,
                                  const int32_t *table, const int32_t *table_off,
                                  const int32_t *n_tokens, const float *wq, int n_window,
                                  int n_group, const int32_t *q_pos, float scale, float *lse)
{
    extern __shared__ float q[];
    __shared__ float red_m[WIN_THREADS / 32], red_l[WIN_THREADS / 32];
    const int head = blockIdx.x, row = blockIdx.y, nr = n_window * n_group;
    const int32_t n = n_tokens[head], qp = q_pos[head * n_window + row / n_group];
    const int32_t *tab = table + table_off[head];
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        q[j] = wq[((size_t)head * nr + row) * d + j];
    __syncthreads();
    float m = -INFINITY, l = 0.0f;
    for (int32_t t = threadIdx.x; t < n; t += blockDim.x) {
        if (kv_pos_block(base, bb, tab[t / bt], bt, d)[t % bt] > qp)
            continue;
        const float s = score_token(base, bb, bt, d, tab, t, q) * scale;
        if (s > m) {
            l = l * expf(m - s) + 1.0f;
            m = s;
        } else {
            l += expf(s - m);
        }
    }
    /* merge (m, l) pairs: warp, then across warps */
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
        const float mn = fmaxf(m, mo);
        l = mn == -INFINITY ? 0.0f : l * expf(m - mn) + lo * expf(mo - mn);
        m = mn;
    }
    if (threadIdx.x % 32 == 0) {
        red_m[threadIdx.x / 32] = m;
        red_l[threadIdx.x / 32] = l;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY, L = 0.0f;
        for (int w = 0; w < WIN_THREADS / 32; w++)
            M = fmaxf(M, red_m[w]);
        if (M != -INFINITY)
            for (int w = 0; w < WIN_THREADS / 32; w++)
                if (red_m[w] != -INFINITY)
                    L += red_l[w] * expf(red_m[w] - M);
        lse[(size_t)head * nr + row] = L > 0.0f ? M + logf(L) : -INFINITY;
    }
}

/* grid (token tile, head): one thread per token sums its probabilities */
__global__ void window_sum_kernel(const uint8_t *base, size_t bb, int bt, int d,
                                  const int32_t *table, const int32_t *table_off,
                                  const int32_t *n_tokens, const float *wq, int n_window,
                                  int n_group, const int32_t *q_pos, float scale, const float *lse,
                                  const int32_t *score_off, float *scores)
{
    extern __shared__ float qs[]; /* nr rows of d */
    const int head = blockIdx.y, nr = n_window * n_group;
    const int32_t n = n_tokens[head], t = blockIdx.x * blockDim.x + threadIdx.x;
    if ((int64_t)blockIdx.x * blockDim.x >= n)
        return;
    for (int e = threadIdx.x; e < nr * d; e += blockDim.x)
        qs[e] = wq[(size_t)head * nr * d + e];
    __syncthreads();
    if (t >= n)
        return;
    const int32_t *tab = table + table_off[head];
    const int32_t pos = kv_pos_block(base, bb, tab[t / bt], bt, d)[t % bt];
    const __half *k = kv_k_block(base, bb, tab[t / bt]) + t % bt;
    float sum = 0.0f;
    for (int row = 0; row < nr; row++) {
        const float L = lse[(size_t)head * nr + row];
        if (pos > q_pos[head * n_window + row / n_group] || L == -INFINITY)
            continue;
        const float *q = qs + (size_t)row * d;
        float s = 0.0f;
        for (int j = 0; j < d; j++)
            s += q[j] * __half2float(k[(size_t)j * bt]);
        sum += expf(s * scale - L);
    }
    scores[score_off[head] + t] = sum;
}

ekv_status ekv_cuda_window_scores(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                  const ekv_cuda_kv_heads *heads, const float *wq, int n_window,
                                  int n_group, const int32_t *q_pos, int32_t max_tokens,
                                  const int32_t *score_off, float *scores, void *workspace,
                                  ekv_error *err)
{
    const int d = pool->head_dim, bt = pool->block_tokens, nr = n_window * n_group;
    if (heads->n_heads < 0 || n_window <= 0 || n_group <= 0 || max_tokens < 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda window scores: bad shape");
    const size_t q_smem = (size_t)nr * d * sizeof(float);
    if (nr > WIN_ROWS_MAX || q_smem > 96 * 1024)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "cuda window scores: %d x %d rows of %d too many",
                             n_window, n_group, d);
    if (heads->n_heads == 0 || max_tokens == 0)
        return EKV_OK;
    const float scale = 1.0f / sqrtf((float)d); /* as score.c */
    float *lse = (float *)workspace;
    window_lse_kernel<<<dim3((unsigned)heads->n_heads, (unsigned)nr), WIN_THREADS,
                        (size_t)d * sizeof(float), ctx->stream>>>(
        pool->mem, pool->block_bytes, bt, d, heads->table, heads->table_off, heads->n_tokens, wq,
        n_window, n_group, q_pos, scale, lse);
    ekv_status rc = ekv_cuda_launched("window scores (lse)", err);
    if (rc != EKV_OK)
        return rc;
    EKV_CUDA_TRY(cudaFuncSetAttribute(window_sum_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)q_smem),
                 "window scores: shared memory attribute");
    window_sum_kernel<<<dim3(ekv_div_up(max_tokens, WIN_THREADS), (unsigned)heads->n_heads),
                        WIN_THREADS, q_smem, ctx->stream>>>(
        pool->mem, pool->block_bytes, bt, d, heads->table, heads->table_off, heads->n_tokens, wq,
        n_window, n_group, q_pos, scale, lse, score_off, scores);
    return ekv_cuda_launched("window scores (sum)", err);
}
