/*
 * test_comm_mpi.c - the MPI backend under a real mpirun (test_comm_mpi.sh
 * starts it with -np 2 and 3, and across two network namespaces).
 *
 *   test_comm_mpi collectives        every collective against comm.h's contract
 *   test_comm_mpi dead TIMEOUT_MS    the last rank kills itself (SIGKILL) after
 *                                    one allreduce; the others must get
 *                                    EKV_EUNAVAILABLE within the timeout plus slack
 *   test_comm_mpi stall TIMEOUT_MS   the same with SIGSTOP (a stuck peer)
 *
 * Each rank computes every rank's inputs itself, so the reference (the
 * rank-order float sum, comm.h) needs no communication. Exit 0: pass; each
 * rank prints one line "rank R of P: ..." with what it saw.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "entrokv/comm.h"

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static float value(int rank, size_t i)
{
    uint32_t h = (uint32_t)(i * 2654435761u) ^ (uint32_t)(rank * 40503 + 17);
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    float mant = (float)(h & 0xffff) / 65536.0f - 0.5f;
    static const float scale[] = {1e-4f, 1e-2f, 1.0f, 1e2f, 1e4f};
    return mant * scale[(h >> 16) % 5];
}

static int fails;
#define EXPECT(cond, ...)                                                                   \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "rank %d: %s:%d: ", me, __FILE__, __LINE__);                    \
            fprintf(stderr, __VA_ARGS__);                                                   \
            fputc('\n', stderr);                                                            \
            fails++;                                                                        \
        }                                                                                   \
    } while (0)

static int collectives(ekv_comm *c)
{
    int me = comm_rank(c), p = comm_size(c);
    ekv_error err = {0};
    static const size_t sizes[] = {0, 1, 2, 3, 5, 7, 1001, 4096, (size_t)1 << 20};
    uint64_t expect_bytes = 0;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = sizes[k];
        float *buf = malloc((n ? n : 1) * sizeof *buf);
        for (size_t i = 0; i < n; i++)
            buf[i] = value(me, i + k);
        ekv_status st = comm_allreduce_sum_f32(c, buf, n, &err);
        EXPECT(st == EKV_OK, "allreduce n=%zu: %s", n, err.msg);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            float s = value(0, i + k);
            for (int q = 1; q < p; q++)
                s += value(q, i + k);
            bad += memcmp(&s, &buf[i], sizeof s) != 0;
        }
        EXPECT(bad == 0, "allreduce n=%zu: %zu elements differ from the rank-order sum", n, bad);
        if (n && p > 1) {
            size_t len = n / (size_t)p + ((size_t)me < n % (size_t)p);
            expect_bytes += 4 * ((n - len) + (uint64_t)(p - 1) * len);
        }
        free(buf);
    }
    EXPECT(comm_bytes_sent(c) == expect_bytes, "bytes %llu, expected %llu",
           (unsigned long long)comm_bytes_sent(c), (unsigned long long)expect_bytes);
    enum { B = 13 };
    unsigned char part[B], all[64 * B], all2[64 * B];
    for (int j = 0; j < B; j++)
        part[j] = (unsigned char)(me * 31 + j);
    EXPECT(comm_allgather(c, part, B, all, &err) == EKV_OK, "allgather: %s", err.msg);
    memcpy(all2 + me * B, part, B);
    EXPECT(comm_allgather(c, all2 + me * B, B, all2, &err) == EKV_OK, "allgather in place: %s",
           err.msg);
    for (int q = 0; q < p; q++)
        for (int j = 0; j < B; j++) {
            EXPECT(all[q * B + j] == (unsigned char)(q * 31 + j), "allgather byte %d of %d", j, q);
            EXPECT(all2[q * B + j] == (unsigned char)(q * 31 + j), "in place byte %d of %d", j, q);
        }
    for (int root = 0; root < p; root++) {
        unsigned char b[B];
        for (int j = 0; j < B; j++)
            b[j] = (unsigned char)(me == root ? 200 + root + j : 0);
        EXPECT(comm_broadcast(c, b, B, root, &err) == EKV_OK, "broadcast: %s", err.msg);
        for (int j = 0; j < B; j++)
            EXPECT(b[j] == (unsigned char)(200 + root + j), "broadcast from %d byte %d", root, j);
    }
    EXPECT(comm_barrier(c, &err) == EKV_OK, "barrier: %s", err.msg);
    EXPECT(comm_broadcast(c, part, B, p, &err) == EKV_EINVAL, "root out of range accepted");
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    printf("rank %d of %d: collectives %s (%llu bytes sent) on %s\n", me, p,
           fails ? "FAILED" : "ok", (unsigned long long)comm_bytes_sent(c), host);
    fflush(stdout);
    return fails ? 1 : 0;
}

static int dead_peer(ekv_comm *c, int timeout_ms, int sig)
{
    int me = comm_rank(c), p = comm_size(c);
    ekv_error err = {0};
    comm_set_timeout_ms(c, timeout_ms);
    float buf[256];
    for (int i = 0; i < 256; i++)
        buf[i] = 1.0f;
    ekv_status st = comm_allreduce_sum_f32(c, buf, 256, &err);
    EXPECT(st == EKV_OK && buf[0] == (float)p, "first allreduce: %s", err.msg);
    if (me == p - 1) {
        printf("rank %d of %d: raising signal %d (pid %d)\n", me, p, sig, (int)getpid());
        fflush(stdout);
        raise(sig);
        if (sig == SIGSTOP) { /* continued by the test script only to exit */
            fflush(stdout);
            _exit(0);
        }
    }
    double t0 = now_ms();
    int i = 0;
    for (; i < 100000 && st == EKV_OK; i++)
        st = comm_allreduce_sum_f32(c, buf, 256, &err);
    double dt = now_ms() - t0;
    EXPECT(st == EKV_EUNAVAILABLE, "after the peer died: %s (%s)", ekv_status_name(st), err.msg);
    EXPECT(dt < timeout_ms + 5000.0, "noticed after %.0f ms (timeout %d ms)", dt, timeout_ms);
    char first[sizeof err.msg];
    memcpy(first, err.msg, sizeof first);
    double t1 = now_ms();
    ekv_status again = comm_barrier(c, &err);
    EXPECT(again == EKV_EUNAVAILABLE && now_ms() - t1 < 100, "a broken communicator answered %s",
           ekv_status_name(again));
    printf("rank %d of %d: peer failure seen after %.0f ms (%d more allreduces): %s\n", me, p, dt,
           i, first);
    fflush(stdout);
    return fails ? 1 : 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "collectives";
    int timeout_ms = argc > 2 ? atoi(argv[2]) : 0;
    ekv_error err = {0};
    ekv_comm *c = comm_open_mpi(timeout_ms, &err);
    if (!c) {
        fprintf(stderr, "comm_open_mpi: %s\n", err.msg);
        return 2;
    }
    int rc;
    if (!strcmp(mode, "collectives"))
        rc = collectives(c);
    else if (!strcmp(mode, "dead"))
        rc = dead_peer(c, timeout_ms, SIGKILL);
    else if (!strcmp(mode, "stall"))
        rc = dead_peer(c, timeout_ms, SIGSTOP);
    else {
        fprintf(stderr, "unknown mode %s\n", mode);
        rc = 2;
    }
    int broken = comm_broken(c);
    comm_free(c);
    /* a broken MPI communicator leaves MPI unfinalized (comm_mpi.c): leave
     * without the atexit handlers that would wait for the dead peer */
    if (broken) {
        fflush(NULL);
        _exit(rc);
    }
    return rc;
}
