/*
 * uncomp.c - UNComp (specs/uncomp.md): heads whose queries carry more
 * information (higher truncated matrix entropy) keep more tokens.
 *
 * Per layer the KV heads form two groups, HIGH (the n/2 highest-entropy
 * heads, at least one) and LOW, with budgets in the reference's 2:1 ratio
 * (section 3 step 2: S_high = 4M/3, S_low = 2M/3 for a mean M), scaled so
 * the layer's sum is n_kv_heads * M. Selection is SnapKV's (select.c).
 *
 * Groups come from an offline profile (the reference: votes over
 * calibration text, entrokv calibrate) or, without one, from the request's
 * own prefill queries (deviation 2); online, layers also get budgets in
 * proportion to their mean entropy, clamped to [M/2, 2M].
 */
#include "compress_internal.h"

#include <stdlib.h>

/* Marks the n_high entries of e[0..n) with the highest entropy (ties to the
 * lower index). */
static void mark_high(const float *e, int32_t n, int32_t n_high, int *high)
{
    for (int32_t i = 0; i < n; i++) {
        int32_t above = 0;
        for (int32_t j = 0; j < n; j++)
            if (e[j] > e[i] || (e[j] == e[i] && j < i))
                above++;
        high[i] = above < n_high;
    }
}

/* Splits layer_total over the layer's heads, HIGH heads weighing 2. */
static void split_heads(const kvc_ctx *c, const int *high, int64_t layer_total, int32_t *out)
{
    double w[256];
    for (int32_t h = 0; h < c->n_kv_heads; h++)
        w[h] = high[h] ? 2.0 : 1.0;
    kvc_split(w, c->n_kv_heads, layer_total, 1, c->n_tokens, out);
}

static void uncomp_allocate(const kvc_ctx *c, int32_t *budget)
{
    const int32_t L = c->n_layers, HKV = c->n_kv_heads;
    const int32_t n_high = HKV / 2 > 0 ? HKV / 2 : 1;
    int32_t *layer = malloc((size_t)L * sizeof *layer);
    double *weight = malloc((size_t)L * sizeof *weight);
    int high[256];
    if (!layer || !weight || HKV > 256) {
        for (int32_t i = 0; i < L * HKV; i++)
            budget[i] = c->mean;
        goto out;
    }
    for (int32_t l = 0; l < L; l++)
        layer[l] = c->mean;
    if (!c->profile && c->kv_entropy) {
        for (int32_t l = 0; l < L; l++) {
            double s = 0;
            for (int32_t h = 0; h < HKV; h++)
                s += c->kv_entropy[l * HKV + h];
            weight[l] = s / HKV > 1e-6 ? s / HKV : 1e-6;
        }
        int32_t lo = c->mean / 2 > 0 ? c->mean / 2 : 1;
        int32_t hi = 2 * c->mean < c->n_tokens ? 2 * c->mean : c->n_tokens;
        kvc_split(weight, L, (int64_t)L * c->mean, lo, hi, layer);
    }
    for (int32_t l = 0; l < L; l++) {
        if (c->profile)
            for (int32_t h = 0; h < HKV; h++)
                high[h] = kvc_profile_is_high(c->profile, l, h);
        else if (c->kv_entropy)
            mark_high(c->kv_entropy + (size_t)l * HKV, HKV, n_high, high);
        else
            for (int32_t h = 0; h < HKV; h++)
                high[h] = 1;
        split_heads(c, high, (int64_t)HKV * layer[l], budget + (size_t)l * HKV);
    }
out:
    free(layer);
    free(weight);
}

const kvc_method kvc_method_uncomp = {
    .name = "uncomp", .needs_scores = true, .needs_entropy = true,
    .allocate = uncomp_allocate, .select = kvc_select_snap};
