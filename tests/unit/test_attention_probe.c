/*
 * test_attention_probe.c - kern_attention_probe (kernels.h): the logits and
 * probabilities decode-time compression reads come out of the one attention
 * pass, equal a double-precision reference (scale * q . k, masked by
 * position; softmax), and leave the attention output bit-identical to
 * kern_attention's on every ISA path.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/kernels.h"
#include "entrokv/kvcache.h"

#define D 64
#define N 83
#define GQ 3

static uint64_t rng = 0x853c49e6748fea9bull;
static float nrand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 4503599627370496.0 - 1.0);
}

static void check_isa(kern_isa isa)
{
    if (kern_set_isa(isa) != isa)
        return; /* this CPU lacks it */
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(16, D, 16, &err);
    kv_seq *seq = kv_seq_create(pool, 1, 1, &err);
    static float K[N][D], V[N][D];
    int32_t pos[N];
    for (int t = 0; t < N; t++) {
        for (int j = 0; j < D; j++) {
            K[t][j] = ekv_f16_to_f32(ekv_f32_to_f16(nrand()));
            V[t][j] = ekv_f16_to_f32(ekv_f32_to_f16(nrand()));
        }
        pos[t] = 3 * t;
        kv_seq_append(seq, 0, 0, K[t], V[t], pos[t], &err);
    }
    kern_kv_view view;
    kv_seq_view(seq, 0, 0, &view);
    const int32_t qpos_list[] = {0, 100, 3 * N - 1, 10000};
    double maxerr = 0;
    int same = 1;
    for (size_t qi = 0; qi < 4; qi++) {
        float Q[GQ][D], out[GQ][D], out2[GQ][D], scores[KERN_ATTN_SCRATCH(N)];
        static float lg[GQ][N], pr[GQ][N];
        int32_t qp[GQ];
        for (int g = 0; g < GQ; g++) {
            qp[g] = qpos_list[qi];
            for (int j = 0; j < D; j++)
                Q[g][j] = nrand();
        }
        const float scale = 0.125f;
        kern_attention(&view, &Q[0][0], GQ, D, qp, scale, &out[0][0], D, scores);
        const kern_attn_probe p = {&lg[0][0], &pr[0][0]};
        kern_attention_probe(&view, &Q[0][0], GQ, D, qp, scale, &out2[0][0], D, scores, &p);
        same &= memcmp(out, out2, sizeof out) == 0;
        for (int g = 0; g < GQ; g++) {
            double lo[N], mx = -INFINITY, sum = 0;
            for (int t = 0; t < N; t++) {
                double s = 0;
                for (int j = 0; j < D; j++)
                    s += (double)Q[g][j] * K[t][j];
                lo[t] = pos[t] > qp[g] ? -INFINITY : s * scale;
                mx = fmax(mx, lo[t]);
                if (lo[t] == -INFINITY)
                    same &= lg[g][t] == -INFINITY;
                else
                    maxerr = fmax(maxerr, fabs(lg[g][t] - lo[t]));
            }
            for (int t = 0; t < N; t++)
                sum += lo[t] == -INFINITY ? 0 : exp(lo[t] - mx);
            for (int t = 0; t < N; t++)
                maxerr = fmax(maxerr, fabs(pr[g][t] - (lo[t] == -INFINITY ? 0 : exp(lo[t] - mx) / sum)));
        }
    }
    if (maxerr >= 1e-5 || !same)
        fprintf(stderr, "  %s: max error %.3g, output same %d\n", kern_isa_name(isa), maxerr, same);
    CHECK(same);
    CHECK(maxerr < 1e-5);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
}

static void test_probe_every_isa(void)
{
    check_isa(KERN_ISA_SCALAR);
    check_isa(KERN_ISA_AVX2);
    check_isa(KERN_ISA_AVX512);
}

int main(void)
{
    kern_init();
    RUN_TEST(test_probe_every_isa);
    return TEST_EXIT();
}
