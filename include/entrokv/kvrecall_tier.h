/*
 * kvrecall_tier.h - the KV store tier behind the recall store (issue 20):
 * a host-memory cap per engine, evicted blocks beyond it in the KV store
 * daemons, fetched back ahead of need and skipped when late.
 *
 * One kv_recall_tier belongs to an engine (its KV pool: kv_pool_set_recall_
 * tier) and every recall store of the pool's sequences attaches to it. Each
 * store's recall blocks (kvrecall.h) start in host memory. While the
 * blocks of all attached stores take more than host_cap bytes, kv_recall_add
 * puts the oldest complete blocks of the head it fills to the backend (the
 * daemon); a block's host copy is freed once its put is stored (a failed
 * put keeps it in host memory and counts a spill failure). Digests always
 * stay resident, so ranking never waits.
 *
 * At decode a top-R block whose host copy is gone is read from the head's
 * slots: 2R fetched blocks (the recall buffer and as many again, so a block
 * that leaves the top R and comes back a few steps later is still there;
 * the least recently read slot is refilled first). A block not there yet
 * is skipped for that step (attention runs without it) and counted as a
 * deadline miss; if it is not on its way, a get is issued then, so it
 * arrives while the rest of the step (and the next step's earlier layers)
 * computes. The ranking of step t, made with step t's query, is thus the
 * prediction for step t + 1 (InfiniGen predicts with the previous layer's
 * query; the previous step's for the same layer and head is what attention
 * has at hand here without a second pass). A stored block whose put
 * completes while it is in the top R moves into a slot instead of being
 * freed. No view ever waits on the backend.
 *
 * Keys: SHA-256("ekv-recall1" || the tier's 16 random bytes || u64 set id
 * || i32 layer || i32 head || i32 block), little-endian. A set is one
 * store's own spilled blocks (a clone keeps referencing its parent's set
 * for the blocks it inherited and starts its own for what it spills later,
 * since the two diverge from the fork on); the random bytes make keys of
 * two processes (or a restarted one) distinct, and the "ekv-recall1"
 * domain never meets the prefix keys' "ekv-key1" hash input. The backend
 * namespaces and MACs them like prefix values (kvstore/kvrecall_store.c).
 * When the last store referencing a set is freed and its puts have
 * finished, every key the set may hold is deleted (fire and forget: a
 * daemon that is down keeps them until its LRU evicts them; counted).
 *
 * Threading: add, clone and free run on the step engine's thread; views run
 * on the forward's threads, one per (sequence, layer, KV head) at a time (a
 * decode forward has one row per sequence); the backend's callbacks run on
 * its own thread. Each head's tier state has its own lock.
 */
#ifndef ENTROKV_KVRECALL_TIER_H
#define ENTROKV_KVRECALL_TIER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

#define KV_RECALL_KEY_BYTES 32

typedef void (*kv_recall_done_fn)(void *arg, bool ok);

/* Where spilled blocks go. put and get queue one op and return true, then
 * call done(arg, ok) exactly once, on any thread (it must not block); they
 * return false when nothing was queued (done never runs). A put's val and a
 * get's buf stay valid until done. A get's ok means exactly len bytes
 * arrived and verified (checksum and MAC). del queues the deletion of keys
 * (copied) and forgets them; false: not queued. */
typedef struct kv_recall_backend {
    bool (*put)(void *ctx, const uint8_t key[KV_RECALL_KEY_BYTES], const void *val, size_t len,
                kv_recall_done_fn done, void *arg);
    bool (*get)(void *ctx, const uint8_t key[KV_RECALL_KEY_BYTES], void *buf, size_t len,
                kv_recall_done_fn done, void *arg);
    bool (*del)(void *ctx, const uint8_t (*keys)[KV_RECALL_KEY_BYTES], size_t n);
    void *ctx;
} kv_recall_backend;

typedef struct kv_recall_tier kv_recall_tier;

/* host_cap: bytes of recall blocks (K, V, positions) held in host memory
 * over every attached store (< 0: no cap); be NULL: no backend (the tier
 * only counts; nothing is spilled). be is copied. */
kv_recall_tier *kv_recall_tier_create(int64_t host_cap, const kv_recall_backend *be,
                                      ekv_error *err);
/* Every attached store must be freed first; waits (bounded by the
 * backend's timeouts, which the caller's backend must have) for the
 * callbacks still owed. NULL is a no-op. */
void kv_recall_tier_destroy(kv_recall_tier *t);

typedef struct kv_recall_tier_stats {
    int64_t blocks_recalled;  /* blocks that joined attention, all stores */
    int64_t bytes_recalled;   /* their K, V and positions */
    int64_t deadline_misses;  /* top-R blocks skipped: not fetched in time */
    int64_t promotions;       /* blocks promoted into resident sets (kv_recall_count_promotions) */
    int64_t rankings;         /* (row, layer, KV head) rankings run, all stores */
    int64_t host_bytes;       /* recall blocks in host memory now */
    int64_t host_cap;         /* < 0: none */
    int64_t spilled_blocks;   /* puts stored */
    int64_t spill_failures;   /* puts that failed (the block stayed in host memory) */
    int64_t fetched_blocks;   /* gets that arrived verified */
    int64_t fetched_bytes;
    int64_t fetch_failures;   /* gets that missed (absent, spoilt, timed out, peer down) */
    int64_t deleted_keys;     /* keys whose deletion was queued at a set's end */
    int64_t delete_failures;  /* keys whose deletion could not be queued */
    int64_t live_sets;        /* sets not yet deleted */
    int64_t inflight;         /* backend ops whose callback is owed */
} kv_recall_tier_stats;
void kv_recall_tier_stats_get(const kv_recall_tier *t, kv_recall_tier_stats *st);

/* Bumps the tier's promotion counter (kvrecall.c does, for its store). */
void kv_recall_tier_count_promotions(kv_recall_tier *t, int64_t n);
/* Bumps the tier's ranking counter (kvrecall.c does, for its store). */
void kv_recall_tier_count_rankings(kv_recall_tier *t, int64_t n);

/* ---- the recall store's side (worker/kvrecall.c); nobody else calls these ---- */

typedef struct kvrt_seq kvrt_seq;

/* A store of n_layers x n_kv_heads heads, recalling r blocks per head, blocks of
 * blk_bytes bytes. NULL with EKV_ENOMEM. */
kvrt_seq *kvrt_attach(kv_recall_tier *t, int32_t n_layers, int32_t n_kv_heads, int32_t r,
                      size_t blk_bytes, ekv_error *err);
/* A clone's state: blocks held in host memory by src are host blocks of the
 * clone too (host_blocks of them, copied by the caller), blocks src spilled
 * stay in src's sets. */
kvrt_seq *kvrt_clone(kvrt_seq *src, int64_t host_blocks, ekv_error *err);
/* The store is being freed with host_blocks blocks in host memory. */
void kvrt_detach(kvrt_seq *s, int64_t host_blocks);
/* The tier the store is attached to. */
kv_recall_tier *kvrt_tier(const kvrt_seq *s);
/* Whether the tier may take blocks out of host memory (a backend and a
 * cap): then blocks must not change in place (no promotion). */
bool kvrt_spills(const kvrt_seq *s);

/* kv_recall_add grew (layer, head) to n_blocks blocks (blk[b], NULL when
 * spilled), the first n_full complete, allocating new_blocks of them: the
 * host bytes grow, and while they exceed the cap complete host blocks of
 * the head are put. false on ENOMEM (nothing changed). */
bool kvrt_added(kvrt_seq *s, int32_t layer, int32_t head, uint8_t **blk, int32_t n_blocks,
                int32_t n_full, int32_t new_blocks);
/* A view of (layer, head): begin locks its state (and frees the host copies
 * of blocks stored since the last view that are no longer needed, which no
 * view can still be reading); fetch gives the bytes of a top block whose
 * host copy is gone, or NULL (a deadline miss, counted; a get issued if
 * none is on its way); end takes the view's top blocks (ascending), moves
 * stored blocks among them into slots, counts what was recalled and
 * unlocks. */
void kvrt_view_begin(kvrt_seq *s, int32_t layer, int32_t head, uint8_t **blk, int32_t n_blocks);
const uint8_t *kvrt_fetch(kvrt_seq *s, int32_t layer, int32_t head, int32_t b, const int32_t *top,
                          int32_t n_top);
void kvrt_view_end(kvrt_seq *s, int32_t layer, int32_t head, uint8_t **blk, const int32_t *top,
                   int32_t n_top, int32_t n_recalled);
/* Counts n blocks recalled without a view (token recall's buffer blocks,
 * kvrecall_gather.c, with a tier that does not spill). */
void kvrt_count_recalled(kvrt_seq *s, int32_t n);
/* The deadline misses of this store. */
int64_t kvrt_misses(const kvrt_seq *s);

#endif
