/*
 * test_attention.c - kern_attention against a double-precision reference on
 * paged, sparse (compressed-like) KV, for every ISA this CPU has.
 */
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kernels.h"

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

typedef struct paged {
    kern_kv_view view;
    ekv_f16 **k, **v;
    int32_t **pos;
    int32_t n_blocks;
} paged;

/* n tokens with positions 0, step, 2*step, ... (a sparse, compressed head) */
static void make_paged(paged *p, int32_t n, int32_t bt, int32_t d, int32_t step)
{
    p->n_blocks = (n + bt - 1) / bt;
    p->k = calloc((size_t)p->n_blocks + 1, sizeof *p->k);
    p->v = calloc((size_t)p->n_blocks + 1, sizeof *p->v);
    p->pos = calloc((size_t)p->n_blocks + 1, sizeof *p->pos);
    for (int32_t b = 0; b < p->n_blocks; b++) {
        p->k[b] = malloc((size_t)bt * d * sizeof(ekv_f16));
        p->v[b] = malloc((size_t)bt * d * sizeof(ekv_f16));
        p->pos[b] = malloc((size_t)bt * sizeof(int32_t));
        for (int32_t i = 0; i < bt * d; i++) {
            p->k[b][i] = ekv_f32_to_f16(frand() * 2.0f);
            p->v[b][i] = ekv_f32_to_f16(frand());
        }
        for (int32_t i = 0; i < bt; i++)
            p->pos[b][i] = (b * bt + i) * step;
    }
    p->view = (kern_kv_view){.n_tokens = n, .block_tokens = bt, .head_dim = d,
                             .k_blocks = (const ekv_f16 *const *)p->k,
                             .v_blocks = (const ekv_f16 *const *)p->v,
                             .pos_blocks = (const int32_t *const *)p->pos};
}

static void free_paged(paged *p)
{
    for (int32_t b = 0; b < p->n_blocks; b++) {
        free(p->k[b]);
        free(p->v[b]);
        free(p->pos[b]);
    }
    free(p->k);
    free(p->v);
    free(p->pos);
}

static void reference(const kern_kv_view *kv, const float *q, int32_t qpos, float scale,
                      double *out)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens;
    double max = -1e300, sum = 0;
    double *s = malloc(((size_t)kv->n_tokens + 1) * sizeof *s);
    for (int32_t t = 0; t < kv->n_tokens; t++) {
        s[t] = -1e300;
        if (kv->pos_blocks[t / bt][t % bt] > qpos)
            continue;
        double acc = 0;
        for (int32_t j = 0; j < d; j++)
            acc += (double)q[j] * ekv_f16_to_f32(kv->k_blocks[t / bt][j * bt + t % bt]);
        s[t] = acc * scale;
        if (s[t] > max)
            max = s[t];
    }
    for (int32_t j = 0; j < d; j++)
        out[j] = 0;
    for (int32_t t = 0; t < kv->n_tokens; t++) {
        if (s[t] == -1e300)
            continue;
        double p = exp(s[t] - max);
        sum += p;
        for (int32_t j = 0; j < d; j++)
            out[j] += p * ekv_f16_to_f32(kv->v_blocks[t / bt][(t % bt) * d + j]);
    }
    for (int32_t j = 0; j < d && sum > 0; j++)
        out[j] /= sum;
    free(s);
}

static void check_shape_grouped(int32_t n, int32_t bt, int32_t d, int32_t step, int n_q, int grouped)
{
    paged p;
    make_paged(&p, n, bt, d, step);
    float *q = malloc((size_t)n_q * d * sizeof *q), *out = malloc((size_t)n_q * d * sizeof *out);
    float *scores = malloc((KERN_ATTN_SCRATCH(n) + 1) * sizeof *scores);
    int32_t *qpos = malloc((size_t)n_q * sizeof *qpos);
    double *ref = malloc((size_t)d * sizeof *ref);
    for (int i = 0; i < n_q * d; i++)
        q[i] = frand();
    for (int i = 0; i < n_q; i++) /* some queries see everything, some a prefix, one nothing */
        qpos[i] = i == 0 ? n * step : i == 1 ? -1 : (int32_t)((i * 7919) % (n * step + 1));
    if (grouped) /* runs of equal positions, as the query heads of a GQA group */
        for (int i = 0; i < n_q; i++)
            qpos[i] = (int32_t)(((i / 3) * 7919) % (n * step + 1));
    const float scale = 1.0f / sqrtf((float)d);
    for (int isa = KERN_ISA_SCALAR; isa <= KERN_ISA_AVX512; isa++) {
        if (kern_set_isa((kern_isa)isa) != (kern_isa)isa)
            continue;
        kern_attention(&p.view, q, n_q, d, qpos, scale, out, d, scores);
        for (int i = 0; i < n_q; i++) {
            reference(&p.view, q + (size_t)i * d, qpos[i], scale, ref);
            for (int32_t j = 0; j < d; j++)
                if (fabs(out[(size_t)i * d + j] - ref[j]) > 2e-5) {
                    CHECK_NEAR(out[(size_t)i * d + j], ref[j], 2e-5);
                    fprintf(stderr, "  isa %s n %d bt %d d %d q %d j %d\n",
                            kern_isa_name((kern_isa)isa), n, bt, d, i, j);
                    break;
                }
        }
    }
    kern_set_isa(KERN_ISA_AVX512);
    free(q);
    free(out);
    free(scores);
    free(qpos);
    free(ref);
    free_paged(&p);
}

static void check_shape(int32_t n, int32_t bt, int32_t d, int32_t step, int n_q)
{
    check_shape_grouped(n, bt, d, step, n_q, 0);
    check_shape_grouped(n, bt, d, step, n_q, 1);
}

/* A query's output is bit-identical whether it is computed alone or with
 * the other heads of its group. */
static void test_grouping_does_not_change_results(void)
{
    paged p;
    make_paged(&p, 77, 16, 64, 1);
    float q[5 * 64], together[5 * 64], alone[64];
    float *scores = malloc(KERN_ATTN_SCRATCH(77) * sizeof *scores);
    int32_t qpos[5] = {50, 50, 50, 50, 50};
    for (int i = 0; i < 5 * 64; i++)
        q[i] = frand();
    kern_attention(&p.view, q, 5, 64, qpos, 0.125f, together, 64, scores);
    for (int i = 0; i < 5; i++) {
        kern_attention(&p.view, q + i * 64, 1, 64, qpos, 0.125f, alone, 64, scores);
        CHECK(memcmp(alone, together + i * 64, sizeof alone) == 0);
    }
    free(scores);
    free_paged(&p);
}

/* A query's output is bit-identical however many masked (future) tokens
 * follow the ones it sees, as when a prefill chunk appends rows first - also
 * when they end mid-tile or mid-block - for every ISA this CPU has. */
static void test_masked_tail_does_not_change_results(void)
{
    paged p;
    make_paged(&p, 77, 16, 64, 1);
    float q[3 * 64], first[3 * 64], out[3 * 64];
    float *scores = malloc(KERN_ATTN_SCRATCH(77) * sizeof *scores);
    const int32_t qpos[3] = {40, 40, 40};
    const int32_t lens[] = {41, 42, 48, 49, 64, 77};
    for (int i = 0; i < 3 * 64; i++)
        q[i] = frand();
    for (int isa = KERN_ISA_SCALAR; isa <= KERN_ISA_AVX512; isa++) {
        if (kern_set_isa((kern_isa)isa) != (kern_isa)isa)
            continue;
        for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
            p.view.n_tokens = lens[l];
            kern_attention(&p.view, q, 3, 64, qpos, 0.125f, l == 0 ? first : out, 64, scores);
            if (l > 0)
                CHECK(memcmp(first, out, sizeof out) == 0);
        }
    }
    kern_set_isa(KERN_ISA_AVX512);
    free(scores);
    free_paged(&p);
}

static void test_attention_matches_reference(void)
{
    check_shape(1, 16, 64, 1, 3);
    check_shape(17, 16, 64, 1, 4);
    check_shape(100, 16, 64, 3, 5);   /* sparse positions, as after compression */
    check_shape(333, 32, 128, 1, 3);
    check_shape(40, 16, 8, 1, 3);
    check_shape(64, 16, 24, 2, 3);
    check_shape(70, 16, 80, 1, 4);    /* AVX-512 V pass: 64 dimensions, then 16 */
    check_shape(45, 48, 16, 1, 2);    /* three 16-token tiles per block */
    check_shape(9, 4, 12, 1, 3);      /* head_dim not a multiple of 8: scalar path */
    check_shape(50, 16, 64, 1, 9);    /* 9 query heads: groups of 4, 4, 1 */
}

static void test_empty_head_gives_zero(void)
{
    paged p;
    make_paged(&p, 0, 16, 64, 1);
    float q[64], out[64];
    int32_t qpos = 10;
    for (int j = 0; j < 64; j++) {
        q[j] = 1.0f;
        out[j] = 99.0f;
    }
    kern_attention(&p.view, q, 1, 64, &qpos, 0.125f, out, 64, NULL);
    for (int j = 0; j < 64; j++)
        CHECK(out[j] == 0.0f);
    free_paged(&p);
}

int main(void)
{
    kern_init();
    RUN_TEST(test_attention_matches_reference);
    RUN_TEST(test_empty_head_gives_zero);
    RUN_TEST(test_grouping_does_not_change_results);
    RUN_TEST(test_masked_tail_does_not_change_results);
    return TEST_EXIT();
}
