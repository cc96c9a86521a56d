/*
 * comm.c - the communicator's public entry points and the local backend.
 *
 * Every collective goes through here: the arguments are checked once for
 * all backends (a hostile or buggy caller gets EKV_EINVAL, not a crash), a
 * broken communicator refuses at once, and the byte counters follow one
 * model for every backend (comm.h): the allreduce is a reduce-scatter plus
 * an allgather over comm_chunk_start's partition, so rank r sends
 * 4 * ((n - len_r) + (p - 1) * len_r) bytes, 2 (p-1)/p * 4n for even chunks,
 * which is also what a ring allreduce (NCCL) sends; an allgather sends its
 * part to each of the p - 1 others; a broadcast's root sends the buffer
 * to each of the p - 1 others.
 */
#include <stdlib.h>
#include <string.h>

#include "comm_internal.h"

ekv_comm *comm_alloc(const comm_ops *ops, int rank, int size, void *impl, ekv_error *err)
{
    ekv_comm *c = calloc(1, sizeof *c);
    if (!c) {
        ekv_error_set(err, EKV_ENOMEM, "communicator: out of memory");
        return NULL;
    }
    c->ops = ops;
    c->rank = rank;
    c->size = size;
    c->impl = impl;
    c->timeout_ms = COMM_DEFAULT_TIMEOUT_MS;
    return c;
}

int comm_rank(const ekv_comm *c) { return c ? c->rank : 0; }
int comm_size(const ekv_comm *c) { return c ? c->size : 1; }
const char *comm_backend_name(const ekv_comm *c) { return c ? c->ops->name : "none"; }
uint64_t comm_bytes_sent(const ekv_comm *c) { return c ? c->bytes_sent : 0; }
uint64_t comm_calls(const ekv_comm *c) { return c ? c->calls : 0; }
int comm_broken(const ekv_comm *c) { return c ? c->broken : 1; }

void comm_set_timeout_ms(ekv_comm *c, int timeout_ms)
{
    if (c && timeout_ms > 0)
        c->timeout_ms = timeout_ms;
}

void comm_free(ekv_comm *c)
{
    if (!c)
        return;
    if (c->ops->destroy)
        c->ops->destroy(c);
    free(c);
}

/* Common entry: NULL communicator or a broken one. */
static ekv_status comm_enter(ekv_comm *c, const char *what, ekv_error *err)
{
    if (!c)
        return ekv_error_set(err, EKV_EINVAL, "%s: no communicator", what);
    if (c->broken)
        return ekv_error_set(err, EKV_EUNAVAILABLE,
                             "%s: communicator (%s, rank %d of %d) is broken by an earlier failure",
                             what, c->ops->name, c->rank, c->size);
    return EKV_OK;
}

/* Common exit: count a success, remember a peer failure. */
static ekv_status comm_leave(ekv_comm *c, ekv_status st, uint64_t bytes)
{
    if (st == EKV_OK) {
        c->calls++;
        c->bytes_sent += bytes;
    } else if (st == EKV_EUNAVAILABLE) {
        c->broken = 1;
    }
    return st;
}

ekv_status comm_allreduce_sum_f32(ekv_comm *c, float *buf, size_t n, ekv_error *err)
{
    ekv_status st = comm_enter(c, "allreduce", err);
    if (st)
        return st;
    if (n > SIZE_MAX / sizeof(float))
        return ekv_error_set(err, EKV_ERANGE, "allreduce: %zu floats overflow", n);
    if (n && !buf)
        return ekv_error_set(err, EKV_EINVAL, "allreduce: NULL buffer");
    if (n == 0 || c->size == 1) /* every rank has the same n: nobody waits */
        return comm_leave(c, EKV_OK, 0);
    size_t len = comm_chunk_start(n, c->size, c->rank + 1) - comm_chunk_start(n, c->size, c->rank);
    uint64_t bytes = sizeof(float) * ((uint64_t)(n - len) + (uint64_t)(c->size - 1) * len);
    return comm_leave(c, c->ops->allreduce_sum_f32(c, buf, n, err), bytes);
}

ekv_status comm_allgather(ekv_comm *c, const void *send, size_t bytes_per_rank,
                          void *recv, ekv_error *err)
{
    ekv_status st = comm_enter(c, "allgather", err);
    if (st)
        return st;
    if (bytes_per_rank > SIZE_MAX / (size_t)c->size)
        return ekv_error_set(err, EKV_ERANGE, "allgather: %d x %zu bytes overflow",
                             c->size, bytes_per_rank);
    if (bytes_per_rank && (!send || !recv))
        return ekv_error_set(err, EKV_EINVAL, "allgather: NULL buffer");
    if (bytes_per_rank == 0)
        return comm_leave(c, EKV_OK, 0);
    const char *s = send, *r = recv, *own = r + (size_t)c->rank * bytes_per_rank;
    size_t total = (size_t)c->size * bytes_per_rank;
    if (s != own && s < r + total && r < s + bytes_per_rank)
        return ekv_error_set(err, EKV_EINVAL,
                             "allgather: the send buffer overlaps the receive buffer "
                             "elsewhere than at this rank's own part");
    if (c->size == 1 && !c->ops->device_buffers) {
        if (s != own)
            memcpy(recv, send, bytes_per_rank);
        return comm_leave(c, EKV_OK, 0);
    }
    uint64_t bytes = (uint64_t)bytes_per_rank * (uint64_t)(c->size - 1);
    return comm_leave(c, c->ops->allgather(c, send, bytes_per_rank, recv, err), bytes);
}

ekv_status comm_broadcast(ekv_comm *c, void *buf, size_t bytes, int root, ekv_error *err)
{
    ekv_status st = comm_enter(c, "broadcast", err);
    if (st)
        return st;
    if (root < 0 || root >= c->size)
        return ekv_error_set(err, EKV_EINVAL, "broadcast: root %d outside 0..%d", root,
                             c->size - 1);
    if (bytes && !buf)
        return ekv_error_set(err, EKV_EINVAL, "broadcast: NULL buffer");
    if (bytes == 0 || c->size == 1)
        return comm_leave(c, EKV_OK, 0);
    uint64_t sent = c->rank == root ? (uint64_t)bytes * (uint64_t)(c->size - 1) : 0;
    return comm_leave(c, c->ops->broadcast(c, buf, bytes, root, err), sent);
}

ekv_status comm_barrier(ekv_comm *c, ekv_error *err)
{
    ekv_status st = comm_enter(c, "barrier", err);
    if (st)
        return st;
    if (c->size == 1)
        return comm_leave(c, EKV_OK, 0);
    return comm_leave(c, c->ops->barrier(c, err), 0);
}

/* ---- local: one rank. comm.c answers every collective before dispatch. ---- */

static const comm_ops local_ops = {.name = "local"};

ekv_comm *comm_open_local(ekv_error *err)
{
    return comm_alloc(&local_ops, 0, 1, NULL, err);
}
