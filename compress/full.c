/*
 * full.c - no compression: every head keeps every token. The reference the
 * other methods are measured against.
 */
#include "compress_internal.h"

static void full_allocate(const kvc_ctx *c, int32_t *budget)
{
    for (int32_t i = 0; i < c->n_layers * c->n_kv_heads; i++)
        budget[i] = c->n_tokens;
}

static void full_select(const kvc_ctx *c, const float *scores, int32_t budget, int32_t *keep,
                        float *scratch)
{
    for (int32_t i = 0; i < budget; i++)
        keep[i] = i;
}

const kvc_method kvc_method_full = {
    .name = "full", .allocate = full_allocate, .select = full_select};
