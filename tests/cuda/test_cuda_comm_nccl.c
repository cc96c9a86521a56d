/*
 * test_cuda_comm_nccl.c - the NCCL communicator (comm/comm_nccl.c) on one
 * GPU: a one-rank group bootstrapped over the local communicator, its
 * collectives on device buffers (a one-rank allreduce is the identity, an
 * allgather a copy, a broadcast nothing), the barrier, and the byte counter
 * (nothing leaves a one-rank group). NCCL refuses two ranks on one device,
 * so groups of several GPUs are left to a machine that has them. Exits 77
 * without a device.
 */
#include "cuda_test.h"
#include "entrokv/comm.h"

static void test_one_rank_nccl_group_on_device_buffers(void)
{
    ekv_comm *boot = comm_open_local(&g_err);
    ekv_comm *c = comm_open_nccl(boot, 0, &g_err);
    if (!c) {
        fprintf(stderr, "comm_open_nccl: %s\n", g_err.msg);
        ekv_test_failures++;
        comm_free(boot);
        return;
    }
    CHECK_STR(comm_backend_name(c), "nccl");
    CHECK_EQ_INT(comm_size(c), 1);
    enum { N = 1000, B = 13 };
    float host[N], back[N];
    for (int i = 0; i < N; i++)
        host[i] = rnd_f(-4.0f, 4.0f);
    float *d = NULL;
    unsigned char *g = NULL;
    CHECK_OK(ekv_cuda_malloc(g_ctx, N * sizeof(float), (void **)&d, &g_err));
    CHECK_OK(ekv_cuda_malloc(g_ctx, 2 * B, (void **)&g, &g_err));
    CHECK_OK(ekv_cuda_to_device(g_ctx, d, host, sizeof host, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    CHECK_OK(comm_allreduce_sum_f32(c, d, N, &g_err));
    CHECK_OK(ekv_cuda_to_host(g_ctx, back, d, sizeof back, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    CHECK(memcmp(host, back, sizeof host) == 0);
    unsigned char part[B], got[B];
    for (int j = 0; j < B; j++)
        part[j] = (unsigned char)(7 * j + 1);
    CHECK_OK(ekv_cuda_to_device(g_ctx, g, part, B, &g_err));
    CHECK_OK(ekv_cuda_memset(g_ctx, g + B, 0, B, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    CHECK_OK(comm_allgather(c, g, B, g + B, &g_err));
    CHECK_OK(comm_broadcast(c, g + B, B, 0, &g_err));
    CHECK_OK(ekv_cuda_to_host(g_ctx, got, g + B, B, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    CHECK(memcmp(part, got, B) == 0);
    CHECK_OK(comm_barrier(c, &g_err));
    CHECK_EQ_INT(comm_bytes_sent(c), 0);
    CHECK(!comm_broken(c));
    ekv_cuda_free(d);
    ekv_cuda_free(g);
    comm_free(c);
    comm_free(boot);
}

int main(void)
{
    CUDA_TEST_INIT();
    RUN_TEST(test_one_rank_nccl_group_on_device_buffers);
    CUDA_TEST_EXIT();
}
