/*
 * kvcache_int.h - what the pool (kvcache.c) shares with its pins (kvpin.c)
 * and with promotion (kvpromote.c).
 * Not a public header: the API is kvcache.h.
 */
#ifndef ENTROKV_KVCACHE_INT_H
#define ENTROKV_KVCACHE_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"
#include "entrokv/kvrecall_tier.h"

/* A pool's pins: made and reaped on the pool's thread, released on any. */
typedef struct kv_pin_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* a pin was released (kv_pool_wait_released, kv_pool_destroy) */
    kv_pin *released;      /* released, blocks not yet given back (kv_pool_reap) */
    int64_t n_pins;        /* made and not yet reaped */
    void (*hook)(void *);  /* kv_pool_set_release_hook */
    void *hook_arg;
} kv_pin_state;

/* A pool, a sequence and one (layer, KV head)'s block table: kvcache.c owns
 * them; kvpromote.c (a sequence's recall store) reads and rewrites them. */
struct kv_pool {
    int32_t block_tokens;
    int32_t head_dim;
    int64_t n_blocks;
    size_t block_bytes;
    uint8_t *mem;
    int32_t *free_ids; /* stack */
    int64_t n_free;
    int32_t *refs;     /* per block: heads holding it (0: free) */
    int64_t n_shared;  /* blocks with refs > 1 */
    uint64_t n_cow;    /* copies made by copy-on-write */
    kv_evict_fn evict;
    void *evict_ctx;
    kv_pin_state pins; /* kvpin.c */
    bool pins_ok;      /* pins initialised */
    kv_recall_tier *recall_tier; /* NULL, or where its sequences' recall stores attach */
};

typedef struct kv_head {
    /* SparK's packed prefix (kv_seq_pack): the head's first packed.n tokens,
     * outside the blocks; n_tokens and the block table cover the rest */
    kern_kv_packed packed;
    uint8_t *p_rows;
    ekv_f16 *p_v;
    int32_t *p_pos;
    float *p_inv_sqrt_c;
    int32_t n_tokens;
    int32_t n_blocks;
    int32_t cap;
    int32_t *ids;
    const ekv_f16 **k;
    const ekv_f16 **v;
    const int32_t **pos;
} kv_head;

struct kv_seq {
    kv_pool *pool;
    int32_t n_layers;
    int32_t n_kv_heads;
    kv_head *heads; /* [layer * n_kv_heads + head] */
    int32_t next_pos; /* one past the largest position ever appended */
    kv_recall *recall; /* NULL, or where kv_seq_keep's dropped tokens go */
};

static inline uint8_t *block_base(const kv_pool *pool, int32_t id)
{
    return pool->mem + (size_t)id * pool->block_bytes;
}

static inline ekv_f16 *block_k(const kv_pool *pool, int32_t id)
{
    return (ekv_f16 *)block_base(pool, id);
}

static inline ekv_f16 *block_v(const kv_pool *pool, int32_t id)
{
    return block_k(pool, id) + (size_t)pool->block_tokens * pool->head_dim;
}

static inline int32_t *block_pos(const kv_pool *pool, int32_t id)
{
    return (int32_t *)(block_v(pool, id) + (size_t)pool->block_tokens * pool->head_dim);
}

static inline kv_head *head_at(const kv_seq *seq, int32_t layer, int32_t head)
{
    return &seq->heads[(size_t)layer * seq->n_kv_heads + head];
}

bool kv_pins_init(kv_pin_state *s);
/* Waits for every pin's release, reaps them and frees the state. */
void kv_pins_fini(kv_pool *pool, kv_pin_state *s);

/* The pool's side, for kvpin.c (the pool's thread only). */
kv_pin_state *kv_pool_pin_state(kv_pool *pool);
uint8_t *kv_pool_block_mem(const kv_pool *pool, int32_t id);
void kv_pool_block_ref(kv_pool *pool, int32_t id);
void kv_pool_block_unref(kv_pool *pool, int32_t id);
/* Appends an unwritten block to (layer, head), which holds whole blocks and
 * no packed prefix, counted as block_tokens tokens at the next positions;
 * its id, or -1 (pool empty, no memory, a ragged head). */
int32_t kv_seq_take_block(kv_seq *seq, int32_t layer, int32_t head);
/* The id of block b of (layer, head) if the head holds it whole and has no
 * packed (SparK) prefix; else -1. */
int32_t kv_seq_whole_block(const kv_seq *seq, int32_t layer, int32_t head, int32_t b);

/* Copy-on-write: gives h its own copy of its block b when others hold it
 * too (the caller checked that the pool has a free block). */
void kv_block_own(kv_pool *pool, kv_head *h, int32_t b);

#endif
