/*
 * test_threadpool_stress.c - the thread pool hammered the way decode uses it,
 * with the workers going to sleep between regions (common/threadpool.c).
 *
 * test_pool_every_part_once_with_sleepers: many regions from one caller,
 * each after a pause of about a worker's spin time, so workers are caught
 * spinning, deciding to sleep, and asleep. Every part must run exactly once
 * per region, see what the caller wrote before the region and have its
 * writes seen after it (plain memory: under ThreadSanitizer, scripts/tsan.sh,
 * a missing happens-before edge in the pool is a reported race), and every
 * region must return.
 *
 * test_pool_wakes_every_sleeper: a lost wake-up detector. Each region's
 * parts rendezvous: a part waits (bounded) until every thread of the pool
 * has entered the region. A worker that missed the wake-up and sleeps
 * through the region never arrives, so its region times out. The pool
 * once published a region with a release store of `claim` and then loaded
 * `sleepers`; a worker adds itself to `sleepers` and re-checks `claim`
 * before sleeping. Without seq_cst on both sides the caller's store can sit
 * in its store buffer while it reads sleepers == 0, and the worker reads
 * the old claim and sleeps (store-buffering: the one reordering x86 allows).
 * The window is a few tens of nanoseconds per region, so a run catches it
 * only with some probability; ThreadSanitizer does not model store buffers
 * and cannot see it either. What this test does guarantee is that a pool
 * which loses wake-ups more than rarely fails, and that it cannot hang.
 *
 * EKV_POOL_STRESS_SECONDS (default 2) bounds each test's time.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "ekv_test.h"
#include "entrokv/threadpool.h"

#define MAX_PARTS 64
#define RENDEZVOUS_TIMEOUT_S 10.0

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double budget_s(void)
{
    const char *e = getenv("EKV_POOL_STRESS_SECONDS");
    double s = e ? atof(e) : 2.0;
    return s > 0 ? s : 2.0;
}

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Seconds a worker spins before sleeping, measured with the same loop shape
 * as the pool's (an atomic load and a pause per turn, 20000 turns). */
static double spin_time_s(void)
{
    static atomic_uint_fast64_t word;
    double t0 = now_s();
    for (int i = 0; i < 20000; i++) {
        (void)atomic_load_explicit(&word, memory_order_acquire);
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    return now_s() - t0;
}

static void busy_wait(double s)
{
    double end = now_s() + s;
    while (now_s() < end)
        ;
}

/* `input` and `out` are plain memory, as a kernel's operands are: the pool's
 * publication of a region and its completion must order them (under TSan a
 * missing happens-before edge is a reported race). */
typedef struct count_ctx {
    atomic_int runs[MAX_PARTS];
    atomic_int nth;
    int input;
    int out[MAX_PARTS];
} count_ctx;

static void count_part(void *p, int ith, int nth)
{
    count_ctx *c = p;
    atomic_store(&c->nth, nth);
    if (ith >= 0 && ith < MAX_PARTS) {
        atomic_fetch_add(&c->runs[ith], 1);
        c->out[ith] = c->input + ith;
    }
}

static void test_pool_every_part_once_with_sleepers(void)
{
    const int nt = 4; /* more threads than this machine may have cores */
    ekv_pool *pool = ekv_pool_create(nt, NULL);
    CHECK(pool != NULL);
    if (!pool)
        return;
    double spin = spin_time_s(), end = now_s() + budget_s();
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    int regions = 0, bad = 0;
    while (now_s() < end && !bad) {
        count_ctx c;
        for (int i = 0; i < MAX_PARTS; i++) {
            atomic_init(&c.runs[i], 0);
            c.out[i] = -1;
        }
        atomic_init(&c.nth, 0);
        c.input = regions;
        ekv_pool_run(pool, count_part, &c);
        int nth = atomic_load(&c.nth);
        if (nth < nt || nth > MAX_PARTS) {
            CHECK(nth >= nt && nth <= MAX_PARTS);
            break;
        }
        for (int i = 0; i < nth; i++)
            if (atomic_load(&c.runs[i]) != 1 || c.out[i] != regions + i) {
                fprintf(stderr, "region %d: part %d of %d ran %d times, wrote %d\n", regions, i,
                        nth, atomic_load(&c.runs[i]), c.out[i]);
                bad = 1;
            }
        /* pauses from none to twice the spin time: workers are caught
         * spinning, at the sleep decision, and asleep */
        busy_wait(spin * (double)(rng_next(&rng) % 2001) / 1000.0);
        regions++;
    }
    CHECK(!bad);
    CHECK(regions > 10);
    fprintf(stderr, "  %d regions, worker spin ~%.0f us\n", regions, spin * 1e6);
    ekv_pool_destroy(pool);
}

typedef struct meet_ctx {
    atomic_uint arrived; /* bit per thread index that entered the region */
    atomic_int timed_out;
    unsigned all;
} meet_ctx;

static void meet_part(void *p, int ith, int nth)
{
    meet_ctx *c = p;
    atomic_fetch_or(&c->arrived, 1u << ekv_pool_thread_index());
    /* every thread's first part blocks here until all have come, so no
     * thread can take a second part before all are in the region */
    double deadline = 0;
    while (atomic_load(&c->arrived) != c->all) {
        if (atomic_load(&c->timed_out))
            return;
        double t = now_s();
        if (deadline == 0)
            deadline = t + RENDEZVOUS_TIMEOUT_S;
        if (t > deadline) {
            atomic_store(&c->timed_out, 1);
            return;
        }
        sched_yield(); /* the missing thread may need this core */
    }
}

static void test_pool_wakes_every_sleeper(void)
{
    const int nt = 3;
    ekv_pool *pool = ekv_pool_create(nt, NULL);
    CHECK(pool != NULL);
    if (!pool)
        return;
    double spin = spin_time_s(), end = now_s() + budget_s();
    uint64_t rng = 0xD1B54A32D192ED03ull;
    int regions = 0, lost = 0;
    while (now_s() < end) {
        meet_ctx c = {.all = (1u << nt) - 1};
        atomic_init(&c.arrived, 0);
        atomic_init(&c.timed_out, 0);
        double t0 = now_s();
        ekv_pool_run(pool, meet_part, &c);
        regions++;
        if (atomic_load(&c.timed_out)) {
            fprintf(stderr,
                    "region %d: threads 0x%x of 0x%x arrived within %.0f s (%.1f s): a worker "
                    "slept through the region (lost wake-up)\n",
                    regions, atomic_load(&c.arrived), c.all, RENDEZVOUS_TIMEOUT_S, now_s() - t0);
            lost++;
            break;
        }
        /* around the spin time, where workers decide to sleep */
        busy_wait(spin * (double)(500 + rng_next(&rng) % 1001) / 1000.0);
    }
    CHECK_EQ_INT(lost, 0);
    CHECK(regions > 10);
    fprintf(stderr, "  %d regions, worker spin ~%.0f us\n", regions, spin * 1e6);
    ekv_pool_destroy(pool);
}

int main(void)
{
    RUN_TEST(test_pool_every_part_once_with_sleepers);
    RUN_TEST(test_pool_wakes_every_sleeper);
    return TEST_EXIT();
}
