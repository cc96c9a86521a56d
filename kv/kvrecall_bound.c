/*
 * kvrecall_bound.c - the score recall ranks evicted blocks by (kvrecall.h):
 * an upper bound of a query's maximum q . k over a block's keys that is
 * exact on the channels where the query is largest and the digest's box
 * (Quest's per-channel min/max) on the rest.
 *
 * Why: the box bound alone sums max(q_c min_c, q_c max_c) over all
 * channels, each at its own worst token, so with 16 keys of 64 channels it
 * sits far above any key's real score and ranks blocks poorly. Measured on
 * SmolLM2 (docs/COMPRESSION.md, issue 20): ranking by the exact maximum
 * instead cut the KL to full KV at 10% total KV from 0.089 to 0.025 on
 * vim's usr_41.txt. Most of q . k comes from a few channels (a query's
 * mass is concentrated, RoPE's low-frequency pairs above all), so scoring
 * those KV_RECALL_EXACT_CHANNELS channels per key exactly and bounding only
 * the rest gets most of that gain at a fraction of an exact score's cost:
 *   q . k_s = sum_{c in S} q_c k_cs + sum_{c not in S} q_c k_cs
 *          <= max_s sum_{c in S} q_c k_cs + sum_{c not in S} max(q_c min_c, q_c max_c)
 * for every key s of the block, so it stays an upper bound, and it is
 * never above the box bound. It reads the block's K for the S channels
 * (S x 16 halves), so a block spilled to the tier (K not in host memory)
 * falls back to the box alone. kv_recall_set_channels picks S's size: 0 is
 * the box alone (Quest), head_dim or more the exact maximum.
 */
#include "entrokv/kvrecall.h"

#include "kvrecall_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

void kvrb_split(const float *q, int32_t d, int32_t m, float *qm, int32_t *sel, kvrb_query *out)
{
    out->q = q;
    out->qm = qm;
    out->sel = sel;
    out->n_sel = 0;
    if (m >= d) { /* every channel: the exact maximum, no box */
        for (int32_t c = 0; c < d; c++) {
            sel[c] = c;
            qm[c] = 0.0f;
        }
        out->n_sel = d;
        return;
    }
    memcpy(qm, q, (size_t)d * sizeof *qm);
    /* the m largest |q_c| (ties to the lower channel), zeroed in qm so the
     * box part skips them: a zero q_c adds 0 */
    while (out->n_sel < m) {
        int32_t arg = -1;
        for (int32_t c = 0; c < d; c++)
            if (qm[c] != 0.0f && (arg < 0 || fabsf(qm[c]) > fabsf(qm[arg])))
                arg = c;
        if (arg < 0)
            break; /* the rest of q is zero */
        sel[out->n_sel++] = arg;
        qm[arg] = 0.0f;
    }
}

/* The best over a 16-token block's filled slots of sum over the n_sel
 * channels sel of q_c k[c][s] (K transposed: channel c's 16 keys are
 * contiguous). */
static float partial16_generic(const ekv_f16 *k, const int32_t *pos, const float *q,
                               const int32_t *sel, int n_sel)
{
    float acc[16] = {0};
    for (int i = 0; i < n_sel; i++) {
        const int32_t c = sel[i];
        for (int j = 0; j < 16; j++)
            acc[j] += q[c] * ekv_f16_to_f32(k[(size_t)c * 16 + j]);
    }
    float best = -INFINITY;
    for (int j = 0; j < 16; j++)
        if (pos[j] != INT32_MAX && acc[j] > best)
            best = acc[j];
    return best;
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) static float partial16_avx512(const ekv_f16 *k,
                                                                 const int32_t *pos,
                                                                 const float *q,
                                                                 const int32_t *sel, int n_sel)
{
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n_sel; i++) {
        const int32_t c = sel[i];
        const __m512 kc =
            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(k + (size_t)c * 16)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(q[c]), kc, acc);
    }
    const __mmask16 filled =
        _mm512_cmpneq_epi32_mask(_mm512_loadu_si512(pos), _mm512_set1_epi32(INT32_MAX));
    return filled ? _mm512_mask_reduce_max_ps(filled, acc) : -INFINITY;
}

__attribute__((target("avx2,fma,f16c"))) static float partial16_avx2(const ekv_f16 *k,
                                                                    const int32_t *pos,
                                                                    const float *q,
                                                                    const int32_t *sel, int n_sel)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int i = 0; i < n_sel; i++) {
        const int32_t c = sel[i];
        const __m128i *kc = (const __m128i *)(k + (size_t)c * 16);
        const __m256 qc = _mm256_set1_ps(q[c]);
        a0 = _mm256_fmadd_ps(qc, _mm256_cvtph_ps(_mm_loadu_si128(kc)), a0);
        a1 = _mm256_fmadd_ps(qc, _mm256_cvtph_ps(_mm_loadu_si128(kc + 1)), a1);
    }
    /* the filled slots' largest: empty slots and NaN sums as -inf (the
     * generic loop skips both), then a max tree (any order: the same
     * largest float, up to the sign of a zero, which ranks alike) */
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const __m256i empty = _mm256_set1_epi32(INT32_MAX);
    const __m256 e0 = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)pos), empty));
    const __m256 e1 = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)(pos + 8)), empty));
    a0 = _mm256_blendv_ps(a0, ninf, _mm256_or_ps(e0, _mm256_cmp_ps(a0, a0, _CMP_UNORD_Q)));
    a1 = _mm256_blendv_ps(a1, ninf, _mm256_or_ps(e1, _mm256_cmp_ps(a1, a1, _CMP_UNORD_Q)));
    __m256 m = _mm256_max_ps(a0, a1);
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

static float partial16(const ekv_f16 *k, const int32_t *pos, const float *q, const int32_t *sel,
                       int n_sel)
{
#if defined(__x86_64__)
    const kern_isa isa = kern_active_isa();
    if (isa >= KERN_ISA_AVX512)
        return partial16_avx512(k, pos, q, sel, n_sel);
    if (isa >= KERN_ISA_AVX2)
        return partial16_avx2(k, pos, q, sel, n_sel);
#endif
    return partial16_generic(k, pos, q, sel, n_sel);
}

/* kvrb_bound with the box over the rest given (boxm: kv_digest_bound of
 * qq->qm over block b's digest; a NaN: computed here). */
static float bound_with(const kv_recall *rc, const rc_head *h, int32_t b, const kvrb_query *qq,
                        float boxm)
{
    const int32_t d = rc->d;
    const float *mn = h->kmin + (size_t)b * d, *mx = h->kmax + (size_t)b * d;
    uint8_t *p = h->blk[b];
    if (!p || rc->bt != 16 || qq->n_sel == 0) /* K not here, or another block shape */
        return kv_digest_bound(mn, mx, qq->q, d);
    const float part = partial16(blk_k(p), blk_pos(rc, p), qq->q, qq->sel, qq->n_sel);
    if (qq->n_sel == d)
        return part;
    return part + (isnan(boxm) ? kv_digest_bound(mn, mx, qq->qm, d) : boxm);
}

float kvrb_bound(const kv_recall *rc, const rc_head *h, int32_t b, const kvrb_query *qq)
{
    return bound_with(rc, h, b, qq, NAN);
}

/* Starts loading block b's K (every row: the group's queries read
 * different channels, and whole 2 KB blocks stream better than scattered
 * rows). The scores wait on these loads more than on arithmetic: at 8k a
 * head's K rows do not stay in cache from one step to the next. */
static inline void prefetch_k(const kv_recall *rc, const rc_head *h, int32_t b)
{
#if defined(__x86_64__)
    const char *p = (const char *)h->blk[b];
    if (!p)
        return;
    const size_t bytes = (size_t)rc->d * rc->bt * sizeof(ekv_f16);
    for (size_t o = 0; o < bytes; o += 64)
        _mm_prefetch(p + o, _MM_HINT_T0);
#else
    (void)rc, (void)h, (void)b;
#endif
}

/* How many blocks ahead of the one scored the prefetch runs. */
#define KVRB_PREFETCH_AHEAD 4

/*
 * Bound and prune (kvrb_scores). A block's box bound over all channels is
 * never below its score (the exact part on S is at most the box's on S),
 * so once r blocks' scores are known, a block whose box is under the
 * smallest of them cannot be among the r best and its K need not be read.
 * The r blocks scored first are those with the largest box, whose scores
 * are usually high. In floats the two sums round differently, so the
 * comparison adds what they can be apart by: each is a sum of at most
 * d + 17 rounded terms (the products, d / 16 adds per lane, sixteen lane
 * adds; d for the exact part's FMA chain, one for part + box), whose
 * rounding is at most (d + 17) u times sum_c |q_c| max(|min_c|, |max_c|)
 * (u = 2^-24), so at most (3d + 36) u times ||q||_1 times the digest's
 * largest |min| or |max|; the margin takes (4d + 64) u. A pruned block
 * therefore scores strictly below the r-th best and the top r are the same
 * blocks, in the same order, as scoring every block (unit.test_kvrecall
 * checks the views bit for bit). Non-finite queries or digests turn the
 * margin infinite: nothing is pruned. How much it prunes depends on how
 * loose the box is: on SmolLM2's real keys at 8k it still scored 90% of
 * the blocks (docs/COMPRESSION.md, "The ranking's speed on AVX2").
 */
/* Block b's score: the largest over the group's queries, in query order
 * (as the reference's running max); boxm: each query's box over its other
 * channels, n_blocks apart. */
static float group_score(const kv_recall *rc, const rc_head *h, int32_t b, const kvrb_query *qq,
                         int n_q, const float *boxm)
{
    float best = -INFINITY;
    for (int g = 0; g < n_q; g++) {
        const float bm = qq[g].n_sel < rc->d ? boxm[(size_t)g * h->n_blocks + b] : NAN;
        const float s = bound_with(rc, h, b, &qq[g], bm);
        best = s > best ? s : best;
    }
    return best;
}

int32_t kvrb_scores_scalar(const kv_recall *rc, const rc_head *h, const float *Q, int n_q,
                           int q_stride, int32_t m, float *bound, float *qm, int32_t *sel)
{
    const int32_t d = rc->d;
    for (int32_t b = 0; b < h->n_blocks; b++)
        bound[b] = -INFINITY;
    for (int g = 0; g < n_q; g++) {
        kvrb_query qq;
        if (m == 0)
            qq = (kvrb_query){.q = Q + (size_t)g * q_stride};
        else
            kvrb_split(Q + (size_t)g * q_stride, d, m, qm, sel, &qq);
        for (int32_t b = 0; b < h->n_blocks; b++) {
            const float s = m == 0 ? kv_digest_bound(h->kmin + (size_t)b * d,
                                                     h->kmax + (size_t)b * d, qq.q, d)
                                   : kvrb_bound(rc, h, b, &qq);
            bound[b] = s > bound[b] ? s : bound[b];
        }
    }
    return m == 0 ? 0 : h->n_blocks;
}

int32_t kvrb_scores(const kv_recall *rc, const rc_head *h, const float *Q, int n_q, int q_stride,
                    int32_t q_pos, int32_t m, int32_t r, float *bound, float *ub, int32_t *cand)
{
    const int32_t n = h->n_blocks, d = rc->d;
    if (n_q > KVRB_GROUP_MAX)
        return -1;
    /* per query: its split (qm, sel) and the box over its other channels
     * for every block (boxm, n each: the batched kernel, bit for bit
     * kv_digest_bound's) */
    float *qm = malloc((size_t)n_q * ((size_t)2 * d + n) * sizeof *qm + (size_t)n * sizeof(int32_t));
    if (!qm)
        return -1;
    int32_t *sel = (int32_t *)(qm + (size_t)n_q * d);
    float *boxm = qm + (size_t)n_q * 2 * d;
    int32_t *survivors = (int32_t *)(boxm + (size_t)n_q * n); /* the blocks past the prune */
    kvrb_query qq[KVRB_GROUP_MAX];
    for (int g = 0; g < n_q; g++) {
        kvrb_split(Q + (size_t)g * q_stride, d, m, qm + (size_t)g * d, sel + (size_t)g * d,
                   &qq[g]);
        if (qq[g].n_sel < d)
            kv_digest_bounds(h->kmin, h->kmax, n, qq[g].qm, 1, d, d, boxm + (size_t)g * n);
    }
    kvds_bounds(h->kmin, h->kmax, n, Q, n_q, q_stride, d, bound, ub); /* box; magnitude */
    float qn = 0.0f;
    for (int g = 0; g < n_q; g++) {
        const float *q = Q + (size_t)g * q_stride;
        float s = 0.0f;
        for (int32_t c = 0; c < d; c++)
            s += fabsf(q[c]);
        qn = s > qn ? s : qn;
    }
    const float k = qn * (float)(4 * d + 64) * 0x1p-24f;
    /* ub[b]: never below block b's score (-INFINITY: not eligible); cand:
     * the r eligible blocks with the largest, by insertion */
    int32_t nc = 0;
    for (int32_t b = 0; b < n; b++) {
        if (h->minpos[b] > q_pos) {
            ub[b] = -INFINITY;
            continue;
        }
        float u = bound[b] + k * ub[b];
        if (!(u > -INFINITY)) /* NaN, or an infinite digest: never pruned */
            u = INFINITY;
        ub[b] = u;
        int32_t i = nc < r ? nc : r;
        if (i == r && !(u > ub[cand[r - 1]]))
            continue;
        while (i > 0 && u > ub[cand[i - 1]]) {
            if (i < r)
                cand[i] = cand[i - 1];
            i--;
        }
        cand[i] = b;
        if (nc < r)
            nc++;
    }
    for (int32_t b = 0; b < n; b++)
        bound[b] = -INFINITY;
    /* block by block, every query of the group while its K is in cache */
    for (int32_t i = 0; i < nc && i < KVRB_PREFETCH_AHEAD; i++)
        prefetch_k(rc, h, cand[i]);
    for (int32_t i = 0; i < nc; i++) {
        if (i + KVRB_PREFETCH_AHEAD < nc)
            prefetch_k(rc, h, cand[i + KVRB_PREFETCH_AHEAD]);
        bound[cand[i]] = group_score(rc, h, cand[i], qq, n_q, boxm);
    }
    /* the threshold: the smallest of r eligible blocks' scores (none with
     * fewer: every eligible block is scored) */
    float t = nc == r ? INFINITY : -INFINITY;
    for (int32_t i = 0; i < nc && nc == r; i++)
        t = bound[cand[i]] < t ? bound[cand[i]] : t;
    if (isnan(t))
        t = -INFINITY;
    for (int32_t i = 0; i < nc; i++)
        ub[cand[i]] = -INFINITY; /* scored */
    int32_t more = 0;
    for (int32_t b = 0; b < n; b++)
        if (ub[b] > -INFINITY && !(ub[b] < t))
            survivors[more++] = b;
    for (int32_t i = 0; i < more && i < KVRB_PREFETCH_AHEAD; i++)
        prefetch_k(rc, h, survivors[i]);
    for (int32_t i = 0; i < more; i++) {
        if (i + KVRB_PREFETCH_AHEAD < more)
            prefetch_k(rc, h, survivors[i + KVRB_PREFETCH_AHEAD]);
        bound[survivors[i]] = group_score(rc, h, survivors[i], qq, n_q, boxm);
    }
    free(qm);
    return nc + more;
}

float kv_recall_block_bound(const kv_recall *rc, int32_t layer, int32_t head, int32_t b,
                            const float *q)
{
    const rc_head *h = head_of(rc, layer, head);
    if (b < 0 || b >= h->n_blocks)
        return -INFINITY;
    float *qm = malloc((size_t)rc->d * (sizeof *qm + sizeof(int32_t)));
    if (!qm) /* the box alone: still a bound */
        return kv_digest_bound(h->kmin + (size_t)b * rc->d, h->kmax + (size_t)b * rc->d, q,
                               rc->d);
    kvrb_query qq;
    kvrb_split(q, rc->d, rc->exact_channels, qm, (int32_t *)(qm + rc->d), &qq);
    const float s = kvrb_bound(rc, h, b, &qq);
    free(qm);
    return s;
}
