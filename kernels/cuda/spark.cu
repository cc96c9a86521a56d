/*
 * spark.cu - SparK's packed keys on the device (shared/specs/spark.md
 * sections 3 and 9): the upload of a head whose first tokens are packed, and
 * decode attention that rebuilds each packed key inside the kernel. The CPU
 * twin, and the reference the tests hold this to, is kern_attend_packed
 * (kernels/cpu/attention_packed.c).
 *
 * Storage: a head's packed prefix is one device allocation holding
 * kern_kv_packed's arrays byte for byte (rows, V, positions, 1/sqrt(c_j));
 * the tokens after it are pool blocks as usual. The packed bytes are what is
 * held and read, so the memory saved on the CPU is saved here too.
 *
 * The kernel keeps decode.cu's grid (split, KV head, sequence), its 4-warp
 * thread blocks, its partial (m, l, o) per query and split, and its reduce
 * pass, so it shares ekv_cuda_decode_workspace. A warp takes 32 consecutive
 * tokens at a time, one per lane: the lane rebuilds its token's key channel
 * by channel (spark_row.h; every row has its own channel set, so there is no
 * common layout for tensor-core operands) and dots it with each query of the
 * group as it goes, so the group shares one read of the row. A dense token
 * after the prefix is dotted from its block's transposed K column in the
 * same order. Then an online softmax over the warp's 32 scores and the V
 * rows weighted with lanes across dimensions, as decode_split_kernel does.
 * Masking by stored position and zeros for a query that sees nothing are
 * kern_attention's.
 */
#include "cuda_internal.cuh"

#include <stdlib.h>
#include <string.h>

#include "spark_row.h"

#define SPK_WARPS 4
#define SPK_MIN_SPLIT 128 /* tokens: a split's merge is worth this much work */

static size_t align16(size_t x) { return (x + 15) & ~(size_t)15; }

void ekv_cuda_packed_free(ekv_cuda_packed_head *ph)
{
    if (!ph)
        return;
    ekv_cuda_free(ph->mem);
    memset(ph, 0, sizeof *ph);
}

/* The prefix's arrays at 16-byte offsets in one allocation: rows, V, pos, 1/sqrt(c). */
static ekv_status upload_prefix(ekv_cuda *ctx, const kern_kv_packed *pk, int32_t d,
                                ekv_cuda_packed_head *ph, ekv_error *err)
{
    const size_t n = (size_t)pk->n, rb = pk->row_bytes;
    const size_t o_v = align16(n * rb), o_pos = o_v + align16(n * d * sizeof(ekv_f16));
    const size_t o_isc = o_pos + align16(n * sizeof(int32_t));
    const size_t total = o_isc + (pk->inv_sqrt_c ? (size_t)d * sizeof(float) : 0);
    uint8_t *mem = NULL;
    ekv_status rc = ekv_cuda_malloc(ctx, total, (void **)&mem, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_device(ctx, mem, pk->rows, n * rb, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_device(ctx, mem + o_v, pk->v, n * d * sizeof(ekv_f16), err);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_device(ctx, mem + o_pos, pk->pos, n * sizeof(int32_t), err);
    if (rc == EKV_OK && pk->inv_sqrt_c)
        rc = ekv_cuda_to_device(ctx, mem + o_isc, pk->inv_sqrt_c, (size_t)d * sizeof(float), err);
    if (rc != EKV_OK) {
        ekv_cuda_free(mem);
        return rc;
    }
    ph->n = pk->n;
    ph->n_keep = pk->n_keep;
    ph->row_bytes = (int32_t)rb;
    ph->rows = mem;
    ph->v = (const ekv_f16 *)(mem + o_v);
    ph->pos = (const int32_t *)(mem + o_pos);
    ph->inv_sqrt_c = pk->inv_sqrt_c ? (const float *)(mem + o_isc) : NULL;
    ph->mem = mem;
    return EKV_OK;
}

ekv_status ekv_cuda_kv_upload_packed(ekv_cuda_kv_pool *pool, const kern_kv_view *view,
                                     ekv_cuda_packed_head *ph, int32_t *ids, ekv_error *err)
{
    memset(ph, 0, sizeof *ph);
    const int32_t d = pool->head_dim;
    const kern_kv_packed *pk = view->packed;
    if (view->block_tokens != pool->block_tokens || view->head_dim != d || view->n_tokens < 0)
        return ekv_error_set(err, EKV_EINVAL, "cuda kv upload: view geometry differs from the pool");
    kern_kv_view tail = *view; /* the tokens after the prefix: the blocks */
    tail.packed = NULL;
    if (pk && pk->n != 0) {
        if (pk->n < 0 || pk->n > view->n_tokens || pk->n_keep < 0 || pk->n_keep > d ||
            pk->row_bytes != kern_packed_row_bytes(d, pk->n_keep) || !pk->rows || !pk->v ||
            !pk->pos)
            return ekv_error_set(err, EKV_EINVAL, "cuda kv upload: malformed packed prefix");
        ekv_status rc = upload_prefix(pool->ctx, pk, d, ph, err);
        if (rc != EKV_OK)
            return rc;
        tail.n_tokens -= pk->n;
    }
    ekv_status rc = ekv_cuda_kv_upload_view(pool, &tail, ids, err);
    if (rc != EKV_OK)
        ekv_cuda_packed_free(ph);
    return rc;
}

/* s[i] = q_i . k of dense token r of a block (K transposed, column stride
 * bt), in spk_row_dot's order. */
template <int D>
__device__ __forceinline__ void dense_dot(const __half *K, int bt, const float *q, int g, float *s)
{
    float a[SPK_G_MAX][4];
#pragma unroll
    for (int i = 0; i < SPK_G_MAX; i++)
        a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.0f;
#pragma unroll 4
    for (int j = 0; j < D; j += 4)
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const float k = __half2float(K[(size_t)(j + u) * bt]);
#pragma unroll
            for (int i = 0; i < SPK_G_MAX; i++)
                if (i < g)
                    a[i][u] += q[i * D + j + u] * k;
        }
#pragma unroll
    for (int i = 0; i < SPK_G_MAX; i++)
        s[i] = (a[i][0] + a[i][1]) + (a[i][2] + a[i][3]);
}

/* Shared memory of the kernel: the group's queries, 1/sqrt(c), the merge area. */
static size_t spark_smem(int d)
{
    return ((size_t)SPK_G_MAX * d + d + (size_t)SPK_WARPS * SPK_G_MAX * (d + 2)) * sizeof(float);
}

template <int D>
__global__ void __launch_bounds__(SPK_WARPS * 32)
    spark_decode_kernel(const uint8_t *base, size_t bb, int bt, const int32_t *table,
                        const int32_t *table_off, const int32_t *n_tokens,
                        const ekv_cuda_packed_head *packed, int n_kv, int n_qh, const float *Q,
                        const int32_t *q_pos, float scale, int split_tokens, int n_splits,
                        float *part_m, float *part_l, float *part_o)
{
    constexpr int NC = D / 64; /* half2 columns of V per lane */
    extern __shared__ __align__(16) uint8_t smem[];
    float *qs = (float *)smem, *isc_s = qs + SPK_G_MAX * D;
    float *st_m = isc_s + D, *st_l = st_m + SPK_WARPS * SPK_G_MAX;
    float *st_o = st_l + SPK_WARPS * SPK_G_MAX;
    split_at at;
    if (!split_open(&at, n_tokens, n_kv, n_qh, split_tokens, n_splits, part_m))
        return;
    const int g = at.g, h = at.h;
    const size_t prow = at.prow; /* first query row of the group */
    const ekv_cuda_packed_head ph = packed[h];
    for (int e = threadIdx.x; e < g * D; e += blockDim.x)
        qs[e] = Q[prow * D + e];
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        isc_s[j] = ph.inv_sqrt_c ? ph.inv_sqrt_c[j] : 0.0f;
    __syncthreads();
    const float *isc = ph.inv_sqrt_c ? isc_s : NULL; /* NULL: zero-fill */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t qpos = q_pos[blockIdx.z], t1 = min(at.n, at.t0 + split_tokens);
    const int32_t *tab = table + table_off[h];

    float m[SPK_G_MAX], l[SPK_G_MAX];
    float2 acc[SPK_G_MAX][NC];
#pragma unroll
    for (int i = 0; i < SPK_G_MAX; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++)
            acc[i][c] = make_float2(0.0f, 0.0f);
    }
    for (int32_t c0 = at.t0 + 32 * warp; c0 < t1; c0 += 32 * SPK_WARPS) {
        const int32_t t = c0 + lane;
        float s[SPK_G_MAX];
        int32_t pos = INT32_MAX;
        const __half *vrow = NULL;
        if (t < t1 && t < ph.n) { /* packed: rebuilt from its row */
            spk_row_dot(ph.rows + (size_t)t * ph.row_bytes, D, ph.n_keep, isc, qs, g, s);
            pos = ph.pos[t];
            vrow = (const __half *)ph.v + (size_t)t * D;
        } else if (t < t1) { /* dense: token u of the blocks */
            const int32_t u = t - ph.n, r = u % bt;
            const uint8_t *blk = base + (size_t)tab[u / bt] * bb;
            dense_dot<D>((const __half *)blk + r, bt, qs, g, s);
            pos = ((const int32_t *)(blk + 2 * (size_t)bt * D * 2))[r];
            vrow = (const __half *)(blk + (size_t)bt * D * 2) + (size_t)r * D;
        }
        const bool valid = t < t1 && pos <= qpos;
        float p[SPK_G_MAX];
#pragma unroll
        for (int i = 0; i < SPK_G_MAX; i++) {
            p[i] = 0.0f;
            if (i >= g)
                continue;
            const float si = valid ? s[i] * scale : -INFINITY;
            const float mn = fmaxf(m[i], warp_max(si));
            if (mn == -INFINITY) /* nothing visible yet (warp-uniform) */
                continue;
            const float corr = expf(m[i] - mn);
            p[i] = valid ? expf(si - mn) : 0.0f;
            l[i] = l[i] * corr + warp_sum(p[i]);
            m[i] = mn;
#pragma unroll
            for (int c = 0; c < NC; c++) {
                acc[i][c].x *= corr;
                acc[i][c].y *= corr;
            }
        }
        const int nt = min(32, t1 - c0); /* warp-uniform */
        for (int rr = 0; rr < nt; rr++) {
            const __half2 *v2 = (const __half2 *)__shfl_sync(
                0xffffffffu, (unsigned long long)(uintptr_t)vrow, rr);
            float2 v[NC];
#pragma unroll
            for (int c = 0; c < NC; c++)
                v[c] = __half22float2(v2[32 * c + lane]);
#pragma unroll
            for (int i = 0; i < SPK_G_MAX; i++) {
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
    }
#pragma unroll
    for (int i = 0; i < SPK_G_MAX; i++) {
        if (i >= g)
            continue;
        if (lane == 0) {
            st_m[warp * SPK_G_MAX + i] = m[i];
            st_l[warp * SPK_G_MAX + i] = l[i];
        }
#pragma unroll
        for (int c = 0; c < NC; c++) {
            float *o = st_o + ((size_t)warp * SPK_G_MAX + i) * D + 64 * c + 2 * lane;
            o[0] = acc[i][c].x;
            o[1] = acc[i][c].y;
        }
    }
    merge_warps<D, SPK_WARPS, SPK_G_MAX>(st_m, st_l, st_o, g, prow, at.split, n_splits, part_m,
                                        part_l, part_o);
}

/* Splits: whole 32-token runs, at least SPK_MIN_SPLIT tokens, about four
 * thread blocks per SM over the batch, never more than the workspace holds. */
static void spark_split(const ekv_cuda *ctx, int heads, int32_t max_tokens, int32_t *st,
                        int32_t *ns)
{
    int64_t n = (4 * (int64_t)ctx->sm_count + heads - 1) / heads;
    const int64_t by_len = (max_tokens + SPK_MIN_SPLIT - 1) / SPK_MIN_SPLIT;
    const int64_t cap = ekv_decode_max_splits(heads, max_tokens);
    n = n < by_len ? n : by_len;
    n = n < cap ? n : cap;
    n = n < 1 ? 1 : n;
    const int64_t per = (max_tokens + n - 1) / n;
    *st = (int32_t)((per + 31) / 32 * 32);
    if (*st < 32)
        *st = 32;
    *ns = (int32_t)((max_tokens + *st - 1) / *st);
    if (*ns < 1)
        *ns = 1;
}

template <int D>
static ekv_status launch(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                         const ekv_cuda_kv_heads *heads, const ekv_cuda_packed_head *packed,
                         int n_seq, int n_kv, int n_qh, const float *Q, const int32_t *q_pos,
                         int32_t st, int32_t ns, float scale, void *workspace, ekv_error *err)
{
    const size_t rows = (size_t)n_seq * n_qh * ns;
    float *pm = (float *)workspace, *pl = pm + rows, *po = pl + rows;
    dim3 grid((unsigned)ns, (unsigned)n_kv, (unsigned)n_seq);
    spark_decode_kernel<D><<<grid, SPK_WARPS * 32, spark_smem(D), ctx->stream>>>(
        pool->mem, pool->block_bytes, pool->block_tokens, heads->table, heads->table_off,
        heads->n_tokens, packed, n_kv, n_qh, Q, q_pos, scale, st, ns, pm, pl, po);
    return ekv_cuda_launched("packed decode attention", err);
}

ekv_status ekv_cuda_decode_packed(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                  const ekv_cuda_kv_heads *heads,
                                  const ekv_cuda_packed_head *packed, int n_seq, int n_kv_heads,
                                  int n_q_heads, const float *Q, const int32_t *q_pos,
                                  int32_t max_tokens, float scale, float *out, void *workspace,
                                  ekv_error *err)
{
    const int d = pool->head_dim;
    if (n_seq < 0 || n_kv_heads <= 0 || n_q_heads % n_kv_heads || max_tokens < 0 ||
        heads->n_heads != n_seq * n_kv_heads)
        return ekv_error_set(err, EKV_EINVAL, "cuda packed decode: bad shape");
    if (n_q_heads / n_kv_heads > SPK_G_MAX || (d != 64 && d != 128 && d != 256))
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "cuda packed decode: needs group <= %d, head_dim 64/128/256",
                             SPK_G_MAX);
    if (n_seq == 0)
        return EKV_OK;
    int32_t st = 0, ns = 0;
    spark_split(ctx, n_seq * n_kv_heads, max_tokens, &st, &ns);
    ekv_status rc;
    switch (d) {
    case 64: rc = launch<64>(ctx, pool, heads, packed, n_seq, n_kv_heads, n_q_heads, Q, q_pos, st, ns, scale, workspace, err); break;
    case 128: rc = launch<128>(ctx, pool, heads, packed, n_seq, n_kv_heads, n_q_heads, Q, q_pos, st, ns, scale, workspace, err); break;
    default: rc = launch<256>(ctx, pool, heads, packed, n_seq, n_kv_heads, n_q_heads, Q, q_pos, st, ns, scale, workspace, err); break;
    }
    if (rc != EKV_OK)
        return rc;
    return ekv_decode_reduce(ctx, heads->n_tokens, n_seq, n_kv_heads, n_q_heads, d, st, ns,
                             workspace, out, err);
}
