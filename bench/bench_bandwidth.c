/*
 * bench_bandwidth.c - the machine's streaming read bandwidth, the bound a
 * memory-bound decode step is measured against: a decode step must read
 * every weight and its KV once, so tokens/s <= bandwidth / bytes per token.
 *
 * Each thread sums its contiguous share of a buffer far larger than the
 * caches with 16-byte vector loads and eight independent accumulators, so
 * the loop is limited by memory, not by the add chain. The buffer is written
 * once first (faults its pages in, so no pass pays for page faults).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bench_ref.h"
#include "entrokv/generate.h"

typedef uint64_t v2u64 __attribute__((vector_size(16)));

typedef struct bw_job {
    const v2u64 *p;
    size_t n; /* vectors */
    uint64_t sum;
} bw_job;

static void *bw_read(void *arg)
{
    bw_job *j = arg;
    v2u64 a[8] = {{0}};
    size_t i = 0;
    for (; i + 8 <= j->n; i += 8)
        for (int k = 0; k < 8; k++)
            a[k] += j->p[i + k];
    for (; i < j->n; i++)
        a[0] += j->p[i];
    v2u64 s = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
    j->sum = s[0] + s[1];
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

bool bench_read_bandwidth(int threads, size_t bytes, int passes, double *best, double *median)
{
    if (threads < 1 || threads > 256 || passes < 1 || passes > 100 || bytes < 4096)
        return false;
    const size_t n = bytes / sizeof(v2u64), share = n / (size_t)threads;
    v2u64 *buf = aligned_alloc(64, n * sizeof(v2u64));
    double *bw = malloc((size_t)passes * sizeof *bw);
    bw_job *jobs = calloc((size_t)threads, sizeof *jobs);
    pthread_t *tid = calloc((size_t)threads, sizeof *tid);
    bool ok = buf && bw && jobs && tid;
    if (ok)
        memset(buf, 1, n * sizeof(v2u64));
    uint64_t sink = 0;
    for (int p = 0; ok && p < passes; p++) {
        double t0 = gen_now();
        int started = 0;
        for (int t = 0; t < threads; t++) {
            jobs[t] = (bw_job){.p = buf + (size_t)t * share,
                               .n = t == threads - 1 ? n - (size_t)t * share : share};
            if (t > 0 && pthread_create(&tid[t], NULL, bw_read, &jobs[t]) != 0)
                break;
            started++;
        }
        if (started == threads)
            bw_read(&jobs[0]);
        for (int t = 1; t < started; t++)
            pthread_join(tid[t], NULL);
        double dt = gen_now() - t0;
        ok = started == threads;
        for (int t = 0; t < threads; t++)
            sink += jobs[t].sum;
        bw[p] = (double)(n * sizeof(v2u64)) / dt;
    }
    /* every byte is 1, so the sums are known: a check that all were read */
    ok = ok && sink == (uint64_t)passes * (n * sizeof(v2u64) / 8) * 0x0101010101010101ull;
    if (ok) {
        qsort(bw, (size_t)passes, sizeof *bw, cmp_double);
        *best = bw[passes - 1];
        *median = bw[passes / 2];
    }
    free(tid);
    free(jobs);
    free(bw);
    free(buf);
    return ok;
}
