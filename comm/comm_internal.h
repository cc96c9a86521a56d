/*
 * comm_internal.h - what the communicator's backends share (private to comm/).
 *
 * comm.c owns the public entry points: it checks arguments, refuses a
 * broken communicator, counts calls and bytes, and marks the communicator
 * broken when a backend reports EKV_EUNAVAILABLE. A backend implements only
 * the data movement, on arguments already checked.
 */
#ifndef ENTROKV_COMM_INTERNAL_H
#define ENTROKV_COMM_INTERNAL_H

#include "entrokv/comm.h"

typedef struct comm_ops {
    const char *name;
    int device_buffers; /* buffers are GPU memory: comm.c must not touch them */
    ekv_status (*allreduce_sum_f32)(ekv_comm *c, float *buf, size_t n, ekv_error *err);
    ekv_status (*allgather)(ekv_comm *c, const void *send, size_t bytes_per_rank,
                            void *recv, ekv_error *err);
    ekv_status (*broadcast)(ekv_comm *c, void *buf, size_t bytes, int root, ekv_error *err);
    ekv_status (*barrier)(ekv_comm *c, ekv_error *err);
    void (*destroy)(ekv_comm *c); /* frees impl (not c) */
} comm_ops;

struct ekv_comm {
    const comm_ops *ops;
    int rank, size;
    int timeout_ms;
    int broken;
    uint64_t bytes_sent, calls;
    void *impl;
};

/* A new ekv_comm with the counters zeroed and the default timeout. */
ekv_comm *comm_alloc(const comm_ops *ops, int rank, int size, void *impl, ekv_error *err);

/* The allreduce's partition of n elements over p ranks: rank r reduces
 * elements [comm_chunk_start(n,p,r), comm_chunk_start(n,p,r+1)). Balanced
 * (lengths differ by at most one, the longer ones first). */
static inline size_t comm_chunk_start(size_t n, int p, int r)
{
    size_t q = n / (size_t)p, m = n % (size_t)p;
    return (size_t)r * q + ((size_t)r < m ? (size_t)r : m);
}

#endif
