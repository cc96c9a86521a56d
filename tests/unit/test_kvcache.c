/*
 * test_kvcache.c - block pool accounting, per-head ragged lists, keep/compact
 * and release of blocks.
 */
#include <stdlib.h>
#include <string.h>

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

/* Drops random tokens of a 37-token head, then puts them back from their
 * exported blocks (kv_block_token, kv_seq_insert): the head is byte-identical
 * to before; bad inserts and a full pool change nothing. */
static void test_insert_puts_evicted_tokens_back_in_place(void)
{
    enum { N = 37 };
    kv_pool *pool = kv_pool_create(BT, D, 64, NULL);
    kv_seq *seq = kv_seq_create(pool, 1, 1, NULL);
    float k[D], v[D];
    for (int t = 0; t < N; t++) {
        fill(k, (float)t);
        fill(v, -3.0f * t);
        CHECK(kv_seq_append(seq, 0, 0, k, v, 2 * t, NULL) == EKV_OK); /* positions 0, 2, 4.. */
    }
    const int32_t n_blocks = (N + BT - 1) / BT;
    const size_t bb = kv_pool_block_bytes(pool);
    uint8_t *before = calloc((size_t)n_blocks, bb);
    for (int32_t b = 0; b < n_blocks; b++)
        kv_seq_block_export(seq, 0, 0, b, before + (size_t)b * bb);
    srand(7);
    int32_t keep[N], n_keep = 0, gone[N], n_gone = 0;
    for (int t = 0; t < N; t++) {
        if (t == 0 || t == N - 1 || rand() % 3 == 0)
            gone[n_gone++] = t;
        else
            keep[n_keep++] = t;
    }
    CHECK(kv_seq_keep(seq, 0, 0, keep, n_keep, NULL) == EKV_OK);
    ekv_f16 *kr = malloc((size_t)n_gone * D * sizeof *kr), *vr = malloc((size_t)n_gone * D * sizeof *vr);
    int32_t pos[N];
    for (int i = 0; i < n_gone; i++)
        pos[i] = kv_block_token(pool, before + (size_t)(gone[i] / BT) * bb, gone[i] % BT,
                                kr + (size_t)i * D, vr + (size_t)i * D);
    CHECK_EQ_INT(pos[0], 0);
    CHECK_EQ_INT(pos[n_gone - 1], 2 * (N - 1));
    /* refused: a position already held, unordered positions; nothing changes */
    int32_t held[N];
    kv_seq_positions(seq, 0, 0, held);
    CHECK(kv_seq_insert(seq, 0, 0, kr, vr, held, 1, NULL) == EKV_EINVAL);
    int32_t unordered[2] = {pos[1], pos[0]};
    CHECK(kv_seq_insert(seq, 0, 0, kr, vr, unordered, 2, NULL) == EKV_EINVAL);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 0), n_keep);
    CHECK(kv_seq_insert(seq, 0, 0, kr, vr, pos, n_gone, NULL) == EKV_OK);
    CHECK_EQ_INT(kv_seq_len(seq, 0, 0), N);
    uint8_t *after = calloc((size_t)n_blocks, bb);
    for (int32_t b = 0; b < n_blocks; b++)
        CHECK_EQ_INT(kv_seq_block_export(seq, 0, 0, b, after + (size_t)b * bb),
                     b < n_blocks - 1 ? BT : N - (n_blocks - 1) * BT);
    CHECK(memcmp(before, after, (size_t)n_blocks * bb) == 0);
    /* a pool without room: ENOMEM, nothing changes */
    kv_pool *tiny = kv_pool_create(BT, D, 2, NULL);
    kv_seq *s2 = kv_seq_create(tiny, 1, 1, NULL);
    fill(k, 1);
    CHECK(kv_seq_append(s2, 0, 0, k, v, 1000, NULL) == EKV_OK);
    ekv_error err = {0};
    CHECK(kv_seq_insert(s2, 0, 0, kr, vr, pos, n_gone, &err) == EKV_ENOMEM);
    CHECK_EQ_INT(kv_seq_len(s2, 0, 0), 1);
    CHECK_EQ_INT(kv_pool_free_blocks(tiny), 1);
    kv_seq_free(s2);
    kv_pool_destroy(tiny);
    free(kr);
    free(vr);
    free(before);
    free(after);
    kv_seq_free(seq);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 64);
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
    RUN_TEST(test_insert_puts_evicted_tokens_back_in_place);
    RUN_TEST(test_bad_geometry_rejected);
    return TEST_EXIT();
}
