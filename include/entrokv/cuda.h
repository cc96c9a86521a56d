/*
 * cuda.h - the CUDA backend's plain-C interface (kernels/cuda/).
 *
 * Nothing here needs a CUDA header: handles are opaque and device memory is a
 * plain pointer the caller must not dereference on the host. Every function
 * that touches the device returns an ekv_status and fills an ekv_error with
 * the CUDA / cuBLAS / cuSOLVER message; none aborts. Work is queued on the
 * context's stream and is asynchronous unless the comment says otherwise:
 * call ekv_cuda_sync() before reading results on the host.
 *
 * Each kernel has a plain C reference of the same operation (the CPU
 * backend's function where one exists, otherwise in kernels/cuda/reference.c)
 * and a test in tests/cuda/ comparing them; docs/cuda.md lists them.
 *
 * Without a device (or in a build without CUDA, see EKV_HAVE_CUDA)
 * ekv_cuda_available() is false and ekv_cuda_create() fails with
 * EKV_EUNSUPPORTED.
 */
#ifndef ENTROKV_CUDA_H
#define ENTROKV_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The C headers below are included with C linkage from the .cu files too. */
#ifdef __cplusplus
extern "C" {
#endif

#include "entrokv/dtype.h"
#include "entrokv/kernels.h"
#include "entrokv/status.h"

/* ---- device, stream and library handles (kernels/cuda/device.cu) ---- */

/* A device, one stream on it and the cuBLAS / cuSOLVER handles bound to that
 * stream. Two contexts on one device give two streams (e.g. compute and KV
 * copies). Owned by the caller; not thread-safe. */
typedef struct ekv_cuda ekv_cuda;

/* True when at least one CUDA device is usable; never crashes or prints. */
bool ekv_cuda_available(void);
/* Why ekv_cuda_available() is false, in CUDA's words ("" when it is true):
 * no device, no driver, or a driver older than this build's runtime. */
const char *ekv_cuda_unavailable_reason(void);

typedef struct ekv_cuda_info {
    char name[256];
    int sm_count;
    int cc_major, cc_minor;
    size_t total_mem;
    double hbm_gbps; /* peak, from memory clock x bus width (0 if unknown) */
} ekv_cuda_info;

ekv_status ekv_cuda_create(int device, ekv_cuda **out, ekv_error *err);
void ekv_cuda_destroy(ekv_cuda *ctx); /* NULL is a no-op */
ekv_status ekv_cuda_get_info(const ekv_cuda *ctx, ekv_cuda_info *info, ekv_error *err);
/* Waits for everything queued on the context's stream; reports the first
 * asynchronous kernel error. */
ekv_status ekv_cuda_sync(ekv_cuda *ctx, ekv_error *err);

/* Device memory (cudaMalloc) and pinned host memory (cudaHostAlloc, mapped,
 * usable by kernels directly: the KV store tier's host buffers). */
ekv_status ekv_cuda_malloc(ekv_cuda *ctx, size_t bytes, void **dptr, ekv_error *err);
void ekv_cuda_free(void *dptr);
ekv_status ekv_cuda_host_alloc(size_t bytes, void **hptr, ekv_error *err);
void ekv_cuda_host_free(void *hptr);
/* Copies on the context's stream; to_host / to_device wait for the copy to
 * finish (the host buffer may be reused at once). */
ekv_status ekv_cuda_to_device(ekv_cuda *ctx, void *dst, const void *src, size_t bytes,
                              ekv_error *err);
ekv_status ekv_cuda_to_host(ekv_cuda *ctx, void *dst, const void *src, size_t bytes,
                            ekv_error *err);
ekv_status ekv_cuda_memset(ekv_cuda *ctx, void *dptr, int value, size_t bytes, ekv_error *err);

/* Device-side timing: start/stop events on the context's stream. */
ekv_status ekv_cuda_timer_start(ekv_cuda *ctx, ekv_error *err);
/* Milliseconds since ekv_cuda_timer_start; waits for the stream. */
ekv_status ekv_cuda_timer_stop(ekv_cuda *ctx, double *ms, ekv_error *err);

/* ---- weights and GEMM (kernels/cuda/weights.cu) ---- */

/* True when ekv_cuda_dequantize supports the GGUF type. */
bool ekv_cuda_dequant_supports(uint32_t type);
/* Dequantizes n_rows rows of k elements (GGUF encoding, on the device at src)
 * to fp16 at dst (n_rows * k halves). */
ekv_status ekv_cuda_dequantize(ekv_cuda *ctx, const void *src, uint32_t type, int64_t n_rows,
                               int64_t k, ekv_f16 *dst, ekv_error *err);
/* Uploads a host GGUF matrix [n][k] and dequantizes it once to a new fp16
 * device matrix (*out, free with ekv_cuda_free). Waits for completion. */
ekv_status ekv_cuda_upload_weight(ekv_cuda *ctx, const void *W, uint32_t type, int64_t n,
                                  int64_t k, ekv_f16 **out, ekv_error *err);
/* Y[m][n] (fp32, row stride ldy) = X[m][k] (fp16) . W[n][k]^T (fp16), fp32
 * accumulation (cublasGemmEx). m = 1 is the decode GEMV. */
ekv_status ekv_cuda_matmul(ekv_cuda *ctx, const ekv_f16 *W, int64_t n, int64_t k,
                           const ekv_f16 *X, int64_t m, float *Y, int64_t ldy, ekv_error *err);
/* dst[i] = fp16(src[i]), n elements (activations into the GEMM). */
ekv_status ekv_cuda_f32_to_f16(ekv_cuda *ctx, const float *src, ekv_f16 *dst, int64_t n,
                               ekv_error *err);

/* ---- element-wise (kernels/cuda/elementwise.cu) ---- */

/* Row-wise kern_rmsnorm over n_rows rows of n floats. out may alias x. */
ekv_status ekv_cuda_rmsnorm(ekv_cuda *ctx, float *out, const float *x, const float *w,
                            int64_t n_rows, int n, float eps, ekv_error *err);
/* kern_rope on x[t][h][:] (n_tok rows of n_heads heads of d floats) at
 * position pos[t]. */
ekv_status ekv_cuda_rope(ekv_cuda *ctx, float *x, int n_tok, int n_heads, int d, int n_rot,
                         const int32_t *pos, float freq_base, int neox, ekv_error *err);
/* kern_swiglu: g = silu(g) * u over n floats. */
ekv_status ekv_cuda_swiglu(ekv_cuda *ctx, float *g, const float *u, int64_t n, ekv_error *err);
/* out[i][:] = table[tokens[i]][:] widened to fp32 (dim halves per row);
 * a token outside [0, n_vocab) gives a zero row. */
ekv_status ekv_cuda_embed(ekv_cuda *ctx, const ekv_f16 *table, int64_t n_vocab, int dim,
                          const int32_t *tokens, int n, float *out, ekv_error *err);

/* ---- sampling (kernels/cuda/sample.cu) ---- */

/* out[r] = index of the largest of logits[r][0..n_vocab) (first on ties). */
ekv_status ekv_cuda_argmax(ekv_cuda *ctx, const float *logits, int n_rows, int n_vocab,
                           int32_t *out, ekv_error *err);
/*
 * Top-k / top-p sampling, one row per sequence: p = softmax(logits / temp);
 * keep the top_k largest (0 = all), then the smallest set of the largest
 * whose mass reaches top_p (1 = all), ties at the threshold kept; draw with
 * the uniform u[r] in [0, 1) by walking the kept tokens in index order.
 * temp <= 0 is greedy. ekv_cuda_sample_ref is the C reference.
 */
ekv_status ekv_cuda_sample(ekv_cuda *ctx, const float *logits, int n_rows, int n_vocab,
                           float temp, int top_k, float top_p, const float *u, int32_t *out,
                           ekv_error *err);

/* ---- attention (kernels/cuda/prefill.cu, kernels/cuda/decode.cu) ---- */

/*
 * Causal prefill over contiguous fp16 K/V: Q[i][h][:] (fp32, n_q rows of
 * n_heads heads of d) at position q_off + i attends keys 0..q_off + i of
 * K/V[t][kv][:] (n_kv rows of n_kv_heads heads), kv head = h / (n_heads /
 * n_kv_heads). out like Q. Tiled with an online softmax: never N x N.
 * lse (optional, n_q * n_heads floats): each row's log-sum-exp of scaled
 * scores (-inf for a row that sees nothing).
 */
ekv_status ekv_cuda_prefill_attention(ekv_cuda *ctx, const float *Q, int n_q, int n_heads,
                                      const ekv_f16 *K, const ekv_f16 *V, int n_kv, int n_kv_heads,
                                      int d, int q_off, float scale, float *out, float *lse,
                                      ekv_error *err);

/* ---- the device KV block pool (kernels/cuda/kvpool.cu) ---- */

/*
 * Blocks laid out exactly as kv/kvcache.c's: block_tokens x head_dim fp16
 * K transposed ([head_dim][block_tokens]), then V rows ([block_tokens]
 * [head_dim]), then block_tokens int32 positions, each block rounded up to 64
 * bytes. Ids are handed out by a host-side free stack (0, 1, 2, ... first).
 */
typedef struct ekv_cuda_kv_pool ekv_cuda_kv_pool;

ekv_status ekv_cuda_kv_pool_create(ekv_cuda *ctx, int32_t block_tokens, int32_t head_dim,
                                   int64_t n_blocks, ekv_cuda_kv_pool **out, ekv_error *err);
void ekv_cuda_kv_pool_destroy(ekv_cuda_kv_pool *pool);
size_t ekv_cuda_kv_block_bytes(const ekv_cuda_kv_pool *pool);
int64_t ekv_cuda_kv_free_blocks(const ekv_cuda_kv_pool *pool);
/* Takes n ids (EKV_ENOMEM, nothing taken, when fewer are free) / returns them. */
ekv_status ekv_cuda_kv_alloc(ekv_cuda_kv_pool *pool, int32_t n, int32_t *ids, ekv_error *err);
void ekv_cuda_kv_release(ekv_cuda_kv_pool *pool, const int32_t *ids, int32_t n);
/* Copies a host head (a kern_kv_view of the same geometry, e.g. from
 * kv_seq_view) into newly taken blocks; ids receives ceil(n / block_tokens)
 * of them. Slots past n_tokens are zero with position INT32_MAX. Waits. */
ekv_status ekv_cuda_kv_upload_view(ekv_cuda_kv_pool *pool, const kern_kv_view *view,
                                   int32_t *ids, ekv_error *err);
/* (A view with SparK's packed tokens is EKV_EUNSUPPORTED here: its keys
 * have no block layout; ekv_cuda_kv_upload_packed takes it.) */
/* Copies block `id` to host: k (head_dim * bt), v (bt * head_dim), pos (bt). Waits. */
ekv_status ekv_cuda_kv_download_block(ekv_cuda_kv_pool *pool, int32_t id, ekv_f16 *k,
                                      ekv_f16 *v, int32_t *pos, ekv_error *err);
/* Device address of the pool's first block (blocks are block_bytes apart). */
void *ekv_cuda_kv_base(const ekv_cuda_kv_pool *pool);

/*
 * A batch of heads (one per (sequence, KV head) of one layer), all device
 * arrays: head i has n_tokens[i] tokens in blocks table[table_off[i] ..].
 */
typedef struct ekv_cuda_kv_heads {
    int32_t n_heads;
    const int32_t *table;     /* block ids, concatenated */
    const int32_t *table_off; /* [n_heads] */
    const int32_t *n_tokens;  /* [n_heads] */
} ekv_cuda_kv_heads;

/* Copies n blocks (ids on the device) to / from a contiguous buffer of
 * n * block_bytes (device memory or ekv_cuda_host_alloc'd pinned memory):
 * the KV store tier's evict and restore. Asynchronous on ctx's stream. */
ekv_status ekv_cuda_kv_gather(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const int32_t *ids, int32_t n,
                              void *dst, ekv_error *err);
ekv_status ekv_cuda_kv_scatter(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const int32_t *ids,
                               int32_t n, const void *src, ekv_error *err);

/*
 * Compaction: for each head i, keeps the tokens keep[keep_off[i] ..
 * keep_off[i] + n_keep[i]) (increasing indices into the head, device arrays)
 * by copying them, in order and with their positions, into the blocks
 * dst_table[dst_off[i] ..] (ceil(n_keep / bt) fresh blocks per head). The
 * caller then releases the source blocks. Out of place, so heads compact in
 * parallel without read/write races.
 */
ekv_status ekv_cuda_kv_compact(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const ekv_cuda_kv_heads *src,
                               const int32_t *keep, const int32_t *keep_off,
                               const int32_t *n_keep, const int32_t *dst_table,
                               const int32_t *dst_off, int32_t max_keep, ekv_error *err);

/*
 * Decode attention over paged KV (flash-decoding): heads lists n_seq *
 * n_kv_heads heads, head s * n_kv_heads + kv for sequence s. Q[s][h][:] (fp32,
 * n_q_heads heads of d) at position q_pos[s] attends the tokens of its KV
 * head (h / group) whose stored position is <= q_pos[s]; out like Q; a query
 * that sees nothing gets zeros. max_tokens bounds every n_tokens (host
 * value: it sizes the grid). group = n_q_heads / n_kv_heads <= 8, d in {64,
 * 128, 256}. workspace: ekv_cuda_decode_workspace bytes of device memory.
 */
size_t ekv_cuda_decode_workspace(int n_seq, int n_kv_heads, int n_q_heads, int d,
                                 int32_t max_tokens);
ekv_status ekv_cuda_decode_attention(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                     const ekv_cuda_kv_heads *heads, int n_seq, int n_kv_heads,
                                     int n_q_heads, const float *Q, const int32_t *q_pos,
                                     int32_t max_tokens, float scale, float *out,
                                     void *workspace, ekv_error *err);
/* Tokens per split; 0 restores the default (chosen from the grid size). Tests. */
void ekv_cuda_decode_set_split(int32_t tokens);
/* Head_dim 64 / 128 use tensor cores (mma.sync); on = the CUDA-core kernel
 * (head_dim 256's) for them too. Tests and the benchmark compare the two. */
void ekv_cuda_decode_force_simt(bool on);
/* Pool blocks each warp of the tensor-core kernel holds in shared memory
 * (2..4: 1..3 in flight while one is scored); 0 restores the default (2,
 * or 4 for heads of 16k tokens or more). The benchmark's --sweep compares
 * them. */
void ekv_cuda_decode_set_stages(int stages);
/* Thread blocks per SM the last decode launch could keep resident. */
int ekv_cuda_decode_blocks_per_sm(void);

/* ---- SparK's packed keys (kernels/cuda/spark.cu) ---- */

/*
 * A head's packed prefix on the device: kern_kv_packed (kernels.h) with
 * device pointers, the same bytes (rows of row_bytes, V n x head_dim fp16,
 * positions, 1/sqrt(c_j)), in one allocation (mem). inv_sqrt_c NULL is the
 * zero-fill ablation; n = 0: the head has no packed tokens. The decode
 * kernel reads a device array of these, one per head, copied as they are.
 */
typedef struct ekv_cuda_packed_head {
    int32_t n, n_keep;
    int32_t row_bytes;
    int32_t reserved;
    const uint8_t *rows;
    const ekv_f16 *v;
    const int32_t *pos;
    const float *inv_sqrt_c;
    void *mem; /* owned: ekv_cuda_packed_free */
} ekv_cuda_packed_head;

/* Uploads a host head whose first tokens may be packed (a kern_kv_view from
 * kv_seq_view after kv_seq_pack): the packed prefix into a new device
 * allocation described by *ph, and the tokens after it into newly taken
 * pool blocks as ekv_cuda_kv_upload_view does (ids receives
 * ceil((n_tokens - packed->n) / block_tokens) of them). A view without
 * packed tokens gives ph->n = 0. EKV_EINVAL for a geometry other than the
 * pool's or a malformed packed prefix; nothing is held on error. Waits. */
ekv_status ekv_cuda_kv_upload_packed(ekv_cuda_kv_pool *pool, const kern_kv_view *view,
                                     ekv_cuda_packed_head *ph, int32_t *ids, ekv_error *err);
void ekv_cuda_packed_free(ekv_cuda_packed_head *ph); /* frees ph->mem, zeroes *ph */

/*
 * ekv_cuda_decode_attention over heads whose first packed[i].n tokens are
 * packed (packed: device array of heads->n_heads): head i has n_tokens[i]
 * tokens in all, the packed ones first, then n_tokens[i] - packed[i].n in
 * its blocks. Each packed key is rebuilt inside the kernel as the CPU's
 * kern_attend_packed rebuilds it (kept channels, sign_j sqrt(m / c_j) or
 * 0). group <= 8, head_dim 64 / 128 / 256, any block_tokens; workspace:
 * ekv_cuda_decode_workspace bytes. CUDA cores only.
 */
ekv_status ekv_cuda_decode_packed(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                  const ekv_cuda_kv_heads *heads,
                                  const ekv_cuda_packed_head *packed, int n_seq, int n_kv_heads,
                                  int n_q_heads, const float *Q, const int32_t *q_pos,
                                  int32_t max_tokens, float scale, float *out, void *workspace,
                                  ekv_error *err);

/* ---- compression (kernels/cuda/window.cu, kernels/cuda/entropy.cu,
 *      kernels/cuda/select.cu) ---- */

/*
 * Observation-window scores (kvc_window_scores) for each head of a batch:
 * scores[score_off[i] + t] = sum over the window's rows r < n_window and the
 * group's query heads of softmax_t(q . k_t * scale), masked by position.
 * wq[i][r][g][:] (fp32, device): the window's queries of head i's group,
 * n_window * n_group * d floats per head; q_pos[i * n_window + r]. Two small
 * kernels: one pass for each row's max and sum, one to sum probabilities.
 */
ekv_status ekv_cuda_window_scores(ekv_cuda *ctx, const ekv_cuda_kv_pool *pool,
                                  const ekv_cuda_kv_heads *heads, const float *wq, int n_window,
                                  int n_group, const int32_t *q_pos, int32_t max_tokens,
                                  const int32_t *score_off, float *scores, void *workspace,
                                  ekv_error *err);
/* Workspace bytes of ekv_cuda_window_scores. */
size_t ekv_cuda_window_workspace(int n_heads, int n_window, int n_group);

/*
 * Truncated matrix entropy (kvc_gram_add + kvc_entropy) of n_heads heads,
 * each n rows of d floats (rows[h][t][:], device): rows centred and
 * normalised, Gram by cuBLAS, eigenvalues by cuSOLVER (syevjBatched for
 * d <= 32, XsyevBatched above), top k. entropy[h] (device, double) is NaN
 * for a head whose Gram is zero (n < 2 or identical rows) - the CPU's
 * EKV_EINVAL. Waits for completion.
 */
ekv_status ekv_cuda_entropy(ekv_cuda *ctx, const float *rows, int n_heads, int n, int d, int k,
                            double *entropy, ekv_error *err);

/*
 * SnapKV's selection (kvc_select_snap) per head: keep[keep_off[i] ..] gets
 * budget[i] increasing indices into head i's n_tokens[i] scores
 * (scores[score_off[i] ..]); budget in [1, n_tokens] (0 tokens: nothing).
 * Exactly the CPU's choice: max-pool 7, ties to the lower index.
 * workspace: ekv_cuda_select_workspace(total tokens) bytes.
 */
size_t ekv_cuda_select_workspace(int64_t total_tokens);
ekv_status ekv_cuda_select_snap(ekv_cuda *ctx, int n_heads, const float *scores,
                                const int32_t *score_off, const int32_t *n_tokens,
                                const int32_t *budget, int32_t *keep, const int32_t *keep_off,
                                void *workspace, ekv_error *err);

/* ---- the forward pass's glue (kernels/cuda/forward.cu) ---- */

/* x[i] += y[i], n floats (the residual add; kern_add). */
ekv_status ekv_cuda_add(ekv_cuda *ctx, float *x, const float *y, int64_t n, ekv_error *err);
/*
 * Appends K and V rows into the pool as kv_seq_append does: item i = row *
 * n_kv_heads + head of k / v (fp32, head_dim each, rounded to fp16) goes to
 * token slot slot[i] = block id * block_tokens + index in the block, with
 * position pos[row] (slot < 0: skipped). Device arrays; the caller owns the
 * blocks and the per-head lengths.
 */
ekv_status ekv_cuda_kv_append(ekv_cuda *ctx, ekv_cuda_kv_pool *pool, const float *k,
                              const float *v, int n_rows, int n_kv_heads, const int32_t *slot,
                              const int32_t *pos, ekv_error *err);
/* dst[i][:] = src[rows[i]][:], n rows of width floats (rows on the device). */
ekv_status ekv_cuda_gather_rows(ekv_cuda *ctx, float *dst, const float *src, const int32_t *rows,
                                int n, int width, ekv_error *err);

/* ---- C references (kernels/cuda/reference.c) ---- */

/* The sampling rule of ekv_cuda_sample for one row, on the host. */
int32_t ekv_cuda_sample_ref(const float *logits, int n_vocab, float temp, int top_k, float top_p,
                            float u);

#ifdef __cplusplus
}
#endif

#endif
