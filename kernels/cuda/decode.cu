/*
 * decode.cu - decode attention over the paged, per-head KV pool
 * (flash-decoding): the GPU twin of kern_attention for one new query per
 * sequence.
 *
 * Grid (split, KV head, sequence). A thread block of 4 warps takes one split
 * of its head's tokens (a multiple of 16, so splits hold whole pool blocks);
 * each warp streams whole 16-token pool blocks (K, V and positions are one
 * contiguous 64 * d + 64 byte run) into shared memory with cp.async, double
 * buffered, and scores them for all the GQA group's query heads at once:
 * every K/V byte is read from HBM once per step for the whole group. Lane
 * (r, half) dots token r over the even / odd dimensions; an online softmax
 * (running max m, sum l, unnormalised output) folds each block in. The four
 * warps' states merge in shared memory into one partial (m, l, o) per query
 * and split; a second kernel merges the splits. A head's length is its own
 * (ragged budgets): splits past it exit at once. Masking compares stored
 * positions with the query's, as kern_attention does; a query that sees
 * nothing gets zeros.
 */
#include "cuda_internal.cuh"

#include <cuda_pipeline.h>

#define DEC_WARPS 4
#define DEC_G_MAX 8
#define DEC_BT 16

static int32_t split_override; /* tests: tokens per split, 0 = automatic */

void ekv_cuda_decode_set_split(int32_t tokens) { split_override = tokens < 0 ? 0 : tokens; }

/* Tokens per split: about 1024 thread blocks in all, at least 128 tokens. */
static int32_t split_tokens(int heads, int32_t max_tokens)
{
    int64_t s = split_override;
    if (s <= 0) {
        const int64_t want = (1024 + heads - 1) / heads;
        s = ((int64_t)max_tokens + want - 1) / want;
        if (s < 128)
            s = 128;
    }
    return (int32_t)((s + DEC_BT - 1) / DEC_BT * DEC_BT);
}

static int32_t n_splits_of(int heads, int32_t max_tokens)
{
    const int32_t s = split_tokens(heads, max_tokens);
    return max_tokens <= 0 ? 1 : (max_tokens + s - 1) / s;
}

size_t ekv_cuda_decode_workspace(int n_seq, int n_kv_heads, int n_q_heads, int d,
                                 int32_t max_tokens)
{
    const size_t splits = (size_t)n_splits_of(n_seq * n_kv_heads, max_tokens);
    return (size_t)n_seq * n_q_heads * splits * ((size_t)d + 2) * sizeof(float);
}

template <int D>
__device__ __forceinline__ void issue_block(const uint8_t *base, size_t bb, int32_t id,
                                            uint8_t *dst, int lane)
{
    constexpr int WORDS = (64 * D + 64) / 16;
    const uint8_t *src = base + (size_t)id * bb;
    for (int w = lane; w < WORDS; w += 32)
        __pipeline_memcpy_async(dst + 16 * w, src + 16 * w, 16);
}

template <int D>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    decode_split_kernel(const uint8_t *base, size_t bb, const int32_t *table,
                        const int32_t *table_off, const int32_t *n_tokens, int n_kv, int n_qh,
                        const float *Q, const int32_t *q_pos, float scale, int split_tokens,
                        int n_splits, float *part_m, float *part_l, float *part_o)
{
    constexpr int NC = D / 64;            /* half2 columns per lane */
    constexpr int BLOCK = 64 * D + 64;    /* K, V, positions of one pool block */
    extern __shared__ __align__(16) uint8_t smem[];
    const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const int g = n_qh / n_kv, qh0 = kvh * g;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = seq * n_kv + kvh;
    const int32_t n = n_tokens[h], t0 = split * split_tokens;
    const size_t prow = (size_t)seq * n_qh + qh0; /* first query row of the group */
    if (t0 >= n) {
        if (threadIdx.x < g)
            part_m[(prow + threadIdx.x) * n_splits + split] = -INFINITY;
        return;
    }
    float *qs = (float *)smem;
    uint8_t *wb = smem + (size_t)DEC_G_MAX * D * 4 + (size_t)warp * 2 * BLOCK;
    for (int e = threadIdx.x; e < g * D; e += blockDim.x)
        qs[e] = Q[prow * D + e];
    __syncthreads();

    const int32_t qpos = q_pos[seq], t1 = min(n, t0 + split_tokens);
    const int b_end = (t1 + DEC_BT - 1) / DEC_BT;
    const int32_t *tab = table + table_off[h];
    const int r = lane & 15, half = lane >> 4;
    float m[DEC_G_MAX], l[DEC_G_MAX];
    float2 acc[DEC_G_MAX][NC];
#pragma unroll
    for (int i = 0; i < DEC_G_MAX; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++)
            acc[i][c] = make_float2(0.0f, 0.0f);
    }
    int b = t0 / DEC_BT + warp;
    if (b < b_end)
        issue_block<D>(base, bb, tab[b], wb, lane);
    __pipeline_commit();
    for (int it = 0; b < b_end; b += DEC_WARPS, it++) {
        if (b + DEC_WARPS < b_end)
            issue_block<D>(base, bb, tab[b + DEC_WARPS], wb + ((it + 1) & 1) * BLOCK, lane);
        __pipeline_commit();
        __pipeline_wait_prior(1);
        __syncwarp();
        const uint8_t *cur = wb + (it & 1) * BLOCK;
        const __half *K = (const __half *)cur;
        const __half2 *V2 = (const __half2 *)(cur + 32 * D);
        const int32_t *P = (const int32_t *)(cur + 64 * D);
        const int32_t tok = b * DEC_BT + r;
        const bool valid = tok < t1 && P[r] <= qpos;

        float s[DEC_G_MAX];
#pragma unroll
        for (int i = 0; i < DEC_G_MAX; i++)
            s[i] = 0.0f;
#pragma unroll 8
        for (int jj = 0; jj < D / 2; jj++) {
            const int j = 2 * jj + half;
            const float k = __half2float(K[j * DEC_BT + r]);
#pragma unroll
            for (int i = 0; i < DEC_G_MAX; i++)
                if (i < g)
                    s[i] += qs[i * D + j] * k;
        }
        float p[DEC_G_MAX];
#pragma unroll
        for (int i = 0; i < DEC_G_MAX; i++) {
            p[i] = 0.0f;
            if (i >= g)
                continue;
            s[i] += __shfl_xor_sync(0xffffffffu, s[i], 16);
            s[i] = valid ? s[i] * scale : -INFINITY;
            float mt = s[i];
#pragma unroll
            for (int o = 8; o > 0; o >>= 1)
                mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            const float mn = fmaxf(m[i], mt);
            if (mn == -INFINITY) /* nothing visible yet (warp-uniform) */
                continue;
            const float corr = expf(m[i] - mn);
            p[i] = valid ? expf(s[i] - mn) : 0.0f;
            float ps = p[i];
#pragma unroll
            for (int o = 8; o > 0; o >>= 1)
                ps += __shfl_xor_sync(0xffffffffu, ps, o);
            l[i] = l[i] * corr + ps;
            m[i] = mn;
#pragma unroll
            for (int c = 0; c < NC; c++) {
                acc[i][c].x *= corr;
                acc[i][c].y *= corr;
            }
        }
#pragma unroll 4
        for (int rr = 0; rr < DEC_BT; rr++) {
            float2 v[NC];
#pragma unroll
            for (int c = 0; c < NC; c++)
                v[c] = __half22float2(V2[rr * (D / 2) + 32 * c + lane]);
#pragma unroll
            for (int i = 0; i < DEC_G_MAX; i++) {
                if (i >= g)
                    continue;
                const float pr = __shfl_sync(0xffffffffu, p[i], rr);
#pragma unroll
                for (int c = 0; c < NC; c++) {
                    acc[i][c].x += pr * v[c].x;
                    acc[i][c].y += pr * v[c].y;
                }
            }
        }
        __syncwarp();
    }
    __pipeline_wait_prior(0);
    __syncthreads(); /* the buffers become the merge area */

    float *st_m = (float *)(smem + (size_t)DEC_G_MAX * D * 4);
    float *st_l = st_m + DEC_WARPS * DEC_G_MAX;
    float *st_o = st_l + DEC_WARPS * DEC_G_MAX;
#pragma unroll
    for (int i = 0; i < DEC_G_MAX; i++) {
        if (i >= g)
            continue;
        if (lane == 0) {
            st_m[warp * DEC_G_MAX + i] = m[i];
            st_l[warp * DEC_G_MAX + i] = l[i];
        }
#pragma unroll
        for (int c = 0; c < NC; c++) {
            float *o = st_o + ((size_t)warp * DEC_G_MAX + i) * D + 64 * c + 2 * lane;
            o[0] = acc[i][c].x;
            o[1] = acc[i][c].y;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < g * D; e += blockDim.x) {
        const int i = e / D, j = e % D;
        float M = -INFINITY;
        for (int w = 0; w < DEC_WARPS; w++)
            M = fmaxf(M, st_m[w * DEC_G_MAX + i]);
        float L = 0.0f, O = 0.0f;
        if (M != -INFINITY)
            for (int w = 0; w < DEC_WARPS; w++) {
                const float mw = st_m[w * DEC_G_MAX + i];
                if (mw == -INFINITY)
                    continue;
                const float f = expf(mw - M);
                L += st_l[w * DEC_G_MAX + i] * f;
                O += st_o[((size_t)w * DEC_G_MAX + i) * D + j] * f;
            }
        const size_t pi = (prow + i) * n_splits + split;
        part_o[pi * D + j] = O;
        if (j == 0) {
            part_m[pi] = M;
            part_l[pi] = L;
        }
    }
}

/* One thread block per (sequence, query head), one thread per dimension. */
__global__ void decode_reduce_kernel(const int32_t *n_tokens, int n_kv, int n_qh, int d,
                                     int split_tokens, int n_splits, const float *part_m,
                                     const float *part_l, const float *part_o, float *out)
{
    const int row = blockIdx.x, seq = row / n_qh, qh = row % n_qh;
    const int32_t n = n_tokens[seq * n_kv + qh / (n_qh / n_kv)];
    const int ns = min(n_splits, (n + split_tokens - 1) / split_tokens);
    float M = -INFINITY;
    for (int s = 0; s < ns; s++)
        M = fmaxf(M, part_m[(size_t)row * n_splits + s]);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float L = 0.0f, O = 0.0f;
        if (M != -INFINITY)
            for (int s = 0; s < ns; s++) {
                const size_t pi = (size_t)row * n_splits + s;
                if (part_m[pi] == -INFINITY)
                    continue;
                const float f = expf(part_m[pi] - M);
                L += part_l[pi] * f;
                O += part_o[pi * d + j] * f;
            }
        out[(size_t)row * d + j] = L > 0.0f ? O / L : 0.0f;
    }
}

template <int D>
static ekv_status launch_split(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                               const ekv_cuda_kv_heads *heads, int n_seq, int n_kv, int n_qh,
                               const float *Q, const int32_t *q_pos, float scale, int32_t st,
                               int32_t ns, float *pm, float *pl, float *po, ekv_error *err)
{
    const size_t q_bytes = (size_t)DEC_G_MAX * D * 4;
    const size_t buf_bytes = (size_t)DEC_WARPS * 2 * (64 * D + 64);
    const size_t merge_bytes = (size_t)DEC_WARPS * DEC_G_MAX * (D + 2) * 4;
    const size_t smem = q_bytes + (buf_bytes > merge_bytes ? buf_bytes : merge_bytes);
    EKV_CUDA_TRY(cudaFuncSetAttribute(decode_split_kernel<D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                 "decode: shared memory attribute");
    dim3 grid((unsigned)ns, (unsigned)n_kv, (unsigned)n_seq);
    decode_split_kernel<D><<<grid, DEC_WARPS * 32, smem, ctx->stream>>>(
        pool->mem, pool->block_bytes, heads->table, heads->table_off, heads->n_tokens, n_kv, n_qh,
        Q, q_pos, scale, st, ns, pm, pl, po);
    return ekv_cuda_launched("decode attention", err);
}

ekv_status ekv_cuda_decode_attention(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                     const ekv_cuda_kv_heads *heads, int n_seq, int n_kv_heads,
                                     int n_q_heads, const float *Q, const int32_t *q_pos,
                                     int32_t max_tokens, float scale, float *out,
                                     void *workspace, ekv_error *err)
{
    const int d = pool->head_dim;
    if (n_seq < 0 || n_kv_heads <= 0 || n_q_heads % n_kv_heads || max_tokens < 0 ||
        heads->n_heads != n_seq * n_kv_heads)
        return ekv_error_set(err, EKV_EINVAL, "cuda decode: bad shape");
    if (n_q_heads / n_kv_heads > DEC_G_MAX || pool->block_tokens != DEC_BT ||
        (d != 64 && d != 128 && d != 256))
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "cuda decode: needs group <= %d, 16-token blocks, head_dim 64/128/256",
                             DEC_G_MAX);
    if (n_seq == 0)
        return EKV_OK;
    const int32_t st = split_tokens(n_seq * n_kv_heads, max_tokens);
    const int32_t ns = n_splits_of(n_seq * n_kv_heads, max_tokens);
    const size_t rows = (size_t)n_seq * n_q_heads * ns;
    float *pm = (float *)workspace, *pl = pm + rows, *po = pl + rows;
    ekv_status rc;
    switch (d) {
    case 64: rc = launch_split<64>(ctx, pool, heads, n_seq, n_kv_heads, n_q_heads, Q, q_pos, scale, st, ns, pm, pl, po, err); break;
    case 128: rc = launch_split<128>(ctx, pool, heads, n_seq, n_kv_heads, n_q_heads, Q, q_pos, scale, st, ns, pm, pl, po, err); break;
    default: rc = launch_split<256>(ctx, pool, heads, n_seq, n_kv_heads, n_q_heads, Q, q_pos, scale, st, ns, pm, pl, po, err); break;
    }
    if (rc != EKV_OK)
        return rc;
    decode_reduce_kernel<<<n_seq * n_q_heads, d, 0, ctx->stream>>>(
        heads->n_tokens, n_kv_heads, n_q_heads, d, st, ns, pm, pl, po, out);
    return ekv_cuda_launched("decode reduce", err);
}
