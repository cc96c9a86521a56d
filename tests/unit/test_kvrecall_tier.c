/*
 * test_kvrecall_tier.c - the tier behind the recall store
 * (kvrecall_tier.h) over an in-process backend whose ops complete only when
 * the test pumps them (a daemon's latency, made deterministic), fail (a
 * daemon that is down) or never complete (a stopped one):
 *   - beyond the host cap, complete blocks leave host memory, and a block
 *     fetched back is bit-identical to the one evicted into a store without
 *     a tier (K, V, positions), as is the view attention gets;
 *   - with a cap of 0 and R >= the blocks, every view equals the host-only
 *     store's at every step, with no deadline miss;
 *   - a block not fetched in time is skipped and counted, the view never
 *     waits; a backend that fails keeps blocks in host memory (counted);
 *   - when the last store referencing a set is freed (clones share their
 *     parent's), every key it stored is deleted: nothing is left behind.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"
#include "entrokv/kvrecall_tier.h"
#include "recall_fake_backend.h"

#define BT 16
#define D 32

/* ---- sequences ---- */

static uint64_t g_rng;

static float nrand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 - 0.5) * 4.0f;
}

/* 1 layer x H heads of n random tokens (the same for the same seed), recall
 * r, then each head keeps its last `keep` tokens. */
static kv_seq *evicted_seq(kv_pool *pool, int32_t H, int32_t n, int32_t keep, int32_t r,
                           uint64_t seed)
{
    g_rng = seed;
    kv_seq *s = kv_seq_create(pool, 1, H, NULL);
    CHECK(s != NULL);
    CHECK(kv_seq_recall_enable(s, r, NULL) == EKV_OK);
    /* a spilling store ranks by the digest's box alone (its blocks' K may
     * be away); its host-only twin must rank the same way to compare */
    CHECK(kv_recall_set_channels(kv_seq_recall(s), 0, NULL) == EKV_OK);
    float k[D], v[D];
    for (int32_t h = 0; h < H; h++)
        for (int32_t t = 0; t < n; t++) {
            for (int32_t c = 0; c < D; c++) {
                k[c] = nrand() * (c % 5 == 0 ? 6.0f : 1.0f);
                v[c] = nrand();
            }
            CHECK(kv_seq_append(s, 0, h, k, v, t, NULL) == EKV_OK);
        }
    int32_t idx[1024];
    for (int32_t i = 0; i < keep; i++)
        idx[i] = n - keep + i;
    for (int32_t h = 0; h < H; h++)
        CHECK(kv_seq_keep(s, 0, h, idx, keep, NULL) == EKV_OK);
    return s;
}

/* The view of (0, head) for query q, as flat copies of each block's K, V
 * and positions (so two stores' views compare with memcmp). Returns the
 * blocks recalled. */
static int32_t view_of(kv_seq *s, int32_t head, const float *q, int32_t qpos, uint8_t *out,
                       size_t cap, size_t *used)
{
    kv_recall *rc = kv_seq_recall(s);
    kern_kv_view res, ext;
    kv_seq_view(s, 0, head, &res);
    const int32_t nres = (res.n_tokens + BT - 1) / BT;
    void *scratch = malloc(kv_recall_scratch_bytes(rc, 0, head, nres + 2));
    const int32_t nr = kv_recall_view(rc, 0, head, q, 1, D, qpos, &res, &ext, scratch);
    const size_t kb = (size_t)D * BT * sizeof(ekv_f16), pb = BT * sizeof(int32_t);
    size_t u = 0;
    for (int32_t b = 0; b < nr && u + 2 * kb + pb <= cap; b++) {
        memcpy(out + u, ext.k_blocks[b], kb);
        memcpy(out + u + kb, ext.v_blocks[b], kb);
        memcpy(out + u + 2 * kb, ext.pos_blocks[b], pb);
        u += 2 * kb + pb;
    }
    *used = u;
    free(scratch);
    return nr;
}

/* Every block of view a (view_of's copies) is, bit for bit, one of view b's:
 * what joins is one of the blocks the host-only store picks, never bytes
 * of another block or unwritten ones. */
static bool blocks_within(const uint8_t *a, size_t ua, const uint8_t *b, size_t ub)
{
    const size_t one = (size_t)D * BT * 2 * sizeof(ekv_f16) + BT * sizeof(int32_t);
    for (size_t i = 0; i < ua; i += one) {
        bool found = false;
        for (size_t j = 0; !found && j < ub; j += one)
            found = !memcmp(a + i, b + j, one);
        if (!found)
            return false;
    }
    return true;
}

static void random_q(float *q)
{
    for (int32_t c = 0; c < D; c++)
        q[c] = nrand();
}

/* A block fetched back from the backend is the one a host-only store holds. */
static void test_fetched_block_is_bit_identical(void)
{
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, NULL);
    kv_pool *pt = kv_pool_create(BT, D, 256, NULL), *ph = kv_pool_create(BT, D, 256, NULL);
    kv_pool_set_recall_tier(pt, t);
    const int32_t H = 2, n = 200, keep = 24, R = 2;
    kv_seq *st = evicted_seq(pt, H, n, keep, R, 0x1234567ull);
    kv_seq *sh = evicted_seq(ph, H, n, keep, R, 0x1234567ull);
    const int32_t nb = kv_recall_blocks(kv_seq_recall(sh), 0, 0);
    CHECK_EQ_INT(nb, (n - keep + BT - 1) / BT);
    /* cap 0: every complete block went to the backend */
    CHECK_EQ_INT(f->puts, H * ((n - keep) / BT));
    CHECK(pump(f) > 0);
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.spilled_blocks, H * ((n - keep) / BT));
    size_t cap = 1 << 16, ut, uh;
    uint8_t *vt = malloc(cap), *vh = malloc(cap);
    float q[D];
    int64_t fetched_views = 0;
    for (int step = 0; step < 40; step++) {
        random_q(q);
        for (int32_t h = 0; h < H; h++) {
            /* the same query twice: the first may miss (and fetch), the
             * second, after the pump, must see the same blocks as host */
            for (int rep = 0; rep < 2; rep++) {
                const int32_t nt = view_of(st, h, q, n, vt, cap, &ut);
                const int32_t nh = view_of(sh, h, q, n, vh, cap, &uh);
                CHECK_EQ_INT(nh, R);
                if (rep == 1) {
                    CHECK_EQ_INT(nt, nh);
                    CHECK(ut == uh && !memcmp(vt, vh, uh));
                    fetched_views++;
                } else {
                    CHECK(nt <= nh);
                }
                pump(f);
            }
        }
    }
    CHECK(fetched_views == 40 * H);
    kv_recall_tier_stats_get(t, &ts);
    CHECK(ts.fetched_blocks > 0);
    CHECK(ts.deadline_misses > 0); /* the first view of a new top block */
    CHECK_EQ_INT(ts.fetch_failures, 0);
    /* host memory: spilled blocks are gone, the partial last block stays */
    kv_recall_stats rs;
    kv_recall_get_stats(kv_seq_recall(st), &rs);
    CHECK(rs.spilled_blocks >= H * ((n - keep) / BT) - H * R); /* some sit in slots */
    CHECK(ts.host_bytes <= (int64_t)H * (1 + R) * (2 * D * BT * 2 + BT * 4));
    CHECK(rs.deadline_misses == ts.deadline_misses);
    kv_seq_free(st);
    pump(f);
    CHECK_EQ_INT(f->ne, 0); /* the set's end deleted every value */
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.live_sets, 0);
    CHECK_EQ_INT(ts.host_bytes, 0);
    CHECK_EQ_INT(ts.inflight, 0);
    kv_seq_free(sh);
    kv_pool_destroy(pt);
    kv_pool_destroy(ph);
    kv_recall_tier_destroy(t);
    free(vt);
    free(vh);
    free(f);
}

/* Cap 0 and R >= every block: the same views as the host-only store at every
 * step, however the puts interleave with the views, and no miss. */
static void test_cap_zero_with_large_r_equals_host(void)
{
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, NULL);
    kv_pool *pt = kv_pool_create(BT, D, 256, NULL), *ph = kv_pool_create(BT, D, 256, NULL);
    kv_pool_set_recall_tier(pt, t);
    const int32_t H = 2, n = 160, keep = 16, R = 16;
    kv_seq *st = evicted_seq(pt, H, n, keep, R, 99);
    kv_seq *sh = evicted_seq(ph, H, n, keep, R, 99);
    size_t cap = 1 << 18, ut, uh;
    uint8_t *vt = malloc(cap), *vh = malloc(cap);
    float q[D];
    for (int step = 0; step < 12; step++) {
        random_q(q);
        if (step % 3 == 1)
            pump(f); /* puts complete between views, at times */
        for (int32_t h = 0; h < H; h++) {
            const int32_t nt = view_of(st, h, q, n, vt, cap, &ut);
            const int32_t nh = view_of(sh, h, q, n, vh, cap, &uh);
            CHECK_EQ_INT(nt, nh);
            CHECK(ut == uh && !memcmp(vt, vh, uh));
        }
    }
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.deadline_misses, 0);
    CHECK(ts.spilled_blocks > 0);
    kv_seq_free(st);
    kv_seq_free(sh);
    pump(f);
    CHECK_EQ_INT(f->ne, 0);
    kv_pool_destroy(pt);
    kv_pool_destroy(ph);
    kv_recall_tier_destroy(t);
    free(vt);
    free(vh);
    free(f);
}

/* A backend that is down: puts fail (blocks stay in host memory, the views
 * are the host store's); one that stops: gets never arrive, views skip
 * the blocks (counted) and never wait; freeing the store meanwhile is safe,
 * and once the backend answers, the set's values are deleted. */
static void test_down_and_stalled_backends(void)
{
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, NULL);
    kv_pool *pt = kv_pool_create(BT, D, 256, NULL), *ph = kv_pool_create(BT, D, 256, NULL);
    kv_pool_set_recall_tier(pt, t);
    const int32_t n = 200, keep = 8, R = 3;
    f->mode = MODE_DOWN;
    kv_seq *st = evicted_seq(pt, 1, n, keep, R, 7);
    kv_seq *sh = evicted_seq(ph, 1, n, keep, R, 7);
    pump(f);
    size_t cap = 1 << 16, ut, uh;
    uint8_t *vt = malloc(cap), *vh = malloc(cap);
    float q[D];
    for (int step = 0; step < 5; step++) {
        random_q(q);
        CHECK_EQ_INT(view_of(st, 0, q, n, vt, cap, &ut), R);
        view_of(sh, 0, q, n, vh, cap, &uh);
        CHECK(ut == uh && !memcmp(vt, vh, uh));
    }
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    CHECK(ts.spill_failures > 0);
    CHECK_EQ_INT(ts.spilled_blocks, 0);
    CHECK_EQ_INT(ts.deadline_misses, 0);
    kv_seq_free(st);
    /* up again: a new store spills; then the backend stops */
    f->mode = MODE_OK;
    st = evicted_seq(pt, 1, n, keep, R, 7);
    pump(f);
    random_q(q);
    view_of(st, 0, q, n, vt, cap, &ut); /* read from host, then let go */
    f->mode = MODE_STALL;
    int64_t skipped = 0;
    for (int step = 0; step < 40; step++) {
        if (step % 2 == 0) /* each query twice: the second finds its gets in flight */
            random_q(q);
        const int32_t nt = view_of(st, 0, q, n, vt, cap, &ut);
        CHECK(nt <= R);
        view_of(sh, 0, q, n, vh, cap, &uh);
        CHECK(blocks_within(vt, ut, vh, uh));
        skipped += R - nt;
        pump(f); /* nothing arrives */
    }
    kv_recall_tier_stats_get(t, &ts);
    CHECK(skipped > 0);
    CHECK(ts.deadline_misses >= skipped);
    CHECK(ts.inflight > 0);
    kv_seq_free(st); /* gets still owed: their callbacks find the state alive */
    CHECK(f->ne > 0);
    f->mode = MODE_OK;
    pump(f);
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.inflight, 0);
    CHECK_EQ_INT(ts.live_sets, 0);
    CHECK_EQ_INT(f->ne, 0);
    kv_seq_free(sh);
    kv_pool_destroy(pt);
    kv_pool_destroy(ph);
    kv_recall_tier_destroy(t);
    free(vt);
    free(vh);
    free(f);
}

/* A clone reads its parent's spilled blocks under the parent's keys, which
 * stay until both are freed; what each spills after the fork is its own. */
static void test_clone_shares_the_parent_set(void)
{
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *t = kv_recall_tier_create(0, &be, NULL);
    kv_pool *pt = kv_pool_create(BT, D, 512, NULL), *ph = kv_pool_create(BT, D, 512, NULL);
    kv_pool_set_recall_tier(pt, t);
    const int32_t n = 160, keep = 40, R = 2;
    kv_seq *st = evicted_seq(pt, 1, n, keep, R, 5);
    kv_seq *sh = evicted_seq(ph, 1, n, keep, R, 5);
    pump(f);
    float q[D];
    size_t cap = 1 << 16, ut, uh;
    uint8_t *vt = malloc(cap), *vh = malloc(cap);
    random_q(q);
    view_of(st, 0, q, n, vt, cap, &ut);
    kv_seq *ct = kv_seq_clone(st, NULL);
    CHECK(ct != NULL);
    const int stored = f->ne;
    kv_seq_free(st);
    pump(f);
    CHECK_EQ_INT(f->ne, stored); /* the clone still references them */
    /* the clone evicts more: its own keys */
    int32_t idx[8];
    for (int32_t i = 0; i < 8; i++)
        idx[i] = keep - 8 + i;
    CHECK(kv_seq_keep(ct, 0, 0, idx, 8, NULL) == EKV_OK);
    CHECK(kv_seq_keep(sh, 0, 0, idx, 8, NULL) == EKV_OK);
    pump(f);
    CHECK(f->ne > stored);
    for (int step = 0; step < 10; step++) {
        random_q(q);
        for (int rep = 0; rep < 2; rep++) {
            const int32_t nt = view_of(ct, 0, q, n, vt, cap, &ut);
            const int32_t nh = view_of(sh, 0, q, n, vh, cap, &uh);
            if (rep == 1)
                CHECK(nt == nh && ut == uh && !memcmp(vt, vh, uh));
            pump(f);
        }
    }
    kv_seq_free(ct);
    pump(f);
    CHECK_EQ_INT(f->ne, 0);
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.live_sets, 0);
    CHECK_EQ_INT(ts.host_bytes, 0);
    kv_seq_free(sh);
    kv_pool_destroy(pt);
    kv_pool_destroy(ph);
    kv_recall_tier_destroy(t);
    free(vt);
    free(vh);
    free(f);
}

/* A cap above zero: host bytes settle at the cap (plus partial blocks and
 * puts in flight), and promotions reach the tier's counter. */
static void test_cap_holds_and_counters(void)
{
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    const int64_t bb = 2 * D * BT * 2 + BT * 4, cap = 5 * bb;
    kv_recall_tier *t = kv_recall_tier_create(cap, &be, NULL);
    kv_pool *pt = kv_pool_create(BT, D, 512, NULL);
    kv_pool_set_recall_tier(pt, t);
    kv_seq *st = evicted_seq(pt, 2, 300, 20, 2, 11);
    pump(f);
    float q[D];
    size_t used;
    uint8_t *v = malloc(1 << 16);
    for (int step = 0; step < 4; step++) {
        random_q(q);
        for (int32_t h = 0; h < 2; h++)
            view_of(st, h, q, 300, v, 1 << 16, &used);
        pump(f);
    }
    kv_recall_tier_stats ts;
    kv_recall_tier_stats_get(t, &ts);
    CHECK(ts.host_bytes <= cap + 2 * bb);
    CHECK(ts.host_bytes >= cap - bb);
    kv_recall_count_promotions(kv_seq_recall(st), 3);
    kv_recall_tier_stats_get(t, &ts);
    CHECK_EQ_INT(ts.promotions, 3);
    CHECK_EQ_INT(ts.blocks_recalled * bb, ts.bytes_recalled);
    kv_recall_stats rs;
    kv_recall_get_stats(kv_seq_recall(st), &rs);
    CHECK_EQ_INT(rs.promotions, 3);
    CHECK_EQ_INT(rs.blocks_recalled, ts.blocks_recalled);
    kv_seq_free(st);
    pump(f);
    CHECK_EQ_INT(f->ne, 0);
    kv_pool_destroy(pt);
    kv_recall_tier_destroy(t);
    free(v);
    free(f);
}

/* A tier that only counts lets promotion run; one that spills does not
 * (promotion rewrites blocks in place, under keys the daemon holds). */
static void test_promotion_only_without_spilling(void)
{
    fake_be *f = calloc(1, sizeof *f);
    const kv_recall_backend be = backend_of(f);
    kv_recall_tier *counts = kv_recall_tier_create(-1, NULL, NULL);
    kv_recall_tier *spills = kv_recall_tier_create(0, &be, NULL);
    kv_pool *pc = kv_pool_create(BT, D, 64, NULL), *ps = kv_pool_create(BT, D, 64, NULL);
    kv_pool_set_recall_tier(pc, counts);
    kv_pool_set_recall_tier(ps, spills);
    kv_seq *a = evicted_seq(pc, 1, 64, 16, 1, 3), *b = evicted_seq(ps, 1, 64, 16, 1, 3);
    CHECK(kv_recall_promotes(kv_seq_recall(a)));
    CHECK(!kv_recall_promotes(kv_seq_recall(b)));
    kv_seq_free(a);
    kv_seq_free(b);
    pump(f);
    kv_pool_destroy(pc);
    kv_pool_destroy(ps);
    kv_recall_tier_destroy(counts);
    kv_recall_tier_destroy(spills);
    free(f);
}

int main(void)
{
    RUN_TEST(test_fetched_block_is_bit_identical);
    RUN_TEST(test_cap_zero_with_large_r_equals_host);
    RUN_TEST(test_down_and_stalled_backends);
    RUN_TEST(test_clone_shares_the_parent_set);
    RUN_TEST(test_cap_holds_and_counters);
    RUN_TEST(test_promotion_only_without_spilling);
    return TEST_EXIT();
}
