/* decode-matmul-micro.c - the read rate of the decode matmuls and of the
 * decode attention alone, quoted
 * in docs/ARCHITECTURE.md ("Where the time goes"). Not part of the build:
 *   cmake --build build/X --target entrokv_core
 *   gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude docs/eval/decode-matmul-micro.c \
 *       bench/bench_bandwidth.c build/X/libentrokv_core.a -lm -lpthread -o /tmp/mm \
 *       && /tmp/mm [threads 2] [reps 15] [context 2048] [output type 8 = Q8_0]
 *
 * Weights of SmolLM2-135M's decode shapes (30 layers of q 576x576, k and v
 * 192x576, o 576x576, gate and up 1536x576, down 576x1536 in Q4_1; the
 * 49152x576 output matrix in the given type), random values, one activation
 * row (m = 1, a decode step). Each repetition times, alternated:
 *   layers:  the 211 kern_matmul calls of one decode step, in its order
 *            (what the model's matmuls cost with nothing else in the step);
 *   one:     one kern_matmul over a single Q4_1 matrix of the same bytes
 *            (the kernel's read rate with one parallel region);
 *   one8:    the same over a single Q8_0 matrix of the same bytes;
 *   regions: 211 empty parallel regions (the dispatch cost alone);
 *   stream:  bench_read_bandwidth over a buffer of the same bytes (the
 *            bound bench generate uses, there over 1024 MiB);
 *   attn1:   kern_attention of one decode step at the given context on the
 *            calling thread: 30 layers x 3 KV heads, g = 3 queries each,
 *            head_dim 64, 16-token fp16 blocks (GB/s over the K and V bytes);
 *   attnP:   the same 90 items dealt over the pool one layer at a time (3
 *            items per region, as model/llama.c's task_attention does);
 *   kvstream: bench_read_bandwidth over a buffer of the K and V bytes.
 * GB/s = weight bytes / time; min and median over the repetitions (min
 * time, i.e. best rate, is the one robust to other load on the machine).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../bench/bench_ref.h"
#include "entrokv/dtype.h"
#include "entrokv/generate.h"
#include "entrokv/kernels.h"
#include "entrokv/threadpool.h"

#define LAYERS 30
#define D 576
#define KV 192
#define FF 1536
#define VOCAB 49152
#define KVH 3
#define HD 64
#define BT 16

typedef struct mat {
    int64_t n, k;
    uint32_t type;
    uint8_t *w;
    size_t bytes;
} mat;

static uint64_t rng = 88172645463325252ull;
static uint32_t next(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)rng;
}

/* random quantized values; every f16 field of a block (Q4_1: d, m at 0 and
 * 2; Q8_0: d at 0) set to a small normal number, not random bits */
static void make(mat *m, int64_t n, int64_t k, uint32_t type)
{
    uint64_t rb;
    ekv_dtype_row_bytes(type, (uint64_t)k, &rb);
    m->n = n, m->k = k, m->type = type, m->bytes = (size_t)rb * (size_t)n;
    m->w = aligned_alloc(64, (m->bytes + 63) / 64 * 64);
    for (size_t i = 0; i < m->bytes; i++)
        m->w[i] = (uint8_t)next();
    const size_t blk = type == EKV_Q4_1 ? 20 : type == EKV_Q8_0 ? 34 : 0;
    for (size_t b = 0; blk && b < m->bytes / blk; b++) {
        ekv_f16 h = ekv_f32_to_f16(0.01f + (float)(next() % 100) * 1e-4f);
        memcpy(m->w + b * blk, &h, 2);
        if (type == EKV_Q4_1)
            memcpy(m->w + b * blk + 2, &h, 2);
    }
}

static void nop(void *ctx, int ith, int nth)
{
    (void)ctx, (void)ith, (void)nth;
}

/* one layer's decode attention: its KVH views, one item per part */
typedef struct attn_job {
    const kern_kv_view *view; /* KVH */
    const float *q;           /* KVH x 3 x HD */
    float *out, *scores;      /* scores: KVH x KERN_ATTN_SCRATCH(n) */
    int32_t pos;
    size_t scratch;
} attn_job;

static void attn_item(const attn_job *j, int h)
{
    const int32_t qp[3] = {j->pos, j->pos, j->pos};
    kern_attention(&j->view[h], j->q + h * 3 * HD, 3, HD, qp, 0.125f, j->out + h * 3 * HD, HD,
                   j->scores + (size_t)h * j->scratch);
}

static void attn_task(void *ctx, int ith, int nth)
{
    for (int h = ith; h < KVH; h += nth)
        attn_item(ctx, h);
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2, reps = argc > 2 ? atoi(argv[2]) : 15;
    const int32_t ctx = argc > 3 ? atoi(argv[3]) : 2048;
    uint32_t out_type = argc > 4 ? (uint32_t)atoi(argv[4]) : EKV_Q8_0;
    kern_init();
    ekv_error err = {0};
    ekv_pool *pool = ekv_pool_create(threads, &err);
    if (!pool || reps < 1 || reps > 1000 || ctx < BT || ctx > 65536)
        return 1;

    /* the KV of one sequence at ctx tokens: LAYERS x KVH views */
    const int32_t nb = (ctx + BT - 1) / BT;
    static kern_kv_view view[LAYERS][KVH];
    const size_t kv_bytes = (size_t)LAYERS * KVH * (size_t)ctx * HD * 2 * sizeof(ekv_f16);
    for (int l = 0; l < LAYERS; l++)
        for (int h = 0; h < KVH; h++) {
            ekv_f16 **kb = malloc(sizeof *kb * nb), **vb = malloc(sizeof *vb * nb);
            int32_t **pb = malloc(sizeof *pb * nb);
            for (int b = 0; b < nb; b++) {
                kb[b] = aligned_alloc(64, BT * HD * sizeof(ekv_f16));
                vb[b] = aligned_alloc(64, BT * HD * sizeof(ekv_f16));
                pb[b] = malloc(BT * sizeof(int32_t));
                for (int i = 0; i < BT * HD; i++) {
                    kb[b][i] = ekv_f32_to_f16((float)(next() % 2001) / 1000.0f - 1.0f);
                    vb[b][i] = ekv_f32_to_f16((float)(next() % 2001) / 1000.0f - 1.0f);
                }
                for (int r = 0; r < BT; r++)
                    pb[b][r] = b * BT + r < ctx ? b * BT + r : 1 << 30;
            }
            view[l][h] = (kern_kv_view){ctx, BT, HD, (const ekv_f16 *const *)kb,
                                        (const ekv_f16 *const *)vb, (const int32_t *const *)pb,
                                        NULL};
        }
    float *aq = malloc(KVH * 3 * HD * sizeof(float)), *aout = malloc(KVH * 3 * HD * sizeof(float));
    float *asc = aligned_alloc(64, KVH * KERN_ATTN_SCRATCH(ctx) * sizeof(float));
    for (int i = 0; i < KVH * 3 * HD; i++)
        aq[i] = (float)(next() % 2001) / 1000.0f - 1.0f;

    enum { PER = 7, N_MATS = LAYERS * PER + 1 };
    static mat m[N_MATS];
    size_t bytes = 0;
    for (int l = 0; l < LAYERS; l++) {
        mat *L = &m[l * PER];
        make(&L[0], D, D, EKV_Q4_1), make(&L[1], KV, D, EKV_Q4_1);
        make(&L[2], KV, D, EKV_Q4_1), make(&L[3], D, D, EKV_Q4_1);
        make(&L[4], FF, D, EKV_Q4_1), make(&L[5], FF, D, EKV_Q4_1);
        make(&L[6], D, FF, EKV_Q4_1);
    }
    make(&m[N_MATS - 1], VOCAB, D, out_type);
    for (int i = 0; i < N_MATS; i++)
        bytes += m[i].bytes;
    uint64_t rb;
    ekv_dtype_row_bytes(EKV_Q4_1, D, &rb);
    mat one, one8;
    make(&one, (int64_t)(bytes / rb), D, EKV_Q4_1);
    ekv_dtype_row_bytes(EKV_Q8_0, D, &rb);
    make(&one8, (int64_t)(bytes / rb), D, EKV_Q8_0);

    float *x = aligned_alloc(64, FF * sizeof(float)), *y = aligned_alloc(64, (size_t)one.n * sizeof(float)); /* one.n > one8.n */
    void *scratch = aligned_alloc(64, 4096);
    for (int i = 0; i < FF; i++)
        x[i] = (float)(next() % 2001) / 1000.0f - 1.0f;

    enum { MODES = 8 };
    double *t[MODES];
    for (int s = 0; s < MODES; s++)
        t[s] = calloc((size_t)reps, sizeof(double));
    for (int r = 0; r < reps; r++) {
        double t0 = gen_now();
        for (int i = 0; i < N_MATS; i++)
            if (kern_matmul(pool, m[i].w, m[i].type, m[i].n, m[i].k, 0, x, 1, y, m[i].n, scratch,
                            &err))
                return 1;
        t[0][r] = gen_now() - t0;
        t0 = gen_now();
        if (kern_matmul(pool, one.w, one.type, one.n, one.k, 0, x, 1, y, one.n, scratch, &err))
            return 1;
        t[1][r] = gen_now() - t0;
        t0 = gen_now();
        if (kern_matmul(pool, one8.w, one8.type, one8.n, one8.k, 0, x, 1, y, one8.n, scratch, &err))
            return 1;
        t[2][r] = gen_now() - t0;
        t0 = gen_now();
        for (int i = 0; i < N_MATS; i++)
            ekv_pool_run(pool, nop, NULL);
        t[3][r] = gen_now() - t0;
        double best, med;
        if (!bench_read_bandwidth(threads, bytes, 1, &best, &med))
            return 1;
        t[4][r] = (double)bytes / best;
        t0 = gen_now();
        for (int l = 0; l < LAYERS; l++) {
            attn_job j = {view[l], aq, aout, asc, ctx - 1, KERN_ATTN_SCRATCH(ctx)};
            for (int h = 0; h < KVH; h++)
                attn_item(&j, h);
        }
        t[5][r] = gen_now() - t0;
        t0 = gen_now();
        for (int l = 0; l < LAYERS; l++) {
            attn_job j = {view[l], aq, aout, asc, ctx - 1, KERN_ATTN_SCRATCH(ctx)};
            ekv_pool_run(pool, attn_task, &j);
        }
        t[6][r] = gen_now() - t0;
        if (!bench_read_bandwidth(threads, kv_bytes, 1, &best, &med))
            return 1;
        t[7][r] = (double)kv_bytes / best;
    }
    static const char *name[MODES] = {"layers", "one",   "one8",  "regions",
                                          "stream", "attn1", "attnP", "kvstream"};
    printf("threads %d, isa %s, reps %d, weight bytes %zu (%d matmuls + output type %u), "
           "context %d: K+V bytes %zu\n",
           threads, kern_isa_name(kern_active_isa()), reps, bytes, N_MATS - 1, out_type, ctx,
           kv_bytes);
    for (int s = 0; s < MODES; s++) {
        qsort(t[s], (size_t)reps, sizeof(double), cmp);
        double lo = t[s][0], med = t[s][reps / 2];
        const size_t nbytes = s >= 5 ? kv_bytes : bytes;
        if (s == 3)
            printf("%-8s min %8.3f ms  median %8.3f ms  (%.2f us per region)\n", name[s],
                   lo * 1e3, med * 1e3, lo * 1e6 / N_MATS);
        else
            printf("%-8s min %8.3f ms  median %8.3f ms  best %6.2f GB/s  median %6.2f GB/s\n",
                   name[s], lo * 1e3, med * 1e3, (double)nbytes / lo / 1e9,
                   (double)nbytes / med / 1e9);
    }
    ekv_pool_destroy(pool);
    return 0;
}
