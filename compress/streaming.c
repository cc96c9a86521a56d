/*
 * streaming.c - StreamingLLM (Xiao et al. 2023): every head keeps the first
 * KVC_SINKS tokens (attention sinks) and the most recent ones, nothing else.
 */
#include "compress_internal.h"

static void streaming_allocate(const kvc_ctx *c, int32_t *budget)
{
    for (int32_t i = 0; i < c->n_layers * c->n_kv_heads; i++)
        budget[i] = c->mean;
}

static void streaming_select(const kvc_ctx *c, const float *scores, int32_t budget,
                             int32_t *keep, float *scratch)
{
    const int32_t sinks = KVC_SINKS < budget / 2 ? KVC_SINKS : budget / 2;
    int32_t k = 0;
    for (int32_t i = 0; i < sinks; i++)
        keep[k++] = i;
    for (int32_t i = c->n_tokens - (budget - sinks); i < c->n_tokens; i++)
        keep[k++] = i;
}

const kvc_method kvc_method_streaming = {
    .name = "streaming", .allocate = streaming_allocate, .select = streaming_select};
