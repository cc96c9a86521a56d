/*
 * test_spark_simd.c - the AVX2 and AVX-512 paths of attention over SparK's
 * packed keys (kernels/cpu/attention_packed_simd.c) against the scalar
 * reference (attention_packed.c), on hand-built views: packed rows from
 * kern_packed_encode, then block tokens, positions with gaps and masking.
 *
 *  - keys bit for bit: with a unit query e_j and scale 1 a token's logit is
 *    k_j times 1 plus exact zeros, so each ISA's logit must equal
 *    kern_packed_decode's channel j exactly (kept channels, +-sm/sqrt(c_j),
 *    zero-fill, -0 included);
 *  - random queries: logits within 2 gamma_d sum_j |q_j k_j| scale of each
 *    other (gamma_d = d u / (1 - d u), u = 2^-24: the worst-case error of
 *    any summation order of a d-term fp32 dot product, FMA or not, bounds
 *    each path's distance from the exact value); probabilities within
 *    4e-6 and outputs within 2e-5 (logit error times the largest value,
 *    plus the vector exp's ~2e-7 relative error, plus the accumulation's
 *    n u per output; the data keep |v| <= 1, |logit| < 20);
 *  - a query's result does not depend on the group size (bitwise).
 * ISAs the CPU lacks are skipped (kern_set_isa returns less).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/kernels.h"

#define BT 16
#define MAXD 128
#define NP 41 /* packed tokens */
#define NB 2  /* blocks after them */
#define NT (NP + NB * BT - 5)
#define G 3

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float nrand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

typedef struct fixture {
    int32_t d, n_keep;
    size_t row_bytes;
    uint8_t rows[NP * (MAXD * 2 + 64)];
    ekv_f16 pv[NP * MAXD];
    int32_t ppos[NP];
    float isc[MAXD];
    ekv_f16 kb[NB][MAXD * BT], vb[NB][BT * MAXD];
    int32_t posb[NB][BT];
    kern_kv_packed pk;
    const ekv_f16 *kbp[NB], *vbp[NB];
    const int32_t *posbp[NB];
    kern_kv_view view;
} fixture;

static fixture fx;

static void build(int32_t d, int32_t n_keep, bool avg)
{
    fx.d = d;
    fx.n_keep = n_keep;
    fx.row_bytes = kern_packed_row_bytes(d, n_keep);
    for (int32_t j = 0; j < d; j++)
        fx.isc[j] = 1.0f / sqrtf(0.05f + 2.0f * (nrand() + 1.0f));
    for (int32_t t = 0; t < NP; t++) {
        float k[MAXD];
        uint8_t mask[MAXD / 8] = {0};
        for (int32_t j = 0; j < d; j++)
            k[j] = 3.0f * nrand();
        /* n_keep distinct channels, a different set per token */
        for (int32_t c = 0; c < n_keep;) {
            const int32_t j = (int32_t)((nrand() + 1.0f) * 0.5f * (float)d) % d;
            if (!(mask[j / 8] >> (j % 8) & 1)) {
                mask[j / 8] |= (uint8_t)(1u << (j % 8));
                c++;
            }
        }
        if (t == 3) /* a pruned channel of -0.0 and one of exactly 0 */
            k[0] = -0.0f, k[1] = 0.0f;
        const float m = t == 5 ? -1.0f : 2.0f * (nrand() + 1.0f); /* m < 0 reads as 0 */
        kern_packed_encode(fx.rows + (size_t)t * fx.row_bytes, k, mask, m, d, n_keep);
        for (int32_t j = 0; j < d; j++)
            fx.pv[(size_t)t * d + j] = ekv_f32_to_f16(nrand());
        fx.ppos[t] = 2 * t + (t > 20);
    }
    for (int b = 0; b < NB; b++) {
        for (int32_t s = 0; s < BT; s++) {
            for (int32_t j = 0; j < d; j++) {
                fx.kb[b][(size_t)j * BT + s] = ekv_f32_to_f16(3.0f * nrand());
                fx.vb[b][(size_t)s * d + j] = ekv_f32_to_f16(nrand());
            }
            fx.posb[b][s] = 2 * NP + 10 + b * BT + s;
        }
        fx.kbp[b] = fx.kb[b];
        fx.vbp[b] = fx.vb[b];
        fx.posbp[b] = fx.posb[b];
    }
    fx.pk = (kern_kv_packed){.n = NP, .n_keep = n_keep, .row_bytes = fx.row_bytes,
                             .rows = fx.rows, .v = fx.pv, .pos = fx.ppos,
                             .inv_sqrt_c = avg ? fx.isc : NULL};
    fx.view = (kern_kv_view){.n_tokens = NT, .block_tokens = BT, .head_dim = d,
                             .k_blocks = fx.kbp, .v_blocks = fx.vbp, .pos_blocks = fx.posbp,
                             .packed = &fx.pk};
}

static float key_ref(int32_t t, int32_t j)
{
    float k[MAXD];
    if (t < NP) {
        kern_packed_decode(fx.rows + (size_t)t * fx.row_bytes, fx.d, fx.n_keep,
                           fx.pk.inv_sqrt_c, k);
        return k[j];
    }
    return ekv_f16_to_f32(fx.kb[(t - NP) / BT][(size_t)j * BT + (t - NP) % BT]);
}

typedef struct result {
    float out[G][MAXD], lg[G][NT], pr[G][NT];
} result;

static void run(kern_isa isa, const float *Q, int g, int32_t qpos, float scale, result *r)
{
    float scores[KERN_ATTN_SCRATCH(NT)];
    int32_t qp[G];
    for (int i = 0; i < G; i++)
        qp[i] = qpos;
    kern_set_isa(isa);
    const kern_attn_probe probe = {&r->lg[0][0], &r->pr[0][0]};
    /* g queries at a time: the first call sees the group of g */
    for (int i = 0; i < G; i += g) {
        const int n = G - i < g ? G - i : g;
        kern_attn_probe p = {probe.logits + (size_t)i * NT, probe.probs + (size_t)i * NT};
        kern_attention_probe(&fx.view, Q + (size_t)i * MAXD, n, MAXD, qp, scale,
                             &r->out[i][0], MAXD, scores, &p);
    }
}

static int check_keys(kern_isa isa)
{
    int bad = 0;
    static float Q[G][MAXD];
    static result r;
    for (int32_t j = 0; j < fx.d; j++) {
        memset(Q, 0, sizeof Q);
        for (int i = 0; i < G; i++)
            Q[i][j] = 1.0f;
        run(isa, &Q[0][0], G, 1 << 20, 1.0f, &r);
        for (int32_t t = 0; t < NT; t++) {
            const float want = key_ref(t, j);
            for (int i = 0; i < G; i++)
                if (memcmp(&r.lg[i][t], &want, sizeof want) != 0 && !(want == 0.0f && r.lg[i][t] == 0.0f))
                    bad++;
        }
    }
    return bad;
}

static void compare(kern_isa isa, int32_t d, int32_t n_keep, bool avg)
{
    build(d, n_keep, avg);
    if (kern_set_isa(isa) != isa)
        return;
    CHECK_EQ_INT(check_keys(isa), 0);
    CHECK_EQ_INT(check_keys(KERN_ISA_SCALAR), 0);
    const float scale = 1.0f / sqrtf((float)d);
    const int32_t qposes[] = {0, 2 * 20, 2 * NP + 10 + 7, 1 << 20, -1};
    static float Q[G][MAXD];
    static result ref, got, got1;
    const double gamma = d * 0x1p-24 / (1.0 - d * 0x1p-24);
    for (size_t qi = 0; qi < sizeof qposes / sizeof qposes[0]; qi++) {
        for (int i = 0; i < G; i++)
            for (int32_t j = 0; j < d; j++)
                Q[i][j] = nrand();
        run(KERN_ISA_SCALAR, &Q[0][0], G, qposes[qi], scale, &ref);
        run(isa, &Q[0][0], G, qposes[qi], scale, &got);
        run(isa, &Q[0][0], 1, qposes[qi], scale, &got1);
        CHECK(memcmp(&got, &got1, sizeof got) == 0); /* g changes nothing */
        double worst_l = 0, worst_p = 0, worst_o = 0;
        for (int i = 0; i < G; i++) {
            for (int32_t t = 0; t < NT; t++) {
                if (ref.lg[i][t] == -INFINITY || got.lg[i][t] == -INFINITY) {
                    CHECK(ref.lg[i][t] == got.lg[i][t]);
                    continue;
                }
                double mag = 0;
                for (int32_t j = 0; j < d; j++)
                    mag += fabs((double)Q[i][j] * key_ref(t, j));
                const double tol = 2 * gamma * mag * scale + 1e-30;
                worst_l = fmax(worst_l, fabs((double)got.lg[i][t] - ref.lg[i][t]) / tol);
                worst_p = fmax(worst_p, fabs((double)got.pr[i][t] - ref.pr[i][t]));
            }
            for (int32_t j = 0; j < d; j++)
                worst_o = fmax(worst_o, fabs((double)got.out[i][j] - ref.out[i][j]));
        }
        if (worst_l > 1 || worst_p > 4e-6 || worst_o > 2e-5)
            fprintf(stderr, "  %s d %d keep %d %s qpos %d: logit %.3g of bound, p %.3g, out %.3g\n",
                    kern_isa_name(isa), d, n_keep, avg ? "avg" : "zero", qposes[qi], worst_l,
                    worst_p, worst_o);
        CHECK(worst_l <= 1);
        CHECK(worst_p <= 4e-6);
        CHECK(worst_o <= 2e-5);
    }
}

static void sweep(kern_isa isa)
{
    static const int32_t dims[] = {16, 32, 64, 128, 8, 24, 40};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++) {
        const int32_t d = dims[i];
        const int32_t keeps[] = {1, d / 2, d / 5 + 1, d - 1, d};
        for (size_t k = 0; k < sizeof keeps / sizeof keeps[0]; k++) {
            compare(isa, d, keeps[k], true);
            compare(isa, d, keeps[k], false);
        }
    }
}

static void test_avx2_equals_scalar(void) { sweep(KERN_ISA_AVX2); }
static void test_avx512_equals_scalar(void) { sweep(KERN_ISA_AVX512); }

int main(void)
{
    kern_init();
    const kern_isa best = kern_set_isa(KERN_ISA_AVX512);
    fprintf(stderr, "  best ISA here: %s\n", kern_isa_name(best));
    RUN_TEST(test_avx2_equals_scalar);
    RUN_TEST(test_avx512_equals_scalar);
    kern_set_isa(best);
    return TEST_EXIT();
}
