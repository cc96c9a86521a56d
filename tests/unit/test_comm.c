/*
 * test_comm.c - the communicator's local and threads backends (comm.h).
 *
 * References come from comm.h's contract, not from the code: an allreduce
 * is, per element, the float sum in rank order ((x_0 + x_1) + x_2 ...),
 * bit-identical on every rank; an allgather concatenates the ranks' parts
 * in rank order; a broadcast copies root's buffer; a dead or aborted peer
 * is EKV_EUNAVAILABLE within the timeout, and the communicator stays
 * broken. The byte counters follow comm.h's model, recomputed here from
 * the balanced chunk lengths it states. Ranks run as threads; each thread
 * records its results and the main thread checks them (the CHECK counter
 * is not thread-safe).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "ekv_test.h"
#include "entrokv/comm.h"

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A value that makes summation order visible: magnitudes from 1e-4 to 1e4. */
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

static size_t chunk_len(size_t n, int p, int r)
{
    return n / (size_t)p + ((size_t)r < n % (size_t)p ? 1 : 0);
}

/* ---- local ---- */

static void test_local_backend_is_identity(void)
{
    ekv_error err = {0};
    ekv_comm *c = comm_open_local(&err);
    CHECK(c != NULL);
    CHECK_EQ_INT(comm_rank(c), 0);
    CHECK_EQ_INT(comm_size(c), 1);
    CHECK_STR(comm_backend_name(c), "local");
    float v[3] = {1.5f, -2.0f, 3.25f};
    CHECK_EQ_INT(comm_allreduce_sum_f32(c, v, 3, &err), EKV_OK);
    CHECK(v[0] == 1.5f && v[1] == -2.0f && v[2] == 3.25f);
    char send[5] = "abcd", recv[5] = {0};
    CHECK_EQ_INT(comm_allgather(c, send, 5, recv, &err), EKV_OK);
    CHECK_STR(recv, "abcd");
    CHECK_EQ_INT(comm_allgather(c, recv, 5, recv, &err), EKV_OK); /* in place */
    CHECK_EQ_INT(comm_broadcast(c, send, 5, 0, &err), EKV_OK);
    CHECK_EQ_INT(comm_barrier(c, &err), EKV_OK);
    CHECK_EQ_INT(comm_bytes_sent(c), 0);
    CHECK_EQ_INT(comm_calls(c), 5);
    /* hostile arguments: errors, never a crash */
    CHECK_EQ_INT(comm_allreduce_sum_f32(c, NULL, 3, &err), EKV_EINVAL);
    CHECK_EQ_INT(comm_allreduce_sum_f32(c, v, SIZE_MAX / 2, &err), EKV_ERANGE);
    CHECK_EQ_INT(comm_allgather(c, NULL, 5, recv, &err), EKV_EINVAL);
    CHECK_EQ_INT(comm_allgather(c, recv + 1, 3, recv, &err), EKV_EINVAL); /* overlap */
    CHECK_EQ_INT(comm_broadcast(c, send, 5, 1, &err), EKV_EINVAL);
    CHECK_EQ_INT(comm_broadcast(c, send, 5, -1, &err), EKV_EINVAL);
    CHECK_EQ_INT(comm_broadcast(c, NULL, 5, 0, &err), EKV_EINVAL);
    CHECK_EQ_INT(comm_allreduce_sum_f32(NULL, v, 3, &err), EKV_EINVAL);
    CHECK_EQ_INT(comm_allreduce_sum_f32(c, NULL, 0, &err), EKV_OK);
    CHECK(!comm_broken(c));
    comm_free(c);
    comm_free(NULL);
}

/* ---- threads: the collectives against the contract ---- */

static const size_t sizes[] = {0, 1, 2, 3, 5, 7, 64, 1001, 4096, (size_t)1 << 20};
#define NSIZES (sizeof sizes / sizeof sizes[0])
#define GATHER_BYTES 13

typedef struct rank_run {
    comm_threads_group *g;
    int rank, p;
    ekv_status open_st, st[NSIZES], gather_st, bcast_st[4], barrier_st;
    float *out[NSIZES];
    unsigned char gathered[4 * GATHER_BYTES], gathered_inplace[4 * GATHER_BYTES];
    unsigned char bcast[4][GATHER_BYTES];
    uint64_t bytes_after_allreduce, bytes_end, calls_end;
} rank_run;

static void *rank_main(void *arg)
{
    rank_run *rr = arg;
    ekv_error err = {0};
    ekv_comm *c = comm_open_thread(rr->g, rr->rank, &err);
    rr->open_st = c ? EKV_OK : err.code;
    if (!c)
        return NULL;
    for (size_t k = 0; k < NSIZES; k++) {
        size_t n = sizes[k];
        rr->out[k] = malloc((n ? n : 1) * sizeof(float));
        for (size_t i = 0; i < n; i++)
            rr->out[k][i] = value(rr->rank, i + k);
        rr->st[k] = comm_allreduce_sum_f32(c, rr->out[k], n, &err);
    }
    rr->bytes_after_allreduce = comm_bytes_sent(c);
    unsigned char part[GATHER_BYTES];
    for (int j = 0; j < GATHER_BYTES; j++)
        part[j] = (unsigned char)(rr->rank * 31 + j);
    rr->gather_st = comm_allgather(c, part, GATHER_BYTES, rr->gathered, &err);
    memcpy(rr->gathered_inplace + rr->rank * GATHER_BYTES, part, GATHER_BYTES);
    ekv_status st2 = comm_allgather(c, rr->gathered_inplace + rr->rank * GATHER_BYTES,
                                    GATHER_BYTES, rr->gathered_inplace, &err);
    if (rr->gather_st == EKV_OK)
        rr->gather_st = st2;
    for (int root = 0; root < rr->p; root++) {
        for (int j = 0; j < GATHER_BYTES; j++)
            rr->bcast[root][j] = (unsigned char)(rr->rank == root ? 200 + root + j : 0);
        rr->bcast_st[root] = comm_broadcast(c, rr->bcast[root], GATHER_BYTES, root, &err);
    }
    rr->barrier_st = comm_barrier(c, &err);
    rr->bytes_end = comm_bytes_sent(c);
    rr->calls_end = comm_calls(c);
    comm_free(c);
    return NULL;
}

static void check_group(int p)
{
    ekv_error err = {0};
    comm_threads_group *g = comm_threads_group_create(p, &err);
    CHECK(g != NULL);
    rank_run rr[4] = {0};
    pthread_t th[4];
    for (int r = 0; r < p; r++) {
        rr[r] = (rank_run){.g = g, .rank = r, .p = p};
        pthread_create(&th[r], NULL, rank_main, &rr[r]);
    }
    for (int r = 0; r < p; r++)
        pthread_join(th[r], NULL);
    comm_threads_group_free(g); /* the last reference: the ranks freed theirs */
    uint64_t expect_ar = 0;
    for (int r = 0; r < p; r++) {
        CHECK_EQ_INT(rr[r].open_st, EKV_OK);
        if (rr[r].open_st != EKV_OK)
            continue;
        expect_ar = 0;
        for (size_t k = 0; k < NSIZES; k++) {
            size_t n = sizes[k];
            CHECK_EQ_INT(rr[r].st[k], EKV_OK);
            size_t bad = 0;
            for (size_t i = 0; i < n; i++) {
                float s = value(0, i + k);
                for (int q = 1; q < p; q++)
                    s += value(q, i + k);
                if (memcmp(&s, &rr[r].out[k][i], sizeof s) != 0)
                    bad++;
            }
            if (bad)
                fprintf(stderr, "p=%d rank %d n=%zu: %zu elements differ from the rank-order sum\n",
                        p, r, n, bad);
            CHECK_EQ_INT(bad, 0);
            if (n && p > 1) {
                size_t len = chunk_len(n, p, r);
                expect_ar += 4 * ((n - len) + (uint64_t)(p - 1) * len);
            }
        }
        CHECK_EQ_INT(rr[r].bytes_after_allreduce, expect_ar);
        CHECK_EQ_INT(rr[r].gather_st, EKV_OK);
        for (int q = 0; q < p; q++)
            for (int j = 0; j < GATHER_BYTES; j++) {
                CHECK_EQ_INT(rr[r].gathered[q * GATHER_BYTES + j], (unsigned char)(q * 31 + j));
                CHECK_EQ_INT(rr[r].gathered_inplace[q * GATHER_BYTES + j],
                             (unsigned char)(q * 31 + j));
            }
        for (int root = 0; root < p; root++) {
            CHECK_EQ_INT(rr[r].bcast_st[root], EKV_OK);
            for (int j = 0; j < GATHER_BYTES; j++)
                CHECK_EQ_INT(rr[r].bcast[root][j], 200 + root + j);
        }
        CHECK_EQ_INT(rr[r].barrier_st, EKV_OK);
        uint64_t expect_end = expect_ar + (p > 1 ? 2ull * GATHER_BYTES * (uint64_t)(p - 1)
                                                     + (uint64_t)GATHER_BYTES * (uint64_t)(p - 1)
                                               : 0);
        CHECK_EQ_INT(rr[r].bytes_end, expect_end);
        CHECK_EQ_INT(rr[r].calls_end, NSIZES + 2 + (size_t)p + 1);
        for (size_t k = 0; k < NSIZES; k++)
            free(rr[r].out[k]);
    }
}

static void test_threads_sizes_1_to_4_match_the_rank_order_sum(void)
{
    for (int p = 1; p <= 4; p++)
        check_group(p);
}

/* ---- threads: failures ---- */

typedef struct fail_run {
    comm_threads_group *g;
    int rank, timeout_ms, mode; /* mode 0: collectives; 1: opens and leaves */
    size_t n;
    ekv_status first, second;
    double first_ms, second_ms;
    int broken;
} fail_run;

static void *fail_main(void *arg)
{
    fail_run *fr = arg;
    ekv_error err = {0};
    ekv_comm *c = comm_open_thread(fr->g, fr->rank, &err);
    if (!c) {
        fr->first = err.code;
        return NULL;
    }
    if (fr->mode == 1) { /* a peer that dies before its collective */
        comm_free(c);
        return NULL;
    }
    comm_set_timeout_ms(c, fr->timeout_ms);
    float buf[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    double t0 = now_ms();
    fr->first = fr->n ? comm_allreduce_sum_f32(c, buf, fr->n, &err) : comm_barrier(c, &err);
    fr->first_ms = now_ms() - t0;
    t0 = now_ms();
    fr->second = comm_allreduce_sum_f32(c, buf, 8, &err);
    fr->second_ms = now_ms() - t0;
    fr->broken = comm_broken(c);
    comm_free(c);
    return NULL;
}

static void test_threads_dead_peer_is_an_error_within_the_timeout(void)
{
    ekv_error err = {0};
    comm_threads_group *g = comm_threads_group_create(3, &err);
    fail_run fr[3];
    pthread_t th[3];
    for (int r = 0; r < 3; r++) {
        fr[r] = (fail_run){.g = g, .rank = r, .timeout_ms = 300, .n = 8, .mode = r == 2};
        pthread_create(&th[r], NULL, fail_main, &fr[r]);
    }
    for (int r = 0; r < 3; r++)
        pthread_join(th[r], NULL);
    for (int r = 0; r < 2; r++) {
        CHECK_EQ_INT(fr[r].first, EKV_EUNAVAILABLE);
        CHECK(fr[r].first_ms < 5000);  /* bounded: the timeout plus scheduling */
        CHECK_EQ_INT(fr[r].second, EKV_EUNAVAILABLE);
        CHECK(fr[r].second_ms < 50);   /* broken: refused at once */
        CHECK(fr[r].broken);
    }
    /* the rank that noticed first waited its full timeout */
    CHECK(fr[0].first_ms >= 250 || fr[1].first_ms >= 250);
    comm_threads_group_free(g);
}

typedef struct abort_arg {
    comm_threads_group *g;
    int delay_ms;
} abort_arg;

static void *abort_main(void *arg)
{
    abort_arg *a = arg;
    struct timespec ts = {0, (long)a->delay_ms * 1000000L};
    nanosleep(&ts, NULL);
    comm_threads_group_abort(a->g);
    return NULL;
}

static void test_threads_abort_wakes_every_waiting_rank(void)
{
    ekv_error err = {0};
    comm_threads_group *g = comm_threads_group_create(3, &err);
    fail_run fr[2];
    pthread_t th[3];
    for (int r = 0; r < 2; r++) {
        fr[r] = (fail_run){.g = g, .rank = r, .timeout_ms = 60000, .n = 0};
        pthread_create(&th[r], NULL, fail_main, &fr[r]);
    }
    abort_arg a = {g, 100};
    pthread_create(&th[2], NULL, abort_main, &a);
    for (int r = 0; r < 3; r++)
        pthread_join(th[r], NULL);
    for (int r = 0; r < 2; r++) {
        CHECK_EQ_INT(fr[r].first, EKV_EUNAVAILABLE);
        CHECK(fr[r].first_ms < 5000); /* not the 60 s timeout */
        CHECK_EQ_INT(fr[r].second, EKV_EUNAVAILABLE);
    }
    comm_threads_group_free(g);
}

typedef struct mismatch_run {
    comm_threads_group *g;
    int rank;
    ekv_status bad, good;
    float buf[6];
} mismatch_run;

static void *mismatch_main(void *arg)
{
    mismatch_run *m = arg;
    ekv_error err = {0};
    ekv_comm *c = comm_open_thread(m->g, m->rank, &err);
    comm_set_timeout_ms(c, 10000);
    for (int i = 0; i < 6; i++)
        m->buf[i] = (float)(m->rank + 1);
    /* rank 1 asks for one element more: a caller bug every rank hears of */
    m->bad = comm_allreduce_sum_f32(c, m->buf, 4 + (size_t)m->rank, &err);
    for (int i = 0; i < 6; i++)
        m->buf[i] = (float)(m->rank + 1);
    m->good = comm_allreduce_sum_f32(c, m->buf, 6, &err);
    comm_free(c);
    return NULL;
}

static void test_threads_mismatched_collectives_are_einval_and_the_group_goes_on(void)
{
    ekv_error err = {0};
    comm_threads_group *g = comm_threads_group_create(2, &err);
    mismatch_run m[2];
    pthread_t th[2];
    for (int r = 0; r < 2; r++) {
        m[r] = (mismatch_run){.g = g, .rank = r};
        pthread_create(&th[r], NULL, mismatch_main, &m[r]);
    }
    for (int r = 0; r < 2; r++)
        pthread_join(th[r], NULL);
    for (int r = 0; r < 2; r++) {
        CHECK_EQ_INT(m[r].bad, EKV_EINVAL);
        CHECK_EQ_INT(m[r].good, EKV_OK);
        for (int i = 0; i < 6; i++)
            CHECK(m[r].buf[i] == 3.0f);
    }
    comm_threads_group_free(g);
}

static void test_threads_open_rejects_bad_ranks(void)
{
    ekv_error err = {0};
    CHECK(comm_threads_group_create(0, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(comm_threads_group_create(COMM_THREADS_MAX + 1, &err) == NULL);
    comm_threads_group *g = comm_threads_group_create(2, &err);
    CHECK(comm_open_thread(g, 2, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(comm_open_thread(g, -1, &err) == NULL);
    CHECK(comm_open_thread(NULL, 0, &err) == NULL);
    ekv_comm *c = comm_open_thread(g, 1, &err);
    CHECK(c != NULL);
    CHECK(comm_open_thread(g, 1, &err) == NULL); /* opened twice */
    CHECK_EQ_INT(comm_size(c), 2);
    CHECK_EQ_INT(comm_rank(c), 1);
    CHECK_STR(comm_backend_name(c), "threads");
    comm_threads_group_free(g); /* c still holds the group */
    CHECK_EQ_INT(comm_broadcast(c, &err, 1, 2, &err), EKV_EINVAL);
    comm_free(c);
}

/* No bootstrap communicator or a negative device: refused before NCCL is
 * even looked for. (NCCL itself is exercised only where a GPU is lent.) */
static void test_nccl_rejects_bad_arguments(void)
{
    ekv_error err = {0};
    CHECK(comm_open_nccl(NULL, 0, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    ekv_comm *boot = comm_open_local(&err);
    CHECK(comm_open_nccl(boot, -1, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    comm_free(boot);
}

/* Where NCCL or a GPU is missing (this CI), opening says which, as a value. */
static void test_nccl_without_a_device_is_an_error_value(void)
{
    ekv_error err = {0};
    ekv_comm *boot = comm_open_local(&err);
    ekv_comm *c = comm_open_nccl(boot, 0, &err);
    if (c) { /* a GPU machine: a one-rank NCCL communicator */
        CHECK_STR(comm_backend_name(c), "nccl");
        CHECK_EQ_INT(comm_barrier(c, &err), EKV_OK);
    } else {
        CHECK(err.code == EKV_EUNSUPPORTED || err.code == EKV_EUNAVAILABLE);
        CHECK(strstr(err.msg, "NCCL") != NULL);
        fprintf(stderr, "  (NCCL here: %s)\n", err.msg);
    }
    comm_free(c);
    comm_free(boot);
}

int main(void)
{
    RUN_TEST(test_local_backend_is_identity);
    RUN_TEST(test_threads_sizes_1_to_4_match_the_rank_order_sum);
    RUN_TEST(test_threads_dead_peer_is_an_error_within_the_timeout);
    RUN_TEST(test_threads_abort_wakes_every_waiting_rank);
    RUN_TEST(test_threads_mismatched_collectives_are_einval_and_the_group_goes_on);
    RUN_TEST(test_threads_open_rejects_bad_ranks);
    RUN_TEST(test_nccl_rejects_bad_arguments);
    RUN_TEST(test_nccl_without_a_device_is_an_error_value);
    return TEST_EXIT();
}
