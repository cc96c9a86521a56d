/*
 * compress_ref.h - what each compression method keeps, brute force in
 * double from the specs (not from compress/), for
 * tests/model/test_compress_ref.c: the inputs of one prompt (a dataset of
 * post-RoPE queries and fp16-rounded K/V per layer and head), UNComp's
 * truncated matrix entropy (specs/uncomp.md section 1, Jacobi eigenvalues),
 * the per-(layer, KV head) budgets of every method, and the kept positions
 * of StreamingLLM and of SnapKV's rule. The test's header comment gives the
 * rules and their sources. The model's shape is in L, H, HKV, D, G, which
 * the test sets before using anything here.
 */
#ifndef EKV_TEST_COMPRESS_REF_H
#define EKV_TEST_COMPRESS_REF_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/compress.h"
#include "entrokv/dtype.h"
#include "entrokv/kvcache.h"

#define W_MAX 8     /* observation window */
#define POOL_HALF 3 /* max-pool kernel 7 */
#define SINKS 4
#define BETA 20
#define NEAR_TIE 1e-5

static int32_t L, H, HKV, D, G;

static uint64_t rng_state = 12345;
static double urand(void)
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static double nrand(void)
{
    double u = urand() + 1e-12, v = urand();
    return sqrt(-2 * log(u)) * cos(2 * M_PI * v);
}
static float f16_round(double x)
{
    return ekv_f16_to_f32(ekv_f32_to_f16((float)x));
}

/* A prompt's state before compression: its queries for every layer and its
 * keys and values for every (layer, KV head). */
typedef struct dataset {
    const char *name;
    int32_t n;
    float *q;        /* [L][n][H][D] post-RoPE queries */
    ekv_f16 *k, *v;  /* [L][HKV][n][D] */
    int32_t *pos;    /* [n] positions of the tokens */
    double *kv_ent;  /* [L][HKV] reference entropy, NULL until computed */
} dataset;

static const float *q_at(const dataset *ds, int32_t l, int32_t t, int32_t h)
{
    return ds->q + (((size_t)l * ds->n + t) * H + h) * D;
}
static size_t kv_at(const dataset *ds, int32_t l, int32_t g, int32_t t)
{
    return (((size_t)l * HKV + g) * ds->n + t) * D;
}

static void dataset_free(dataset *ds)
{
    free(ds->q);
    free(ds->k);
    free(ds->v);
    free(ds->pos);
    free(ds->kv_ent);
}

static bool dataset_alloc(dataset *ds, int32_t n)
{
    ds->n = n;
    ds->q = malloc((size_t)L * n * H * D * sizeof *ds->q);
    ds->k = malloc((size_t)L * HKV * n * D * sizeof *ds->k);
    ds->v = malloc((size_t)L * HKV * n * D * sizeof *ds->v);
    ds->pos = malloc((size_t)n * sizeof *ds->pos);
    ds->kv_ent = NULL;
    return ds->q && ds->k && ds->v && ds->pos;
}

/* ---- reference: entropy (specs/uncomp.md section 1) ---- */

/* Eigenvalues of the symmetric d x d matrix a (destroyed): cyclic Jacobi. */
static void jacobi_eigenvalues(double *a, int d, double *ev)
{
    for (int sweep = 0; sweep < 60; sweep++) {
        double off = 0, diag = 0;
        for (int p = 0; p < d; p++) {
            diag += a[p * d + p] * a[p * d + p];
            for (int q = p + 1; q < d; q++)
                off += a[p * d + q] * a[p * d + q];
        }
        if (off <= 1e-28 * diag)
            break;
        for (int p = 0; p < d; p++)
            for (int q = p + 1; q < d; q++) {
                const double apq = a[p * d + q];
                if (apq == 0)
                    continue;
                const double theta = (a[q * d + q] - a[p * d + p]) / (2 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
                const double c = 1 / sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < d; k++) { /* A J */
                    const double akp = a[k * d + p], akq = a[k * d + q];
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for (int k = 0; k < d; k++) { /* J^T A */
                    const double apk = a[p * d + k], aqk = a[q * d + k];
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
            }
    }
    for (int i = 0; i < d; i++)
        ev[i] = a[i * d + i];
}

static int by_double_desc(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

/* Truncated matrix entropy of one query head over all n prompt tokens:
 * centre, L2-normalise rows, A = sum z z^T / n, A / trace + 1e-10 I, top k
 * eigenvalues, -sum lambda ln lambda / ln d. */
static double ref_entropy(const dataset *ds, int32_t l, int32_t h, int k)
{
    const int n = ds->n;
    double *x = malloc((size_t)n * D * sizeof *x), *A = calloc((size_t)D * D, sizeof *A);
    double *ev = malloc((size_t)D * sizeof *ev), mean[512] = {0};
    for (int t = 0; t < n; t++)
        for (int j = 0; j < D; j++)
            mean[j] += q_at(ds, l, t, h)[j] / (double)n;
    for (int t = 0; t < n; t++) {
        double nn = 0;
        for (int j = 0; j < D; j++) {
            x[t * D + j] = q_at(ds, l, t, h)[j] - mean[j];
            nn += x[t * D + j] * x[t * D + j];
        }
        nn = fmax(sqrt(nn), 1e-12);
        for (int j = 0; j < D; j++)
            x[t * D + j] /= nn;
        for (int i = 0; i < D; i++)
            for (int j = 0; j < D; j++)
                A[i * D + j] += x[t * D + i] * x[t * D + j] / n;
    }
    double tr = 0, fro = 0;
    for (int i = 0; i < D; i++)
        tr += A[i * D + i];
    for (int i = 0; i < D * D; i++) {
        A[i] /= tr;
        fro += A[i] * A[i];
    }
    for (int i = 0; i < D; i++)
        A[i * D + i] += 1e-10;
    jacobi_eigenvalues(A, D, ev);
    double s = 0, s2 = 0;
    for (int i = 0; i < D; i++) {
        s += ev[i];
        s2 += ev[i] * ev[i];
    }
    CHECK_NEAR(s, 1.0 + D * 1e-10, 1e-9); /* the solver keeps the trace ... */
    CHECK_NEAR(s2, fro, 1e-9);            /* ... and the Frobenius norm */
    qsort(ev, (size_t)D, sizeof *ev, by_double_desc);
    double e = 0;
    for (int i = 0; i < k; i++)
        if (ev[i] > 0)
            e -= ev[i] * log(ev[i]);
    free(x);
    free(A);
    free(ev);
    return e / log((double)D);
}

static void dataset_entropy(dataset *ds)
{
    ds->kv_ent = malloc((size_t)L * HKV * sizeof *ds->kv_ent);
    for (int32_t l = 0; l < L; l++)
        for (int32_t g = 0; g < HKV; g++) {
            double s = 0;
            for (int32_t i = 0; i < G; i++)
                s += ref_entropy(ds, l, g * G + i, D / 4);
            ds->kv_ent[l * HKV + g] = s / G;
        }
}

/* ---- reference: budgets ---- */

static int32_t ref_mean(double budget, int32_t n)
{
    if (budget > 1)
        return (int32_t)budget;
    int32_t m = (int32_t)floor(budget * n + 0.5);
    return m < 1 ? 1 : m;
}

/* x_i = clamp(lambda w_i, lo, hi) with sum x_i = total: proportional shares
 * with clamps, solved for lambda by bisection. */
static void ref_shares(const double *w, int n, double total, double lo, double hi, double *x)
{
    double a = 0, b = 1e9;
    for (int it = 0; it < 300; it++) {
        const double mid = 0.5 * (a + b);
        double s = 0;
        for (int i = 0; i < n; i++)
            s += fmin(hi, fmax(lo, mid * w[i]));
        if (s < total)
            a = mid;
        else
            b = mid;
    }
    for (int i = 0; i < n; i++)
        x[i] = fmin(hi, fmax(lo, b * w[i]));
}

/* UNComp's HIGH heads: the profile's, or the n/2 (at least 1) highest
 * entropies of each layer. */
static void uncomp_groups(const kvc_policy *p, const dataset *ds, const int *profile_high,
                          int *high)
{
    const int32_t n_high = HKV / 2 > 0 ? HKV / 2 : 1;
    for (int32_t l = 0; l < L; l++) {
        int *hl = high + l * HKV;
        if (p->profile) {
            memcpy(hl, profile_high + l * HKV, (size_t)HKV * sizeof *hl);
            continue;
        }
        for (int32_t g = 0; g < HKV; g++) {
            int above = 0;
            for (int32_t j = 0; j < HKV; j++)
                above += ds->kv_ent[l * HKV + j] > ds->kv_ent[l * HKV + g];
            hl[g] = above < n_high;
        }
    }
}

/* The spec's real-valued budget of every (layer, KV head); for UNComp the
 * layer's mean per head (ref_uncomp_split splits it) and high[] marks the
 * HIGH heads. */
static void ref_budgets(const kvc_policy *p, const dataset *ds, const int *profile_high,
                        double *x, int *high)
{
    const int32_t n = ds->n, M = ref_mean(p->budget, n);
    memset(high, 0, (size_t)L * HKV * sizeof *high);
    if (p->method == KVC_STREAMING || p->method == KVC_SNAPKV) {
        for (int32_t i = 0; i < L * HKV; i++)
            x[i] = M;
        return;
    }
    if (p->method == KVC_PYRAMIDKV) {
        const int32_t w = W_MAX < M / 2 ? W_MAX : M / 2;
        double min_num = (M - w) / BETA, max_num = 2.0 * (M - w) - min_num;
        if (max_num >= n - w) {
            max_num = n - w;
            min_num = 2.0 * (M - w) - max_num;
        }
        for (int32_t l = 0; l < L; l++)
            for (int32_t g = 0; g < HKV; g++)
                x[l * HKV + g] = w + max_num - l * (max_num - min_num) / (L - 1);
        return;
    }
    /* UNComp: layer budgets first (uniform with a profile, proportional to
     * the layer's mean entropy online), then each layer's split */
    double layer[256], e[256];
    for (int32_t l = 0; l < L; l++) {
        layer[l] = M;
        e[l] = 0;
        for (int32_t g = 0; !p->profile && g < HKV; g++)
            e[l] += ds->kv_ent[l * HKV + g] / HKV;
    }
    if (!p->profile)
        ref_shares(e, L, (double)L * M, M / 2 > 0 ? M / 2 : 1, 2.0 * M < n ? 2.0 * M : n, layer);
    for (int32_t l = 0; l < L; l++)
        for (int32_t g = 0; g < HKV; g++)
            x[l * HKV + g] = layer[l];
    uncomp_groups(p, ds, profile_high, high);
}

/* Within each layer of an UNComp sequence: HIGH heads keep twice a LOW
 * head, the layer's heads sharing its total (3 KV heads: 1.5 and 0.75 of
 * the layer's mean). x[]: per head, from the layer totals it holds. */
static void ref_uncomp_split(const kv_seq *seq, const int *high, int32_t n, double *x)
{
    for (int32_t l = 0; l < L; l++) {
        double total = 0, wts[256];
        for (int32_t g = 0; g < HKV; g++) {
            total += kv_seq_len(seq, l, g);
            wts[g] = high[l * HKV + g] ? 2.0 : 1.0;
        }
        ref_shares(wts, HKV, total, 1, n, x + l * HKV);
    }
}

/* ---- reference: selection ---- */

typedef struct ref_sel {
    int32_t n_keep;
    int32_t *keep;   /* increasing indices */
    double *pooled;  /* max-pooled prefix scores (SnapKV rule), NULL otherwise */
    double thr;      /* the lowest pooled score kept */
    double scale;    /* the highest pooled score */
} ref_sel;

static void ref_streaming(int32_t n, int32_t b, ref_sel *r)
{
    r->n_keep = 0;
    if (b >= n) {
        for (int32_t t = 0; t < n; t++)
            r->keep[r->n_keep++] = t;
        return;
    }
    for (int32_t t = 0; t < SINKS; t++)
        r->keep[r->n_keep++] = t;
    for (int32_t t = n - (b - SINKS); t < n; t++)
        r->keep[r->n_keep++] = t;
}

static void ref_snap(const dataset *ds, int32_t l, int32_t g, int32_t b, ref_sel *r)
{
    const int32_t n = ds->n;
    r->n_keep = 0;
    if (b >= n) {
        for (int32_t t = 0; t < n; t++)
            r->keep[r->n_keep++] = t;
        return;
    }
    int32_t w = W_MAX < n ? W_MAX : n;
    w = w < b / 2 ? w : b / 2;
    const int32_t prefix = n - w;
    double *s = calloc((size_t)n, sizeof *s), *p = malloc((size_t)n * sizeof *p);
    for (int32_t r0 = n - w; r0 < n; r0++)
        for (int32_t i = 0; i < G; i++) {
            const float *q = q_at(ds, l, r0, g * G + i);
            double mx = -INFINITY, sum = 0;
            for (int32_t t = 0; t < n; t++) {
                p[t] = -INFINITY;
                if (ds->pos[t] > ds->pos[r0])
                    continue; /* causal */
                const ekv_f16 *k = ds->k + kv_at(ds, l, g, t);
                double dot = 0;
                for (int32_t j = 0; j < D; j++)
                    dot += (double)q[j] * ekv_f16_to_f32(k[j]);
                p[t] = dot / sqrt((double)D);
                mx = fmax(mx, p[t]);
            }
            for (int32_t t = 0; t < n; t++)
                sum += p[t] == -INFINITY ? 0 : exp(p[t] - mx);
            for (int32_t t = 0; t < prefix; t++)
                s[t] += p[t] == -INFINITY ? 0 : exp(p[t] - mx) / sum;
        }
    for (int32_t j = 0; j < prefix; j++) {
        r->pooled[j] = -INFINITY; /* padding */
        for (int32_t t = j - POOL_HALF; t <= j + POOL_HALF; t++)
            if (t >= 0 && t < prefix)
                r->pooled[j] = fmax(r->pooled[j], s[t]);
    }
    char *taken = calloc((size_t)n, 1);
    r->thr = INFINITY;
    r->scale = 0;
    for (int32_t j = 0; j < prefix; j++)
        r->scale = fmax(r->scale, r->pooled[j]);
    for (int32_t i = 0; i < b - w; i++) {
        int32_t best = -1;
        for (int32_t j = 0; j < prefix; j++) /* ties: the lower index */
            if (!taken[j] && (best < 0 || r->pooled[j] > r->pooled[best]))
                best = j;
        taken[best] = 1;
        r->thr = fmin(r->thr, r->pooled[best]);
    }
    for (int32_t j = 0; j < n; j++)
        if (taken[j] || j >= prefix)
            r->keep[r->n_keep++] = j;
    free(taken);
    free(s);
    free(p);
}

#endif
