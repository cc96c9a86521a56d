/*
 * decode.cu - decode attention over the paged, per-head KV pool
 * (flash-decoding): the GPU twin of kern_attention for one new query per
 * sequence.
 *
 * Grid (split, KV head, sequence). A thread block of 4 warps takes one split
 * of its head's tokens (a multiple of 16, so splits hold whole pool blocks);
 * each warp streams whole 16-token pool blocks (K, V and positions are one
 * contiguous 64 * d + 64 byte run) into its ring of shared-memory stages
 * with cp.async and scores them for all the GQA group's query heads at
 * once: every K/V byte is read from HBM once per step for the whole group.
 * Two kernels score a block: decode_mma_kernel on tensor cores (head_dim 64
 * / 128, the default; see its comment) and decode_split_kernel on CUDA
 * cores (every head_dim; lane (r, half) dots token r over the even / odd
 * dimensions). Both fold blocks in with an online softmax (running max m,
 * sum l, unnormalised output); the four warps' states merge in shared
 * memory into one partial (m, l, o) per query and split, and
 * decode_reduce_kernel merges the splits. A head's length is its own
 * (ragged budgets): splits past it exit at once. Masking compares stored
 * positions with the query's, as kern_attention does; a query that sees
 * nothing gets zeros. docs/cuda.md has the measurements behind the tuning.
 */
#include "cuda_internal.cuh"

#include <cuda_pipeline.h>

#define DEC_WARPS 4
#define DEC_G_MAX 8
#define DEC_BT 16
/* Blocks per warp in shared memory for the tensor-core kernel: 2 (one in
 * flight while one is scored, 3 thread blocks per SM) for heads shorter
 * than DEC_LONG tokens, 4 (three in flight, one thread block per SM) from
 * there: the H200 sweep (`bench cuda-attention --sweep`) had 4 stages best
 * at 32k (87% of HBM against 84%) and 2 best at 4k (78% against 72%). */
#define DEC_LONG 16384

static int32_t split_override; /* tests: tokens per split, 0 = automatic */
static bool force_simt;        /* tests, bench: the CUDA-core kernel for every head_dim */
static int stages_override;    /* bench --sweep: 2..4, 0 = by length (DEC_LONG) */
static int last_blocks_per_sm; /* of the last launch: the benchmark reports it */

void ekv_cuda_decode_set_split(int32_t tokens) { split_override = tokens < 0 ? 0 : tokens; }
void ekv_cuda_decode_force_simt(bool on) { force_simt = on; }
int ekv_cuda_decode_blocks_per_sm(void) { return __atomic_load_n(&last_blocks_per_sm, __ATOMIC_RELAXED); }
void ekv_cuda_decode_set_stages(int stages)
{
    stages_override = stages >= 2 && stages <= 4 ? stages : 0;
}

/* Splits. A split is a run of whole blocks of one head, at least
 * DEC_MIN_SPLIT tokens, and heads x splits stays <= DEC_MAX_TBS (what the
 * workspace is sized for). Within that, the count is chosen at launch from
 * the device's concurrent thread blocks ("slots") to minimise
 *   waves x (split tokens + DEC_TB_OVERHEAD),   waves = ceil(thread blocks / slots):
 * a last wave that fills few slots costs as much as a full one (at 32k x 64
 * on the H200, 2 splits per head left it 60% full). */
#define DEC_MIN_SPLIT 128
#define DEC_MAX_TBS 8192
#define DEC_TB_OVERHEAD 64 /* a thread block's start and merge, in tokens' time */

static int32_t round_block(int64_t t) { return (int32_t)((t + DEC_BT - 1) / DEC_BT * DEC_BT); }

static int32_t max_splits(int heads, int32_t max_tokens)
{
    if (max_tokens <= 0)
        return 1;
    if (split_override > 0)
        return (max_tokens + round_block(split_override) - 1) / round_block(split_override);
    int64_t cap = DEC_MAX_TBS / heads, by_len = (max_tokens + DEC_MIN_SPLIT - 1) / DEC_MIN_SPLIT;
    cap = cap < by_len ? cap : by_len;
    return cap < 1 ? 1 : (int32_t)cap;
}

static void choose_split(int heads, int32_t max_tokens, int slots, int32_t *st, int32_t *ns)
{
    *st = DEC_MIN_SPLIT;
    *ns = 1;
    if (max_tokens <= 0)
        return;
    if (split_override > 0) {
        *st = round_block(split_override);
        *ns = (max_tokens + *st - 1) / *st;
        return;
    }
    int64_t last = max_splits(heads, max_tokens);
    const int64_t enough = 16 * (int64_t)slots / heads + 1; /* past 16 waves nothing is won */
    last = last < enough ? last : enough;
    double best = INFINITY;
    for (int64_t n = 1; n <= last; n++) {
        const int32_t s = round_block((max_tokens + n - 1) / n);
        const int32_t real = (max_tokens + s - 1) / s;
        if (real != n)
            continue; /* the same split as a smaller n */
        const double t = ceil((double)heads * n / (slots > 0 ? slots : 1)) * (s + DEC_TB_OVERHEAD);
        if (t < best) {
            best = t;
            *st = s;
            *ns = real;
        }
    }
}

size_t ekv_cuda_decode_workspace(int n_seq, int n_kv_heads, int n_q_heads, int d,
                                 int32_t max_tokens)
{
    const size_t splits = (size_t)max_splits(n_seq * n_kv_heads > 0 ? n_seq * n_kv_heads : 1,
                                             max_tokens);
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
    split_at at;
    if (!split_open(&at, n_tokens, n_kv, n_qh, split_tokens, n_splits, part_m))
        return;
    const int split = at.split, g = at.g, h = at.h;
    const int32_t n = at.n, t0 = at.t0;
    const size_t prow = at.prow; /* first query row of the group */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *qs = (float *)smem;
    uint8_t *wb = smem + (size_t)DEC_G_MAX * D * 4 + (size_t)warp * 2 * BLOCK;
    for (int e = threadIdx.x; e < g * D; e += blockDim.x)
        qs[e] = Q[prow * D + e];
    __syncthreads();

    const int32_t qpos = q_pos[blockIdx.z], t1 = min(n, t0 + split_tokens);
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
    merge_warps<D, DEC_WARPS, DEC_G_MAX>(st_m, st_l, st_o, g, prow, split, n_splits, part_m,
                                           part_l, part_o);
}

/* ---- the tensor-core path (head_dim 64 / 128, group <= 8) ----
 *
 * The same grid, split and double-buffered cp.async stream as above, but a
 * warp scores a 16-token block with mma.sync m16n8k16 (fp16 in, fp32
 * accumulate): S = Q K^T with the group's query heads as rows 0..g-1 of the
 * 16-row A operand (rows g..15 zero) and the tokens as columns, then
 * O += P V with P taken straight from S's accumulator layout (FlashAttention
 * 2's register reuse). K and V are fp16 already; Q and P are fp32, so each
 * goes in as two fp16 halves, hi = fp16(x) and lo = fp16(x - hi), one mma
 * each: the products then carry ~22 bits, as the CPU's fp32 does. Operands
 * come from shared memory with ldmatrix.trans; pool blocks are stored there
 * with their 16-byte chunks XOR-swizzled so that those loads are free of
 * bank conflicts (K: chunk ^ bit 2 of the dim; V: chunk ^ token % 8).
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16 .f16, lane = 4 * grp + tig):
 *   A (16 x 16): a0 = A[grp][2 tig, +1], a1 = A[grp + 8][..], a2 = A[grp][2 tig + 8, +1],
 *                a3 = A[grp + 8][2 tig + 8, +1]
 *   B (16 x 8):  b0 = B[2 tig, +1][grp], b1 = B[2 tig + 8, +1][grp]
 *   C (16 x 8):  c0, c1 = C[grp][2 tig, +1], c2, c3 = C[grp + 8][2 tig, +1]
 * so a lane holds query head grp's scores for tokens 2 tig, +1 (c0, c1 of
 * n-tile 0) and 8 + 2 tig, +1 (n-tile 1), which are exactly a0 and a2 of P. */

__device__ __forceinline__ void mma16816(float c[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                         uint32_t b1)
{
    /* a1 = a3 = 0: rows 8..15 of A (query heads past the group) are zero */
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma16816_full(float c[4], const uint32_t a[4], uint32_t b0,
                                              uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *p)
{
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *(uint32_t *)&h; }

/* x as hi + lo fp16 pairs (x0 in the low half, as mma expects). */
__device__ __forceinline__ void split_h2(float x0, float x1, uint32_t *hi, uint32_t *lo)
{
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 hf = __half22float2(h);
    *hi = h2_bits(h);
    *lo = h2_bits(__floats2half2_rn(x0 - hf.x, x1 - hf.y));
}

/* Where 16-byte chunk w of a pool block goes in shared memory. */
template <int D>
__device__ __forceinline__ int swizzled_chunk(int w)
{
    if (w < 2 * D) { /* K: dim w / 2, tokens 8 * (w % 2) .. +7 */
        const int dim = w >> 1;
        return 2 * dim + ((w & 1) ^ ((dim >> 2) & 1));
    }
    if (w < 4 * D) { /* V: token v / (D / 8), dims 8 * (v % (D / 8)) .. +7 */
        const int v = w - 2 * D, r = v / (D / 8), c = v % (D / 8);
        return 2 * D + r * (D / 8) + (c ^ (r & 7));
    }
    return w; /* positions */
}

/* A lane's share of a block copy: chunks lane, lane + 32, ...; their
 * swizzled places are the same for every block, so they are worked out
 * once (swizzle_plan) and the copy is one cp.async per chunk. */
template <int D>
struct copy_plan {
    static constexpr int WORDS = (64 * D + 64) / 16;
    static constexpr int N = (WORDS + 31) / 32;
    uint32_t dst[N]; /* byte offsets in the stage */
};

template <int D>
__device__ __forceinline__ void swizzle_plan(copy_plan<D> *p, int lane)
{
#pragma unroll
    for (int i = 0; i < copy_plan<D>::N; i++) {
        const int w = lane + 32 * i;
        p->dst[i] = w < copy_plan<D>::WORDS ? 16u * (uint32_t)swizzled_chunk<D>(w) : 0u;
    }
}

template <int D>
__device__ __forceinline__ void issue_block_swizzled(const uint8_t *base, size_t bb, int32_t id,
                                                     uint8_t *dst, int lane,
                                                     const copy_plan<D> &p)
{
    const uint8_t *src = base + (size_t)id * bb + 16 * lane;
#pragma unroll
    for (int i = 0; i < copy_plan<D>::N; i++)
        if (i < copy_plan<D>::N - 1 || lane + 32 * i < copy_plan<D>::WORDS)
            __pipeline_memcpy_async(dst + p.dst[i], src + 512 * i, 16);
}

template <int D, int S>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    decode_mma_kernel(const uint8_t *base, size_t bb, const int32_t *table,
                      const int32_t *table_off, const int32_t *n_tokens, int n_kv, int n_qh,
                      const float *Q, const int32_t *q_pos, float scale, int split_tokens,
                      int n_splits, float *part_m, float *part_l, float *part_o)
{
    constexpr int KS = D / 16;         /* k-steps of S = Q K^T */
    constexpr int MT = D / 16;         /* m-tiles of O^T = V^T P^T */
    constexpr int BLOCK = 64 * D + 64; /* K, V, positions of one pool block */
    extern __shared__ __align__(16) uint8_t smem[];
    split_at at;
    if (!split_open(&at, n_tokens, n_kv, n_qh, split_tokens, n_splits, part_m))
        return;
    const int split = at.split, g = at.g, h = at.h;
    const int32_t n = at.n, t0 = at.t0;
    const size_t prow = at.prow; /* first query row of the group */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int grp = lane >> 2, tig = lane & 3;
    uint8_t *wb = smem + (size_t)warp * S * BLOCK;
    const int32_t qpos = q_pos[blockIdx.z], t1 = min(n, t0 + split_tokens);
    const int b_end = (t1 + DEC_BT - 1) / DEC_BT;
    const int32_t *tab = table + table_off[h];
    int b = t0 / DEC_BT + warp;
    copy_plan<D> plan;
    swizzle_plan<D>(&plan, lane);
    /* this warp's blocks are b, b + DEC_WARPS, ...; the i-th goes to stage i % S */
#pragma unroll
    for (int i = 0; i < S - 1; i++) {
        if (b + i * DEC_WARPS < b_end)
            issue_block_swizzled<D>(base, bb, tab[b + i * DEC_WARPS], wb + i * BLOCK, lane, plan);
        __pipeline_commit();
    }

    /* this lane's part of A = scale * Q: row grp, columns 2 tig, +1 and +8 */
    uint32_t qa_hi[KS][2], qa_lo[KS][2];
    {
        const float *q = Q + (prow + grp) * D;
        const bool row = grp < g;
#pragma unroll
        for (int ks = 0; ks < KS; ks++)
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                const int c = 16 * ks + 8 * hf + 2 * tig;
                const float x0 = row ? q[c] * scale : 0.0f, x1 = row ? q[c + 1] * scale : 0.0f;
                split_h2(x0, x1, &qa_hi[ks][hf], &qa_lo[ks][hf]);
            }
    }
    /* O^T: acc[mt] holds dims 16 mt + grp (0, 1) and + 8 (2, 3) of query
     * heads 2 tig (0, 2) and 2 tig + 1 (1, 3) */
    float acc[MT][4];
#pragma unroll
    for (int t = 0; t < MT; t++)
        acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    float m = -INFINITY, l = 0.0f; /* query head grp's running max and sum */

    /* ldmatrix row addresses (byte offsets in a block), fixed per lane */
    const int kdim = (lane & 7) + ((lane >> 3) & 1) * 8, ktc = lane >> 4;
    const int vtok = (lane & 7) + (lane >> 4) * 8, vc = (lane >> 3) & 1;

    /* the id of the block S - 1 ahead is read one iteration before its copy
     * is issued, so the table's latency hides behind a block's work */
    int32_t id_ahead = b + (S - 1) * DEC_WARPS < b_end ? tab[b + (S - 1) * DEC_WARPS] : 0;
    for (int it = 0; b < b_end; b += DEC_WARPS, it++) {
        /* the stage scored last iteration takes the block S - 1 ahead */
        const int ahead = b + (S - 1) * DEC_WARPS;
        if (ahead < b_end)
            issue_block_swizzled<D>(base, bb, id_ahead, wb + ((it + S - 1) % S) * BLOCK, lane,
                                    plan);
        if (ahead + DEC_WARPS < b_end)
            id_ahead = tab[ahead + DEC_WARPS];
        __pipeline_commit();
        __pipeline_wait_prior(S - 1);
        __syncwarp();
        const uint8_t *cur = wb + (it % S) * BLOCK;
        const int32_t *P = (const int32_t *)(cur + 64 * D);

        /* S = Q K^T: two n-tiles of 8 tokens */
        float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int ks = 0; ks < KS; ks++) {
            const int dim = 16 * ks + kdim;
            uint32_t kb[4]; /* b0, b1 of tokens 0-7, then of tokens 8-15 */
            ldmatrix_x4_trans(kb, cur + 16 * (2 * dim + (ktc ^ ((dim >> 2) & 1))));
            mma16816(sc[0], qa_hi[ks][0], qa_hi[ks][1], kb[0], kb[1]);
            mma16816(sc[0], qa_lo[ks][0], qa_lo[ks][1], kb[0], kb[1]);
            mma16816(sc[1], qa_hi[ks][0], qa_hi[ks][1], kb[2], kb[3]);
            mma16816(sc[1], qa_lo[ks][0], qa_lo[ks][1], kb[2], kb[3]);
        }
        /* online softmax of row grp over its 16 scores (4 per lane, 4 lanes) */
        float s[4], mt = -INFINITY;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = 8 * (e >> 1) + 2 * tig + (e & 1); /* token in the block */
            const bool valid = b * DEC_BT + r < t1 && P[r] <= qpos;
            s[e] = valid ? sc[e >> 1][e & 1] : -INFINITY;
            mt = fmaxf(mt, s[e]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 2));
        const float mn = fmaxf(m, mt);
        const float corr = mn == -INFINITY ? 1.0f : expf(m - mn);
        float p[4], ps = 0.0f;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            p[e] = s[e] == -INFINITY ? 0.0f : expf(s[e] - mn);
            ps += p[e];
        }
        ps += __shfl_xor_sync(0xffffffffu, ps, 1);
        ps += __shfl_xor_sync(0xffffffffu, ps, 2);
        l = l * corr + ps;
        m = mn;
        /* P^T as the B operand: b0 = tokens 2 tig, +1 and b1 = 8 + 2 tig, +1 of
         * query head grp, which is what this lane holds */
        uint32_t pb_hi[2], pb_lo[2];
        split_h2(p[0], p[1], &pb_hi[0], &pb_lo[0]);
        split_h2(p[2], p[3], &pb_hi[1], &pb_lo[1]);
        /* the rescale of the heads this lane accumulates (2 tig, 2 tig + 1) */
        const float corr0 = __shfl_sync(0xffffffffu, corr, 8 * tig);
        const float corr1 = __shfl_sync(0xffffffffu, corr, 8 * tig + 4);

        /* O^T = O^T * corr + V^T P^T, m-tiles of 16 dims */
#pragma unroll
        for (int t = 0; t < MT; t++) {
            const int c = 2 * t + vc;
            uint32_t va[4]; /* V^T rows 16 t .. +15 (dims), columns the 16 tokens */
            ldmatrix_x4_trans(va, cur + 32 * D + 16 * (vtok * (D / 8) + (c ^ (vtok & 7))));
            acc[t][0] *= corr0;
            acc[t][1] *= corr1;
            acc[t][2] *= corr0;
            acc[t][3] *= corr1;
            mma16816_full(acc[t], va, pb_hi[0], pb_hi[1]);
            mma16816_full(acc[t], va, pb_lo[0], pb_lo[1]);
        }
        __syncwarp();
    }
    __pipeline_wait_prior(0);
    __syncthreads(); /* the buffers become the merge area */
    float *st_m = (float *)smem;
    float *st_l = st_m + DEC_WARPS * DEC_G_MAX;
    float *st_o = st_l + DEC_WARPS * DEC_G_MAX;
    if (grp < g && tig == 0) {
        st_m[warp * DEC_G_MAX + grp] = m;
        st_l[warp * DEC_G_MAX + grp] = l;
    }
#pragma unroll
    for (int t = 0; t < MT; t++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int head = 2 * tig + (e & 1), dim = 16 * t + grp + 8 * (e >> 1);
            if (head < g)
                st_o[((size_t)warp * DEC_G_MAX + head) * D + dim] = acc[t][e];
        }
    merge_warps<D, DEC_WARPS, DEC_G_MAX>(st_m, st_l, st_o, g, prow, split, n_splits, part_m,
                                           part_l, part_o);
}

#define RED_THREADS 128

/* v reduced over the thread block (RED_THREADS threads) with op, then
 * given to every thread; red holds RED_THREADS / 32 floats. */
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float *red)
{
    v = MAX ? warp_max(v) : warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads(); /* red may still be read from a previous reduction */
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    v = red[0];
    for (int w = 1; w < RED_THREADS / 32; w++)
        v = MAX ? fmaxf(v, red[w]) : v + red[w];
    return v;
}

/* One thread block per (sequence, query head): the splits' partials merged
 * into the output row. The splits' weights exp(m_s - M) are computed once
 * (in shared memory), then each thread sums its dimensions over the splits
 * with independent loads in flight. */
__global__ void __launch_bounds__(RED_THREADS)
    decode_reduce_kernel(const int32_t *n_tokens, int n_kv, int n_qh, int d, int split_tokens,
                         int n_splits, const float *part_m, const float *part_l,
                         const float *part_o, float *out)
{
    extern __shared__ float wsplit[]; /* n_splits weights, then the reduction scratch */
    float *red = wsplit + n_splits;
    const int row = blockIdx.x, seq = row / n_qh, qh = row % n_qh;
    const int32_t n = n_tokens[seq * n_kv + qh / (n_qh / n_kv)];
    const int ns = min(n_splits, (n + split_tokens - 1) / split_tokens);
    const float *pm = part_m + (size_t)row * n_splits, *pl = part_l + (size_t)row * n_splits;
    float M = -INFINITY;
    for (int s = threadIdx.x; s < ns; s += RED_THREADS)
        M = fmaxf(M, pm[s]);
    M = block_reduce<true>(M, red);
    float L = 0.0f;
    for (int s = threadIdx.x; s < ns; s += RED_THREADS) {
        const float f = pm[s] == -INFINITY ? 0.0f : expf(pm[s] - M);
        wsplit[s] = f;
        L += pl[s] * f;
    }
    L = block_reduce<false>(L, red); /* its barriers also publish wsplit */
    const float *po = part_o + (size_t)row * n_splits * d;
    for (int j = threadIdx.x; j < d; j += RED_THREADS) {
        float O = 0.0f;
#pragma unroll 8
        for (int s = 0; s < ns; s++)
            O += po[(size_t)s * d + j] * wsplit[s];
        out[(size_t)row * d + j] = L > 0.0f ? O / L : 0.0f;
    }
}

/* Picks the kernel, the split (choose_split) and launches the split pass;
 * *st and *ns say what the reduce pass merges. */
template <int D>
static ekv_status launch_split(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                               const ekv_cuda_kv_heads *heads, int n_seq, int n_kv, int n_qh,
                               const float *Q, const int32_t *q_pos, int32_t max_tokens,
                               float scale, void *workspace, int32_t *st, int32_t *ns,
                               ekv_error *err)
{
    /* the tensor-core kernel keeps Q in registers; the other stages it */
    const bool mma = D <= 128 && !force_simt;
    const int mma_stages = stages_override ? stages_override : max_tokens >= DEC_LONG ? 4 : 2;
    const size_t q_bytes = mma ? 0 : (size_t)DEC_G_MAX * D * 4;
    const size_t buf_bytes = (size_t)DEC_WARPS * (mma ? mma_stages : 2) * (64 * D + 64);
    const size_t merge_bytes = (size_t)DEC_WARPS * DEC_G_MAX * (D + 2) * 4;
    const size_t smem = q_bytes + (buf_bytes > merge_bytes ? buf_bytes : merge_bytes);
    auto kernel = decode_split_kernel<D>;
    if constexpr (D <= 128)
        if (mma)
            kernel = mma_stages == 2   ? decode_mma_kernel<D, 2>
                     : mma_stages == 3 ? decode_mma_kernel<D, 3>
                                       : decode_mma_kernel<D, 4>;
    /* once per context and kernel: its attributes, then how many of its
     * thread blocks an SM holds (a decode step calls this once per layer) */
    int *cached = &ctx->decode_per_sm[D == 64 ? 0 : D == 128 ? 1 : 2][mma ? mma_stages : 0];
    int per_sm = __atomic_load_n(cached, __ATOMIC_RELAXED);
    if (per_sm == 0) {
        EKV_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)smem),
                     "decode: shared memory attribute");
        /* all of L1 as shared memory: thread blocks per SM are bounded by it */
        EKV_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared),
                     "decode: shared memory carveout");
        EKV_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel,
                                                                   DEC_WARPS * 32, smem),
                     "decode: occupancy");
        if (per_sm <= 0)
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "cuda decode: the kernel fits no SM (%zu bytes of shared memory)",
                                 smem);
        __atomic_store_n(cached, per_sm, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&last_blocks_per_sm, per_sm, __ATOMIC_RELAXED);
    choose_split(n_seq * n_kv, max_tokens, per_sm * ctx->sm_count, st, ns);
    const size_t rows = (size_t)n_seq * n_qh * *ns;
    float *pm = (float *)workspace, *pl = pm + rows, *po = pl + rows;
    dim3 grid((unsigned)*ns, (unsigned)n_kv, (unsigned)n_seq);
    kernel<<<grid, DEC_WARPS * 32, smem, ctx->stream>>>(
        pool->mem, pool->block_bytes, heads->table, heads->table_off, heads->n_tokens, n_kv, n_qh,
        Q, q_pos, scale, *st, *ns, pm, pl, po);
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
    int32_t st = 0, ns = 0;
    ekv_status rc;
    switch (d) {
    case 64: rc = launch_split<64>(ctx, pool, heads, n_seq, n_kv_heads, n_q_heads, Q, q_pos, max_tokens, scale, workspace, &st, &ns, err); break;
    case 128: rc = launch_split<128>(ctx, pool, heads, n_seq, n_kv_heads, n_q_heads, Q, q_pos, max_tokens, scale, workspace, &st, &ns, err); break;
    default: rc = launch_split<256>(ctx, pool, heads, n_seq, n_kv_heads, n_q_heads, Q, q_pos, max_tokens, scale, workspace, &st, &ns, err); break;
    }
    if (rc != EKV_OK)
        return rc;
    return ekv_decode_reduce(ctx, heads->n_tokens, n_seq, n_kv_heads, n_q_heads, d, st, ns,
                             workspace, out, err);
}

int32_t ekv_decode_max_splits(int heads, int32_t max_tokens)
{
    return max_splits(heads > 0 ? heads : 1, max_tokens);
}

ekv_status ekv_decode_reduce(ekv_cuda *ctx, const int32_t *n_tokens, int n_seq, int n_kv, int n_qh,
                             int d, int32_t split_tokens, int32_t n_splits, const void *workspace,
                             float *out, ekv_error *err)
{
    const size_t red_smem = ((size_t)n_splits + RED_THREADS / 32) * sizeof(float);
    if (red_smem > 48 * 1024)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "cuda decode: %d splits is too many", n_splits);
    const size_t rows = (size_t)n_seq * n_qh * n_splits;
    const float *pm = (const float *)workspace, *pl = pm + rows, *po = pl + rows;
    decode_reduce_kernel<<<n_seq * n_qh, RED_THREADS, red_smem, ctx->stream>>>(
        n_tokens, n_kv, n_qh, d, split_tokens, n_splits, pm, pl, po, out);
    return ekv_cuda_launched("decode reduce", err);
}
