/*
 * test_cuda_weights.c - GGUF dequantization to fp16 on the GPU against the
 * CPU's kern_get_row (every supported type, odd row counts, one row), and
 * the cuBLAS fp16 GEMM / GEMV against a double-precision C product of the
 * same fp16 values.
 */
#include "cuda_test.h"

#include <string.h>

/* Random GGUF rows of a type, with sane fp16 scales. */
static uint8_t *random_rows(uint32_t type, int64_t n, int64_t k, size_t *row_bytes)
{
    uint64_t rb = 0;
    ekv_dtype_row_bytes(type, (uint64_t)k, &rb);
    *row_bytes = (size_t)rb;
    uint8_t *w = malloc((size_t)rb * n);
    for (size_t i = 0; i < (size_t)rb * n; i++)
        w[i] = (uint8_t)rnd_u32();
    const ekv_dtype_info *info = ekv_dtype_get(type);
    const size_t bb = info->block_bytes, nblk = (size_t)rb * n / bb;
    for (size_t b = 0; b < nblk; b++) {
        uint8_t *p = w + b * bb;
        ekv_f16 h1 = ekv_f32_to_f16(rnd_f(-0.05f, 0.05f)), h2 = ekv_f32_to_f16(rnd_f(-0.05f, 0.05f));
        switch (type) {
        case EKV_F32:
            for (size_t i = 0; i < bb / 4; i++) {
                const float f = rnd_f(-2, 2);
                memcpy(p + 4 * i, &f, 4);
            }
            break;
        case EKV_F16:
            memcpy(p, &h1, 2);
            break;
        case EKV_Q4_1:
        case EKV_Q4_K:
            memcpy(p, &h1, 2);
            memcpy(p + 2, &h2, 2);
            break;
        case EKV_Q6_K:
            memcpy(p + 208, &h1, 2);
            break;
        default: /* Q4_0, Q8_0 */
            memcpy(p, &h1, 2);
            break;
        }
    }
    return w;
}

static void check_dequant(uint32_t type, int64_t n, int64_t k)
{
    size_t rb;
    uint8_t *w = random_rows(type, n, k, &rb);
    float *ref = malloc((size_t)(n * k) * sizeof *ref), *got = malloc((size_t)(n * k) * sizeof *got);
    ekv_f16 *half = malloc((size_t)(n * k) * sizeof *half);
    for (int64_t r = 0; r < n; r++)
        CHECK_OK(kern_get_row(w, type, k, r, ref + r * k, &g_err));
    for (int64_t i = 0; i < n * k; i++) /* the device stores fp16 */
        ref[i] = ekv_f16_to_f32(ekv_f32_to_f16(ref[i]));
    ekv_f16 *d_half = NULL;
    CHECK_OK(ekv_cuda_upload_weight(g_ctx, w, type, n, k, &d_half, &g_err));
    if (d_half) {
        dev_to_host(half, d_half, (size_t)(n * k) * sizeof *half);
        for (int64_t i = 0; i < n * k; i++)
            got[i] = ekv_f16_to_f32(half[i]);
        char what[64];
        snprintf(what, sizeof what, "dequant %s %lldx%lld", ekv_dtype_get(type)->name,
                 (long long)n, (long long)k);
        /* one fp16 ulp: the CPU's float may round differently at a tie */
        near_all(what, got, ref, (size_t)(n * k), 1e-6, 1e-3);
    }
    ekv_cuda_free(d_half);
    free(w);
    free(ref);
    free(got);
    free(half);
}

static void test_dequant_matches_get_row(void)
{
    const uint32_t types[] = {EKV_F32, EKV_F16, EKV_Q4_0, EKV_Q4_1, EKV_Q8_0, EKV_Q4_K, EKV_Q6_K};
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        CHECK(ekv_cuda_dequant_supports(types[t]));
        check_dequant(types[t], 1, 256);
        check_dequant(types[t], 7, 512);
        check_dequant(types[t], 33, 768);
    }
    CHECK(!ekv_cuda_dequant_supports(EKV_Q5_0));
    ekv_f16 *out = NULL;
    CHECK(ekv_cuda_upload_weight(g_ctx, "x", EKV_Q4_0, 1, 33, &out, &g_err) == EKV_EINVAL);
}

static void check_matmul(int64_t n, int64_t k, int64_t m)
{
    float *w = malloc((size_t)(n * k) * 4), *x = malloc((size_t)(m * k) * 4);
    ekv_f16 *wh = malloc((size_t)(n * k) * 2), *xh = malloc((size_t)(m * k) * 2);
    float *y = malloc((size_t)(m * n) * 4), *ref = malloc((size_t)(m * n) * 4);
    for (int64_t i = 0; i < n * k; i++)
        wh[i] = ekv_f32_to_f16(rnd_f(-1, 1));
    for (int64_t i = 0; i < m * k; i++)
        xh[i] = ekv_f32_to_f16(rnd_f(-1, 1));
    for (int64_t i = 0; i < n * k; i++)
        w[i] = ekv_f16_to_f32(wh[i]);
    for (int64_t i = 0; i < m * k; i++)
        x[i] = ekv_f16_to_f32(xh[i]);
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < n; c++) {
            double s = 0;
            for (int64_t j = 0; j < k; j++)
                s += (double)x[r * k + j] * w[c * k + j];
            ref[r * n + c] = (float)s;
        }
    void *dw = dev_from(wh, (size_t)(n * k) * 2), *dx = dev_from(xh, (size_t)(m * k) * 2);
    float *dy = dev_zero((size_t)(m * n) * 4);
    CHECK_OK(ekv_cuda_matmul(g_ctx, dw, n, k, dx, m, dy, n, &g_err));
    dev_to_host(y, dy, (size_t)(m * n) * 4);
    char what[64];
    snprintf(what, sizeof what, "matmul n=%lld k=%lld m=%lld", (long long)n, (long long)k,
             (long long)m);
    /* fp32 accumulation of k products of magnitude <= 1 */
    near_all(what, y, ref, (size_t)(m * n), 1e-5 * (double)k, 1e-4);
    ekv_cuda_free(dw);
    ekv_cuda_free(dx);
    ekv_cuda_free(dy);
    free(w);
    free(x);
    free(wh);
    free(xh);
    free(y);
    free(ref);
}

static void test_matmul_matches_double_product(void)
{
    check_matmul(64, 64, 1);     /* decode GEMV */
    check_matmul(96, 136, 5);    /* odd shapes */
    check_matmul(1000, 4096, 1); /* long rows */
    check_matmul(512, 576, 33);
}

static void test_f32_to_f16_rounds_like_host(void)
{
    enum { N = 4097 };
    float *x = malloc(N * 4);
    ekv_f16 *got = malloc(N * 2);
    rnd_fill(x, N, -70000, 70000);
    x[0] = 1e-8f;
    x[1] = 65520.0f; /* rounds to inf */
    float *dx = dev_from(x, N * 4);
    ekv_f16 *dh = dev_zero(N * 2);
    CHECK_OK(ekv_cuda_f32_to_f16(g_ctx, dx, dh, N, &g_err));
    dev_to_host(got, dh, N * 2);
    int bad = 0;
    for (int i = 0; i < N; i++)
        bad += got[i] != ekv_f32_to_f16(x[i]);
    CHECK_EQ_INT(bad, 0);
    ekv_cuda_free(dx);
    ekv_cuda_free(dh);
    free(x);
    free(got);
}

int main(void)
{
    CUDA_TEST_INIT();
    RUN_TEST(test_dequant_matches_get_row);
    RUN_TEST(test_matmul_matches_double_product);
    RUN_TEST(test_f32_to_f16_rounds_like_host);
    CUDA_TEST_EXIT();
}
