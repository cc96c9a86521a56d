/*
 * threadpool.h - a fixed set of threads that run one parallel region at a time.
 *
 * The step engine is single-threaded; its kernels fan out through
 * ekv_pool_run, which cuts a region into nth parts and calls fn(ctx, ith,
 * nth) once for every part ith in [0, nth), on whichever threads are running
 * (the caller included), and returns when all parts have finished. nth is a
 * number of parts, not of threads: one thread may run several parts, and
 * parts run concurrently, so per-thread scratch must be indexed by
 * ekv_pool_thread_index(), never by ith. Workers spin briefly between
 * regions (decode issues hundreds of short regions per token), then sleep.
 */
#ifndef ENTROKV_THREADPOOL_H
#define ENTROKV_THREADPOOL_H

#include "entrokv/status.h"

typedef struct ekv_pool ekv_pool;
typedef void (*ekv_task_fn)(void *ctx, int ith, int nth);

/* n_threads <= 0 means one per online core. */
ekv_pool *ekv_pool_create(int n_threads, ekv_error *err);
void ekv_pool_destroy(ekv_pool *pool);
int ekv_pool_size(const ekv_pool *pool);
/* Not reentrant: one region at a time, called from one thread. */
void ekv_pool_run(ekv_pool *pool, ekv_task_fn fn, void *ctx);

/* Inside a region: the running thread's index in [0, ekv_pool_size) (the
 * caller is 0). Outside any pool: 0. */
int ekv_pool_thread_index(void);

/* Splits [0, n) into nth near-equal contiguous parts; part ith is [*lo, *hi). */
void ekv_split_range(long n, int ith, int nth, long *lo, long *hi);

#endif
