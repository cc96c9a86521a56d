/*
 * worker_tp.c - the ranks of a tensor-parallel worker group (worker_tp.h).
 */
#include "worker_tp.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "entrokv/comm.h"
#include "entrokv/coordinator.h"

typedef struct tp_thread {
    pthread_t th;
    bool started;
    int rank;
    worker_tp *w;
    engine_config ec; /* the group's, with this rank's own prefix cache */
    void *tier;       /* its tier's handle (worker_tp_tier.close) */
    ekv_status rc;
    ekv_error err;
} tp_thread;

struct worker_tp {
    comm_threads_group *group; /* ranks as threads; NULL under mpirun */
    ekv_comm *comm;            /* rank 0's (or, under mpirun, this process's) */
    const ekv_model *m;
    engine_config ec;          /* what the followers run with */
    const kvc_profile *profile;
    worker_tp_tier tier;       /* zero: none */
    int n;
    tp_thread *th;
};

static bool under_mpirun(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK");
}

bool worker_tp_wanted(int tp)
{
    return tp > 1 || under_mpirun();
}

static void *follow_thread(void *arg)
{
    tp_thread *t = arg;
    worker_tp *w = t->w;
    ekv_comm *c = comm_open_thread(w->group, t->rank, &t->err);
    if (c) {
        comm_set_timeout_ms(c, t->ec.tp_heartbeat_ms * 4);
        t->rc = engine_tp_follow(w->m, &t->ec, c, w->profile, &t->err);
    } else {
        t->rc = t->err.code ? t->err.code : EKV_ENOMEM;
    }
    if (t->rc) {
        coord_log("worker: tensor-parallel rank %d stopped: %s", t->rank, t->err.msg);
        comm_threads_group_abort(w->group); /* rank 0 must not wait on this rank */
    }
    comm_free(c);
    return NULL;
}

/* rank's own prefix cache (own: the caller's rank) into *pc. */
static ekv_status open_tier(worker_tp *w, int rank, bool own, const engine_prefix_cache **pc,
                            void **handle, ekv_error *err)
{
    *pc = NULL;
    *handle = NULL;
    if (!w->tier.open)
        return EKV_OK;
    ekv_status rc = w->tier.open(w->tier.arg, rank, w->n, own, pc, handle, err);
    if (rc == EKV_OK && *pc)
        coord_log("worker: tensor-parallel rank %d of %d: its own KV store tier (its heads)",
                  rank, w->n);
    return rc;
}

ekv_status worker_tp_start(int tp, int timeout_ms, const ekv_model *m, engine_config *ec,
                           const kvc_profile *profile, const worker_tp_tier *tier,
                           worker_tp **out, bool *follower, ekv_error *err)
{
    *out = NULL;
    *follower = false;
    if (timeout_ms <= 0)
        timeout_ms = COMM_DEFAULT_TIMEOUT_MS;
    worker_tp *w = calloc(1, sizeof *w);
    if (!w)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    w->m = m;
    w->profile = profile;
    if (tier)
        w->tier = *tier;
    void *own = NULL;
    ec->tp_heartbeat_ms = timeout_ms / 4 > 0 ? timeout_ms / 4 : 1;
    ekv_status rc = EKV_OK;
    if (under_mpirun()) {
        if (!(w->comm = comm_open_mpi(timeout_ms, err))) {
            rc = err->code ? err->code : EKV_EUNSUPPORTED;
            goto fail;
        }
        w->n = comm_size(w->comm);
        if (tp > 1 && tp != w->n) {
            rc = ekv_error_set(err, EKV_EINVAL, "--tp %d but mpirun started %d ranks", tp, w->n);
            goto fail;
        }
        ec->tp_comm = w->comm;
        if ((rc = open_tier(w, comm_rank(w->comm), true, &ec->prefix_cache, &own, err)))
            goto fail;
        if (comm_rank(w->comm) != 0) {
            *follower = true;
            coord_log("worker: tensor-parallel rank %d of %d (mpi, pid %ld) following rank 0",
                      comm_rank(w->comm), w->n, (long)getpid());
            rc = engine_tp_follow(m, ec, w->comm, profile, err);
            goto fail; /* done either way: the process serves nothing */
        }
        coord_log("worker: tensor-parallel rank 0 of %d (mpi), timeout %d ms", w->n, timeout_ms);
        *out = w;
        return EKV_OK;
    }
    w->n = tp;
    const long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const int threads = (ec->n_threads > 0 ? ec->n_threads : (cores > 0 ? (int)cores : 1)) / tp;
    ec->n_threads = threads > 0 ? threads : 1; /* the cores are shared by the ranks */
    if (!(w->group = comm_threads_group_create(tp, err)) ||
        !(w->comm = comm_open_thread(w->group, 0, err))) {
        rc = err->code ? err->code : EKV_ENOMEM;
        goto fail;
    }
    comm_set_timeout_ms(w->comm, timeout_ms);
    ec->tp_comm = w->comm;
    if ((rc = open_tier(w, 0, true, &ec->prefix_cache, &own, err)))
        goto fail;
    w->ec = *ec;
    if (!(w->th = calloc((size_t)tp, sizeof *w->th))) {
        rc = ekv_error_set(err, EKV_ENOMEM, "out of memory");
        goto fail;
    }
    for (int r = 1; r < tp; r++) {
        w->th[r] = (tp_thread){.rank = r, .w = w, .ec = w->ec};
        if ((rc = open_tier(w, r, false, &w->th[r].ec.prefix_cache, &w->th[r].tier, err)))
            goto fail;
        if (pthread_create(&w->th[r].th, NULL, follow_thread, &w->th[r])) {
            rc = ekv_error_set(err, EKV_EIO, "cannot start tensor-parallel rank %d", r);
            goto fail;
        }
        w->th[r].started = true;
    }
    coord_log("worker: tensor-parallel group of %d ranks (threads), %d threads each, timeout %d ms",
              tp, ec->n_threads, timeout_ms);
    *out = w;
    return EKV_OK;
fail:
    ec->tp_comm = NULL;
    if (w->group)
        comm_threads_group_abort(w->group); /* started followers stop waiting */
    worker_tp_stop(w);
    return rc;
}

void worker_tp_abort(worker_tp *w)
{
    if (w && w->group)
        comm_threads_group_abort(w->group);
}

void worker_tp_stop(worker_tp *w)
{
    if (!w)
        return;
    for (int r = 1; w->th && r < w->n; r++) {
        if (w->th[r].started)
            pthread_join(w->th[r].th, NULL);
        if (w->th[r].tier && w->tier.close) /* its rank has stopped */
            w->tier.close(w->tier.arg, w->th[r].tier);
    }
    free(w->th);
    comm_free(w->comm);
    comm_threads_group_free(w->group);
    free(w);
}
