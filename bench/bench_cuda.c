/*
 * bench_cuda.c - `entrokv bench cuda-attention`: the CUDA decode attention
 * kernel alone in Llama-3.1-8B shapes (32 query heads, 8 KV heads, head_dim
 * 128, fp16 paged KV), at several contexts and batch sizes, with full KV and
 * with a 10% per-head budget split UNComp-like (half the heads keep twice
 * what the other half keeps: ragged lengths). Reported as bytes/s against
 * the device's HBM peak, and in the same run against torch's
 * scaled_dot_product_attention on the full-KV shapes (bench/torch_sdpa_ref.py,
 * skipped with a note without torch). A second section times one layer's
 * compression work (window scores, entropy, selection) against that layer's
 * prefill attention. A third times whole decode steps of a random-weight
 * Llama-3.1-8B (fp16, 32 layers, cuBLAS GEMMs + these kernels): tokens/s,
 * full KV vs 10%. The cuda-spark lines (bench_cuda_spark.c) time decode over
 * SparK's packed keys against the dense kernel's time on the same shapes. One JSON line per measurement on stdout (--json), a human
 * summary on stderr.
 *
 * Built only with EKV_HAVE_CUDA (cmake/cuda.cmake).
 */
#ifdef EKV_HAVE_CUDA
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "entrokv/cuda.h"

#ifndef EKV_SOURCE_DIR
#define EKV_SOURCE_DIR "."
#endif

#define MAX_LIST 8
#define N_Q 32
#define N_KV 8
#define HEAD_D 128

typedef struct cuda_opts {
    int32_t contexts[MAX_LIST], batches[MAX_LIST];
    int n_contexts, n_batches;
    int32_t iters;
    float hbm_gbps, budget;
    bool json, reference, compress, step, sweep, spark;
    const char *python, *ref_script;
} cuda_opts;

typedef struct run_result {
    double ms, gbps;
    int64_t bytes;
    int per_sm; /* decode thread blocks resident per SM */
} run_result;

/* bench_cuda_spark.c: the cuda-spark lines; dense_ms[ci * stride + bi] is
 * the dense kernel's time on each shape (0 where it failed). */
int bench_cuda_spark(ekv_cuda *ctx, const char *device, double hbm, const int32_t *contexts,
                     int n_contexts, const int32_t *batches, int n_batches, int32_t iters,
                     bool json, const double *dense_ms, int stride);

static int parse_list(const char *s, int32_t *out, int *n)
{
    *n = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > (1 << 20) || *n == MAX_LIST || (*end && *end != ','))
            return -1;
        out[(*n)++] = (int32_t)v;
        s = *end ? end + 1 : end;
    }
    return *n ? 0 : -1;
}

static int parse(int argc, char **argv, cuda_opts *o)
{
    memset(o, 0, sizeof *o);
    parse_list("4096,32768", o->contexts, &o->n_contexts);
    parse_list("1,16,64", o->batches, &o->n_batches);
    o->iters = 20;
    o->budget = 0.1f;
    o->reference = o->compress = o->step = o->spark = true;
    o->python = "python3";
    o->ref_script = EKV_SOURCE_DIR "/bench/torch_sdpa_ref.py";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (!strcmp(a, "--json"))
            o->json = true;
        else if (!strcmp(a, "--no-reference"))
            o->reference = false;
        else if (!strcmp(a, "--no-compress"))
            o->compress = false;
        else if (!strcmp(a, "--no-step"))
            o->step = false;
        else if (!strcmp(a, "--no-spark"))
            o->spark = false;
        else if (!strcmp(a, "--sweep"))
            o->sweep = true;
        else if (!strcmp(a, "--iters")) {
            if (!cli_take_int(argc, argv, &i, 1, 100000, &o->iters))
                return CLI_USAGE;
        } else if (!strcmp(a, "--hbm-gbps")) {
            if (!cli_take_float(argc, argv, &i, 1, 1e6, &o->hbm_gbps))
                return CLI_USAGE;
        } else if (!strcmp(a, "--budget")) {
            if (!cli_take_float(argc, argv, &i, 0.001, 1, &o->budget))
                return CLI_USAGE;
        } else if (!strcmp(a, "--python")) {
            if (!cli_take_str(argc, argv, &i, &o->python))
                return CLI_USAGE;
        } else if (!strcmp(a, "--ref-script")) {
            if (!cli_take_str(argc, argv, &i, &o->ref_script))
                return CLI_USAGE;
        } else if (!strcmp(a, "--contexts") || !strcmp(a, "--batches")) {
            const bool ctx = !strcmp(a, "--contexts");
            if (!cli_take_str(argc, argv, &i, &v) ||
                parse_list(v, ctx ? o->contexts : o->batches, ctx ? &o->n_contexts : &o->n_batches)) {
                fprintf(stderr, "entrokv bench: %s expects a list like 1,16,64\n", a);
                return CLI_USAGE;
            }
        } else {
            fprintf(stderr, "entrokv bench: unknown flag '%s'\n", a);
            return CLI_USAGE;
        }
    }
    return 0;
}

/* Tokens of head (s, h): the full context, or the budget split 2:1 between
 * alternating heads (HIGH keeps 4/3 of the mean, LOW 2/3). */
static int32_t head_len(int32_t ctx, float budget, int s, int h)
{
    if (budget >= 1.0f)
        return ctx;
    const double mean = (double)ctx * budget;
    const double len = (s + h) % 2 ? mean * 4.0 / 3.0 : mean * 2.0 / 3.0;
    const int32_t n = (int32_t)llround(len);
    return n < 1 ? 1 : n > ctx ? ctx : n;
}

/* Device arrays a decode run reads. */
typedef struct decode_setup {
    ekv_cuda_kv_pool *pool;
    ekv_cuda_kv_heads heads;
    float *q, *out;
    int32_t *qpos;
    void *ws;
    int32_t max_len;
    int64_t bytes;
} decode_setup;

static void setup_free(decode_setup *s)
{
    ekv_cuda_kv_pool_destroy(s->pool);
    ekv_cuda_free((void *)s->heads.table);
    ekv_cuda_free((void *)s->heads.table_off);
    ekv_cuda_free((void *)s->heads.n_tokens);
    ekv_cuda_free(s->q);
    ekv_cuda_free(s->out);
    ekv_cuda_free(s->qpos);
    ekv_cuda_free(s->ws);
    memset(s, 0, sizeof *s);
}

static void *upload(ekv_cuda *ctx, const void *src, size_t bytes, ekv_status *rc, ekv_error *err)
{
    void *d = NULL;
    if (*rc == EKV_OK)
        *rc = ekv_cuda_malloc(ctx, bytes, &d, err);
    if (*rc == EKV_OK && src)
        *rc = ekv_cuda_to_device(ctx, d, src, bytes, err);
    return d;
}

static bool g_contiguous; /* --sweep: each head's blocks in pool order instead */

/* Pool blocks handed to heads in a shuffled order, as a long-running pool's
 * free list would; K, V zero and every position 0 (all visible). */
static ekv_status setup_decode(ekv_cuda *ctx, int32_t context, int batch, float budget,
                               decode_setup *s, ekv_error *err)
{
    const int H = batch * N_KV;
    int32_t *off = malloc((size_t)H * 4), *len = malloc((size_t)H * 4), *table = NULL;
    float *q = malloc((size_t)batch * N_Q * HEAD_D * 4);
    int32_t *qpos = malloc((size_t)batch * 4);
    ekv_status rc = off && len && q && qpos ? EKV_OK : ekv_error_set(err, EKV_ENOMEM, "bench: out of memory");
    int64_t blocks = 0;
    memset(s, 0, sizeof *s);
    for (int i = 0; rc == EKV_OK && i < H; i++) {
        len[i] = head_len(context, budget, i / N_KV, i % N_KV);
        off[i] = (int32_t)blocks;
        blocks += (len[i] + 15) / 16;
        s->bytes += (int64_t)len[i] * (2 * HEAD_D * 2 + 4);
        s->max_len = len[i] > s->max_len ? len[i] : s->max_len;
    }
    if (rc == EKV_OK && !(table = malloc((size_t)blocks * 4)))
        rc = ekv_error_set(err, EKV_ENOMEM, "bench: out of memory");
    if (rc == EKV_OK) {
        uint64_t x = 88172645463325252ull;
        for (int64_t i = 0; i < blocks; i++)
            table[i] = (int32_t)i;
        for (int64_t i = blocks - 1; i > 0 && !g_contiguous; i--) { /* Fisher-Yates, xorshift */
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            const int64_t j = (int64_t)(x % (uint64_t)(i + 1));
            const int32_t t = table[i];
            table[i] = table[j];
            table[j] = t;
        }
        for (int i = 0; i < batch * N_Q * HEAD_D; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            q[i] = (float)(x % 2001) / 1000.0f - 1.0f;
        }
        for (int b = 0; b < batch; b++)
            qpos[b] = context;
        rc = ekv_cuda_kv_pool_create(ctx, 16, HEAD_D, blocks, &s->pool, err);
    }
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, ekv_cuda_kv_base(s->pool), 0,
                             (size_t)blocks * ekv_cuda_kv_block_bytes(s->pool), err);
    s->heads.n_heads = H;
    s->heads.table = upload(ctx, table, (size_t)blocks * 4, &rc, err);
    s->heads.table_off = upload(ctx, off, (size_t)H * 4, &rc, err);
    s->heads.n_tokens = upload(ctx, len, (size_t)H * 4, &rc, err);
    s->q = upload(ctx, q, (size_t)batch * N_Q * HEAD_D * 4, &rc, err);
    s->out = upload(ctx, NULL, (size_t)batch * N_Q * HEAD_D * 4, &rc, err);
    s->qpos = upload(ctx, qpos, (size_t)batch * 4, &rc, err);
    s->ws = upload(ctx, NULL, ekv_cuda_decode_workspace(batch, N_KV, N_Q, HEAD_D, s->max_len), &rc, err);
    free(off);
    free(len);
    free(table);
    free(q);
    free(qpos);
    if (rc != EKV_OK)
        setup_free(s);
    return rc;
}

static ekv_status time_decode(ekv_cuda *ctx, const cuda_opts *o, int32_t context, int batch,
                              float budget, run_result *r, ekv_error *err)
{
    decode_setup s;
    ekv_status rc = setup_decode(ctx, context, batch, budget, &s, err);
    const float scale = 1.0f / sqrtf((float)HEAD_D);
    for (int i = 0; rc == EKV_OK && i < 3; i++) /* warm-up */
        rc = ekv_cuda_decode_attention(ctx, s.pool, &s.heads, batch, N_KV, N_Q, s.q, s.qpos,
                                       s.max_len, scale, s.out, s.ws, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_start(ctx, err);
    for (int i = 0; rc == EKV_OK && i < o->iters; i++)
        rc = ekv_cuda_decode_attention(ctx, s.pool, &s.heads, batch, N_KV, N_Q, s.q, s.qpos,
                                       s.max_len, scale, s.out, s.ws, err);
    double ms = 0;
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &ms, err);
    r->ms = ms / o->iters;
    r->bytes = s.bytes;
    r->per_sm = ekv_cuda_decode_blocks_per_sm();
    r->gbps = r->ms > 0 ? (double)s.bytes / (r->ms * 1e-3) / 1e9 : 0;
    if (s.pool)
        setup_free(&s);
    return rc;
}

/* ---- one layer's compression work against its prefill attention ---- */

typedef struct compress_result {
    double prefill_ms, window_ms, entropy_ms, select_ms;
} compress_result;

static ekv_status time_compress(ekv_cuda *ctx, int32_t context, float budget, compress_result *r,
                                ekv_error *err)
{
    const int W = 8, G = N_Q / N_KV, n = context;
    ekv_status rc = EKV_OK;
    /* random queries: the eigen-solver's work depends on the spectrum */
    const size_t qn = (size_t)n * N_Q * HEAD_D;
    float *hq = malloc(qn * sizeof *hq);
    if (!hq)
        return ekv_error_set(err, EKV_ENOMEM, "bench: out of memory");
    uint64_t x = 0x2545F4914F6CDD1Dull;
    for (size_t i = 0; i < qn; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        hq[i] = (float)(x >> 40) / 8388608.0f - 1.0f;
    }
    float *q = upload(ctx, hq, qn * 4, &rc, err);
    free(hq);
    float *out = upload(ctx, NULL, (size_t)n * N_Q * HEAD_D * 4, &rc, err);
    void *k = upload(ctx, NULL, (size_t)n * N_KV * HEAD_D * 2, &rc, err);
    void *v = upload(ctx, NULL, (size_t)n * N_KV * HEAD_D * 2, &rc, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, k, 0, (size_t)n * N_KV * HEAD_D * 2, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, v, 0, (size_t)n * N_KV * HEAD_D * 2, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_start(ctx, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_prefill_attention(ctx, q, n, N_Q, k, v, n, N_KV, HEAD_D, 0,
                                        1.0f / sqrtf((float)HEAD_D), out, NULL, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &r->prefill_ms, err);
    ekv_cuda_free(out);
    ekv_cuda_free(k);
    ekv_cuda_free(v);
    /* window scores over the paged heads of one sequence (full length) */
    decode_setup s;
    memset(&s, 0, sizeof s); /* read below even when an earlier step failed */
    if (rc == EKV_OK)
        rc = setup_decode(ctx, context, 1, 1.0f, &s, err);
    int32_t soff[N_KV], koff[N_KV], budg[N_KV], lens[N_KV], qp[N_KV * 8];
    for (int h = 0; h < N_KV; h++) {
        soff[h] = h * n;
        lens[h] = n;
        budg[h] = head_len(n, budget, 0, h);
        koff[h] = h * n;
        for (int i = 0; i < W; i++)
            qp[h * W + i] = n - W + i;
    }
    int32_t *dsoff = upload(ctx, soff, sizeof soff, &rc, err), *dqp = upload(ctx, qp, sizeof qp, &rc, err);
    int32_t *dlens = upload(ctx, lens, sizeof lens, &rc, err), *dbudg = upload(ctx, budg, sizeof budg, &rc, err);
    int32_t *dkoff = upload(ctx, koff, sizeof koff, &rc, err);
    int32_t *keep = upload(ctx, NULL, (size_t)N_KV * n * 4, &rc, err);
    float *scores = upload(ctx, NULL, (size_t)N_KV * n * 4, &rc, err);
    void *ws = upload(ctx, NULL, ekv_cuda_window_workspace(N_KV, W, G), &rc, err);
    void *sws = upload(ctx, NULL, ekv_cuda_select_workspace((int64_t)N_KV * n), &rc, err);
    double *ent = upload(ctx, NULL, N_Q * sizeof(double), &rc, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_start(ctx, err);
    if (rc == EKV_OK) /* timing only: q's first rows serve as each head's window */
        rc = ekv_cuda_window_scores(ctx, s.pool, &s.heads, q, W, G, dqp, n, dsoff, scores, ws, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &r->window_ms, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_start(ctx, err);
    if (rc == EKV_OK) /* timing only: q viewed as 32 heads of n rows of 128 */
        rc = ekv_cuda_entropy(ctx, q, N_Q, n, HEAD_D, 32, ent, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &r->entropy_ms, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_start(ctx, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_select_snap(ctx, N_KV, scores, dsoff, dlens, dbudg, keep, dkoff, sws, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &r->select_ms, err);
    if (s.pool)
        setup_free(&s);
    void *bufs[] = {q, dsoff, dqp, dlens, dbudg, dkoff, keep, scores, ws, sws, ent};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        ekv_cuda_free(bufs[i]);
    return rc;
}

/* ---- one decode step of a random-weight Llama-3.1-8B ---- */

#define HIDDEN 4096
#define FFN 14336
#define N_LAYERS 32
#define VOCAB 128256
#define KV_DIM (N_KV * HEAD_D)

/* Weights (fp16, zero: GEMM speed does not depend on values) and
 * activations of the whole model; one KV setup per layer, or one shared by
 * all layers when 32 of them do not fit (then each layer still reads it from
 * HBM: it is far larger than L2). */
typedef struct step_model {
    ekv_f16 *w, *lm_head;
    float *norm, *x, *xn, *q, *k, *v, *att, *g, *u, *logits;
    ekv_f16 *xh;
    int32_t *tok;
    decode_setup kv[N_LAYERS];
    int n_kv_setups;
} step_model;

static const size_t layer_params = (size_t)HIDDEN * HIDDEN * 2 + (size_t)KV_DIM * HIDDEN * 2 +
                                   (size_t)FFN * HIDDEN * 3;

static void step_free(step_model *m)
{
    void *bufs[] = {m->w, m->lm_head, m->norm, m->x, m->xn, m->q, m->k, m->v,
                    m->att, m->g, m->u, m->logits, m->xh, m->tok};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        ekv_cuda_free(bufs[i]);
    for (int l = 0; l < m->n_kv_setups; l++)
        setup_free(&m->kv[l]);
    memset(m, 0, sizeof *m);
}

static ekv_status step_alloc(ekv_cuda *ctx, const ekv_cuda_info *info, int32_t context, int batch,
                             float budget, step_model *m, ekv_error *err)
{
    ekv_status rc = EKV_OK;
    memset(m, 0, sizeof *m);
    m->w = upload(ctx, NULL, layer_params * N_LAYERS * 2, &rc, err);
    m->lm_head = upload(ctx, NULL, (size_t)VOCAB * HIDDEN * 2, &rc, err);
    m->norm = upload(ctx, NULL, HIDDEN * 4, &rc, err);
    m->x = upload(ctx, NULL, (size_t)batch * HIDDEN * 4, &rc, err);
    m->xn = upload(ctx, NULL, (size_t)batch * HIDDEN * 4, &rc, err);
    m->q = upload(ctx, NULL, (size_t)batch * HIDDEN * 4, &rc, err);
    m->k = upload(ctx, NULL, (size_t)batch * KV_DIM * 4, &rc, err);
    m->v = upload(ctx, NULL, (size_t)batch * KV_DIM * 4, &rc, err);
    m->att = upload(ctx, NULL, (size_t)batch * HIDDEN * 4, &rc, err);
    m->g = upload(ctx, NULL, (size_t)batch * FFN * 4, &rc, err);
    m->u = upload(ctx, NULL, (size_t)batch * FFN * 4, &rc, err);
    m->logits = upload(ctx, NULL, (size_t)batch * VOCAB * 4, &rc, err);
    m->xh = upload(ctx, NULL, (size_t)batch * FFN * 2, &rc, err);
    m->tok = upload(ctx, NULL, (size_t)batch * 4, &rc, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, m->w, 0, layer_params * N_LAYERS * 2, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, m->lm_head, 0, (size_t)VOCAB * HIDDEN * 2, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, m->x, 0, (size_t)batch * HIDDEN * 4, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_memset(ctx, m->norm, 0, HIDDEN * 4, err);
    /* KV: one setup per layer when all fit in 70% of the device with the weights */
    double kv_layer = 0;
    for (int i = 0; i < batch * N_KV; i++)
        kv_layer += (double)((head_len(context, budget, i / N_KV, i % N_KV) + 15) / 16) * 8256;
    const double used = (double)(layer_params * N_LAYERS + (size_t)VOCAB * HIDDEN) * 2;
    m->n_kv_setups = used + kv_layer * N_LAYERS < 0.7 * (double)info->total_mem ? N_LAYERS : 1;
    for (int l = 0; rc == EKV_OK && l < m->n_kv_setups; l++)
        rc = setup_decode(ctx, context, batch, budget, &m->kv[l], err);
    if (rc != EKV_OK)
        step_free(m);
    return rc;
}

#define TRY(call)                                                                          \
    do {                                                                                   \
        ekv_status rc_ = (call);                                                           \
        if (rc_ != EKV_OK)                                                                 \
            return rc_;                                                                    \
    } while (0)

/* x -> x through 32 layers, then logits and greedy tokens. The KV cache is
 * read, not appended to (B x 8 x 256 bytes a layer: negligible), and the
 * residual adds are left out (two vector adds a layer). */
static ekv_status step_run(ekv_cuda *ctx, step_model *m, int batch, ekv_error *err)
{
    const float scale = 1.0f / sqrtf((float)HEAD_D);
    for (int l = 0; l < N_LAYERS; l++) {
        const ekv_f16 *wq = m->w + layer_params * l, *wk = wq + (size_t)HIDDEN * HIDDEN;
        const ekv_f16 *wv = wk + (size_t)KV_DIM * HIDDEN, *wo = wv + (size_t)KV_DIM * HIDDEN;
        const ekv_f16 *wg = wo + (size_t)HIDDEN * HIDDEN, *wu = wg + (size_t)FFN * HIDDEN;
        const ekv_f16 *wd = wu + (size_t)FFN * HIDDEN;
        decode_setup *kv = &m->kv[m->n_kv_setups == N_LAYERS ? l : 0];
        TRY(ekv_cuda_rmsnorm(ctx, m->xn, m->x, m->norm, batch, HIDDEN, 1e-5f, err));
        TRY(ekv_cuda_f32_to_f16(ctx, m->xn, m->xh, (int64_t)batch * HIDDEN, err));
        TRY(ekv_cuda_matmul(ctx, wq, HIDDEN, HIDDEN, m->xh, batch, m->q, HIDDEN, err));
        TRY(ekv_cuda_matmul(ctx, wk, KV_DIM, HIDDEN, m->xh, batch, m->k, KV_DIM, err));
        TRY(ekv_cuda_matmul(ctx, wv, KV_DIM, HIDDEN, m->xh, batch, m->v, KV_DIM, err));
        TRY(ekv_cuda_rope(ctx, m->q, batch, N_Q, HEAD_D, HEAD_D, kv->qpos, 500000.0f, 0, err));
        TRY(ekv_cuda_rope(ctx, m->k, batch, N_KV, HEAD_D, HEAD_D, kv->qpos, 500000.0f, 0, err));
        TRY(ekv_cuda_decode_attention(ctx, kv->pool, &kv->heads, batch, N_KV, N_Q, m->q, kv->qpos,
                                      kv->max_len, scale, m->att, kv->ws, err));
        TRY(ekv_cuda_f32_to_f16(ctx, m->att, m->xh, (int64_t)batch * HIDDEN, err));
        TRY(ekv_cuda_matmul(ctx, wo, HIDDEN, HIDDEN, m->xh, batch, m->xn, HIDDEN, err));
        TRY(ekv_cuda_rmsnorm(ctx, m->x, m->xn, m->norm, batch, HIDDEN, 1e-5f, err));
        TRY(ekv_cuda_f32_to_f16(ctx, m->x, m->xh, (int64_t)batch * HIDDEN, err));
        TRY(ekv_cuda_matmul(ctx, wg, FFN, HIDDEN, m->xh, batch, m->g, FFN, err));
        TRY(ekv_cuda_matmul(ctx, wu, FFN, HIDDEN, m->xh, batch, m->u, FFN, err));
        TRY(ekv_cuda_swiglu(ctx, m->g, m->u, (int64_t)batch * FFN, err));
        TRY(ekv_cuda_f32_to_f16(ctx, m->g, m->xh, (int64_t)batch * FFN, err));
        TRY(ekv_cuda_matmul(ctx, wd, HIDDEN, FFN, m->xh, batch, m->x, HIDDEN, err));
    }
    TRY(ekv_cuda_rmsnorm(ctx, m->xn, m->x, m->norm, batch, HIDDEN, 1e-5f, err));
    TRY(ekv_cuda_f32_to_f16(ctx, m->xn, m->xh, (int64_t)batch * HIDDEN, err));
    TRY(ekv_cuda_matmul(ctx, m->lm_head, VOCAB, HIDDEN, m->xh, batch, m->logits, VOCAB, err));
    return ekv_cuda_argmax(ctx, m->logits, batch, VOCAB, m->tok, err);
}

typedef struct step_result {
    double ms, tok_s, bytes;
    bool kv_shared;
} step_result;

static ekv_status time_step(ekv_cuda *ctx, const ekv_cuda_info *info, int32_t context, int batch,
                            float budget, step_result *r, ekv_error *err)
{
    step_model m;
    ekv_status rc = step_alloc(ctx, info, context, batch, budget, &m, err);
    if (rc != EKV_OK)
        return rc;
    for (int i = 0; rc == EKV_OK && i < 2; i++)
        rc = step_run(ctx, &m, batch, err);
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_start(ctx, err);
    const int steps = 5;
    for (int i = 0; rc == EKV_OK && i < steps; i++)
        rc = step_run(ctx, &m, batch, err);
    double ms = 0;
    if (rc == EKV_OK)
        rc = ekv_cuda_timer_stop(ctx, &ms, err);
    r->ms = ms / steps;
    r->tok_s = r->ms > 0 ? batch / (r->ms * 1e-3) : 0;
    r->bytes = (double)(layer_params * N_LAYERS + (size_t)VOCAB * HIDDEN) * 2 +
               (double)m.kv[0].bytes * N_LAYERS;
    r->kv_shared = m.n_kv_setups == 1;
    step_free(&m);
    return rc;
}

static int run_steps(ekv_cuda *ctx, const ekv_cuda_info *info, const cuda_opts *o, double hbm)
{
    int failures = 0;
    for (int ci = 0; ci < o->n_contexts; ci++)
        for (int bi = 0; bi < o->n_batches; bi++)
            for (int full = 1; full >= 0; full--) {
                const float budget = full ? 1.0f : o->budget;
                step_result r;
                ekv_error err = {0};
                if (time_step(ctx, info, o->contexts[ci], o->batches[bi], budget, &r, &err) != EKV_OK) {
                    fprintf(stderr, "  step ctx %d batch %d: %s\n", o->contexts[ci], o->batches[bi], err.msg);
                    failures++;
                    continue;
                }
                const double gbps = r.ms > 0 ? r.bytes / (r.ms * 1e-3) / 1e9 : 0;
                if (o->json)
                    printf("{\"bench\":\"cuda-decode-step\",\"engine\":\"entrokv\",\"model\":"
                           "\"llama-3.1-8b-shapes-random-fp16\",\"context\":%d,\"batch\":%d,"
                           "\"kv\":\"%s\",\"budget\":%.3f,\"ms_per_step\":%.3f,\"tokens_per_s\":%.1f,"
                           "\"bytes_per_step\":%.0f,\"gbps\":%.1f,\"frac_hbm\":%.3f,"
                           "\"kv_shared_across_layers\":%s}\n",
                           o->contexts[ci], o->batches[bi], full ? "full" : "ragged", budget, r.ms,
                           r.tok_s, r.bytes, gbps, gbps / hbm, r.kv_shared ? "true" : "false");
                fprintf(stderr, "  ctx %6d batch %3d %-6s KV: decode step %8.2f ms, %8.1f tokens/s "
                        "(%5.1f%% of HBM)%s\n", o->contexts[ci], o->batches[bi], full ? "full" : "10%",
                        r.ms, r.tok_s, 100.0 * gbps / hbm, r.kv_shared ? " [one KV for all layers]" : "");
            }
    return failures;
}

/* ---- the torch reference ---- */

/* The number after "key": in one flat JSON line (the reference's own output). */
static bool json_number(const char *line, const char *key, double *out)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *at = strstr(line, pat);
    if (!at)
        return false;
    char *end;
    *out = strtod(at + strlen(pat), &end);
    return end != at + strlen(pat);
}

static void run_reference(const cuda_opts *o, double hbm, const double *ours)
{
    char cmd[2048], list_c[128] = "", list_b[128] = "";
    for (int i = 0; i < o->n_contexts; i++)
        snprintf(list_c + strlen(list_c), sizeof list_c - strlen(list_c), "%s%d", i ? "," : "", o->contexts[i]);
    for (int i = 0; i < o->n_batches; i++)
        snprintf(list_b + strlen(list_b), sizeof list_b - strlen(list_b), "%s%d", i ? "," : "", o->batches[i]);
    snprintf(cmd, sizeof cmd, "'%s' '%s' --contexts %s --batches %s --q-heads %d --kv-heads %d "
             "--head-dim %d --iters %d --hbm-gbps %.1f",
             o->python, o->ref_script, list_c, list_b, N_Q, N_KV, HEAD_D, o->iters, hbm);
    FILE *p = popen(cmd, "r");
    if (!p) {
        fprintf(stderr, "entrokv bench: cannot run the torch reference (%s)\n", cmd);
        return;
    }
    char line[4096];
    while (fgets(line, sizeof line, p)) {
        if (o->json)
            fputs(line, stdout);
        double ms, c, b;
        const char *skip = strstr(line, "\"skipped\"");
        if (skip) {
            fprintf(stderr, "torch sdpa: %s", line);
            continue;
        }
        if (!json_number(line, "ms", &ms) || !json_number(line, "context", &c) ||
            !json_number(line, "batch", &b))
            continue;
        for (int ci = 0; ci < o->n_contexts; ci++)
            for (int bi = 0; bi < o->n_batches; bi++) {
                if (o->contexts[ci] != (int32_t)c || o->batches[bi] != (int32_t)b)
                    continue;
                const double mine = ours[ci * MAX_LIST + bi];
                if (o->json)
                    printf("{\"bench\":\"cuda-attention\",\"ratio_vs\":\"torch-sdpa\",\"context\":%d,"
                           "\"batch\":%d,\"kv\":\"full\",\"entrokv_ms\":%.4f,\"torch_ms\":%.4f,"
                           "\"speedup\":%.3f}\n",
                           (int)c, (int)b, mine, ms, mine > 0 ? ms / mine : 0);
                fprintf(stderr, "  ctx %6d batch %3d  full KV: entrokv %.3f ms, torch sdpa %.3f ms "
                        "(entrokv %.2fx)\n", (int)c, (int)b, mine, ms, mine > 0 ? ms / mine : 0);
            }
    }
    if (pclose(p) != 0)
        fprintf(stderr, "entrokv bench: the torch reference exited with an error\n");
}

static int run(const cuda_opts *o)
{
    ekv_error err = {0};
    ekv_cuda *ctx = NULL;
    ekv_cuda_info info;
    if (ekv_cuda_create(0, &ctx, &err) != EKV_OK || ekv_cuda_get_info(ctx, &info, &err) != EKV_OK) {
        fprintf(stderr, "entrokv bench: %s\n", err.msg);
        ekv_cuda_destroy(ctx);
        return CLI_FAIL;
    }
    double hbm = o->hbm_gbps > 0 ? o->hbm_gbps : info.hbm_gbps;
    if (hbm < 100.0) /* the driver did not report memory clock / bus width */
        hbm = strstr(info.name, "H200") ? 4800.0
              : strstr(info.name, "H100") ? (strstr(info.name, "PCIe") ? 2000.0 : 3350.0)
                                          : 1000.0;
    fprintf(stderr, "cuda-attention on %s (%d SMs), HBM peak %.0f GB/s (%s); Llama-3.1-8B "
            "attention shapes %d/%d heads x %d\n", info.name, info.sm_count, hbm,
            o->hbm_gbps > 0 ? "--hbm-gbps" : info.hbm_gbps >= 100.0 ? "memory clock x bus width" : "table by name", N_Q, N_KV, HEAD_D);
    double full_ms[MAX_LIST * MAX_LIST] = {0};
    int failures = 0;
    /* the default kernel (tensor cores at head_dim 128), then the CUDA-core
     * one on the same shapes: what the tensor cores bring */
    static const char *KERNEL[2] = {"tensor-core", "cuda-core"};
    for (int k = 0; k < 2; k++)
    for (int ci = 0; ci < o->n_contexts; ci++)
        for (int bi = 0; bi < o->n_batches; bi++)
            for (int full = 1; full >= 0; full--) {
                const float budget = full ? 1.0f : o->budget;
                run_result r;
                ekv_cuda_decode_force_simt(k == 1);
                ekv_status rc = time_decode(ctx, o, o->contexts[ci], o->batches[bi], budget, &r, &err);
                ekv_cuda_decode_force_simt(false);
                if (rc != EKV_OK) {
                    fprintf(stderr, "  ctx %d batch %d %s: %s\n", o->contexts[ci], o->batches[bi],
                            full ? "full" : "budget", err.msg);
                    failures++;
                    continue;
                }
                if (full && k == 0)
                    full_ms[ci * MAX_LIST + bi] = r.ms;
                if (o->json)
                    printf("{\"bench\":\"cuda-attention\",\"engine\":\"entrokv\",\"kernel\":\"%s\","
                           "\"device\":\"%s\",\"context\":%d,\"batch\":%d,\"kv\":\"%s\","
                           "\"budget\":%.3f,\"ms\":%.4f,\"bytes\":%lld,\"gbps\":%.1f,"
                           "\"hbm_gbps\":%.1f,\"frac_hbm\":%.3f,\"blocks_per_sm\":%d}\n",
                           KERNEL[k], info.name, o->contexts[ci], o->batches[bi],
                           full ? "full" : "ragged", budget, r.ms, (long long)r.bytes, r.gbps, hbm,
                           r.gbps / hbm, r.per_sm);
                fprintf(stderr, "  %-11s ctx %6d batch %3d %-6s KV: %8.3f ms  %7.1f GB/s  %5.1f%% of HBM"
                        "  (%d blocks/SM)\n", KERNEL[k], o->contexts[ci], o->batches[bi],
                        full ? "full" : "10%", r.ms, r.gbps, 100.0 * r.gbps / hbm, r.per_sm);
            }
    /* --sweep: the tensor-core kernel's stages, with the pool's blocks
     * shuffled (as above) and in order, full KV */
    for (int st = 2; o->sweep && st <= 4; st++)
        for (int order = 0; order < 2; order++)
            for (int ci = 0; ci < o->n_contexts; ci++)
                for (int bi = 0; bi < o->n_batches; bi++) {
                    run_result r;
                    g_contiguous = order == 1;
                    ekv_cuda_decode_set_stages(st);
                    ekv_status rc = time_decode(ctx, o, o->contexts[ci], o->batches[bi], 1.0f, &r, &err);
                    ekv_cuda_decode_set_stages(0);
                    g_contiguous = false;
                    if (rc != EKV_OK) {
                        fprintf(stderr, "  sweep: %s\n", err.msg);
                        failures++;
                        continue;
                    }
                    if (o->json)
                        printf("{\"bench\":\"cuda-attention-sweep\",\"stages\":%d,\"blocks\":\"%s\","
                               "\"context\":%d,\"batch\":%d,\"ms\":%.4f,\"gbps\":%.1f,\"frac_hbm\":%.3f,"
                               "\"blocks_per_sm\":%d}\n",
                               st, order ? "in order" : "shuffled", o->contexts[ci], o->batches[bi],
                               r.ms, r.gbps, r.gbps / hbm, r.per_sm);
                    fprintf(stderr, "  sweep: %d stages, blocks %-8s ctx %6d batch %3d: %8.3f ms %5.1f%% of HBM"
                            " (%d blocks/SM)\n", st, order ? "in order" : "shuffled", o->contexts[ci],
                            o->batches[bi], r.ms, 100.0 * r.gbps / hbm, r.per_sm);
                }
    if (o->spark) {
        fprintf(stderr, "SparK packed keys (every prompt token packed, avg recovery) vs dense:\n");
        failures += bench_cuda_spark(ctx, info.name, hbm, o->contexts, o->n_contexts, o->batches,
                                     o->n_batches, o->iters, o->json, full_ms, MAX_LIST);
    }
    if (o->compress) { /* warm-up, untimed: lazy module loading, cuSOLVER / cuBLAS set-up */
        compress_result c;
        if (time_compress(ctx, 512, o->budget, &c, &err) != EKV_OK)
            fprintf(stderr, "  compress warm-up: %s\n", err.msg);
    }
    for (int ci = 0; o->compress && ci < o->n_contexts; ci++) {
        compress_result c;
        if (time_compress(ctx, o->contexts[ci], o->budget, &c, &err) != EKV_OK) {
            fprintf(stderr, "  compress ctx %d: %s\n", o->contexts[ci], err.msg);
            failures++;
            continue;
        }
        const double work = c.window_ms + c.entropy_ms + c.select_ms;
        if (o->json)
            printf("{\"bench\":\"cuda-compress\",\"engine\":\"entrokv\",\"context\":%d,"
                   "\"prefill_attention_ms\":%.3f,\"window_ms\":%.3f,\"entropy_ms\":%.3f,"
                   "\"select_ms\":%.3f,\"frac_of_prefill_attention\":%.4f}\n",
                   o->contexts[ci], c.prefill_ms, c.window_ms, c.entropy_ms, c.select_ms,
                   c.prefill_ms > 0 ? work / c.prefill_ms : 0);
        fprintf(stderr, "  ctx %6d one layer: prefill attention %.2f ms; window %.2f + entropy %.2f "
                "+ select %.2f ms = %.1f%% of it\n", o->contexts[ci], c.prefill_ms, c.window_ms,
                c.entropy_ms, c.select_ms, c.prefill_ms > 0 ? 100.0 * work / c.prefill_ms : 0);
    }
    if (o->step) {
        fprintf(stderr, "decode step, random Llama-3.1-8B weights (fp16, 32 layers):\n");
        failures += run_steps(ctx, &info, o, hbm);
    }
    ekv_cuda_destroy(ctx); /* frees the device for torch */
    if (o->reference)
        run_reference(o, hbm, full_ms);
    return failures ? CLI_FAIL : CLI_OK;
}

int bench_cuda(int argc, char **argv)
{
    cuda_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc;
    if (!ekv_cuda_available()) {
        fprintf(stderr, "entrokv bench: no CUDA device (%s)\n", ekv_cuda_unavailable_reason());
        return CLI_FAIL;
    }
    return run(&o);
}
#else
typedef int bench_cuda_unused; /* ISO C wants a non-empty file */
#endif
