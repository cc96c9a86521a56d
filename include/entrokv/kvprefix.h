/*
 * kvprefix.h - prompt KV in the KV store tier, keyed by its tokens, so a
 * later request with the same prefix (the next turn of a chat, a shared
 * document or system prompt) restores it instead of recomputing it.
 *
 * A value is one 16-token block of the prompt for every (layer, KV head)
 * this rank holds, in the pool's block layout (kvcache.h), so one get moves
 * a block-row at memory or network bandwidth. Its key is the hash chain of
 * every token up to and including the block (kvstore_key_make), the model
 * id and the TP layout: a block is only ever restored after exactly the
 * tokens it was computed from. Only whole blocks are stored. Values carry the
 * store's checksum; a bad or missing block ends the restored prefix there
 * (a miss: the rest is recomputed, never wrong).
 *
 * What is saved is the prompt's full KV, right after its prefill and before
 * compression, so the tokens compression evicts stay recoverable: a later
 * request restores the full prefix and compresses it again for its own
 * query (docs/kvstore.md).
 *
 * Threading: save, restore and recall are called from the step engine's
 * thread (the thread that owns the KV pool). save copies nothing there: it
 * pins the blocks (kv_seq_pin: references, copy-on-write keeps the engine
 * off them) and the kvprefix's own copier thread copies them out, releases
 * the pins and hands the values to the store; restore either waits
 * (kvprefix_restore) or runs in the background (kvprefix_restore_start /
 * _finish), its copy into the pool on the copier too; recall waits (bounded
 * by the client's op timeout) and copies on the calling thread.
 */
#ifndef ENTROKV_KVPREFIX_H
#define ENTROKV_KVPREFIX_H

#include <stdbool.h>
#include <stdint.h>

#include "entrokv/kvcache.h"
#include "entrokv/kvstore.h"
#include "entrokv/model.h"
#include "entrokv/status.h"

typedef struct kvprefix kvprefix;

typedef struct kvprefix_stats {
    uint64_t saved_blocks;    /* block-rows submitted to the store */
    uint64_t save_skipped;    /* saves dropped: the store or the copier busy, the pool short */
    uint64_t restored_blocks; /* block-rows restored */
    uint64_t restore_misses;  /* restores that found nothing */
    uint64_t restored_tokens;
    uint64_t recalled_tokens; /* evicted tokens brought back by kvprefix_recall */
} kvprefix_stats;

/* The model's identity every key includes: architecture, shape and a
 * SHA-256 of the start of its token embeddings (at most 159 characters).
 * Also the KV store namespace `entrokv serve` uses by default. */
void kvprefix_model_id(const ekv_model *m, char *out, size_t cap);

/* client is borrowed and must outlive the kvprefix's saves: destroy the
 * engine (the pool waits for the copier's pins), kvprefix_drain, then the
 * client, then the kvprefix. Rank tp_rank of a tensor-parallel group of
 * tp_size (1 for one process): its values hold the rank's own KV heads
 * (model_shard_plan; the layout of a model_kv_pool_create_shard pool), under
 * keys that carry (tp_rank, tp_size), so the ranks of one group share a
 * store without their blocks ever meeting. A layout the model cannot be cut
 * into is model_shard_plan's error. */
kvprefix *kvprefix_create(const ekv_model *m, kvstore_client *client, int32_t tp_rank,
                          int32_t tp_size, ekv_error *err);
void kvprefix_destroy(kvprefix *p);

/* fn(arg) runs on the store's worker thread each time a save's puts have
 * all finished (stored or not), e.g. to publish the tier's counters. Set it
 * before the first save. It may run after kvprefix_destroy (a save the
 * destroy let the copier finish is put afterwards), so arg must outlive the
 * client, not only p. */
void kvprefix_on_saved(kvprefix *p, void (*fn)(void *), void *arg);

/* Stores the whole blocks of seq's first n tokens from block first_block on
 * (blocks before it are already stored, e.g. restored ones). seq must hold
 * tokens[0, n) uncompressed in every head. Returns at once: the blocks are
 * pinned and queued for the copier, and go back to the pool (once seq lets
 * go of them too) at a kv_pool_reap after it has copied them. Skipped
 * (counted in save_skipped) when the copier has 8 saves
 * waiting or the pool has fewer free blocks than it would pin (writing into
 * a pinned block copies it first). */
void kvprefix_save(kvprefix *p, const kv_seq *seq, const int32_t *tokens, int32_t n,
                   int32_t first_block);
/* Waits until the copier has handed every queued save to the store (NULL:
 * a no-op). */
void kvprefix_drain(kvprefix *p);
/* Tests: while held, the copier starts no save (so a test can act on a
 * sequence whose save is pending); kvprefix_destroy ends a hold. */
void kvprefix_hold(kvprefix *p, bool held);

/* Restores into the empty seq the longest stored prefix of tokens[0, n) of
 * whole blocks, at most max_tokens tokens; returns the tokens restored (0:
 * nothing found, or the pool had no room). Waits for the store and the
 * copier: start + finish (+ finish). */
int32_t kvprefix_restore(kvprefix *p, kv_seq *seq, const int32_t *tokens, int32_t n,
                         int32_t max_tokens);

/*
 * The same in steps, so the caller keeps working while the gets are in
 * flight and while the prefix is copied into the pool (the step engine
 * keeps decoding other sequences). start submits the gets and returns at
 * once (NULL: nothing to restore, or the store is busy); wake(wake_arg), if
 * set, is called (on the store's or the copier's thread; it must not block)
 * each time the job becomes ready. ready says whether it is. finish, once
 * the gets are in (it waits for them otherwise, bounded by the store's op
 * timeout), takes the blocks for the stored prefix from the pool into the
 * empty seq (kv_seq_reserve) and queues their copy on the copier: it
 * returns KVPREFIX_PENDING, and the caller must not touch seq's KV until
 * ready again, then call finish again, which returns the tokens restored
 * and frees the job. A miss returns 0 at the first call. finish with seq
 * NULL discards the job at any step (a cancelled request; then free seq as
 * usual: a pending copy's pin holds its blocks). Every job must be finished
 * on the thread that owns seq's pool.
 */
#define KVPREFIX_PENDING (-1)
typedef struct kvprefix_job kvprefix_job;
kvprefix_job *kvprefix_restore_start(kvprefix *p, const int32_t *tokens, int32_t n,
                                     int32_t max_tokens, void (*wake)(void *), void *wake_arg);
bool kvprefix_restore_ready(const kvprefix_job *j);
int32_t kvprefix_restore_finish(kvprefix_job *j, kv_seq *seq);

/* One head's recall: prompt positions to bring back into (layer, KV head). */
typedef struct kvprefix_recall_req {
    int32_t layer, head;
    const int32_t *pos; /* strictly increasing; tokens the head no longer holds */
    int32_t n;
} kvprefix_recall_req;

/*
 * Recalls evicted prompt tokens into seq by key: the prompt is tokens[0, n)
 * at positions 0..n-1, saved by kvprefix_save before compression dropped
 * them. A position's key is its block's (the hash chain up to the block, as
 * for restore), so the compression and SCOPE paths can bring back any
 * evicted prompt token of any head.
 *
 * Every block-row a requested position falls in is fetched once, in one
 * batch (a block-row holds every head, so requests for many heads of the
 * same blocks cost one get each), and each token is put back in its head
 * in position order (kv_seq_insert). A position whose block the store does
 * not have (a miss, a bad checksum, the partial last block) is skipped: the
 * sequence goes on without it, as before the call.
 *
 * Returns the tokens recalled, or -1 with err for a bad request (layer,
 * head, a position outside the prompt or one the head holds) or a pool
 * without room; requests before the failing one stay done.
 */
int64_t kvprefix_recall(kvprefix *p, kv_seq *seq, const int32_t *tokens, int32_t n,
                        const kvprefix_recall_req *reqs, int32_t n_reqs, ekv_error *err);

void kvprefix_stats_get(const kvprefix *p, kvprefix_stats *s);

#endif
