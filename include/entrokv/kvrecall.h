/*
 * kvrecall.h - recall of evicted KV during decode (Quest / ArkVale-style
 * page digests; issue 20).
 *
 * A recall store belongs to one sequence (kv_seq_recall_enable, kvcache.h).
 * Every token kv_seq_keep drops from a (layer, KV head) is copied into the
 * store's host pool for that head, packed in eviction order into recall
 * blocks of block_tokens tokens laid out like the KV pool's blocks (K
 * transposed, V by token, original positions), and each block keeps a
 * resident digest: the per-channel minimum and maximum of its keys, as
 * attention reads them (post-RoPE, fp16-rounded). For a query q the digest
 * bounds every key k of the block from above:
 *   q . k = sum_c q_c k_c <= sum_c max(q_c min_c, q_c max_c)
 * (each term is linear in k_c over [min_c, max_c], so its maximum sits at an
 * end; Quest, Tang et al. 2024).
 *
 * At decode, attention over (layer, KV head) first ranks the head's recall
 * blocks by that bound (max over the GQA group's queries) and lets the top
 * R join attention as ordinary keys at their original positions
 * (kv_recall_view). On the CPU the host pool is the memory attention reads,
 * so a recall is zero-copy; "bytes recalled" counts what a device-resident
 * cache would copy (R blocks per head per step, no reuse). A partly filled
 * recall block pads its empty slots with position INT32_MAX, which the
 * causal mask always hides (exact zeros in the softmax). Each block is one
 * allocation, so the tier behind the store can take it out of host memory
 * (kv_recall_attach_tier).
 *
 * Threading: kv_recall_add runs on the step engine's thread (kv_seq_keep);
 * kv_recall_view may run concurrently for different (row, KV head) items
 * with caller-owned scratch; the counters are atomic.
 */
#ifndef ENTROKV_KVRECALL_H
#define ENTROKV_KVRECALL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/kernels.h"
#include "entrokv/status.h"

typedef struct kv_recall kv_recall;

/* A store recalling up to r blocks per (layer, KV head) per step. */
kv_recall *kv_recall_create(int32_t n_layers, int32_t n_kv_heads, int32_t head_dim,
                            int32_t block_tokens, int32_t r, ekv_error *err);
void kv_recall_free(kv_recall *rc); /* NULL is a no-op */
/* An independent copy (kv_seq_clone / kv_seq_fork); NULL with EKV_ENOMEM. */
kv_recall *kv_recall_clone(const kv_recall *rc, ekv_error *err);
int32_t kv_recall_r(const kv_recall *rc);

/* Ranking every `every` decode steps (1..KV_RECALL_EVERY_MAX; between
 * rankings a tracked row reuses the last choice) and promotion on or off.
 * Defaults: every 1, promotion on. EKV_EINVAL for a bad every. */
#define KV_RECALL_EVERY_MAX 64
ekv_status kv_recall_set_mode(kv_recall *rc, int32_t every, bool promote, ekv_error *err);

/* Copies the n dropped tokens (increasing indices into view) of (layer,
 * head) into the store and updates the digests. EKV_ENOMEM leaves the
 * store as it was. */
ekv_status kv_recall_add(kv_recall *rc, int32_t layer, int32_t head, const kern_kv_view *view,
                         const int32_t *dropped, int32_t n, ekv_error *err);

/* Recall blocks (and tokens) the store holds for (layer, head). */
int32_t kv_recall_blocks(const kv_recall *rc, int32_t layer, int32_t head);
int32_t kv_recall_tokens(const kv_recall *rc, int32_t layer, int32_t head);
/* Block b of (layer, head): its K (head_dim x block_tokens, transposed), V
 * (block_tokens x head_dim), positions (INT32_MAX past the filled slots)
 * and digest (head_dim floats each); returns the filled slots. */
int32_t kv_recall_block(const kv_recall *rc, int32_t layer, int32_t head, int32_t b,
                        const ekv_f16 **k, const ekv_f16 **v, const int32_t **pos,
                        const float **kmin, const float **kmax);

/* The digest's upper bound of q . k over a block (head_dim d). */
float kv_digest_bound(const float *kmin, const float *kmax, const float *q, int32_t d);
/* bound[b] = the largest kv_digest_bound over n_q queries (query g at
 * Q + g * q_stride) of digest b, for n digests of d floats laid end to end
 * in kmin and kmax: what one ranking computes, equal bit for bit to
 * calling kv_digest_bound per block and query (kvdigest_simd.c). */
void kv_digest_bounds(const float *kmin, const float *kmax, int32_t n, const float *Q, int n_q,
                      int q_stride, int32_t d, float *bound);

/* What recall ranks block b of (layer, head) by for query q: an upper
 * bound of the block's maximum q . k, exact on the M channels where |q| is
 * largest (from the block's keys) and the digest's box on the rest
 * (kvrecall_bound.c), so never above kv_digest_bound; a block spilled to
 * the tier gets the box alone. -INFINITY for a bad b. M is
 * kv_recall_set_channels' (default KV_RECALL_EXACT_CHANNELS): 0 ranks by
 * the box alone, head_dim or more by the exact maximum. */
#define KV_RECALL_EXACT_CHANNELS 16
#define KV_RECALL_CHANNELS_MAX 4096
float kv_recall_block_bound(const kv_recall *rc, int32_t layer, int32_t head, int32_t b,
                            const float *q);
/* EKV_EINVAL outside [0, KV_RECALL_CHANNELS_MAX]. */
ekv_status kv_recall_set_channels(kv_recall *rc, int32_t m, ekv_error *err);
/* The ranking scores blocks many at a time and reads a block's K only when
 * its box bound can still beat the R-th best score (kvrecall_bound.c); on,
 * every block is scored one call at a time as before, the reference the
 * fast ranking equals view for view (tests, bench generate's A/B). Off by
 * default; clones keep it. */
void kv_recall_set_rank_scalar(kv_recall *rc, bool on);

/* Token-granular recall (kvrecall_gather.c): with k > 0 a ranking keeps
 * its k x R best blocks as candidates, scores each of their tokens exactly
 * (the maximum q . k over the GQA group's queries) and the R x
 * block_tokens best join attention, copied into R buffer blocks in the
 * scratch, so the buffer holds the same memory as R whole blocks. It ranks
 * every step (kv_recall_set_mode's `every` is ignored) and promotes
 * nothing (its tokens belong to no one recall block); with a tier that
 * spills (kvrt_spills: blocks' K may be on the daemon) it is off (whole
 * blocks); a tier that only counts counts the buffer blocks it fills as
 * recalled. 0 (the store's default): whole blocks. The interfaces
 * (generate, eval, bench, serve requests) default to
 * KV_RECALL_GATHER_DEFAULT (docs/COMPRESSION.md "Token recall").
 * EKV_EINVAL outside [0, KV_RECALL_GATHER_MAX]. */
#define KV_RECALL_GATHER_MAX 8
#define KV_RECALL_GATHER_DEFAULT 2
ekv_status kv_recall_set_gather(kv_recall *rc, int32_t k, ekv_error *err);

/* Scratch bytes kv_recall_view needs for (layer, head) beside a resident
 * view of n_resident_blocks blocks. */
size_t kv_recall_scratch_bytes(const kv_recall *rc, int32_t layer, int32_t head,
                               int32_t n_resident_blocks);

/* Builds into *out the resident view plus the top-R recall blocks of
 * (layer, head) for the n_q queries Q (q_stride apart; the ones at q_pos[0]
 * decide: only blocks holding a token at or before it count), recall blocks
 * first (the resident view's packed prefix, if any, stays first). The
 * pointer arrays live in scratch (kv_recall_scratch_bytes, 8-byte aligned)
 * and stay valid until it is reused. Returns the blocks recalled (0: *out
 * is the resident view). */
int32_t kv_recall_view(kv_recall *rc, int32_t layer, int32_t head, const float *Q, int n_q,
                       int q_stride, int32_t q_pos, const kern_kv_view *resident,
                       kern_kv_view *out, void *scratch);

/* Promotion and demotion (UNComp's rolling decode re-selection, specs/
 * uncomp.md section 5, at block granularity). A tracked row is its
 * sequence's only row in the step (decode, not a teacher-forced batch):
 * kv_recall_view_at with KV_RECALL_TRACK remembers its selection per
 * (layer, KV head) and may reuse the last ranking (kv_recall_set_mode);
 * kv_recall_observe then takes that row's attention probabilities over the
 * view (n_q rows of n_tokens, kern_attention_probe) and keeps a decayed
 * attention mass, mass = KV_RECALL_DECAY * mass + this step's, for every
 * recall block it recalled and every resident block (recall blocks not
 * recalled decay only). kv_recall_pick names the recall block with the most
 * mass among those recalled and the weakest resident block outside the
 * recent window (the newest full block and the partial tail); when the
 * first's mass exceeds KV_RECALL_MARGIN times the second's, the caller
 * (kv_seq_recall_promote, kvcache.h) swaps them with kv_recall_exchange:
 * the bytes trade places bit for bit, the recall block's digest is rebuilt
 * and the masses trade too. Token counts never change, so resident +
 * recall buffer stays at the budget and the per-head split stays the
 * entropy allocation's. Nothing happens when every block is recalled every
 * step anyway (blocks <= R). kv_recall_add (a compaction) restarts the
 * resident masses. Observe, pick and exchange touch one (layer, head); the
 * caller runs them for distinct heads at once or one at a time. With a
 * tier attached (kv_recall_attach_tier) nothing is promoted: a block's
 * copy on the daemons would go stale when its bytes trade places. */
#define KV_RECALL_TRACK 1
#define KV_RECALL_DECAY 0.9f
#define KV_RECALL_MARGIN 2.0f
int32_t kv_recall_view_at(kv_recall *rc, int32_t layer, int32_t head, const float *Q, int n_q,
                          int q_stride, int32_t q_pos, int flags, const kern_kv_view *resident,
                          kern_kv_view *out, void *scratch);
bool kv_recall_promotes(const kv_recall *rc);
void kv_recall_observe(kv_recall *rc, int32_t layer, int32_t head, const float *probs, int n_q,
                       int32_t n_tokens, int32_t n_packed);
/* The resident block (of n_resident tokens) to demote and, in *block, the
 * recall block to promote; -1 when none should move. */
int32_t kv_recall_pick(const kv_recall *rc, int32_t layer, int32_t head, int32_t n_resident,
                       int32_t *block);
/* Swaps recall block `block` of (layer, head) with the resident block
 * res_block whose K, V and positions are k, v, pos (the pool's block
 * layout, writable: the caller owns it). */
void kv_recall_exchange(kv_recall *rc, int32_t layer, int32_t head, int32_t block,
                        int32_t res_block, ekv_f16 *k, ekv_f16 *v, int32_t *pos);

typedef struct kv_recall_stats {
    int64_t evicted_tokens;  /* tokens the store holds, all heads */
    int64_t digest_blocks;   /* recall blocks (digests) held, all heads */
    int64_t selections;      /* (row, layer, KV head) rankings run */
    int64_t reuses;          /* views that reused the last ranking (every > 1) */
    int64_t blocks_recalled; /* blocks that joined attention */
    int64_t bytes_recalled;  /* their K, V and positions */
    int64_t deadline_misses; /* recalls skipped for lateness (0: the host pool never is) */
    int64_t promotions;      /* blocks promoted into the resident set, one demoted each
                              * (kv_recall_exchange counts through kv_recall_count_promotions) */
    double select_s;         /* summed over threads: ranking and view building */
    int64_t host_bytes;      /* the store's K/V/positions in host memory, and digests */
    int64_t spilled_blocks;  /* blocks whose K/V live only in the tier (kvrecall_tier.h) */
    int64_t buffer_bytes;    /* the recall buffer: r blocks per (layer, KV head) */
    int64_t rank_bytes;      /* what the rankings read: digests, and K's exact channels
                              * and positions of the blocks not pruned (kvrecall_bound.c) */
    int64_t rank_k_blocks;   /* blocks whose exact channels the rankings read */
} kv_recall_stats;
void kv_recall_get_stats(const kv_recall *rc, kv_recall_stats *st);

/* Counts n blocks promoted into the resident set, in the store's stats and
 * its tier's (the engine's /metrics). */
void kv_recall_count_promotions(kv_recall *rc, int64_t n);

/*
 * The tier behind the store (kvrecall_tier.h): a host-memory cap shared by
 * the engine's stores, complete blocks beyond it in the KV store daemons.
 * Attach before the first add (kv_seq_recall_enable does, when the pool has
 * a tier). A spilled block's K/V/positions are gone from host memory:
 * kv_recall_block gives NULL for them (digests stay), and kv_recall_view
 * joins it only once fetched back, skipping it (a deadline miss) before.
 */
typedef struct kv_recall_tier kv_recall_tier;
ekv_status kv_recall_attach_tier(kv_recall *rc, kv_recall_tier *t, ekv_error *err);
/* Blocks whose K/V are in host memory now. */
int64_t kv_recall_host_blocks(const kv_recall *rc);

#endif
