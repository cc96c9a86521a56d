/*
 * kvcache.h - paged KV cache with a block table per (sequence, layer, KV head).
 *
 * One kv_pool per worker owns fixed-size blocks; a block holds block_tokens
 * tokens of K and of V (head_dim fp16 each, RoPE already applied to K; K
 * stored transposed, as kern_kv_view describes) and the original position of
 * each token. A kv_seq owns, for each layer and KV head,
 * its own ordered list of blocks, so heads may keep different numbers of
 * tokens (ragged compression budgets cost no padding). Blocks go back to the
 * pool the moment a head drops them (kv_seq_keep) or the sequence ends
 * (kv_seq_free) and no other sequence holds them: kv_seq_fork shares a
 * sequence's blocks (reference counts), and a block two sequences hold is
 * copied before either writes into it (copy-on-write), so a fork costs one
 * block per head that diverges, not a copy of the prompt.
 *
 * Threading: a pool and its sequences belong to one step engine thread.
 * Kernels may read views from many threads while nothing appends. Pinned
 * blocks (kv_seq_pin) may be read on any thread until released.
 */
#ifndef ENTROKV_KVCACHE_H
#define ENTROKV_KVCACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "entrokv/kernels.h"
#include "entrokv/status.h"

typedef struct kv_pool kv_pool;
typedef struct kv_seq kv_seq;

/* n_blocks blocks of block_tokens x head_dim; memory is allocated up front. */
kv_pool *kv_pool_create(int32_t block_tokens, int32_t head_dim, int64_t n_blocks, ekv_error *err);
void kv_pool_destroy(kv_pool *pool); /* all sequences must be freed first */
int64_t kv_pool_total_blocks(const kv_pool *pool);
int64_t kv_pool_free_blocks(const kv_pool *pool);
int32_t kv_pool_block_tokens(const kv_pool *pool);
/* Bytes of one block: K + V rows and positions. */
size_t kv_pool_block_bytes(const kv_pool *pool);
/* Blocks held more than once (kv_seq_fork, or a pin: kv_seq_pin), and the copies
 * copy-on-write has made so far. */
int64_t kv_pool_shared_blocks(const kv_pool *pool);
uint64_t kv_pool_cow_copies(const kv_pool *pool);

kv_seq *kv_seq_create(kv_pool *pool, int32_t n_layers, int32_t n_kv_heads, ekv_error *err);
/* Returns every block to the pool. NULL is a no-op. */
void kv_seq_free(kv_seq *seq);

/* Blocks that appending n tokens to every head would take from the pool
 * (a shared, partly filled last block counts: it is copied first). */
int64_t kv_seq_blocks_needed(const kv_seq *seq, int32_t n_tokens);

/* Appends one token's K and V (head_dim floats each, rounded to fp16) at
 * original position pos to (layer, head). EKV_ENOMEM when the pool is empty;
 * the head is then unchanged. */
ekv_status kv_seq_append(kv_seq *seq, int32_t layer, int32_t head, const float *k, const float *v,
                         int32_t pos, ekv_error *err);

int32_t kv_seq_len(const kv_seq *seq, int32_t layer, int32_t head);
int32_t kv_seq_n_layers(const kv_seq *seq);
int32_t kv_seq_n_kv_heads(const kv_seq *seq);
/* One past the largest position ever appended (the next position to use);
 * eviction does not lower it. */
int32_t kv_seq_next_pos(const kv_seq *seq);
/* The most tokens any one head holds. */
int32_t kv_seq_max_len(const kv_seq *seq);
kv_pool *kv_seq_pool(const kv_seq *seq);
/* Blocks held by the whole sequence (shared ones included). */
int64_t kv_seq_blocks(const kv_seq *seq);

/* A read view of (layer, head) for kern_attention, valid until the next
 * append/keep/free on this sequence. */
void kv_seq_view(const kv_seq *seq, int32_t layer, int32_t head, kern_kv_view *view);

/*
 * Called by kv_seq_keep with the tokens it is about to drop from (layer,
 * head): dropped[] holds n_dropped increasing indices into view, which is
 * the head before compaction (K, V and original positions). The KV store
 * keeps them as evicted-but-recoverable; the hook must copy what it needs
 * before returning. With no hook the tokens are simply freed.
 */
typedef void (*kv_evict_fn)(void *ctx, const kv_seq *seq, int32_t layer, int32_t head,
                            const kern_kv_view *view, const int32_t *dropped, int32_t n_dropped);
/* The recall tier (kvrecall_tier.h) the recall stores of this pool's
 * sequences attach to when enabled (NULL: none); it must outlive them. */
typedef struct kv_recall_tier kv_recall_tier;
void kv_pool_set_recall_tier(kv_pool *pool, kv_recall_tier *tier);
void kv_pool_set_evict_hook(kv_pool *pool, kv_evict_fn fn, void *ctx);

/*
 * Recall (kvrecall.h): from now on every token kv_seq_keep drops is copied
 * into the sequence's own recall store (created here, freed with the
 * sequence, copied by clone and fork), and attention lets the top r of its
 * blocks per (layer, KV head) join each step. EKV_EINVAL when already
 * enabled with another r; EKV_ENOMEM.
 */
typedef struct kv_recall kv_recall;
ekv_status kv_seq_recall_enable(kv_seq *seq, int32_t r, ekv_error *err);
/* NULL unless recall is enabled. */
kv_recall *kv_seq_recall(const kv_seq *seq);
/* After a tracked row's attention over layer (kvrecall.h, promotion): for
 * each KV head, swaps the recall block kv_recall_pick names with the
 * weakest resident block (copy-on-write first; a shared block with no free
 * block to copy into waits). Returns the blocks promoted. The head's
 * positions are then no longer in increasing order: kv_seq_insert refuses. */
int32_t kv_seq_recall_promote(kv_seq *seq, int32_t layer);

/*
 * SparK (compress/spark.c): moves every token (layer, head) holds - it must
 * hold no packed tokens yet - out of its blocks into a packed prefix
 * (kern_kv_packed, kernels.h): per token the n_keep key channels its mask
 * row (masks: ceil(head_dim / 8) bytes per token, bit j = keep channel j)
 * selects, the recovery scalar m[t] and the pruned channels' signs; V and
 * positions dense. The blocks return to the pool; later appends go to new
 * blocks after the prefix. inv_sqrt_c (head_dim floats, copied) rebuilds
 * pruned channels as sign * sqrt(m / c_j); NULL reads them as 0. Packed
 * tokens are never dropped (kv_seq_keep refuses) nor inserted around
 * (kv_seq_insert refuses); the block export/import API sees the blocks only.
 * EKV_EINVAL for a mask row that keeps other than n_keep channels or an m
 * that is negative or not finite.
 */
ekv_status kv_seq_pack(kv_seq *seq, int32_t layer, int32_t head, int32_t n_keep,
                       const uint8_t *masks, const float *m, const float *inv_sqrt_c,
                       ekv_error *err);
/* Heap bytes of the packed prefixes (rows, V, positions, 1/sqrt(c)). */
int64_t kv_seq_packed_bytes(const kv_seq *seq);
/* What the sequence really holds: its blocks' bytes plus its packed bytes. */
int64_t kv_seq_bytes(const kv_seq *seq);

/* A copy of src (every head's tokens and positions) drawing blocks from the
 * same pool; EKV_ENOMEM when the pool cannot hold it. */
kv_seq *kv_seq_clone(const kv_seq *src, ekv_error *err);
/* A sequence holding src's tokens in src's own blocks (each block's
 * reference count goes up; no block is taken from the pool). Either may
 * then append, keep or insert: the first write into a block both hold
 * copies it for the writer (EKV_ENOMEM there when the pool is empty, the
 * head unchanged). A packed (SparK) prefix is copied, not shared. NULL
 * with EKV_ENOMEM when the host is out of memory. */
kv_seq *kv_seq_fork(const kv_seq *src, ekv_error *err);

/* Raw block transfer for the KV store tier. A block's bytes are
 * kv_pool_block_bytes: K (transposed), V and positions, in the pool's layout.
 * Export copies block `block` of (layer, head) into out and returns the
 * tokens it holds. Import appends such a block holding n tokens to (layer,
 * head), which must hold a whole number of blocks; EKV_ENOMEM when the pool
 * is empty, EKV_EINVAL for a bad n or a ragged head. */
int32_t kv_seq_block_export(const kv_seq *seq, int32_t layer, int32_t head, int32_t block,
                            void *out);
ekv_status kv_seq_block_import(kv_seq *seq, int32_t layer, int32_t head, const void *in,
                               int32_t n, ekv_error *err);

/*
 * Pins: blocks held by reference so another thread can copy them while the
 * pool's thread goes on (the KV store tier saves a prompt's KV this way,
 * off the step engine's thread). kv_seq_pin (the pool's thread) takes one
 * more reference on whole blocks [first_block, first_block + n_blocks) of
 * every head of seq, as a fork does; since nothing writes a block held
 * twice (copy-on-write), kv_pin_block's bytes stay as they were whatever
 * the sequence does meanwhile (append, keep, free). EKV_EINVAL when a head
 * lacks one of those blocks whole (or has a packed prefix).
 *
 * kv_pin_release may run on any thread and never blocks on the pool: it
 * queues the pin and calls the release hook (which must not block nor call
 * pin functions: it runs under the pins' lock). The blocks go back to the
 * pool, unless a sequence still holds them, when the pool's thread calls
 * kv_pool_reap. kv_pool_destroy waits until every pin has been released.
 */
typedef struct kv_pin kv_pin;
kv_pin *kv_seq_pin(const kv_seq *seq, int32_t first_block, int32_t n_blocks, ekv_error *err);
/* The other way (a restore filled off the pool's thread): appends n_blocks
 * unwritten whole blocks to every head of the empty seq, counted as tokens
 * at positions [0, n_blocks * block_tokens), and returns a pin on them
 * through which another thread writes them (kv_pin_block_write) before
 * releasing it. Nothing may read seq's heads until then (the caller sees
 * to it); freeing seq meanwhile is safe, the pin holds the blocks.
 * EKV_EINVAL unless seq is empty; EKV_ENOMEM when the pool lacks the
 * blocks (seq stays empty). */
kv_pin *kv_seq_reserve(kv_seq *seq, int32_t n_blocks, ekv_error *err);
/* A kv_seq_reserve pin's block to fill; NULL for a kv_seq_pin pin. */
void *kv_pin_block_write(const kv_pin *pin, int32_t layer, int32_t head, int32_t block);
int32_t kv_pin_blocks(const kv_pin *pin); /* blocks per head */
/* Block `block` (0-based within the pin) of (layer, head), in
 * kv_seq_block_export's layout; NULL out of range. */
const void *kv_pin_block(const kv_pin *pin, int32_t layer, int32_t head, int32_t block);
void kv_pin_release(kv_pin *pin); /* NULL is a no-op */
/* The pool's thread: drops the released pins' references; returns how
 * many pins it reaped. */
int64_t kv_pool_reap(kv_pool *pool);
/* Pins made and not yet reaped. */
int64_t kv_pool_pins(kv_pool *pool);
/* Waits (at most timeout_ms) until a released pin waits to be reaped or no
 * pin is left; true when one waits. */
bool kv_pool_wait_released(kv_pool *pool, int timeout_ms);
void kv_pool_set_release_hook(kv_pool *pool, void (*fn)(void *), void *arg);

/* Token `row` of an exported block (kv_seq_block_export's layout): its K
 * and V rows (head_dim fp16 each) into k and v; returns its position. */
int32_t kv_block_token(const kv_pool *pool, const void *block, int32_t row, ekv_f16 *k,
                       ekv_f16 *v);

/* Copies the positions of (layer, head)'s tokens, in list order, into out
 * (room for kv_seq_len of them); returns how many. */
int32_t kv_seq_positions(const kv_seq *seq, int32_t layer, int32_t head, int32_t *out);

/*
 * Puts n tokens back into (layer, head), each where its position belongs in
 * the list (the head's tokens are in increasing position order, as append,
 * keep, import and this keep them): k and v are [n][head_dim] fp16 rows, pos
 * their positions, strictly increasing and none already held. This is how
 * evicted tokens recalled from the KV store return (kvprefix_recall).
 * EKV_EINVAL for bad positions and EKV_ENOMEM when the pool lacks blocks;
 * either way nothing changes.
 */
ekv_status kv_seq_insert(kv_seq *seq, int32_t layer, int32_t head, const ekv_f16 *k,
                         const ekv_f16 *v, const int32_t *pos, int32_t n, ekv_error *err);

/*
 * Keeps only the listed tokens of (layer, head): keep[] holds n_keep distinct
 * indices into the head's current list in increasing order. Kept rows are
 * compacted to the front preserving order and their positions; blocks left
 * empty return to the pool at once. This is what compression calls.
 */
ekv_status kv_seq_keep(kv_seq *seq, int32_t layer, int32_t head, const int32_t *keep,
                       int32_t n_keep, ekv_error *err);

#endif
