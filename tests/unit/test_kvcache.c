/*
 * test_kvcache.c - block pool accounting, per-head ragged lists, keep/compact
 * and release of blocks.
 */
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kvcache.h"

#define D 8
#define BT 4

static void fill(float *x, float base)
{
    for (int j = 0; j < D; j++)
        x[j] = base + j * 0.25f;
}

static void test_append_allocates_blocks_per_head(void)
{
    kv_pool *pool = kv_pool_create(BT, D, 64, NULL);
    kv_seq *seq = kv_seq_create(pool, 2, 3, NULL);
    float k[D], v[D];
    CHECK_EQ_INT(kv_seq_blocks_needed(seq, 5), 2 * 3 * 2);
    for (int t = 0; t < 5; t++) {
        fill(k, (float)t);
        fill(v, -(float)t);
        CHECK(kv_seq_append(seq, 1, 2, k, v, t, NULL) == EKV_OK);
    }
    CHECK_EQ_INT(kv_seq_len(seq, 1, 2), 5);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 0), 0);
    CHECK_EQ_INT(kv_seq_blocks(seq), 2);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 62);
    CHECK_EQ_INT(kv_seq_next_pos(seq), 5);
    CHECK_EQ_INT(kv_seq_max_len(seq), 5);
    kern_kv_view view;
    kv_seq_view(seq, 1, 2, &view);
    CHECK_EQ_INT(view.n_tokens, 5);
    for (int t = 0; t < 5; t++) {
        CHECK_EQ_INT(view.pos_blocks[t / BT][t % BT], t);
        CHECK_NEAR(ekv_f16_to_f32(view.k_blocks[t / BT][3 * BT + t % BT]), t + 0.75f, 1e-3);
        CHECK_NEAR(ekv_f16_to_f32(view.v_blocks[t / BT][(t % BT) * D + 1]), -t + 0.25f, 1e-3);
    }
    kv_seq_free(seq);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 64);
    kv_pool_destroy(pool);
}

static void test_pool_exhaustion_is_an_error_not_a_crash(void)
{
    kv_pool *pool = kv_pool_create(BT, D, 2, NULL);
    kv_seq *seq = kv_seq_create(pool, 1, 1, NULL);
    float k[D] = {0}, v[D] = {0};
    ekv_error err = {0};
    for (int t = 0; t < 2 * BT; t++)
        CHECK(kv_seq_append(seq, 0, 0, k, v, t, NULL) == EKV_OK);
    CHECK(kv_seq_append(seq, 0, 0, k, v, 8, &err) == EKV_ENOMEM);
    CHECK(strstr(err.msg, "exhausted") != NULL);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 0), 2 * BT);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
}

static void test_keep_compacts_and_frees_blocks(void)
{
    kv_pool *pool = kv_pool_create(BT, D, 16, NULL);
    kv_seq *seq = kv_seq_create(pool, 1, 2, NULL);
    float k[D], v[D];
    for (int t = 0; t < 10; t++) {
        fill(k, (float)t);
        fill(v, 100.0f + t);
        CHECK(kv_seq_append(seq, 0, 0, k, v, 100 + t, NULL) == EKV_OK);
        CHECK(kv_seq_append(seq, 0, 1, k, v, 100 + t, NULL) == EKV_OK);
    }
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 16 - 6);
    const int32_t keep[] = {0, 3, 7, 9};
    CHECK(kv_seq_keep(seq, 0, 0, keep, 4, NULL) == EKV_OK);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 0), 4);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 1), 10); /* the other head is untouched */
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 16 - 3 - 1);
    kern_kv_view view;
    kv_seq_view(seq, 0, 0, &view);
    for (int i = 0; i < 4; i++) {
        CHECK_EQ_INT(view.pos_blocks[i / BT][i % BT], 100 + keep[i]);
        for (int j = 0; j < D; j++) /* the whole K column moved (K is [D][BT]) */
            CHECK_NEAR(ekv_f16_to_f32(view.k_blocks[i / BT][j * BT + i % BT]),
                       keep[i] + j * 0.25f, 1e-3);
        CHECK_NEAR(ekv_f16_to_f32(view.v_blocks[i / BT][(i % BT) * D]), 100 + keep[i], 0.07);
    }
    /* appending after a keep continues the compacted list */
    fill(k, 42.0f);
    CHECK(kv_seq_append(seq, 0, 0, k, v, 110, NULL) == EKV_OK);
    kv_seq_view(seq, 0, 0, &view);
    CHECK_EQ_INT(view.n_tokens, 5);
    CHECK_EQ_INT(view.pos_blocks[1][0], 110);
    CHECK_EQ_INT(kv_seq_next_pos(seq), 111);
    /* bad keep lists are rejected */
    const int32_t unsorted[] = {2, 1};
    CHECK(kv_seq_keep(seq, 0, 0, unsorted, 2, NULL) == EKV_EINVAL);
    const int32_t out_of_range[] = {0, 99};
    CHECK(kv_seq_keep(seq, 0, 0, out_of_range, 2, NULL) == EKV_EINVAL);
    CHECK(kv_seq_keep(seq, 0, 1, NULL, 0, NULL) == EKV_OK);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 1), 0);
    kv_seq_free(seq);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 16);
    kv_pool_destroy(pool);
}

static void test_bad_geometry_rejected(void)
{
    ekv_error err = {0};
    CHECK(kv_pool_create(0, D, 4, &err) == NULL);
    CHECK(kv_pool_create(BT, D, 0, &err) == NULL);
    kv_pool *pool = kv_pool_create(BT, D, 4, NULL);
    CHECK(kv_seq_create(pool, 0, 1, &err) == NULL);
    kv_pool_destroy(pool);
}

int main(void)
{
    RUN_TEST(test_append_allocates_blocks_per_head);
    RUN_TEST(test_pool_exhaustion_is_an_error_not_a_crash);
    RUN_TEST(test_keep_compacts_and_frees_blocks);
    RUN_TEST(test_bad_geometry_rejected);
    return TEST_EXIT();
}
