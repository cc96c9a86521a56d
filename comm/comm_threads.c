/*
 * comm_threads.c - n ranks as threads of one process.
 *
 * The group is a table of slots, one per rank, plus a generation-counted
 * barrier with a deadline. Every collective is two phases:
 *   1. each rank posts its arguments (operation, size, root, buffers) in its
 *      slot and waits at the barrier;
 *   2. each rank checks that all slots agree, does its share of the data
 *      movement reading the others' buffers directly, and waits at the
 *      barrier again, so no rank returns (and reuses its buffers or slot)
 *      while another still reads them.
 * The allreduce splits the elements as the MPI backend does
 * (comm_chunk_start): rank r sums its chunk over all ranks' buffers in rank
 * order and writes the sum into every rank's buffer. Each element is read and
 * written by one thread only, so the results are bit-identical to the MPI
 * backend's and the same on every rank.
 *
 * A rank that never arrives (a dead or stuck peer) makes the waiting ranks'
 * barrier time out: the group is marked broken and every rank's collective,
 * now and later, returns EKV_EUNAVAILABLE. comm_threads_group_abort does the
 * same at once.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_internal.h"

enum { OP_ALLREDUCE = 1, OP_ALLGATHER, OP_BROADCAST, OP_BARRIER };

typedef struct slot {
    int op, root;
    size_t size;
    const void *send;
    void *recv; /* allreduce, broadcast: the rank's buffer */
} slot;

struct comm_threads_group {
    int n;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    int arrived;
    unsigned long gen;
    int broken;
    unsigned char *opened; /* [n] */
    slot *slots;           /* [n] */
};

comm_threads_group *comm_threads_group_create(int n, ekv_error *err)
{
    if (n < 1 || n > COMM_THREADS_MAX) {
        ekv_error_set(err, EKV_EINVAL, "threads communicator: %d ranks (1..%d)", n,
                      COMM_THREADS_MAX);
        return NULL;
    }
    comm_threads_group *g = calloc(1, sizeof *g);
    if (g) {
        g->opened = calloc((size_t)n, 1);
        g->slots = calloc((size_t)n, sizeof *g->slots);
    }
    if (!g || !g->opened || !g->slots) {
        if (g) {
            free(g->opened);
            free(g->slots);
        }
        free(g);
        ekv_error_set(err, EKV_ENOMEM, "threads communicator: out of memory");
        return NULL;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&g->mu, NULL);
    g->n = n;
    g->refs = 1;
    return g;
}

static void group_unref(comm_threads_group *g)
{
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (!last)
        return;
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g->opened);
    free(g->slots);
    free(g);
}

void comm_threads_group_free(comm_threads_group *g)
{
    if (g)
        group_unref(g);
}

void comm_threads_group_abort(comm_threads_group *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&g->mu);
    g->broken = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* The barrier: returns EKV_OK once all n ranks have arrived in this
 * generation, EKV_EUNAVAILABLE if the group is (or becomes) broken first or
 * timeout_ms passes (which breaks it). */
static ekv_status group_sync(comm_threads_group *g, int rank, int timeout_ms, ekv_error *err)
{
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&g->mu);
    unsigned long gen = g->gen;
    int timed_out = 0;
    if (!g->broken) {
        if (++g->arrived == g->n) {
            g->arrived = 0;
            g->gen++;
            pthread_cond_broadcast(&g->cv);
        }
        while (g->gen == gen && !g->broken) {
            if (pthread_cond_timedwait(&g->cv, &g->mu, &dl) == ETIMEDOUT && g->gen == gen) {
                g->broken = 1;
                timed_out = 1;
                pthread_cond_broadcast(&g->cv);
            }
        }
    }
    int ok = g->gen != gen; /* everyone arrived, even if broken since */
    pthread_mutex_unlock(&g->mu);
    if (ok)
        return EKV_OK;
    if (timed_out)
        return ekv_error_set(err, EKV_EUNAVAILABLE,
                             "threads communicator: rank %d waited %d ms for its peers",
                             rank, timeout_ms);
    return ekv_error_set(err, EKV_EUNAVAILABLE,
                         "threads communicator: the group is broken (a peer failed or aborted)");
}

/* Phase 1 of every collective: post, wait, check agreement. On a mismatch
 * every rank sees the same slots, so all return EINVAL after phase 2. */
static ekv_status phase1(ekv_comm *c, slot s, int *mismatch, ekv_error *err)
{
    comm_threads_group *g = c->impl;
    g->slots[c->rank] = s;
    ekv_status st = group_sync(g, c->rank, c->timeout_ms, err);
    if (st)
        return st;
    *mismatch = 0;
    for (int r = 0; r < g->n; r++)
        if (g->slots[r].op != s.op || g->slots[r].size != s.size || g->slots[r].root != s.root)
            *mismatch = 1;
    return EKV_OK;
}

static ekv_status phase2(ekv_comm *c, int mismatch, const char *what, ekv_error *err)
{
    comm_threads_group *g = c->impl;
    ekv_status st = group_sync(g, c->rank, c->timeout_ms, err);
    if (st)
        return st;
    if (mismatch)
        return ekv_error_set(err, EKV_EINVAL,
                             "threads communicator: %s on rank %d does not match its peers' "
                             "collective (operation, size or root)", what, c->rank);
    return EKV_OK;
}

static ekv_status threads_allreduce(ekv_comm *c, float *buf, size_t n, ekv_error *err)
{
    comm_threads_group *g = c->impl;
    int mismatch;
    ekv_status st = phase1(c, (slot){.op = OP_ALLREDUCE, .size = n, .recv = buf}, &mismatch, err);
    if (st)
        return st;
    if (!mismatch) {
        size_t lo = comm_chunk_start(n, g->n, c->rank), hi = comm_chunk_start(n, g->n, c->rank + 1);
        for (size_t i = lo; i < hi; i++) {
            float s = ((const float *)g->slots[0].recv)[i];
            for (int r = 1; r < g->n; r++)
                s += ((const float *)g->slots[r].recv)[i];
            for (int r = 0; r < g->n; r++)
                ((float *)g->slots[r].recv)[i] = s;
        }
    }
    return phase2(c, mismatch, "allreduce", err);
}

static ekv_status threads_allgather(ekv_comm *c, const void *send, size_t bpr, void *recv,
                                    ekv_error *err)
{
    comm_threads_group *g = c->impl;
    int mismatch;
    ekv_status st = phase1(c, (slot){.op = OP_ALLGATHER, .size = bpr, .send = send, .recv = recv},
                           &mismatch, err);
    if (st)
        return st;
    if (!mismatch)
        for (int r = 0; r < g->n; r++) {
            char *dst = (char *)recv + (size_t)r * bpr;
            if (dst != g->slots[r].send)
                memcpy(dst, g->slots[r].send, bpr);
        }
    return phase2(c, mismatch, "allgather", err);
}

static ekv_status threads_broadcast(ekv_comm *c, void *buf, size_t bytes, int root, ekv_error *err)
{
    comm_threads_group *g = c->impl;
    int mismatch;
    ekv_status st = phase1(c, (slot){.op = OP_BROADCAST, .size = bytes, .root = root, .recv = buf},
                           &mismatch, err);
    if (st)
        return st;
    if (!mismatch && c->rank != root && buf != g->slots[root].recv)
        memcpy(buf, g->slots[root].recv, bytes);
    return phase2(c, mismatch, "broadcast", err);
}

static ekv_status threads_barrier(ekv_comm *c, ekv_error *err)
{
    int mismatch;
    ekv_status st = phase1(c, (slot){.op = OP_BARRIER}, &mismatch, err);
    if (st)
        return st;
    return phase2(c, mismatch, "barrier", err);
}

static void threads_destroy(ekv_comm *c)
{
    group_unref(c->impl);
}

static const comm_ops threads_ops = {
    .name = "threads",
    .allreduce_sum_f32 = threads_allreduce,
    .allgather = threads_allgather,
    .broadcast = threads_broadcast,
    .barrier = threads_barrier,
    .destroy = threads_destroy,
};

ekv_comm *comm_open_thread(comm_threads_group *g, int rank, ekv_error *err)
{
    if (!g) {
        ekv_error_set(err, EKV_EINVAL, "threads communicator: no group");
        return NULL;
    }
    pthread_mutex_lock(&g->mu);
    ekv_status st = EKV_OK;
    if (rank < 0 || rank >= g->n)
        st = ekv_error_set(err, EKV_EINVAL, "threads communicator: rank %d outside 0..%d", rank,
                           g->n - 1);
    else if (g->opened[rank])
        st = ekv_error_set(err, EKV_EINVAL, "threads communicator: rank %d is already open", rank);
    else {
        g->opened[rank] = 1;
        g->refs++;
    }
    pthread_mutex_unlock(&g->mu);
    if (st)
        return NULL;
    ekv_comm *c = comm_alloc(&threads_ops, rank, g->n, g, err);
    if (!c) {
        pthread_mutex_lock(&g->mu);
        g->opened[rank] = 0;
        pthread_mutex_unlock(&g->mu);
        group_unref(g);
    }
    return c;
}
