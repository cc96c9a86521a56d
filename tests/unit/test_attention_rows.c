/*
 * test_attention_rows.c - kern_attention_rows (prefill: many rows of one
 * sequence per K/V load) against a double-precision reference written from
 * the definition softmax(scale * q . K^T, causal by position) . V, and
 * bit for bit against kern_attention of each row (the decode path), for
 * every ISA this CPU has.
 *
 * Shapes: chunks appended after a prefix (the rows see the prefix and the
 * chunk's earlier rows), odd lengths that end mid-tile and mid-block, sparse
 * positions (as after compression), GQA groups of 1 to 5 heads, queries that
 * see nothing, rows out of position order, a KV head other than the first
 * (the query offset), geometries that take the fallback paths, and a
 * masked token whose V is inf.
 *
 * Tolerance 2e-5 absolute, as test_attention.c: V elements lie in [-1, 1]
 * so every output is a convex combination bounded by 1; the fp32 dot
 * products (d <= 128 terms of |q k| <= 2) and the vectorised exp (relative
 * error ~2e-7) move the probabilities by a few 1e-7 relative, orders below
 * the bound, while a dropped or extra token, a wrong mask or a wrong head
 * moves outputs by 1e-3 or more.
 */
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kernels.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
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

/* n tokens, token t at position pos[t] */
static void make_paged(paged *p, int32_t n, int32_t bt, int32_t d, const int32_t *pos)
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
        for (int32_t i = 0; i < bt; i++) /* slots past n: garbage the kernel must ignore */
            p->pos[b][i] = b * bt + i < n ? pos[b * bt + i] : -7;
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

/* out = softmax(scale * q . k_t over tokens with pos_t <= qpos) . V, in
 * double; nothing visible: zeros */
static void reference(const kern_kv_view *kv, const float *q, int32_t qpos, float scale,
                      double *out)
{
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens;
    double *s = malloc(((size_t)n + 1) * sizeof *s), max = -1e300, sum = 0;
    char *vis = calloc((size_t)n + 1, 1);
    for (int32_t t = 0; t < n; t++) {
        if (kv->pos_blocks[t / bt][t % bt] > qpos)
            continue;
        vis[t] = 1;
        double acc = 0;
        for (int32_t j = 0; j < d; j++)
            acc += (double)q[j] * ekv_f16_to_f32(kv->k_blocks[t / bt][j * bt + t % bt]);
        s[t] = acc * scale;
        max = s[t] > max ? s[t] : max;
    }
    for (int32_t j = 0; j < d; j++)
        out[j] = 0;
    for (int32_t t = 0; t < n; t++) {
        if (!vis[t])
            continue;
        const double p = exp(s[t] - max);
        sum += p;
        for (int32_t j = 0; j < d; j++)
            out[j] += p * ekv_f16_to_f32(kv->v_blocks[t / bt][(t % bt) * d + j]);
    }
    for (int32_t j = 0; j < d && sum > 0; j++)
        out[j] /= sum;
    free(s);
    free(vis);
}

typedef struct shape {
    int32_t n_prior; /* tokens before the chunk, positions 0, step, 2 step, ... */
    int32_t m;       /* the chunk's rows, appended after them */
    int32_t bt, d, g, step;
    int scramble;    /* rows' positions not in order (and one that sees nothing) */
} shape;

static void check(shape s)
{
    const int32_t n = s.n_prior + s.m, d = s.d, g = s.g, hkv = 2, h = hkv * g;
    int32_t *pos = malloc((size_t)n * sizeof *pos), *row_pos = malloc((size_t)s.m * sizeof *row_pos);
    for (int32_t t = 0; t < s.n_prior; t++)
        pos[t] = t * s.step;
    const int32_t p0 = s.n_prior * s.step + 3; /* a gap, as after compression */
    for (int32_t r = 0; r < s.m; r++)
        pos[s.n_prior + r] = row_pos[r] = p0 + r;
    if (s.scramble)
        for (int32_t r = 0; r < s.m; r++) /* any position, earlier rows' or none at all */
            row_pos[r] = r == 1 ? -1 : (int32_t)((r * 7919) % (p0 + s.m));
    paged p;
    make_paged(&p, n, s.bt, d, pos);
    /* rows of h query heads; this view is KV head 1: its heads start at g * d */
    const int row_stride = h * d;
    float *Q = malloc((size_t)s.m * row_stride * sizeof *Q);
    float *out = malloc((size_t)s.m * row_stride * sizeof *out);
    float *one = malloc((size_t)g * d * sizeof *one);
    float *scores = malloc(KERN_ATTN_SCRATCH(n) * sizeof *scores);
    int32_t *qpos = malloc((size_t)g * sizeof *qpos);
    double *ref = malloc((size_t)d * sizeof *ref);
    for (size_t i = 0; i < (size_t)s.m * row_stride; i++)
        Q[i] = frand();
    const float scale = 1.0f / sqrtf((float)d);
    for (int isa = KERN_ISA_SCALAR; isa <= KERN_ISA_AVX512; isa++) {
        if (kern_set_isa((kern_isa)isa) != (kern_isa)isa)
            continue;
        for (size_t i = 0; i < (size_t)s.m * row_stride; i++)
            out[i] = 99.0f; /* the other KV head's outputs must stay untouched */
        kern_attention_rows(&p.view, Q + (size_t)g * d, s.m, g, row_stride, row_pos, scale,
                            out + (size_t)g * d, row_stride, scores);
        int bad = 0;
        for (int32_t r = 0; r < s.m && !bad; r++) {
            for (int32_t k = 0; k < g; k++)
                qpos[k] = row_pos[r];
            const float *qr = Q + (size_t)r * row_stride + (size_t)g * d;
            const float *orow = out + (size_t)r * row_stride + (size_t)g * d;
            kern_attention(&p.view, qr, g, d, qpos, scale, one, d, scores);
            if (memcmp(one, orow, (size_t)g * d * sizeof *one) != 0) {
                CHECK(!"kern_attention_rows differs from kern_attention's bits");
                bad = 1;
            }
            for (int32_t k = 0; k < g && !bad; k++) {
                reference(&p.view, qr + (size_t)k * d, row_pos[r], scale, ref);
                for (int32_t j = 0; j < d; j++)
                    if (!(fabs(orow[(size_t)k * d + j] - ref[j]) <= 2e-5)) {
                        CHECK_NEAR(orow[(size_t)k * d + j], ref[j], 2e-5);
                        bad = 1;
                        break;
                    }
            }
            for (int32_t j = 0; j < g * d && !bad; j++)
                if (out[(size_t)r * row_stride + j] != 99.0f) {
                    CHECK(!"a row's other KV head was written");
                    bad = 1;
                }
            if (bad)
                fprintf(stderr, "  isa %s prior %d m %d bt %d d %d g %d step %d scramble %d row %d\n",
                        kern_isa_name((kern_isa)isa), s.n_prior, s.m, s.bt, d, g, s.step,
                        s.scramble, r);
        }
    }
    kern_set_isa(KERN_ISA_AVX512);
    free(pos);
    free(row_pos);
    free(Q);
    free(out);
    free(one);
    free(scores);
    free(qpos);
    free(ref);
    free_paged(&p);
}

static void test_chunks_match_reference_and_decode(void)
{
    check((shape){0, 1, 16, 64, 3, 1, 0});     /* one row alone */
    check((shape){0, 13, 16, 64, 3, 1, 0});    /* a first chunk: 39 queries, tiles of 6 */
    check((shape){37, 29, 16, 64, 3, 1, 0});   /* after a prefix, ends mid-tile */
    check((shape){100, 7, 32, 128, 4, 2, 0});  /* sparse prefix, G = 4, head_dim 128 */
    check((shape){5, 11, 16, 80, 2, 1, 0});    /* V pass: 64 dimensions, then 16 */
    check((shape){70, 9, 48, 16, 1, 1, 0});    /* G = 1, three 16-token tiles per block */
    check((shape){200, 17, 16, 64, 5, 3, 0});  /* G = 5: tiles span rows unevenly */
    check((shape){64, 64, 16, 64, 3, 1, 0});   /* whole blocks */
    check((shape){33, 12, 16, 64, 3, 1, 1});   /* positions out of order, one sees nothing */
    check((shape){20, 6, 16, 24, 3, 1, 0});    /* head_dim % 16 != 0: row-by-row fallback */
    check((shape){9, 5, 4, 12, 3, 1, 0});      /* block_tokens % 16 != 0: scalar path */
}

/* A row's output does not depend on which other rows share its call (tile
 * boundaries move with the first row and the count). */
static void test_tiling_does_not_change_results(void)
{
    const int32_t n = 90, m = 20, d = 64, g = 3;
    int32_t pos[90], row_pos[20];
    for (int32_t t = 0; t < n; t++)
        pos[t] = t;
    for (int32_t r = 0; r < m; r++)
        row_pos[r] = n - m + r;
    paged p;
    make_paged(&p, n, 16, d, pos);
    float Q[20 * 3 * 64], all[20 * 3 * 64], part[20 * 3 * 64];
    float *scores = malloc(KERN_ATTN_SCRATCH(n) * sizeof *scores);
    for (int i = 0; i < m * g * d; i++)
        Q[i] = frand();
    kern_attention_rows(&p.view, Q, m, g, g * d, row_pos, 0.125f, all, g * d, scores);
    for (int32_t r0 = 0; r0 < m; r0 += 7) { /* calls of 7, 7, 6 rows */
        const int32_t k = m - r0 < 7 ? m - r0 : 7;
        kern_attention_rows(&p.view, Q + (size_t)r0 * g * d, k, g, g * d, row_pos + r0, 0.125f,
                            part + (size_t)r0 * g * d, g * d, scores);
    }
    CHECK(memcmp(all, part, sizeof all) == 0);
    free(scores);
    free_paged(&p);
}

/* A zero weight skips its V row, as kern_attention does: a masked token
 * whose V holds inf (an fp16 overflow) leaves the rows that cannot see it
 * finite and equal to kern_attention's bits, also in a tile whose other
 * rows see it (so the token lies inside the tile's visible extent). */
static void test_masked_inf_value_skipped(void)
{
    const int32_t n = 48, m = 4, d = 64, g = 3, inf_t = 30;
    int32_t pos[48], row_pos[4] = {20, 40, 21, 41}, qpos[3];
    for (int32_t t = 0; t < n; t++)
        pos[t] = t;
    paged p;
    make_paged(&p, n, 16, d, pos);
    for (int32_t j = 0; j < d; j++)
        p.v[inf_t / 16][(size_t)(inf_t % 16) * d + j] = 0x7c00; /* +inf */
    float Q[4 * 3 * 64], out[4 * 3 * 64], one[3 * 64];
    float *scores = malloc(KERN_ATTN_SCRATCH(n) * sizeof *scores);
    for (int i = 0; i < m * g * d; i++)
        Q[i] = frand();
    kern_attention_rows(&p.view, Q, m, g, g * d, row_pos, 0.125f, out, g * d, scores);
    for (int32_t r = 0; r < m; r++) {
        if (row_pos[r] >= inf_t)
            continue;
        int finite = 1;
        for (int32_t j = 0; j < g * d; j++)
            finite &= isfinite(out[(size_t)r * g * d + j]) != 0;
        CHECK(finite);
        for (int32_t k = 0; k < g; k++)
            qpos[k] = row_pos[r];
        kern_attention(&p.view, Q + (size_t)r * g * d, g, d, qpos, 0.125f, one, d, scores);
        CHECK(memcmp(one, out + (size_t)r * g * d, sizeof one) == 0);
    }
    free(scores);
    free_paged(&p);
}

int main(void)
{
    kern_init();
    RUN_TEST(test_chunks_match_reference_and_decode);
    RUN_TEST(test_tiling_does_not_change_results);
    RUN_TEST(test_masked_inf_value_skipped);
    return TEST_EXIT();
}
