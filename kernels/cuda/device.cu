/*
 * device.cu - the CUDA context (device, stream, cuBLAS and cuSOLVER handles),
 * memory, copies, timing, and the mapping of CUDA errors into ekv_error.
 *
 * ekv_cuda_available() must be safe on a machine without a GPU or driver:
 * cudaGetDeviceCount then fails with an error code, which we treat as "no".
 */
#include "cuda_internal.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ekv_status ekv_cuda_check(cudaError_t e, const char *what, ekv_error *err)
{
    if (e == cudaSuccess)
        return EKV_OK;
    ekv_status code = e == cudaErrorMemoryAllocation ? EKV_ENOMEM : EKV_EIO;
    return ekv_error_set(err, code, "cuda: %s: %s (%s)", what, cudaGetErrorString(e),
                         cudaGetErrorName(e));
}

ekv_status ekv_cublas_check(cublasStatus_t s, const char *what, ekv_error *err)
{
    if (s == CUBLAS_STATUS_SUCCESS)
        return EKV_OK;
    return ekv_error_set(err, s == CUBLAS_STATUS_ALLOC_FAILED ? EKV_ENOMEM : EKV_EIO,
                         "cublas: %s: %s", what, cublasGetStatusString(s));
}

ekv_status ekv_cusolver_check(cusolverStatus_t s, const char *what, ekv_error *err)
{
    if (s == CUSOLVER_STATUS_SUCCESS)
        return EKV_OK;
    return ekv_error_set(err, s == CUSOLVER_STATUS_ALLOC_FAILED ? EKV_ENOMEM : EKV_EIO,
                         "cusolver: %s: status %d", what, (int)s);
}

ekv_status ekv_cuda_launched(const char *what, ekv_error *err)
{
    return ekv_cuda_check(cudaGetLastError(), what, err);
}

static cudaError_t probe(int *n)
{
    *n = 0;
    cudaError_t e = cudaGetDeviceCount(n);
    if (e != cudaSuccess)
        (void)cudaGetLastError(); /* not sticky: clear it */
    return e;
}

bool ekv_cuda_available(void)
{
    int n;
    return probe(&n) == cudaSuccess && n > 0;
}

const char *ekv_cuda_unavailable_reason(void)
{
    int n;
    const cudaError_t e = probe(&n);
    if (e != cudaSuccess)
        return cudaGetErrorString(e);
    return n > 0 ? "" : "no CUDA device";
}

ekv_status ekv_cuda_create(int device, ekv_cuda **out, ekv_error *err)
{
    *out = NULL;
    if (!ekv_cuda_available())
        return ekv_error_set(err, EKV_EUNSUPPORTED, "cuda: no CUDA device available");
    ekv_cuda *ctx = (ekv_cuda *)calloc(1, sizeof *ctx);
    if (!ctx)
        return ekv_error_set(err, EKV_ENOMEM, "cuda: out of host memory");
    ctx->device = device;
    ekv_status rc = ekv_cuda_check(cudaSetDevice(device), "cudaSetDevice", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_check(cudaDeviceGetAttribute(&ctx->sm_count, cudaDevAttrMultiProcessorCount,
                                                   device),
                            "cudaDeviceGetAttribute", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_check(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking),
                            "cudaStreamCreate", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_check(cudaEventCreate(&ctx->t0), "cudaEventCreate", err);
    if (rc == EKV_OK)
        rc = ekv_cuda_check(cudaEventCreate(&ctx->t1), "cudaEventCreate", err);
    if (rc == EKV_OK)
        rc = ekv_cublas_check(cublasCreate(&ctx->blas), "cublasCreate", err);
    if (rc == EKV_OK)
        rc = ekv_cublas_check(cublasSetStream(ctx->blas, ctx->stream), "cublasSetStream", err);
    if (rc == EKV_OK)
        rc = ekv_cusolver_check(cusolverDnCreate(&ctx->solver), "cusolverDnCreate", err);
    if (rc == EKV_OK)
        rc = ekv_cusolver_check(cusolverDnSetStream(ctx->solver, ctx->stream),
                                "cusolverDnSetStream", err);
    if (rc != EKV_OK) {
        ekv_cuda_destroy(ctx);
        return rc;
    }
    *out = ctx;
    return EKV_OK;
}

void ekv_cuda_destroy(ekv_cuda *ctx)
{
    if (!ctx)
        return;
    if (ctx->stream)
        cudaStreamSynchronize(ctx->stream);
    if (ctx->solver)
        cusolverDnDestroy(ctx->solver);
    if (ctx->blas)
        cublasDestroy(ctx->blas);
    if (ctx->t0)
        cudaEventDestroy(ctx->t0);
    if (ctx->t1)
        cudaEventDestroy(ctx->t1);
    if (ctx->stream)
        cudaStreamDestroy(ctx->stream);
    free(ctx);
}

ekv_status ekv_cuda_get_info(const ekv_cuda *ctx, ekv_cuda_info *info, ekv_error *err)
{
    cudaDeviceProp p;
    memset(info, 0, sizeof *info);
    EKV_CUDA_TRY(cudaGetDeviceProperties(&p, ctx->device), "cudaGetDeviceProperties");
    snprintf(info->name, sizeof info->name, "%s", p.name);
    info->sm_count = p.multiProcessorCount;
    info->cc_major = p.major;
    info->cc_minor = p.minor;
    info->total_mem = p.totalGlobalMem;
    /* CUDA 13 dropped cudaDeviceProp::memoryClockRate: ask the attributes.
     * kHz x bits x 2 (double data rate) / 8 bits = bytes/s */
    int clock_khz = 0, bus_bits = 0;
    if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, ctx->device) != cudaSuccess ||
        cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, ctx->device) != cudaSuccess) {
        (void)cudaGetLastError();
        clock_khz = bus_bits = 0;
    }
    info->hbm_gbps = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9;
    return EKV_OK;
}

ekv_status ekv_cuda_sync(ekv_cuda *ctx, ekv_error *err)
{
    EKV_CUDA_TRY(cudaStreamSynchronize(ctx->stream), "stream synchronize");
    return ekv_cuda_launched("asynchronous error", err);
}

ekv_status ekv_cuda_malloc(ekv_cuda *ctx, size_t bytes, void **dptr, ekv_error *err)
{
    (void)ctx;
    *dptr = NULL;
    if (bytes == 0)
        bytes = 16; /* a valid, distinct pointer for empty tensors */
    cudaError_t e = cudaMalloc(dptr, bytes);
    if (e != cudaSuccess) {
        *dptr = NULL;
        (void)cudaGetLastError();
        return ekv_error_set(err, EKV_ENOMEM, "cuda: cannot allocate %zu bytes: %s", bytes,
                             cudaGetErrorString(e));
    }
    return EKV_OK;
}

void ekv_cuda_free(void *dptr)
{
    if (dptr)
        cudaFree(dptr);
}

ekv_status ekv_cuda_host_alloc(size_t bytes, void **hptr, ekv_error *err)
{
    *hptr = NULL;
    cudaError_t e = cudaHostAlloc(hptr, bytes ? bytes : 16, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess) {
        *hptr = NULL;
        (void)cudaGetLastError();
        return ekv_error_set(err, EKV_ENOMEM, "cuda: cannot pin %zu host bytes: %s", bytes,
                             cudaGetErrorString(e));
    }
    return EKV_OK;
}

void ekv_cuda_host_free(void *hptr)
{
    if (hptr)
        cudaFreeHost(hptr);
}

ekv_status ekv_cuda_to_device(ekv_cuda *ctx, void *dst, const void *src, size_t bytes,
                              ekv_error *err)
{
    if (bytes == 0)
        return EKV_OK;
    EKV_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx->stream),
                 "copy to device");
    EKV_CUDA_TRY(cudaStreamSynchronize(ctx->stream), "copy to device");
    return EKV_OK;
}

ekv_status ekv_cuda_to_host(ekv_cuda *ctx, void *dst, const void *src, size_t bytes,
                            ekv_error *err)
{
    if (bytes == 0)
        return EKV_OK;
    EKV_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx->stream),
                 "copy to host");
    EKV_CUDA_TRY(cudaStreamSynchronize(ctx->stream), "copy to host");
    return EKV_OK;
}

ekv_status ekv_cuda_memset(ekv_cuda *ctx, void *dptr, int value, size_t bytes, ekv_error *err)
{
    if (bytes == 0)
        return EKV_OK;
    EKV_CUDA_TRY(cudaMemsetAsync(dptr, value, bytes, ctx->stream), "memset");
    return EKV_OK;
}

ekv_status ekv_cuda_timer_start(ekv_cuda *ctx, ekv_error *err)
{
    EKV_CUDA_TRY(cudaEventRecord(ctx->t0, ctx->stream), "event record");
    return EKV_OK;
}

ekv_status ekv_cuda_timer_stop(ekv_cuda *ctx, double *ms, ekv_error *err)
{
    float f = 0;
    EKV_CUDA_TRY(cudaEventRecord(ctx->t1, ctx->stream), "event record");
    EKV_CUDA_TRY(cudaEventSynchronize(ctx->t1), "event synchronize");
    EKV_CUDA_TRY(cudaEventElapsedTime(&f, ctx->t0, ctx->t1), "event elapsed");
    *ms = f;
    return ekv_cuda_launched("asynchronous error", err);
}
