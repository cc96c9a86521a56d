/*
 * weights.cu - GGUF weights on the GPU: dequantized once at load to fp16
 * (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, F32), then every matmul is a cuBLAS
 * GemmEx with fp16 inputs and fp32 accumulation.
 *
 * Dequantizing costs memory (fp16 is ~3.5x a Q4 matrix) but makes the GEMMs
 * cuBLAS's tensor-core kernels; the CPU reference is kern_get_row, whose
 * values these must equal up to the final fp16 rounding (tests/cuda/
 * test_cuda_weights.c). Block formats as in kernels/cpu/quant.h (ggml's).
 */
#include "cuda_internal.cuh"

/* One thread per output element: each reads its block's header and its
 * quant; loads are cached, and this runs once per tensor at load. */
__device__ __forceinline__ float h2f(const uint8_t *p)
{
    __half h;
    memcpy(&h, p, 2);
    return __half2float(h);
}

__device__ float deq_q4_0(const uint8_t *row, int64_t c)
{
    const uint8_t *b = row + (c / 32) * 18;
    const int i = (int)(c % 32);
    const int q = i < 16 ? (b[2 + i] & 0xF) : (b[2 + i - 16] >> 4);
    return (float)(q - 8) * h2f(b);
}

__device__ float deq_q4_1(const uint8_t *row, int64_t c)
{
    const uint8_t *b = row + (c / 32) * 20;
    const int i = (int)(c % 32);
    const int q = i < 16 ? (b[4 + i] & 0xF) : (b[4 + i - 16] >> 4);
    return (float)q * h2f(b) + h2f(b + 2);
}

__device__ float deq_q8_0(const uint8_t *row, int64_t c)
{
    const uint8_t *b = row + (c / 32) * 34;
    return (float)(int8_t)b[2 + c % 32] * h2f(b);
}

/* ggml's get_scale_min_k4 */
__device__ void q4k_scale_min(int j, const uint8_t *q, int *sc, int *mn)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

__device__ float deq_q4_k(const uint8_t *row, int64_t c)
{
    const uint8_t *b = row + (c / 256) * 144;
    const int i = (int)(c % 256), j = i / 64, l = i % 64;
    const int is = 2 * j + (l >= 32);
    int sc, mn;
    q4k_scale_min(is, b + 4, &sc, &mn);
    const uint8_t byte = b[16 + 32 * j + (l % 32)];
    const int q = l < 32 ? (byte & 0xF) : (byte >> 4);
    const float d1 = h2f(b) * (float)sc, m1 = h2f(b + 2) * (float)mn;
    return d1 * (float)q - m1;
}

__device__ float deq_q6_k(const uint8_t *row, int64_t c)
{
    const uint8_t *b = row + (c / 256) * 210;
    const int i = (int)(c % 256), n = i / 128, r = i % 128, quarter = r / 32, l = r % 32;
    const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
    const int8_t *sc = (const int8_t *)(b + 192) + 8 * n;
    const float d = h2f(b + 208);
    const int lo = quarter & 1 ? ql[l + 32] : ql[l];
    const int q = ((quarter < 2 ? lo & 0xF : lo >> 4) | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
    return d * (float)sc[l / 16 + 2 * quarter] * (float)q;
}

__global__ void dequant_kernel(const uint8_t *src, uint32_t type, int64_t n_rows, int64_t k,
                               size_t row_bytes, __half *dst)
{
    const int64_t total = n_rows * k;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / k, c = e % k;
        const uint8_t *row = src + r * row_bytes;
        float v;
        switch (type) {
        case EKV_F32: v = ((const float *)row)[c]; break;
        case EKV_F16: v = h2f(row + 2 * c); break;
        case EKV_Q4_0: v = deq_q4_0(row, c); break;
        case EKV_Q4_1: v = deq_q4_1(row, c); break;
        case EKV_Q8_0: v = deq_q8_0(row, c); break;
        case EKV_Q4_K: v = deq_q4_k(row, c); break;
        default: v = deq_q6_k(row, c); break;
        }
        dst[e] = __float2half_rn(v);
    }
}

bool ekv_cuda_dequant_supports(uint32_t type)
{
    return type == EKV_F32 || type == EKV_F16 || type == EKV_Q4_0 || type == EKV_Q4_1 ||
           type == EKV_Q8_0 || type == EKV_Q4_K || type == EKV_Q6_K;
}

ekv_status ekv_cuda_dequantize(ekv_cuda *ctx, const void *src, uint32_t type, int64_t n_rows,
                               int64_t k, ekv_f16 *dst, ekv_error *err)
{
    uint64_t row_bytes;
    if (!ekv_cuda_dequant_supports(type))
        return ekv_error_set(err, EKV_EUNSUPPORTED, "cuda dequantize: type %u not supported", type);
    if (n_rows < 0 || k <= 0 || !ekv_dtype_row_bytes(type, (uint64_t)k, &row_bytes))
        return ekv_error_set(err, EKV_EINVAL, "cuda dequantize: bad shape %lld x %lld",
                             (long long)n_rows, (long long)k);
    if (n_rows == 0)
        return EKV_OK;
    const int64_t total = n_rows * k;
    const unsigned grid = total / 256 + 1 < 65536 ? (unsigned)(total / 256 + 1) : 65535u;
    dequant_kernel<<<grid, 256, 0, ctx->stream>>>((const uint8_t *)src, type, n_rows, k,
                                                 (size_t)row_bytes, (__half *)dst);
    return ekv_cuda_launched("dequantize", err);
}

ekv_status ekv_cuda_upload_weight(ekv_cuda *ctx, const void *W, uint32_t type, int64_t n,
                                  int64_t k, ekv_f16 **out, ekv_error *err)
{
    uint64_t row_bytes;
    void *raw = NULL, *half = NULL;
    *out = NULL;
    if (n <= 0 || k <= 0 || !ekv_dtype_row_bytes(type, (uint64_t)k, &row_bytes))
        return ekv_error_set(err, EKV_EINVAL, "cuda upload: bad shape %lld x %lld",
                             (long long)n, (long long)k);
    ekv_status rc = ekv_cuda_malloc(ctx, (size_t)row_bytes * n, &raw, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_malloc(ctx, (size_t)n * k * sizeof(ekv_f16), &half, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_device(ctx, raw, W, (size_t)row_bytes * n, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_dequantize(ctx, raw, type, n, k, (ekv_f16 *)half, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_sync(ctx, err);
    ekv_cuda_free(raw);
    if (rc != EKV_OK) {
        ekv_cuda_free(half);
        return rc;
    }
    *out = (ekv_f16 *)half;
    return EKV_OK;
}

/*
 * Row-major Y[m][n] is column-major Y^T (n x m, ld ldy); row-major W[n][k] is
 * column-major W^T (k x n), so Y^T = op_T(W^T) . X^T with X^T column-major
 * k x m (ld k).
 */
ekv_status ekv_cuda_matmul(ekv_cuda *ctx, const ekv_f16 *W, int64_t n, int64_t k,
                           const ekv_f16 *X, int64_t m, float *Y, int64_t ldy, ekv_error *err)
{
    if (n <= 0 || k <= 0 || m < 0 || ldy < n || n > INT32_MAX || k > INT32_MAX || m > INT32_MAX)
        return ekv_error_set(err, EKV_EINVAL, "cuda matmul: bad shape n=%lld k=%lld m=%lld",
                             (long long)n, (long long)k, (long long)m);
    if (m == 0)
        return EKV_OK;
    const float alpha = 1.0f, beta = 0.0f;
    return ekv_cublas_check(cublasGemmEx(ctx->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, (int)m,
                                         (int)k, &alpha, W, CUDA_R_16F, (int)k, X, CUDA_R_16F,
                                         (int)k, &beta, Y, CUDA_R_32F, (int)ldy,
                                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                            "GemmEx", err);
}

__global__ void f32_to_f16_kernel(const float *src, __half *dst, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}

ekv_status ekv_cuda_f32_to_f16(ekv_cuda *ctx, const float *src, ekv_f16 *dst, int64_t n,
                               ekv_error *err)
{
    if (n <= 0)
        return EKV_OK;
    const unsigned grid = n / 256 + 1 < 65536 ? (unsigned)(n / 256 + 1) : 65535u;
    f32_to_f16_kernel<<<grid, 256, 0, ctx->stream>>>(src, (__half *)dst, n);
    return ekv_cuda_launched("f32_to_f16", err);
}
