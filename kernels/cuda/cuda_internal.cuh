/*
 * cuda_internal.cuh - what the .cu files of kernels/cuda/ share: the context
 * and pool structs, CUDA error mapping into ekv_error, and small device
 * helpers (fp16 loads, warp reductions). Included by .cu files only.
 */
#ifndef ENTROKV_CUDA_INTERNAL_CUH
#define ENTROKV_CUDA_INTERNAL_CUH

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <math.h>
#include <stdint.h>

#include "entrokv/cuda.h"

struct ekv_cuda {
    int device;
    int sm_count;
    cudaStream_t stream;
    cublasHandle_t blas;
    cusolverDnHandle_t solver;
    cudaEvent_t t0, t1;
    /* decode.cu: resident thread blocks per SM of each decode kernel, by
     * head_dim (64, 128, 256) and kernel (0 CUDA cores, 2..4 tensor-core
     * stages); 0 until its attributes are set on first use */
    int decode_per_sm[3][5];
};

struct ekv_cuda_kv_pool {
    ekv_cuda *ctx;
    int32_t block_tokens;
    int32_t head_dim;
    int64_t n_blocks;
    size_t block_bytes;
    uint8_t *mem;      /* device */
    int32_t *free_ids; /* host stack */
    int64_t n_free;
};

/* Block geometry inside the pool (the same as kv/kvcache.c). */
static inline size_t kv_k_offset(void) { return 0; }
static inline size_t kv_v_offset(int bt, int d) { return (size_t)bt * d * sizeof(__half); }
static inline size_t kv_pos_offset(int bt, int d) { return 2 * (size_t)bt * d * sizeof(__half); }

/* Maps a CUDA error to EKV_EIO (EKV_ENOMEM for allocation failures) with the
 * runtime's message; EKV_OK for cudaSuccess. */
ekv_status ekv_cuda_check(cudaError_t e, const char *what, ekv_error *err);
ekv_status ekv_cublas_check(cublasStatus_t s, const char *what, ekv_error *err);
ekv_status ekv_cusolver_check(cusolverStatus_t s, const char *what, ekv_error *err);
/* The last launch's error (cudaGetLastError) as a status. */
ekv_status ekv_cuda_launched(const char *what, ekv_error *err);

#define EKV_CUDA_TRY(call, what)                                                           \
    do {                                                                                   \
        ekv_status rc_ = ekv_cuda_check((call), (what), err);                              \
        if (rc_ != EKV_OK)                                                                 \
            return rc_;                                                                    \
    } while (0)

static inline unsigned ekv_div_up(int64_t a, int64_t b) { return (unsigned)((a + b - 1) / b); }

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Address of block `id`'s parts. */
__device__ __forceinline__ const __half *kv_k_block(const uint8_t *base, size_t bb, int32_t id)
{
    return (const __half *)(base + (size_t)id * bb);
}
__device__ __forceinline__ const __half *kv_v_block(const uint8_t *base, size_t bb, int32_t id,
                                                    int bt, int d)
{
    return (const __half *)(base + (size_t)id * bb + (size_t)bt * d * 2);
}
__device__ __forceinline__ const int32_t *kv_pos_block(const uint8_t *base, size_t bb, int32_t id,
                                                       int bt, int d)
{
    return (const int32_t *)(base + (size_t)id * bb + 2 * (size_t)bt * d * 2);
}

/* The last step of a decode thread block (decode.cu, spark.cu): its WARPS
 * warps' online-softmax states (st_m, st_l, st_o, each warp's rows at
 * warp * GMAX) merged into the split's partial (m, l, o) per query row,
 * the layout decode_reduce_kernel reads. */
template <int D, int WARPS, int GMAX>
__device__ void merge_warps(const float *st_m, const float *st_l, const float *st_o, int g,
                            size_t prow, int split, int n_splits, float *part_m, float *part_l,
                            float *part_o)
{
    __syncthreads();
    for (int e = threadIdx.x; e < g * D; e += blockDim.x) {
        const int i = e / D, j = e % D;
        float M = -INFINITY;
        for (int w = 0; w < WARPS; w++)
            M = fmaxf(M, st_m[w * GMAX + i]);
        float L = 0.0f, O = 0.0f;
        if (M != -INFINITY)
            for (int w = 0; w < WARPS; w++) {
                const float mw = st_m[w * GMAX + i];
                if (mw == -INFINITY)
                    continue;
                const float f = expf(mw - M);
                L += st_l[w * GMAX + i] * f;
                O += st_o[((size_t)w * GMAX + i) * D + j] * f;
            }
        const size_t pi = (prow + i) * n_splits + split;
        part_o[pi * D + j] = O;
        if (j == 0) {
            part_m[pi] = M;
            part_l[pi] = L;
        }
    }
}

/* A decode thread block's split (grid: split, KV head, sequence; decode.cu,
 * spark.cu): its head (seq * n_kv + KV head), the head's length, the
 * split's first token and the group's first query row. false when the split
 * starts past the head (its partials are marked empty). */
typedef struct split_at {
    int split, g, h;
    int32_t n, t0;
    size_t prow;
} split_at;

__device__ __forceinline__ bool split_open(split_at *a, const int32_t *n_tokens, int n_kv,
                                           int n_qh, int split_tokens, int n_splits,
                                           float *part_m)
{
    const int kvh = blockIdx.y, seq = blockIdx.z;
    a->split = blockIdx.x;
    a->g = n_qh / n_kv;
    a->h = seq * n_kv + kvh;
    a->n = n_tokens[a->h];
    a->t0 = a->split * split_tokens;
    a->prow = (size_t)seq * n_qh + (size_t)kvh * a->g;
    if (a->t0 < a->n)
        return true;
    if (threadIdx.x < a->g)
        part_m[(a->prow + threadIdx.x) * n_splits + a->split] = -INFINITY;
    return false;
}

/* decode.cu, for spark.cu's packed-key decode, which shares its workspace
 * and its reduce pass: the most splits ekv_cuda_decode_workspace has room
 * for, and the launch merging the splits' partials (m, l, o per query row
 * and split, at the workspace's start) into out. */
int32_t ekv_decode_max_splits(int heads, int32_t max_tokens);
ekv_status ekv_decode_reduce(ekv_cuda *ctx, const int32_t *n_tokens, int n_seq, int n_kv, int n_qh,
                             int d, int32_t split_tokens, int32_t n_splits, const void *workspace,
                             float *out, ekv_error *err);

#endif
