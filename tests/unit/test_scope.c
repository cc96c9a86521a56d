/*
 * test_scope.c - SCOPE decode-phase compression (compress/scope.c) against
 * a brute-force model of shared/specs/scope.md, on synthetic attention
 * logits (no model needed).
 *
 * The reference keeps, per (layer, KV head), the list of cached positions
 * and applies the spec's per-step algorithm literally (section 3: append,
 * then if n >= P + B(t) keep P + top (B - R) of the candidates [P, n - R) by
 * this step's logit + the last R), with the discontinuous gate written as
 * the official code's class-level counters over layer calls (section 4:
 * jump_step counts skipped layer calls up to delta * L, then L layer calls
 * compress, then both reset). Group aggregation: max over the query heads
 * (entrokv's decision). The implementation's kept positions after every
 * step must equal the reference's, head by head, and what it evicts must
 * reach the pool's eviction hook.
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
#define MAXN 4096

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) % 1000000) / 1000000.0f;
}

/* ---- budgets (spec section 4 and 5) ---- */

static void test_delta_and_budget_formula(void)
{
    kvc_decode_policy d = {.mode = KVC_DECODE_ADAPTIVE, .recent = 256, .window = 512};
    /* the numbers section 5 lists for LongGenBench */
    CHECK_EQ_INT(kvc_scope_delta(&d, 4096), 15);
    CHECK_EQ_INT(kvc_scope_delta(&d, 7950), 30);
    d.window = 1024;
    CHECK_EQ_INT(kvc_scope_delta(&d, 4096), 5);
    CHECK_EQ_INT(kvc_scope_delta(&d, 7950), 10);
    d.window = 512;
    for (int32_t t = 0; t < 4096; t++)
        CHECK_EQ_INT(kvc_scope_budget(&d, 15, t), 256 + t / 15);
    /* eviction starts when t + 1 >= R + t / delta: t = 273 (section 4) */
    int32_t first = -1;
    for (int32_t t = 0; t < 4096 && first < 0; t++)
        if (t + 1 >= kvc_scope_budget(&d, 15, t))
            first = t;
    CHECK_EQ_INT(first, 273);
    d.mode = KVC_DECODE_SLIDE;
    CHECK_EQ_INT(kvc_scope_budget(&d, 15, 0), 512);
    CHECK_EQ_INT(kvc_scope_budget(&d, 15, 4000), 512);
    /* T_out <= R would make delta 0 or negative: clamped to 1 */
    CHECK_EQ_INT(kvc_scope_delta(&d, 100), 1);
}

static void test_parse(void)
{
    kvc_decode_policy d;
    CHECK_EQ_INT(kvc_decode_parse("scope-slide", 4, 16, &d, NULL), EKV_OK);
    CHECK_EQ_INT(d.mode, KVC_DECODE_SLIDE);
    CHECK_EQ_INT(kvc_decode_parse(NULL, 0, 0, &d, NULL), EKV_OK);
    CHECK_EQ_INT(d.mode, KVC_DECODE_NONE);
    CHECK_EQ_INT(kvc_decode_parse("none", 0, 0, &d, NULL), EKV_OK);
    CHECK_EQ_INT(kvc_decode_parse("scope-adaptive", 16, 16, &d, NULL), EKV_EINVAL);
    CHECK_EQ_INT(kvc_decode_parse("scope-adaptive", 0, 16, &d, NULL), EKV_EINVAL);
    CHECK_EQ_INT(kvc_decode_parse("scope", 4, 16, &d, NULL), EKV_EINVAL);
    CHECK(!strcmp(kvc_decode_name(KVC_DECODE_DISCONTINUOUS), "scope-discontinuous"));
}

/* ---- the brute-force reference ---- */

typedef struct ref_head {
    int32_t pos[MAXN];
    int32_t n;
    int32_t P;
} ref_head;

typedef struct ref_state {
    ref_head h[L][HKV];
    kvc_decode_policy d;
    int32_t delta;
    int64_t layer_calls; /* current_decoding_step */
    int64_t jump_step, jump_layer;
} ref_state;

/* One layer call of the reference for one layer: every head of that layer,
 * logits[h][g][n] for the step's cache (after the append). */
static void ref_layer(ref_state *s, int32_t l, float logits[HKV][G][MAXN])
{
    const int32_t t = (int32_t)(s->layer_calls / L);
    s->layer_calls++;
    const int32_t R = s->d.recent;
    const int32_t B = s->d.mode == KVC_DECODE_SLIDE || s->d.mode == KVC_DECODE_RECENT
                          ? s->d.window
                          : R + t / s->delta;
    /* every head of a layer holds the same decode count; decide on head 0 */
    const ref_head *h0 = &s->h[l][0];
    if (h0->n < h0->P + B)
        return;
    if (s->d.mode == KVC_DECODE_DISCONTINUOUS) {
        if (s->jump_step < (int64_t)s->delta * L) {
            s->jump_step++;
            return;
        }
        if (++s->jump_layer == L)
            s->jump_step = s->jump_layer = 0;
    }
    for (int32_t k = 0; k < HKV; k++) {
        ref_head *h = &s->h[l][k];
        const int32_t n = h->n, P = h->P, want = B - R;
        static uint8_t keep[MAXN];
        memset(keep, 0, sizeof keep);
        for (int32_t i = 0; i < P; i++)
            keep[i] = 1;
        for (int32_t i = n - R; i < n; i++)
            keep[i] = 1;
        /* top `want` candidates by max-over-group logit, ties to the lower index */
        for (int32_t r = 0; r < want; r++) {
            int32_t best = -1;
            float bs = 0;
            for (int32_t j = P; j < n - R; j++) {
                if (keep[j])
                    continue;
                float sc = logits[k][0][j];
                for (int32_t g = 1; g < G; g++)
                    sc = logits[k][g][j] > sc ? logits[k][g][j] : sc;
                if (s->d.mode == KVC_DECODE_RECENT) /* keeps the newest */
                    sc = (float)j;
                if (best < 0 || sc > bs) {
                    best = j;
                    bs = sc;
                }
            }
            keep[best] = 1;
        }
        int32_t m = 0;
        for (int32_t i = 0; i < n; i++)
            if (keep[i])
                h->pos[m++] = h->pos[i];
        h->n = m;
    }
}

/* ---- the eviction hook ---- */

static int64_t g_evicted;
static int32_t g_last_evicted_pos;

static void evict_hook(void *ctx, const kv_seq *seq, int32_t layer, int32_t head,
                       const kern_kv_view *view, const int32_t *dropped, int32_t n_dropped)
{
    (void)ctx;
    (void)seq;
    (void)layer;
    (void)head;
    g_evicted += n_dropped;
    for (int32_t i = 0; i < n_dropped; i++)
        g_last_evicted_pos =
            view->pos_blocks[dropped[i] / view->block_tokens][dropped[i] % view->block_tokens];
}

/* Runs T decode steps of policy d over a sequence whose heads start with
 * P[l][h] prompt tokens; compares with the reference after each step. Returns
 * the number of steps whose state differed. */
static int run_case(const kvc_decode_policy *d, int32_t T, int32_t t_out,
                    const int32_t P[L][HKV], bool check_full)
{
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(BT, D, 4096, &err);
    kv_seq *seq = kv_seq_create(pool, L, HKV, &err);
    CHECK(pool && seq);
    if (!pool || !seq)
        return 1;
    g_evicted = 0;
    kv_pool_set_evict_hook(pool, evict_hook, NULL);
    static ref_state ref;
    memset(&ref, 0, sizeof ref);
    ref.d = *d;
    ref.delta = kvc_scope_delta(d, t_out);
    float k[D], v[D];
    int32_t pmax = 0;
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < HKV; h++) {
            /* the prompt's positions with gaps: a prefill policy kept some */
            for (int32_t i = 0; i < P[l][h]; i++) {
                for (int32_t j = 0; j < D; j++)
                    k[j] = v[j] = frand();
                const int32_t pos = 3 * i;
                kv_seq_append(seq, l, h, k, v, pos, &err);
                ref.h[l][h].pos[ref.h[l][h].n++] = pos;
                pmax = pos + 1 > pmax ? pos + 1 : pmax;
            }
            ref.h[l][h].P = P[l][h];
        }
    kvc_scope *s = kvc_scope_create(d, seq, t_out, &err);
    CHECK(s != NULL);
    if (!s)
        return 1;
    static float logits[HKV][G][MAXN];
    static int32_t got[MAXN];
    int bad = 0;
    for (int32_t t = 0; t < T && !bad; t++) {
        const int32_t pos = pmax + 100 + t;
        kvc_scope_begin(s, t);
        for (int32_t l = 0; l < L; l++) {
            for (int32_t h = 0; h < HKV; h++) {
                for (int32_t j = 0; j < D; j++)
                    k[j] = v[j] = frand();
                kv_seq_append(seq, l, h, k, v, pos, &err);
                ref.h[l][h].pos[ref.h[l][h].n++] = pos;
            }
            for (int32_t h = 0; h < HKV; h++) {
                const int32_t n = kv_seq_len(seq, l, h);
                for (int32_t g = 0; g < G; g++)
                    for (int32_t j = 0; j < n; j++) /* coarse values: ties happen */
                        logits[h][g][j] = (float)(int)(frand() * 20.0f);
            }
            /* the reference first (it reads logits by the cache index before eviction) */
            ref_layer(&ref, l, logits);
            for (int32_t h = 0; h < HKV; h++) { /* as the model lays them out: [G][n] */
                static float compact[G * MAXN];
                const int32_t n = kv_seq_len(seq, l, h);
                for (int32_t g = 0; g < G; g++)
                    memcpy(compact + (size_t)g * n, logits[h][g], (size_t)n * sizeof(float));
                kvc_scope_observe(s, seq, l, h, compact, compact, G, n);
            }
        }
        CHECK_EQ_INT(kvc_scope_status(s, &err), EKV_OK);
        for (int32_t l = 0; l < L && !bad; l++)
            for (int32_t h = 0; h < HKV && !bad; h++) {
                const int32_t n = kv_seq_positions(seq, l, h, got);
                if (n != ref.h[l][h].n || memcmp(got, ref.h[l][h].pos, (size_t)n * sizeof *got)) {
                    fprintf(stderr, "  %s: step %d layer %d head %d: %d tokens, reference %d\n",
                            kvc_decode_name(d->mode), t, l, h, n, ref.h[l][h].n);
                    bad = 1;
                }
            }
    }
    if (check_full) { /* nothing was ever evicted */
        CHECK_EQ_INT(g_evicted, 0);
        for (int32_t l = 0; l < L; l++)
            for (int32_t h = 0; h < HKV; h++)
                CHECK_EQ_INT(kv_seq_len(seq, l, h), P[l][h] + T);
    } else {
        int64_t ref_kept = 0, total = 0;
        for (int32_t l = 0; l < L; l++)
            for (int32_t h = 0; h < HKV; h++) {
                ref_kept += ref.h[l][h].n;
                total += P[l][h] + T;
            }
        CHECK_EQ_INT(g_evicted, total - ref_kept); /* every eviction reached the hook */
        kvc_scope_stats st;
        kvc_scope_get_stats(s, &st);
        CHECK_EQ_INT(st.evicted, g_evicted);
    }
    kvc_scope_free(s);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
    return bad;
}

static const int32_t P_MIXED[L][HKV] = {{5, 9}, {0, 17}};

static void test_slide_matches_reference(void)
{
    kvc_decode_policy d = {.mode = KVC_DECODE_SLIDE, .recent = 4, .window = 12};
    CHECK_EQ_INT(run_case(&d, 200, 200, P_MIXED, false), 0);
}

static void test_adaptive_matches_reference(void)
{
    kvc_decode_policy d = {.mode = KVC_DECODE_ADAPTIVE, .recent = 4, .window = 12};
    CHECK_EQ_INT(run_case(&d, 200, 200, P_MIXED, false), 0);
}

static void test_discontinuous_matches_reference(void)
{
    kvc_decode_policy d = {.mode = KVC_DECODE_DISCONTINUOUS, .recent = 4, .window = 12};
    CHECK_EQ_INT(run_case(&d, 200, 200, P_MIXED, false), 0);
    d.recent = 1;
    d.window = 3;
    CHECK_EQ_INT(run_case(&d, 150, 150, P_MIXED, false), 0);
}

/* Slide with W >= the output length never evicts (the cache equals no
 * decode compression); adaptive and discontinuous evict by design once
 * t + 1 >= R + t / delta, whatever W is. */
static void test_recent_baseline_matches_reference(void)
{
    kvc_decode_policy d = {.mode = KVC_DECODE_RECENT, .recent = 4, .window = 12};
    CHECK_EQ_INT(run_case(&d, 100, 100, P_MIXED, false), 0);
}

static void test_window_at_least_output_evicts_nothing(void)
{
    kvc_decode_policy d = {.mode = KVC_DECODE_SLIDE, .recent = 8, .window = 120};
    CHECK_EQ_INT(run_case(&d, 120, 120, P_MIXED, true), 0);
}

/* Discontinuous: the selection runs once every delta + 1 steps once over
 * budget (section 4), and the decode pool peaks at B + delta. */
static void test_discontinuous_period(void)
{
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(BT, D, 64, &err);
    kv_seq *seq = kv_seq_create(pool, 1, 1, &err);
    kvc_decode_policy d = {.mode = KVC_DECODE_DISCONTINUOUS, .recent = 4, .window = 8};
    kvc_scope *s = kvc_scope_create(&d, seq, 44, &err); /* delta = (44 - 4) / 4 = 10 */
    CHECK(s != NULL);
    if (!s)
        return;
    kvc_scope_stats st;
    kvc_scope_get_stats(s, &st);
    CHECK_EQ_INT(st.delta, 10);
    int64_t calls = 0;
    int32_t last = -1, gaps_ok = 1, n_gaps = 0;
    for (int32_t t = 0; t < 200; t++) {
        kvc_scope_begin(s, t);
        kvc_scope_get_stats(s, &st);
        if (st.topk_calls != calls) {
            if (last >= 0) {
                gaps_ok &= t - last == st.delta + 1;
                n_gaps++;
            }
            last = t;
            calls = st.topk_calls;
        }
    }
    CHECK(gaps_ok);
    CHECK(n_gaps > 5);
    kvc_scope_get_stats(s, &st);
    CHECK(st.decode_peak <= st.budget + st.delta + 1);
    kvc_scope_free(s);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
}

int main(void)
{
    RUN_TEST(test_delta_and_budget_formula);
    RUN_TEST(test_parse);
    RUN_TEST(test_slide_matches_reference);
    RUN_TEST(test_adaptive_matches_reference);
    RUN_TEST(test_discontinuous_matches_reference);
    RUN_TEST(test_recent_baseline_matches_reference);
    RUN_TEST(test_window_at_least_output_evicts_nothing);
    RUN_TEST(test_discontinuous_period);
    return TEST_EXIT();
}
