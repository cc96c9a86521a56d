/*
 * comm_mpi.c - one rank per process over MPI (OpenMPI under mpirun).
 *
 * The collectives are MPI's non-blocking ones on a private duplicate of
 * MPI_COMM_WORLD with MPI_ERRORS_RETURN, completed by polling MPI_Test
 * against a deadline: a peer that died (or stopped, SIGSTOP) never
 * completes its part, and the poll returns EKV_EUNAVAILABLE after the
 * communicator's timeout instead of blocking forever. A collective that
 * timed out cannot be cancelled in MPI, so the communicator is broken from
 * then on; comm_free then leaves MPI unfinalized (MPI_Finalize would wait
 * for the dead peer) and the process is expected to exit.
 *
 * The allreduce does not use MPI_Allreduce, whose summation order depends
 * on the algorithm OpenMPI picks at run time: it is a reduce-scatter by
 * MPI_Ialltoallv over comm_chunk_start's partition, each rank summing its
 * chunk in rank order ((x_0 + x_1) + x_2 ...), then an MPI_Iallgatherv of
 * the summed chunks. Every rank gets the same bits, equal to the threads
 * backend's, with the traffic of a ring allreduce.
 *
 * Built only where OpenMPI's headers were found (cmake/comm.cmake defines
 * EKV_HAVE_MPI); elsewhere comm_open_mpi says so.
 */
#include "comm_internal.h"

#ifndef EKV_HAVE_MPI

ekv_comm *comm_open_mpi(int timeout_ms, ekv_error *err)
{
    (void)timeout_ms;
    ekv_error_set(err, EKV_EUNSUPPORTED,
                  "MPI communicator: this build has no MPI (install libopenmpi-dev and rebuild)");
    return NULL;
}

#else

#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct mpi_impl {
    MPI_Comm comm;
    int we_initialized;
    float *scratch; /* the allreduce's received chunks: size * max chunk */
    size_t scratch_n;
    int *counts, *displs, *rcounts, *rdispls; /* [size] each, in elements */
} mpi_impl;

static ekv_status mpi_fail(int rc, const char *what, ekv_error *err)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        snprintf(msg, sizeof msg, "MPI error %d", rc);
    /* an MPI error during a collective means a peer or the transport failed */
    return ekv_error_set(err, EKV_EUNAVAILABLE, "MPI %s: %s", what, msg);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Polls req until it completes, fails, or the timeout passes. Spins first
 * (a decode step's allreduce completes in microseconds), then yields the
 * core: with more ranks than cores (mpirun --oversubscribe) a spinning
 * rank would hold the core its peer needs to make progress. */
static ekv_status mpi_wait(ekv_comm *c, MPI_Request *req, const char *what, ekv_error *err)
{
    double deadline = now_ms() + c->timeout_ms;
    for (long spins = 0;; spins++) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_fail(rc, what, err);
        if (done)
            return EKV_OK;
        if (spins >= 200) {
            if ((spins & 63) == 0 && now_ms() > deadline)
                return ekv_error_set(err, EKV_EUNAVAILABLE,
                                     "MPI %s: rank %d waited %d ms for its peers (a peer died "
                                     "or stopped)", what, c->rank, c->timeout_ms);
            if (spins < 20000) {
                sched_yield();
            } else {
                struct timespec ts = {0, 50000}; /* 50 us */
                nanosleep(&ts, NULL);
            }
        }
    }
}

static ekv_status mpi_allreduce(ekv_comm *c, float *buf, size_t n, ekv_error *err)
{
    mpi_impl *m = c->impl;
    int p = c->size, me = c->rank;
    size_t maxlen = comm_chunk_start(n, p, 1); /* chunk 0 is a longest one */
    if (n > (size_t)INT32_MAX)
        return ekv_error_set(err, EKV_ERANGE, "MPI allreduce: %zu floats (at most %d)", n,
                             INT32_MAX);
    if (m->scratch_n < maxlen * (size_t)p) {
        float *s = realloc(m->scratch, maxlen * (size_t)p * sizeof *s);
        if (!s)
            return ekv_error_set(err, EKV_ENOMEM, "MPI allreduce: out of memory");
        m->scratch = s;
        m->scratch_n = maxlen * (size_t)p;
    }
    size_t lo = comm_chunk_start(n, p, me), len = comm_chunk_start(n, p, me + 1) - lo;
    /* reduce-scatter: chunk r of every rank's buffer goes to rank r; rank
     * me receives its chunk from every rank into scratch, in rank order */
    for (int r = 0; r < p; r++) {
        m->counts[r] = (int)(comm_chunk_start(n, p, r + 1) - comm_chunk_start(n, p, r));
        m->displs[r] = (int)comm_chunk_start(n, p, r);
        m->rcounts[r] = (int)len;
        m->rdispls[r] = (int)((size_t)r * len);
    }
    MPI_Request req;
    int rc = MPI_Ialltoallv(buf, m->counts, m->displs, MPI_FLOAT, m->scratch, m->rcounts,
                            m->rdispls, MPI_FLOAT, m->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "allreduce", err);
    ekv_status st = mpi_wait(c, &req, "allreduce", err);
    if (st)
        return st;
    for (size_t i = 0; i < len; i++) {
        float s = m->scratch[i];
        for (int r = 1; r < p; r++)
            s += m->scratch[(size_t)r * len + i];
        buf[lo + i] = s;
    }
    rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, m->counts, m->displs,
                         MPI_FLOAT, m->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "allreduce", err);
    return mpi_wait(c, &req, "allreduce", err);
}

static ekv_status mpi_allgather(ekv_comm *c, const void *send, size_t bpr, void *recv,
                                ekv_error *err)
{
    mpi_impl *m = c->impl;
    if (bpr > (size_t)INT32_MAX)
        return ekv_error_set(err, EKV_ERANGE, "MPI allgather: %zu bytes per rank (at most %d)",
                             bpr, INT32_MAX);
    const void *s = send == (char *)recv + (size_t)c->rank * bpr ? MPI_IN_PLACE : send;
    MPI_Request req;
    int rc = MPI_Iallgather(s, (int)bpr, MPI_BYTE, recv, (int)bpr, MPI_BYTE, m->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "allgather", err);
    return mpi_wait(c, &req, "allgather", err);
}

static ekv_status mpi_broadcast(ekv_comm *c, void *buf, size_t bytes, int root, ekv_error *err)
{
    mpi_impl *m = c->impl;
    if (bytes > (size_t)INT32_MAX)
        return ekv_error_set(err, EKV_ERANGE, "MPI broadcast: %zu bytes (at most %d)", bytes,
                             INT32_MAX);
    MPI_Request req;
    int rc = MPI_Ibcast(buf, (int)bytes, MPI_BYTE, root, m->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "broadcast", err);
    return mpi_wait(c, &req, "broadcast", err);
}

static ekv_status mpi_barrier(ekv_comm *c, ekv_error *err)
{
    mpi_impl *m = c->impl;
    MPI_Request req;
    int rc = MPI_Ibarrier(m->comm, &req);
    if (rc != MPI_SUCCESS)
        return mpi_fail(rc, "barrier", err);
    return mpi_wait(c, &req, "barrier", err);
}

static void mpi_destroy(ekv_comm *c)
{
    mpi_impl *m = c->impl;
    if (!c->broken) {
        /* a broken communicator has a collective in flight that can never
         * complete: freeing or finalizing would wait on the dead peer */
        MPI_Comm_free(&m->comm);
        int fin = 0;
        MPI_Finalized(&fin);
        if (m->we_initialized && !fin)
            MPI_Finalize();
    }
    free(m->scratch);
    free(m->counts);
    free(m->displs);
    free(m->rcounts);
    free(m->rdispls);
    free(m);
}

static const comm_ops mpi_ops = {
    .name = "mpi",
    .allreduce_sum_f32 = mpi_allreduce,
    .allgather = mpi_allgather,
    .broadcast = mpi_broadcast,
    .barrier = mpi_barrier,
    .destroy = mpi_destroy,
};

ekv_comm *comm_open_mpi(int timeout_ms, ekv_error *err)
{
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (fin) {
        ekv_error_set(err, EKV_EINVAL, "MPI communicator: MPI was already finalized");
        return NULL;
    }
    mpi_impl *m = calloc(1, sizeof *m);
    if (!m) {
        ekv_error_set(err, EKV_ENOMEM, "MPI communicator: out of memory");
        return NULL;
    }
    if (!inited) {
        int provided = 0;
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) {
            free(m);
            mpi_fail(rc, "init", err);
            ekv_error_wrap(err, "MPI communicator");
            return NULL;
        }
        m->we_initialized = 1;
    }
    /* MPI_COMM_WORLD's handler too: an error outside our calls (a peer's
     * connection dropping during progress) must not abort the process */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rank = 0, size = 1;
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &m->comm);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_rank(m->comm, &rank);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_size(m->comm, &size);
    if (rc != MPI_SUCCESS) {
        mpi_fail(rc, "communicator setup", err);
        free(m);
        return NULL;
    }
    m->counts = calloc((size_t)size, sizeof(int));
    m->displs = calloc((size_t)size, sizeof(int));
    m->rcounts = calloc((size_t)size, sizeof(int));
    m->rdispls = calloc((size_t)size, sizeof(int));
    ekv_comm *c = NULL;
    if (m->counts && m->displs && m->rcounts && m->rdispls)
        c = comm_alloc(&mpi_ops, rank, size, m, err);
    else
        ekv_error_set(err, EKV_ENOMEM, "MPI communicator: out of memory");
    if (!c) {
        mpi_destroy(&(ekv_comm){.impl = m});
        return NULL;
    }
    comm_set_timeout_ms(c, timeout_ms > 0 ? timeout_ms : COMM_DEFAULT_TIMEOUT_MS);
    return c;
}

#endif
