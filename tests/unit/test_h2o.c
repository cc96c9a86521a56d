/*
 * test_h2o.c - the H2O-style unified eviction baseline (compress/h2o.c,
 * `--decode-method h2o`) against a brute-force reference written from its
 * definition, on synthetic attention probabilities (no model needed).
 *
 * The reference keeps, per (layer, KV head), the cached positions and each
 * one's accumulated mass in doubles: every decode step appends a token with
 * mass 0, adds to every held token the sum over the group's query heads of
 * this step's probability, and when the head then holds more than P + W
 * tokens (P its prompt length, W the window: slide's memory) keeps the last
 * R tokens and the P + W - R others of largest mass, ties to the older
 * token; prompt tokens compete like generated ones unless they are packed
 * (SparK), which stay. Probabilities are multiples of 1/16 so every sum is
 * exact in float and ties are frequent. The logits passed beside them rank
 * tokens the other way round, so a selection that reads the logits (SCOPE's
 * score) or a single step's probabilities fails.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/kvcache.h"

#define L 2
#define HKV 2
#define G 3
#define D 8
#define BT 16
#define MAXN 1024

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint32_t urand(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)((rng >> 11) % n);
}

typedef struct ref_head {
    int32_t pos[MAXN];
    double mass[MAXN];
    int32_t n, P, fixed;
} ref_head;

static ref_head ref[L][HKV];

/* The step's probabilities of one head ([G][n]) added, then the eviction. */
static void ref_step(ref_head *h, const float *probs, int32_t W, int32_t R)
{
    const int32_t n = h->n;
    for (int32_t j = 0; j < n; j++)
        for (int32_t g = 0; g < G; g++)
            h->mass[j] += probs[(size_t)g * n + j];
    const int32_t cap = h->P + W;
    if (n <= cap)
        return;
    static uint8_t keep[MAXN];
    memset(keep, 0, sizeof keep);
    for (int32_t i = 0; i < h->fixed; i++)
        keep[i] = 1;
    for (int32_t i = n - R; i < n; i++)
        keep[i] = 1;
    for (int32_t r = 0; r < cap - R - h->fixed; r++) { /* one heaviest at a time */
        int32_t best = -1;
        for (int32_t j = 0; j < n - R; j++)
            if (!keep[j] && (best < 0 || h->mass[j] > h->mass[best]))
                best = j;
        keep[best] = 1;
    }
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++)
        if (keep[i]) {
            h->pos[m] = h->pos[i];
            h->mass[m++] = h->mass[i];
        }
    h->n = m;
}

static int64_t g_evicted;

static void evict_hook(void *ctx, const kv_seq *seq, int32_t layer, int32_t head,
                       const kern_kv_view *view, const int32_t *dropped, int32_t n_dropped)
{
    (void)ctx;
    (void)seq;
    (void)layer;
    (void)head;
    (void)view;
    (void)dropped;
    g_evicted += n_dropped;
}

/* T steps of h2o with recent R and window W over heads that start with
 * P[l][h] prompt tokens (head 0 of layer 0 packed when pack; the prompt
 * gets no attention when cold); returns the number of steps where a head's
 * positions differed from the reference. */
static int run_case(int32_t R, int32_t W, int32_t T, const int32_t P[L][HKV], bool pack,
                    bool cold)
{
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(BT, D, 2048, &err);
    kv_seq *seq = kv_seq_create(pool, L, HKV, &err);
    CHECK(pool && seq);
    if (!pool || !seq)
        return 1;
    g_evicted = 0;
    kv_pool_set_evict_hook(pool, evict_hook, NULL);
    memset(ref, 0, sizeof ref);
    float k[D], v[D];
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < HKV; h++) {
            for (int32_t i = 0; i < P[l][h]; i++) {
                for (int32_t j = 0; j < D; j++)
                    k[j] = v[j] = (float)urand(100) / 100.0f;
                kv_seq_append(seq, l, h, k, v, 2 * i, &err);
                ref[l][h].pos[ref[l][h].n++] = 2 * i;
            }
            ref[l][h].P = P[l][h];
        }
    if (pack) { /* SparK packs the prompt of (0, 0): those tokens cannot be dropped */
        static uint8_t masks[MAXN];
        static float m[MAXN];
        memset(masks, 0x0f, sizeof masks);
        CHECK_EQ_INT(kv_seq_pack(seq, 0, 0, 4, masks, m, NULL, &err), EKV_OK);
        ref[0][0].fixed = P[0][0];
    }
    kvc_decode_policy d;
    CHECK_EQ_INT(kvc_decode_parse("h2o", R, W, &d, &err), EKV_OK);
    kvc_scope *s = kvc_scope_create(&d, seq, T, &err);
    CHECK(s != NULL);
    if (!s)
        return 1;
    static float probs[G * MAXN], logits[G * MAXN];
    static int32_t got[MAXN];
    int bad = 0;
    for (int32_t t = 0; t < T && !bad; t++) {
        const int32_t pos = 10000 + t;
        kvc_scope_begin(s, t);
        for (int32_t l = 0; l < L; l++) {
            for (int32_t h = 0; h < HKV; h++) {
                for (int32_t j = 0; j < D; j++)
                    k[j] = v[j] = (float)urand(100) / 100.0f;
                kv_seq_append(seq, l, h, k, v, pos, &err);
                ref_head *r = &ref[l][h];
                r->pos[r->n] = pos;
                r->mass[r->n++] = 0;
                const int32_t n = kv_seq_len(seq, l, h);
                CHECK_EQ_INT(n, r->n);
                for (int32_t i = 0; i < G * n; i++) {
                    probs[i] = cold && r->pos[i % n] < 10000 ? 0 : (float)urand(5) / 16.0f;
                    logits[i] = -probs[i]; /* the opposite ranking */
                }
                ref_step(r, probs, W, R);
                kvc_scope_observe(s, seq, l, h, logits, probs, G, n);
            }
        }
        CHECK_EQ_INT(kvc_scope_status(s, &err), EKV_OK);
        for (int32_t l = 0; l < L && !bad; l++)
            for (int32_t h = 0; h < HKV && !bad; h++) {
                const int32_t n = kv_seq_positions(seq, l, h, got);
                const int32_t held = t + 1 < W ? t + 1 : W;
                if (n != ref[l][h].n || memcmp(got, ref[l][h].pos, (size_t)n * sizeof *got) ||
                    n != P[l][h] + held) { /* slide's memory, head by head */
                    fprintf(stderr, "  step %d layer %d head %d: %d tokens, reference %d\n", t, l,
                            h, n, ref[l][h].n);
                    bad = 1;
                }
            }
    }
    int64_t total = 0, kept = 0;
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < HKV; h++) {
            total += P[l][h] + T;
            kept += ref[l][h].n;
        }
    kvc_scope_stats st;
    kvc_scope_get_stats(s, &st);
    CHECK_EQ_INT(g_evicted, total - kept); /* every eviction reached the hook */
    CHECK_EQ_INT(st.evicted, g_evicted);
    CHECK_EQ_INT(st.decode_held, T < W ? T : W);
    kvc_scope_free(s);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
    return bad;
}

static const int32_t P_MIXED[L][HKV] = {{6, 9}, {0, 17}};

static void test_matches_reference(void)
{
    CHECK_EQ_INT(run_case(4, 12, 150, P_MIXED, false, false), 0);
    CHECK_EQ_INT(run_case(1, 3, 80, P_MIXED, false, false), 0);
}

/* Prompt tokens are evicted too (unified): a prompt that draws no
 * attention loses tokens to generated ones while the cache stays at P + W. */
static void test_prompt_tokens_compete(void)
{
    static const int32_t P_LONG[L][HKV] = {{40, 40}, {40, 40}};
    CHECK_EQ_INT(run_case(2, 6, 60, P_LONG, false, true), 0);
    int32_t evicted_prompt = 0;
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < HKV; h++) {
            int32_t prompt_left = 0;
            for (int32_t i = 0; i < ref[l][h].n; i++)
                prompt_left += ref[l][h].pos[i] < 10000;
            evicted_prompt += 40 - prompt_left;
        }
    CHECK(evicted_prompt > 0);
}

static void test_packed_prompt_stays(void)
{
    CHECK_EQ_INT(run_case(4, 12, 100, P_MIXED, true, false), 0);
}

/* W at least the output length: nothing is evicted. */
static void test_window_at_least_output_evicts_nothing(void)
{
    CHECK_EQ_INT(run_case(4, 64, 64, P_MIXED, false, false), 0);
    CHECK_EQ_INT(g_evicted, 0);
}

/* A probe that skips a step (the head holds other than last + 1 tokens) is
 * an error kept for kvc_scope_status, not a wrong selection. */
static void test_skipped_step_is_an_error(void)
{
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(BT, D, 64, &err);
    kv_seq *seq = kv_seq_create(pool, 1, 1, &err);
    kvc_decode_policy d = {.mode = KVC_DECODE_H2O, .recent = 2, .window = 4};
    kvc_scope *s = kvc_scope_create(&d, seq, 10, &err);
    CHECK(s != NULL);
    if (!s)
        return;
    float k[D] = {0}, p[G * 4] = {0};
    kvc_scope_begin(s, 0);
    kv_seq_append(seq, 0, 0, k, k, 0, &err);
    kv_seq_append(seq, 0, 0, k, k, 1, &err);
    kvc_scope_observe(s, seq, 0, 0, p, p, G, 2);
    CHECK_EQ_INT(kvc_scope_status(s, &err), EKV_EINVAL);
    CHECK(strstr(err.msg, "h2o") != NULL);
    kvc_scope_free(s);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
}

static void test_name(void)
{
    kvc_decode_policy d;
    CHECK_EQ_INT(kvc_decode_parse("h2o", 4, 16, &d, NULL), EKV_OK);
    CHECK_EQ_INT(d.mode, KVC_DECODE_H2O);
    CHECK(!strcmp(kvc_decode_name(KVC_DECODE_H2O), "h2o"));
    CHECK_EQ_INT(kvc_decode_parse("h2o", 16, 16, &d, NULL), EKV_EINVAL);
}

int main(void)
{
    RUN_TEST(test_name);
    RUN_TEST(test_matches_reference);
    RUN_TEST(test_prompt_tokens_compete);
    RUN_TEST(test_packed_prompt_stays);
    RUN_TEST(test_window_at_least_output_evicts_nothing);
    RUN_TEST(test_skipped_step_is_an_error);
    return TEST_EXIT();
}
