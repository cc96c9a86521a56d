/*
 * spark_fixture.h - one KV head of a kv_seq with SparK's packed keys, as
 * compress/spark.c leaves it after prefill: n_packed prompt tokens pruned
 * (kvc_spark_select on the fp16 keys the cache holds) and packed by
 * kv_seq_pack, then n_tail decode tokens appended to blocks. Shared by
 * test_cuda_spark.c (the kernel against kern_attention on these heads) and
 * test_cpu_reference.c (kern_attention on them against a double brute force).
 *
 * The includer defines rnd_fill(float *, size_t, float lo, float hi) first.
 */
#ifndef EKV_SPARK_FIXTURE_H
#define EKV_SPARK_FIXTURE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "compress_internal.h"
#include "entrokv/kvcache.h"

/* What fp16 storage keeps of x. */
static inline double spark_f16r(float x) { return ekv_f16_to_f32(ekv_f32_to_f16(x)); }

/*
 * Fills head h of seq (layer 0, empty): keys and values uniform in [-1, 1),
 * positions 0, 1, 2, ... skipping every third one when gaps is set. The
 * packed tokens keep kvc_spark_keep(ratio, d) channels each under channel
 * weights c; isc = 1 / sqrt(c) is passed for "avg" recovery, NULL for zero
 * fill. When khat is given it receives ((n_packed + n_tail) x d) the keys
 * attention must use, from the spec (shared/specs/spark.md section 3), not
 * from the packing code: a kept or dense channel is its fp16 value, a
 * pruned one sign(k_j) sqrt(m) / sqrt(c_j) with m the mean saliency
 * k_j^2 c_j of the pruned channels (0 for zero fill); vv and pos (when
 * given) the values and positions held. Returns the kv_seq_pack status.
 */
static inline ekv_status spark_head_make(kv_seq *seq, int h, int d, int32_t n_packed,
                                         int32_t n_tail, double ratio, const float *c,
                                         const float *isc, int gaps, double *khat, double *vv,
                                         int32_t *pos, ekv_error *err)
{
    const int32_t n = n_packed + n_tail, n_keep = kvc_spark_keep(ratio, d);
    const size_t mb = ((size_t)d + 7) / 8;
    float *k = malloc((size_t)d * sizeof *k), *v = malloc((size_t)d * sizeof *v);
    float *k16 = malloc((size_t)d * sizeof *k16), *m = malloc(((size_t)n_packed + 1) * sizeof *m);
    uint8_t *masks = malloc(((size_t)n_packed + 1) * mb);
    ekv_status rc = k && v && k16 && m && masks ? EKV_OK : EKV_ENOMEM;
    int32_t p = 0;
    for (int32_t t = 0; rc == EKV_OK && t < n; t++, p++) {
        if (t == n_packed && n_packed > 0) /* the prompt ends: prune and pack it */
            rc = kv_seq_pack(seq, 0, h, n_keep, masks, m, isc, err);
        if (gaps && p % 3 == 2)
            p++;
        rnd_fill(k, (size_t)d, -1, 1);
        rnd_fill(v, (size_t)d, -1, 1);
        if (rc == EKV_OK)
            rc = kv_seq_append(seq, 0, h, k, v, p, err);
        for (int j = 0; j < d; j++) {
            k16[j] = (float)spark_f16r(k[j]);
            if (vv)
                vv[(size_t)t * d + j] = spark_f16r(v[j]);
            if (khat)
                khat[(size_t)t * d + j] = k16[j];
        }
        if (pos)
            pos[t] = p;
        if (t >= n_packed)
            continue;
        uint8_t *mask = masks + (size_t)t * mb;
        m[t] = kvc_spark_select(k16, c, d, n_keep, mask);
        if (!khat)
            continue;
        double sal = 0; /* the spec's m, recomputed in double */
        for (int j = 0; j < d; j++)
            if (!(mask[j / 8] >> (j % 8) & 1))
                sal += (double)k16[j] * k16[j] * c[j];
        const double mean = n_keep < d ? sal / (d - n_keep) : 0.0;
        for (int j = 0; j < d; j++)
            if (!(mask[j / 8] >> (j % 8) & 1))
                khat[(size_t)t * d + j] =
                    isc ? (k16[j] < 0 ? -1.0 : 1.0) * sqrt(mean / c[j]) : 0.0;
    }
    if (rc == EKV_OK && n_tail == 0 && n_packed > 0)
        rc = kv_seq_pack(seq, 0, h, n_keep, masks, m, isc, err);
    free(k);
    free(v);
    free(k16);
    free(m);
    free(masks);
    return rc;
}

/* Channel weights c uniform in [0.05, 3) and isc = 1 / sqrt(c). (Weights at
 * the floor KVC_SPARK_C_MIN rebuild keys in the hundreds: softmaxes so
 * peaked that fp32 rounding, not the kernel, would decide a comparison.) */
static inline void spark_channel_weights(int d, float *c, float *isc)
{
    rnd_fill(c, (size_t)d, 0.05f, 3.0f);
    for (int j = 0; j < d; j++)
        isc[j] = 1.0f / sqrtf(c[j]);
}

/* A batch for the packed decode kernel: n_seq sequences of n_kv heads (at
 * most 8 heads), head i = s * n_kv + h with packed[i] packed tokens then
 * tail[i] dense ones; queries uniform in [-qmag, qmag) at position
 * kv_seq_next_pos - qpos_minus (> 0 masks the newest tokens). */
typedef struct spark_case {
    int n_seq, n_kv, group, d;
    double ratio;
    int avg, gaps;
    float qmag;
    int32_t qpos_minus;
    int32_t packed[8], tail[8];
} spark_case;

/* The cases test_cuda_spark runs and test_cpu_reference checks the
 * reference on: ratios 0.5 and 0.8 (and 0, 1 at the edges), both
 * recoveries, groups 1 / 2 / 4 / 8, head_dim 64 / 128 / 256, odd lengths,
 * heads with no packed or no dense tokens, gaps in positions, the newest
 * tokens masked, 4k-token heads, peaked softmaxes. */
static const spark_case SPARK_CASES[] = {
    {1, 1, 1, 64, 0.5, 1, 0, 1.0f, 0, {1}, {0}},
    {2, 4, 4, 128, 0.5, 1, 0, 1.0f, 0, {75, 0, 17, 100, 31, 16, 250, 5}, {21, 1, 0, 33, 0, 7, 3, 64}},
    {2, 4, 4, 128, 0.8, 1, 1, 1.0f, 2, {75, 0, 17, 100, 31, 16, 250, 5}, {21, 1, 0, 33, 0, 7, 3, 64}},
    {2, 4, 4, 128, 0.8, 0, 1, 1.0f, 0, {75, 0, 17, 100, 31, 16, 250, 5}, {21, 1, 0, 33, 0, 7, 3, 64}},
    {1, 4, 8, 64, 0.5, 0, 0, 1.0f, 0, {33, 129, 1, 64}, {0, 15, 2, 31}},
    {1, 4, 8, 64, 0.8, 1, 1, 12.0f, 0, {33, 129, 1, 64}, {0, 15, 2, 31}},
    {2, 4, 1, 128, 0.8, 1, 0, 1.0f, 1, {99, 3, 0, 257, 40, 40, 1, 7}, {0, 9, 5, 1, 0, 13, 0, 2}},
    {4, 2, 2, 256, 0.5, 1, 1, 1.0f, 0, {47, 3, 120, 9, 1, 200, 31, 0}, {2, 0, 19, 1, 30, 0, 5, 8}},
    {4, 2, 2, 256, 0.8, 0, 0, 1.0f, 0, {47, 3, 120, 9, 1, 200, 31, 0}, {2, 0, 19, 1, 30, 0, 5, 8}},
    {1, 8, 4, 128, 0.8, 1, 0, 1.0f, 0, {4096, 409, 3000, 1, 2048, 700, 4095, 33}, {0, 17, 100, 1, 5, 300, 1, 0}},
    {1, 8, 4, 128, 0.5, 1, 1, 12.0f, 3, {4096, 409, 3000, 1, 2048, 700, 4095, 33}, {0, 17, 100, 1, 5, 300, 1, 0}},
    {1, 2, 4, 128, 0.0, 1, 0, 1.0f, 0, {77, 5}, {3, 0}},  /* nothing pruned */
    {1, 2, 4, 128, 1.0, 1, 0, 1.0f, 0, {77, 5}, {3, 0}},  /* every channel pruned */
};
#define SPARK_N_CASES ((int)(sizeof SPARK_CASES / sizeof SPARK_CASES[0]))

/* A case's heads on the host; khat, vv, pos (when refs) as spark_head_make gives them. */
typedef struct spark_heads {
    kv_pool *pool;
    kv_seq *seqs[8];
    float c[8][256], isc[8][256];
    double *khat[8], *vv[8];
    int32_t *pos[8], len[8];
    int32_t max_len;
} spark_heads;

static inline void spark_heads_free(spark_heads *sh)
{
    for (int i = 0; i < 8; i++) {
        kv_seq_free(sh->seqs[i]);
        free(sh->khat[i]);
        free(sh->vv[i]);
        free(sh->pos[i]);
    }
    kv_pool_destroy(sh->pool);
    memset(sh, 0, sizeof *sh);
}

static inline ekv_status spark_heads_make(spark_heads *sh, const spark_case *cs, int refs,
                                          ekv_error *err)
{
    memset(sh, 0, sizeof *sh);
    const int H = cs->n_seq * cs->n_kv, d = cs->d;
    int64_t blocks = 0;
    for (int i = 0; i < H; i++)
        blocks += (cs->packed[i] + cs->tail[i]) / 16 + 2;
    sh->pool = kv_pool_create(16, d, blocks, err);
    ekv_status rc = sh->pool ? EKV_OK : EKV_ENOMEM;
    for (int s = 0; rc == EKV_OK && s < cs->n_seq; s++) {
        if (!(sh->seqs[s] = kv_seq_create(sh->pool, 1, cs->n_kv, err)))
            rc = EKV_ENOMEM;
        for (int h = 0; rc == EKV_OK && h < cs->n_kv; h++) {
            const int i = s * cs->n_kv + h;
            const size_t n = (size_t)cs->packed[i] + cs->tail[i];
            sh->len[i] = (int32_t)n;
            sh->max_len = sh->len[i] > sh->max_len ? sh->len[i] : sh->max_len;
            spark_channel_weights(d, sh->c[i], sh->isc[i]);
            if (refs) {
                sh->khat[i] = malloc((n + 1) * d * sizeof(double));
                sh->vv[i] = malloc((n + 1) * d * sizeof(double));
                sh->pos[i] = malloc((n + 1) * sizeof(int32_t));
                if (!sh->khat[i] || !sh->vv[i] || !sh->pos[i]) {
                    rc = EKV_ENOMEM;
                    break;
                }
            }
            rc = spark_head_make(sh->seqs[s], h, d, cs->packed[i], cs->tail[i], cs->ratio,
                                 sh->c[i], cs->avg ? sh->isc[i] : NULL, cs->gaps, sh->khat[i],
                                 sh->vv[i], sh->pos[i], err);
        }
    }
    if (rc != EKV_OK)
        spark_heads_free(sh);
    return rc;
}

#endif
