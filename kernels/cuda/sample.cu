/*
 * sample.cu - token choice on the device: greedy argmax and top-k / top-p
 * sampling, one thread block per row (sequence).
 *
 * No sort: the top-k and top-p thresholds are found by bisection over the
 * logits' order-preserving 32-bit keys (32 counting / summing passes over the
 * row), and the draw walks the kept tokens in index order with a block-wide
 * scan. ekv_cuda_sample_ref (reference.c) is the same rule with a sort.
 */
#include "cuda_internal.cuh"

#define SAMPLE_THREADS 1024

/* float -> uint32 with the same order (finite values); -0 and +0 get one key,
 * as they compare equal in ekv_cuda_sample_ref */
__device__ __forceinline__ uint32_t fkey(float f)
{
    if (f == 0.0f)
        f = 0.0f;
    const uint32_t u = __float_as_uint(f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

typedef struct arg_best {
    float v;
    int32_t i;
} arg_best;

__device__ __forceinline__ arg_best better(arg_best a, arg_best b)
{
    if (b.i < 0)
        return a;
    if (a.i < 0 || b.v > a.v || (b.v == a.v && b.i < a.i))
        return b;
    return a;
}

/* The row's argmax, first index on ties (NaN is never chosen). */
__device__ arg_best block_argmax(const float *row, int n)
{
    __shared__ arg_best part[SAMPLE_THREADS / 32];
    arg_best best = {-INFINITY, -1};
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (!isnan(row[i]))
            best = better(best, arg_best{row[i], i});
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        arg_best other = {__shfl_xor_sync(0xffffffffu, best.v, o),
                          __shfl_xor_sync(0xffffffffu, best.i, o)};
        best = better(best, other);
    }
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned w = 1; w < blockDim.x / 32; w++)
            best = better(best, part[w]);
        part[0] = best;
    }
    __syncthreads();
    best = part[0];
    __syncthreads();
    return best;
}

__device__ double block_sum(double v)
{
    __shared__ double part[SAMPLE_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (unsigned w = 0; w < blockDim.x / 32; w++)
            t += part[w];
        part[0] = t;
    }
    __syncthreads();
    v = part[0];
    __syncthreads();
    return v;
}

__global__ void argmax_kernel(const float *logits, int n, int32_t *out)
{
    const arg_best b = block_argmax(logits + (size_t)blockIdx.x * n, n);
    if (threadIdx.x == 0)
        out[blockIdx.x] = b.i < 0 ? 0 : b.i;
}

ekv_status ekv_cuda_argmax(ekv_cuda *ctx, const float *logits, int n_rows, int n_vocab,
                           int32_t *out, ekv_error *err)
{
    if (n_rows < 0 || n_vocab <= 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda argmax: bad shape");
    if (n_rows == 0)
        return EKV_OK;
    argmax_kernel<<<n_rows, SAMPLE_THREADS, 0, ctx->stream>>>(logits, n_vocab, out);
    return ekv_cuda_launched("argmax", err);
}

/* Mass of the kept tokens (key >= lo) whose key is >= k, p = exp((l - m) / temp). */
__device__ double mass_from(const float *row, int n, float m, float temp, uint32_t lo, uint32_t k)
{
    double s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const uint32_t key = fkey(row[i]);
        if (key >= lo && key >= k)
            s += (double)expf((row[i] - m) / temp);
    }
    return block_sum(s);
}

/* The largest key K with count(key >= K) >= k: the k-th largest logit's key. */
__device__ uint32_t topk_key(const float *row, int n, int k)
{
    uint32_t lo = 0, hi = 0xffffffffu; /* invariant: count(>= lo) >= k */
    while (lo < hi) {
        const uint32_t mid = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);
        double c = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            c += fkey(row[i]) >= mid;
        if (block_sum(c) >= k)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* The largest key K with mass(kept, key >= K) >= target. */
__device__ uint32_t topp_key(const float *row, int n, float m, float temp, uint32_t kept,
                             double target)
{
    uint32_t lo = kept, hi = 0xffffffffu;
    while (lo < hi) {
        const uint32_t mid = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);
        if (mass_from(row, n, m, temp, kept, mid) >= target)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* Walks the kept tokens in index order: the first whose running mass exceeds
 * target. Each thread owns one contiguous chunk; a scan orders the chunks. */
__device__ int32_t draw(const float *row, int n, float m, float temp, uint32_t kept,
                       double target)
{
    __shared__ double chunk_mass[SAMPLE_THREADS];
    __shared__ int32_t found;
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int b = threadIdx.x * per, e = min(n, b + per);
    double s = 0;
    for (int i = b; i < e; i++)
        if (fkey(row[i]) >= kept)
            s += (double)expf((row[i] - m) / temp);
    chunk_mass[threadIdx.x] = s;
    if (threadIdx.x == 0)
        found = -1;
    __syncthreads();
    /* exclusive scan of the chunk masses: 1024 adds, serial and deterministic */
    if (threadIdx.x == 0) {
        double acc = 0;
        for (unsigned t = 0; t < blockDim.x; t++) {
            const double x = chunk_mass[t];
            chunk_mass[t] = acc;
            acc += x;
        }
    }
    __syncthreads();
    double acc = chunk_mass[threadIdx.x];
    if (acc <= target && acc + s > target) { /* only one chunk can match */
        int32_t pick = -1;
        for (int i = b; i < e; i++) {
            if (fkey(row[i]) < kept)
                continue;
            pick = i; /* the chunk's last kept token if rounding never crosses */
            acc += (double)expf((row[i] - m) / temp);
            if (acc > target)
                break;
        }
        atomicMax(&found, pick);
    }
    __syncthreads();
    return found;
}

__global__ void sample_kernel(const float *logits, int n, float temp, int top_k, float top_p,
                              const float *u, int32_t *out)
{
    const float *row = logits + (size_t)blockIdx.x * n;
    const arg_best best = block_argmax(row, n);
    int32_t tok = best.i < 0 ? 0 : best.i;
    if (temp > 0.0f && best.i >= 0) {
        const float m = best.v;
        const uint32_t kept_k = top_k > 0 && top_k < n ? topk_key(row, n, top_k) : 0u;
        uint32_t kept = kept_k;
        if (top_p < 1.0f) {
            const double z = mass_from(row, n, m, temp, kept_k, 0u);
            kept = topp_key(row, n, m, temp, kept_k, (double)top_p * z);
        }
        const double z = mass_from(row, n, m, temp, kept, 0u);
        const int32_t t = draw(row, n, m, temp, kept, (double)u[blockIdx.x] * z);
        if (t >= 0)
            tok = t;
    }
    if (threadIdx.x == 0)
        out[blockIdx.x] = tok;
}

ekv_status ekv_cuda_sample(ekv_cuda *ctx, const float *logits, int n_rows, int n_vocab,
                           float temp, int top_k, float top_p, const float *u, int32_t *out,
                           ekv_error *err)
{
    if (n_rows < 0 || n_vocab <= 0 || top_k < 0 || !(top_p > 0.0f) || top_p > 1.0f)
        return ekv_error_set(err, EKV_EINVAL, "cuda sample: bad arguments");
    if (n_rows == 0)
        return EKV_OK;
    sample_kernel<<<n_rows, SAMPLE_THREADS, 0, ctx->stream>>>(logits, n_vocab, temp, top_k, top_p,
                                                             u, out);
    return ekv_cuda_launched("sample", err);
}
