/*
 * kvpin.c - blocks held by reference for a copy on another thread (see
 * kv_seq_pin in kvcache.h).
 *
 * A pin takes one more reference on each block it holds, exactly as a fork
 * does, so copy-on-write keeps every writer off those blocks and the
 * sequence may go on (append, keep, free) while another thread reads them.
 * The pool's reference counts and free stack belong to the pool's thread,
 * so a release from another thread only queues the pin; the pool's thread
 * drops the references in kv_pool_reap. A block thus goes back to the pool
 * only after both the sequence and the pending copy have let it go.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "kvcache_int.h"

struct kv_pin {
    kv_pool *pool;
    bool writable; /* kv_seq_reserve's: the holder fills the blocks */
    int32_t n_layers, n_kv_heads, n_blocks;
    int32_t *ids; /* [layer][head][block] */
    kv_pin *next; /* on the pool's released list */
};

bool kv_pins_init(kv_pin_state *s)
{
    *s = (kv_pin_state){0};
    if (pthread_mutex_init(&s->mu, NULL))
        return false;
    if (pthread_cond_init(&s->cv, NULL)) {
        pthread_mutex_destroy(&s->mu);
        return false;
    }
    return true;
}

kv_pin *kv_seq_pin(const kv_seq *seq, int32_t first_block, int32_t n_blocks, ekv_error *err)
{
    const int32_t L = kv_seq_n_layers(seq), H = kv_seq_n_kv_heads(seq);
    if (first_block < 0 || n_blocks <= 0) {
        ekv_error_set(err, EKV_EINVAL, "kv pin: blocks [%d, +%d)", first_block, n_blocks);
        return NULL;
    }
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < H; h++)
            if (kv_seq_whole_block(seq, l, h, first_block + n_blocks - 1) < 0) {
                ekv_error_set(err, EKV_EINVAL, "kv pin: head %d/%d lacks whole block %d", l, h,
                              first_block + n_blocks - 1);
                return NULL;
            }
    kv_pin *pin = calloc(1, sizeof *pin);
    int32_t *ids = malloc((size_t)L * H * n_blocks * sizeof *ids);
    if (!pin || !ids) {
        free(pin);
        free(ids);
        ekv_error_set(err, EKV_ENOMEM, "kv pin: out of memory");
        return NULL;
    }
    kv_pool *pool = kv_seq_pool(seq);
    *pin = (kv_pin){.pool = pool, .n_layers = L, .n_kv_heads = H, .n_blocks = n_blocks,
                    .ids = ids};
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < H; h++)
            for (int32_t b = 0; b < n_blocks; b++) {
                const int32_t id = kv_seq_whole_block(seq, l, h, first_block + b);
                ids[((size_t)l * H + h) * n_blocks + b] = id;
                kv_pool_block_ref(pool, id);
            }
    kv_pin_state *s = kv_pool_pin_state(pool);
    pthread_mutex_lock(&s->mu);
    s->n_pins++;
    pthread_mutex_unlock(&s->mu);
    return pin;
}

kv_pin *kv_seq_reserve(kv_seq *seq, int32_t n_blocks, ekv_error *err)
{
    const int32_t L = kv_seq_n_layers(seq), H = kv_seq_n_kv_heads(seq);
    if (n_blocks <= 0 || kv_seq_max_len(seq) != 0) {
        ekv_error_set(err, EKV_EINVAL, "kv reserve: %d blocks into a sequence of %d tokens",
                      n_blocks, kv_seq_max_len(seq));
        return NULL;
    }
    if (kv_pool_free_blocks(kv_seq_pool(seq)) < (int64_t)n_blocks * L * H) {
        ekv_error_set(err, EKV_ENOMEM, "kv reserve: needs %lld blocks, %lld free",
                      (long long)n_blocks * L * H,
                      (long long)kv_pool_free_blocks(kv_seq_pool(seq)));
        return NULL;
    }
    kv_pin *pin = NULL;
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < H; h++)
            for (int32_t b = 0; b < n_blocks; b++)
                if (kv_seq_take_block(seq, l, h) < 0)
                    goto undo;
    if ((pin = kv_seq_pin(seq, 0, n_blocks, err))) {
        pin->writable = true;
        return pin;
    }
undo:
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < H; h++)
            kv_seq_keep(seq, l, h, NULL, 0, NULL);
    ekv_error_set(err, EKV_ENOMEM, "kv reserve: out of memory");
    return NULL;
}

void *kv_pin_block_write(const kv_pin *pin, int32_t layer, int32_t head, int32_t block)
{
    return pin->writable ? (void *)kv_pin_block(pin, layer, head, block) : NULL;
}

int32_t kv_pin_blocks(const kv_pin *pin)
{
    return pin->n_blocks;
}

const void *kv_pin_block(const kv_pin *pin, int32_t layer, int32_t head, int32_t block)
{
    if (layer < 0 || layer >= pin->n_layers || head < 0 || head >= pin->n_kv_heads ||
        block < 0 || block >= pin->n_blocks)
        return NULL;
    return kv_pool_block_mem(
        pin->pool, pin->ids[((size_t)layer * pin->n_kv_heads + head) * pin->n_blocks + block]);
}

void kv_pin_release(kv_pin *pin)
{
    if (!pin)
        return;
    kv_pin_state *s = kv_pool_pin_state(pin->pool);
    pthread_mutex_lock(&s->mu);
    pin->next = s->released;
    s->released = pin;
    pthread_cond_broadcast(&s->cv);
    /* under mu: kv_pool_destroy cannot finish (and its owner go away)
     * before the hook has returned */
    if (s->hook)
        s->hook(s->hook_arg);
    pthread_mutex_unlock(&s->mu);
}

int64_t kv_pool_reap(kv_pool *pool)
{
    kv_pin_state *s = kv_pool_pin_state(pool);
    pthread_mutex_lock(&s->mu);
    kv_pin *list = s->released;
    s->released = NULL;
    pthread_mutex_unlock(&s->mu);
    int64_t n = 0;
    while (list) {
        kv_pin *pin = list;
        list = pin->next;
        const size_t n_ids = (size_t)pin->n_layers * pin->n_kv_heads * pin->n_blocks;
        for (size_t i = 0; i < n_ids; i++)
            kv_pool_block_unref(pool, pin->ids[i]);
        free(pin->ids);
        free(pin);
        n++;
    }
    if (n) {
        pthread_mutex_lock(&s->mu);
        s->n_pins -= n;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    return n;
}

int64_t kv_pool_pins(kv_pool *pool)
{
    kv_pin_state *s = kv_pool_pin_state(pool);
    pthread_mutex_lock(&s->mu);
    const int64_t n = s->n_pins;
    pthread_mutex_unlock(&s->mu);
    return n;
}

bool kv_pool_wait_released(kv_pool *pool, int timeout_ms)
{
    kv_pin_state *s = kv_pool_pin_state(pool);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    while (!s->released && s->n_pins > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    const bool any = s->released != NULL;
    pthread_mutex_unlock(&s->mu);
    return any;
}

void kv_pool_set_release_hook(kv_pool *pool, void (*fn)(void *), void *arg)
{
    kv_pin_state *s = kv_pool_pin_state(pool);
    pthread_mutex_lock(&s->mu);
    s->hook = fn;
    s->hook_arg = arg;
    pthread_mutex_unlock(&s->mu);
}

void kv_pins_fini(kv_pool *pool, kv_pin_state *s)
{
    for (;;) { /* a pin's copy is bounded work on its thread: wait it out */
        kv_pool_reap(pool);
        pthread_mutex_lock(&s->mu);
        const bool idle = s->n_pins == 0;
        if (!idle && !s->released)
            pthread_cond_wait(&s->cv, &s->mu);
        pthread_mutex_unlock(&s->mu);
        if (idle)
            break;
    }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
}
