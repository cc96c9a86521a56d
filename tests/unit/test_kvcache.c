/*
 * test_kvcache.c - block pool accounting, per-head ragged lists, keep/compact
 * and release of blocks.
 */
#include <pthread.h>
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

/* Token t of (0, 0) as stored: its position and K/V rounded to fp16. */
static void check_token(const kv_seq *seq, int32_t t, float base)
{
    kern_kv_view view;
    kv_seq_view(seq, 0, 0, &view);
    const int32_t b = t / BT, r = t % BT;
    CHECK_EQ_INT(view.pos_blocks[b][r], (int)(base * 10));
    CHECK_NEAR(ekv_f16_to_f32(view.k_blocks[b][(size_t)2 * BT + r]), base + 0.5f, 1e-2);
    CHECK_NEAR(ekv_f16_to_f32(view.v_blocks[b][(size_t)r * D + 3]), -base + 0.75f, 1e-2);
}

static void append_tok(kv_seq *seq, float base)
{
    float k[D], v[D];
    fill(k, base);
    fill(v, -base);
    CHECK(kv_seq_append(seq, 0, 0, k, v, (int32_t)(base * 10), NULL) == EKV_OK);
}

/* A fork shares every block; the first write into a shared block copies it
 * for the writer, and the other holder still reads its own tokens. */
static void test_fork_shares_then_copies_on_write(void)
{
    kv_pool *pool = kv_pool_create(BT, D, 16, NULL);
    kv_seq *a = kv_seq_create(pool, 1, 1, NULL);
    for (int t = 0; t < 6; t++) /* one full block and half of a second */
        append_tok(a, (float)t);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 14);
    kv_seq *b = kv_seq_fork(a, NULL);
    CHECK(b != NULL);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 14); /* nothing copied */
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 2);
    CHECK_EQ_INT(kv_seq_len(b, 0, 0), 6);
    CHECK_EQ_INT(kv_seq_next_pos(b), 51);
    /* the partly filled shared last block must be copied before an append */
    CHECK_EQ_INT(kv_seq_blocks_needed(b, 1), 1);
    CHECK_EQ_INT(kv_seq_blocks_needed(b, 3), 2);
    append_tok(b, 100.0f);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 13);
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 1);
    CHECK_EQ_INT((int)kv_pool_cow_copies(pool), 1);
    /* a's last block is its own now: no copy */
    CHECK_EQ_INT(kv_seq_blocks_needed(a, 1), 0);
    append_tok(a, 200.0f);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 13);
    for (int t = 0; t < 6; t++) {
        check_token(a, t, (float)t);
        check_token(b, t, (float)t);
    }
    check_token(a, 6, 200.0f);
    check_token(b, 6, 100.0f);
    /* keep on the fork: compaction writes into the shared first block */
    const int32_t keep[] = {1, 2, 3, 4, 5, 6};
    CHECK(kv_seq_keep(b, 0, 0, keep, 6, NULL) == EKV_OK);
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 0);
    for (int t = 0; t < 6; t++)
        check_token(a, t, (float)t);
    for (int t = 0; t < 5; t++)
        check_token(b, t, (float)(t + 1));
    check_token(b, 5, 100.0f);
    kv_seq_free(a);
    check_token(b, 0, 1.0f);
    kv_seq_free(b);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 16);
    /* the last holder frees a shared block; one holder alone frees none */
    a = kv_seq_create(pool, 1, 1, NULL);
    for (int t = 0; t < 5; t++)
        append_tok(a, (float)t);
    b = kv_seq_fork(a, NULL);
    kv_seq_free(a);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 14);
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 0);
    append_tok(b, 7.0f); /* sole holder: writes in place */
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 14);
    kv_seq_free(b);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 16);
    kv_pool_destroy(pool);
}

/* Copy-on-write with an empty pool fails cleanly and changes nothing. */
static void test_fork_copy_on_write_pool_empty(void)
{
    kv_pool *pool = kv_pool_create(BT, D, 2, NULL);
    kv_seq *a = kv_seq_create(pool, 1, 1, NULL);
    for (int t = 0; t < 6; t++)
        append_tok(a, (float)t);
    kv_seq *b = kv_seq_fork(a, NULL);
    float k[D], v[D];
    fill(k, 9.0f);
    fill(v, 9.0f);
    ekv_error err = {0};
    CHECK(kv_seq_append(b, 0, 0, k, v, 90, &err) == EKV_ENOMEM);
    CHECK_EQ_INT(kv_seq_len(b, 0, 0), 6);
    const int32_t keep[] = {1, 2};
    CHECK(kv_seq_keep(b, 0, 0, keep, 2, &err) == EKV_ENOMEM);
    CHECK_EQ_INT(kv_seq_len(b, 0, 0), 6);
    for (int t = 0; t < 6; t++) {
        check_token(a, t, (float)t);
        check_token(b, t, (float)t);
    }
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 2);
    kv_seq_free(b);
    kv_seq_free(a);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 2);
    kv_pool_destroy(pool);
}

static void pin_hook(void *arg)
{
    (*(int *)arg)++;
}

static void *release_pin(void *arg)
{
    kv_pin_release(arg);
    return NULL;
}

/* A pin holds whole blocks by reference: the sequence may compact, append
 * and free meanwhile without touching the pinned bytes; a release on
 * another thread only queues the pin (the hook runs), and the blocks go
 * back at the pool thread's kv_pool_reap, not before. */
static void test_pin_holds_blocks_until_released_and_reaped(void)
{
    kv_pool *pool = kv_pool_create(BT, D, 16, NULL);
    kv_seq *seq = kv_seq_create(pool, 1, 1, NULL);
    float k[D], v[D];
    for (int t = 0; t < 10; t++) { /* blocks 0 and 1 whole, block 2 partial */
        fill(k, (float)t);
        fill(v, -(float)t);
        CHECK(kv_seq_append(seq, 0, 0, k, v, t, NULL) == EKV_OK);
    }
    ekv_error err = {0};
    CHECK(kv_seq_pin(seq, 1, 2, &err) == NULL); /* block 2 is not whole */
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(kv_seq_pin(seq, -1, 1, NULL) == NULL);
    kv_pin *pin = kv_seq_pin(seq, 0, 2, NULL);
    CHECK(pin != NULL);
    if (!pin)
        return;
    int hooked = 0;
    kv_pool_set_release_hook(pool, pin_hook, &hooked);
    CHECK_EQ_INT(kv_pin_blocks(pin), 2);
    CHECK(kv_pin_block(pin, 0, 0, 2) == NULL && kv_pin_block(pin, 1, 0, 0) == NULL);
    const size_t bb = kv_pool_block_bytes(pool);
    uint8_t want[2][512], now[512];
    CHECK(bb <= sizeof now);
    for (int b = 0; b < 2; b++)
        kv_seq_block_export(seq, 0, 0, b, want[b]);
    CHECK_EQ_INT(kv_pool_pins(pool), 1);
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 2);
    /* compaction writes into both pinned blocks: each is copied first */
    const int32_t keep[] = {1, 3, 5, 7, 9};
    CHECK(kv_seq_keep(seq, 0, 0, keep, 5, NULL) == EKV_OK);
    CHECK_EQ_INT(kv_pool_cow_copies(pool), 2);
    for (int b = 0; b < 2; b++)
        CHECK(memcmp(kv_pin_block(pin, 0, 0, b), want[b], bb) == 0);
    kv_seq_block_export(seq, 0, 0, 0, now);
    CHECK(memcmp(now, want[0], bb) != 0); /* the sequence's own copy changed */
    kv_seq_free(seq);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 14); /* the pin's two */
    CHECK_EQ_INT(kv_pool_reap(pool), 0);
    pthread_t th;
    CHECK(pthread_create(&th, NULL, release_pin, pin) == 0);
    pthread_join(th, NULL);
    CHECK_EQ_INT(hooked, 1);
    CHECK(kv_pool_wait_released(pool, 1000));
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 14); /* released, not yet reaped */
    CHECK_EQ_INT(kv_pool_reap(pool), 1);
    CHECK_EQ_INT(kv_pool_pins(pool), 0);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 16);
    CHECK_EQ_INT(kv_pool_shared_blocks(pool), 0);
    CHECK(!kv_pool_wait_released(pool, 1000)); /* no pins: at once */
    kv_pin_release(NULL);
    kv_pool_destroy(pool);
}

int main(void)
{
    RUN_TEST(test_append_allocates_blocks_per_head);
    RUN_TEST(test_pool_exhaustion_is_an_error_not_a_crash);
    RUN_TEST(test_keep_compacts_and_frees_blocks);
    RUN_TEST(test_insert_puts_evicted_tokens_back_in_place);
    RUN_TEST(test_bad_geometry_rejected);
    RUN_TEST(test_fork_shares_then_copies_on_write);
    RUN_TEST(test_fork_copy_on_write_pool_empty);
    RUN_TEST(test_pin_holds_blocks_until_released_and_reaped);
    return TEST_EXIT();
}
