/*
 * budget.c - splitting a token budget over layers and heads.
 *
 * Every method that varies budgets (PyramidKV across layers, UNComp across
 * layers and heads) states its shape as weights and lets kvc_split turn them
 * into integers, so "the sum never exceeds the total the budget implies"
 * holds by construction in one place.
 */
#include "compress_internal.h"

#include <math.h>
#include <stdlib.h>

static double clampd(double x, double lo, double hi)
{
    return x < lo ? lo : x > hi ? hi : x;
}

static double filled(const double *w, int32_t n, double lambda, int32_t lo, int32_t hi)
{
    double s = 0;
    for (int32_t i = 0; i < n; i++)
        s += clampd(w[i] * lambda, lo, hi);
    return s;
}

void kvc_split(const double *weight, int32_t n, int64_t total, int32_t lo, int32_t hi,
               int32_t *out)
{
    if (n <= 0)
        return;
    int64_t target = total < (int64_t)n * hi ? total : (int64_t)n * hi;
    if (target < (int64_t)n * lo)
        target = (int64_t)n * lo;
    /* water-filling: the scale lambda at which the clamped shares add up */
    double a = 0, b = 1;
    while (filled(weight, n, b, lo, hi) < (double)target && b < 1e300)
        b *= 2;
    for (int it = 0; it < 200; it++) {
        double mid = 0.5 * (a + b);
        if (filled(weight, n, mid, lo, hi) < (double)target)
            a = mid;
        else
            b = mid;
    }
    double *frac = malloc((size_t)n * sizeof *frac);
    int64_t sum = 0;
    for (int32_t i = 0; i < n; i++) {
        double x = clampd(weight[i] * b, lo, hi);
        out[i] = (int32_t)floor(x);
        if (frac)
            frac[i] = x - out[i];
        sum += out[i];
    }
    /* largest remainder; ties to the lower index */
    while (sum < target) {
        int32_t best = -1;
        for (int32_t i = 0; i < n; i++)
            if (out[i] < hi && (best < 0 || (frac ? frac[i] > frac[best] : 0)))
                best = i;
        if (best < 0)
            break;
        out[best]++;
        if (frac)
            frac[best] = -1;
        sum++;
    }
    while (sum > target) { /* only from rounding the bisection's upper end */
        int32_t best = -1;
        for (int32_t i = 0; i < n; i++)
            if (out[i] > lo && (best < 0 || (frac ? frac[i] < frac[best] : 0)))
                best = i;
        if (best < 0)
            break;
        out[best]--;
        if (frac)
            frac[best] = 2;
        sum--;
    }
    free(frac);
}

void kvc_fill_layers(const kvc_ctx *c, const int32_t *layer_budget, int32_t *budget)
{
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int32_t h = 0; h < c->n_kv_heads; h++)
            budget[l * c->n_kv_heads + h] = layer_budget[l];
}
