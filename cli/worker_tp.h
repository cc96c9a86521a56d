/*
 * worker_tp.h - `entrokv worker --tp N` and `mpirun -np N entrokv worker`:
 * the ranks of a tensor-parallel worker group (docs/tp.md, "A worker
 * group"). Rank 0 serves the Worker service with an engine that leads the
 * group (engine_config.tp_comm); ranks 1..N-1 run engine_tp_follow.
 */
#ifndef ENTROKV_CLI_WORKER_TP_H
#define ENTROKV_CLI_WORKER_TP_H

#include <stdbool.h>

#include "entrokv/engine.h"

typedef struct worker_tp worker_tp;

/* Each rank's KV store tier (docs/tp.md, "The KV store tier"). open makes
 * rank `rank` of `size`'s own prefix cache over the shared store (*out
 * NULL: none). own: the calling process's rank (rank 0 as threads, this
 * process's under mpirun): the caller keeps that tier (its metrics, its
 * shutdown) and *handle is ignored; for another rank (a follower thread)
 * close(arg, *handle) runs once that rank has stopped. */
typedef struct worker_tp_tier {
    ekv_status (*open)(void *arg, int rank, int size, bool own, const engine_prefix_cache **out,
                       void **handle, ekv_error *err);
    void (*close)(void *arg, void *handle);
    void *arg;
} worker_tp_tier;

/* Whether this worker is one rank of a group: tp > 1, or started by
 * mpirun (OpenMPI's or PMIx's rank variables). */
bool worker_tp_wanted(int tp);

/* Sets the group up. Ranks as threads (tp > 1, not under mpirun): starts
 * ranks 1..tp-1 following, sets ec->tp_comm to rank 0's communicator and
 * splits ec->n_threads among the ranks. Under mpirun (one rank per process;
 * tp, if > 1, must equal the world size): on rank 0 sets ec->tp_comm; on
 * the other ranks follows rank 0 until its engine ends and sets *follower
 * (the caller then exits with the returned status, serving nothing).
 * timeout_ms bounds every collective (comm.h); the heartbeat is set to a
 * quarter of it. tier (NULL: none) gives every rank its own prefix cache:
 * ec->prefix_cache becomes the caller's rank's. */
ekv_status worker_tp_start(int tp, int timeout_ms, const ekv_model *m, engine_config *ec,
                           const kvc_profile *profile, const worker_tp_tier *tier,
                           worker_tp **out, bool *follower, ekv_error *err);
/* Rank 0's engine could not start: the followers stop waiting for its
 * plans (ranks as threads; under mpirun they time out). */
void worker_tp_abort(worker_tp *w);
/* After the engine is destroyed (its end released the followers): joins
 * the follower threads (reporting their errors) and frees the group. */
void worker_tp_stop(worker_tp *w);

#endif
