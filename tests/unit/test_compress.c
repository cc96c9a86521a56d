/*
 * test_compress.c - the compression building blocks without a model: budget
 * splitting, every method's allocation invariants, StreamingLLM's and
 * SnapKV's selections (SnapKV against a brute-force double-precision
 * reference on random inputs), the truncated matrix entropy on known
 * spectra and against numpy on saved query states, the eviction hook and
 * the pool accounting after a keep.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../compress/compress_internal.h"
#include "ekv_test.h"
#include "entrokv/kvcache.h"

static uint64_t rng_state = 42;
static double urand(void) /* [0, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static double nrand(void)
{
    double u = urand() + 1e-12, v = urand();
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}

static int64_t sum32(const int32_t *x, int n)
{
    int64_t s = 0;
    for (int i = 0; i < n; i++)
        s += x[i];
    return s;
}

static void test_split_sums_to_total_and_respects_clamps(void)
{
    double w[7] = {1, 2, 3, 4, 5, 6, 70};
    int32_t out[7];
    kvc_split(w, 7, 700, 10, 200, out);
    CHECK_EQ_INT(sum32(out, 7), 700);
    for (int i = 0; i < 7; i++)
        CHECK(out[i] >= 10 && out[i] <= 200);
    CHECK_EQ_INT(out[6], 200); /* the heavy one is clamped, the rest absorb the excess */
    for (int i = 1; i < 6; i++)
        CHECK(out[i] >= out[i - 1]);
    /* more than the clamps allow: everyone at hi, sum below the total */
    kvc_split(w, 7, 100000, 1, 50, out);
    CHECK_EQ_INT(sum32(out, 7), 350);
    /* exact proportions when nothing clamps */
    double w2[3] = {1, 1, 2};
    kvc_split(w2, 3, 400, 1, 1000, out);
    CHECK_EQ_INT(out[0], 100);
    CHECK_EQ_INT(out[1], 100);
    CHECK_EQ_INT(out[2], 200);
    /* deterministic rounding */
    int32_t again[3];
    double w3[3] = {1, 1, 1};
    kvc_split(w3, 3, 100, 1, 1000, out);
    kvc_split(w3, 3, 100, 1, 1000, again);
    CHECK_EQ_INT(sum32(out, 3), 100);
    CHECK(!memcmp(out, again, sizeof again));
}

static void test_method_budgets_never_exceed_total(void)
{
    const kvc_method *ms[] = {&kvc_method_streaming, &kvc_method_snapkv, &kvc_method_pyramidkv,
                              &kvc_method_uncomp};
    const int32_t L = 30, HKV = 3;
    float ent[30 * 3];
    for (int i = 0; i < L * HKV; i++)
        ent[i] = (float)(0.2 + 0.6 * urand());
    const int32_t means[] = {1, 5, 20, 128, 400, 1000};
    for (size_t mi = 0; mi < sizeof ms / sizeof ms[0]; mi++)
        for (size_t b = 0; b < sizeof means / sizeof means[0]; b++) {
            kvc_ctx c = {.n_layers = L, .n_kv_heads = HKV, .n_tokens = 1000, .mean = means[b],
                         .total = (int64_t)means[b] * L * HKV, .kv_entropy = ent};
            int32_t budget[30 * 3];
            ms[mi]->allocate(&c, budget);
            CHECK(sum32(budget, L * HKV) <= c.total);
            CHECK(sum32(budget, L * HKV) >= c.total - L * HKV); /* nothing wasted */
            for (int i = 0; i < L * HKV; i++)
                CHECK(budget[i] >= 1 && budget[i] <= 1000);
        }
}

static void test_pyramid_shrinks_with_depth_and_uncomp_favours_high_entropy(void)
{
    const int32_t L = 30, HKV = 3;
    int32_t budget[90];
    kvc_ctx c = {.n_layers = L, .n_kv_heads = HKV, .n_tokens = 4096, .mean = 400,
                 .total = 400 * 90};
    kvc_method_pyramidkv.allocate(&c, budget);
    CHECK(budget[0] > budget[(L - 1) * HKV]);
    for (int l = 1; l < L; l++)
        CHECK(budget[l * HKV] <= budget[(l - 1) * HKV]);
    /* online uncomp: the highest-entropy head of each layer keeps twice the others */
    float ent[90];
    for (int l = 0; l < L; l++)
        for (int h = 0; h < HKV; h++)
            ent[l * HKV + h] = h == 1 ? 0.8f : 0.4f;
    c.kv_entropy = ent;
    kvc_method_uncomp.allocate(&c, budget);
    for (int l = 0; l < L; l++) {
        CHECK_EQ_INT(budget[l * HKV + 1], 2 * budget[l * HKV]);
        CHECK_EQ_INT(budget[l * HKV + 2], budget[l * HKV]);
    }
    CHECK_EQ_INT(sum32(budget, 90), c.total);
    /* online layer budgets follow the layers' mean entropy */
    for (int h = 0; h < HKV; h++)
        ent[5 * HKV + h] = 0.9f;
    kvc_method_uncomp.allocate(&c, budget);
    CHECK(sum32(budget + 5 * HKV, HKV) > sum32(budget + 4 * HKV, HKV));
    CHECK(sum32(budget, 90) <= c.total);
}

static void test_streaming_keeps_exactly_sinks_and_recent(void)
{
    kvc_ctx c = {.n_tokens = 100};
    int32_t keep[100];
    kvc_method_streaming.select(&c, NULL, 20, keep, NULL);
    for (int i = 0; i < 4; i++)
        CHECK_EQ_INT(keep[i], i);
    for (int i = 0; i < 16; i++)
        CHECK_EQ_INT(keep[4 + i], 84 + i);
    kvc_method_streaming.select(&c, NULL, 3, keep, NULL); /* tiny budgets: fewer sinks */
    CHECK_EQ_INT(keep[0], 0);
    CHECK_EQ_INT(keep[1], 98);
    CHECK_EQ_INT(keep[2], 99);
}

/* ---- SnapKV against a brute-force reference ---- */

#define D 16
#define BT 16
#define G 3

static int cmp_int(const void *a, const void *b)
{
    return (*(const int32_t *)a > *(const int32_t *)b) - (*(const int32_t *)a < *(const int32_t *)b);
}

/* Attention probabilities in double, summed, max-pooled, then the top
 * entries by a full sort; window appended. */
static void brute_force(const float *K, int n, const float *Q, int nw, int budget, int32_t *keep)
{
    double *s = calloc((size_t)n, sizeof *s), *pooled = calloc((size_t)n, sizeof *pooled);
    double *p = malloc((size_t)n * sizeof *p);
    for (int r = 0; r < nw; r++)
        for (int g = 0; g < G; g++) {
            const float *q = Q + ((size_t)r * G + g) * D;
            const int qpos = n - nw + r;
            double mx = -INFINITY, sum = 0;
            for (int t = 0; t <= qpos; t++) {
                double d = 0;
                for (int j = 0; j < D; j++)
                    d += (double)q[j] * K[(size_t)t * D + j];
                p[t] = d / sqrt((double)D);
                mx = p[t] > mx ? p[t] : mx;
            }
            for (int t = 0; t <= qpos; t++)
                sum += (p[t] = exp(p[t] - mx));
            for (int t = 0; t <= qpos; t++)
                s[t] += p[t] / sum;
        }
    int w = 8 < budget / 2 ? 8 : budget / 2, prefix = n - w, k = budget - w;
    for (int j = 0; j < prefix; j++) {
        pooled[j] = -INFINITY;
        for (int t = j - 3; t <= j + 3; t++)
            if (t >= 0 && t < prefix && s[t] > pooled[j])
                pooled[j] = s[t];
    }
    char *taken = calloc((size_t)n, 1);
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int j = 0; j < prefix; j++)
            if (!taken[j] && (best < 0 || pooled[j] > pooled[best]))
                best = j;
        taken[best] = 1;
        keep[i] = best;
    }
    qsort(keep, (size_t)k, sizeof *keep, cmp_int);
    for (int i = 0; i < w; i++)
        keep[k + i] = prefix + i;
    free(s);
    free(pooled);
    free(p);
    free(taken);
}

static void test_snapkv_selection_equals_brute_force(void)
{
    int mismatched_trials = 0;
    for (int trial = 0; trial < 40; trial++) {
        const int n = 20 + (int)(urand() * 300), nw = 8 < n ? 8 : n;
        const int budget = 1 + (int)(urand() * (n - 1));
        float *K = malloc((size_t)n * D * sizeof *K), Q[8 * G * D];
        kv_pool *pool = kv_pool_create(BT, D, (n + BT - 1) / BT + 1, NULL);
        kv_seq *seq = kv_seq_create(pool, 1, 1, NULL);
        float v[D] = {0};
        for (int t = 0; t < n; t++) {
            for (int j = 0; j < D; j++) /* fp16-exact values so both sides see the same K */
                K[(size_t)t * D + j] = ekv_f16_to_f32(ekv_f32_to_f16((float)(2 * nrand())));
            kv_seq_append(seq, 0, 0, K + (size_t)t * D, v, t, NULL);
        }
        for (int i = 0; i < nw * G * D; i++)
            Q[i] = (float)(2 * nrand());
        int32_t qpos[8], *keep = malloc((size_t)n * sizeof *keep), *ref = malloc((size_t)n * sizeof *ref);
        for (int r = 0; r < nw; r++)
            qpos[r] = n - nw + r;
        float *scores = malloc((size_t)n * sizeof *scores);
        float *scratch = malloc((size_t)n * (nw * G + 2) * sizeof *scratch);
        kern_kv_view view;
        kv_seq_view(seq, 0, 0, &view);
        kvc_window_scores(&view, Q, (size_t)G * D, nw, G, qpos, scores, scratch);
        kvc_ctx c = {.n_tokens = n};
        kvc_select_snap(&c, scores, budget, keep, scratch);
        brute_force(K, n, Q, nw, budget, ref);
        mismatched_trials += memcmp(keep, ref, (size_t)budget * sizeof *keep) != 0;
        for (int i = 1; i < budget; i++)
            CHECK(keep[i] > keep[i - 1]);
        free(K);
        free(keep);
        free(ref);
        free(scores);
        free(scratch);
        kv_seq_free(seq);
        kv_pool_destroy(pool);
    }
    CHECK_EQ_INT(mismatched_trials, 0);
}

/* ---- entropy ---- */

static void test_entropy_of_known_spectra(void)
{
    enum { d = 16 };
    double A[d * d], e;
    memset(A, 0, sizeof A);
    for (int i = 0; i < d; i++)
        A[i * d + i] = 1.0;
    CHECK(kvc_entropy(A, d, d, &e, NULL) == EKV_OK);
    CHECK_NEAR(e, 1.0, 1e-8); /* identity: the maximal (uniform) spectrum */
    memset(A, 0, sizeof A);
    for (int i = 0; i < d; i++)
        A[i * d + i] = 1.0;
    CHECK(kvc_entropy(A, d, 4, &e, NULL) == EKV_OK);
    CHECK_NEAR(e, 4.0 / d, 1e-8); /* truncated to the top 4 of 16 equal eigenvalues */
    /* rank one through the Gram path: rows a_t * u centre to multiples of u */
    float rows[40 * d];
    for (int t = 0; t < 40; t++)
        for (int j = 0; j < d; j++)
            rows[t * d + j] = (float)((t % 7 - 3.0) * (j + 1));
    memset(A, 0, sizeof A);
    kvc_gram_add(A, rows, 40, d, d);
    CHECK(kvc_entropy(A, d, d, &e, NULL) == EKV_OK);
    CHECK_NEAR(e, 0.0, 1e-5); /* float Gram rounding + the 1e-10 I */
    memset(A, 0, sizeof A);
    CHECK(kvc_entropy(A, d, d, &e, NULL) == EKV_EINVAL); /* nothing added */
    CHECK_EQ_INT(kvc_entropy_rank(128), 32);
    CHECK_EQ_INT(kvc_entropy_rank(64), 16);
}

/* tests/fixtures/query_states.txt: real post-RoPE queries of the demo model
 * (make_query_states.c); entropy_ref.txt: numpy's entropies of them
 * (make_entropy_ref.py, the reference's formula line by line). */
static void test_entropy_matches_numpy_on_saved_query_states(void)
{
    FILE *f = fopen(EKV_FIXTURES "/query_states.txt", "r");
    FILE *r = fopen(EKV_FIXTURES "/entropy_ref.txt", "r");
    CHECK(f && r);
    if (!f || !r)
        goto out;
    int n_heads, n, d, k;
    CHECK(fscanf(f, "%d %d %d", &n_heads, &n, &d) == 3);
    CHECK(fscanf(r, "%d", &k) == 1);
    float *rows = malloc((size_t)n * d * sizeof *rows);
    double *A = malloc((size_t)d * d * sizeof *A);
    for (int h = 0; h < n_heads; h++) {
        for (int i = 0; i < n * d; i++)
            CHECK(fscanf(f, "%f", &rows[i]) == 1);
        memset(A, 0, (size_t)d * d * sizeof *A);
        kvc_gram_add(A, rows, n, d, d);
        double e, want;
        CHECK(kvc_entropy(A, d, k, &e, NULL) == EKV_OK);
        CHECK(fscanf(r, "%lf", &want) == 1);
        CHECK_NEAR(e, want, 2e-5);
    }
    free(rows);
    free(A);
out:
    if (f)
        fclose(f);
    if (r)
        fclose(r);
}

/* ---- cache side: eviction hook and pool accounting ---- */

typedef struct evict_log {
    int calls, tokens;
    int32_t first_pos;
    float first_v0;
} evict_log;

static void on_evict(void *ctx, const kv_seq *seq, int32_t layer, int32_t head,
                     const kern_kv_view *view, const int32_t *dropped, int32_t n_dropped)
{
    evict_log *log = ctx;
    if (log->calls++ == 0 && n_dropped > 0) {
        const int32_t t = dropped[0];
        log->first_pos = view->pos_blocks[t / view->block_tokens][t % view->block_tokens];
        log->first_v0 = ekv_f16_to_f32(
            view->v_blocks[t / view->block_tokens][(t % view->block_tokens) * view->head_dim]);
    }
    log->tokens += n_dropped;
}

static void test_keep_frees_blocks_and_hands_evicted_tokens_to_the_hook(void)
{
    const int n = 100, layers = 2, heads = 3;
    kv_pool *pool = kv_pool_create(BT, D, 128, NULL);
    kv_seq *seq = kv_seq_create(pool, layers, heads, NULL);
    evict_log log = {0};
    kv_pool_set_evict_hook(pool, on_evict, &log);
    float k[D], v[D];
    for (int l = 0; l < layers; l++)
        for (int h = 0; h < heads; h++)
            for (int t = 0; t < n; t++) {
                for (int j = 0; j < D; j++)
                    k[j] = v[j] = (float)t;
                kv_seq_append(seq, l, h, k, v, 1000 + t, NULL);
            }
    CHECK_EQ_INT(kv_seq_blocks(seq), layers * heads * 7);
    kv_seq *copy = kv_seq_clone(seq, NULL);
    CHECK(copy != NULL);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 128 - 2 * 42);
    /* keep 20 of layer 0 head 1 (tokens 5..24): 2 blocks instead of 7 */
    int32_t keep[20];
    for (int i = 0; i < 20; i++)
        keep[i] = 5 + i;
    CHECK(kv_seq_keep(seq, 0, 1, keep, 20, NULL) == EKV_OK);
    CHECK_EQ_INT(kv_seq_blocks(seq), 42 - 5);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 128 - 84 + 5);
    CHECK_EQ_INT(log.calls, 1);
    CHECK_EQ_INT(log.tokens, 80);
    CHECK_EQ_INT(log.first_pos, 1000);
    CHECK_NEAR(log.first_v0, 0.0, 0);
    kern_kv_view view;
    kv_seq_view(seq, 0, 1, &view);
    CHECK_EQ_INT(view.pos_blocks[0][0], 1005);
    CHECK_EQ_INT(view.pos_blocks[1][3], 1024);
    kv_seq_view(copy, 0, 1, &view); /* the clone is untouched */
    CHECK_EQ_INT(view.n_tokens, n);
    CHECK_EQ_INT(view.pos_blocks[6][3], 1099);
    kv_seq_free(copy);
    kv_seq_free(seq);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), 128);
    kv_pool_destroy(pool);
}

static void test_policy_parsing_rejects_bad_input(void)
{
    kvc_policy p;
    ekv_error err = {0};
    CHECK(kvc_policy_parse("snapkv", 0.1, &p, NULL) == EKV_OK && p.method == KVC_SNAPKV);
    CHECK(kvc_policy_parse("h2o", 0.1, &p, &err) == EKV_EINVAL);
    CHECK(strstr(err.msg, "unknown kv method") != NULL);
    CHECK(kvc_policy_parse("uncomp", 0.0, &p, &err) == EKV_EINVAL);
    CHECK(kvc_policy_parse("uncomp", -1, &p, &err) == EKV_EINVAL);
    CHECK(kvc_policy_parse("uncomp", NAN, &p, &err) == EKV_EINVAL);
    CHECK(kvc_policy_parse("uncomp", 12.5, &p, &err) == EKV_EINVAL);
    CHECK(kvc_policy_parse("uncomp", 128, &p, NULL) == EKV_OK);
    int32_t mean;
    CHECK(kvc_policy_mean_tokens(&p, 100, &mean, &err) == EKV_ERANGE); /* 128 > prompt */
    CHECK(strstr(err.msg, "exceeds the prompt") != NULL);
    CHECK(kvc_policy_mean_tokens(&p, 1000, &mean, NULL) == EKV_OK && mean == 128);
    CHECK(kvc_policy_parse("streaming", 0.1, &p, NULL) == EKV_OK);
    CHECK(kvc_policy_mean_tokens(&p, 1000, &mean, NULL) == EKV_OK && mean == 100);
    CHECK(kvc_policy_parse(NULL, 1, &p, NULL) == EKV_OK && p.method == KVC_FULL);
    for (int m = 0; m < KVC_N_METHODS; m++)
        CHECK(kvc_method_name((kvc_method_id)m) != NULL);
}

int main(void)
{
    RUN_TEST(test_split_sums_to_total_and_respects_clamps);
    RUN_TEST(test_method_budgets_never_exceed_total);
    RUN_TEST(test_pyramid_shrinks_with_depth_and_uncomp_favours_high_entropy);
    RUN_TEST(test_streaming_keeps_exactly_sinks_and_recent);
    RUN_TEST(test_snapkv_selection_equals_brute_force);
    RUN_TEST(test_entropy_of_known_spectra);
    RUN_TEST(test_entropy_matches_numpy_on_saved_query_states);
    RUN_TEST(test_keep_frees_blocks_and_hands_evicted_tokens_to_the_hook);
    RUN_TEST(test_policy_parsing_rejects_bad_input);
    return TEST_EXIT();
}
