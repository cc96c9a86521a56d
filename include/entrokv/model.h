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

#include "entrokv/comm.h"
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

/*
 * Tensor parallelism (model/shard.c, docs/tp.md): rank `rank` of `size`
 * owns KV heads [kv_head0, kv_head0 + n_kv_heads) with their query heads
 * [head0, head0 + n_heads), and MLP rows [ff0, ff0 + n_ff). Its KV cache
 * holds only its own KV heads, numbered from 0 (kv_seq_create with
 * n_kv_heads of the shard). size 1: the whole model.
 */
typedef struct model_shard {
    int32_t rank, size;
    int32_t kv_head0, n_kv_heads;
    int32_t head0, n_heads;
    int32_t ff0, n_ff;
} model_shard;

/* Rank `rank`'s share of m among `size` ranks; EKV_EUNSUPPORTED where the
 * model cannot be cut that way (more ranks than KV heads, or head
 * boundaries off the output projection's quantization blocks). */
ekv_status model_shard_plan(const ekv_model *m, int32_t rank, int32_t size, model_shard *s,
                            ekv_error *err);

/* n_threads <= 0: one per core. max_ctx bounds the tokens any head holds. */
ekv_runtime *model_runtime_create(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                  int n_threads, ekv_error *err);
/* A runtime for rank comm_rank(comm) of a tensor-parallel group of
 * comm_size(comm) ranks (comm borrowed; it must outlive the runtime). Every
 * rank runs model_forward on the same batch (same tokens, positions and
 * rows, each with its own sequences), in the same order; the two allreduces
 * per layer make every rank's hidden state identical. comm NULL: one rank. */
ekv_runtime *model_runtime_create_tp(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                     int n_threads, ekv_comm *comm, ekv_error *err);
const model_shard *model_runtime_shard(const ekv_runtime *rt);
/* The group's communicator; NULL for one rank. */
ekv_comm *model_runtime_comm(const ekv_runtime *rt);
void model_runtime_free(ekv_runtime *rt);
/* Where model_forward runs: "cpu", or "cuda" for a runtime from
 * model_runtime_create_cuda (model_cuda.h). */
const char *model_runtime_device(const ekv_runtime *rt);
/* Before kv_seq_free: a device runtime drops its copy of seq's KV (a new
 * sequence at the same address would otherwise be checked against it).
 * No-op on the CPU. */
void model_runtime_forget_seq(ekv_runtime *rt, const kv_seq *seq);
ekv_pool *model_runtime_pool(ekv_runtime *rt);
int32_t model_runtime_max_batch(const ekv_runtime *rt);
int32_t model_runtime_max_ctx(const ekv_runtime *rt);
const ekv_model *model_runtime_model(const ekv_runtime *rt);

/* Called by model_forward once per layer, after RoPE, with the batch's
 * query states q[n][n_heads][head_dim] (post-RoPE; under tensor
 * parallelism the rank's own n_heads of its model_shard); compression records
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
    /* Each row's sequence: seqs[i], or, when seqs is NULL, the sequence
     * seq_table[seq_ids[i]]. Ids let a tensor-parallel group share one step
     * plan (rows, ids, positions) while each rank maps the ids to its own
     * kv_seq (its heads only); an id outside the table or naming NULL is
     * EKV_EINVAL. Read a row's sequence with model_batch_seq. */
    kv_seq *const *seqs;
    const int32_t *seq_ids;
    kv_seq *const *seq_table;
    int32_t n_seq_table;
    /* Per row: nonzero to produce that row's logits. NULL: the last row only. */
    const uint8_t *want_logits;
    /* NULL or one tap for the whole batch (it sees every row). */
    const model_tap *tap;
    /* NULL or the rows whose attention decode-time compression reads. */
    const model_probe *probe;
} model_batch;

static inline kv_seq *model_batch_seq(const model_batch *b, int32_t row)
{
    return b->seqs ? b->seqs[row] : b->seq_table[b->seq_ids[row]];
}

/* Runs the batch; writes n_vocab logits per requested row, in row order
 * (logits NULL: none are computed, as on a tensor-parallel rank that does
 * not sample). On error no sequence has been modified (capacity is checked
 * up front), except when a collective fails under tensor parallelism: the
 * group is then broken (comm.h) and its sequences must be dropped. */
ekv_status model_forward(ekv_runtime *rt, const model_batch *b, float *logits, ekv_error *err);

/* A KV pool of 16-token blocks that holds n_tokens tokens in every layer and
 * KV head of this model (one sequence of n_tokens, or several shorter ones). */
kv_pool *model_kv_pool_create(const ekv_model *m, int32_t n_tokens, ekv_error *err);
/* The same for the KV heads of one shard. */
kv_pool *model_kv_pool_create_shard(const ekv_model *m, const model_shard *s, int32_t n_tokens,
                                    ekv_error *err);

/* Appends n tokens at positions pos0.. to seq, in forwards of at most the
 * runtime's max_batch rows, each with tap (may be NULL); writes the last
 * token's logits (n_vocab). */
ekv_status model_prefill(ekv_runtime *rt, kv_seq *seq, const int32_t *ids, int32_t n,
                         int32_t pos0, const model_tap *tap, float *logits, ekv_error *err);

#endif
