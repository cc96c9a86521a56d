/*
 * test_cpu_reference.c - the CPU halves of tests/cuda/, checked where no GPU
 * exists (label unit: CI runs it, also under ASan). Each CUDA test trusts a
 * host reference; here each of those references, on the shapes and
 * settings the CUDA test gives it, is compared with a brute force in double
 * precision written from the operation's definition (the header comments of
 * kernels.h, compress_internal.h and cuda.h), not from the code it checks:
 *
 *   test_cuda_elementwise  kern_rmsnorm, kern_rope (both layouts, partial,
 *                          position 31000), kern_swiglu; ekv_cuda_sample_ref
 *                          (kernels/cuda/reference.c, compiled in here) row by
 *                          row and as a distribution over u
 *   test_cuda_attention    kern_attention over a kv_seq: prefill (GQA, chunk
 *                          offsets) and decode (ragged, empty, compressed heads
 *                          with gaps in their positions, the newest masked)
 *   test_cuda_compress     kvc_window_scores over the same kind of heads
 *   test_cuda_spark        kern_attention over SparK-packed heads (every case
 *                          of spark_fixture.h), and the kernel's own row
 *                          reading (kernels/cuda/spark_row.h, plain C here)
 *                          against the spec's rebuilt keys
 *
 * Covered elsewhere and not repeated: kern_get_row (unit.test_matmul,
 * against its own dequantization), kvc_select_snap (unit.test_compress,
 * brute force), the entropy (unit.test_compress, numpy fixture). The argmax,
 * embedding, log-sum-exp and GEMM references of the CUDA tests are brute
 * force already. Needs no CUDA library: it builds with EKV_CUDA off too.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "compress_internal.h"
#include "ekv_test.h"
#include "entrokv/cuda.h"
#include "entrokv/kernels.h"
#include "entrokv/kvcache.h"

/* the CUDA tests' generator (cuda_test.h), so the inputs are theirs in kind */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint32_t rnd_u32(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}

static float rnd_f(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rnd_u32() & 0xFFFFFF) / 16777216.0f;
}

static void rnd_fill(float *x, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rnd_f(lo, hi);
}

static float f16r(float x) /* what fp16 storage keeps of x */
{
    return ekv_f16_to_f32(ekv_f32_to_f16(x));
}

#include "../../kernels/cuda/spark_row.h" /* C and CUDA alike: the kernel's row reading */
#include "spark_fixture.h"                 /* after rnd_fill, which it uses */

/* |got - want| <= atol + rtol |want| everywhere; prints the first misses. */
static void near_all(const char *what, const float *got, const double *want, size_t n,
                     double atol, double rtol)
{
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        if (!(fabs((double)got[i] - want[i]) <= atol + rtol * fabs(want[i]))) {
            if (bad++ < 5)
                fprintf(stderr, "  %s[%zu]: reference %.9g vs brute force %.9g\n", what, i,
                        got[i], want[i]);
        }
    if (bad)
        fprintf(stderr, "%s: %d of %zu values differ\n", what, bad, n);
    CHECK_EQ_INT(bad, 0);
}

/* ---- element-wise ---- */

static void test_rmsnorm_reference(void)
{
    const int shapes[][2] = {{1, 1}, {3, 4096}, {5, 577}, {2, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        const int rows = shapes[s][0], n = shapes[s][1];
        float *x = malloc((size_t)rows * n * 4), *w = malloc((size_t)n * 4);
        float *got = malloc((size_t)rows * n * 4);
        double *want = malloc((size_t)rows * n * 8);
        rnd_fill(x, (size_t)rows * n, -3, 3);
        rnd_fill(w, (size_t)n, -1, 1);
        for (int r = 0; r < rows; r++) {
            const float *xr = x + (size_t)r * n;
            kern_rmsnorm(got + (size_t)r * n, xr, w, n, 1e-5f);
            double ss = 0;
            for (int i = 0; i < n; i++)
                ss += (double)xr[i] * xr[i];
            const double inv = 1.0 / sqrt(ss / n + 1e-5);
            for (int i = 0; i < n; i++)
                want[(size_t)r * n + i] = xr[i] * inv * w[i];
        }
        near_all("rmsnorm", got, want, (size_t)rows * n, 1e-6, 1e-5);
        free(x);
        free(w);
        free(got);
        free(want);
    }
}

/* RoPE by its definition: pair i of the first n_rot dims turns by
 * pos * base^(-2i / n_rot); pairs are (2i, 2i+1), or (i, i + n_rot/2) in
 * the NEOX layout; the dims past n_rot stay. */
static void check_rope(int n_tok, int n_heads, int d, int n_rot, int neox, int32_t pos0)
{
    const double base = 500000.0;
    const size_t n = (size_t)n_tok * n_heads * d;
    float *x = malloc(n * 4), *got = malloc(n * 4);
    double *want = malloc(n * 8);
    rnd_fill(x, n, -2, 2);
    memcpy(got, x, n * 4);
    double worst_angle = 0;
    for (int t = 0; t < n_tok; t++) {
        const int32_t pos = pos0 + 7 * t;
        for (int h = 0; h < n_heads; h++) {
            const size_t o = ((size_t)t * n_heads + h) * d;
            kern_rope(got + o, d, n_rot, pos, (float)base, neox);
            for (int i = 0; i < d; i++)
                want[o + i] = x[o + i];
            for (int i = 0; i < n_rot / 2; i++) {
                const double a = pos * pow(base, -2.0 * i / n_rot);
                const int i0 = neox ? i : 2 * i, i1 = neox ? i + n_rot / 2 : 2 * i + 1;
                want[o + i0] = x[o + i0] * cos(a) - x[o + i1] * sin(a);
                want[o + i1] = x[o + i0] * sin(a) + x[o + i1] * cos(a);
                worst_angle = a > worst_angle ? a : worst_angle;
            }
        }
    }
    /* the kernel works in float: its angle is off by up to a few ulps of
     * the angle itself, which moves the result by that much times |x| <= 2 */
    const double atol = 2e-6 + 2 * 4 * worst_angle * 0x1p-24;
    char what[64];
    snprintf(what, sizeof what, "rope%s d=%d rot=%d pos=%d", neox ? " neox" : "", d, n_rot, pos0);
    near_all(what, got, want, n, atol, 1e-5);
    free(x);
    free(got);
    free(want);
}

static void test_rope_reference(void)
{
    check_rope(1, 1, 64, 64, 0, 0);
    check_rope(5, 32, 128, 128, 0, 3);
    check_rope(3, 8, 128, 128, 1, 100);
    check_rope(2, 4, 64, 32, 0, 31000);
}

static void test_swiglu_reference(void)
{
    enum { N = 14336 * 2 + 3 };
    float *g = malloc(N * 4), *u = malloc(N * 4);
    double *want = malloc(N * 8);
    rnd_fill(g, N, -20, 20);
    rnd_fill(u, N, -2, 2);
    for (int i = 0; i < N; i++)
        want[i] = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    kern_swiglu(g, u, N);
    near_all("swiglu", g, want, N, 1e-6, 1e-5);
    free(g);
    free(u);
    free(want);
}

/* ---- sampling ---- */

static int by_value_desc(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* The kept set of cuda.h's rule in double: p ~ exp(l / T); the top_k
 * largest (ties at the k-th kept), then the largest whose mass first
 * reaches top_p of the kept mass (ties kept). keep[i] says whether i is
 * drawable; returns the kept mass; *near_cut when the top_p decision is
 * within rounding of the other answer. */
static double kept_set(const float *l, int n, double temp, int top_k, double top_p, char *keep,
                       int *near_cut)
{
    double *v = malloc((size_t)n * sizeof *v);
    for (int i = 0; i < n; i++)
        v[i] = l[i];
    qsort(v, (size_t)n, sizeof *v, by_value_desc);
    const double mx = v[0];
    double cut = top_k > 0 && top_k < n ? v[top_k - 1] : v[n - 1];
    double z = 0;
    for (int i = 0; i < n && v[i] >= cut; i++)
        z += exp((v[i] - mx) / temp);
    *near_cut = 0;
    if (top_p < 1.0) { /* walk down whole groups of equal values */
        double above = 0;
        for (int i = 0; i < n && v[i] >= cut;) {
            const double val = v[i];
            for (; i < n && v[i] == val; i++)
                above += exp((v[i] - mx) / temp);
            if (fabs(above - top_p * z) <= 1e-5 * z)
                *near_cut = 1;
            if (above >= top_p * z) {
                cut = val;
                break;
            }
        }
    }
    free(v);
    z = 0;
    for (int i = 0; i < n; i++) {
        keep[i] = l[i] >= cut;
        z += keep[i] ? exp((l[i] - mx) / temp) : 0;
    }
    return z;
}

/* The draw: the first kept token, in index order, whose running mass
 * passes u of the kept mass. *near when u sits within rounding of a step. */
static int draw(const float *l, int n, double temp, const char *keep, double z, double u,
                int *near)
{
    double mx = -INFINITY, acc = 0;
    for (int i = 0; i < n; i++)
        mx = l[i] > mx ? l[i] : mx;
    int last = -1;
    for (int i = 0; i < n; i++) {
        if (!keep[i])
            continue;
        acc += exp((l[i] - mx) / temp);
        last = i;
        if (fabs(acc - u * z) <= 1e-5 * z)
            *near = 1;
        if (acc > u * z)
            return i;
    }
    return last;
}

static int argmax(const float *l, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        best = l[i] > l[best] ? i : best;
    return best;
}

/* check_sample's rows (64 of them, a tie at the top of row 1): the
 * reference draws what the brute force draws on every row whose u is not
 * within rounding of a step. */
static void check_sample(int V, float temp, int top_k, float top_p)
{
    enum { ROWS = 64 };
    float *l = malloc((size_t)ROWS * V * 4), u[ROWS];
    char *keep = malloc((size_t)V);
    rnd_fill(l, (size_t)ROWS * V, -8, 8);
    for (int r = 0; r < ROWS; r++)
        u[r] = rnd_f(0, 1);
    l[V + 3] = l[V + 4] = 30;
    int agree = 0, unsure = 0;
    for (int r = 0; r < ROWS; r++) {
        const float *row = l + (size_t)r * V;
        const int32_t got = ekv_cuda_sample_ref(row, V, temp, top_k, top_p, u[r]);
        int near = 0, want;
        if (!(temp > 0)) {
            want = argmax(row, V);
        } else {
            const double z = kept_set(row, V, temp, top_k, top_p, keep, &near);
            want = draw(row, V, temp, keep, z, u[r], &near);
        }
        agree += got == want;
        unsure += near && got != want;
        if (got != want && !near)
            fprintf(stderr, "  sample V=%d T=%g k=%d p=%g row %d: reference %d, brute force %d\n",
                    V, temp, top_k, top_p, r, got, want);
    }
    CHECK_EQ_INT(agree + unsure, ROWS);
    CHECK(unsure <= 1);
    free(l);
    free(keep);
}

static void test_sample_reference_matches_the_rule(void)
{
    check_sample(32000, 0.0f, 0, 1.0f);
    check_sample(32000, 1.0f, 1, 1.0f);
    check_sample(32000, 0.8f, 40, 1.0f);
    check_sample(32000, 1.0f, 0, 0.9f);
    check_sample(128256, 0.7f, 50, 0.95f);
    check_sample(7, 1.0f, 0, 1.0f);
}

/* Over u on a fine grid, the reference draws each token with its
 * probability: softmax(l / T) over the kept tokens, renormalised. */
static void check_distribution(float temp, int top_k, float top_p, const double *want)
{
    const float l[7] = {1.0f, 3.0f, -1.0f, 2.5f, 0.0f, 2.0f, 1.5f};
    enum { GRID = 20000 };
    int count[7] = {0};
    for (int j = 0; j < GRID; j++)
        count[ekv_cuda_sample_ref(l, 7, temp, top_k, top_p, ((float)j + 0.5f) / GRID)]++;
    for (int i = 0; i < 7; i++)
        CHECK_NEAR((double)count[i] / GRID, want[i], 2.0 / GRID);
}

static void test_sample_reference_draws_the_distribution(void)
{
    const float l[7] = {1.0f, 3.0f, -1.0f, 2.5f, 0.0f, 2.0f, 1.5f};
    double p[7], z = 0;
    for (int i = 0; i < 7; i++)
        z += p[i] = exp(l[i] / 0.7);
    for (int i = 0; i < 7; i++)
        p[i] /= z;
    check_distribution(0.7f, 0, 1.0f, p);
    /* top_k 3: tokens 1, 3, 5 (logits 3, 2.5, 2) */
    double k3[7] = {0}, z3 = p[1] + p[3] + p[5];
    k3[1] = p[1] / z3, k3[3] = p[3] / z3, k3[5] = p[5] / z3;
    check_distribution(0.7f, 3, 1.0f, k3);
    /* top_p: the largest ones until their mass reaches p[1] + p[3], then
     * one more: {1, 3} reaches it exactly, a hair more needs token 5 too */
    double p2[7] = {0};
    p2[1] = p[1] / (p[1] + p[3]), p2[3] = p[3] / (p[1] + p[3]);
    check_distribution(0.7f, 0, (float)((p[1] + p[3]) * 0.999), p2);
    check_distribution(0.7f, 0, (float)(p[1] + p[3] + p[5] * 0.5), k3);
    const double only1[7] = {0, 1, 0, 0, 0, 0, 0};
    check_distribution(0.0f, 0, 1.0f, only1); /* greedy */
    check_distribution(5.0f, 1, 1.0f, only1); /* top-1 */
}

/* ---- attention ---- */

/* out = softmax(scale q.k_t over the tokens with pos_t <= qpos) . V, in double. */
static void brute_attention(const double *K, const double *V, const int32_t *pos, int n, int d,
                            const float *q, int32_t qpos, double scale, double *out)
{
    double mx = -INFINITY, z = 0;
    double *s = malloc(((size_t)n + 1) * sizeof *s);
    for (int t = 0; t < n; t++) {
        s[t] = -INFINITY;
        if (pos[t] > qpos)
            continue;
        double dot = 0;
        for (int j = 0; j < d; j++)
            dot += (double)q[j] * K[(size_t)t * d + j];
        s[t] = dot * scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    for (int j = 0; j < d; j++)
        out[j] = 0;
    for (int t = 0; t < n; t++)
        if (s[t] > -INFINITY) {
            const double e = exp(s[t] - mx);
            z += e;
            for (int j = 0; j < d; j++)
                out[j] += e * V[(size_t)t * d + j];
        }
    for (int j = 0; z > 0 && j < d; j++)
        out[j] /= z;
    free(s);
}

/* One KV head: len tokens of random K/V at positions 0.., every other one
 * kept when sparse (test_cuda's kv_fixture.h); K, V and pos receive what
 * the head holds, as fp16 gives it back. Returns the tokens held. */
static int make_head(kv_seq *seq, int h, int len, int d, int sparse, double *K, double *V,
                     int32_t *pos)
{
    float *k = malloc((size_t)d * 4), *v = malloc((size_t)d * 4);
    int32_t *keep = malloc(((size_t)len + 1) * sizeof *keep);
    int held = 0;
    for (int t = 0; t < len; t++) {
        rnd_fill(k, (size_t)d, -1, 1);
        rnd_fill(v, (size_t)d, -1, 1);
        CHECK_EQ_INT(kv_seq_append(seq, 0, h, k, v, t, NULL), EKV_OK);
        if (sparse && t % 2)
            continue;
        for (int j = 0; j < d; j++) {
            K[(size_t)held * d + j] = f16r(k[j]);
            V[(size_t)held * d + j] = f16r(v[j]);
        }
        pos[held] = t;
        keep[held++] = t;
    }
    if (sparse && len > 1)
        CHECK_EQ_INT(kv_seq_keep(seq, 0, h, keep, held, NULL), EKV_OK);
    free(k);
    free(v);
    free(keep);
    return held;
}

/* test_cuda_attention's prefill reference: n_q queries from position q_off
 * on, query head h reading KV head h / (n_heads / n_kv). */
static void check_prefill(int n_q, int q_off, int n_heads, int n_kv, int d)
{
    const int n = q_off + n_q;
    kv_pool *pool = kv_pool_create(16, d, (int64_t)n_kv * (n / 16 + 1) + 1, NULL);
    kv_seq *seq = kv_seq_create(pool, 1, n_kv, NULL);
    double *K = malloc((size_t)n_kv * n * d * 8), *V = malloc((size_t)n_kv * n * d * 8);
    int32_t *pos = malloc((size_t)n_kv * n * 4);
    for (int h = 0; h < n_kv; h++)
        CHECK_EQ_INT(make_head(seq, h, n, d, 0, K + (size_t)h * n * d, V + (size_t)h * n * d,
                               pos + (size_t)h * n), n);
    const size_t qn = (size_t)n_q * n_heads * d;
    float *Q = malloc(qn * 4), *got = malloc(qn * 4), *scores = malloc(KERN_ATTN_SCRATCH(n + 1) * 4);
    double *want = malloc(qn * 8);
    rnd_fill(Q, qn, -1, 1);
    const float scale = 1.0f / sqrtf((float)d);
    for (int h = 0; h < n_heads; h++) {
        const int kh = h / (n_heads / n_kv);
        kern_kv_view view;
        kv_seq_view(seq, 0, kh, &view);
        for (int i = 0; i < n_q; i++) {
            const int32_t qp = q_off + i;
            const size_t o = ((size_t)i * n_heads + h) * d;
            kern_attention(&view, Q + o, 1, d, &qp, scale, got + o, d, scores);
            brute_attention(K + (size_t)kh * n * d, V + (size_t)kh * n * d, pos + (size_t)kh * n,
                            n, d, Q + o, qp, scale, want + o);
        }
    }
    char what[96];
    snprintf(what, sizeof what, "prefill n_q=%d off=%d heads=%d/%d d=%d", n_q, q_off, n_heads,
             n_kv, d);
    near_all(what, got, want, qn, 2e-6, 1e-4);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
    free(K);
    free(V);
    free(pos);
    free(Q);
    free(got);
    free(scores);
    free(want);
}

static void test_prefill_reference(void)
{
    check_prefill(1, 0, 1, 1, 64);
    check_prefill(17, 0, 4, 2, 64);
    check_prefill(100, 0, 8, 2, 128);
    check_prefill(33, 50, 4, 1, 128);
    check_prefill(40, 0, 2, 2, 256);
}

/* test_cuda_attention's decode reference: one query per query head at the
 * sequence's next position minus qpos_minus, over ragged (and empty, and
 * sparse) heads; qmag scales the queries (12: a peaked softmax). */
static void check_decode(int n_seq, int n_kv, int group, int d, const int32_t *lens, int sparse,
                         int32_t qpos_minus, float qmag)
{
    int64_t blocks = 0;
    int32_t longest = 1;
    for (int i = 0; i < n_seq * n_kv; i++) {
        blocks += lens[i] / 16 + 2;
        longest = lens[i] > longest ? lens[i] : longest;
    }
    kv_pool *pool = kv_pool_create(16, d, blocks, NULL);
    double *K = malloc((size_t)longest * d * 8), *V = malloc((size_t)longest * d * 8);
    int32_t *pos = malloc((size_t)longest * 4);
    float *q = malloc((size_t)d * 4), *got = malloc((size_t)d * 4);
    float *scores = malloc(KERN_ATTN_SCRATCH(longest + 1) * 4);
    double *want = malloc((size_t)d * 8);
    const float scale = 1.0f / sqrtf((float)d);
    int bad = 0;
    for (int s = 0; s < n_seq; s++) {
        kv_seq *seq = kv_seq_create(pool, 1, n_kv, NULL);
        int32_t next = 0;
        for (int h = 0; h < n_kv; h++) /* positions only: the heads are rebuilt below */
            next = lens[s * n_kv + h] > next ? lens[s * n_kv + h] : next;
        for (int h = 0; h < n_kv; h++) {
            const int held = make_head(seq, h, lens[s * n_kv + h], d, sparse, K, V, pos);
            const int32_t qpos = next - qpos_minus;
            kern_kv_view view;
            kv_seq_view(seq, 0, h, &view);
            CHECK_EQ_INT(view.n_tokens, held);
            for (int g = 0; g < group; g++) {
                rnd_fill(q, (size_t)d, -qmag, qmag);
                kern_attention(&view, q, 1, d, &qpos, scale, got, d, scores);
                brute_attention(K, V, pos, held, d, q, qpos, scale, want);
                for (int j = 0; j < d; j++)
                    bad += !(fabs(got[j] - want[j]) <= 2e-6 + 1e-4 * fabs(want[j]));
            }
        }
        CHECK_EQ_INT(kv_seq_next_pos(seq), next);
        kv_seq_free(seq);
    }
    if (bad)
        fprintf(stderr, "decode seq=%d kv=%d g=%d d=%d sparse=%d q=%g: %d values differ\n", n_seq,
                n_kv, group, d, sparse, qmag, bad);
    CHECK_EQ_INT(bad, 0);
    kv_pool_destroy(pool);
    free(K);
    free(V);
    free(pos);
    free(q);
    free(got);
    free(scores);
    free(want);
}

static void test_decode_reference(void)
{
    const int32_t one[] = {1};
    check_decode(1, 1, 1, 64, one, 0, 0, 1);
    const int32_t ragged[] = {0, 1, 17, 100, 31, 16, 250, 5};
    check_decode(2, 4, 4, 128, ragged, 0, 0, 1);
    check_decode(2, 4, 4, 128, ragged, 1, 3, 1); /* gaps in positions; newest masked */
    check_decode(4, 2, 2, 256, ragged, 0, 0, 1);
    const int32_t lng[] = {4096, 409, 3000, 1, 2048, 700, 4095, 33};
    check_decode(1, 8, 2, 128, lng, 1, 1, 1);
    check_decode(1, 8, 2, 128, lng, 0, 0, 12);   /* peaked softmax */
    const int32_t none[] = {0, 0};
    check_decode(1, 2, 4, 128, none, 0, 0, 1);   /* nothing cached at all */
}

/* ---- SparK's packed keys ---- */

/* test_cuda_spark's reference: kern_attention over each case's packed heads
 * (kern_attend_packed) against the brute force over the keys the spec
 * rebuilds (spark_fixture.h, in double). The rebuilt keys differ from the
 * CPU's by fp32 rounding of sqrt(m) / sqrt(c_j) (~1e-7 relative), which
 * scores of magnitude qmag carry into the output: hence the bound. */
static void check_spark_case(int ci)
{
    const spark_case *cs = &SPARK_CASES[ci];
    spark_heads sh;
    ekv_error err = {0};
    CHECK_EQ_INT(spark_heads_make(&sh, cs, 1, &err), EKV_OK);
    if (!sh.pool)
        return;
    const int d = cs->d;
    float *q = malloc((size_t)d * 4), *got = malloc((size_t)d * 4);
    float *scores = malloc(KERN_ATTN_SCRATCH(sh.max_len + 1) * 4);
    double *want = malloc((size_t)d * 8), worst = 0;
    const float scale = 1.0f / sqrtf((float)d);
    const double atol = 1e-5 * cs->qmag;
    int bad = 0;
    for (int s = 0; s < cs->n_seq; s++) {
        const int32_t qpos = kv_seq_next_pos(sh.seqs[s]) - cs->qpos_minus;
        for (int h = 0; h < cs->n_kv; h++) {
            const int i = s * cs->n_kv + h;
            kern_kv_view view;
            kv_seq_view(sh.seqs[s], 0, h, &view);
            CHECK_EQ_INT(view.n_tokens, sh.len[i]);
            CHECK((view.packed != NULL) == (cs->packed[i] > 0));
            for (int g = 0; g < cs->group; g++) {
                rnd_fill(q, (size_t)d, -cs->qmag, cs->qmag);
                kern_attention(&view, q, 1, d, &qpos, scale, got, d, scores);
                brute_attention(sh.khat[i], sh.vv[i], sh.pos[i], sh.len[i], d, q, qpos, scale,
                                want);
                for (int j = 0; j < d; j++) {
                    const double e = fabs(got[j] - want[j]);
                    worst = e > worst ? e : worst;
                    bad += !(e <= atol + 1e-4 * fabs(want[j]));
                }
            }
        }
    }
    if (bad)
        fprintf(stderr, "spark case %d (d=%d ratio=%.1f %s): %d values differ, worst %.3g\n", ci,
                d, cs->ratio, cs->avg ? "avg" : "zero", bad, worst);
    CHECK_EQ_INT(bad, 0);
    spark_heads_free(&sh);
    free(q);
    free(got);
    free(scores);
    free(want);
}

static void test_spark_decode_reference(void)
{
    for (int ci = 0; ci < SPARK_N_CASES; ci++)
        check_spark_case(ci);
}

/* The CUDA kernel's own reading of a packed row (kernels/cuda/spark_row.h,
 * compiled here as C): for random keys, masks and m, at every n_keep from
 * "all kept" to "none kept", both recoveries and 1-8 queries, q . k against
 * the key the spec rebuilds (kept: fp16(k_j); pruned: sign(k_j) sqrt(m) /
 * sqrt(c_j), or 0) in double. */
static void test_spark_row_matches_spec(void)
{
    static const int dims[] = {64, 128, 256};
    int bad = 0;
    for (int di = 0; di < 3; di++) {
        const int d = dims[di];
        const int32_t keeps[] = {d, kvc_spark_keep(0.5, d), kvc_spark_keep(0.8, d), 7, 1, 0};
        float k[256], isc[256], q[8 * 256], s[8];
        uint32_t row_words[256]; /* rows are 4-aligned, as kv_seq_pack's are */
        uint8_t *row = (uint8_t *)row_words, mask[32];
        int perm[256];
        for (int ki = 0; ki < 6; ki++)
            for (int trial = 0; trial < 8; trial++) {
                const int32_t n_keep = keeps[ki], g = 1 + trial;
                rnd_fill(k, (size_t)d, -2, 2);
                rnd_fill(q, (size_t)g * d, -1, 1);
                for (int j = 0; j < d; j++) {
                    isc[j] = 1.0f / sqrtf(rnd_f(0.05f, 3.0f));
                    perm[j] = j;
                }
                for (int j = d - 1; j > 0; j--) { /* the kept channels: a random n_keep */
                    const int r = (int)(rnd_u32() % (uint32_t)(j + 1)), t = perm[j];
                    perm[j] = perm[r];
                    perm[r] = t;
                }
                memset(mask, 0, sizeof mask);
                for (int j = 0; j < n_keep; j++)
                    mask[perm[j] / 8] |= (uint8_t)(1u << (perm[j] % 8));
                const float m = rnd_f(0, 2);
                CHECK(kern_packed_row_bytes(d, n_keep) <= sizeof row_words);
                kern_packed_encode(row, k, mask, m, d, n_keep);
                for (int avg = 0; avg < 2; avg++) {
                    spk_row_dot(row, d, n_keep, avg ? isc : NULL, q, g, s);
                    for (int i = 0; i < g; i++) {
                        double want = 0, mag = 0;
                        for (int j = 0; j < d; j++) {
                            double kj;
                            if (mask[j / 8] >> (j % 8) & 1)
                                kj = f16r(k[j]);
                            else
                                kj = avg ? (k[j] < 0 ? -1.0 : 1.0) * sqrt((double)m) * isc[j] : 0;
                            want += (double)q[i * d + j] * kj;
                            mag += fabs((double)q[i * d + j] * kj);
                        }
                        bad += !(fabs(s[i] - want) <= 1e-6 * mag + 1e-6);
                    }
                }
            }
    }
    if (bad)
        fprintf(stderr, "spark_row.h: %d dots differ from the spec's\n", bad);
    CHECK_EQ_INT(bad, 0);
}

/* ---- compression ---- */

/* test_cuda_compress's window-score reference: for each token t, the sum
 * over the window's W rows and the group's query heads of
 * softmax(q . k / sqrt(d)) at t, masked to pos_t <= the row's position. */
static void check_window(int d, int group, int len, int sparse)
{
    const int W = KVC_WINDOW, nr = W * group;
    kv_pool *pool = kv_pool_create(16, d, len / 16 + 2, NULL);
    kv_seq *seq = kv_seq_create(pool, 1, 1, NULL);
    double *K = malloc(((size_t)len + 1) * d * 8), *V = malloc(((size_t)len + 1) * d * 8);
    int32_t *pos = malloc(((size_t)len + 1) * 4), qpos[KVC_WINDOW];
    const int held = make_head(seq, 0, len, d, sparse, K, V, pos);
    float *wq = malloc((size_t)nr * d * 4), *got = malloc(((size_t)held + 1) * 4);
    float *scratch = malloc(((size_t)nr * (held + 1)) * 4);
    double *want = calloc((size_t)held + 1, 8), *s = malloc(((size_t)held + 1) * 8);
    rnd_fill(wq, (size_t)nr * d, -2, 2);
    for (int r = 0; r < W; r++)
        qpos[r] = kv_seq_next_pos(seq) - W + r;
    kern_kv_view view;
    kv_seq_view(seq, 0, 0, &view);
    kvc_window_scores(&view, wq, (size_t)group * d, W, group, qpos, got, scratch);
    for (int r = 0; r < W; r++)
        for (int g = 0; g < group; g++) {
            const float *q = wq + ((size_t)r * group + g) * d;
            double mx = -INFINITY, z = 0;
            for (int t = 0; t < held; t++) {
                double dot = 0;
                for (int j = 0; j < d; j++)
                    dot += (double)q[j] * K[(size_t)t * d + j];
                s[t] = pos[t] <= qpos[r] ? dot / sqrt((double)d) : -INFINITY;
                mx = s[t] > mx ? s[t] : mx;
            }
            for (int t = 0; t < held; t++)
                z += s[t] > -INFINITY ? exp(s[t] - mx) : 0;
            for (int t = 0; z > 0 && t < held; t++)
                want[t] += s[t] > -INFINITY ? exp(s[t] - mx) / z : 0;
        }
    char what[64];
    snprintf(what, sizeof what, "window scores d=%d g=%d n=%d sparse=%d", d, group, len, sparse);
    near_all(what, got, want, (size_t)held, 1e-6, 1e-4);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
    free(K);
    free(V);
    free(pos);
    free(wq);
    free(got);
    free(scratch);
    free(want);
    free(s);
}

static void test_window_scores_reference(void)
{
    check_window(64, 1, 1, 0);
    check_window(64, 4, 17, 0);
    check_window(128, 2, 100, 1);
    check_window(128, 4, 700, 0);
    check_window(64, 8, 333, 1);
}

int main(void)
{
    kern_init();
    RUN_TEST(test_rmsnorm_reference);
    RUN_TEST(test_rope_reference);
    RUN_TEST(test_swiglu_reference);
    RUN_TEST(test_sample_reference_matches_the_rule);
    RUN_TEST(test_sample_reference_draws_the_distribution);
    RUN_TEST(test_prefill_reference);
    RUN_TEST(test_decode_reference);
    RUN_TEST(test_window_scores_reference);
    RUN_TEST(test_spark_decode_reference);
    RUN_TEST(test_spark_row_matches_spec);
    return TEST_EXIT();
}
