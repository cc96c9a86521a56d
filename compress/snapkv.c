/*
 * snapkv.c - SnapKV (Li et al. 2024): the same budget for every head, each
 * keeping its observation window plus the tokens the window attended to
 * most (select.c).
 */
#include "compress_internal.h"

static void snapkv_allocate(const kvc_ctx *c, int32_t *budget)
{
    for (int32_t i = 0; i < c->n_layers * c->n_kv_heads; i++)
        budget[i] = c->mean;
}

const kvc_method kvc_method_snapkv = {
    .name = "snapkv", .needs_scores = true, .allocate = snapkv_allocate,
    .select = kvc_select_snap};
