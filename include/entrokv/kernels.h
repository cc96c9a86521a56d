/*
 * kernels.h - the one dispatch header for the CPU compute kernels.
 *
 * kern_init() probes the CPU once and picks, per operation, the widest
 * instruction set available (AVX-512, AVX2, scalar). The scalar path is the
 * reference every SIMD path is tested against. Weight matrices are used in
 * place in their GGUF encoding: a matrix with n rows of k elements stores row
 * i at W + i * row_bytes(type, k).
 *
 * Quantized matmul follows ggml's scheme so results match llama.cpp closely:
 * activations are quantized per block (Q8_1 for Q4_0/Q4_1 weights, Q8_0 for
 * Q8_0 weights, Q8_K for the K-quants Q4_K/Q6_K) and the block dot products
 * are done in integers. For a given ISA, results are bit-identical across
 * thread counts and batch composition.
 */
#ifndef ENTROKV_KERNELS_H
#define ENTROKV_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/dtype.h"
#include "entrokv/status.h"
#include "entrokv/threadpool.h"

typedef enum kern_isa { KERN_ISA_SCALAR = 0, KERN_ISA_AVX2 = 1, KERN_ISA_AVX512 = 2 } kern_isa;

/* Detects the CPU and selects kernels; idempotent and thread-safe. The
 * environment variable ENTROKV_ISA=scalar|avx2|avx512 caps the choice. */
void kern_init(void);
kern_isa kern_active_isa(void);
const char *kern_isa_name(kern_isa isa);
/* Caps the ISA (tests). Returns the ISA actually selected (<= wanted). */
kern_isa kern_set_isa(kern_isa wanted);

/* True when kern_matmul supports weights of this type. */
int kern_matmul_supports(uint32_t wtype);

/* Bytes of scratch kern_matmul needs for m activation rows of k elements. */
size_t kern_matmul_scratch_bytes(uint32_t wtype, int64_t m, int64_t k);

/*
 * Y[m][n] = X[m][k] . W[n][k]^T
 *   W: row i at W + i * ldw bytes; ldw 0 means densely packed rows
 *   (row_bytes(wtype, k)). A larger ldw views k columns of a wider matrix
 *   without copying (a tensor-parallel rank's slice of a row-split weight):
 *   W then points at the slice's first block, so its first column must fall
 *   on a block boundary of the type (32 values, 256 for the K-quants).
 *   X: m rows of k floats (row stride k); Y: m rows of n floats (row stride ldy >= n).
 *   scratch: kern_matmul_scratch_bytes(wtype, m, k) bytes, 64-byte aligned.
 * Work is split over the pool's threads by weight rows; each thread keeps its
 * weight rows hot across all m activation rows (prefill is matrix-matrix).
 */
ekv_status kern_matmul(ekv_pool *pool, const void *W, uint32_t wtype, int64_t n, int64_t k,
                       size_t ldw, const float *X, int64_t m, float *Y, int64_t ldy, void *scratch,
                       ekv_error *err);

/*
 * Several matrix products of the same activations in one parallel region:
 * Y_o[m][n_o] = X[m][k] . W_o[n_o][k]^T for each op o. Decode at batch 1
 * spends microseconds per product, so waking the pool once for Q, K and V
 * (or gate and up) instead of once each saves most of the regions' cost.
 * The activations are prepared once when every op has the same weight type;
 * otherwise the ops run one kern_matmul each. Each output is bit-identical
 * to kern_matmul's for the same op (weight rows are still cut in units of
 * the kernels' row tile, at the same offsets within each weight).
 *
 * rows_done NULL: the work is the ops' weight rows one after another, cut
 * over the threads by rows (by bytes, as the types are equal). rows_done
 * set: every op has the same n, a thread takes a range of row indices in
 * every op, and when that range is done for all m rows it calls
 * rows_done(ctx, i0, i1) on that thread (fused SwiGLU: silu(gate) * up over
 * the columns [i0, i1) of every row); the ranges of one call are disjoint
 * and cover [0, n).
 *   scratch: the largest kern_matmul_scratch_bytes(ops[o].wtype, m, k), 64-byte aligned.
 */
typedef struct kern_mm_op {
    const void *w;
    uint32_t wtype;
    int64_t n;
    size_t ldw; /* 0: densely packed rows */
    float *y;
    int64_t ldy;
} kern_mm_op;
typedef void (*kern_mm_rows_fn)(void *ctx, int64_t i0, int64_t i1);
#define KERN_MM_MAX_OPS 4
ekv_status kern_matmul_multi(ekv_pool *pool, const kern_mm_op *ops, int n_ops, int64_t k,
                             const float *X, int64_t m, void *scratch, kern_mm_rows_fn rows_done,
                             void *rows_ctx, ekv_error *err);

/* Dequantizes row `row` of a matrix with k columns to floats (embeddings). */
ekv_status kern_get_row(const void *W, uint32_t wtype, int64_t k, int64_t row, float *out,
                        ekv_error *err);

/* ---- element-wise (kernels/cpu/elementwise.c) ---- */

/* out = x / rms(x) * w, over n elements. out may alias x. */
void kern_rmsnorm(float *out, const float *x, const float *w, int n, float eps);
/* Rotates pairs (x[i], x[i + d/2]) (NEOX layout) or (x[2i], x[2i+1]) (normal
 * layout, what llama uses) of one head of d elements for position pos. */
void kern_rope(float *x, int d, int n_rot, int32_t pos, float freq_base, int neox);
/* kern_rope in two steps, for the heads of one row: the (cos, sin) table of
 * n_rot floats (n_rot even, <= KERN_ROPE_MAX_DIM) for position pos, then the
 * rotation of one head by it; the same bits as kern_rope. */
#define KERN_ROPE_MAX_DIM 1024
void kern_rope_table(float *cs, int n_rot, int32_t pos, float freq_base);
void kern_rope_apply(float *x, int d, int n_rot, const float *cs, int neox);
/* g = silu(g) * u over n elements. */
void kern_swiglu(float *g, const float *u, int n);
/* x += y over n elements. */
void kern_add(float *x, const float *y, int n);

/* ---- attention over paged per-head KV (kernels/cpu/attention.c) ---- */

/*
 * One KV head's kept tokens, as the block table lists them: token t lives in
 * block b = t / block_tokens, slot r = t % block_tokens; pos[t] is the token's
 * original position (causal mask compares positions, so kept tokens may be
 * any subset of the past). K and V are fp16 with different layouts:
 *   K is transposed, [head_dim][block_tokens]: element j of token t is
 *     k_blocks[b][j * block_tokens + r], so the kernel scores a block's
 *     tokens side by side in SIMD lanes;
 *   V is by token, [block_tokens][head_dim]: v_blocks[b][r * head_dim + j].
 * Every slot of every listed block must be readable (a block's slots past
 * n_tokens are read and then ignored). The SIMD paths need block_tokens to be
 * a multiple of 16; other geometries take the scalar path.
 */
/*
 * SparK's packed keys (shared/specs/spark.md): a head's first tokens may be
 * held outside the blocks with only n_keep of their head_dim key channels.
 * Row t (row_bytes apart, kern_packed_row_bytes) is
 *   f32 m | mask: ceil(d/8) bytes, bit j set = channel j kept |
 *   signs: ceil((d - n_keep)/8) bytes, bit i = the i-th pruned channel's key
 *   was negative | padding to 2 | n_keep fp16 kept values in channel order,
 * and rebuilds as k_j (kept) or sign_j * sqrt(m / c_j) (pruned; "avg"
 * recovery, inv_sqrt_c[j] = 1 / sqrt(c_j)) or 0 (inv_sqrt_c NULL: the
 * zero-fill ablation). V and positions of those tokens are dense.
 */
typedef struct kern_kv_packed {
    int32_t n;                /* the view's first n tokens */
    int32_t n_keep;
    size_t row_bytes;
    const uint8_t *rows;      /* n rows */
    const ekv_f16 *v;         /* n x head_dim */
    const int32_t *pos;       /* n */
    const float *inv_sqrt_c;  /* head_dim; NULL: pruned channels read as 0 */
} kern_kv_packed;

size_t kern_packed_row_bytes(int32_t head_dim, int32_t n_keep);
/* Packs key k (head_dim floats) keeping the channels set in keep_mask
 * (exactly n_keep of them), with the recovery scalar m. */
void kern_packed_encode(uint8_t *row, const float *k, const uint8_t *keep_mask, float m,
                        int32_t head_dim, int32_t n_keep);
/* The key attention uses for a packed row (the reconstruction above). */
void kern_packed_decode(const uint8_t *row, int32_t head_dim, int32_t n_keep,
                        const float *inv_sqrt_c, float *k);

typedef struct kern_kv_view {
    int32_t n_tokens;
    int32_t block_tokens;
    int32_t head_dim;
    const ekv_f16 *const *k_blocks; /* head_dim x block_tokens each (transposed) */
    const ekv_f16 *const *v_blocks; /* block_tokens x head_dim each */
    const int32_t *const *pos_blocks; /* block_tokens positions each */
    /* NULL, or the first packed->n tokens are packed and token t >= packed->n
     * is token t - packed->n of the blocks. Views with packed tokens take a
     * path that rebuilds each packed key once per GQA group (AVX2/AVX-512,
     * scalar as the reference). */
    const kern_kv_packed *packed;
} kern_kv_view;

/*
 * out[q][:] = softmax(scale * Q[q] . K^T, masked to pos <= q_pos[q]) . V for
 * n_q query vectors of head_dim floats (row stride q_stride / out_stride).
 * scores: scratch of KERN_ATTN_SCRATCH(kv->n_tokens) floats. Consecutive
 * queries with the same position (the query heads of a GQA group) share
 * each K/V row load; results do not depend on that grouping.
 */
#define KERN_ATTN_GROUP_MAX 4
/* the queries kern_attention_rows scores per K/V load (the scratch's rows) */
#define KERN_ATTN_TILE_Q 6
#define KERN_ATTN_SCRATCH(n_tokens) ((size_t)KERN_ATTN_TILE_Q * (size_t)(n_tokens))
void kern_attention(const kern_kv_view *kv, const float *Q, int n_q, int q_stride,
                    const int32_t *q_pos, float scale, float *out, int out_stride, float *scores);

/*
 * Prefill (kernels/cpu/attention_rows.c): n_rows rows of one sequence, each
 * with g (<= KERN_ATTN_ROWS_MAX_G) query heads sharing this KV head. Row r's
 * head h is Q[r * row_stride + h * head_dim ...] at position row_pos[r]; its
 * output goes to the same place in out (out_stride per row). Each K and V
 * tile is loaded once for up to KERN_ATTN_TILE_Q queries across rows. The
 * result is bit-identical to kern_attention of each row's g heads (so to
 * decode). scores: KERN_ATTN_SCRATCH(kv->n_tokens) floats.
 */
#define KERN_ATTN_ROWS_MAX_G 64
void kern_attention_rows(const kern_kv_view *kv, const float *Q, int n_rows, int g,
                         int row_stride, const int32_t *row_pos, float scale, float *out,
                         int out_stride, float *scores);

/*
 * Decode attention split across threads: g (<= KERN_ATTN_GROUP_MAX) queries
 * at one position over one view, in three phases; within a phase the
 * n_parts parts are independent and may run concurrently, and each phase
 * needs the previous one complete:
 *   1. kern_attention_split_scores: part's share of the tokens (16-token
 *      tiles) into scores (g rows of kv->n_tokens), and part_max[i], the
 *      largest of query i's scores in that share (-inf if none visible);
 *   2. kern_attention_split_exp: with max[i] the largest over all parts,
 *      part's share of the tokens becomes softmax numerators;
 *   3. kern_attention_split_values: part's share of the output dimensions
 *      (16 at a time), summing the numerators itself.
 * The result is bit-identical to kern_attention (so to prefill): scores
 * and numerators are per token, the max is exact in any order, and each
 * output dimension and the softmax sum keep their token order. Only where
 * kern_attention_split_ok (AVX2 or AVX-512, no packed keys, 16 | block_tokens and
 * head_dim); elsewhere use kern_attention.
 */
bool kern_attention_split_ok(const kern_kv_view *kv, int g);
void kern_attention_split_scores(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                 int32_t qpos, float scale, float *scores, int part, int n_parts,
                                 float *part_max);
void kern_attention_split_exp(const kern_kv_view *kv, float *scores, int g, const float *max,
                              int part, int n_parts);
void kern_attention_split_values(const kern_kv_view *kv, const float *scores, int g, float *out,
                                 int out_stride, int part, int n_parts);

/*
 * What decode-time compression reads from attention (SCOPE, rolling
 * re-selection): kern_attention_probe is kern_attention that also copies,
 * per query, its scaled logits (scale * q . k, -inf where masked) and its
 * softmax probabilities (0 where masked), n_q rows of kv->n_tokens floats
 * each (query i's row at i * n_tokens; either pointer may be NULL). Both
 * come from the one pass that computes the output - the logits before the
 * softmax overwrites them, the probabilities as numerators times 1 / sum -
 * and equal the values that pass used. kern_attention is this with no
 * probe, and pays nothing for it.
 */
typedef struct kern_attn_probe {
    float *logits;
    float *probs;
} kern_attn_probe;
void kern_attention_probe(const kern_kv_view *kv, const float *Q, int n_q, int q_stride,
                          const int32_t *q_pos, float scale, float *out, int out_stride,
                          float *scores, const kern_attn_probe *pr);

#endif
