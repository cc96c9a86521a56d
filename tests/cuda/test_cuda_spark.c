/*
 * test_cuda_spark.c - decode attention over SparK's packed keys
 * (ekv_cuda_decode_packed, kernels/cuda/spark.cu) against the CPU's
 * kern_attention over the very same heads (it takes kern_attend_packed,
 * kernels/cpu/attention_packed.c, for packed views): every case of
 * spark_fixture.h - pruning ratios 0.5 and 0.8 (and 0 and 1 at the edges),
 * "avg" and zero-fill recovery, GQA groups 1, 2, 4 and 8, head_dim 64, 128
 * and 256, odd token counts, heads without packed or without dense tokens,
 * gaps in positions, the newest tokens masked, 4k-token heads, peaked
 * softmaxes. Tolerance per output element: |gpu - cpu| <= 2e-5 + 1e-4 |cpu|,
 * the dense decode test's (both sides rebuild keys in fp32 exactly alike;
 * they differ in summation order, FMA and exp only). Also the upload path
 * and what it and the kernel refuse. cuda.test_cpu_reference checks
 * kern_attention on these cases against a double brute force, and the
 * kernel's row reading (spark_row.h) against the spec, where no GPU is.
 * Exits 77 (skipped) without a device.
 */
#include "cuda_test.h"

#include "spark_fixture.h"

static void check_case(int ci)
{
    const spark_case *cs = &SPARK_CASES[ci];
    spark_heads sh;
    CHECK_OK(spark_heads_make(&sh, cs, 0, &g_err));
    if (!sh.pool)
        return;
    const int H = cs->n_seq * cs->n_kv, d = cs->d, n_qh = cs->n_kv * cs->group;
    int64_t blocks = 1;
    for (int i = 0; i < H; i++)
        blocks += cs->tail[i] / 16 + 1;
    ekv_cuda_kv_pool *dpool = NULL;
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, d, blocks, &dpool, &g_err));
    if (!dpool) {
        spark_heads_free(&sh);
        return;
    }
    int32_t *table = calloc((size_t)blocks, sizeof *table), off[8], len[8], used = 0;
    ekv_cuda_packed_head ph[8];
    memset(ph, 0, sizeof ph);
    for (int s = 0; s < cs->n_seq; s++)
        for (int h = 0; h < cs->n_kv; h++) {
            const int i = s * cs->n_kv + h;
            kern_kv_view view;
            kv_seq_view(sh.seqs[s], 0, h, &view);
            CHECK_EQ_INT(view.n_tokens, sh.len[i]);
            CHECK_OK(ekv_cuda_kv_upload_packed(dpool, &view, &ph[i], table + used, &g_err));
            CHECK_EQ_INT(ph[i].n, cs->packed[i]);
            off[i] = used;
            len[i] = view.n_tokens;
            used += (view.n_tokens - ph[i].n + 15) / 16;
        }
    const size_t qn = (size_t)cs->n_seq * n_qh * d;
    float *Q = malloc(qn * 4), *ref = malloc(qn * 4), *got = malloc(qn * 4);
    float *scores = malloc(KERN_ATTN_SCRATCH(sh.max_len + 1) * 4);
    int32_t qpos[8];
    rnd_fill(Q, qn, -cs->qmag, cs->qmag);
    const float scale = 1.0f / sqrtf((float)d);
    for (int s = 0; s < cs->n_seq; s++) {
        qpos[s] = kv_seq_next_pos(sh.seqs[s]) - cs->qpos_minus;
        for (int qh = 0; qh < n_qh; qh++) {
            kern_kv_view view;
            kv_seq_view(sh.seqs[s], 0, qh / cs->group, &view);
            kern_attention(&view, Q + ((size_t)s * n_qh + qh) * d, 1, d, &qpos[s], scale,
                           ref + ((size_t)s * n_qh + qh) * d, d, scores);
        }
    }
    ekv_cuda_kv_heads dev = {H, dev_from(table, (size_t)blocks * 4), dev_from(off, (size_t)H * 4),
                             dev_from(len, (size_t)H * 4)};
    ekv_cuda_packed_head *dph = dev_from(ph, (size_t)H * sizeof *ph);
    void *dws = dev_zero(ekv_cuda_decode_workspace(cs->n_seq, cs->n_kv, n_qh, d, sh.max_len));
    float *dQ = dev_from(Q, qn * 4), *dout = dev_zero(qn * 4);
    int32_t *dpos = dev_from(qpos, (size_t)cs->n_seq * 4);
    CHECK_OK(ekv_cuda_decode_packed(g_ctx, dpool, &dev, dph, cs->n_seq, cs->n_kv, n_qh, dQ, dpos,
                                    sh.max_len, scale, dout, dws, &g_err));
    dev_to_host(got, dout, qn * 4);
    char what[160];
    snprintf(what, sizeof what, "packed decode case %d: seq=%d kv=%d g=%d d=%d ratio=%.1f %s gaps=%d q=%g",
             ci, cs->n_seq, cs->n_kv, cs->group, d, cs->ratio, cs->avg ? "avg" : "zero", cs->gaps,
             cs->qmag);
    near_all(what, got, ref, qn, 2e-5, 1e-4);
    ekv_cuda_free((void *)dev.table);
    ekv_cuda_free((void *)dev.table_off);
    ekv_cuda_free((void *)dev.n_tokens);
    ekv_cuda_free(dph);
    ekv_cuda_free(dws);
    ekv_cuda_free(dQ);
    ekv_cuda_free(dout);
    ekv_cuda_free(dpos);
    for (int i = 0; i < H; i++)
        ekv_cuda_packed_free(&ph[i]);
    ekv_cuda_kv_pool_destroy(dpool);
    spark_heads_free(&sh);
    free(table);
    free(Q);
    free(ref);
    free(got);
    free(scores);
}

static void test_packed_decode_matches_cpu(void)
{
    for (int ci = 0; ci < SPARK_N_CASES; ci++)
        check_case(ci);
}

/* The block-only upload refuses packed views; the packed upload refuses a
 * view of another geometry or a malformed prefix and then holds nothing. */
static void test_upload_refuses_what_it_cannot_hold(void)
{
    const spark_case cs = {1, 1, 1, 128, 0.5, 1, 0, 1.0f, 0, {40}, {20}};
    spark_heads sh;
    CHECK_OK(spark_heads_make(&sh, &cs, 0, &g_err));
    if (!sh.pool)
        return;
    kern_kv_view view;
    kv_seq_view(sh.seqs[0], 0, 0, &view);
    CHECK(view.packed != NULL);
    ekv_cuda_kv_pool *p128 = NULL, *p64 = NULL;
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, 128, 8, &p128, &g_err));
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, 64, 8, &p64, &g_err));
    int32_t ids[8];
    ekv_cuda_packed_head ph;
    /* the block-only upload cannot hold packed rows */
    CHECK(ekv_cuda_kv_upload_view(p128, &view, ids, &g_err) == EKV_EUNSUPPORTED);
    /* another head_dim than the pool's */
    CHECK(ekv_cuda_kv_upload_packed(p64, &view, &ph, ids, &g_err) == EKV_EINVAL);
    /* a malformed prefix: row size, more packed tokens than the head holds */
    kern_kv_packed bad = *view.packed;
    kern_kv_view bv = view;
    bv.packed = &bad;
    bad.row_bytes += 4;
    CHECK(ekv_cuda_kv_upload_packed(p128, &bv, &ph, ids, &g_err) == EKV_EINVAL);
    bad = *view.packed;
    bad.n = view.n_tokens + 1;
    CHECK(ekv_cuda_kv_upload_packed(p128, &bv, &ph, ids, &g_err) == EKV_EINVAL);
    CHECK(ph.mem == NULL);
    CHECK_EQ_INT(ekv_cuda_kv_free_blocks(p128), 8); /* nothing held after the refusals */
    /* and the good one: 40 packed, 20 in two blocks */
    CHECK_OK(ekv_cuda_kv_upload_packed(p128, &view, &ph, ids, &g_err));
    CHECK_EQ_INT(ph.n, 40);
    CHECK(ph.inv_sqrt_c != NULL);
    CHECK_EQ_INT(ekv_cuda_kv_free_blocks(p128), 6);
    ekv_cuda_packed_free(&ph);
    CHECK(ph.mem == NULL);
    ekv_cuda_kv_pool_destroy(p128);
    ekv_cuda_kv_pool_destroy(p64);
    spark_heads_free(&sh);
}

static void test_decode_refuses_unsupported(void)
{
    ekv_cuda_kv_pool *p = NULL;
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, 96, 4, &p, &g_err));
    ekv_cuda_kv_heads h = {1, NULL, NULL, NULL};
    CHECK(ekv_cuda_decode_packed(g_ctx, p, &h, NULL, 1, 1, 1, NULL, NULL, 1, 1.0f, NULL, NULL,
                                 &g_err) == EKV_EUNSUPPORTED); /* head_dim 96 */
    ekv_cuda_kv_pool_destroy(p);
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, 128, 4, &p, &g_err));
    CHECK(ekv_cuda_decode_packed(g_ctx, p, &h, NULL, 1, 1, 16, NULL, NULL, 1, 1.0f, NULL, NULL,
                                 &g_err) == EKV_EUNSUPPORTED); /* group 16 */
    CHECK(ekv_cuda_decode_packed(g_ctx, p, &h, NULL, 1, 2, 3, NULL, NULL, 1, 1.0f, NULL, NULL,
                                 &g_err) == EKV_EINVAL); /* 3 query heads over 2 KV heads */
    ekv_cuda_kv_pool_destroy(p);
}

int main(void)
{
    CUDA_TEST_INIT();
    kern_init();
    RUN_TEST(test_packed_decode_matches_cpu);
    RUN_TEST(test_upload_refuses_what_it_cannot_hold);
    RUN_TEST(test_decode_refuses_unsupported);
    CUDA_TEST_EXIT();
}
