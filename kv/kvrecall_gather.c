/*
 * kvrecall_gather.c - recall at token granularity (kv_recall_set_gather,
 * kvrecall.h): the ranking's best `gather` x R blocks are candidates, each
 * of their tokens is scored exactly (the maximum over the GQA group's
 * queries of q . k) and the R x block_tokens best tokens are copied into
 * R buffer blocks that join attention in place of whole recall blocks.
 *
 * Why: a recalled 16-token block brings its neighbours along, so most of
 * the buffer holds tokens that did not win. Measured with EKV_RECALL_DIAG
 * (kvrecall_diag.c) on SmolLM2 at 10% total KV, prose (TPJ13.pod), mean
 * over layers: 14.5% of the attention mass fell on evicted tokens the
 * ranked R blocks missed, 11.9% with the oracle's best R blocks, 11.0%
 * with the best 16R tokens of the ranking's 2R best blocks, 7.5% with the
 * best 16R evicted tokens overall. The buffer holds the same tokens' worth
 * of memory either way (R blocks per head).
 */
#include "kvrecall_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* A buffer block's bytes in the scratch, rounded to 64 so that every
 * block's K starts cache-line aligned as the pool's do. */
static size_t gather_blk_stride(const kv_recall *rc) { return (blk_bytes(rc) + 63) & ~(size_t)63; }

typedef struct {
    float score;
    int32_t t;
} tok_score;

/* Higher score first, ties to the earlier token (candidate order is block
 * order, so the choice is deterministic). */
static int cmp_tok(const void *a, const void *b)
{
    const tok_score *x = a, *y = b;
    if (x->score != y->score)
        return x->score < y->score ? 1 : -1;
    return (x->t > y->t) - (x->t < y->t);
}

size_t kvrg_scratch_bytes(const kv_recall *rc)
{
    if (!rc->gather)
        return 0;
    const size_t n_tok = (size_t)rc->gather * rc->r * rc->bt;
    return 64 + (size_t)rc->r * gather_blk_stride(rc) +
           n_tok * (sizeof(float) + sizeof(int32_t) + sizeof(tok_score)) +
           (size_t)rc->d * rc->bt * sizeof(float) + (size_t)rc->bt * sizeof(float);
}

/* sc[s] = max over the n_q queries of q . k_s for the block's bt keys (K
 * transposed: channel c's bt keys contiguous); kf (d x bt) and acc (bt)
 * are scratch. */
static void block_scores_generic(const ekv_f16 *k, int32_t d, int32_t bt, const float *Q, int n_q,
                                 int q_stride, float *kf, float *acc, float *sc)
{
    for (size_t x = 0; x < (size_t)d * bt; x++)
        kf[x] = ekv_f16_to_f32(k[x]);
    for (int32_t s = 0; s < bt; s++)
        sc[s] = -INFINITY;
    for (int g = 0; g < n_q; g++) {
        const float *q = Q + (size_t)g * q_stride;
        for (int32_t s = 0; s < bt; s++)
            acc[s] = 0.0f;
        for (int32_t c = 0; c < d; c++)
            for (int32_t s = 0; s < bt; s++)
                acc[s] += q[c] * kf[(size_t)c * bt + s];
        for (int32_t s = 0; s < bt; s++)
            sc[s] = acc[s] > sc[s] ? acc[s] : sc[s];
    }
}

#if defined(__x86_64__)
/* The same for 16-token blocks and up to 8 queries: each channel's 16 keys
 * converted once (F16C) and multiplied into every query's two 8-lane sums. */
__attribute__((target("avx2,fma,f16c"))) static void
block_scores16_avx2(const ekv_f16 *k, int32_t d, const float *Q, int n_q, int q_stride, float *sc)
{
    __m256 lo[8], hi[8];
    for (int g = 0; g < 8; g++)
        lo[g] = hi[g] = _mm256_setzero_ps();
    for (int32_t c = 0; c < d; c++) {
        const __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + (size_t)c * 16)));
        const __m256 k1 =
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + (size_t)c * 16 + 8)));
        for (int g = 0; g < n_q; g++) {
            const __m256 qc = _mm256_set1_ps(Q[(size_t)g * q_stride + c]);
            lo[g] = _mm256_fmadd_ps(qc, k0, lo[g]);
            hi[g] = _mm256_fmadd_ps(qc, k1, hi[g]);
        }
    }
    __m256 m0 = lo[0], m1 = hi[0];
    for (int g = 1; g < n_q; g++) {
        m0 = _mm256_max_ps(m0, lo[g]);
        m1 = _mm256_max_ps(m1, hi[g]);
    }
    _mm256_storeu_ps(sc, m0);
    _mm256_storeu_ps(sc + 8, m1);
}
#endif

static void block_scores(const ekv_f16 *k, int32_t d, int32_t bt, const float *Q, int n_q,
                         int q_stride, float *kf, float *acc, float *sc)
{
#if defined(__x86_64__)
    if (bt == 16 && n_q >= 1 && n_q <= 8 && kern_active_isa() >= KERN_ISA_AVX2) {
        block_scores16_avx2(k, d, Q, n_q, q_stride, sc);
        return;
    }
#endif
    block_scores_generic(k, d, bt, Q, n_q, q_stride, kf, acc, sc);
}

static int cmp_i32(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

int32_t kvrg_gather(const kv_recall *rc, const rc_head *h, const float *Q, int n_q, int q_stride,
                    int32_t q_pos, const int32_t *cand, int32_t n_cand, void *area,
                    const ekv_f16 **kp, const ekv_f16 **vp, const int32_t **pp)
{
    const int32_t bt = rc->bt, d = rc->d, want = rc->r * bt;
    const size_t stride = gather_blk_stride(rc);
    uint8_t *base = (uint8_t *)(((uintptr_t)area + 63) & ~(uintptr_t)63);
    uint8_t *blocks = base;
    float *score = (float *)(blocks + (size_t)rc->r * stride);
    int32_t *idx = (int32_t *)(score + (size_t)n_cand * bt);
    float *kf = (float *)(idx + (size_t)n_cand * bt);
    float *acc = kf + (size_t)d * bt;
    tok_score *ts = (tok_score *)(acc + bt);
    int32_t n = 0;
    /* every candidate token's exact score, max over the group's queries */
    for (int32_t i = 0; i < n_cand; i++) {
        uint8_t *p = h->blk[cand[i]];
        if (!p)
            continue;
        const int32_t *pos = blk_pos(rc, p);
        float *sc = score + (size_t)i * bt;
        block_scores(blk_k(p), d, bt, Q, n_q, q_stride, kf, acc, sc);
        for (int32_t s = 0; s < bt; s++)
            if (pos[s] != INT32_MAX && pos[s] <= q_pos)
                idx[n++] = i * bt + s;
    }
    if (n > want) {
        for (int32_t j = 0; j < n; j++)
            ts[j] = (tok_score){score[idx[j]], idx[j]};
        qsort(ts, (size_t)n, sizeof *ts, cmp_tok);
        for (int32_t j = 0; j < want; j++)
            idx[j] = ts[j].t;
        n = want;
    }
    qsort(idx, (size_t)n, sizeof *idx, cmp_i32); /* eviction order */
    const int32_t n_blk = (n + bt - 1) / bt;
    for (int32_t j = 0; j < n_blk; j++) {
        uint8_t *g = blocks + (size_t)j * stride;
        ekv_f16 *gk = blk_k(g), *gv = blk_v(rc, g);
        int32_t *gp = blk_pos(rc, g);
        for (int32_t slot = 0; slot < bt; slot++) {
            const int32_t t = j * bt + slot;
            if (t >= n) { /* an empty slot: a zero key the mask hides */
                for (int32_t c = 0; c < d; c++)
                    gk[(size_t)c * bt + slot] = 0;
                memset(gv + (size_t)slot * d, 0, (size_t)d * sizeof *gv);
                gp[slot] = INT32_MAX;
                continue;
            }
            uint8_t *src = h->blk[cand[idx[t] / bt]];
            const int32_t s = idx[t] % bt;
            const ekv_f16 *sk = blk_k(src);
            for (int32_t c = 0; c < d; c++)
                gk[(size_t)c * bt + slot] = sk[(size_t)c * bt + s];
            memcpy(gv + (size_t)slot * d, blk_v(rc, src) + (size_t)s * d, (size_t)d * sizeof *gv);
            gp[slot] = blk_pos(rc, src)[s];
        }
        kp[j] = gk;
        vp[j] = gv;
        pp[j] = gp;
    }
    return n_blk;
}
