/*
 * comm_nccl.c - the NCCL backend: collectives over GPU buffers, one rank per
 * GPU, bootstrapped through another communicator (MPI: rank 0's NCCL unique
 * id is broadcast over it).
 *
 * NCCL and the CUDA runtime are loaded at run time (dlopen of libnccl.so.2
 * and libcudart.so) with the few prototypes this file needs declared here
 * from NCCL's and CUDA's documented C ABI, so no CUDA header enters comm/
 * (STYLE.md: they stay under kernels/cuda/) and every build carries the
 * backend; where the libraries or a device are missing comm_open_nccl says so
 * (EKV_EUNSUPPORTED, EKV_EUNAVAILABLE).
 *
 * Each collective is enqueued on the communicator's own stream and then
 * polled (cudaStreamQuery) against the communicator's deadline, checking
 * ncclCommGetAsyncError: a peer that died leaves the collective unfinished,
 * and after the timeout the NCCL communicator is aborted (ncclCommAbort,
 * NCCL's documented way out of a hung collective) and the call returns
 * EKV_EUNAVAILABLE. Summation order is NCCL's (ring or tree), identical on
 * every rank but not comm.h's rank order.
 *
 * Status: compiled and its "unavailable" paths tested here (no GPU); the
 * device paths have not run yet (docs/tp.md).
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm_internal.h"

/* NCCL 2.x ABI (nccl.h): results, types, ops, the unique id. */
typedef int nccl_result;
enum { NCCL_SUCCESS = 0, NCCL_IN_PROGRESS = 7 };
enum { NCCL_UINT8 = 1, NCCL_FLOAT32 = 7 };
enum { NCCL_SUM = 0 };
typedef struct { char internal[128]; } nccl_unique_id;
typedef void *nccl_comm_t;
/* CUDA runtime ABI (cuda_runtime_api.h) */
typedef int cuda_error;
enum { CUDA_SUCCESS = 0, CUDA_ERROR_NOT_READY = 600 };
typedef void *cuda_stream;

typedef struct nccl_api {
    void *lib_nccl, *lib_cudart;
    nccl_result (*get_unique_id)(nccl_unique_id *);
    nccl_result (*comm_init_rank)(nccl_comm_t *, int, nccl_unique_id, int);
    nccl_result (*comm_abort)(nccl_comm_t);
    nccl_result (*comm_destroy)(nccl_comm_t);
    nccl_result (*comm_get_async_error)(nccl_comm_t, nccl_result *);
    nccl_result (*all_reduce)(const void *, void *, size_t, int, int, nccl_comm_t, cuda_stream);
    nccl_result (*all_gather)(const void *, void *, size_t, int, nccl_comm_t, cuda_stream);
    nccl_result (*broadcast)(const void *, void *, size_t, int, int, nccl_comm_t, cuda_stream);
    const char *(*get_error_string)(nccl_result);
    cuda_error (*set_device)(int);
    cuda_error (*stream_create)(cuda_stream *);
    cuda_error (*stream_destroy)(cuda_stream);
    cuda_error (*stream_query)(cuda_stream);
    cuda_error (*malloc_)(void **, size_t);
    cuda_error (*free_)(void *);
    const char *(*cuda_error_string)(cuda_error);
} nccl_api;

typedef struct nccl_impl {
    nccl_api api;
    nccl_comm_t comm;
    cuda_stream stream;
    float *one; /* device scratch for the barrier */
    int aborted;
} nccl_impl;

/* The libraries stay loaded for the process's life (RTLD_NODELETE, no
 * dlclose): the CUDA runtime and NCCL start threads of their own that would
 * run into unmapped code after an unload. */
static void api_close(nccl_api *a)
{
    memset(a, 0, sizeof *a);
}

static ekv_status api_open(nccl_api *a, ekv_error *err)
{
    memset(a, 0, sizeof *a);
    static const char *cudarts[] = {"libcudart.so", "libcudart.so.13", "libcudart.so.12"};
    a->lib_nccl = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    for (size_t i = 0; !a->lib_cudart && i < sizeof cudarts / sizeof cudarts[0]; i++)
        a->lib_cudart = dlopen(cudarts[i], RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!a->lib_nccl || !a->lib_cudart) {
        ekv_status st = ekv_error_set(err, EKV_EUNSUPPORTED,
                                      "NCCL communicator: %s not found (install NCCL and the CUDA "
                                      "runtime)", a->lib_nccl ? "libcudart.so" : "libnccl.so.2");
        api_close(a);
        return st;
    }
#define SYM(lib, field, name)                                                                  \
    do {                                                                                       \
        *(void **)&a->field = dlsym(a->lib, name);                                             \
        if (!a->field) {                                                                       \
            api_close(a);                                                                      \
            return ekv_error_set(err, EKV_EUNSUPPORTED, "NCCL communicator: %s lacks %s",     \
                                 #lib, name);                                                  \
        }                                                                                      \
    } while (0)
    SYM(lib_nccl, get_unique_id, "ncclGetUniqueId");
    SYM(lib_nccl, comm_init_rank, "ncclCommInitRank");
    SYM(lib_nccl, comm_abort, "ncclCommAbort");
    SYM(lib_nccl, comm_destroy, "ncclCommDestroy");
    SYM(lib_nccl, comm_get_async_error, "ncclCommGetAsyncError");
    SYM(lib_nccl, all_reduce, "ncclAllReduce");
    SYM(lib_nccl, all_gather, "ncclAllGather");
    SYM(lib_nccl, broadcast, "ncclBroadcast");
    SYM(lib_nccl, get_error_string, "ncclGetErrorString");
    SYM(lib_cudart, set_device, "cudaSetDevice");
    SYM(lib_cudart, stream_create, "cudaStreamCreate");
    SYM(lib_cudart, stream_destroy, "cudaStreamDestroy");
    SYM(lib_cudart, stream_query, "cudaStreamQuery");
    SYM(lib_cudart, malloc_, "cudaMalloc");
    SYM(lib_cudart, free_, "cudaFree");
    SYM(lib_cudart, cuda_error_string, "cudaGetErrorString");
#undef SYM
    return EKV_OK;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Aborts the NCCL communicator (a hung collective cannot be waited out). */
static ekv_status nccl_give_up(ekv_comm *c, const char *what, const char *why, ekv_error *err)
{
    nccl_impl *m = c->impl;
    if (!m->aborted) {
        m->api.comm_abort(m->comm);
        m->aborted = 1;
    }
    return ekv_error_set(err, EKV_EUNAVAILABLE, "NCCL %s on rank %d: %s", what, c->rank, why);
}

/* Enqueue result rc, then wait for the stream against the deadline. */
static ekv_status nccl_finish(ekv_comm *c, nccl_result rc, const char *what, ekv_error *err)
{
    nccl_impl *m = c->impl;
    if (rc != NCCL_SUCCESS && rc != NCCL_IN_PROGRESS)
        return nccl_give_up(c, what, m->api.get_error_string(rc), err);
    double deadline = now_ms() + c->timeout_ms;
    for (long spins = 0;; spins++) {
        cuda_error ce = m->api.stream_query(m->stream);
        if (ce == CUDA_SUCCESS)
            return EKV_OK;
        if (ce != CUDA_ERROR_NOT_READY)
            return nccl_give_up(c, what, m->api.cuda_error_string(ce), err);
        nccl_result async = NCCL_SUCCESS;
        m->api.comm_get_async_error(m->comm, &async);
        if (async != NCCL_SUCCESS && async != NCCL_IN_PROGRESS)
            return nccl_give_up(c, what, m->api.get_error_string(async), err);
        if (spins > 1000 && now_ms() > deadline)
            return nccl_give_up(c, what, "timed out waiting for the peers (a peer died or stopped)",
                                err);
        if (spins > 1000) {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
}

static ekv_status nccl_allreduce(ekv_comm *c, float *buf, size_t n, ekv_error *err)
{
    nccl_impl *m = c->impl;
    return nccl_finish(c, m->api.all_reduce(buf, buf, n, NCCL_FLOAT32, NCCL_SUM, m->comm, m->stream),
                       "allreduce", err);
}

static ekv_status nccl_allgather(ekv_comm *c, const void *send, size_t bpr, void *recv,
                                 ekv_error *err)
{
    nccl_impl *m = c->impl;
    return nccl_finish(c, m->api.all_gather(send, recv, bpr, NCCL_UINT8, m->comm, m->stream),
                       "allgather", err);
}

static ekv_status nccl_broadcast(ekv_comm *c, void *buf, size_t bytes, int root, ekv_error *err)
{
    nccl_impl *m = c->impl;
    return nccl_finish(c, m->api.broadcast(buf, buf, bytes, NCCL_UINT8, root, m->comm, m->stream),
                       "broadcast", err);
}

/* NCCL has no barrier: an allreduce of one float does the same. */
static ekv_status nccl_barrier(ekv_comm *c, ekv_error *err)
{
    nccl_impl *m = c->impl;
    return nccl_finish(c, m->api.all_reduce(m->one, m->one, 1, NCCL_FLOAT32, NCCL_SUM, m->comm,
                                            m->stream),
                       "barrier", err);
}

static void nccl_destroy(ekv_comm *c)
{
    nccl_impl *m = c->impl;
    if (m->comm && !m->aborted)
        m->api.comm_destroy(m->comm);
    if (m->one)
        m->api.free_(m->one);
    if (m->stream)
        m->api.stream_destroy(m->stream);
    api_close(&m->api);
    free(m);
}

static const comm_ops nccl_ops = {
    .name = "nccl",
    .device_buffers = 1,
    .allreduce_sum_f32 = nccl_allreduce,
    .allgather = nccl_allgather,
    .broadcast = nccl_broadcast,
    .barrier = nccl_barrier,
    .destroy = nccl_destroy,
};

ekv_comm *comm_open_nccl(ekv_comm *boot, int device, ekv_error *err)
{
    if (!boot) {
        ekv_error_set(err, EKV_EINVAL, "NCCL communicator: no bootstrap communicator");
        return NULL;
    }
    if (device < 0) {
        ekv_error_set(err, EKV_EINVAL, "NCCL communicator: device %d", device);
        return NULL;
    }
    nccl_impl *m = calloc(1, sizeof *m);
    if (!m) {
        ekv_error_set(err, EKV_ENOMEM, "NCCL communicator: out of memory");
        return NULL;
    }
    /* every rank takes the same path up to the broadcast: a rank without
     * NCCL still joins it (with a zero id) so its peers are not left waiting */
    nccl_unique_id id;
    memset(&id, 0, sizeof id);
    ekv_status st = api_open(&m->api, err);
    int ok = st == EKV_OK;
    if (ok && comm_rank(boot) == 0 && m->api.get_unique_id(&id) != NCCL_SUCCESS) {
        ekv_error_set(err, EKV_EUNAVAILABLE, "NCCL communicator: ncclGetUniqueId failed");
        ok = 0;
    }
    ekv_error berr = {0};
    if (comm_broadcast(boot, &id, sizeof id, 0, &berr)) {
        if (ok)
            *err = berr;
        ok = 0;
    }
    static const char zero[sizeof id.internal];
    if (ok && !memcmp(id.internal, zero, sizeof zero)) {
        ekv_error_set(err, EKV_EUNAVAILABLE, "NCCL communicator: rank 0 has no NCCL unique id");
        ok = 0;
    }
    cuda_error ce;
    if (ok && (ce = m->api.set_device(device)) != CUDA_SUCCESS) {
        ekv_error_set(err, EKV_EUNAVAILABLE, "NCCL communicator: cudaSetDevice(%d): %s", device,
                      m->api.cuda_error_string(ce));
        ok = 0;
    }
    if (ok && ((ce = m->api.stream_create(&m->stream)) != CUDA_SUCCESS ||
               (ce = m->api.malloc_((void **)&m->one, sizeof(float))) != CUDA_SUCCESS)) {
        ekv_error_set(err, EKV_EUNAVAILABLE, "NCCL communicator: %s", m->api.cuda_error_string(ce));
        ok = 0;
    }
    nccl_result rc;
    if (ok && (rc = m->api.comm_init_rank(&m->comm, comm_size(boot), id, comm_rank(boot))) !=
                  NCCL_SUCCESS) {
        ekv_error_set(err, EKV_EUNAVAILABLE, "NCCL communicator: ncclCommInitRank: %s",
                      m->api.get_error_string(rc));
        m->comm = NULL;
        ok = 0;
    }
    ekv_comm *c = ok ? comm_alloc(&nccl_ops, comm_rank(boot), comm_size(boot), m, err) : NULL;
    if (!c) {
        ekv_comm tmp = {.impl = m};
        if (m->api.lib_nccl)
            nccl_destroy(&tmp);
        else
            free(m);
        return NULL;
    }
    return c;
}
