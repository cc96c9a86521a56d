/*
 * test_cuda_attention.c - prefill (tiled, causal, GQA, chunk offsets) and
 * paged decode attention (ragged heads, empty heads, one token, lengths off
 * the 16-token grid, compressed heads with gaps in their positions, forced
 * small splits) against the CPU's kern_attention over the same fp16 K/V.
 */
#include "cuda_test.h"

#include "kv_fixture.h"

/* ---- prefill ---- */

/* kern_kv_view of one KV head of contiguous K/V [n][n_kv][d] through a kv_seq. */
static kv_seq *seq_of_contiguous(kv_pool *pool, const ekv_f16 *K, const ekv_f16 *V, int n, int n_kv,
                                 int d)
{
    kv_seq *seq = kv_seq_create(pool, 1, n_kv, &g_err);
    float *k = malloc((size_t)d * 4), *v = malloc((size_t)d * 4);
    for (int t = 0; seq && t < n; t++)
        for (int h = 0; h < n_kv; h++) {
            for (int j = 0; j < d; j++) {
                k[j] = ekv_f16_to_f32(K[((size_t)t * n_kv + h) * d + j]);
                v[j] = ekv_f16_to_f32(V[((size_t)t * n_kv + h) * d + j]);
            }
            CHECK_OK(kv_seq_append(seq, 0, h, k, v, t, &g_err));
        }
    free(k);
    free(v);
    return seq;
}

static void check_prefill(int n_q, int q_off, int n_heads, int n_kv, int d)
{
    const int n = q_off + n_q; /* keys: the cached prefix plus this chunk */
    const size_t qn = (size_t)n_q * n_heads * d, kn = (size_t)n * n_kv * d;
    float *Q = malloc(qn * 4), *ref = malloc(qn * 4), *got = malloc(qn * 4 + 4);
    float *lse = malloc((size_t)n_q * n_heads * 4 + 4);
    ekv_f16 *K = malloc(kn * 2 + 2), *V = malloc(kn * 2 + 2);
    rnd_fill(Q, qn, -1, 1);
    for (size_t i = 0; i < kn; i++) {
        K[i] = ekv_f32_to_f16(rnd_f(-1, 1));
        V[i] = ekv_f32_to_f16(rnd_f(-1, 1));
    }
    const float scale = 1.0f / sqrtf((float)d);
    kv_pool *pool = kv_pool_create(16, d, (int64_t)n_kv * (n / 16 + 1) + 1, &g_err);
    kv_seq *seq = seq_of_contiguous(pool, K, V, n, n_kv, d);
    float *scores = malloc(KERN_ATTN_SCRATCH(n + 1) * 4);
    for (int h = 0; h < n_heads; h++) {
        kern_kv_view view;
        kv_seq_view(seq, 0, h / (n_heads / n_kv), &view);
        for (int i = 0; i < n_q; i++) {
            const int32_t qp = q_off + i;
            kern_attention(&view, Q + ((size_t)i * n_heads + h) * d, 1, d, &qp, scale,
                           ref + ((size_t)i * n_heads + h) * d, d, scores);
        }
    }
    float *dQ = dev_from(Q, qn * 4), *dout = dev_zero(qn * 4 + 4);
    float *dlse = dev_zero((size_t)n_q * n_heads * 4 + 4);
    void *dK = dev_from(K, kn * 2 + 2), *dV = dev_from(V, kn * 2 + 2);
    CHECK_OK(ekv_cuda_prefill_attention(g_ctx, dQ, n_q, n_heads, dK, dV, n, n_kv, d, q_off, scale,
                                        dout, dlse, &g_err));
    dev_to_host(got, dout, qn * 4);
    dev_to_host(lse, dlse, (size_t)n_q * n_heads * 4);
    char what[96];
    snprintf(what, sizeof what, "prefill n_q=%d off=%d heads=%d/%d d=%d", n_q, q_off, n_heads,
             n_kv, d);
    near_all(what, got, ref, qn, 2e-5, 1e-4);
    /* log-sum-exp of query 0, head 0, by hand */
    double mx = -INFINITY, sum = 0;
    for (int t = 0; t <= q_off && t < n; t++) {
        double s = 0;
        for (int j = 0; j < d; j++)
            s += (double)Q[j] * ekv_f16_to_f32(K[(size_t)t * n_kv * d + j]);
        s *= scale;
        if (s > mx) {
            sum = sum * exp(mx - s) + 1;
            mx = s;
        } else {
            sum += exp(s - mx);
        }
    }
    CHECK_NEAR(lse[0], mx + log(sum), 1e-4);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
    ekv_cuda_free(dQ);
    ekv_cuda_free(dout);
    ekv_cuda_free(dlse);
    ekv_cuda_free(dK);
    ekv_cuda_free(dV);
    free(Q);
    free(ref);
    free(got);
    free(lse);
    free(K);
    free(V);
    free(scores);
}

static void test_prefill_matches_cpu(void)
{
    check_prefill(1, 0, 1, 1, 64);      /* one token */
    check_prefill(17, 0, 4, 2, 64);     /* off the 16 grid, GQA 2 */
    check_prefill(100, 0, 8, 2, 128);   /* several key tiles */
    check_prefill(33, 50, 4, 1, 128);   /* chunk after a cached prefix */
    check_prefill(40, 0, 2, 2, 256);    /* wide heads */
    check_prefill(300, 0, 32, 8, 128);  /* Llama-3 group of 4 */
}

/* ---- decode ---- */

static float g_qmag = 1.0f;  /* queries are uniform in [-g_qmag, g_qmag] */
static const char *g_kernel; /* which decode kernel runs */

static void check_decode(int n_seq, int n_kv, int group, int d, const int32_t *lens, int sparse,
                         int32_t split, int32_t qpos_minus)
{
    heads_fixture f;
    fixture_make(&f, n_seq, n_kv, d, lens, sparse);
    const int n_qh = n_kv * group;
    const size_t qn = (size_t)n_seq * n_qh * d;
    float *Q = malloc(qn * 4), *ref = malloc(qn * 4), *got = malloc(qn * 4);
    int32_t *qpos = malloc((size_t)n_seq * 4);
    rnd_fill(Q, qn, -g_qmag, g_qmag);
    float *scores = malloc(KERN_ATTN_SCRATCH(f.max_len + 1) * 4);
    const float scale = 1.0f / sqrtf((float)d);
    for (int s = 0; s < n_seq; s++) {
        qpos[s] = kv_seq_next_pos(f.seqs[s]) - qpos_minus; /* < next: masks the newest */
        for (int h = 0; h < n_qh; h++) {
            kern_kv_view view;
            kv_seq_view(f.seqs[s], 0, h / group, &view);
            kern_attention(&view, Q + ((size_t)s * n_qh + h) * d, 1, d, &qpos[s], scale,
                           ref + ((size_t)s * n_qh + h) * d, d, scores);
        }
    }
    ekv_cuda_decode_set_split(split);
    const size_t ws = ekv_cuda_decode_workspace(n_seq, n_kv, n_qh, d, f.max_len);
    void *dws = dev_zero(ws);
    float *dQ = dev_from(Q, qn * 4), *dout = dev_zero(qn * 4);
    int32_t *dpos = dev_from(qpos, (size_t)n_seq * 4);
    CHECK_OK(ekv_cuda_decode_attention(g_ctx, f.dpool, &f.dev, n_seq, n_kv, n_qh, dQ, dpos,
                                       f.max_len, scale, dout, dws, &g_err));
    dev_to_host(got, dout, qn * 4);
    ekv_cuda_decode_set_split(0);
    char what[160];
    snprintf(what, sizeof what, "decode (%s) seq=%d kv=%d g=%d d=%d sparse=%d split=%d max=%d q=%g",
             g_kernel, n_seq, n_kv, group, d, sparse, split, f.max_len, g_qmag);
    near_all(what, got, ref, qn, 2e-5, 1e-4);
    ekv_cuda_free(dws);
    ekv_cuda_free(dQ);
    ekv_cuda_free(dout);
    ekv_cuda_free(dpos);
    fixture_free(&f);
    free(Q);
    free(ref);
    free(got);
    free(qpos);
    free(scores);
}

static void test_decode_matches_cpu(void)
{
    /* the default, the tensor-core kernel at each depth of its pipeline (the
     * default picks by length), and the CUDA-core kernel */
    static const char *KERNELS[5] = {"default", "2 stages", "3 stages", "4 stages", "cuda cores"};
    for (int k = 0; k < 5; k++) {
        ekv_cuda_decode_set_stages(k >= 1 && k <= 3 ? k + 1 : 0);
        ekv_cuda_decode_force_simt(k == 4);
        g_kernel = KERNELS[k];
        const int32_t one[] = {1};
        check_decode(1, 1, 1, 64, one, 0, 0, 0); /* a single token */
        const int32_t ragged[] = {0, 1, 17, 100, 31, 16, 250, 5};
        check_decode(2, 4, 4, 128, ragged, 0, 0, 0);   /* empty and odd heads */
        check_decode(2, 4, 4, 128, ragged, 0, 32, 0);  /* many splits, some empty */
        check_decode(2, 4, 4, 128, ragged, 1, 16, 3);  /* gaps in positions; newest masked */
        check_decode(1, 4, 8, 64, ragged, 0, 0, 0);    /* group of 8 */
        check_decode(2, 4, 1, 128, ragged, 0, 0, 0);   /* no grouping */
        check_decode(4, 2, 2, 256, ragged, 0, 48, 0);  /* wide heads */
        const int32_t lng[] = {4096, 409, 3000, 1, 2048, 700, 4095, 33};
        check_decode(1, 8, 4, 128, lng, 0, 0, 0);      /* Llama-3.1-8B group, 4k */
        check_decode(1, 8, 4, 128, lng, 1, 256, 1);
        const int32_t longer[] = {20000, 517}; /* the default's deep pipeline */
        check_decode(1, 2, 4, 128, longer, 1, 0, 0);
        g_qmag = 12.0f; /* peaked softmax: scores of tens, as trained models have */
        check_decode(1, 8, 4, 128, lng, 0, 0, 0);
        check_decode(2, 4, 8, 64, ragged, 1, 0, 0);
        g_qmag = 1.0f;
        const int32_t none[] = {0, 0};
        check_decode(1, 2, 4, 128, none, 0, 0, 0);     /* nothing cached at all */
    }
    ekv_cuda_decode_force_simt(false);
    ekv_cuda_decode_set_stages(0);
}

static void test_decode_rejects_unsupported(void)
{
    ekv_cuda_kv_pool *p = NULL;
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, 96, 4, &p, &g_err));
    ekv_cuda_kv_heads h = {1, NULL, NULL, NULL};
    CHECK(ekv_cuda_decode_attention(g_ctx, p, &h, 1, 1, 1, NULL, NULL, 1, 1.0f, NULL, NULL,
                                    &g_err) == EKV_EUNSUPPORTED);
    ekv_cuda_kv_pool_destroy(p);
}

int main(void)
{
    CUDA_TEST_INIT();
    kern_init();
    RUN_TEST(test_prefill_matches_cpu);
    RUN_TEST(test_decode_matches_cpu);
    RUN_TEST(test_decode_rejects_unsupported);
    CUDA_TEST_EXIT();
}
