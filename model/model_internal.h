/*
 * model_internal.h - the loaded model's layout, shared by model/model.c
 * (loading, validation) and model/llama.c (forward pass). Not a public header.
 */
#ifndef ENTROKV_MODEL_INTERNAL_H
#define ENTROKV_MODEL_INTERNAL_H

#include "entrokv/model.h"

typedef struct ekv_weight {
    const void *data;
    uint32_t type;
    int64_t n_rows; /* output dimension */
    int64_t n_cols; /* input dimension (contiguous) */
    /* bytes from one row to the next; 0: dense rows. A tensor-parallel
     * rank's slice of a row-split matrix (some input columns of every row)
     * keeps the full matrix's stride (kernels.h kern_matmul). */
    size_t stride;
} ekv_weight;

typedef struct ekv_layer {
    const float *attn_norm;
    ekv_weight wq, wk, wv, wo;
    const float *ffn_norm;
    ekv_weight w_gate, w_up, w_down;
} ekv_layer;

struct ekv_model {
    ekv_model_config cfg;
    gguf_file *gguf;
    ekv_tokenizer *tok;
    ekv_weight tok_embd;
    const float *out_norm;
    ekv_weight output; /* token_embd when the embeddings are tied */
    ekv_layer *layers;
    uint64_t weight_bytes;
};

/* 16 tokens a block: the attention kernels' vector paths need a multiple of 16 */
#define MODEL_KV_BLOCK_TOKENS 16

/* out[n_layers] = the views of rank s's share of every layer (shard.c);
 * s must come from model_shard_plan for m. */
void model_shard_layers(const ekv_model *m, const model_shard *s, ekv_layer *out);

#endif
