/*
 * kvrecall_int.h - what the recall store (kvrecall.c) shares with its
 * promotion and demotion (kvpromote.c). Not a public header: the API is
 * kvrecall.h.
 */
#ifndef ENTROKV_KVRECALL_INT_H
#define ENTROKV_KVRECALL_INT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/kvrecall.h"
#include "entrokv/kvrecall_tier.h"

typedef struct rc_head {
    int32_t n_blocks, cap, n_tokens;
    /* per block, one allocation (blk_bytes): K (head_dim x block_tokens,
     * transposed), V (block_tokens x head_dim), positions (block_tokens,
     * INT32_MAX: empty slot); NULL once the block lives only in the tier
     * behind the store (kvrecall_tier.h) */
    uint8_t **blk;
    float *kmin;     /* cap digests of head_dim */
    float *kmax;
    int32_t *minpos; /* per block: its earliest position */
    /* promotion (kv_recall_observe / _pick / _exchange): decayed attention
     * mass per recall block (cap) and per resident block (res_n of res_cap) */
    float *mass;
    float *res_mass;
    int32_t res_n, res_cap;
    /* the last tracked row's ranking (top, n_top of r: what a row within
     * `every` steps of ranked_pos reuses) and the blocks that joined its
     * view, in view order (in, n_in of r: what observe attributes mass to) */
    int32_t *top, *in;
    int32_t n_top, n_in, ranked_pos;
    bool reusable;
    /* EKV_RECALL_DIAG (kvrecall_diag.c): summed mass shares (resident,
     * recalled, oracle top R blocks, all evicted, 16 R tokens of the 2 R
     * best-scored blocks, the 16 R best evicted tokens) over diag_steps
     * rankings */
    double diag[6];
    int64_t diag_steps;
} rc_head;

struct kv_recall {
    int32_t n_layers, n_kv_heads, d, bt, r;
    int32_t every;  /* rank every this many steps (tracked rows) */
    int32_t exact_channels; /* the ranking's exact channels (kvrecall_bound.c) */
    bool promote;   /* observe attention mass and promote blocks that keep winning */
    int32_t gather; /* 0: whole blocks; k: the best R x bt tokens of the k x R best blocks */
    bool diag;      /* EKV_RECALL_DIAG: account where the mass falls (kvrecall_diag.c) */
    bool rank_scalar; /* rank every block one call at a time (kv_recall_set_rank_scalar) */
    rc_head *heads;
    kvrt_seq *tier; /* NULL: the host pool alone */
    _Atomic int64_t selections, blocks_recalled, select_ns, promotions, reuses;
    _Atomic int64_t rank_k_blocks, rank_bytes; /* what rankings read (kv_recall_stats) */
};

/* A block's bytes and where its K, V and positions start in them. */
static inline size_t blk_bytes(const kv_recall *rc)
{
    return (size_t)rc->d * rc->bt * 2 * sizeof(ekv_f16) + (size_t)rc->bt * sizeof(int32_t);
}
static inline ekv_f16 *blk_k(uint8_t *p) { return (ekv_f16 *)p; }
static inline ekv_f16 *blk_v(const kv_recall *rc, uint8_t *p)
{
    return (ekv_f16 *)p + (size_t)rc->d * rc->bt;
}
static inline int32_t *blk_pos(const kv_recall *rc, uint8_t *p)
{
    return (int32_t *)((ekv_f16 *)p + (size_t)rc->d * rc->bt * 2);
}

/* The ranking's score (kvrecall_bound.c): for one query, the channels
 * where |q| is largest (scored exactly per key) and q with them zeroed
 * (qm, head_dim floats: the box bounds the rest). */
typedef struct kvrb_query {
    const float *q, *qm;
    const int32_t *sel; /* n_sel channels */
    int32_t n_sel;
} kvrb_query;
/* Splits q for m exact channels; qm and sel hold head_dim entries each. */
void kvrb_split(const float *q, int32_t d, int32_t m, float *qm, int32_t *sel, kvrb_query *out);
/* Upper bound of max over block b's keys of q . k (kv_recall_block_bound). */
float kvrb_bound(const kv_recall *rc, const rc_head *h, int32_t b, const kvrb_query *qq);

/* kvrecall_diag.c: whether EKV_RECALL_DIAG is set; account one ranking's
 * mass shares into h; print every head's means to stderr. */
bool kvrd_enabled(void);
void kvrd_account(kv_recall *rc, rc_head *h, const float *Q, int n_q, int q_stride,
                  int32_t q_pos, const kern_kv_view *resident, const int32_t *top, int32_t n_top);
void kvrd_print(const kv_recall *rc);

/* kvrecall_gather.c: the scratch bytes token-granular recall needs beyond
 * the ranking's (0 with gather off), and the gather itself: the best
 * R x bt tokens of the n_cand candidate blocks cand (host blocks, in block
 * order) by the group's exact maximum q . k, at or before q_pos, copied in
 * eviction order into buffer blocks in area; their K, V and position
 * pointers go to kp, vp, pp. Returns the buffer blocks filled. */
size_t kvrg_scratch_bytes(const kv_recall *rc);
int32_t kvrg_gather(const kv_recall *rc, const rc_head *h, const float *Q, int n_q, int q_stride,
                    int32_t q_pos, const int32_t *cand, int32_t n_cand, void *area,
                    const ekv_f16 **kp, const ekv_f16 **vp, const int32_t **pp);
/* kv_digest_bounds, and when amax is not NULL each digest's largest
 * |kmin_c| or |kmax_c| into amax[b] (kvdigest_simd.c). */
void kvds_bounds(const float *kmin, const float *kmax, int32_t n, const float *Q, int n_q,
                 int q_stride, int32_t d, float *bound, float *amax);
/* One ranking's scores with m > 0 exact channels (kvrecall_bound.c):
 * bound[b] = the largest kvrb_bound over the n_q (<= KVRB_GROUP_MAX)
 * queries for every block of h that holds a token at or before q_pos and
 * could be among the r best (the blocks the caller picks: R, or the
 * gather's K x R), -INFINITY for the rest (blocks whose box bound
 * is below r others' scores, whose K is never read), so the top r by bound
 * (ties to the older block) are those of every block's score. ub holds
 * h->n_blocks floats and cand r (scratch). Returns the blocks whose exact
 * channels were read; -1 (nothing done) when out of memory or n_q is
 * above KVRB_GROUP_MAX. */
#define KVRB_GROUP_MAX 64
/* The reference kvrb_scores equals: every block scored, one call per block
 * and query (m = 0: kv_digest_bound; qm and sel head_dim each). Returns
 * the blocks whose K it read. */
int32_t kvrb_scores_scalar(const kv_recall *rc, const rc_head *h, const float *Q, int n_q,
                           int q_stride, int32_t m, float *bound, float *qm, int32_t *sel);
int32_t kvrb_scores(const kv_recall *rc, const rc_head *h, const float *Q, int n_q, int q_stride,
                    int32_t q_pos, int32_t m, int32_t r, float *bound, float *ub, int32_t *cand);

static inline rc_head *head_of(const kv_recall *rc, int32_t layer, int32_t head)
{
    return &rc->heads[(size_t)layer * rc->n_kv_heads + head];
}
#endif
