/*
 * test_cuda_device.c - the context and memory layer: a context comes up with
 * sane device properties, errors come back as values with CUDA's message
 * (an impossible allocation is EKV_ENOMEM, not an abort), copies round-trip,
 * the device timer measures, pool ids are handed out and returned.
 */
#include "cuda_test.h"

static void test_info_is_sane(void)
{
    ekv_cuda_info info;
    CHECK_OK(ekv_cuda_get_info(g_ctx, &info, &g_err));
    CHECK(info.sm_count > 0);
    CHECK(info.total_mem > ((size_t)1 << 30));
    CHECK(info.hbm_gbps >= 0.0);
    if (info.hbm_gbps < 100.0) /* the bench then falls back to a table by name */
        fprintf(stderr, "  note: the driver reports no memory clock / bus width\n");
    fprintf(stderr, "  %s: %.0f GB/s peak, %.1f GiB\n", info.name, info.hbm_gbps,
            info.total_mem / 1073741824.0);
}

static void test_errors_are_values(void)
{
    void *p = NULL;
    ekv_error e = {0};
    CHECK(ekv_cuda_malloc(g_ctx, (size_t)1 << 50, &p, &e) == EKV_ENOMEM);
    CHECK(p == NULL);
    CHECK(strlen(e.msg) > 10);
    fprintf(stderr, "  message: %s\n", e.msg);
    /* the context still works afterwards */
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
}

static void test_copies_round_trip(void)
{
    enum { N = 100000 };
    int32_t *a = malloc(N * 4), *b = malloc(N * 4);
    for (int i = 0; i < N; i++)
        a[i] = i * 7 - 3;
    void *d = dev_from(a, N * 4);
    dev_to_host(b, d, N * 4);
    CHECK(memcmp(a, b, N * 4) == 0);
    CHECK_OK(ekv_cuda_memset(g_ctx, d, 0, N * 4, &g_err));
    dev_to_host(b, d, N * 4);
    CHECK(b[0] == 0 && b[N - 1] == 0);
    double ms = -1;
    CHECK_OK(ekv_cuda_timer_start(g_ctx, &g_err));
    CHECK_OK(ekv_cuda_memset(g_ctx, d, 1, N * 4, &g_err));
    CHECK_OK(ekv_cuda_timer_stop(g_ctx, &ms, &g_err));
    CHECK(ms >= 0 && ms < 1000);
    ekv_cuda_free(d);
    free(a);
    free(b);
}

static void test_pool_ids(void)
{
    ekv_cuda_kv_pool *p = NULL;
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, 128, 10, &p, &g_err));
    if (!p)
        return;
    CHECK_EQ_INT(ekv_cuda_kv_block_bytes(p), 8256); /* as kv/kvcache.c */
    int32_t ids[11];
    CHECK_OK(ekv_cuda_kv_alloc(p, 3, ids, &g_err));
    CHECK(ids[0] == 0 && ids[1] == 1 && ids[2] == 2);
    CHECK(ekv_cuda_kv_alloc(p, 8, ids + 3, &g_err) == EKV_ENOMEM);
    CHECK_EQ_INT(ekv_cuda_kv_free_blocks(p), 7);
    ekv_cuda_kv_release(p, ids, 3);
    CHECK_EQ_INT(ekv_cuda_kv_free_blocks(p), 10);
    ekv_cuda_kv_pool_destroy(p);
}

int main(void)
{
    CUDA_TEST_INIT();
    RUN_TEST(test_info_is_sane);
    RUN_TEST(test_errors_are_values);
    RUN_TEST(test_copies_round_trip);
    RUN_TEST(test_pool_ids);
    CUDA_TEST_EXIT();
}
