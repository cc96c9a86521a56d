/*
 * kvrecall_diag.c - where recall loses attention mass (issue 20): with
 * EKV_RECALL_DIAG set in the environment, every ranking a recall store
 * runs also computes, per (layer, KV head), the exact softmax of the
 * group's queries over every token the head holds (resident and evicted)
 * and adds up what share of the mass sits on the resident tokens, on the
 * blocks the ranking recalled, on the R blocks an oracle would recall
 * (the R with the most true mass) and on all evicted blocks. The store
 * prints one JSON line per head to stderr when it is freed. Diagnostic
 * only: it reads the host copies, changes nothing and costs a full
 * attention over the evicted tokens per ranking.
 */
#include "kvrecall_int.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

bool kvrd_enabled(void)
{
    const char *e = getenv("EKV_RECALL_DIAG");
    return e && *e && strcmp(e, "0");
}

static float key_dot(const ekv_f16 *k, int32_t bt, int32_t s, const float *q, int32_t d)
{
    float acc = 0.0f;
    for (int32_t c = 0; c < d; c++)
        acc += q[c] * ekv_f16_to_f32(k[(size_t)c * bt + s]);
    return acc;
}

static int cmp_desc(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x < y) - (x > y);
}

static int cmp_desc_f(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The mass share of the evicted tokens whose group-max logit is at least
 * the n-th largest among cand (n_cand floats, sorted here). */
static float nth_largest(float *cand, int32_t n_cand, int32_t n)
{
    if (n_cand == 0)
        return INFINITY;
    qsort(cand, (size_t)n_cand, sizeof *cand, cmp_desc_f);
    return cand[(n < n_cand ? n : n_cand) - 1];
}

void kvrd_account(kv_recall *rc, rc_head *h, const float *Q, int n_q, int q_stride,
                  int32_t q_pos, const kern_kv_view *resident, const int32_t *top, int32_t n_top)
{
    if (resident->packed || h->n_blocks == 0 || n_q > 16)
        return;
    const int32_t d = rc->d, bt = rc->bt, vbt = resident->block_tokens;
    const int32_t nres = resident->n_tokens, nev = h->n_blocks * bt, nt = nres + nev;
    const int32_t want = rc->r * bt; /* the buffer's tokens */
    const float scale = 1.0f / sqrtf((float)d);
    float *lg = malloc((size_t)n_q * nt * sizeof *lg);
    float *gmax = malloc((size_t)nev * sizeof *gmax), *cand = malloc((size_t)nev * sizeof *cand);
    float *sc = malloc((size_t)h->n_blocks * sizeof *sc);
    double *bm = malloc((size_t)h->n_blocks * sizeof *bm);
    uint8_t *two = calloc((size_t)h->n_blocks, 1);
    if (!lg || !bm || !gmax || !cand || !sc || !two)
        goto out;
    float mx[16];
    for (int g = 0; g < n_q; g++) {
        const float *q = Q + (size_t)g * q_stride;
        float *l = lg + (size_t)g * nt;
        mx[g] = -INFINITY;
        for (int32_t t = 0; t < nres; t++) {
            const int32_t p = resident->pos_blocks[t / vbt][t % vbt];
            l[t] = p > q_pos ? -INFINITY
                             : scale * key_dot(resident->k_blocks[t / vbt], vbt, t % vbt, q, d);
            mx[g] = l[t] > mx[g] ? l[t] : mx[g];
        }
        for (int32_t b = 0; b < h->n_blocks; b++) {
            uint8_t *p = h->blk[b];
            for (int32_t s = 0; s < bt; s++) {
                float *x = &l[nres + b * bt + s];
                *x = !p || blk_pos(rc, p)[s] > q_pos ? -INFINITY
                                                    : scale * key_dot(blk_k(p), bt, s, q, d);
                mx[g] = *x > mx[g] ? *x : mx[g];
            }
        }
    }
    for (int32_t t = 0; t < nev; t++) {
        gmax[t] = -INFINITY;
        for (int g = 0; g < n_q; g++) {
            const float x = lg[(size_t)g * nt + nres + t];
            gmax[t] = x > gmax[t] ? x : gmax[t];
        }
    }
    /* two-stage: the 2R blocks of best score (the ranking's own), then
     * the buffer's tokens among them by group-max logit */
    {
        float qm[4096];
        int32_t sel[4096];
        if (d > 4096)
            goto out;
        for (int32_t b = 0; b < h->n_blocks; b++)
            sc[b] = -INFINITY;
        for (int g = 0; g < n_q; g++) {
            kvrb_query qq;
            kvrb_split(Q + (size_t)g * q_stride, d, rc->exact_channels, qm, sel, &qq);
            for (int32_t b = 0; b < h->n_blocks; b++) {
                const float s = h->blk[b] && h->minpos[b] <= q_pos ? kvrb_bound(rc, h, b, &qq)
                                                                   : -INFINITY;
                sc[b] = s > sc[b] ? s : sc[b];
            }
        }
        memcpy(cand, sc, (size_t)h->n_blocks * sizeof *cand);
        const float cut = nth_largest(cand, h->n_blocks, 2 * rc->r);
        for (int32_t b = 0; b < h->n_blocks; b++)
            two[b] = sc[b] >= cut && sc[b] > -INFINITY;
    }
    int32_t nc = 0;
    for (int32_t t = 0; t < nev; t++)
        if (two[t / bt] && gmax[t] > -INFINITY)
            cand[nc++] = gmax[t];
    const float cut2 = nth_largest(cand, nc, want);
    nc = 0;
    for (int32_t t = 0; t < nev; t++)
        if (gmax[t] > -INFINITY)
            cand[nc++] = gmax[t];
    const float cuto = nth_largest(cand, nc, want);
    for (int g = 0; g < n_q; g++) {
        const float *l = lg + (size_t)g * nt;
        double z = 0.0, res = 0.0, ev = 0.0, in = 0.0, orc = 0.0, tw = 0.0, to = 0.0;
        for (int32_t t = 0; t < nt; t++)
            z += l[t] == -INFINITY ? 0.0 : exp((double)l[t] - mx[g]);
        if (!(z > 0.0))
            continue;
        for (int32_t t = 0; t < nres; t++)
            res += l[t] == -INFINITY ? 0.0 : exp((double)l[t] - mx[g]) / z;
        for (int32_t b = 0; b < h->n_blocks; b++) {
            bm[b] = 0.0;
            for (int32_t s = 0; s < bt; s++) {
                const int32_t t = b * bt + s;
                const float x = l[nres + t];
                const double m = x == -INFINITY ? 0.0 : exp((double)x - mx[g]) / z;
                bm[b] += m;
                if (two[b] && gmax[t] >= cut2)
                    tw += m;
                if (gmax[t] >= cuto)
                    to += m;
            }
            ev += bm[b];
        }
        for (int32_t i = 0; i < n_top; i++)
            in += bm[top[i]];
        qsort(bm, (size_t)h->n_blocks, sizeof *bm, cmp_desc);
        for (int32_t b = 0; b < h->n_blocks && b < rc->r; b++)
            orc += bm[b];
        h->diag[0] += res / n_q;
        h->diag[1] += in / n_q;
        h->diag[2] += orc / n_q;
        h->diag[3] += ev / n_q;
        h->diag[4] += tw / n_q;
        h->diag[5] += to / n_q;
    }
    h->diag_steps++;
out:
    free(lg);
    free(gmax);
    free(cand);
    free(sc);
    free(bm);
    free(two);
}

void kvrd_print(const kv_recall *rc)
{
    for (int32_t l = 0; l < rc->n_layers; l++)
        for (int32_t k = 0; k < rc->n_kv_heads; k++) {
            const rc_head *h = &rc->heads[(size_t)l * rc->n_kv_heads + k];
            if (!h->diag_steps)
                continue;
            const double n = (double)h->diag_steps;
            fprintf(stderr,
                    "{\"recall_diag\": 1, \"layer\": %d, \"head\": %d, \"steps\": %lld, "
                    "\"r\": %d, \"blocks\": %d, \"resident\": %.5f, \"recalled\": %.5f, "
                    "\"oracle\": %.5f, \"evicted\": %.5f, \"two_stage_tokens\": %.5f, "
                    "\"oracle_tokens\": %.5f}\n",
                    l, k, (long long)h->diag_steps, rc->r, h->n_blocks, h->diag[0] / n,
                    h->diag[1] / n, h->diag[2] / n, h->diag[3] / n, h->diag[4] / n, h->diag[5] / n);
        }
}
