/*
 * test_compress_spec.c - the budgets and the entropy against the numbers the
 * specs give, worked out by hand from their formulas (not by calling
 * compress/ a second time):
 *
 *   - UNComp's HIGH/LOW split (specs/uncomp.md section 3 step 2): S_high =
 *     4M/3, S_low = 2M/3 for even KV head counts (B = 512 is the spec's
 *     [384, 768]); 3 KV heads (docs/COMPRESSION.md deviation 4): HIGH one
 *     head at 1.5 M, LOW two at 0.75 M; HIGH = the highest entropies.
 *   - Online UNComp's layer budgets (deviation 2): proportional to the
 *     layer's mean entropy, clamped to [M/2, 2M], summing to L x M.
 *   - PyramidKV's schedule (Cai et al. 2024, pyramidkv_utils.py): layer l
 *     keeps w + max_num - l (max_num - min_num) / (L - 1) with min_num =
 *     (B - w) // 20, max_num = 2 (B - w) - min_num (capped at N - w), the
 *     sum scaled to exactly L x B (deviation 3).
 *   - The truncated matrix entropy (section 1) of a rotated known spectrum.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../compress/compress_internal.h"
#include "ekv_test.h"

static int64_t sum32(const int32_t *x, int n)
{
    int64_t s = 0;
    for (int i = 0; i < n; i++)
        s += x[i];
    return s;
}

static kvc_ctx ctx_of(int32_t L, int32_t HKV, int32_t n, int32_t mean, const float *e)
{
    kvc_ctx c = {.n_layers = L, .n_kv_heads = HKV, .n_tokens = n, .mean = mean,
                 .total = (int64_t)mean * L * HKV, .kv_entropy = e};
    return c;
}

static void test_uncomp_even_heads_keep_4m3_and_2m3(void)
{
    /* two layers of 4 KV heads with the same mean entropy (so both layers
     * get M): the 2 highest are HIGH */
    const float e[8] = {0.30f, 0.60f, 0.50f, 0.20f, 0.55f, 0.25f, 0.21f, 0.59f};
    int32_t b[8];
    kvc_ctx c = ctx_of(2, 4, 4096, 96, e);
    kvc_method_uncomp.allocate(&c, b);
    const int32_t want96[8] = {64, 128, 128, 64, 128, 64, 64, 128}; /* 2 x 96 / 3, 4 x 96 / 3 */
    for (int i = 0; i < 8; i++)
        CHECK_EQ_INT(b[i], want96[i]);
    /* the spec's B = 512 setting: groups [384, 768], mean 576 */
    c = ctx_of(2, 4, 4096, 576, e);
    kvc_method_uncomp.allocate(&c, b);
    const int32_t want576[8] = {384, 768, 768, 384, 768, 384, 384, 768};
    for (int i = 0; i < 8; i++)
        CHECK_EQ_INT(b[i], want576[i]);
}

static void test_uncomp_three_heads_keep_1_5m_and_0_75m(void)
{
    /* the demo model's layout: 3 KV heads, HIGH is the single highest */
    const float e[9] = {0.40f, 0.70f, 0.45f, 0.80f, 0.65f, 0.60f, 0.50f, 0.55f, 0.90f};
    int32_t b[9];
    kvc_ctx c = ctx_of(3, 3, 4096, 128, e);
    kvc_method_uncomp.allocate(&c, b);
    /* layer means 0.517, 0.683, 0.65 differ: layer totals follow them, so
     * check the split inside each layer against its own total */
    const int high[3] = {1, 0, 2};
    int64_t all = 0;
    for (int l = 0; l < 3; l++) {
        const int64_t t = sum32(b + 3 * l, 3);
        all += t;
        for (int h = 0; h < 3; h++) {
            const double want = h == high[l] ? t / 2.0 : t / 4.0; /* 1.5 and 0.75 of t / 3 */
            CHECK(fabs(b[3 * l + h] - want) < 1.0);
        }
    }
    CHECK_EQ_INT(all, 3 * 3 * 128);
    /* equal layer entropies: exactly 192 / 96 / 96 at M = 128 */
    const float flat[6] = {0.2f, 0.6f, 0.4f, 0.5f, 0.4f, 0.3f};
    c = ctx_of(2, 3, 4096, 128, flat);
    kvc_method_uncomp.allocate(&c, b);
    const int32_t want[6] = {96, 192, 96, 192, 96, 96};
    for (int i = 0; i < 6; i++)
        CHECK_EQ_INT(b[i], want[i]);
}

static void test_uncomp_online_layers_follow_entropy_within_m2_and_2m(void)
{
    /* layer mean entropies 0.1, 0.2, 0.4, 0.9 at M = 200 (clamp [100, 400]):
     * lambda e with the ends clamped sums to 800 at lambda = 500, so the
     * layers get 100, 100, 200, 400 per head */
    float e[12];
    const float lm[4] = {0.1f, 0.2f, 0.4f, 0.9f};
    for (int l = 0; l < 4; l++) {
        e[3 * l + 0] = lm[l] - 0.05f;
        e[3 * l + 1] = lm[l] + 0.05f; /* HIGH */
        e[3 * l + 2] = lm[l];
    }
    int32_t b[12];
    kvc_ctx c = ctx_of(4, 3, 4096, 200, e);
    kvc_method_uncomp.allocate(&c, b);
    const int32_t layer[4] = {100, 100, 200, 400};
    for (int l = 0; l < 4; l++) {
        CHECK_EQ_INT(b[3 * l + 1], 3 * layer[l] / 2);
        CHECK_EQ_INT(b[3 * l + 0], 3 * layer[l] / 4);
        CHECK_EQ_INT(b[3 * l + 2], 3 * layer[l] / 4);
    }
    CHECK_EQ_INT(sum32(b, 12), 4 * 3 * 200);
}

static void test_pyramid_schedule_is_the_papers_line(void)
{
    /* L = 32, B = 512, w = 8: min_num = 504 // 20 = 25, max_num = 1008 - 25
     * = 983; layer l: 991 - l * 958 / 31 (991 at the first layer, 33 at the
     * last), summing to 32 x 512 */
    int32_t b[32 * 2];
    kvc_ctx c = ctx_of(32, 2, 4096, 512, NULL);
    kvc_method_pyramidkv.allocate(&c, b);
    CHECK_EQ_INT(b[0], 991);
    CHECK_EQ_INT(b[31 * 2], 33);
    for (int l = 0; l < 32; l++) {
        CHECK(fabs(b[2 * l] - (991 - l * 958.0 / 31)) < 1.0);
        CHECK_EQ_INT(b[2 * l + 1], b[2 * l]);
    }
    CHECK_EQ_INT(sum32(b, 64), 32 * 2 * 512);
    /* a prompt of 600 caps max_num at 592, min_num = 1008 - 592 = 416:
     * layer l keeps 600 - l * 176 / 31 (600 = the whole prompt at layer 0) */
    c = ctx_of(32, 2, 600, 512, NULL);
    kvc_method_pyramidkv.allocate(&c, b);
    CHECK_EQ_INT(b[0], 600);
    CHECK_EQ_INT(b[31 * 2], 424);
    for (int l = 0; l < 32; l++)
        CHECK(fabs(b[2 * l] - (600 - l * 176.0 / 31)) < 1.0);
    CHECK_EQ_INT(sum32(b, 64), 32 * 2 * 512);
    /* the demo model, B = 64 (w = 8): min_num 2, max_num 110; layer l:
     * 118 - l * 108 / 29 */
    int32_t d[30 * 3];
    c = ctx_of(30, 3, 300, 64, NULL);
    kvc_method_pyramidkv.allocate(&c, d);
    for (int l = 0; l < 30; l++)
        CHECK(fabs(d[3 * l] - (118 - l * 108.0 / 29)) < 1.0);
    CHECK_EQ_INT(sum32(d, 90), 30 * 3 * 64);
}

static void test_uniform_methods_keep_the_mean_everywhere(void)
{
    int32_t b[90];
    kvc_ctx c = ctx_of(30, 3, 300, 37, NULL);
    kvc_method_snapkv.allocate(&c, b);
    for (int i = 0; i < 90; i++)
        CHECK_EQ_INT(b[i], 37);
    kvc_method_streaming.allocate(&c, b);
    for (int i = 0; i < 90; i++)
        CHECK_EQ_INT(b[i], 37);
}

/* Rotates diag(mu) by a Householder reflection: same spectrum, full matrix. */
static void rotated(const double *mu, int d, const double *u, double *A)
{
    double nn = 0;
    for (int i = 0; i < d; i++)
        nn += u[i] * u[i];
    for (int i = 0; i < d; i++)
        for (int j = 0; j < d; j++) {
            double s = 0; /* (I - 2uu^T/nn) diag(mu) (I - 2uu^T/nn) */
            for (int k = 0; k < d; k++) {
                const double hik = (i == k) - 2 * u[i] * u[k] / nn;
                const double hjk = (j == k) - 2 * u[j] * u[k] / nn;
                s += hik * mu[k] * hjk;
            }
            A[i * d + j] = s;
        }
}

static void test_entropy_of_a_rotated_geometric_spectrum(void)
{
    enum { d = 16 };
    double mu[d], u[d], A[d * d], e, tr = 0;
    for (int i = 0; i < d; i++) {
        mu[d - 1 - i] = pow(0.6, i) * 3; /* unsorted on purpose: smallest first */
        u[i] = sin(1.0 + 2.7 * i);
        tr += mu[d - 1 - i];
    }
    rotated(mu, d, u, A);
    CHECK(kvc_entropy(A, d, 4, &e, NULL) == EKV_OK);
    /* the top 4 of the trace-normalised spectrum (+1e-10), not renormalised,
     * over ln d = ln 16 */
    double want = 0;
    for (int i = 0; i < 4; i++) {
        const double l = pow(0.6, i) * 3 / tr + 1e-10;
        want -= l * log(l);
    }
    want /= log(16.0);
    CHECK_NEAR(e, want, 1e-9);
    /* the same with k = d: the whole spectrum */
    rotated(mu, d, u, A);
    CHECK(kvc_entropy(A, d, d, &e, NULL) == EKV_OK);
    want = 0;
    for (int i = 0; i < d; i++) {
        const double l = mu[i] / tr + 1e-10;
        want -= l * log(l);
    }
    CHECK_NEAR(e, want / log(16.0), 1e-9);
}

int main(void)
{
    RUN_TEST(test_uncomp_even_heads_keep_4m3_and_2m3);
    RUN_TEST(test_uncomp_three_heads_keep_1_5m_and_0_75m);
    RUN_TEST(test_uncomp_online_layers_follow_entropy_within_m2_and_2m);
    RUN_TEST(test_pyramid_schedule_is_the_papers_line);
    RUN_TEST(test_uniform_methods_keep_the_mean_everywhere);
    RUN_TEST(test_entropy_of_a_rotated_geometric_spectrum);
    return TEST_EXIT();
}
