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
    float acc[16];
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
    float best = -INFINITY;
    for (int j = 0; j < 16; j++)
        if (pos[j] != INT32_MAX && acc[j] > best)
            best = acc[j];
    return best;
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

float kvrb_bound(const kv_recall *rc, const rc_head *h, int32_t b, const kvrb_query *qq)
{
    const int32_t d = rc->d;
    const float *mn = h->kmin + (size_t)b * d, *mx = h->kmax + (size_t)b * d;
    uint8_t *p = h->blk[b];
    if (!p || rc->bt != 16 || qq->n_sel == 0) /* K not here, or another block shape */
        return kv_digest_bound(mn, mx, qq->q, d);
    const float part = partial16(blk_k(p), blk_pos(rc, p), qq->q, qq->sel, qq->n_sel);
    return qq->n_sel == d ? part : part + kv_digest_bound(mn, mx, qq->qm, d);
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
