/*
 * bench_cuda_spark.c - the `cuda-spark` lines of `entrokv bench
 * cuda-attention` (bench_cuda.c): SparK's packed-key decode attention
 * (ekv_cuda_decode_packed) in the same Llama-3.1-8B shapes (32 / 8 heads,
 * head_dim 128), every prompt token packed at pruning ratios 0.5 and 0.8
 * with "avg" recovery, against the dense decode kernel's time on the same
 * context and batch measured earlier in the same run (its default,
 * tensor-core kernel: the strongest dense configuration). Reports ms,
 * bytes held and read (packed rows + V + positions), GB/s, the fraction of
 * HBM peak and the ratio to dense.
 *
 * Rows are kern_packed_encode'd from random keys and random channel sets
 * (each token its own, as SparK's are), so the kernel's per-lane branches
 * diverge as they would on real keys; V is zero and every position visible.
 * Each head gets its own copy of the prefix in HBM (no head reads another's
 * from L2). Built only with EKV_HAVE_CUDA.
 */
#ifdef EKV_HAVE_CUDA
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/cuda.h"

#define SPK_NQ 32
#define SPK_NKV 8
#define SPK_D 128

int bench_cuda_spark(ekv_cuda *ctx, const char *device, double hbm, const int32_t *contexts,
                     int n_contexts, const int32_t *batches, int n_batches, int32_t iters,
                     bool json, const double *dense_ms, int stride);

/* Everything one timed configuration holds on the device. */
typedef struct spark_setup {
    ekv_cuda_kv_pool *pool; /* one dummy block: no dense tail */
    ekv_cuda_kv_heads heads;
    ekv_cuda_packed_head *dph;
    uint8_t *prefix; /* every head's rows, V, positions, then 1/sqrt(c) */
    float *q, *out;
    int32_t *qpos;
    void *ws;
    int64_t bytes; /* read per step: rows + V + positions */
} spark_setup;

static void spark_free(spark_setup *s)
{
    ekv_cuda_kv_pool_destroy(s->pool);
    ekv_cuda_free((void *)s->heads.table);
    ekv_cuda_free((void *)s->heads.table_off);
    ekv_cuda_free((void *)s->heads.n_tokens);
    ekv_cuda_free(s->dph);
    ekv_cuda_free(s->prefix);
    ekv_cuda_free(s->q);
    ekv_cuda_free(s->out);
    ekv_cuda_free(s->qpos);
    ekv_cuda_free(s->ws);
    memset(s, 0, sizeof *s);
}

static uint64_t xs(uint64_t *x)
{
    *x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
    return *x;
}

/* One head's packed prefix on the host: n rows of n_keep random channels. */
static uint8_t *host_rows(int32_t n, int32_t n_keep, size_t rb, uint64_t *x)
{
    uint8_t *rows = malloc((size_t)n * rb);
    if (!rows)
        return NULL;
    float k[SPK_D];
    int perm[SPK_D];
    for (int32_t t = 0; t < n; t++) {
        uint8_t mask[SPK_D / 8] = {0};
        for (int j = 0; j < SPK_D; j++) {
            k[j] = (float)(xs(x) % 2001) / 1000.0f - 1.0f;
            perm[j] = j;
        }
        for (int j = SPK_D - 1; j > 0; j--) {
            const int r = (int)(xs(x) % (uint64_t)(j + 1)), tmp = perm[j];
            perm[j] = perm[r];
            perm[r] = tmp;
        }
        for (int j = 0; j < n_keep; j++)
            mask[perm[j] / 8] |= (uint8_t)(1u << (perm[j] % 8));
        kern_packed_encode(rows + (size_t)t * rb, k, mask, 0.5f, SPK_D, n_keep);
    }
    return rows;
}

static void *dev_alloc(ekv_cuda *ctx, size_t bytes, const void *src, ekv_status *rc,
                       ekv_error *err)
{
    void *d = NULL;
    if (*rc == EKV_OK)
        *rc = ekv_cuda_malloc(ctx, bytes ? bytes : 4, &d, err);
    if (*rc == EKV_OK && src)
        *rc = ekv_cuda_to_device(ctx, d, src, bytes, err);
    else if (*rc == EKV_OK)
        *rc = ekv_cuda_memset(ctx, d, 0, bytes ? bytes : 4, err);
    return d;
}

static ekv_status spark_setup_make(ekv_cuda *ctx, int32_t n, int batch, int32_t n_keep,
                                   spark_setup *s, ekv_error *err)
{
    memset(s, 0, sizeof *s);
    const int H = batch * SPK_NKV;
    const size_t rb = kern_packed_row_bytes(SPK_D, n_keep);
    const size_t rows_b = ((size_t)n * rb + 15) & ~(size_t)15;
    const size_t v_b = (size_t)n * SPK_D * 2, pos_b = ((size_t)n * 4 + 15) & ~(size_t)15;
    const size_t per_head = rows_b + v_b + pos_b;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    uint8_t *rows = host_rows(n, n_keep, rb, &x);
    ekv_cuda_packed_head *ph = calloc((size_t)H, sizeof *ph);
    int32_t *off = calloc((size_t)H, 4), *len = malloc((size_t)H * 4);
    float *q = malloc((size_t)batch * SPK_NQ * SPK_D * 4), isc[SPK_D];
    int32_t *qpos = malloc((size_t)batch * 4);
    ekv_status rc = rows && ph && off && len && q && qpos
                        ? EKV_OK
                        : ekv_error_set(err, EKV_ENOMEM, "bench: out of host memory");
    if (rc == EKV_OK)
        rc = ekv_cuda_kv_pool_create(ctx, 16, SPK_D, 1, &s->pool, err);
    s->prefix = dev_alloc(ctx, (size_t)H * per_head + SPK_D * 4, NULL, &rc, err);
    for (int i = 0; rc == EKV_OK && i < H; i++) { /* each head its own copy */
        uint8_t *base = s->prefix + (size_t)i * per_head;
        rc = ekv_cuda_to_device(ctx, base, rows, (size_t)n * rb, err);
        ph[i] = (ekv_cuda_packed_head){.n = n, .n_keep = n_keep, .row_bytes = (int32_t)rb,
                                       .rows = base, .v = (const ekv_f16 *)(base + rows_b),
                                       .pos = (const int32_t *)(base + rows_b + v_b),
                                       .inv_sqrt_c = (const float *)(s->prefix + (size_t)H * per_head)};
        len[i] = n;
    }
    for (int j = 0; j < SPK_D; j++)
        isc[j] = 1.0f / sqrtf(0.05f + (float)(xs(&x) % 1000) / 333.0f);
    if (rc == EKV_OK)
        rc = ekv_cuda_to_device(ctx, s->prefix + (size_t)H * per_head, isc, sizeof isc, err);
    for (int i = 0; q && i < batch * SPK_NQ * SPK_D; i++)
        q[i] = (float)(xs(&x) % 2001) / 1000.0f - 1.0f;
    for (int b = 0; qpos && b < batch; b++)
        qpos[b] = n;
    const int32_t zero = 0;
    s->heads.n_heads = H;
    s->heads.table = dev_alloc(ctx, 4, &zero, &rc, err);
    s->heads.table_off = dev_alloc(ctx, (size_t)H * 4, off, &rc, err);
    s->heads.n_tokens = dev_alloc(ctx, (size_t)H * 4, len, &rc, err);
    s->dph = dev_alloc(ctx, (size_t)H * sizeof *ph, ph, &rc, err);
    s->q = dev_alloc(ctx, (size_t)batch * SPK_NQ * SPK_D * 4, q, &rc, err);
    s->out = dev_alloc(ctx, (size_t)batch * SPK_NQ * SPK_D * 4, NULL, &rc, err);
    s->qpos = dev_alloc(ctx, (size_t)batch * 4, qpos, &rc, err);
    s->ws = dev_alloc(ctx, ekv_cuda_decode_workspace(batch, SPK_NKV, SPK_NQ, SPK_D, n), NULL, &rc,
                      err);
    s->bytes = (int64_t)H * n * (int64_t)(rb + 2 * SPK_D + 4);
    free(rows);
    free(ph);
    free(off);
    free(len);
    free(q);
    free(qpos);
    if (rc != EKV_OK)
        spark_free(s);
    return rc;
}

static ekv_status spark_time(ekv_cuda *ctx, int32_t n, int batch, int32_t n_keep, int32_t iters,
                             double *ms, int64_t *bytes, ekv_error *err)
{
    spark_setup s;
    ekv_status rc = spark_setup_make(ctx, n, batch, n_keep, &s, err);
    const float scale = 1.0f / sqrtf((float)SPK_D);
    for (int i = 0; rc == EKV_OK && i < iters + 3; i++) { /* 3 warm-up steps, then timed */
        if (i == 3)
            rc = ekv_cuda_timer_start(ctx, err);
        if (rc == EKV_OK)
            rc = ekv_cuda_decode_packed(ctx, s.pool, &s.heads, s.dph, batch, SPK_NKV, SPK_NQ, s.q,
                                        s.qpos, n, scale, s.out, s.ws, err);
    }
    double total = 0;
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &total, err);
    *ms = total / iters;
    *bytes = s.bytes;
    if (s.pool)
        spark_free(&s);
    return rc;
}

/* dense_ms[ci * stride + bi]: the dense kernel's ms on that shape (0: not measured). */
int bench_cuda_spark(ekv_cuda *ctx, const char *device, double hbm, const int32_t *contexts,
                     int n_contexts, const int32_t *batches, int n_batches, int32_t iters,
                     bool json, const double *dense_ms, int stride)
{
    static const double RATIOS[2] = {0.5, 0.8};
    int failures = 0;
    ekv_error err = {0};
    for (int ri = 0; ri < 2; ri++)
        for (int ci = 0; ci < n_contexts; ci++)
            for (int bi = 0; bi < n_batches; bi++) {
                /* spec section 1: n_keep = D - int(r D) */
                const int32_t n_keep = SPK_D - (int32_t)(RATIOS[ri] * SPK_D);
                double ms = 0;
                int64_t bytes = 0;
                if (spark_time(ctx, contexts[ci], batches[bi], n_keep, iters, &ms, &bytes, &err) !=
                    EKV_OK) {
                    fprintf(stderr, "  spark ctx %d batch %d ratio %.1f: %s\n", contexts[ci],
                            batches[bi], RATIOS[ri], err.msg);
                    failures++;
                    continue;
                }
                const double gbps = ms > 0 ? (double)bytes / (ms * 1e-3) / 1e9 : 0;
                const double dense = dense_ms[ci * stride + bi];
                if (json)
                    printf("{\"bench\":\"cuda-spark\",\"engine\":\"entrokv\",\"device\":\"%s\","
                           "\"context\":%d,\"batch\":%d,\"ratio\":%.1f,\"n_keep\":%d,"
                           "\"recovery\":\"avg\",\"ms\":%.4f,\"bytes\":%lld,\"gbps\":%.1f,"
                           "\"frac_hbm\":%.3f,\"ratio_vs\":\"dense tensor-core decode\","
                           "\"dense_ms\":%.4f,\"speedup_vs_dense\":%.3f}\n",
                           device, contexts[ci], batches[bi], RATIOS[ri], n_keep, ms,
                           (long long)bytes, gbps, gbps / hbm, dense,
                           dense > 0 && ms > 0 ? dense / ms : 0);
                fprintf(stderr, "  spark %.1f   ctx %6d batch %3d packed KV: %8.3f ms  %7.1f GB/s"
                        "  %5.1f%% of HBM  (dense %.3f ms: x%.2f)\n", RATIOS[ri], contexts[ci],
                        batches[bi], ms, gbps, 100.0 * gbps / hbm, dense,
                        dense > 0 && ms > 0 ? dense / ms : 0);
            }
    return failures;
}
#else
typedef int bench_cuda_spark_unused; /* ISO C wants a non-empty file */
#endif
