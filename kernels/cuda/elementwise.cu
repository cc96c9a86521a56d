/*
 * elementwise.cu - RMSNorm, RoPE, SwiGLU and the embedding gather on the GPU.
 *
 * Each mirrors its CPU reference in kernels/cpu/elementwise.c operation for
 * operation (RMSNorm sums squares in double; RoPE advances the angle by the
 * same float multiplications, with theta_scale computed on the host by the
 * same powf call), so results agree to a few ulp; only the device's cosf,
 * sinf, expf and FMA contraction differ.
 */
#include "cuda_internal.cuh"

__global__ void rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps)
{
    __shared__ double part[32];
    const float *xr = x + (size_t)blockIdx.x * n;
    float *yr = out + (size_t)blockIdx.x * n;
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += (double)(xr[i] * xr[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0)
        part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (unsigned i = 0; i < blockDim.x / 32; i++)
            t += part[i];
        part[0] = t;
    }
    __syncthreads();
    const float scale = 1.0f / sqrtf((float)(part[0] / n) + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        yr[i] = (xr[i] * scale) * w[i];
}

ekv_status ekv_cuda_rmsnorm(ekv_cuda *ctx, float *out, const float *x, const float *w,
                            int64_t n_rows, int n, float eps, ekv_error *err)
{
    if (n_rows < 0 || n <= 0 || n_rows > INT32_MAX)
        return ekv_error_set(err, EKV_EINVAL, "cuda rmsnorm: bad shape");
    if (n_rows == 0)
        return EKV_OK;
    rmsnorm_kernel<<<(unsigned)n_rows, 256, 0, ctx->stream>>>(out, x, w, n, eps);
    return ekv_cuda_launched("rmsnorm", err);
}

/* One thread per (token, head), walking the pairs like kern_rope so theta
 * sees the same sequence of float multiplications. */
__global__ void rope_kernel(float *x, int n_tok, int n_heads, int d, int n_rot,
                            const int32_t *pos, float theta_scale, int neox)
{
    const int64_t id = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (id >= (int64_t)n_tok * n_heads)
        return;
    float *v = x + id * d;
    float theta = (float)pos[id / n_heads];
    for (int i0 = 0; i0 < n_rot && i0 < d; i0 += 2) {
        const float c = cosf(theta), s = sinf(theta);
        const int a = neox ? i0 / 2 : i0;
        const int b = neox ? i0 / 2 + n_rot / 2 : i0 + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        v[b] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
        theta = __fmul_rn(theta, theta_scale);
    }
}

ekv_status ekv_cuda_rope(ekv_cuda *ctx, float *x, int n_tok, int n_heads, int d, int n_rot,
                         const int32_t *pos, float freq_base, int neox, ekv_error *err)
{
    if (n_tok < 0 || n_heads <= 0 || d <= 0 || n_rot <= 0 || n_rot % 2)
        return ekv_error_set(err, EKV_EINVAL, "cuda rope: bad shape");
    if (n_tok == 0)
        return EKV_OK;
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot); /* as kern_rope */
    const int64_t rows = (int64_t)n_tok * n_heads;
    rope_kernel<<<ekv_div_up(rows, 128), 128, 0, ctx->stream>>>(x, n_tok, n_heads, d, n_rot, pos,
                                                               theta_scale, neox);
    return ekv_cuda_launched("rope", err);
}

__global__ void swiglu_kernel(float *g, const float *u, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

ekv_status ekv_cuda_swiglu(ekv_cuda *ctx, float *g, const float *u, int64_t n, ekv_error *err)
{
    if (n <= 0)
        return EKV_OK;
    const unsigned grid = n / 256 + 1 < 65536 ? (unsigned)(n / 256 + 1) : 65535u;
    swiglu_kernel<<<grid, 256, 0, ctx->stream>>>(g, u, n);
    return ekv_cuda_launched("swiglu", err);
}

__global__ void embed_kernel(const __half *table, int64_t n_vocab, int dim, const int32_t *tokens,
                             int n, float *out)
{
    const int64_t total = (int64_t)n * dim;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int32_t t = tokens[e / dim];
        out[e] = t >= 0 && t < n_vocab ? __half2float(table[(int64_t)t * dim + e % dim]) : 0.0f;
    }
}

ekv_status ekv_cuda_embed(ekv_cuda *ctx, const ekv_f16 *table, int64_t n_vocab, int dim,
                          const int32_t *tokens, int n, float *out, ekv_error *err)
{
    if (n < 0 || dim <= 0 || n_vocab <= 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda embed: bad shape");
    if (n == 0)
        return EKV_OK;
    const int64_t total = (int64_t)n * dim;
    const unsigned grid = total / 256 + 1 < 65536 ? (unsigned)(total / 256 + 1) : 65535u;
    embed_kernel<<<grid, 256, 0, ctx->stream>>>((const __half *)table, n_vocab, dim, tokens, n, out);
    return ekv_cuda_launched("embed", err);
}
