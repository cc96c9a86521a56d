/*
 * pyramidkv.c - PyramidKV (Cai et al. 2024): SnapKV's selection with a
 * budget that shrinks linearly from the first layer to the last.
 *
 * The schedule is the reference's (pyramidkv_utils.py, PyramidKVCluster):
 * with B the mean budget and w the window, layer 0 keeps max_num prefix
 * tokens and layer L-1 min_num, min_num = (B - w) / beta, max_num =
 * 2 (B - w) - min_num, max_num capped at the prompt. The reference rounds
 * its step down, which can put the sum above L * B; here the schedule is a
 * set of weights that kvc_split scales to exactly L * B (docs/COMPRESSION.md).
 */
#include "compress_internal.h"

#include <stdlib.h>

static void pyramidkv_allocate(const kvc_ctx *c, int32_t *budget)
{
    const int32_t L = c->n_layers, n = c->n_tokens;
    const int32_t w = KVC_WINDOW < c->mean / 2 ? KVC_WINDOW : c->mean / 2;
    const double prefix = c->mean - w;
    double min_num = (double)((c->mean - w) / KVC_PYRAMID_BETA);
    double max_num = 2 * prefix - min_num;
    if (max_num >= n - w) {
        max_num = n - w;
        min_num = 2 * prefix - max_num;
    }
    double *weight = malloc((size_t)L * sizeof *weight);
    int32_t *layer = malloc((size_t)L * sizeof *layer);
    if (!weight || !layer) { /* fall back to SnapKV's flat budget */
        for (int32_t i = 0; i < L * c->n_kv_heads; i++)
            budget[i] = c->mean;
        goto out;
    }
    for (int32_t l = 0; l < L; l++) {
        double step = L > 1 ? (max_num - min_num) / (L - 1) : 0;
        double wl = w + max_num - l * step;
        weight[l] = wl > 1 ? wl : 1;
    }
    kvc_split(weight, L, (int64_t)L * c->mean, 1, n, layer);
    kvc_fill_layers(c, layer, budget);
out:
    free(weight);
    free(layer);
}

const kvc_method kvc_method_pyramidkv = {
    .name = "pyramidkv", .needs_scores = true, .allocate = pyramidkv_allocate,
    .select = kvc_select_snap};
