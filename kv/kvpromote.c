/*
 * kvpromote.c - a sequence's recall store (kv_seq_recall_enable) and
 * promotion and demotion between its resident blocks and that store
 * (UNComp's rolling decode re-selection at block granularity; kvrecall.h
 * says when and how): the decayed attention mass per block
 * (kv_recall_observe), the choice of a pair to swap (kv_recall_pick), the
 * swap itself (kv_recall_exchange) and the per-layer driver over the
 * pool's blocks (kv_seq_recall_promote, kvcache.h).
 */
#include "entrokv/kvcache.h"

#include "entrokv/kvrecall.h"
#include "entrokv/kvrecall_tier.h"
#include "kvcache_int.h"
#include "kvrecall_int.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

/* Promotion rewrites a recall block in place, which a tier that spills
 * blocks (its puts carry the old bytes) must not see; a tier that only
 * counts (no backend, or no cap) is fine. */
static bool tier_spills(const kv_recall *rc) { return rc->tier && kvrt_spills(rc->tier); }

/* Gathered tokens (kv_recall_set_gather) belong to no recall block, so
 * there is no block to promote. */
bool kv_recall_promotes(const kv_recall *rc)
{
    return rc->promote && !rc->gather && !tier_spills(rc);
}

/* Sum of probs over [from, to) in every query's row, over n_q. */
static float span_mass(const float *probs, int n_q, int32_t n_tokens, int32_t from, int32_t to)
{
    float s = 0.0f;
    for (int g = 0; g < n_q; g++)
        for (int32_t t = from; t < to; t++)
            s += probs[(size_t)g * n_tokens + t];
    return s / (float)n_q;
}

void kv_recall_observe(kv_recall *rc, int32_t layer, int32_t head, const float *probs, int n_q,
                       int32_t n_tokens, int32_t n_packed)
{
    rc_head *h = head_of(rc, layer, head);
    const int32_t bt = rc->bt, rec_end = n_packed + h->n_in * bt;
    if (!rc->promote || rc->gather || n_tokens < rec_end)
        return;
    const int32_t res_blocks = (n_tokens - rec_end + bt - 1) / bt;
    if (res_blocks > h->res_cap) {
        const int32_t cap = res_blocks > 2 * h->res_cap ? res_blocks : 2 * h->res_cap;
        float *m = realloc(h->res_mass, (size_t)cap * sizeof *m);
        if (!m)
            return; /* promotion is an optimisation: without memory it waits */
        h->res_mass = m;
        h->res_cap = cap;
    }
    for (int32_t j = h->res_n; j < res_blocks; j++)
        h->res_mass[j] = 0.0f;
    h->res_n = res_blocks;
    for (int32_t b = 0; b < h->n_blocks; b++)
        h->mass[b] *= KV_RECALL_DECAY;
    for (int32_t j = 0; j < res_blocks; j++) {
        const int32_t from = rec_end + j * bt, to = from + bt < n_tokens ? from + bt : n_tokens;
        h->res_mass[j] = KV_RECALL_DECAY * h->res_mass[j] +
                         span_mass(probs, n_q, n_tokens, from, to);
    }
    for (int32_t i = 0; i < h->n_in; i++) {
        const int32_t from = n_packed + i * bt;
        h->mass[h->in[i]] += span_mass(probs, n_q, n_tokens, from, from + bt);
    }
}

int32_t kv_recall_pick(const kv_recall *rc, int32_t layer, int32_t head, int32_t n_resident,
                       int32_t *block)
{
    const rc_head *h = head_of(rc, layer, head);
    const int32_t bt = rc->bt, full = h->n_tokens / bt;
    /* everything recalled every step: nothing to gain */
    if (!kv_recall_promotes(rc) || h->n_blocks <= rc->r)
        return -1;
    int32_t best = -1;
    for (int32_t i = 0; i < h->n_in; i++) {
        const int32_t b = h->in[i];
        if (b < full && h->blk[b] && (best < 0 || h->mass[b] > h->mass[best]))
            best = b;
    }
    /* the newest full block and the partial tail are the recent window */
    const int32_t cand = n_resident / bt - 1;
    int32_t weak = -1;
    for (int32_t j = 0; j < cand && j < h->res_n; j++)
        if (weak < 0 || h->res_mass[j] < h->res_mass[weak])
            weak = j;
    if (best < 0 || weak < 0 || !(h->mass[best] > KV_RECALL_MARGIN * h->res_mass[weak]))
        return -1;
    *block = best;
    return weak;
}

void kv_recall_exchange(kv_recall *rc, int32_t layer, int32_t head, int32_t block,
                        int32_t res_block, ekv_f16 *k, ekv_f16 *v, int32_t *pos)
{
    rc_head *h = head_of(rc, layer, head);
    const int32_t bt = rc->bt, d = rc->d;
    const size_t kv = (size_t)d * bt;
    ekv_f16 *rk = blk_k(h->blk[block]), *rv = blk_v(rc, h->blk[block]);
    int32_t *rp = blk_pos(rc, h->blk[block]);
    for (size_t i = 0; i < kv; i++) {
        ekv_f16 x = rk[i];
        rk[i] = k[i];
        k[i] = x;
        x = rv[i];
        rv[i] = v[i];
        v[i] = x;
    }
    float *mn = h->kmin + (size_t)block * d, *mx = h->kmax + (size_t)block * d;
    h->minpos[block] = INT32_MAX;
    for (int32_t s = 0; s < bt; s++) {
        const int32_t x = rp[s];
        rp[s] = pos[s];
        pos[s] = x;
        if (rp[s] < h->minpos[block])
            h->minpos[block] = rp[s];
    }
    for (int32_t c = 0; c < d; c++) {
        mn[c] = INFINITY;
        mx[c] = -INFINITY;
        for (int32_t s = 0; s < bt; s++) {
            const float f = ekv_f16_to_f32(rk[(size_t)c * bt + s]);
            mn[c] = f < mn[c] ? f : mn[c];
            mx[c] = f > mx[c] ? f : mx[c];
        }
    }
    if (res_block < h->res_n) {
        const float m = h->mass[block];
        h->mass[block] = h->res_mass[res_block];
        h->res_mass[res_block] = m;
    }
    h->reusable = false; /* the block the ranking chose now holds other keys */
    kv_recall_count_promotions(rc, 1);
}

ekv_status kv_seq_recall_enable(kv_seq *seq, int32_t r, ekv_error *err)
{
    if (seq->recall)
        return kv_recall_r(seq->recall) == r
                   ? EKV_OK
                   : ekv_error_set(err, EKV_EINVAL, "kv recall: already enabled with r %d",
                                   kv_recall_r(seq->recall));
    seq->recall = kv_recall_create(seq->n_layers, seq->n_kv_heads, seq->pool->head_dim,
                                   seq->pool->block_tokens, r, err);
    if (seq->recall && seq->pool->recall_tier &&
        kv_recall_attach_tier(seq->recall, seq->pool->recall_tier, err)) {
        kv_recall_free(seq->recall);
        seq->recall = NULL;
    }
    return seq->recall ? EKV_OK : err ? err->code : EKV_ENOMEM;
}

kv_recall *kv_seq_recall(const kv_seq *seq) { return seq->recall; }

int32_t kv_seq_recall_promote(kv_seq *seq, int32_t layer)
{
    kv_pool *pool = seq->pool;
    int32_t moved = 0;
    if (!seq->recall || !kv_recall_promotes(seq->recall))
        return 0;
    for (int32_t head = 0; head < seq->n_kv_heads; head++) {
        kv_head *h = head_at(seq, layer, head);
        int32_t block;
        const int32_t rb = kv_recall_pick(seq->recall, layer, head, h->n_tokens, &block);
        if (rb < 0 || rb >= h->n_blocks || (pool->refs[h->ids[rb]] > 1 && pool->n_free == 0))
            continue; /* a shared block with no free one to copy into waits */
        kv_block_own(pool, h, rb);
        const int32_t id = h->ids[rb];
        kv_recall_exchange(seq->recall, layer, head, block, rb, block_k(pool, id),
                           block_v(pool, id), block_pos(pool, id));
        moved++;
    }
    return moved;
}
