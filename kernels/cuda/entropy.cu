/*
 * entropy.cu - UNComp's truncated matrix entropy per head on the GPU
 * (compress/entropy.c, specs/uncomp.md section 1).
 *
 * Steps: (1) centre each head's rows on their mean and scale each to unit
 * length (one thread block per head); (2) the d x d Gram Z^T Z of every head
 * in one strided-batched cuBLAS SGEMM (never N x N); (3) divide by the trace
 * and add 1e-10 I; (4) eigenvalues by cuSOLVER: the batched Jacobi solver
 * (syevjBatched) where it applies (d <= 32), the batched QR-based solver
 * (XsyevBatched) above, or one syevd per head where cuSOLVER predates
 * XsyevBatched or EKV_CUDA_EIG_LOOP is set (a cross-check); (5) -sum
 * lambda ln lambda over the top k, / ln d.
 * FP32 on the device where the CPU uses double for the eigen-solve: the test
 * allows 1e-3 relative.
 */
#include "cuda_internal.cuh"

#include <stdlib.h>

#define ENT_THREADS 256

/* grid n_heads: Z[h][t][:] = (x - mean) / max(|x - mean|, 1e-12) */
__global__ void centre_rows_kernel(const float *rows, int n, int d, float *Z)
{
    extern __shared__ double mean[];
    const float *x = rows + (size_t)blockIdx.x * n * d;
    float *z = Z + (size_t)blockIdx.x * n * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double s = 0;
        for (int t = 0; t < n; t++)
            s += x[(size_t)t * d + j];
        mean[j] = s / n;
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    for (int t = warp; t < n; t += n_warps) {
        double ss = 0;
        for (int j = lane; j < d; j += 32) {
            const float v = (float)(x[(size_t)t * d + j] - mean[j]);
            ss += (double)v * v;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float inv = (float)(1.0 / fmax(sqrt(ss), 1e-12));
        for (int j = lane; j < d; j += 32)
            z[(size_t)t * d + j] = (float)(x[(size_t)t * d + j] - mean[j]) * inv;
    }
}

/* grid n_heads: G /= trace, G += 1e-10 I; a zero Gram becomes I and bad = 1 */
__global__ void trace_normalise_kernel(float *G, int d, int *bad)
{
    __shared__ double tr;
    float *g = G + (size_t)blockIdx.x * d * d;
    if (threadIdx.x == 0) {
        double s = 0;
        for (int i = 0; i < d; i++)
            s += g[(size_t)i * d + i];
        tr = s;
        bad[blockIdx.x] = !(s > 0);
    }
    __syncthreads();
    const bool ok = tr > 0;
    for (int e = threadIdx.x; e < d * d; e += blockDim.x) {
        const bool diag = e / d == e % d;
        g[e] = ok ? (float)(g[e] / tr) + (diag ? 1e-10f : 0.0f) : (diag ? 1.0f : 0.0f);
    }
}

/* one thread per head: eigenvalues ascending, top k are the last k */
__global__ void entropy_kernel(const float *W, int n_heads, int d, int k, const int *bad,
                               double *entropy)
{
    const int h = blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= n_heads)
        return;
    if (bad[h]) {
        entropy[h] = nan("");
        return;
    }
    const float *w = W + (size_t)h * d;
    double s = 0;
    for (int i = d - k; i < d; i++)
        if (w[i] > 0)
            s -= (double)w[i] * log((double)w[i]);
    entropy[h] = s / log((double)d);
}

static ekv_status eig_jacobi(ekv_cuda *ctx, float *G, int d, int n_heads, float *W, int *info,
                             ekv_error *err)
{
    syevjInfo_t params = NULL;
    int lwork = 0;
    float *work = NULL;
    ekv_status rc = ekv_cusolver_check(cusolverDnCreateSyevjInfo(&params), "syevj info", err);
    if (rc == EKV_OK)
        rc = ekv_cusolver_check(cusolverDnSsyevjBatched_bufferSize(
                                    ctx->solver, CUSOLVER_EIG_MODE_NOVECTOR, CUBLAS_FILL_MODE_LOWER,
                                    d, G, d, W, &lwork, params, n_heads),
                                "syevjBatched buffer size", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)lwork * sizeof(float), (void **)&work, err);
    if (rc == EKV_OK)
        rc = ekv_cusolver_check(cusolverDnSsyevjBatched(ctx->solver, CUSOLVER_EIG_MODE_NOVECTOR,
                                                        CUBLAS_FILL_MODE_LOWER, d, G, d, W, work,
                                                        lwork, info, params, n_heads),
                                "syevjBatched", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_sync(ctx, err);
    ekv_cuda_free(work);
    if (params)
        cusolverDnDestroySyevjInfo(params);
    return rc;
}

/* cuSOLVER older than CUDA 12.6u2 has no XsyevBatched: one syevd per head. */
static ekv_status eig_loop(ekv_cuda *ctx, float *G, int d, int n_heads, float *W, int *info,
                           ekv_error *err)
{
    int lwork = 0;
    float *work = NULL;
    ekv_status rc = ekv_cusolver_check(cusolverDnSsyevd_bufferSize(ctx->solver,
                                                                   CUSOLVER_EIG_MODE_NOVECTOR,
                                                                   CUBLAS_FILL_MODE_LOWER, d, G, d,
                                                                   W, &lwork),
                                       "syevd buffer size", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)lwork * sizeof(float), (void **)&work, err);
    for (int h = 0; rc == EKV_OK && h < n_heads; h++)
        rc = ekv_cusolver_check(cusolverDnSsyevd(ctx->solver, CUSOLVER_EIG_MODE_NOVECTOR,
                                                 CUBLAS_FILL_MODE_LOWER, d, G + (size_t)h * d * d,
                                                 d, W + (size_t)h * d, work, lwork, info + h),
                                "syevd", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_sync(ctx, err);
    ekv_cuda_free(work);
    return rc;
}

#if CUSOLVER_VERSION >= 11701
static ekv_status eig_batched(ekv_cuda *ctx, float *G, int d, int n_heads, float *W, int *info,
                              ekv_error *err)
{
    cusolverDnParams_t params = NULL;
    size_t dev_bytes = 0, host_bytes = 0;
    void *dev_work = NULL, *host_work = NULL;
    ekv_status rc = ekv_cusolver_check(cusolverDnCreateParams(&params), "params", err);
    if (rc == EKV_OK)
        rc = ekv_cusolver_check(cusolverDnXsyevBatched_bufferSize(
                                    ctx->solver, params, CUSOLVER_EIG_MODE_NOVECTOR,
                                    CUBLAS_FILL_MODE_LOWER, d, CUDA_R_32F, G, d, CUDA_R_32F, W,
                                    CUDA_R_32F, &dev_bytes, &host_bytes, n_heads),
                                "XsyevBatched buffer size", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, dev_bytes, &dev_work, err);
    if (rc == EKV_OK && host_bytes > 0 && !(host_work = malloc(host_bytes)))
        rc = ekv_error_set(err, EKV_ENOMEM, "entropy: out of host memory");
    if (rc == EKV_OK)
        rc = ekv_cusolver_check(cusolverDnXsyevBatched(ctx->solver, params,
                                                       CUSOLVER_EIG_MODE_NOVECTOR,
                                                       CUBLAS_FILL_MODE_LOWER, d, CUDA_R_32F, G, d,
                                                       CUDA_R_32F, W, CUDA_R_32F, dev_work,
                                                       dev_bytes, host_work, host_bytes, info,
                                                       n_heads),
                                "XsyevBatched", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_sync(ctx, err);
    ekv_cuda_free(dev_work);
    free(host_work);
    if (params)
        cusolverDnDestroyParams(params);
    return rc;
}

#else
#define eig_batched eig_loop
#endif

/* Checks the solver's per-matrix info codes. */
static ekv_status check_info(ekv_cuda *ctx, const int *info, int n_heads, ekv_error *err)
{
    int *h = (int *)malloc((size_t)n_heads * sizeof *h);
    if (!h)
        return ekv_error_set(err, EKV_ENOMEM, "entropy: out of host memory");
    ekv_status rc = ekv_cuda_to_host(ctx, h, info, (size_t)n_heads * sizeof *h, err);
    for (int i = 0; rc == EKV_OK && i < n_heads; i++)
        if (h[i] != 0)
            rc = ekv_error_set(err, EKV_EINVAL, "entropy: eigen-solver failed for head %d (info %d)",
                               i, h[i]);
    free(h);
    return rc;
}

ekv_status ekv_cuda_entropy(ekv_cuda *ctx, const float *rows, int n_heads, int n, int d, int k,
                            double *entropy, ekv_error *err)
{
    if (n_heads < 0 || n < 0 || d <= 0 || d > 4096 || k <= 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda entropy: bad shape");
    if (n_heads == 0)
        return EKV_OK;
    if (k > d)
        k = d;
    float *Z = NULL, *G = NULL, *W = NULL;
    int *bad = NULL, *info = NULL;
    const size_t zn = (size_t)n_heads * n * d, gn = (size_t)n_heads * d * d;
    ekv_status rc = ekv_cuda_malloc(ctx, zn * sizeof(float), (void **)&Z, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, gn * sizeof(float), (void **)&G, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)n_heads * d * sizeof(float), (void **)&W, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)n_heads * sizeof(int), (void **)&bad, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)n_heads * sizeof(int), (void **)&info, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, G, 0, gn * sizeof(float), err);
    if (rc == EKV_OK && n > 0) {
        centre_rows_kernel<<<n_heads, ENT_THREADS, (size_t)d * sizeof(double), ctx->stream>>>(
            rows, n, d, Z);
        rc = ekv_cuda_launched("entropy: centre rows", err);
        /* column-major: Z_h is d x n (ld d); G_h = Z_h Z_h^T is d x d */
        const float one = 1.0f, zero = 0.0f;
        if (rc == EKV_OK)
            rc = ekv_cublas_check(cublasSgemmStridedBatched(ctx->blas, CUBLAS_OP_N, CUBLAS_OP_T, d,
                                                            d, n, &one, Z, d, (long long)n * d, Z,
                                                            d, (long long)n * d, &zero, G, d,
                                                            (long long)d * d, n_heads),
                                  "Gram SgemmStridedBatched", err);
    }
    if (rc == EKV_OK) {
        trace_normalise_kernel<<<n_heads, ENT_THREADS, 0, ctx->stream>>>(G, d, bad);
        rc = ekv_cuda_launched("entropy: trace", err);
    }
    if (rc == EKV_OK)
        rc = d <= 32                       ? eig_jacobi(ctx, G, d, n_heads, W, info, err)
             : getenv("EKV_CUDA_EIG_LOOP") ? eig_loop(ctx, G, d, n_heads, W, info, err)
                                           : eig_batched(ctx, G, d, n_heads, W, info, err);
    if (rc == EKV_OK)
        rc = check_info(ctx, info, n_heads, err);
    if (rc == EKV_OK) {
        entropy_kernel<<<ekv_div_up(n_heads, 128), 128, 0, ctx->stream>>>(W, n_heads, d, k, bad,
                                                                         entropy);
        rc = ekv_cuda_launched("entropy", err);
    }
    if (rc == EKV_OK)
        rc = ekv_cuda_sync(ctx, err);
    ekv_cuda_free(Z);
    ekv_cuda_free(G);
    ekv_cuda_free(W);
    ekv_cuda_free(bad);
    ekv_cuda_free(info);
    return rc;
}
