/*
 * prefill.cu - causal attention of a prompt chunk over contiguous fp16 K/V,
 * tiled with an online softmax (flash-attention's recurrence, Dao et al.
 * 2022, Alg. 1): scores exist only for one 32-key tile at a time, never as an
 * N x N matrix.
 *
 * Thread block = 4 warps = 16 query rows of one query head (4 rows per warp,
 * so each K element read from shared memory serves 4 rows). Per key tile the
 * block stages 32 keys of K (rows padded by one half2 so lane t reading key t
 * hits its own bank) and V in shared memory; lane t scores key t, then every
 * lane accumulates dimensions lane + 32c of the output. Tiles stop at the
 * block's last visible key. Query i sits at position q_off + i and sees keys
 * 0..q_off + i (chunked prefill over a cached prefix). Plain FP32 FMAs, no
 * tensor cores: correct and memory-light, not yet peak (docs/cuda.md).
 * Reference: kern_attention over a paged view of the same K/V.
 */
#include "cuda_internal.cuh"

#define PF_WARPS 4
#define PF_ROWS 4 /* query rows per warp */
#define PF_BQ (PF_WARPS * PF_ROWS)
#define PF_BK 32

template <int D>
__global__ void __launch_bounds__(PF_WARPS * 32)
    prefill_kernel(const float *Q, int n_q, int n_heads, const __half *K, const __half *V,
                   int n_kv, int n_kv_heads, int q_off, float scale, float *out, float *lse)
{
    constexpr int DC = D / 32, KS = D / 2 + 1; /* K row stride in half2 (padded) */
    extern __shared__ __align__(16) uint8_t smem[];
    float *qs = (float *)smem;                              /* [PF_BQ][D] */
    __half2 *ks = (__half2 *)(qs + PF_BQ * D);             /* [PF_BK][KS] */
    __half *vs = (__half *)(ks + PF_BK * KS);              /* [PF_BK][D] */
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const int q0 = blockIdx.x * PF_BQ;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int e = threadIdx.x; e < PF_BQ * D; e += blockDim.x) {
        const int qi = q0 + e / D;
        qs[e] = qi < n_q ? Q[((size_t)qi * n_heads + h) * D + e % D] : 0.0f;
    }
    float m[PF_ROWS], l[PF_ROWS], acc[PF_ROWS][DC];
#pragma unroll
    for (int r = 0; r < PF_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < DC; c++)
            acc[r][c] = 0.0f;
    }
    const int last_q = min(n_q, q0 + PF_BQ) - 1;
    const int key_end = min(n_kv, q_off + last_q + 1);
    for (int k0 = 0; k0 < key_end; k0 += PF_BK) {
        __syncthreads(); /* the previous tile is consumed (and qs is written) */
        for (int e = threadIdx.x; e < PF_BK * D / 2; e += blockDim.x) {
            const int t = e / (D / 2), jj = e % (D / 2), key = k0 + t;
            __half2 kv = __float2half2_rn(0.0f), vv = kv;
            if (key < n_kv) {
                const size_t off = ((size_t)key * n_kv_heads + kvh) * D + 2 * jj;
                kv = *(const __half2 *)(K + off);
                vv = *(const __half2 *)(V + off);
            }
            ks[t * KS + jj] = kv;
            ((__half2 *)vs)[t * (D / 2) + jj] = vv;
        }
        __syncthreads();
        const int key = k0 + lane;
        float s[PF_ROWS];
#pragma unroll
        for (int r = 0; r < PF_ROWS; r++)
            s[r] = 0.0f;
#pragma unroll 4
        for (int jj = 0; jj < D / 2; jj++) {
            const float2 k = __half22float2(ks[lane * KS + jj]);
#pragma unroll
            for (int r = 0; r < PF_ROWS; r++) {
                const float *q = qs + (warp * PF_ROWS + r) * D + 2 * jj;
                s[r] += q[0] * k.x + q[1] * k.y;
            }
        }
        float p[PF_ROWS];
#pragma unroll
        for (int r = 0; r < PF_ROWS; r++) {
            const int qi = q0 + warp * PF_ROWS + r;
            const bool vis = qi < n_q && key < n_kv && key <= q_off + qi;
            s[r] = vis ? s[r] * scale : -INFINITY;
            const float mn = fmaxf(m[r], warp_max(s[r]));
            p[r] = 0.0f;
            if (mn == -INFINITY) /* row sees nothing yet (warp-uniform) */
                continue;
            const float corr = expf(m[r] - mn);
            p[r] = vis ? expf(s[r] - mn) : 0.0f;
            l[r] = l[r] * corr + warp_sum(p[r]);
            m[r] = mn;
#pragma unroll
            for (int c = 0; c < DC; c++)
                acc[r][c] *= corr;
        }
#pragma unroll 4
        for (int t = 0; t < PF_BK; t++) {
            float v[DC];
#pragma unroll
            for (int c = 0; c < DC; c++)
                v[c] = __half2float(vs[t * D + lane + 32 * c]);
#pragma unroll
            for (int r = 0; r < PF_ROWS; r++) {
                const float pt = __shfl_sync(0xffffffffu, p[r], t);
#pragma unroll
                for (int c = 0; c < DC; c++)
                    acc[r][c] += pt * v[c];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < PF_ROWS; r++) {
        const int qi = q0 + warp * PF_ROWS + r;
        if (qi >= n_q)
            continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        float *o = out + ((size_t)qi * n_heads + h) * D;
#pragma unroll
        for (int c = 0; c < DC; c++)
            o[lane + 32 * c] = acc[r][c] * inv;
        if (lse && lane == 0)
            lse[(size_t)qi * n_heads + h] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
    }
}

template <int D>
static ekv_status launch_prefill(ekv_cuda *ctx, const float *Q, int n_q, int n_heads,
                                 const ekv_f16 *K, const ekv_f16 *V, int n_kv, int n_kv_heads,
                                 int q_off, float scale, float *out, float *lse, ekv_error *err)
{
    const size_t smem = (size_t)PF_BQ * D * 4 + (size_t)PF_BK * (D / 2 + 1) * 4 +
                        (size_t)PF_BK * D * 2;
    EKV_CUDA_TRY(cudaFuncSetAttribute(prefill_kernel<D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "prefill: shared memory attribute");
    dim3 grid(ekv_div_up(n_q, PF_BQ), (unsigned)n_heads);
    prefill_kernel<D><<<grid, PF_WARPS * 32, smem, ctx->stream>>>(
        Q, n_q, n_heads, (const __half *)K, (const __half *)V, n_kv, n_kv_heads, q_off, scale, out,
        lse);
    return ekv_cuda_launched("prefill attention", err);
}

ekv_status ekv_cuda_prefill_attention(ekv_cuda *ctx, const float *Q, int n_q, int n_heads,
                                      const ekv_f16 *K, const ekv_f16 *V, int n_kv, int n_kv_heads,
                                      int d, int q_off, float scale, float *out, float *lse,
                                      ekv_error *err)
{
    if (n_q < 0 || n_kv < 0 || q_off < 0 || n_heads <= 0 || n_kv_heads <= 0 ||
        n_heads % n_kv_heads || n_heads > 65535)
        return ekv_error_set(err, EKV_EINVAL, "cuda prefill: bad shape");
    if (n_q == 0)
        return EKV_OK;
    switch (d) {
    case 64: return launch_prefill<64>(ctx, Q, n_q, n_heads, K, V, n_kv, n_kv_heads, q_off, scale, out, lse, err);
    case 128: return launch_prefill<128>(ctx, Q, n_q, n_heads, K, V, n_kv, n_kv_heads, q_off, scale, out, lse, err);
    case 256: return launch_prefill<256>(ctx, Q, n_q, n_heads, K, V, n_kv, n_kv_heads, q_off, scale, out, lse, err);
    default:
        return ekv_error_set(err, EKV_EUNSUPPORTED, "cuda prefill: head_dim %d (64/128/256 only)", d);
    }
}
