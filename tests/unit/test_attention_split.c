/*
 * test_attention_split.c - decode attention split across parts
 * (kern_attention_split_*) against kern_attention: kernels.h promises the
 * same bits (prefill, batched and one-token decode must agree, which
 * model.test_reference_forward checks with memcmp), so the reference is
 * kern_attention's output itself, compared with memcmp, over group sizes,
 * head dims, block sizes, lengths that end mid-tile and mid-block, sparse
 * positions, masked tails, softmax numerators that underflow to 0, a query
 * that sees nothing, and part counts from 1 to more parts than tiles. Parts
 * run in reverse order to show they do not depend on each other.
 */
#include <math.h>
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kernels.h"

static uint64_t rng = 0x243f6a8885a308d3ull;
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

/* n tokens at positions 0, step, 2 * step, ...; blocks in their own allocations */
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

/* the three phases with n_parts token parts and n_vparts dimension parts,
 * each phase's parts in reverse order */
static void run_split(const kern_kv_view *kv, const float *q, int g, int32_t qpos, float scale,
                      float *out, float *scores, int n_parts, int n_vparts)
{
    float part_max[64][KERN_ATTN_GROUP_MAX], max[KERN_ATTN_GROUP_MAX];
    for (int p = n_parts - 1; p >= 0; p--)
        kern_attention_split_scores(kv, q, g, kv->head_dim, qpos, scale, scores, p, n_parts,
                                    part_max[p]);
    for (int i = 0; i < g; i++) {
        max[i] = -INFINITY;
        for (int p = 0; p < n_parts; p++)
            max[i] = part_max[p][i] > max[i] ? part_max[p][i] : max[i];
    }
    for (int p = n_parts - 1; p >= 0; p--)
        kern_attention_split_exp(kv, scores, g, max, p, n_parts);
    for (int p = n_vparts - 1; p >= 0; p--)
        kern_attention_split_values(kv, scores, g, out, kv->head_dim, p, n_vparts);
}

/* every part count and group size over one shape; qpos < 0: the last position */
static void check_shape(int32_t n, int32_t bt, int32_t d, int32_t step, int32_t qpos, float scale)
{
    paged p;
    make_paged(&p, n, bt, d, step);
    if (qpos < 0)
        qpos = n > 0 ? (n - 1) * step : 0;
    const int parts[] = {1, 2, 3, 5, 16, 64};
    float *q = malloc((size_t)KERN_ATTN_GROUP_MAX * d * sizeof *q);
    float *want = malloc((size_t)KERN_ATTN_GROUP_MAX * d * sizeof *want);
    float *got = malloc((size_t)KERN_ATTN_GROUP_MAX * d * sizeof *got);
    float *scores = malloc(KERN_ATTN_SCRATCH(n > 0 ? n : 1) * sizeof *scores);
    int32_t qp[KERN_ATTN_GROUP_MAX];
    for (int i = 0; i < KERN_ATTN_GROUP_MAX * d; i++)
        q[i] = frand();
    for (int g = 1; g <= KERN_ATTN_GROUP_MAX; g++) {
        CHECK(kern_attention_split_ok(&p.view, g));
        for (int i = 0; i < g; i++)
            qp[i] = qpos;
        kern_attention(&p.view, q, g, d, qp, scale, want, d, scores);
        for (size_t a = 0; a < sizeof parts / sizeof parts[0]; a++)
            for (int vp = 1; vp <= d / 16 + 1; vp++) {
                for (int i = 0; i < g * d; i++)
                    got[i] = NAN;
                run_split(&p.view, q, g, qpos, scale, got, scores, parts[a], vp);
                if (memcmp(want, got, (size_t)g * d * sizeof *got) != 0) {
                    fprintf(stderr, "n %d bt %d d %d step %d qpos %d g %d parts %d vparts %d\n",
                            n, bt, d, step, qpos, g, parts[a], vp);
                    CHECK(0);
                }
            }
    }
    free(q);
    free(want);
    free(got);
    free(scores);
    free_paged(&p);
}

static void test_split_matches_kern_attention(void)
{
    check_shape(1, 16, 64, 1, -1, 0.125f);
    check_shape(16, 16, 64, 1, -1, 0.125f);
    check_shape(17, 16, 64, 1, -1, 0.125f);   /* one token into the second tile */
    check_shape(300, 16, 64, 1, -1, 0.125f);
    check_shape(1000, 16, 64, 1, 611, 0.125f); /* masked tail, ends mid-tile */
    check_shape(333, 32, 128, 1, -1, 0.088f);
    check_shape(200, 16, 80, 3, -1, 0.11f);   /* 64 + 16 dimensions; sparse positions */
    check_shape(77, 48, 16, 1, 40, 0.25f);    /* three tiles per block */
    check_shape(257, 16, 32, 1, -1, 40.0f);   /* most numerators underflow to 0 */
}

/* a query before every kept position sees nothing: zeros, as kern_attention */
static void test_split_nothing_visible(void)
{
    check_shape(50, 16, 64, 2, -1, 0.125f);
    paged p;
    make_paged(&p, 50, 16, 64, 1);
    for (int32_t b = 0; b < p.n_blocks; b++)
        for (int32_t i = 0; i < 16; i++)
            p.pos[b][i] += 100;
    float q[2 * 64], out[2 * 64], scores[KERN_ATTN_SCRATCH(50)];
    for (int i = 0; i < 2 * 64; i++)
        q[i] = frand();
    run_split(&p.view, q, 2, 99, 0.125f, out, scores, 3, 2);
    for (int i = 0; i < 2 * 64; i++)
        CHECK(out[i] == 0.0f);
    free_paged(&p);
}

int main(void)
{
    kern_init();
    paged p;
    make_paged(&p, 16, 16, 64, 1);
    const int ok = kern_attention_split_ok(&p.view, 3);
    free_paged(&p);
    if (!ok) { /* the split path is AVX2 / AVX-512 only; nothing else may take it */
        fprintf(stderr, "skip: no AVX2 or AVX-512 split path on this CPU\n");
        return TEST_EXIT();
    }
    RUN_TEST(test_split_matches_kern_attention);
    RUN_TEST(test_split_nothing_visible);
    return TEST_EXIT();
}
