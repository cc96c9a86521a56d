/*
 * select.cu - SnapKV's selection rule per head on the GPU (kvc_select_snap,
 * compress/select.c): keep the window's last w = min(8, budget / 2) tokens,
 * plus the budget - w highest max-pooled (kernel 7) scores of the tokens
 * before them, ties to the lower index, in increasing index order.
 *
 * One thread block per head. The k-th largest pooled score is found exactly
 * by a 4-pass radix select over order-preserving 32-bit keys (256-bin shared
 * histograms); the tokens above it, plus the first (in index order) of those
 * equal to it, are then written in index order by two block scans over
 * per-thread contiguous chunks. The result equals the CPU's bit for bit.
 */
#include "cuda_internal.cuh"

#define SEL_THREADS 1024
#define SEL_WINDOW 8 /* KVC_WINDOW */
#define SEL_POOL 7   /* KVC_POOL_KERNEL */

size_t ekv_cuda_select_workspace(int64_t total_tokens)
{
    return (size_t)(total_tokens > 0 ? total_tokens : 1) * sizeof(uint32_t);
}

__device__ __forceinline__ uint32_t order_key(float f)
{
    if (f == 0.0f)
        f = 0.0f; /* -0 ties with +0, as the CPU's comparisons do */
    const uint32_t u = __float_as_uint(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* Exclusive scan of one value per thread (serial in thread 0: 1024 adds). */
__device__ int32_t block_exclusive_scan(int32_t v, int32_t *total)
{
    __shared__ int32_t buf[SEL_THREADS];
    buf[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int32_t acc = 0;
        for (unsigned t = 0; t < blockDim.x; t++) {
            const int32_t x = buf[t];
            buf[t] = acc;
            acc += x;
        }
        buf[0] = 0;
        *total = acc;
    }
    __syncthreads();
    const int32_t r = buf[threadIdx.x];
    __syncthreads();
    return r;
}

/* The key K of the k-th largest of keys[0..n): count(key > K) < k <= count(key >= K). */
__device__ uint32_t radix_select(const uint32_t *keys, int32_t n, int32_t k)
{
    __shared__ int32_t hist[256];
    __shared__ uint32_t want;
    __shared__ int32_t left;
    if (threadIdx.x == 0) {
        want = 0;
        left = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x)
            hist[i] = 0;
        __syncthreads();
        const uint32_t hi_mask = shift == 24 ? 0u : ~0u << (shift + 8);
        for (int32_t i = threadIdx.x; i < n; i += blockDim.x)
            if ((keys[i] & hi_mask) == (want & hi_mask))
                atomicAdd(&hist[(keys[i] >> shift) & 255], 1);
        __syncthreads();
        if (threadIdx.x == 0) {
            int32_t acc = 0;
            for (int b = 255; b >= 0; b--) {
                if (acc + hist[b] >= left) {
                    want |= (uint32_t)b << shift;
                    left -= acc;
                    break;
                }
                acc += hist[b];
            }
        }
        __syncthreads();
    }
    return want;
}

__global__ void select_kernel(const float *scores, const int32_t *score_off,
                              const int32_t *n_tokens, const int32_t *budget, int32_t *keep,
                              const int32_t *keep_off, uint32_t *work)
{
    __shared__ int32_t total;
    const int h = blockIdx.x;
    const int32_t n = n_tokens[h], b = min(budget[h], n);
    if (n <= 0 || b <= 0)
        return;
    const int32_t w = min(SEL_WINDOW, b / 2), prefix = n - w, k = b - w, half = SEL_POOL / 2;
    const float *s = scores + score_off[h];
    uint32_t *keys = work + score_off[h];
    int32_t *out = keep + keep_off[h];
    for (int32_t j = threadIdx.x; j < prefix; j += blockDim.x) {
        const int32_t lo = max(0, j - half), hi = min(prefix - 1, j + half);
        float m = s[lo];
        for (int32_t t = lo + 1; t <= hi; t++)
            m = s[t] > m ? s[t] : m;
        keys[j] = order_key(m);
    }
    __syncthreads();
    const uint32_t K = radix_select(keys, prefix, k);
    const int32_t per = (prefix + SEL_THREADS - 1) / SEL_THREADS;
    const int32_t c0 = threadIdx.x * per, c1 = min(prefix, c0 + per);
    int32_t gt = 0, eq = 0;
    for (int32_t j = c0; j < c1; j++) {
        gt += keys[j] > K;
        eq += keys[j] == K;
    }
    const int32_t eq_before = block_exclusive_scan(eq, &total);
    (void)block_exclusive_scan(gt, &total); /* total: all greater keys */
    /* the equal keys the head takes: k minus the greater ones, lowest first */
    const int32_t need_eq = k - total;
    const int32_t eq_take = max(0, min(eq, need_eq - eq_before));
    const int32_t pos0 = block_exclusive_scan(gt + eq_take, &total);
    int32_t o = pos0, eq_seen = eq_before;
    for (int32_t j = c0; j < c1; j++) {
        if (keys[j] > K) {
            out[o++] = j;
        } else if (keys[j] == K) {
            if (eq_seen < need_eq)
                out[o++] = j;
            eq_seen++;
        }
    }
    for (int32_t i = threadIdx.x; i < w; i += blockDim.x)
        out[k + i] = prefix + i;
}

ekv_status ekv_cuda_select_snap(ekv_cuda *ctx, int n_heads, const float *scores,
                                const int32_t *score_off, const int32_t *n_tokens,
                                const int32_t *budget, int32_t *keep, const int32_t *keep_off,
                                void *workspace, ekv_error *err)
{
    if (n_heads < 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda select: bad shape");
    if (n_heads == 0)
        return EKV_OK;
    select_kernel<<<n_heads, SEL_THREADS, 0, ctx->stream>>>(scores, score_off, n_tokens, budget,
                                                           keep, keep_off, (uint32_t *)workspace);
    return ekv_cuda_launched("select", err);
}
