/*
 * test_kvrecall_promote.c - recall's promotion and demotion (kvrecall.h,
 * kv_seq_recall_promote in kvcache.h), without a model. From the issue's
 * contract, not from the code:
 *   - a recall block that takes the attention mass is promoted into the
 *     resident set and the resident block with the least mass (outside the
 *     recent window: the newest full block and the partial tail) is demoted;
 *   - budgets hold at every step: resident tokens and store tokens never
 *     change through a swap (only appends grow the resident set);
 *   - every token stays bit-identical to what was appended, wherever it is
 *     (resident or store), however often it was demoted and promoted: the
 *     union of the two is the sequence, each position exactly once;
 *   - a demoted block's digest is its keys' exact per-channel min / max;
 *   - nothing moves when every block is recalled anyway (blocks <= R), when
 *     promotion is off, or in a forked sequence's shared blocks (copy on
 *     write: the other sequence keeps its bytes);
 *   - ranking every K steps reuses the last choice in between.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"

#define BT 16
#define D 16
#define H 2
#define NMAX 400

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static double urand(void) /* [0, 1) */
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}

/* fp16 K and V of every appended token, by head and position */
static ekv_f16 g_k[H][NMAX][D], g_v[H][NMAX][D];

static void append(kv_seq *s, int32_t pos)
{
    for (int32_t h = 0; h < H; h++) {
        float k[D], v[D];
        for (int32_t c = 0; c < D; c++) {
            k[c] = (float)((urand() - 0.5) * 4.0);
            v[c] = (float)((urand() - 0.5) * 4.0);
            g_k[h][pos][c] = ekv_f32_to_f16(k[c]);
            g_v[h][pos][c] = ekv_f32_to_f16(v[c]);
        }
        CHECK(kv_seq_append(s, 0, h, k, v, pos, NULL) == EKV_OK);
    }
}

/* n tokens at 0..n-1; each head keeps the first 32 and the last 32, the
 * rest (n - 64) goes to the store. */
static kv_seq *setup(kv_pool *pool, int32_t n, int32_t r)
{
    kv_seq *s = kv_seq_create(pool, 1, H, NULL);
    for (int32_t t = 0; t < n; t++)
        append(s, t);
    CHECK(kv_seq_recall_enable(s, r, NULL) == EKV_OK);
    int32_t keep[64];
    for (int32_t i = 0; i < 32; i++) {
        keep[i] = i;
        keep[32 + i] = n - 32 + i;
    }
    for (int32_t h = 0; h < H; h++)
        CHECK(kv_seq_keep(s, 0, h, keep, 64, NULL) == EKV_OK);
    return s;
}

/* Every token of head h, resident or stored, equals what was appended at
 * its position, and the two together hold positions 0..n-1 once each; every
 * full store block's digest is its keys' exact min / max. */
static void check_whole(const kv_seq *s, int32_t h, int32_t n)
{
    static int seen[NMAX];
    memset(seen, 0, sizeof seen);
    kern_kv_view v;
    kv_seq_view(s, 0, h, &v);
    for (int32_t t = 0; t < v.n_tokens; t++) {
        const int32_t b = t / BT, r = t % BT, p = v.pos_blocks[b][r];
        CHECK(p >= 0 && p < n);
        if (p < 0 || p >= n)
            return;
        seen[p]++;
        for (int32_t c = 0; c < D; c++) {
            CHECK(v.k_blocks[b][(size_t)c * BT + r] == g_k[h][p][c]);
            CHECK(v.v_blocks[b][(size_t)r * D + c] == g_v[h][p][c]);
        }
    }
    const kv_recall *rc = kv_seq_recall(s);
    for (int32_t b = 0; b < kv_recall_blocks(rc, 0, h); b++) {
        const ekv_f16 *kb, *vb;
        const int32_t *pb;
        const float *mn, *mx;
        const int32_t filled = kv_recall_block(rc, 0, h, b, &kb, &vb, &pb, &mn, &mx);
        for (int32_t r = 0; r < filled; r++) {
            const int32_t p = pb[r];
            CHECK(p >= 0 && p < n);
            if (p < 0 || p >= n)
                return;
            seen[p]++;
            for (int32_t c = 0; c < D; c++) {
                CHECK(kb[(size_t)c * BT + r] == g_k[h][p][c]);
                CHECK(vb[(size_t)r * D + c] == g_v[h][p][c]);
            }
        }
        for (int32_t c = 0; c < D; c++) {
            float lo = INFINITY, hi = -INFINITY;
            for (int32_t r = 0; r < filled; r++) {
                const float x = ekv_f16_to_f32(kb[(size_t)c * BT + r]);
                lo = x < lo ? x : lo;
                hi = x > hi ? x : hi;
            }
            CHECK(mn[c] == lo && mx[c] == hi);
        }
    }
    for (int32_t p = 0; p < n; p++)
        CHECK(seen[p] == 1);
}

/* One tracked decode step of head h: the view with query q, then
 * attention probabilities that put `hot` of the mass on recall slot
 * hot_slot (-1: spread evenly) and the rest evenly; returns the view. */
static int32_t step(kv_seq *s, int32_t h, int32_t q_pos, int32_t hot_slot, float hot,
                    kern_kv_view *ext, void **scratch)
{
    kv_recall *rc = kv_seq_recall(s);
    kern_kv_view v;
    kv_seq_view(s, 0, h, &v);
    free(*scratch);
    *scratch = malloc(kv_recall_scratch_bytes(rc, 0, h, v.n_tokens / BT + 2));
    float q[D];
    for (int32_t c = 0; c < D; c++)
        q[c] = (float)(urand() - 0.5);
    const int32_t nr = kv_recall_view_at(rc, 0, h, q, 1, D, q_pos, KV_RECALL_TRACK, &v, ext,
                                         *scratch);
    float *probs = malloc((size_t)ext->n_tokens * sizeof *probs);
    const float rest = hot_slot >= 0 ? (1.0f - hot) : 1.0f;
    for (int32_t t = 0; t < ext->n_tokens; t++)
        probs[t] = rest / (float)ext->n_tokens;
    if (hot_slot >= 0 && hot_slot < nr)
        for (int32_t t = hot_slot * BT; t < (hot_slot + 1) * BT; t++)
            probs[t] += hot / BT;
    kv_recall_observe(rc, 0, h, probs, 1, ext->n_tokens, 0);
    free(probs);
    return nr;
}

static void test_hot_block_is_promoted_weakest_demoted(void)
{
    const int32_t n = 224; /* 160 to the store: 10 blocks per head */
    kv_pool *pool = kv_pool_create(BT, D, 256, NULL);
    kv_seq *s = setup(pool, n, 2);
    kv_recall *rc = kv_seq_recall(s);
    CHECK(kv_recall_blocks(rc, 0, 0) == 10);
    void *scratch = NULL;
    kern_kv_view ext;
    /* head 0: its first recalled block takes 90% of the mass for a few steps */
    int32_t promoted = 0, block_pos0 = -1;
    for (int32_t i = 0; i < 4 && !promoted; i++) {
        CHECK(step(s, 0, n - 1, 0, 0.9f, &ext, &scratch) == 2);
        block_pos0 = ext.pos_blocks[0][0]; /* the hot block's first position */
        CHECK(step(s, 1, n - 1, -1, 0, &ext, &scratch) == 2);
        promoted = kv_seq_recall_promote(s, 0);
    }
    CHECK(promoted == 1); /* head 0 only: head 1's mass is even */
    kv_recall_stats st;
    kv_recall_get_stats(rc, &st);
    CHECK(st.promotions == 1);
    /* the hot block is resident now, whole, and not in the recent window */
    kern_kv_view v;
    kv_seq_view(s, 0, 0, &v);
    CHECK(v.n_tokens == 64);
    int32_t at = -1;
    for (int32_t t = 0; t < v.n_tokens; t++)
        if (v.pos_blocks[t / BT][t % BT] == block_pos0)
            at = t;
    CHECK(at >= 0 && at < 3 * BT);
    /* the newest full block (positions n-16..n-1) stayed */
    for (int32_t r = 0; r < BT; r++)
        CHECK(v.pos_blocks[3][r] == n - BT + r);
    for (int32_t h = 0; h < H; h++) {
        CHECK(kv_seq_len(s, 0, h) == 64);
        CHECK(kv_recall_tokens(rc, 0, h) == n - 64);
        check_whole(s, h, n);
    }
    /* positions are out of order now: insert refuses */
    ekv_error err = {0};
    const ekv_f16 z[D] = {0};
    const int32_t p = 40;
    CHECK(kv_seq_insert(s, 0, 0, z, z, &p, 1, &err) == EKV_EUNSUPPORTED);
    free(scratch);
    kv_seq_free(s);
    kv_pool_destroy(pool);
}

/* Random masses over many decode steps with appends: counts hold at every
 * step and every byte stays where some position owns it. */
static void test_budgets_hold_and_bytes_survive_many_swaps(void)
{
    int32_t n = 256;
    kv_pool *pool = kv_pool_create(BT, D, 256, NULL);
    kv_seq *s = setup(pool, n, 3);
    kv_recall *rc = kv_seq_recall(s);
    void *scratch = NULL;
    kern_kv_view ext;
    int32_t resident = 64, total_moved = 0;
    const int32_t stored = n - 64;
    for (int32_t i = 0; i < 120; i++) {
        if (i % 3 == 0) { /* a decode step appends */
            append(s, n++);
            resident++;
        }
        for (int32_t h = 0; h < H; h++) {
            const int32_t hot = (int32_t)(urand() * 4) - 1; /* -1..2 */
            step(s, h, n - 1, hot, (float)urand(), &ext, &scratch);
        }
        total_moved += kv_seq_recall_promote(s, 0);
        for (int32_t h = 0; h < H; h++) {
            CHECK(kv_seq_len(s, 0, h) == resident);
            CHECK(kv_recall_tokens(rc, 0, h) == stored);
        }
    }
    kv_recall_stats st;
    kv_recall_get_stats(rc, &st);
    CHECK(total_moved > 3); /* blocks went both ways, several times */
    CHECK(st.promotions == total_moved);
    for (int32_t h = 0; h < H; h++)
        check_whole(s, h, n);
    free(scratch);
    kv_seq_free(s);
    kv_pool_destroy(pool);
}

static void test_nothing_moves_when_all_fit_or_off_and_fork_keeps_its_bytes(void)
{
    const int32_t n = 224;
    kv_pool *pool = kv_pool_create(BT, D, 256, NULL);
    void *scratch = NULL;
    kern_kv_view ext;
    /* R = 10 >= the 10 blocks: every block joins every step anyway */
    kv_seq *s = setup(pool, n, 10);
    for (int32_t i = 0; i < 5; i++) {
        CHECK(step(s, 0, n - 1, 0, 0.99f, &ext, &scratch) == 10);
        CHECK(kv_seq_recall_promote(s, 0) == 0);
    }
    kv_seq_free(s);
    /* promotion off */
    s = setup(pool, n, 2);
    CHECK(kv_recall_set_mode(kv_seq_recall(s), 1, false, NULL) == EKV_OK);
    CHECK(kv_recall_set_mode(kv_seq_recall(s), 0, false, NULL) == EKV_EINVAL);
    for (int32_t i = 0; i < 5; i++) {
        step(s, 0, n - 1, 0, 0.99f, &ext, &scratch);
        CHECK(kv_seq_recall_promote(s, 0) == 0);
    }
    kv_seq_free(s);
    /* a fork shares the blocks: a promotion in one copies before writing */
    s = setup(pool, n, 2);
    kv_seq *f = kv_seq_fork(s, NULL);
    CHECK(f != NULL);
    int32_t moved = 0;
    for (int32_t i = 0; i < 5 && !moved; i++) {
        step(f, 0, n - 1, 0, 0.9f, &ext, &scratch);
        moved = kv_seq_recall_promote(f, 0);
    }
    CHECK(moved == 1);
    check_whole(f, 0, n);
    check_whole(s, 0, n); /* untouched: its resident set is still 0..31, n-32..n-1 */
    kern_kv_view v;
    kv_seq_view(s, 0, 0, &v);
    for (int32_t t = 0; t < 64; t++)
        CHECK(v.pos_blocks[t / BT][t % BT] == (t < 32 ? t : n - 64 + t));
    kv_seq_free(f);
    kv_seq_free(s);
    free(scratch);
    kv_pool_destroy(pool);
}

static void test_rank_every_k_reuses_the_choice(void)
{
    const int32_t n = 224;
    kv_pool *pool = kv_pool_create(BT, D, 256, NULL);
    kv_seq *s = setup(pool, n, 2);
    kv_recall *rc = kv_seq_recall(s);
    CHECK(kv_recall_set_mode(rc, 4, false, NULL) == EKV_OK);
    void *scratch = NULL;
    kern_kv_view ext;
    int32_t first[2] = {-1, -1};
    for (int32_t i = 0; i < 8; i++) {
        step(s, 0, n - 1 + i, -1, 0, &ext, &scratch); /* a new random query each step */
        if (i % 4 == 0) {
            first[0] = ext.pos_blocks[0][0];
            first[1] = ext.pos_blocks[1][0];
        } else { /* steps 1-3 after a ranking keep its blocks */
            CHECK(ext.pos_blocks[0][0] == first[0] && ext.pos_blocks[1][0] == first[1]);
        }
    }
    kv_recall_stats st;
    kv_recall_get_stats(rc, &st);
    CHECK(st.selections == 2 && st.reuses == 6);
    /* an untracked row (a teacher-forced batch) always ranks */
    kern_kv_view v;
    kv_seq_view(s, 0, 0, &v);
    const float q[D] = {1};
    kv_recall_view(rc, 0, 0, q, 1, D, n + 8, &v, &ext, scratch);
    kv_recall_get_stats(rc, &st);
    CHECK(st.selections == 3);
    free(scratch);
    kv_seq_free(s);
    kv_pool_destroy(pool);
}

int main(void)
{
    RUN_TEST(test_hot_block_is_promoted_weakest_demoted);
    RUN_TEST(test_budgets_hold_and_bytes_survive_many_swaps);
    RUN_TEST(test_nothing_moves_when_all_fit_or_off_and_fork_keeps_its_bytes);
    RUN_TEST(test_rank_every_k_reuses_the_choice);
    return TEST_EXIT();
}
