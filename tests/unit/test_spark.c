/*
 * test_spark.c - SparK channel pruning (compress/spark.c), its packed
 * storage (kv_seq_pack, kernels' packed rows) and attention over packed
 * keys, against dense double-precision references written from
 * shared/specs/spark.md on random data.
 *
 *  - saliency s_j = k_j^2 c_j, the top n_keep = D - int(r D) channels, m =
 *    mean saliency of the pruned ones (section 2, 3), c = L2 over the window
 *    of the GQA-group mean query, clamped (pitfall 3);
 *  - the reconstructed key: kept channels exact (fp16), pruned ones
 *    sign(k_j) sqrt(m / c_j) (avg) or 0 (zero-fill);
 *  - attention over a head whose prompt tokens are packed and whose decode
 *    tokens are in blocks equals softmax(q . k_hat / sqrt(d)) V in double;
 *  - ratio 0 changes nothing; bytes held match the row formula (mask, m and
 *    sign bits included); packed tokens survive clone and cannot be dropped.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../compress/compress_internal.h"
#include "ekv_test.h"
#include "entrokv/kernels.h"
#include "entrokv/kvcache.h"

#define D 64
#define BT 16

static uint64_t rng = 0x2545f4914f6cdd1dull;
static double urand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}
static float nrand(void) { return (float)(2.0 * urand() - 1.0); }

/* ---- reference ---- */

/* Channels kept by the spec's rule, in double: sort by s desc, ties to the lower j. */
static double ref_select(const float *k, const float *c, int32_t n_keep, uint8_t *kept)
{
    double s[D];
    for (int j = 0; j < D; j++) {
        s[j] = (double)k[j] * k[j] * c[j];
        kept[j] = 0;
    }
    int order[D];
    for (int j = 0; j < D; j++)
        order[j] = j;
    for (int a = 0; a < D; a++) /* insertion sort: stable, descending */
        for (int b = a; b > 0 && s[order[b]] > s[order[b - 1]]; b--) {
            int t = order[b];
            order[b] = order[b - 1];
            order[b - 1] = t;
        }
    double pruned = 0;
    for (int r = 0; r < D; r++) {
        if (r < n_keep)
            kept[order[r]] = 1;
        else
            pruned += s[order[r]];
    }
    return D - n_keep ? pruned / (D - n_keep) : 0;
}

/* k_hat in double from the original key (fp16-rounded kept values). */
static void ref_reconstruct(const float *k, const float *c, const uint8_t *kept, double m,
                            bool avg, double *out)
{
    for (int j = 0; j < D; j++) {
        if (kept[j])
            out[j] = ekv_f16_to_f32(ekv_f32_to_f16(k[j]));
        else if (!avg)
            out[j] = 0;
        else
            out[j] = (k[j] < 0 ? -1.0 : 1.0) * sqrt(m / c[j]);
    }
}

static void test_channel_weights(void)
{
    enum { W = 32, GR = 3, H = 6 };
    static float wq[W][H][D];
    for (int i = 0; i < W; i++)
        for (int h = 0; h < H; h++)
            for (int j = 0; j < D; j++)
                wq[i][h][j] = nrand();
    for (int j = 0; j < D; j++) /* a channel the queries never use */
        for (int i = 0; i < W; i++)
            for (int h = 0; h < H; h++)
                if (j == 5)
                    wq[i][h][j] = 0;
    float c[D];
    /* KV head 1: query heads 3..5 */
    kvc_spark_channel_weights(&wq[0][3][0], (size_t)H * D, W, GR, D, c);
    double maxrel = 0;
    for (int j = 0; j < D; j++) {
        double ss = 0;
        for (int i = 0; i < W; i++) {
            double mean = 0;
            for (int g = 0; g < GR; g++)
                mean += wq[i][3 + g][j];
            mean /= GR;
            ss += mean * mean;
        }
        double ref = sqrt(ss) > 1e-6 ? sqrt(ss) : 1e-6;
        double rel = fabs(c[j] - ref) / ref;
        maxrel = rel > maxrel ? rel : maxrel;
    }
    CHECK(maxrel < 1e-5);
    CHECK(c[5] >= 1e-6f && c[5] < 2e-6f);
}

static void test_select_matches_reference(void)
{
    for (int trial = 0; trial < 200; trial++) {
        float k[D], c[D];
        for (int j = 0; j < D; j++) {
            k[j] = nrand() * 3;
            c[j] = (float)(urand() * 2 + 1e-3);
        }
        if (trial % 10 == 0) /* ties */
            for (int j = 0; j < D; j++) {
                k[j] = (float)((j % 4) - 2);
                c[j] = 1;
            }
        const int32_t n_keep = kvc_spark_keep(trial % 2 ? 0.5 : 0.8, D);
        CHECK_EQ_INT(n_keep, trial % 2 ? 32 : 13); /* D - int(r D): 64 - 51 */
        uint8_t mask[D / 8], kept[D];
        const float m = kvc_spark_select(k, c, D, n_keep, mask);
        const double rm = ref_select(k, c, n_keep, kept);
        int diff = 0;
        for (int j = 0; j < D; j++)
            diff += ((mask[j / 8] >> (j % 8)) & 1) != kept[j];
        CHECK_EQ_INT(diff, 0);
        CHECK(fabs(m - rm) <= 1e-5 * (rm + 1e-12));
    }
}

static void test_packed_row_roundtrip(void)
{
    for (int trial = 0; trial < 100; trial++) {
        float k[D], c[D], isc[D], got[D];
        for (int j = 0; j < D; j++) {
            k[j] = nrand() * 2;
            c[j] = (float)(urand() + 0.05);
            isc[j] = 1.0f / sqrtf(c[j]);
        }
        const int32_t n_keep = kvc_spark_keep(trial % 3 == 0 ? 0.8 : 0.5, D);
        uint8_t mask[D / 8], kept[D];
        const float m = kvc_spark_select(k, c, D, n_keep, mask);
        ref_select(k, c, n_keep, kept);
        uint8_t row[512];
        const size_t rb = kern_packed_row_bytes(D, n_keep);
        /* m (4) + mask (8) + signs (ceil(pruned / 8)) padded to 2, + 2 per kept value, padded to 4 */
        size_t want = 4 + 8 + (size_t)(D - n_keep + 7) / 8;
        want = (want + 1) & ~(size_t)1;
        want = (want + 2 * (size_t)n_keep + 3) & ~(size_t)3;
        CHECK_EQ_INT(rb, want);
        kern_packed_encode(row, k, mask, m, D, n_keep);
        for (int avg = 0; avg < 2; avg++) {
            double ref[D];
            ref_reconstruct(k, c, kept, m, avg, ref);
            kern_packed_decode(row, D, n_keep, avg ? isc : NULL, got);
            double maxerr = 0;
            for (int j = 0; j < D; j++)
                maxerr = fmax(maxerr, fabs(got[j] - ref[j]) / (fabs(ref[j]) + 1e-3));
            CHECK(maxerr < 1e-5);
        }
    }
}

/* A head of n_prompt packed tokens (positions 0, 2, 4, ...) and n_dec
 * decode tokens in blocks; attention at several query positions equals the
 * dense double reference over the reconstructed keys. */
static void check_attention(double ratio, bool avg)
{
    enum { NP = 75, ND = 21, GQ = 3 };
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(BT, D, 64, &err);
    kv_seq *seq = kv_seq_create(pool, 1, 1, &err);
    static float K[NP + ND][D], V[NP + ND][D];
    int32_t pos[NP + ND];
    for (int t = 0; t < NP + ND; t++) {
        for (int j = 0; j < D; j++) {
            K[t][j] = nrand() * 2;
            V[t][j] = nrand();
        }
        pos[t] = t < NP ? 2 * t : 2 * NP + (t - NP);
        if (t < NP)
            kv_seq_append(seq, 0, 0, K[t], V[t], pos[t], &err);
    }
    float c[D], isc[D];
    for (int j = 0; j < D; j++) {
        c[j] = (float)(urand() * 3 + 0.01);
        isc[j] = 1.0f / sqrtf(c[j]);
    }
    const int32_t n_keep = kvc_spark_keep(ratio, D);
    static uint8_t masks[NP][D / 8], kept[NP][D];
    float m[NP];
    double khat[NP + ND][D];
    for (int t = 0; t < NP; t++) {
        float k16[D]; /* the cache holds fp16 keys: prune what it holds */
        for (int j = 0; j < D; j++)
            k16[j] = ekv_f16_to_f32(ekv_f32_to_f16(K[t][j]));
        m[t] = kvc_spark_select(k16, c, D, n_keep, masks[t]);
        const double rm = ref_select(k16, c, n_keep, kept[t]);
        ref_reconstruct(k16, c, kept[t], rm, avg, khat[t]);
    }
    const int64_t blocks_before = kv_seq_blocks(seq);
    CHECK_EQ_INT(kv_seq_pack(seq, 0, 0, n_keep, &masks[0][0], m, avg ? isc : NULL, &err), EKV_OK);
    CHECK_EQ_INT(kv_seq_blocks(seq), 0);
    CHECK(blocks_before > 0);
    /* bytes: rows + V + positions + 1/sqrt(c) when avg */
    const int64_t want = (int64_t)NP * ((int64_t)kern_packed_row_bytes(D, n_keep) + 2 * D + 4) +
                         (avg ? 4 * D : 0);
    CHECK_EQ_INT(kv_seq_packed_bytes(seq), want);
    for (int t = NP; t < NP + ND; t++) {
        kv_seq_append(seq, 0, 0, K[t], V[t], pos[t], &err);
        for (int j = 0; j < D; j++)
            khat[t][j] = ekv_f16_to_f32(ekv_f32_to_f16(K[t][j]));
    }
    CHECK_EQ_INT(kv_seq_len(seq, 0, 0), NP + ND);
    CHECK_EQ_INT(kv_seq_bytes(seq), want + kv_seq_blocks(seq) * (int64_t)kv_pool_block_bytes(pool));
    kv_seq *clone = kv_seq_clone(seq, &err);
    CHECK(clone != NULL);
    const int32_t qpos_list[] = {0, 37, 2 * NP - 1, 2 * NP + 5, 2 * NP + ND - 1};
    double maxerr = 0;
    for (size_t qi = 0; qi < sizeof qpos_list / sizeof qpos_list[0]; qi++) {
        float Q[GQ][D], out[GQ][D], out2[GQ][D], scores[KERN_ATTN_SCRATCH(NP + ND)];
        static float lg[GQ][NP + ND], pr[GQ][NP + ND];
        int32_t qp[GQ];
        for (int g = 0; g < GQ; g++) {
            qp[g] = qpos_list[qi];
            for (int j = 0; j < D; j++)
                Q[g][j] = nrand();
        }
        const float scale = 1.0f / sqrtf((float)D);
        kern_kv_view view;
        kv_seq_view(seq, 0, 0, &view);
        CHECK(view.packed != NULL);
        const kern_attn_probe probe = {&lg[0][0], &pr[0][0]};
        kern_attention_probe(&view, &Q[0][0], GQ, D, qp, scale, &out[0][0], D, scores, &probe);
        kv_seq_view(clone, 0, 0, &view);
        kern_attention(&view, &Q[0][0], GQ, D, qp, scale, &out2[0][0], D, scores);
        CHECK(memcmp(out, out2, sizeof out) == 0);
        for (int g = 0; g < GQ; g++) {
            double lo[NP + ND], mx = -INFINITY, sum = 0, o[D] = {0};
            for (int t = 0; t < NP + ND; t++) {
                if (pos[t] > qp[g]) {
                    lo[t] = -INFINITY;
                    continue;
                }
                double s = 0;
                for (int j = 0; j < D; j++)
                    s += (double)Q[g][j] * khat[t][j];
                lo[t] = s * scale;
                mx = fmax(mx, lo[t]);
                maxerr = fmax(maxerr, fabs(lg[g][t] - lo[t]) / (fabs(lo[t]) + 1e-2));
            }
            for (int t = 0; t < NP + ND; t++)
                if (lo[t] != -INFINITY)
                    sum += exp(lo[t] - mx);
            for (int t = 0; t < NP + ND; t++) {
                const double p = lo[t] == -INFINITY ? 0 : exp(lo[t] - mx) / sum;
                maxerr = fmax(maxerr, fabs(pr[g][t] - p));
                for (int j = 0; j < D; j++)
                    o[j] += p * ekv_f16_to_f32(ekv_f32_to_f16(V[t][j]));
            }
            for (int j = 0; j < D; j++)
                maxerr = fmax(maxerr, fabs(out[g][j] - o[j]));
        }
    }
    if (maxerr >= 1e-4)
        fprintf(stderr, "  ratio %.1f %s: max error %.3g\n", ratio, avg ? "avg" : "zero", maxerr);
    CHECK(maxerr < 1e-4);
    /* packed tokens cannot be dropped; decode tokens can */
    int32_t keep[NP + ND];
    for (int i = 0; i < NP + ND; i++)
        keep[i] = i + 1;
    CHECK_EQ_INT(kv_seq_keep(seq, 0, 0, keep, NP + ND - 1, &err), EKV_EUNSUPPORTED);
    for (int i = 0; i < NP + ND - 1; i++)
        keep[i] = i < NP ? i : i + 1; /* drop the first decode token */
    CHECK_EQ_INT(kv_seq_keep(seq, 0, 0, keep, NP + ND - 1, &err), EKV_OK);
    int32_t got[NP + ND];
    CHECK_EQ_INT(kv_seq_positions(seq, 0, 0, got), NP + ND - 1);
    CHECK_EQ_INT(got[NP - 1], pos[NP - 1]);
    CHECK_EQ_INT(got[NP], pos[NP + 1]);
    kv_seq_free(clone);
    kv_seq_free(seq);
    CHECK_EQ_INT(kv_pool_free_blocks(pool), kv_pool_total_blocks(pool));
    kv_pool_destroy(pool);
}

static void test_attention_avg_0_5(void) { check_attention(0.5, true); }
static void test_attention_avg_0_8(void) { check_attention(0.8, true); }
static void test_attention_zero_0_8(void) { check_attention(0.8, false); }

/* Ratio 0 is a no-op (pitfall 8): nothing packed, bytes unchanged. */
static void test_ratio_zero_is_noop(void)
{
    ekv_error err = {0};
    kv_pool *pool = kv_pool_create(BT, D, 16, &err);
    kv_seq *seq = kv_seq_create(pool, 1, 2, &err);
    float k[D], v[D];
    for (int t = 0; t < 20; t++) {
        for (int j = 0; j < D; j++)
            k[j] = v[j] = nrand();
        for (int h = 0; h < 2; h++)
            kv_seq_append(seq, 0, h, k, v, t, &err);
    }
    static float sq[4][2][D];
    for (int i = 0; i < 4; i++)
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < D; j++)
                sq[i][h][j] = nrand();
    const int64_t before = kv_seq_bytes(seq);
    kvc_spark_policy p = {.ratio = 0};
    CHECK_EQ_INT(kvc_spark_apply(&p, seq, &sq[0][0][0], 4, 2, &err), EKV_OK);
    CHECK_EQ_INT(kv_seq_bytes(seq), before);
    CHECK_EQ_INT(kv_seq_packed_bytes(seq), 0);
    p.ratio = 0.5;
    CHECK_EQ_INT(kvc_spark_apply(&p, seq, &sq[0][0][0], 4, 2, &err), EKV_OK);
    CHECK(kv_seq_bytes(seq) < before);
    CHECK_EQ_INT(kv_seq_blocks(seq), 0);
    /* packing twice is refused */
    CHECK_EQ_INT(kvc_spark_apply(&p, seq, &sq[0][0][0], 4, 2, &err), EKV_EINVAL);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
}

static void test_parse(void)
{
    kvc_spark_policy p;
    CHECK_EQ_INT(kvc_spark_parse(0.5, "avg", &p, NULL), EKV_OK);
    CHECK_EQ_INT(p.recovery, KVC_SPARK_AVG);
    CHECK_EQ_INT(kvc_spark_parse(0.8, "zero", &p, NULL), EKV_OK);
    CHECK_EQ_INT(p.recovery, KVC_SPARK_ZERO);
    CHECK_EQ_INT(kvc_spark_parse(1.0, NULL, &p, NULL), EKV_EINVAL);
    CHECK_EQ_INT(kvc_spark_parse(-0.1, NULL, &p, NULL), EKV_EINVAL);
    CHECK_EQ_INT(kvc_spark_parse(NAN, NULL, &p, NULL), EKV_EINVAL);
    CHECK_EQ_INT(kvc_spark_parse(0.5, "mean", &p, NULL), EKV_EINVAL);
}

int main(void)
{
    kern_init();
    RUN_TEST(test_parse);
    RUN_TEST(test_channel_weights);
    RUN_TEST(test_select_matches_reference);
    RUN_TEST(test_packed_row_roundtrip);
    RUN_TEST(test_attention_avg_0_5);
    RUN_TEST(test_attention_avg_0_8);
    RUN_TEST(test_attention_zero_0_8);
    RUN_TEST(test_ratio_zero_is_noop);
    return TEST_EXIT();
}
