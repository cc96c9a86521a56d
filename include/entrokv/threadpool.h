/*
 * threadpool.h - a fixed set of threads that run one parallel region at a time.
 *
 * The step engine is single-threaded; its kernels fan out through
 * ekv_pool_run, which runs fn(ctx, ith, nth) on every thread (the caller is
 * thread 0) and returns when all have finished. Workers spin briefly between
 * regions (decode issues hundreds of short regions per token) and then sleep.
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

/* Splits [0, n) into nth near-equal contiguous parts; part ith is [*lo, *hi). */
void ekv_split_range(long n, int ith, int nth, long *lo, long *hi);

#endif
