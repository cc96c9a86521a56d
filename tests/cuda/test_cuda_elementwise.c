/*
 * test_cuda_elementwise.c - RMSNorm, RoPE (llama and NEOX layouts, large
 * positions, partial rotation), SwiGLU and the embedding gather against the
 * CPU kernels; greedy argmax exactly (ties, one-element rows, -inf), top-k
 * and top-p sampling against ekv_cuda_sample_ref.
 */
#include "cuda_test.h"

static void test_rmsnorm_matches_cpu(void)
{
    const int shapes[][2] = {{1, 1}, {3, 4096}, {5, 577}, {2, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        const int rows = shapes[s][0], n = shapes[s][1];
        float *x = malloc((size_t)rows * n * 4), *w = malloc((size_t)n * 4);
        float *ref = malloc((size_t)rows * n * 4), *got = malloc((size_t)rows * n * 4);
        rnd_fill(x, (size_t)rows * n, -3, 3);
        rnd_fill(w, (size_t)n, -1, 1);
        for (int r = 0; r < rows; r++)
            kern_rmsnorm(ref + (size_t)r * n, x + (size_t)r * n, w, n, 1e-5f);
        float *dx = dev_from(x, (size_t)rows * n * 4), *dw = dev_from(w, (size_t)n * 4);
        CHECK_OK(ekv_cuda_rmsnorm(g_ctx, dx, dx, dw, rows, n, 1e-5f, &g_err)); /* in place */
        dev_to_host(got, dx, (size_t)rows * n * 4);
        near_all("rmsnorm", got, ref, (size_t)rows * n, 1e-6, 1e-5);
        ekv_cuda_free(dx);
        ekv_cuda_free(dw);
        free(x);
        free(w);
        free(ref);
        free(got);
    }
}

static void check_rope(int n_tok, int n_heads, int d, int n_rot, int neox, int32_t pos0)
{
    const size_t n = (size_t)n_tok * n_heads * d;
    float *x = malloc(n * 4), *ref = malloc(n * 4), *got = malloc(n * 4);
    int32_t *pos = malloc((size_t)n_tok * 4);
    rnd_fill(x, n, -2, 2);
    memcpy(ref, x, n * 4);
    for (int t = 0; t < n_tok; t++) {
        pos[t] = pos0 + 7 * t;
        for (int h = 0; h < n_heads; h++)
            kern_rope(ref + ((size_t)t * n_heads + h) * d, d, n_rot, pos[t], 500000.0f, neox);
    }
    float *dx = dev_from(x, n * 4);
    int32_t *dp = dev_from(pos, (size_t)n_tok * 4);
    CHECK_OK(ekv_cuda_rope(g_ctx, dx, n_tok, n_heads, d, n_rot, dp, 500000.0f, neox, &g_err));
    dev_to_host(got, dx, n * 4);
    /* same angles bit for bit; cosf / sinf of large angles differ by ulps */
    near_all(neox ? "rope neox" : "rope", got, ref, n, 2e-5 + 1e-10 * pos0, 1e-5);
    ekv_cuda_free(dx);
    ekv_cuda_free(dp);
    free(x);
    free(ref);
    free(got);
    free(pos);
}

static void test_rope_matches_cpu(void)
{
    check_rope(1, 1, 64, 64, 0, 0);
    check_rope(5, 32, 128, 128, 0, 3);
    check_rope(3, 8, 128, 128, 1, 100);
    check_rope(2, 4, 64, 32, 0, 31000); /* partial rotation, long context */
}

static void test_swiglu_matches_cpu(void)
{
    enum { N = 14336 * 2 + 3 };
    float *g = malloc(N * 4), *u = malloc(N * 4), *got = malloc(N * 4);
    rnd_fill(g, N, -20, 20);
    rnd_fill(u, N, -2, 2);
    float *dg = dev_from(g, N * 4), *du = dev_from(u, N * 4);
    kern_swiglu(g, u, N);
    CHECK_OK(ekv_cuda_swiglu(g_ctx, dg, du, N, &g_err));
    dev_to_host(got, dg, N * 4);
    near_all("swiglu", got, g, N, 1e-6, 1e-5);
    ekv_cuda_free(dg);
    ekv_cuda_free(du);
    free(g);
    free(u);
    free(got);
}

static void test_embed_gathers_rows(void)
{
    enum { V = 1000, D = 96, N = 6 };
    ekv_f16 *table = malloc((size_t)V * D * 2);
    for (int i = 0; i < V * D; i++)
        table[i] = ekv_f32_to_f16(rnd_f(-1, 1));
    const int32_t tok[N] = {0, 999, 5, 5, -1, 1000}; /* last two out of range */
    float *got = malloc((size_t)N * D * 4);
    void *dt = dev_from(table, (size_t)V * D * 2), *dk = dev_from(tok, sizeof tok);
    float *dout = dev_zero((size_t)N * D * 4);
    CHECK_OK(ekv_cuda_embed(g_ctx, dt, V, D, dk, N, dout, &g_err));
    dev_to_host(got, dout, (size_t)N * D * 4);
    int bad = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < D; j++) {
            const float want = tok[i] >= 0 && tok[i] < V ? ekv_f16_to_f32(table[tok[i] * D + j]) : 0;
            bad += got[i * D + j] != want;
        }
    CHECK_EQ_INT(bad, 0);
    ekv_cuda_free(dt);
    ekv_cuda_free(dk);
    ekv_cuda_free(dout);
    free(table);
    free(got);
}

static void test_argmax_is_exact(void)
{
    enum { ROWS = 5, V = 128256 };
    float *l = malloc((size_t)ROWS * V * 4);
    rnd_fill(l, (size_t)ROWS * V, -10, 10);
    l[0 * V + 77] = 50; /* clear maximum */
    l[1 * V + 9] = 60;  /* a tie: the lower index wins */
    l[1 * V + 100000] = 60;
    for (int i = 0; i < V; i++) /* all equal: index 0 */
        l[2 * V + i] = -INFINITY;
    l[3 * V + V - 1] = 99; /* the last element */
    int32_t got[ROWS];
    float *dl = dev_from(l, (size_t)ROWS * V * 4);
    int32_t *dout = dev_zero(sizeof got);
    CHECK_OK(ekv_cuda_argmax(g_ctx, dl, ROWS, V, dout, &g_err));
    dev_to_host(got, dout, sizeof got);
    for (int r = 0; r < ROWS; r++) {
        int32_t best = 0;
        for (int i = 1; i < V; i++)
            if (l[(size_t)r * V + i] > l[(size_t)r * V + best])
                best = i;
        CHECK_EQ_INT(got[r], best);
    }
    /* one-element rows */
    float one[3] = {1, 2, 3};
    float *d1 = dev_from(one, sizeof one);
    CHECK_OK(ekv_cuda_argmax(g_ctx, d1, 3, 1, dout, &g_err));
    dev_to_host(got, dout, 3 * sizeof *got);
    CHECK(got[0] == 0 && got[1] == 0 && got[2] == 0);
    ekv_cuda_free(d1);
    ekv_cuda_free(dl);
    ekv_cuda_free(dout);
    free(l);
}

/* Draws ROWS tokens for one setting; the GPU must agree with the reference
 * except where u sits within float noise of a cumulative boundary. */
static void check_sample(int V, float temp, int top_k, float top_p)
{
    enum { ROWS = 64 };
    float *l = malloc((size_t)ROWS * V * 4), u[ROWS];
    rnd_fill(l, (size_t)ROWS * V, -8, 8);
    for (int r = 0; r < ROWS; r++)
        u[r] = rnd_f(0, 1);
    l[V + 3] = l[V + 4] = 30; /* a tie at the top of row 1 */
    int32_t got[ROWS];
    float *dl = dev_from(l, (size_t)ROWS * V * 4), *du = dev_from(u, sizeof u);
    int32_t *dout = dev_zero(sizeof got);
    CHECK_OK(ekv_cuda_sample(g_ctx, dl, ROWS, V, temp, top_k, top_p, du, dout, &g_err));
    dev_to_host(got, dout, sizeof got);
    int agree = 0;
    for (int r = 0; r < ROWS; r++) {
        const int32_t want = ekv_cuda_sample_ref(l + (size_t)r * V, V, temp, top_k, top_p, u[r]);
        agree += got[r] == want;
        CHECK(got[r] >= 0 && got[r] < V);
        if (top_k > 0) { /* always inside the top k (ties included) */
            int above = 0;
            for (int i = 0; i < V; i++)
                above += l[(size_t)r * V + i] > l[(size_t)r * V + got[r]];
            CHECK(above < top_k);
        }
    }
    if (agree < ROWS - 1)
        fprintf(stderr, "sample V=%d temp=%g k=%d p=%g: %d of %d agree\n", V, temp, top_k, top_p,
                agree, ROWS);
    CHECK(agree >= ROWS - 1);
    ekv_cuda_free(dl);
    ekv_cuda_free(du);
    ekv_cuda_free(dout);
    free(l);
}

static void test_sampling_matches_reference(void)
{
    check_sample(32000, 0.0f, 0, 1.0f);  /* greedy */
    check_sample(32000, 1.0f, 1, 1.0f);  /* top-1 is greedy */
    check_sample(32000, 0.8f, 40, 1.0f); /* top-k */
    check_sample(32000, 1.0f, 0, 0.9f);  /* top-p */
    check_sample(128256, 0.7f, 50, 0.95f);
    check_sample(7, 1.0f, 0, 1.0f); /* tiny vocabulary */
}

int main(void)
{
    CUDA_TEST_INIT();
    RUN_TEST(test_rmsnorm_matches_cpu);
    RUN_TEST(test_rope_matches_cpu);
    RUN_TEST(test_swiglu_matches_cpu);
    RUN_TEST(test_embed_gathers_rows);
    RUN_TEST(test_argmax_is_exact);
    RUN_TEST(test_sampling_matches_reference);
    CUDA_TEST_EXIT();
}
