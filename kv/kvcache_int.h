/*
 * kvcache_int.h - what the pool (kvcache.c) shares with its pins (kvpin.c).
 * Not a public header: the API is kvcache.h.
 */
#ifndef ENTROKV_KVCACHE_INT_H
#define ENTROKV_KVCACHE_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "entrokv/kvcache.h"

/* A pool's pins: made and reaped on the pool's thread, released on any. */
typedef struct kv_pin_state {
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* a pin was released (kv_pool_wait_released, kv_pool_destroy) */
    kv_pin *released;      /* released, blocks not yet given back (kv_pool_reap) */
    int64_t n_pins;        /* made and not yet reaped */
    void (*hook)(void *);  /* kv_pool_set_release_hook */
    void *hook_arg;
} kv_pin_state;

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

#endif
