/*
 * threadpool.c - a fixed pool that runs one parallel region at a time.
 *
 * Decode issues a few hundred short regions per token, so the hand-off must
 * cost microseconds: the caller publishes a region by bumping an atomic
 * generation counter, workers spin on it for a while before falling back to
 * a condition variable, and completion is an atomic countdown the caller
 * spins on. The caller runs part 0 itself.
 */
#include "entrokv/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
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

struct ekv_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint generation;  /* bumped once per region */
    atomic_int pending;      /* workers still running the current region */
    atomic_bool stop;
    atomic_int sleepers;
    ekv_task_fn fn;          /* written before generation is bumped */
    void *ctx;
};

typedef struct worker_arg {
    ekv_pool *pool;
    int ith;
} worker_arg;

static void *worker_main(void *p)
{
    worker_arg *arg = p;
    ekv_pool *pool = arg->pool;
    int ith = arg->ith;
    free(arg);
    /* regions count from 0 at creation; the caller may publish one before
     * this thread first runs, so do not read the counter here */
    unsigned seen = 0;
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen &&
               !atomic_load(&pool->stop)) {
            if (++spins < SPIN_LIMIT) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool->mu);
            atomic_fetch_add(&pool->sleepers, 1);
            while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cv, &pool->mu);
            atomic_fetch_sub(&pool->sleepers, 1);
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop))
            return NULL;
        seen = gen;
        pool->fn(pool->ctx, ith, pool->n_threads);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
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
    if (!pool->threads)
        goto fail;
    for (int i = 1; i < n_threads; i++) {
        if (!start_worker(pool, i)) {
            pool->n_threads = i; /* join only the ones that started */
            ekv_pool_destroy(pool);
            ekv_error_set(err, EKV_ENOMEM, "cannot start thread %d of %d", i, n_threads);
            return NULL;
        }
    }
    return pool;
fail:
    ekv_pool_destroy(pool);
    ekv_error_set(err, EKV_ENOMEM, "out of memory creating thread pool");
    return NULL;
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
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store(&pool->pending, pool->n_threads - 1);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
    fn(ctx, 0, pool->n_threads);
    /* yield now and then: with more runnable threads than cores, the
     * workers we wait for may need this core */
    for (int spins = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0;)
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
