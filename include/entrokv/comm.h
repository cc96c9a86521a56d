/*
 * comm.h - the tensor-parallel communicator: the collectives a group of
 * ranks needs to run one forward pass sharded over heads and MLP slices
 * (docs/tp.md).
 *
 * Backends (each returns an ekv_comm; the collectives below work the same
 * on all of them):
 *   comm_open_local    one rank; every collective is a copy or a no-op.
 *   comm_open_thread   n ranks as threads of one process, sharing a
 *                      comm_threads_group: deterministic, runs under
 *                      ASan and TSan, what the TP unit tests use.
 *   comm_open_mpi      one rank per process under mpirun (OpenMPI); EKV_EUNSUPPORTED
 *                      in a build without MPI.
 *   comm_open_nccl     NCCL over GPU buffers, bootstrapped through an MPI
 *                      communicator; NCCL is loaded at run time.
 *
 * Contract, for every backend:
 *  - Collective: every rank of the group calls the same collective with the
 *    same sizes (and root), in the same order. A mismatch is the caller's bug;
 *    backends detect what they can (sizes are checked by the threads
 *    backend) and return EKV_EINVAL.
 *  - Deterministic sums: comm_allreduce_sum_f32 computes, for each element,
 *    ((x_0 + x_1) + x_2) + ... + x_{n-1} in rank order, in float, with no
 *    fused multiply-add, on every backend. So every rank gets bit-identical
 *    results, the threads and MPI backends agree bit for bit, and a result
 *    does not depend on the network's message order. (The NCCL backend sums
 *    in NCCL's ring order instead: identical on every rank, not in rank order.)
 *  - Failure is a value: a peer that dies or stops answering makes the
 *    collective return EKV_EUNAVAILABLE within the communicator's timeout
 *    (comm_set_timeout_ms; never a hang). After that the communicator is
 *    broken: every later collective fails at once with EKV_EUNAVAILABLE.
 *    The caller's buffers are then unspecified.
 *  - One thread per ekv_comm: a rank's collectives are called from one
 *    thread at a time (as the step engine does).
 *
 * Ownership: comm_free releases the handle (an MPI communicator also
 * finalizes MPI when it initialized it). Buffers always belong to the caller.
 */
#ifndef ENTROKV_COMM_H
#define ENTROKV_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

typedef struct ekv_comm ekv_comm;
typedef struct comm_threads_group comm_threads_group;

/* The timeout a collective waits for its peers, unless set: 30 s. */
#define COMM_DEFAULT_TIMEOUT_MS 30000

/* ---- backends ---- */

/* One rank (size 1): the collectives copy or do nothing. Never fails but on
 * allocation. */
ekv_comm *comm_open_local(ekv_error *err);

/* n ranks (1..COMM_THREADS_MAX) as threads of this process. The group is
 * reference-counted: comm_threads_group_create returns it holding one
 * reference (the caller's), each comm_open_thread takes one, and
 * comm_threads_group_free / comm_free drop theirs; the last frees it. */
#define COMM_THREADS_MAX 64
comm_threads_group *comm_threads_group_create(int n, ekv_error *err);
void comm_threads_group_free(comm_threads_group *g);
/* Rank `rank` of g; each rank is opened once, by the thread that will use it. */
ekv_comm *comm_open_thread(comm_threads_group *g, int rank, ekv_error *err);
/* Marks the group broken, as a dead peer would: every rank's current and
 * later collectives return EKV_EUNAVAILABLE. For tests and for a rank that
 * fails outside the communicator and must not leave its peers waiting. */
void comm_threads_group_abort(comm_threads_group *g);

/* The MPI_COMM_WORLD of this process (mpirun -np N), initializing MPI
 * (MPI_THREAD_FUNNELED) unless the caller already has. timeout_ms bounds
 * every collective (0: COMM_DEFAULT_TIMEOUT_MS). EKV_EUNSUPPORTED in a build
 * without MPI. */
ekv_comm *comm_open_mpi(int timeout_ms, ekv_error *err);

/* NCCL over the GPU `device` (NCCL and the CUDA runtime loaded at run time;
 * not yet run on a device), its unique id broadcast through the MPI
 * communicator `boot` (which must outlive the NCCL one). Buffers passed to
 * its collectives are device pointers. EKV_EUNSUPPORTED where libnccl.so.2 or
 * the CUDA runtime cannot be loaded, EKV_EUNAVAILABLE where no device answers.
 * Opening is collective over boot; a peer that never joins blocks
 * ncclCommInitRank (not bounded by the timeout). */
ekv_comm *comm_open_nccl(ekv_comm *boot, int device, ekv_error *err);

/* ---- the collectives ---- */

int comm_rank(const ekv_comm *c);
int comm_size(const ekv_comm *c);
/* "local", "threads", "mpi", "nccl" */
const char *comm_backend_name(const ekv_comm *c);

/* buf[i] = sum over ranks r (in rank order) of rank r's buf[i], in place. */
ekv_status comm_allreduce_sum_f32(ekv_comm *c, float *buf, size_t n, ekv_error *err);

/* recv (size * bytes_per_rank bytes) = rank 0's send, rank 1's send, ...
 * send may not overlap recv except at exactly recv + rank * bytes_per_rank. */
ekv_status comm_allgather(ekv_comm *c, const void *send, size_t bytes_per_rank,
                          void *recv, ekv_error *err);

/* Every rank's buf (bytes) becomes root's. */
ekv_status comm_broadcast(ekv_comm *c, void *buf, size_t bytes, int root, ekv_error *err);

/* Returns when every rank has entered it. */
ekv_status comm_barrier(ekv_comm *c, ekv_error *err);

/* Bytes this rank has put on the wire (or, for the threads backend, would
 * have put on it under the MPI backend's algorithms) since it was opened:
 * what `entrokv bench tp` reports per token. Local: 0. */
uint64_t comm_bytes_sent(const ekv_comm *c);
/* Collectives completed by this rank since it was opened. */
uint64_t comm_calls(const ekv_comm *c);

/* Changes the bound on how long a collective waits for its peers (ms, > 0). */
void comm_set_timeout_ms(ekv_comm *c, int timeout_ms);

/* Whether a collective has failed (the communicator is then unusable). */
int comm_broken(const ekv_comm *c);

void comm_free(ekv_comm *c);

#endif
