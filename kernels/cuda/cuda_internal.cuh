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

/* Block geometry inside the pool (the same as worker/kvcache.c). */
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

#endif
