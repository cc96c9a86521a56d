/*
 * cuda_test.h - what the CUDA tests share: skipping (exit 77) without a
 * device, a deterministic random source, and device buffer helpers that
 * count a failed CUDA call as a test failure instead of aborting.
 */
#ifndef EKV_CUDA_TEST_H
#define EKV_CUDA_TEST_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/cuda.h"

#define EKV_SKIP 77

static ekv_cuda *g_ctx;
static ekv_error g_err;

/* Returns 77 from main when there is no device; otherwise creates g_ctx. */
#define CUDA_TEST_INIT()                                                                   \
    do {                                                                                   \
        if (!ekv_cuda_available()) {                                                       \
            printf("skip: %s\n", ekv_cuda_unavailable_reason());                          \
            return EKV_SKIP;                                                               \
        }                                                                                  \
        if (ekv_cuda_create(0, &g_ctx, &g_err) != EKV_OK) {                                \
            fprintf(stderr, "cannot create a CUDA context: %s\n", g_err.msg);              \
            return 1;                                                                      \
        }                                                                                  \
        ekv_cuda_info info_;                                                               \
        if (ekv_cuda_get_info(g_ctx, &info_, &g_err) == EKV_OK)                            \
            fprintf(stderr, "device: %s, %d SMs, sm_%d%d\n", info_.name, info_.sm_count,   \
                    info_.cc_major, info_.cc_minor);                                       \
    } while (0)

#define CUDA_TEST_EXIT()                                                                   \
    do {                                                                                   \
        ekv_cuda_destroy(g_ctx);                                                           \
        fprintf(stderr, "%d failure(s)\n", ekv_test_failures);                             \
        return ekv_test_failures ? 1 : 0;                                                  \
    } while (0)

/* A call that must succeed; prints the error message otherwise. */
#define CHECK_OK(call)                                                                     \
    do {                                                                                   \
        ekv_status st_ = (call);                                                           \
        if (st_ != EKV_OK) {                                                               \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,           \
                    g_err.msg);                                                            \
            ekv_test_failures++;                                                           \
        }                                                                                  \
    } while (0)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static inline uint32_t rnd_u32(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}

/* uniform in [lo, hi) */
static inline float rnd_f(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rnd_u32() & 0xFFFFFF) / 16777216.0f;
}

static inline void rnd_fill(float *x, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rnd_f(lo, hi);
}

/* Device copy of n bytes of host data (NULL, counted as a failure, on error). */
static inline void *dev_from(const void *src, size_t bytes)
{
    void *d = NULL;
    if (ekv_cuda_malloc(g_ctx, bytes, &d, &g_err) != EKV_OK) {
        fprintf(stderr, "device alloc of %zu bytes failed: %s\n", bytes, g_err.msg);
        ekv_test_failures++;
        return NULL;
    }
    if (src && bytes && ekv_cuda_to_device(g_ctx, d, src, bytes, &g_err) != EKV_OK) {
        fprintf(stderr, "copy to device failed: %s\n", g_err.msg);
        ekv_test_failures++;
    }
    return d;
}

static inline void *dev_zero(size_t bytes)
{
    void *d = dev_from(NULL, bytes);
    if (d && bytes)
        ekv_cuda_memset(g_ctx, d, 0, bytes, &g_err);
    return d;
}

/* Waits for the stream, then copies device memory back. */
static inline void dev_to_host(void *dst, const void *src, size_t bytes)
{
    if (ekv_cuda_sync(g_ctx, &g_err) != EKV_OK ||
        ekv_cuda_to_host(g_ctx, dst, src, bytes, &g_err) != EKV_OK) {
        fprintf(stderr, "copy to host failed: %s\n", g_err.msg);
        ekv_test_failures++;
    }
}

/* |a - b| <= atol + rtol |b| over n floats; prints the first few misses. */
static inline int near_all(const char *what, const float *a, const float *b, size_t n, double atol,
                           double rtol)
{
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= atol + rtol * fabs((double)b[i]))) {
            if (bad < 5)
                fprintf(stderr, "  %s[%zu]: gpu %.9g vs cpu %.9g\n", what, i, a[i], b[i]);
            bad++;
        }
    }
    if (bad) {
        fprintf(stderr, "%s: %d of %zu values differ\n", what, bad, n);
        ekv_test_failures++;
    }
    return bad;
}

#endif
