/*
 * threadpool.c - a fixed pool that runs one parallel region at a time.
 *
 * A region is cut into more parts than there are threads, and every thread
 * that is running - the caller included - claims parts from a shared
 * counter until none are left. So when another process takes a core and a
 * worker is descheduled, the others do its share instead of waiting for it
 * (with a static split, decode on 2 threads beside one busy process ran at
 * less than half the 1-thread speed).
 *
 * The claim counter packs the region's generation with the next part index
 * in one 64-bit word. A worker reads the word, then fn and ctx, then claims
 * with a compare-and-swap on the word it read: if the swap succeeds the
 * region was still open and unfinished between the two, so fn and ctx were
 * that region's. A worker that wakes after its region finished fails the
 * swap and claims nothing. The caller returns when every part is done.
 *
 * Decode issues a few hundred short regions per token, so workers spin for
 * a while before they sleep on a condition variable.
 */
#include "entrokv/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* Spin iterations before a worker sleeps: ~tens of microseconds. */
#define SPIN_LIMIT 20000
/* Parts per thread: enough that a descheduled thread's share is small. */
#define PARTS_PER_THREAD 4

struct ekv_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic uint64_t claim;          /* generation << 32 | next part */
    atomic_int done;                 /* parts finished in the current region */
    atomic_bool stop;
    atomic_int sleepers;
    _Atomic(ekv_task_fn) fn;         /* written before the generation is bumped */
    _Atomic(void *) ctx;
    atomic_int n_parts;              /* of the current region */
};

typedef struct worker_arg {
    ekv_pool *pool;
    int ith;
} worker_arg;

static _Thread_local int thread_index;

int ekv_pool_thread_index(void)
{
    return thread_index;
}

/* Claims and runs parts of the region the word `w` was read in, until it is
 * exhausted or over. */
static void run_parts(ekv_pool *pool, uint64_t w)
{
    for (;;) {
        const uint32_t part = (uint32_t)w;
        const int n_parts = atomic_load_explicit(&pool->n_parts, memory_order_relaxed);
        if ((int)part >= n_parts)
            return;
        ekv_task_fn fn = atomic_load_explicit(&pool->fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&pool->ctx, memory_order_relaxed);
        if (!atomic_compare_exchange_weak_explicit(&pool->claim, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue; /* w now holds the current word, perhaps of a newer region */
        fn(ctx, (int)part, n_parts);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
        w++;
    }
}

static void *worker_main(void *p)
{
    worker_arg *arg = p;
    ekv_pool *pool = arg->pool;
    thread_index = arg->ith;
    free(arg);
    /* regions count from 0 at creation; the caller may publish one before
     * this thread first runs, so do not read the counter here */
    uint32_t seen = 0;
    for (;;) {
        uint64_t w;
        int spins = 0;
        while ((uint32_t)((w = atomic_load_explicit(&pool->claim, memory_order_acquire)) >> 32) ==
                   seen &&
               !atomic_load(&pool->stop)) {
            if (++spins < SPIN_LIMIT) {
                cpu_relax();
                continue;
            }
            /* count this thread as a sleeper, then re-check claim, both
             * seq_cst: ekv_pool_run stores claim, then loads sleepers, so
             * one of the two sides sees the other (see there). The mutex
             * makes the caller's broadcast wait until this thread waits. */
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add_explicit(&pool->sleepers, 1, memory_order_seq_cst);
            while ((uint32_t)(atomic_load_explicit(&pool->claim, memory_order_seq_cst) >> 32) ==
                       seen &&
                   !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cv, &pool->mu);
            atomic_fetch_sub(&pool->sleepers, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop))
            return NULL;
        seen = (uint32_t)(w >> 32);
        run_parts(pool, w);
    }
}

static bool start_worker(ekv_pool *pool, int ith)
{
    worker_arg *arg = malloc(sizeof *arg);
    if (!arg)
        return false;
    arg->pool = pool;
    arg->ith = ith;
    if (pthread_create(&pool->threads[ith], NULL, worker_main, arg) != 0) {
        free(arg);
        return false;
    }
    return true;
}

ekv_pool *ekv_pool_create(int n_threads, ekv_error *err)
{
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    if (n_threads > 1024) {
        ekv_error_set(err, EKV_EINVAL, "thread count %d is too large", n_threads);
        return NULL;
    }
    ekv_pool *pool = calloc(1, sizeof *pool);
    if (!pool) {
        ekv_error_set(err, EKV_ENOMEM, "out of memory creating thread pool");
        return NULL;
    }
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    pool->threads = calloc((size_t)n_threads, sizeof *pool->threads);
    if (!pool->threads) {
        ekv_pool_destroy(pool);
        ekv_error_set(err, EKV_ENOMEM, "out of memory creating thread pool");
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        if (!start_worker(pool, i)) {
            pool->n_threads = i; /* join only the ones that started */
            ekv_pool_destroy(pool);
            ekv_error_set(err, EKV_ENOMEM, "cannot start thread %d of %d", i, n_threads);
            return NULL;
        }
    }
    return pool;
}

void ekv_pool_destroy(ekv_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, true);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    if (pool->threads)
        for (int i = 1; i < pool->n_threads; i++)
            pthread_join(pool->threads[i], NULL);
    pthread_cond_destroy(&pool->cv);
    pthread_mutex_destroy(&pool->mu);
    free(pool->threads);
    free(pool);
}

int ekv_pool_size(const ekv_pool *pool)
{
    return pool ? pool->n_threads : 1;
}

void ekv_pool_run(ekv_pool *pool, ekv_task_fn fn, void *ctx)
{
    if (!pool || pool->n_threads == 1) {
        fn(ctx, 0, 1);
        return;
    }
    const int n_parts = pool->n_threads * PARTS_PER_THREAD;
    atomic_store_explicit(&pool->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&pool->ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&pool->n_parts, n_parts, memory_order_relaxed);
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    /* every part of the last region is claimed, so no worker's swap can
     * succeed on the old word: a plain store publishes the new region */
    const uint64_t w = ((atomic_load(&pool->claim) >> 32) + 1) << 32;
    /* seq_cst, not release: this store and the load of sleepers below pair
     * with a sleeping worker's increment of sleepers and its re-check of
     * claim (worker_main). With release/acquire the store could still sit
     * in this core's store buffer while the load reads sleepers == 0, and
     * the worker read the old claim and sleep through the region (store
     * buffering, the reordering x86 allows). With all four seq_cst, one
     * total order holds them: either this load sees the worker counted, or
     * the worker's re-check sees the new region. */
    atomic_store_explicit(&pool->claim, w, memory_order_seq_cst);
    if (atomic_load_explicit(&pool->sleepers, memory_order_seq_cst) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
    run_parts(pool, w);
    /* only parts already claimed by running workers can be left */
    for (int spins = 0; atomic_load_explicit(&pool->done, memory_order_acquire) < n_parts;)
        if (++spins % 4096 == 0)
            sched_yield();
        else
            cpu_relax();
}

void ekv_split_range(long n, int ith, int nth, long *lo, long *hi)
{
    long base = n / nth, extra = n % nth;
    *lo = ith * base + (ith < extra ? ith : extra);
    *hi = *lo + base + (ith < extra ? 1 : 0);
}
