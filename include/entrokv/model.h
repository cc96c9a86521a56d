/*
 * model.h - a Llama-family model loaded from GGUF and its forward pass.
 *
 * ekv_model owns the mapped GGUF and the tokenizer; weights are used in place
 * from the mapping. An ekv_runtime holds the thread pool and the scratch a
 * forward pass needs for batches of up to max_batch rows; it is used by one
 * thread (the step engine) at a time.
 *
 * A batch is a list of rows (token, position, sequence): a prefill chunk is
 * many rows of one sequence, a decode step is one row per sequence, and mixed
 * batches are allowed. Every row's K and V are appended to its sequence's
 * cache before any row attends, and attention masks by original position, so
 * rows of the same sequence see each other causally.
 */
#ifndef ENTROKV_MODEL_H
#define ENTROKV_MODEL_H

#include <stdint.h>

#include "entrokv/gguf.h"
#include "entrokv/kvcache.h"
#include "entrokv/status.h"
#include "entrokv/threadpool.h"
#include "entrokv/tokenizer.h"

typedef struct ekv_model_config {
    char arch[32];
    char name[128];
    int32_t n_layers;
    int32_t n_embd;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t n_ff;
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t rope_dim;
    float rope_base;
    float norm_eps;
} ekv_model_config;

typedef struct ekv_model ekv_model;
typedef struct ekv_runtime ekv_runtime;

ekv_model *model_load(const char *path, ekv_error *err);
void model_free(ekv_model *m);
const ekv_model_config *model_config(const ekv_model *m);
const ekv_tokenizer *model_tokenizer(const ekv_model *m);
const gguf_file *model_gguf(const ekv_model *m);
/* Bytes of weights one decode step reads. */
uint64_t model_weight_bytes(const ekv_model *m);

/* n_threads <= 0: one per core. max_ctx bounds the tokens any head holds. */
ekv_runtime *model_runtime_create(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                  int n_threads, ekv_error *err);
void model_runtime_free(ekv_runtime *rt);
ekv_pool *model_runtime_pool(ekv_runtime *rt);
int32_t model_runtime_max_batch(const ekv_runtime *rt);
int32_t model_runtime_max_ctx(const ekv_runtime *rt);
const ekv_model *model_runtime_model(const ekv_runtime *rt);

/* Called by model_forward once per layer, after RoPE, with the batch's
 * query states q[n][n_heads][head_dim] (post-RoPE); compression records
 * what it needs from them. It must not modify anything the forward uses. */
struct model_batch;

typedef struct model_tap {
    void (*fn)(void *ctx, int32_t layer, const struct model_batch *b, const float *q);
    void *ctx;
} model_tap;

/* Decode-time compression's view of attention (SCOPE): after each layer's
 * attention, before anything else of that layer, fn is called on the
 * forward's thread once per (probed row, KV head), in row then head order,
 * with the row's G = n_heads / n_kv_heads query heads' scaled logits and
 * softmax probabilities over the head's n_tokens kept tokens ([G][n_tokens]
 * each; kernels.h kern_attn_probe). The row's attention output is already
 * computed, so fn may drop tokens of that (layer, KV head) (kv_seq_keep):
 * only later steps see the change. A probed row's sequence must have no
 * other row in the batch. */
typedef struct model_probe {
    const uint8_t *rows; /* per batch row: nonzero to probe it */
    void (*fn)(void *ctx, int32_t layer, int32_t row, int32_t kv_head, const float *logits,
               const float *probs, int32_t n_q, int32_t n_tokens);
    void *ctx;
} model_probe;

typedef struct model_batch {
    int32_t n;
    const int32_t *tokens;
    const int32_t *pos;
    kv_seq *const *seqs;
    /* Per row: nonzero to produce that row's logits. NULL: the last row only. */
    const uint8_t *want_logits;
    /* NULL or one tap for the whole batch (it sees every row). */
    const model_tap *tap;
    /* NULL or the rows whose attention decode-time compression reads. */
    const model_probe *probe;
} model_batch;

/* Runs the batch; writes n_vocab logits per requested row, in row order. On
 * error no sequence has been modified (capacity is checked up front). */
ekv_status model_forward(ekv_runtime *rt, const model_batch *b, float *logits, ekv_error *err);

/* A KV pool of 16-token blocks that holds n_tokens tokens in every layer and
 * KV head of this model (one sequence of n_tokens, or several shorter ones). */
kv_pool *model_kv_pool_create(const ekv_model *m, int32_t n_tokens, ekv_error *err);

/* Appends n tokens at positions pos0.. to seq, in forwards of at most the
 * runtime's max_batch rows, each with tap (may be NULL); writes the last
 * token's logits (n_vocab). */
ekv_status model_prefill(ekv_runtime *rt, kv_seq *seq, const int32_t *ids, int32_t n,
                         int32_t pos0, const model_tap *tap, float *logits, ekv_error *err);

#endif
