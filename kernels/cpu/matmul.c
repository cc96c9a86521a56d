/*
 * matmul.c - the one dispatch point for the quantized matmul kernels: CPU
 * detection, the per-ISA kernel tables, and the threading around them.
 *
 * kern_init() builds one table per instruction-set level (scalar, then AVX2
 * overriding what it implements, then AVX-512 on top) and selects the widest
 * the CPU supports, capped by ENTROKV_ISA. A matmul runs in two parallel
 * regions: the activation rows are quantized into the caller's scratch (split
 * over rows), then weight rows are split over the threads in groups of four
 * and each thread computes all m activation rows for its weight rows, walking
 * the activations in L1-sized chunks so a weight tile is reused across them.
 * kern_matmul_multi does the same for several weights that share the
 * activations (Q, K, V; gate and up) with one preparation and one region.
 *
 * KERN_ISA_AVX512 means AVX-512 F/BW/VL plus VNNI (Ice Lake, Sapphire Rapids,
 * Zen 4); AVX-512 CPUs without VNNI (Skylake-SP) run the AVX2 kernels.
 */
#include "entrokv/kernels.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

/* Weight rows per thread work unit; a multiple of every kernel's row tile so
 * the tiles, and therefore the results, do not depend on the thread count. */
#define ROW_UNIT 4
/* Below this many multiply-adds a matmul runs on the calling thread. */
#define PARALLEL_MIN_WORK 32768
/* Bytes of prepared activations a thread sweeps per weight tile (half of L1d). */
#define X_CHUNK_BYTES 24576
/* Bytes of weights a thread keeps hot in L2 while it sweeps all activations. */
#define W_BLOCK_BYTES 262144

static quant_kernels isa_tables[3];
static kern_isa isa_detected = KERN_ISA_SCALAR;
static kern_isa isa_env_cap = KERN_ISA_AVX512;
static atomic_int isa_active = KERN_ISA_SCALAR;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static kern_isa detect_isa(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return KERN_ISA_SCALAR;
    /* F16C has no __builtin_cpu_supports name in older compilers; every CPU
     * with AVX2 and FMA has it. */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return KERN_ISA_AVX512;
    return KERN_ISA_AVX2;
#else
    return KERN_ISA_SCALAR;
#endif
}

static void init_tables(void)
{
    quant_register_scalar(&isa_tables[KERN_ISA_SCALAR]);
    isa_tables[KERN_ISA_AVX2] = isa_tables[KERN_ISA_SCALAR];
    isa_tables[KERN_ISA_AVX512] = isa_tables[KERN_ISA_SCALAR];
    isa_detected = detect_isa();
#if defined(__x86_64__)
    if (isa_detected >= KERN_ISA_AVX2) {
        quant_register_avx2(&isa_tables[KERN_ISA_AVX2]);
        isa_tables[KERN_ISA_AVX512] = isa_tables[KERN_ISA_AVX2];
    }
    if (isa_detected >= KERN_ISA_AVX512)
        quant_register_avx512(&isa_tables[KERN_ISA_AVX512]);
#endif
    const char *env = getenv("ENTROKV_ISA");
    if (env && strcmp(env, "scalar") == 0)
        isa_env_cap = KERN_ISA_SCALAR;
    else if (env && strcmp(env, "avx2") == 0)
        isa_env_cap = KERN_ISA_AVX2;
    kern_isa isa = isa_detected < isa_env_cap ? isa_detected : isa_env_cap;
    atomic_store(&isa_active, (int)isa);
}

void kern_init(void)
{
    pthread_once(&init_once, init_tables);
}

kern_isa kern_active_isa(void)
{
    kern_init();
    return (kern_isa)atomic_load(&isa_active);
}

const char *kern_isa_name(kern_isa isa)
{
    switch (isa) {
    case KERN_ISA_SCALAR: return "scalar";
    case KERN_ISA_AVX2: return "avx2";
    case KERN_ISA_AVX512: return "avx512";
    }
    return "unknown";
}

kern_isa kern_set_isa(kern_isa wanted)
{
    kern_init();
    kern_isa isa = wanted;
    if (isa > isa_detected)
        isa = isa_detected;
    if (isa > isa_env_cap)
        isa = isa_env_cap;
    if (isa < KERN_ISA_SCALAR)
        isa = KERN_ISA_SCALAR;
    atomic_store(&isa_active, (int)isa);
    return isa;
}

int kern_matmul_supports(uint32_t wtype)
{
    return quant_kind_of(wtype) != QKIND_NONE;
}

/* Elements per block of a supported kind (k must be a multiple). */
static int64_t kind_block(quant_kind kind)
{
    switch (kind) {
    case QKIND_F32:
    case QKIND_F16: return 1;
    case QKIND_Q4_K:
    case QKIND_Q6_K: return QK_K;
    default: return QK;
    }
}

size_t kern_matmul_scratch_bytes(uint32_t wtype, int64_t m, int64_t k)
{
    quant_kind kind = quant_kind_of(wtype);
    if (kind == QKIND_NONE || m <= 0 || k <= 0 || k % kind_block(kind))
        return 0;
    size_t row = quant_prep_row_bytes(kind, k);
    if (row && (uint64_t)m > SIZE_MAX / row)
        return 0;
    return (size_t)m * row;
}

/* ---- the two parallel regions ---- */

typedef struct matmul_job {
    const quant_kernels *kt;
    quant_kind kind;
    quant_gemm g;
    const float *X; /* the caller's activations, row stride k */
    uint8_t *scratch;
    size_t prep_bytes;
    int64_t n, m;
} matmul_job;

static void prep_task(void *ctx, int ith, int nth)
{
    matmul_job *job = ctx;
    long lo, hi;
    ekv_split_range((long)job->m, ith, nth, &lo, &hi);
    quant_prep_fn prep = job->kt->prep[job->kind];
    for (long j = lo; j < hi; j++)
        prep(job->X + (size_t)j * (size_t)job->g.k, job->g.k, job->scratch + (size_t)j * job->prep_bytes);
}

/* Rows [i0, i1) of one weight (i0 a multiple of ROW_UNIT) times all m
 * prepared activation rows. */
static void gemm_rows(const matmul_job *job, const quant_gemm *g, int64_t i0, int64_t i1)
{
    int64_t xchunk = (int64_t)(X_CHUNK_BYTES / g->x_stride);
    xchunk = xchunk < 8 ? 8 : xchunk - xchunk % 4;
    int64_t wblock = (int64_t)(W_BLOCK_BYTES / g->w_stride);
    wblock = wblock < ROW_UNIT ? ROW_UNIT : wblock - wblock % ROW_UNIT;
    quant_gemm_fn gemm = job->kt->gemm[job->kind];
    if (job->m <= xchunk) { /* decode and short prompts: one sweep of the weights */
        gemm(g, i0, i1, 0, job->m);
        return;
    }
    for (int64_t ib = i0; ib < i1; ib += wblock) {
        int64_t ie = ib + wblock < i1 ? ib + wblock : i1;
        for (int64_t j0 = 0; j0 < job->m; j0 += xchunk) {
            int64_t j1 = j0 + xchunk < job->m ? j0 + xchunk : job->m;
            gemm(g, ib, ie, j0, j1);
        }
    }
}

static void gemm_task(void *ctx, int ith, int nth)
{
    matmul_job *job = ctx;
    long units = (long)((job->n + ROW_UNIT - 1) / ROW_UNIT), lo, hi;
    ekv_split_range(units, ith, nth, &lo, &hi);
    int64_t i0 = (int64_t)lo * ROW_UNIT, i1 = (int64_t)hi * ROW_UNIT;
    if (i1 > job->n)
        i1 = job->n;
    if (i0 < i1)
        gemm_rows(job, &job->g, i0, i1);
}

/* Checks one product's operands; fills *ldw for densely packed rows. */
static ekv_status check_operands(const void *W, uint32_t wtype, int64_t n, int64_t k, size_t *ldw,
                                 const float *X, int64_t m, const float *Y, int64_t ldy,
                                 const void *scratch, ekv_error *err)
{
    quant_kind kind = quant_kind_of(wtype);
    if (kind == QKIND_NONE) {
        const ekv_dtype_info *info = ekv_dtype_get(wtype);
        return ekv_error_set(err, EKV_EUNSUPPORTED, "matmul: weight type %s is not supported",
                             info ? info->name : "(unknown)");
    }
    if (n < 0 || m < 0 || k <= 0 || k % kind_block(kind) || ldy < n)
        return ekv_error_set(err, EKV_EINVAL,
                             "matmul: bad shape n=%lld k=%lld m=%lld ldy=%lld for %s",
                             (long long)n, (long long)k, (long long)m, (long long)ldy,
                             ekv_dtype_get(wtype)->name);
    if (n == 0 || m == 0)
        return EKV_OK;
    uint64_t row_bytes;
    if (!W || !X || !Y || !ekv_dtype_row_bytes(wtype, (uint64_t)k, &row_bytes))
        return ekv_error_set(err, EKV_EINVAL, "matmul: missing operand");
    if (*ldw == 0)
        *ldw = (size_t)row_bytes;
    if (*ldw < row_bytes)
        return ekv_error_set(err, EKV_EINVAL, "matmul: weight row stride %zu below a row's %llu bytes",
                             *ldw, (unsigned long long)row_bytes);
    size_t prep_bytes = quant_prep_row_bytes(kind, k);
    if (prep_bytes && (!scratch || ((uintptr_t)scratch & 63)))
        return ekv_error_set(err, EKV_EINVAL,
                             "matmul: scratch must be %zu bytes, 64-byte aligned (got %p)",
                             kern_matmul_scratch_bytes(wtype, m, k), scratch);
    return EKV_OK;
}

/* The job of one product, its activations not yet prepared. */
static matmul_job make_job(const void *W, uint32_t wtype, int64_t n, int64_t k, size_t ldw,
                           const float *X, int64_t m, float *Y, int64_t ldy, void *scratch)
{
    quant_kind kind = quant_kind_of(wtype);
    matmul_job job = {
        .kt = &isa_tables[atomic_load(&isa_active)],
        .kind = kind,
        .g = {.w = W, .w_stride = ldw, .y = Y, .ldy = ldy, .k = k},
        .X = X,
        .scratch = scratch,
        .prep_bytes = quant_prep_row_bytes(kind, k),
        .n = n,
        .m = m,
    };
    if (job.prep_bytes) {
        job.g.x = scratch;
        job.g.x_stride = job.prep_bytes;
    } else {
        job.g.x = (const uint8_t *)X;
        job.g.x_stride = (size_t)k * sizeof(float);
    }
    return job;
}

/* Quantizes the job's activation rows into its scratch (if its kind does). */
static void prepare(ekv_pool *pool, matmul_job *job, int parallel)
{
    if (!job->prep_bytes)
        return;
    const int nth = ekv_pool_size(pool);
    if (parallel && job->m >= 2 * nth && job->m * job->g.k >= PARALLEL_MIN_WORK / 4)
        ekv_pool_run(pool, prep_task, job);
    else
        prep_task(job, 0, 1);
}

ekv_status kern_matmul(ekv_pool *pool, const void *W, uint32_t wtype, int64_t n, int64_t k,
                       size_t ldw, const float *X, int64_t m, float *Y, int64_t ldy, void *scratch,
                       ekv_error *err)
{
    kern_init();
    ekv_status rc = check_operands(W, wtype, n, k, &ldw, X, m, Y, ldy, scratch, err);
    if (rc || n == 0 || m == 0)
        return rc;
    matmul_job job = make_job(W, wtype, n, k, ldw, X, m, Y, ldy, scratch);
    int nth = ekv_pool_size(pool);
    int parallel = pool && nth > 1 && (double)n * (double)k * (double)m >= PARALLEL_MIN_WORK;
    prepare(pool, &job, parallel);
    if (parallel && n > ROW_UNIT)
        ekv_pool_run(pool, gemm_task, &job);
    else
        gemm_task(&job, 0, 1);
    return EKV_OK;
}

/* ---- several products of one activation matrix in one region ---- */

typedef struct multi_job {
    matmul_job base; /* kind, prepared activations, m; its g is op 0's */
    int n_ops;
    quant_gemm g[KERN_MM_MAX_OPS];
    int64_t n[KERN_MM_MAX_OPS];
    long unit0[KERN_MM_MAX_OPS + 1]; /* op o's units are [unit0[o], unit0[o + 1]) */
    kern_mm_rows_fn rows_done;
    void *rows_ctx;
} multi_job;

/* Concatenated: part ith of the units of all ops, op after op. */
static void multi_concat_task(void *ctx, int ith, int nth)
{
    multi_job *mj = ctx;
    long lo, hi;
    ekv_split_range(mj->unit0[mj->n_ops], ith, nth, &lo, &hi);
    for (int o = 0; o < mj->n_ops && lo < hi; o++) {
        if (lo >= mj->unit0[o + 1])
            continue;
        const long e = hi < mj->unit0[o + 1] ? hi : mj->unit0[o + 1];
        int64_t i0 = (int64_t)(lo - mj->unit0[o]) * ROW_UNIT;
        int64_t i1 = (int64_t)(e - mj->unit0[o]) * ROW_UNIT;
        if (i1 > mj->n[o])
            i1 = mj->n[o];
        if (i0 < i1)
            gemm_rows(&mj->base, &mj->g[o], i0, i1);
        lo = e;
    }
}

/* Aligned: part ith of the row units, in every op, then rows_done. */
static void multi_aligned_task(void *ctx, int ith, int nth)
{
    multi_job *mj = ctx;
    long lo, hi;
    ekv_split_range(mj->unit0[1], ith, nth, &lo, &hi);
    int64_t i0 = (int64_t)lo * ROW_UNIT, i1 = (int64_t)hi * ROW_UNIT;
    if (i1 > mj->n[0])
        i1 = mj->n[0];
    if (i0 >= i1)
        return;
    for (int o = 0; o < mj->n_ops; o++)
        gemm_rows(&mj->base, &mj->g[o], i0, i1);
    mj->rows_done(mj->rows_ctx, i0, i1);
}

ekv_status kern_matmul_multi(ekv_pool *pool, const kern_mm_op *ops, int n_ops, int64_t k,
                             const float *X, int64_t m, void *scratch, kern_mm_rows_fn rows_done,
                             void *rows_ctx, ekv_error *err)
{
    kern_init();
    if (!ops || n_ops <= 0 || n_ops > KERN_MM_MAX_OPS)
        return ekv_error_set(err, EKV_EINVAL, "matmul: %d products in one call (1 to %d)", n_ops,
                             KERN_MM_MAX_OPS);
    multi_job mj = {.n_ops = n_ops, .rows_done = rows_done, .rows_ctx = rows_ctx};
    size_t ldw[KERN_MM_MAX_OPS];
    int same_type = 1;
    double work = 0;
    for (int o = 0; o < n_ops; o++) {
        ldw[o] = ops[o].ldw;
        ekv_status rc = check_operands(ops[o].w, ops[o].wtype, ops[o].n, k, &ldw[o], X, m,
                                       ops[o].y, ops[o].ldy, scratch, err);
        if (rc)
            return rc;
        if (rows_done && ops[o].n != ops[0].n)
            return ekv_error_set(err, EKV_EINVAL,
                                 "matmul: products with rows_done need equal n (%lld, %lld)",
                                 (long long)ops[0].n, (long long)ops[o].n);
        same_type &= ops[o].wtype == ops[0].wtype;
        mj.n[o] = ops[o].n;
        mj.unit0[o + 1] = mj.unit0[o] + (long)((ops[o].n + ROW_UNIT - 1) / ROW_UNIT);
        work += (double)ops[o].n * (double)k * (double)m;
    }
    if (m == 0)
        return EKV_OK;
    if (!same_type) { /* each op prepares its own activations */
        for (int o = 0; o < n_ops; o++) {
            ekv_status rc = kern_matmul(pool, ops[o].w, ops[o].wtype, ops[o].n, k, ops[o].ldw, X,
                                        m, ops[o].y, ops[o].ldy, scratch, err);
            if (rc)
                return rc;
        }
        if (rows_done && ops[0].n > 0)
            rows_done(rows_ctx, 0, ops[0].n);
        return EKV_OK;
    }
    mj.base = make_job(ops[0].w, ops[0].wtype, ops[0].n, k, ldw[0], X, m, ops[0].y, ops[0].ldy,
                       scratch);
    for (int o = 0; o < n_ops; o++) {
        mj.g[o] = mj.base.g;
        mj.g[o].w = ops[o].w;
        mj.g[o].w_stride = ldw[o];
        mj.g[o].y = ops[o].y;
        mj.g[o].ldy = ops[o].ldy;
    }
    const int nth = ekv_pool_size(pool);
    const int parallel = pool && nth > 1 && work >= PARALLEL_MIN_WORK;
    prepare(pool, &mj.base, parallel);
    ekv_task_fn task = rows_done ? multi_aligned_task : multi_concat_task;
    const long units = rows_done ? mj.unit0[1] : mj.unit0[n_ops];
    if (units == 0)
        return EKV_OK;
    if (parallel && units > 1)
        ekv_pool_run(pool, task, &mj);
    else
        task(&mj, 0, 1);
    return EKV_OK;
}

ekv_status kern_get_row(const void *W, uint32_t wtype, int64_t k, int64_t row, float *out,
                        ekv_error *err)
{
    quant_kind kind = quant_kind_of(wtype);
    if (kind == QKIND_NONE) {
        const ekv_dtype_info *info = ekv_dtype_get(wtype);
        return ekv_error_set(err, EKV_EUNSUPPORTED, "get_row: weight type %s is not supported",
                             info ? info->name : "(unknown)");
    }
    uint64_t row_bytes;
    if (!W || !out || k <= 0 || row < 0 || !ekv_dtype_row_bytes(wtype, (uint64_t)k, &row_bytes))
        return ekv_error_set(err, EKV_EINVAL, "get_row: bad arguments (k=%lld row=%lld)",
                             (long long)k, (long long)row);
    quant_dequant_row(kind, (const uint8_t *)W + (size_t)row * row_bytes, k, out);
    return EKV_OK;
}
