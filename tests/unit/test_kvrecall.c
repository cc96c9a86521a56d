/*
 * test_kvrecall.c - the recall store (kvrecall.h) without a model:
 *   - the digest bound never underestimates a block's true maximum q . k
 *     (exact dot products in double over the fp16 keys attention reads);
 *   - nor does the ranking's score (kv_recall_block_bound: exact on the
 *     query's largest channels, the box on the rest), which is never above
 *     the box bound and is below it on most blocks;
 *   - what kv_seq_keep drops arrives in the store bit-identical (K, V,
 *     positions), in eviction order, across evictions and clones;
 *   - with R >= the store's blocks, attention over resident + recalled
 *     equals attention over every token (up to summation order);
 *   - with R < the blocks, the R joining are the brute-force top R by
 *     the ranking's score (max over the query group; ties to the older
 *     block), also where the ranking prunes blocks by their box bound
 *     (every exact-channel count, repeated blocks, positions);
 *   - with token-granular recall (kv_recall_set_gather K), the tokens
 *     joining are the brute-force 16R best (exact max over the group of
 *     q . k, in double) of the brute-force top K x R blocks by the
 *     ranking's score, each K, V and position bit-identical to what was
 *     evicted, in eviction order, then the resident blocks;
 *   - the policy's recall buffer comes out of the budget.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"

#define BT 16

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;

static double urand(void) /* [0, 1) */
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}

static float nrand(void) { return (float)((urand() - 0.5) * 4.0); }

/* A sequence of 1 layer x n_heads holding n random tokens at positions 0..n-1;
 * K and V as fp16 bits into k_ref / v_ref ([head][t][d]) when not NULL. */
static kv_seq *random_seq(kv_pool *pool, int32_t n_heads, int32_t n, int32_t d, ekv_f16 *k_ref,
                          ekv_f16 *v_ref)
{
    kv_seq *s = kv_seq_create(pool, 1, n_heads, NULL);
    float *k = malloc((size_t)d * sizeof *k), *v = malloc((size_t)d * sizeof *v);
    for (int32_t h = 0; h < n_heads; h++)
        for (int32_t t = 0; t < n; t++) {
            for (int32_t c = 0; c < d; c++) {
                /* a few channels with outliers, as real keys have */
                k[c] = nrand() * (c % 7 == 0 ? 8.0f : 1.0f);
                v[c] = nrand();
            }
            CHECK(kv_seq_append(s, 0, h, k, v, t, NULL) == EKV_OK);
            for (int32_t c = 0; c < d && k_ref; c++) {
                k_ref[((size_t)h * n + t) * d + c] = ekv_f32_to_f16(k[c]);
                v_ref[((size_t)h * n + t) * d + c] = ekv_f32_to_f16(v[c]);
            }
        }
    free(k);
    free(v);
    return s;
}

/* Exact max over the block's filled keys of q . k, in double. */
static double true_max(const ekv_f16 *kb, int32_t filled, const float *q, int32_t d)
{
    double best = -INFINITY;
    for (int32_t r = 0; r < filled; r++) {
        double s = 0;
        for (int32_t c = 0; c < d; c++)
            s += (double)q[c] * ekv_f16_to_f32(kb[(size_t)c * BT + r]);
        best = s > best ? s : best;
    }
    return best;
}

static void test_bound_never_underestimates(void)
{
    static const int32_t dims[] = {8, 17, 64};
    int64_t checked = 0, tight = 0;
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const int32_t d = dims[di], n = 200;
        kv_pool *pool = kv_pool_create(BT, d, 64, NULL);
        kv_seq *s = random_seq(pool, 1, n, d, NULL, NULL);
        CHECK(kv_seq_recall_enable(s, 4, NULL) == EKV_OK);
        /* drop a scattered subset: blocks mix non-adjacent tokens */
        int32_t keep[200], nk = 0;
        for (int32_t t = 0; t < n; t++)
            if (urand() < 0.3)
                keep[nk++] = t;
        CHECK(kv_seq_keep(s, 0, 0, keep, nk, NULL) == EKV_OK);
        const kv_recall *rc = kv_seq_recall(s);
        float *q = malloc((size_t)d * sizeof *q);
        for (int trial = 0; trial < 300; trial++) {
            for (int32_t c = 0; c < d; c++) /* zeros, signs and scales of every kind */
                q[c] = urand() < 0.1 ? 0.0f : nrand() * (float)(1 << (trial % 5));
            for (int32_t b = 0; b < kv_recall_blocks(rc, 0, 0); b++) {
                const ekv_f16 *kb;
                const float *mn, *mx;
                const int32_t filled = kv_recall_block(rc, 0, 0, b, &kb, NULL, NULL, &mn, &mx);
                const double exact = true_max(kb, filled, q, d);
                const float bound = kv_digest_bound(mn, mx, q, d);
                double mag = 0;
                for (int32_t c = 0; c < d; c++)
                    mag += fabs(q[c]) * fmax(fabs(mn[c]), fabs(mx[c]));
                /* float accumulation of d terms: a few ulps of the magnitude */
                if (!(bound >= exact - 1e-6 * mag)) {
                    fprintf(stderr, "d %d block %d: bound %.9g < true max %.9g\n", d, b,
                            (double)bound, exact);
                    CHECK(0);
                }
                tight += bound <= exact + 0.5 * mag;
                checked++;
            }
        }
        free(q);
        kv_seq_free(s);
        kv_pool_destroy(pool);
    }
    CHECK(checked > 1000);
    CHECK(tight > 0); /* not a vacuous +inf */
}

/* The ranking's score against the exact maximum and the box, on random
 * keys with outlier channels and queries of every kind (dims below, at and
 * above KV_RECALL_EXACT_CHANNELS; sparse, scaled, partly filled blocks). */
static void test_rank_bound_never_underestimates(void)
{
    static const int32_t dims[] = {8, 17, 64, 128};
    int64_t checked = 0, tighter = 0;
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const int32_t d = dims[di], n = 203; /* the last block partly filled */
        kv_pool *pool = kv_pool_create(BT, d, 64, NULL);
        kv_seq *s = random_seq(pool, 1, n, d, NULL, NULL);
        CHECK(kv_seq_recall_enable(s, 4, NULL) == EKV_OK);
        int32_t keep[203], nk = 0;
        for (int32_t t = 0; t < n; t++)
            if (urand() < 0.3)
                keep[nk++] = t;
        CHECK(kv_seq_keep(s, 0, 0, keep, nk, NULL) == EKV_OK);
        const kv_recall *rc = kv_seq_recall(s);
        CHECK(kv_recall_tokens(rc, 0, 0) % BT != 0);
        float *q = malloc((size_t)d * sizeof *q);
        for (int trial = 0; trial < 200; trial++) {
            for (int32_t c = 0; c < d; c++) /* zeros (whole queries too), signs, scales */
                q[c] = trial == 0 || urand() < 0.1 ? 0.0f : nrand() * (float)(1 << (trial % 5));
            for (int32_t b = 0; b < kv_recall_blocks(rc, 0, 0); b++) {
                const ekv_f16 *kb;
                const float *mn, *mx;
                const int32_t filled = kv_recall_block(rc, 0, 0, b, &kb, NULL, NULL, &mn, &mx);
                const double exact = true_max(kb, filled, q, d);
                const float score = kv_recall_block_bound(rc, 0, 0, b, q);
                const float box = kv_digest_bound(mn, mx, q, d);
                double mag = 0;
                for (int32_t c = 0; c < d; c++)
                    mag += fabs(q[c]) * fmax(fabs(mn[c]), fabs(mx[c]));
                if (!(score >= exact - 1e-6 * mag) || !(score <= box + 1e-6 * mag)) {
                    fprintf(stderr, "d %d block %d: score %.9g, true max %.9g, box %.9g\n", d, b,
                            (double)score, exact, (double)box);
                    CHECK(0);
                }
                tighter += score < box - 1e-3 * mag;
                checked++;
            }
        }
        CHECK(kv_recall_block_bound(rc, 0, 0, kv_recall_blocks(rc, 0, 0), q) == -INFINITY);
        free(q);
        kv_seq_free(s);
        kv_pool_destroy(pool);
    }
    fprintf(stderr, "  %lld blocks scored, %lld below the box\n", (long long)checked,
            (long long)tighter);
    CHECK(checked > 1000);
    CHECK(tighter > checked / 2); /* the exact channels do tighten it */
}

static void test_store_is_bit_identical_across_evictions_and_clones(void)
{
    const int32_t d = 64, H = 2, n = 100;
    kv_pool *pool = kv_pool_create(BT, d, 64, NULL);
    ekv_f16 *kr = malloc((size_t)H * n * d * sizeof *kr), *vr = malloc((size_t)H * n * d * sizeof *vr);
    kv_seq *s = random_seq(pool, H, n, d, kr, vr);
    CHECK(kv_seq_recall_enable(s, 3, NULL) == EKV_OK);
    CHECK(kv_seq_recall_enable(s, 3, NULL) == EKV_OK);
    CHECK(kv_seq_recall_enable(s, 4, NULL) == EKV_EINVAL);
    /* head 0 keeps every third token; head 1 keeps the last 20 */
    int32_t keep[100], nk = 0;
    for (int32_t t = 0; t < n; t += 3)
        keep[nk++] = t;
    CHECK(kv_seq_keep(s, 0, 0, keep, nk, NULL) == EKV_OK);
    for (int32_t i = 0; i < 20; i++)
        keep[i] = n - 20 + i;
    CHECK(kv_seq_keep(s, 0, 1, keep, 20, NULL) == EKV_OK);
    /* a second eviction on head 0 (drop its first 10 kept tokens: 0, 3, ..., 27)
     * fills the partly filled last block first */
    for (int32_t i = 0; i < nk - 10; i++)
        keep[i] = i + 10;
    CHECK(kv_seq_keep(s, 0, 0, keep, nk - 10, NULL) == EKV_OK);
    kv_seq *c = kv_seq_clone(s, NULL);
    CHECK(c && kv_seq_recall(c) && kv_seq_recall(c) != kv_seq_recall(s));
    int32_t expect[2][100], ne[2] = {0, 0};
    for (int32_t t = 0; t < n; t++)
        if (t % 3)
            expect[0][ne[0]++] = t;
    for (int32_t t = 0; t < 30; t += 3)
        expect[0][ne[0]++] = t;
    for (int32_t t = 0; t < n - 20; t++)
        expect[1][ne[1]++] = t;
    for (int which = 0; which < 2; which++) {
        const kv_recall *rc = kv_seq_recall(which ? c : s);
        for (int32_t h = 0; h < H; h++) {
            CHECK_EQ_INT(kv_recall_tokens(rc, 0, h), ne[h]);
            CHECK_EQ_INT(kv_recall_blocks(rc, 0, h), (ne[h] + BT - 1) / BT);
            for (int32_t i = 0; i < ne[h]; i++) {
                const ekv_f16 *kb, *vb;
                const int32_t *pb;
                const float *mn, *mx;
                const int32_t filled = kv_recall_block(rc, 0, h, i / BT, &kb, &vb, &pb, &mn, &mx);
                const int32_t r = i % BT, t = expect[h][i];
                CHECK(r < filled);
                CHECK_EQ_INT(pb[r], t);
                int same = 1;
                for (int32_t j = 0; j < d; j++) {
                    same &= kb[(size_t)j * BT + r] == kr[((size_t)h * n + t) * d + j];
                    same &= vb[(size_t)r * d + j] == vr[((size_t)h * n + t) * d + j];
                    const float x = ekv_f16_to_f32(kb[(size_t)j * BT + r]);
                    same &= x >= mn[j] && x <= mx[j];
                }
                CHECK(same);
            }
            const int32_t last = (ne[h] - 1) / BT;
            const int32_t *pb;
            const int32_t filled = kv_recall_block(rc, 0, h, last, NULL, NULL, &pb, NULL, NULL);
            for (int32_t r = filled; r < BT; r++)
                CHECK_EQ_INT(pb[r], INT32_MAX); /* padding the mask hides */
        }
    }
    kv_recall_stats st;
    kv_recall_get_stats(kv_seq_recall(s), &st);
    CHECK_EQ_INT(st.evicted_tokens, ne[0] + ne[1]);
    kv_seq_free(c);
    kv_seq_free(s);
    kv_pool_destroy(pool);
    free(kr);
    free(vr);
}

/* Attention of G queries over a resident head plus the recall view. */
static void attend_view(const kern_kv_view *v, const float *q, int G, int32_t d, int32_t qpos,
                        float *out)
{
    float *scores = malloc(KERN_ATTN_SCRATCH(v->n_tokens) * sizeof *scores);
    int32_t qp[4] = {qpos, qpos, qpos, qpos};
    kern_attention(v, q, G, d, qp, 1.0f / sqrtf((float)d), out, d, scores);
    free(scores);
}

static void test_recall_of_every_block_equals_full_attention(void)
{
    kern_init();
    const int32_t d = 64, n = 300, G = 3;
    kv_pool *pool = kv_pool_create(BT, d, 128, NULL);
    kv_seq *full = random_seq(pool, 1, n, d, NULL, NULL);
    kv_seq *s = kv_seq_clone(full, NULL);
    const int32_t nblocks_max = (n + BT - 1) / BT;
    CHECK(kv_seq_recall_enable(s, nblocks_max, NULL) == EKV_OK);
    int32_t keep[300], nk = 0;
    for (int32_t t = 0; t < n; t++)
        if (t < 4 || t >= n - 40 || urand() < 0.1)
            keep[nk++] = t;
    CHECK(kv_seq_keep(s, 0, 0, keep, nk, NULL) == EKV_OK);
    float q[3 * 64], want[3 * 64], got[3 * 64], dropped_only[3 * 64];
    for (int i = 0; i < G * d; i++)
        q[i] = nrand();
    kern_kv_view fv, rv, ext;
    kv_seq_view(full, 0, 0, &fv);
    kv_seq_view(s, 0, 0, &rv);
    kv_recall *rc = kv_seq_recall(s);
    void *scratch = malloc(kv_recall_scratch_bytes(rc, 0, 0, (rv.n_tokens + BT - 1) / BT));
    const int32_t nr = kv_recall_view(rc, 0, 0, q, G, d, n, &rv, &ext, scratch);
    CHECK_EQ_INT(nr, kv_recall_blocks(rc, 0, 0));
    CHECK_EQ_INT(ext.n_tokens, rv.n_tokens + nr * BT);
    attend_view(&fv, q, G, d, n, want);
    attend_view(&ext, q, G, d, n, got);
    attend_view(&rv, q, G, d, n, dropped_only);
    double err_recall = 0, err_resident = 0;
    for (int i = 0; i < G * d; i++) {
        err_recall = fmax(err_recall, fabs(got[i] - want[i]));
        err_resident = fmax(err_resident, fabs(dropped_only[i] - want[i]));
    }
    CHECK(err_recall < 1e-5);    /* fp32 summation order only */
    CHECK(err_resident > 1e-3);  /* the dropped tokens mattered */
    /* a query before every evicted position recalls nothing */
    CHECK_EQ_INT(kv_recall_view(rc, 0, 0, q, G, d, 3, &rv, &ext, scratch), 0);
    CHECK_EQ_INT(ext.n_tokens, rv.n_tokens);
    free(scratch);
    kv_seq_free(s);
    kv_seq_free(full);
    kv_pool_destroy(pool);
}

static void test_top_r_by_score(void)
{
    const int32_t d = 32, n = 400, G = 2, R = 5;
    kv_pool *pool = kv_pool_create(BT, d, 64, NULL);
    kv_seq *s = random_seq(pool, 1, n, d, NULL, NULL);
    CHECK(kv_seq_recall_enable(s, R, NULL) == EKV_OK);
    int32_t keep[400], nk = 0;
    for (int32_t t = n - 32; t < n; t++)
        keep[nk++] = t;
    CHECK(kv_seq_keep(s, 0, 0, keep, nk, NULL) == EKV_OK);
    kv_recall *rc = kv_seq_recall(s);
    const int32_t nb = kv_recall_blocks(rc, 0, 0);
    CHECK(nb > R);
    kern_kv_view rv, ext;
    kv_seq_view(s, 0, 0, &rv);
    void *scratch = malloc(kv_recall_scratch_bytes(rc, 0, 0, 2));
    for (int trial = 0; trial < 50; trial++) {
        float q[2 * 32];
        for (int i = 0; i < G * d; i++)
            q[i] = nrand();
        float bound[64];
        for (int32_t b = 0; b < nb; b++)
            bound[b] = fmaxf(kv_recall_block_bound(rc, 0, 0, b, q),
                             kv_recall_block_bound(rc, 0, 0, b, q + d));
        int chosen[64] = {0};
        for (int k = 0; k < R; k++) { /* brute force, ties to the older block */
            int32_t best = -1;
            for (int32_t b = 0; b < nb; b++)
                if (!chosen[b] && (best < 0 || bound[b] > bound[best]))
                    best = b;
            chosen[best] = 1;
        }
        CHECK_EQ_INT(kv_recall_view(rc, 0, 0, q, G, d, n, &rv, &ext, scratch), R);
        int32_t prev = -1;
        for (int k = 0; k < R; k++) {
            int32_t which = -1;
            for (int32_t b = 0; b < nb; b++) {
                const ekv_f16 *kb;
                kv_recall_block(rc, 0, 0, b, &kb, NULL, NULL, NULL, NULL);
                if (ext.k_blocks[k] == kb)
                    which = b;
            }
            CHECK(which >= 0 && chosen[which] && which > prev); /* the top R, in block order */
            prev = which;
        }
        CHECK(ext.k_blocks[R] == rv.k_blocks[0]); /* then the resident blocks */
    }
    kv_recall_stats st;
    kv_recall_get_stats(rc, &st);
    CHECK_EQ_INT(st.selections, 50);
    CHECK_EQ_INT(st.blocks_recalled, 50 * R);
    free(scratch);
    kv_seq_free(s);
    kv_pool_destroy(pool);
}

static int cmp_dbl_desc_idx(const double *sc, int32_t a, int32_t b)
{
    return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);
}

static void test_gather_keeps_the_best_tokens_of_the_top_blocks(void)
{
    const int32_t d = 32, n = 400, G = 2, R = 5, K = 2, kept = 32;
    ekv_f16 *k_ref = malloc((size_t)n * d * sizeof *k_ref),
            *v_ref = malloc((size_t)n * d * sizeof *v_ref);
    kv_pool *pool = kv_pool_create(BT, d, 64, NULL);
    kv_seq *s = random_seq(pool, 1, n, d, k_ref, v_ref);
    CHECK(kv_seq_recall_enable(s, R, NULL) == EKV_OK);
    kv_recall *rc = kv_seq_recall(s);
    CHECK(kv_recall_set_gather(rc, KV_RECALL_GATHER_MAX + 1, NULL) == EKV_EINVAL);
    CHECK(kv_recall_set_gather(rc, -1, NULL) == EKV_EINVAL);
    CHECK(kv_recall_set_gather(rc, K, NULL) == EKV_OK);
    int32_t keep[400], nk = 0;
    for (int32_t t = n - kept; t < n; t++)
        keep[nk++] = t;
    CHECK(kv_seq_keep(s, 0, 0, keep, nk, NULL) == EKV_OK);
    const int32_t nb = kv_recall_blocks(rc, 0, 0), n_ev = n - kept; /* tokens 0..n_ev-1 */
    CHECK(nb > K * R);
    kern_kv_view rv, ext;
    kv_seq_view(s, 0, 0, &rv);
    void *scratch = malloc(kv_recall_scratch_bytes(rc, 0, 0, 2));
    double *tok = malloc((size_t)n_ev * sizeof *tok);
    for (int trial = 0; trial < 40; trial++) {
        float q[2 * 32];
        for (int i = 0; i < G * d; i++)
            q[i] = nrand();
        float bound[64];
        for (int32_t b = 0; b < nb; b++)
            bound[b] = fmaxf(kv_recall_block_bound(rc, 0, 0, b, q),
                             kv_recall_block_bound(rc, 0, 0, b, q + d));
        int cand[64] = {0};
        for (int k = 0; k < K * R; k++) { /* brute force, ties to the older block */
            int32_t best = -1;
            for (int32_t b = 0; b < nb; b++)
                if (!cand[b] && (best < 0 || bound[b] > bound[best]))
                    best = b;
            cand[best] = 1;
        }
        /* every candidate token's exact score in double, max over the group */
        int chosen[400] = {0};
        for (int32_t t = 0; t < n_ev; t++) {
            tok[t] = -INFINITY;
            for (int g = 0; g < G && cand[t / BT]; g++) {
                double x = 0;
                for (int32_t c = 0; c < d; c++)
                    x += (double)q[g * d + c] * ekv_f16_to_f32(k_ref[(size_t)t * d + c]);
                tok[t] = x > tok[t] ? x : tok[t];
            }
        }
        for (int k = 0; k < R * BT; k++) {
            int32_t best = -1;
            for (int32_t t = 0; t < n_ev; t++)
                if (cand[t / BT] && !chosen[t] && (best < 0 || cmp_dbl_desc_idx(tok, t, best)))
                    best = t;
            chosen[best] = 1;
        }
        CHECK_EQ_INT(kv_recall_view(rc, 0, 0, q, G, d, n, &rv, &ext, scratch), R);
        CHECK_EQ_INT(ext.n_tokens, rv.n_tokens + R * BT);
        int32_t prev = -1, wrong = 0, bits = 0;
        for (int32_t j = 0; j < R * BT; j++) {
            const int32_t t = ext.pos_blocks[j / BT][j % BT]; /* position = token index */
            if (t < 0 || t >= n_ev || !chosen[t] || t <= prev) {
                wrong++;
                continue;
            }
            prev = t;
            for (int32_t c = 0; c < d; c++)
                bits += ext.k_blocks[j / BT][(size_t)c * BT + j % BT] != k_ref[(size_t)t * d + c] ||
                        ext.v_blocks[j / BT][(size_t)(j % BT) * d + c] != v_ref[(size_t)t * d + c];
        }
        CHECK_EQ_INT(wrong, 0); /* the 16R best, in eviction order */
        CHECK_EQ_INT(bits, 0);
        CHECK(ext.k_blocks[R] == rv.k_blocks[0]); /* then the resident blocks */
    }
    free(tok);
    free(scratch);
    kv_seq_free(s);
    kv_pool_destroy(pool);
    free(k_ref);
    free(v_ref);
}

/* kv_digest_bounds (one ranking's bounds at once, SIMD where the CPU has
 * it) must give kv_digest_bound's floats bit for bit: max over the queries
 * of the bound, for every block, head size and block count (the SIMD path
 * takes sixteen blocks at a time, the rest go one by one). */
static void test_batched_bounds_equal_bound_bit_for_bit(void)
{
    static const int32_t dims[] = {64, 128, 48, 80, 20, 16};
    static const int32_t counts[] = {1, 15, 16, 17, 33, 64, 461};
    for (size_t di = 0; di < sizeof dims / sizeof *dims; di++)
        for (size_t ni = 0; ni < sizeof counts / sizeof *counts; ni++)
            for (int n_q = 1; n_q <= 4; n_q++) {
                const int32_t d = dims[di], n = counts[ni], stride = d + 3;
                float *mn = malloc((size_t)n * d * sizeof *mn);
                float *mx = malloc((size_t)n * d * sizeof *mx);
                float *q = malloc((size_t)n_q * stride * sizeof *q);
                float *got = malloc((size_t)n * sizeof *got);
                for (int32_t i = 0; i < n * d; i++) { /* a digest: min <= max, zeros too */
                    const float a = urand() < 0.05 ? 0.0f : nrand() * (float)(1 << (i % 7));
                    const float b = urand() < 0.2 ? a : a + (float)urand() * 3.0f;
                    mn[i] = a;
                    mx[i] = b;
                }
                for (int32_t i = 0; i < n_q * stride; i++)
                    q[i] = urand() < 0.1 ? 0.0f : nrand() * (float)(1 << (i % 5));
                kv_digest_bounds(mn, mx, n, q, n_q, stride, d, got);
                for (int32_t b = 0; b < n; b++) {
                    float want = -INFINITY;
                    for (int g = 0; g < n_q; g++) {
                        const float s = kv_digest_bound(mn + (size_t)b * d, mx + (size_t)b * d,
                                                        q + (size_t)g * stride, d);
                        want = s > want ? s : want;
                    }
                    if (memcmp(&want, &got[b], sizeof want) != 0) {
                        fprintf(stderr, "d %d n %d n_q %d block %d: %.9g, want %.9g\n", d, n,
                                n_q, b, (double)got[b], (double)want);
                        CHECK(0);
                        b = n;
                    }
                }
                free(mn);
                free(mx);
                free(q);
                free(got);
            }
}

/* A sequence of 1 layer x 1 head of n tokens whose K/V repeat every period
 * tokens (a multiple of 16: whole recall blocks repeat, so scores tie),
 * each block's keys a random centre plus noise of the given scale (small:
 * the box is tight and the ranking prunes most blocks). */
static kv_seq *clustered_seq(kv_pool *pool, int32_t n, int32_t d, int32_t period, float noise)
{
    kv_seq *s = kv_seq_create(pool, 1, 1, NULL);
    float *k = malloc((size_t)period * d * sizeof *k), *v = malloc((size_t)d * sizeof *v);
    for (int32_t i = 0; i < period * d; i += BT * d) /* the block's centre */
        for (int32_t c = 0; c < d; c++)
            k[i + c] = nrand() * (c % 7 == 0 ? 8.0f : 1.0f);
    for (int32_t i = 0; i < period * d; i++)
        k[i] = k[i - i % (BT * d) + i % d] + noise * nrand();
    for (int32_t c = 0; c < d; c++)
        v[c] = nrand();
    for (int32_t t = 0; t < n; t++)
        CHECK(kv_seq_append(s, 0, 0, k + (size_t)(t % period) * d, v, t, NULL) == EKV_OK);
    free(k);
    free(v);
    return s;
}

/* The ranking reads K only for blocks whose box can still beat the R-th
 * best score (kvrb_scores' bound and prune): the view must hold the same
 * blocks, in the same order, as scoring every block with the reference
 * score (kv_recall_block_bound per block and query, max over the group,
 * brute-force top R, ties to the older block), for every exact-channel
 * count (the box alone, a few, the default, every channel), R, query
 * position (blocks after it not eligible), repeated blocks (exact ties)
 * and queries of every scale; and the pruning must skip K reads. */
static void test_pruned_ranking_equals_reference(void)
{
    kern_init();
    static const int32_t ms[] = {0, 1, 16, 64, 100};
    static const int32_t rs[] = {1, 4, 16, 40};
    const int32_t d = 64, G = 3, n = 2432, nres = 32;
    int64_t views = 0, k_read = 0, k_all = 0;
    for (int rep = 0; rep < 3; rep++) {
        kv_pool *pool = kv_pool_create(BT, d, 2 * n / BT + 8, NULL); /* base and a clone */
        /* random keys (a loose box); blocks repeating every 10 (ties);
         * clustered blocks (a tighter box: most blocks pruned) */
        kv_seq *base = rep == 0   ? random_seq(pool, 1, n, d, NULL, NULL)
                       : rep == 1 ? clustered_seq(pool, n, d, 10 * BT, 0.5f)
                                  : clustered_seq(pool, n, d, n, 0.25f);
        for (size_t ri = 0; ri < sizeof rs / sizeof *rs; ri++) {
            const int32_t R = rs[ri];
            kv_seq *s = kv_seq_clone(base, NULL);
            CHECK(kv_seq_recall_enable(s, R, NULL) == EKV_OK);
            int32_t *keep = malloc((size_t)nres * sizeof *keep);
            for (int32_t i = 0; i < nres; i++)
                keep[i] = n - nres + i;
            CHECK(kv_seq_keep(s, 0, 0, keep, nres, NULL) == EKV_OK);
            free(keep);
            kv_recall *rc = kv_seq_recall(s);
            const int32_t nb = kv_recall_blocks(rc, 0, 0);
            CHECK_EQ_INT(nb, (n - nres) / BT);
            kern_kv_view rv, ext;
            kv_seq_view(s, 0, 0, &rv);
            void *scratch = malloc(kv_recall_scratch_bytes(rc, 0, 0, nres / BT + 1));
            float *score = malloc((size_t)nb * sizeof *score);
            int *chosen = malloc((size_t)nb * sizeof *chosen);
            for (size_t mi = 0; mi < sizeof ms / sizeof *ms; mi++) {
                CHECK(kv_recall_set_channels(rc, ms[mi], NULL) == EKV_OK);
                for (int trial = 0; trial < 6; trial++) {
                    float q[3 * 64];
                    const float scale = (float)(1 << (trial % 3)) * (trial == 5 ? 1e-3f : 1.0f);
                    for (int i = 0; i < G * d; i++)
                        q[i] = urand() < 0.1 ? 0.0f : nrand() * scale;
                    /* every block, or those up to a position inside block 50 */
                    const int32_t qpos = trial % 2 ? n : 50 * BT + 7;
                    int32_t eligible = 0;
                    for (int32_t b = 0; b < nb; b++) {
                        score[b] = -INFINITY;
                        for (int g = 0; g < G; g++) {
                            const float x = kv_recall_block_bound(rc, 0, 0, b, q + g * d);
                            score[b] = x > score[b] ? x : score[b];
                        }
                        chosen[b] = b * BT > qpos; /* not eligible */
                        eligible += !chosen[b];
                    }
                    const int32_t want_n = eligible < R ? eligible : R;
                    for (int32_t k = 0; k < want_n; k++) {
                        int32_t best = -1;
                        for (int32_t b = 0; b < nb; b++)
                            if (!chosen[b] && (best < 0 || score[b] > score[best]))
                                best = b;
                        chosen[best] = 2;
                    }
                    /* the scalar ranking (every block, one call at a time) first */
                    kern_kv_view sv;
                    kv_recall_set_rank_scalar(rc, true);
                    const int32_t sn = kv_recall_view(rc, 0, 0, q, G, d, qpos, &rv, &sv, scratch);
                    const ekv_f16 *sk[64];
                    for (int32_t k = 0; k < sn && k < 64; k++)
                        sk[k] = sv.k_blocks[k];
                    kv_recall_set_rank_scalar(rc, false);
                    kv_recall_stats st0, st1;
                    kv_recall_get_stats(rc, &st0);
                    const int32_t got = kv_recall_view(rc, 0, 0, q, G, d, qpos, &rv, &ext, scratch);
                    kv_recall_get_stats(rc, &st1);
                    CHECK_EQ_INT(got, want_n);
                    CHECK_EQ_INT(sn, want_n);
                    for (int32_t k = 0; k < got && k < sn; k++)
                        CHECK(ext.k_blocks[k] == sk[k]);
                    for (int32_t b = 0, k = 0; b < nb && k < got; b++) {
                        if (chosen[b] != 2)
                            continue;
                        const ekv_f16 *kb;
                        kv_recall_block(rc, 0, 0, b, &kb, NULL, NULL, NULL, NULL);
                        if (ext.k_blocks[k] != kb) {
                            fprintf(stderr, "rep %d R %d M %d trial %d: view %d is not block %d\n",
                                    rep, R, ms[mi], trial, k, b);
                            CHECK(0);
                            break;
                        }
                        k++;
                    }
                    views++;
                    if (ms[mi] > 0) {
                        k_read += st1.rank_k_blocks - st0.rank_k_blocks;
                        k_all += eligible;
                    }
                }
            }
            free(score);
            free(chosen);
            free(scratch);
            kv_seq_free(s);
        }
        kv_seq_free(base);
        kv_pool_destroy(pool);
    }
    fprintf(stderr, "  %lld views; K read for %lld of %lld eligible blocks\n", (long long)views,
            (long long)k_read, (long long)k_all);
    CHECK(k_read < k_all * 9 / 10); /* the pruning does skip K reads (random keys: about
                                      * a fifth; the box is loose, see kvrecall_bound.c) */
}

static void test_policy_takes_the_buffer_from_the_budget(void)
{
    kvc_policy p;
    int32_t mean = 0;
    CHECK(kvc_policy_parse("snapkv", 0.1, &p, NULL) == EKV_OK);
    p.recall = 4;
    CHECK(kvc_policy_check(&p, NULL) == EKV_OK);
    CHECK(kvc_policy_mean_tokens(&p, 1000, &mean, NULL) == EKV_OK); /* 100 > 64 */
    CHECK_EQ_INT(mean, 100);
    CHECK(kvc_policy_mean_tokens(&p, 640, &mean, NULL) == EKV_ERANGE); /* 64: nothing left */
    p.recall = -1;
    CHECK(kvc_policy_check(&p, NULL) == EKV_EINVAL);
    p.recall = KVC_RECALL_MAX + 1;
    CHECK(kvc_policy_check(&p, NULL) == EKV_EINVAL);
    CHECK(kvc_policy_parse("full", 1.0, &p, NULL) == EKV_OK);
    p.recall = 4; /* full evicts nothing: recall is a no-op, not an error */
    CHECK(kvc_policy_mean_tokens(&p, 10, &mean, NULL) == EKV_OK);
}

int main(void)
{
    RUN_TEST(test_bound_never_underestimates);
    RUN_TEST(test_rank_bound_never_underestimates);
    RUN_TEST(test_store_is_bit_identical_across_evictions_and_clones);
    RUN_TEST(test_recall_of_every_block_equals_full_attention);
    RUN_TEST(test_top_r_by_score);
    RUN_TEST(test_gather_keeps_the_best_tokens_of_the_top_blocks);
    RUN_TEST(test_policy_takes_the_buffer_from_the_budget);
    RUN_TEST(test_batched_bounds_equal_bound_bit_for_bit);
    RUN_TEST(test_pruned_ranking_equals_reference);
    return TEST_EXIT();
}
