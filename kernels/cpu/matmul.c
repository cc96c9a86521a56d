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

static void gemm_task(void *ctx, int ith, int nth)
{
    matmul_job *job = ctx;
    long units = (long)((job->n + ROW_UNIT - 1) / ROW_UNIT), lo, hi;
    ekv_split_range(units, ith, nth, &lo, &hi);
    int64_t i0 = (int64_t)lo * ROW_UNIT, i1 = (int64_t)hi * ROW_UNIT;
    if (i1 > job->n)
        i1 = job->n;
    if (i0 >= i1)
        return;
    int64_t xchunk = (int64_t)(X_CHUNK_BYTES / job->g.x_stride);
    xchunk = xchunk < 8 ? 8 : xchunk - xchunk % 4;
    int64_t wblock = (int64_t)(W_BLOCK_BYTES / job->g.w_stride);
    wblock = wblock < ROW_UNIT ? ROW_UNIT : wblock - wblock % ROW_UNIT;
    quant_gemm_fn gemm = job->kt->gemm[job->kind];
    if (job->m <= xchunk) { /* decode and short prompts: one sweep of the weights */
        gemm(&job->g, i0, i1, 0, job->m);
        return;
    }
    for (int64_t ib = i0; ib < i1; ib += wblock) {
        int64_t ie = ib + wblock < i1 ? ib + wblock : i1;
        for (int64_t j0 = 0; j0 < job->m; j0 += xchunk) {
            int64_t j1 = j0 + xchunk < job->m ? j0 + xchunk : job->m;
            gemm(&job->g, ib, ie, j0, j1);
        }
    }
}

ekv_status kern_matmul(ekv_pool *pool, const void *W, uint32_t wtype, int64_t n, int64_t k,
                       size_t ldw, const float *X, int64_t m, float *Y, int64_t ldy, void *scratch,
                       ekv_error *err)
{
    kern_init();
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
    if (ldw == 0)
        ldw = (size_t)row_bytes;
    if (ldw < row_bytes)
        return ekv_error_set(err, EKV_EINVAL, "matmul: weight row stride %zu below a row's %llu bytes",
                             ldw, (unsigned long long)row_bytes);
    size_t prep_bytes = quant_prep_row_bytes(kind, k);
    if (prep_bytes && (!scratch || ((uintptr_t)scratch & 63)))
        return ekv_error_set(err, EKV_EINVAL,
                             "matmul: scratch must be %zu bytes, 64-byte aligned (got %p)",
                             kern_matmul_scratch_bytes(wtype, m, k), scratch);

    matmul_job job = {
        .kt = &isa_tables[atomic_load(&isa_active)],
        .kind = kind,
        .g = {.w = W, .w_stride = ldw, .y = Y, .ldy = ldy, .k = k},
        .X = X,
        .scratch = scratch,
        .prep_bytes = prep_bytes,
        .n = n,
        .m = m,
    };
    if (prep_bytes) {
        job.g.x = scratch;
        job.g.x_stride = prep_bytes;
    } else {
        job.g.x = (const uint8_t *)X;
        job.g.x_stride = (size_t)k * sizeof(float);
    }

    int nth = ekv_pool_size(pool);
    int parallel = pool && nth > 1 && (double)n * (double)k * (double)m >= PARALLEL_MIN_WORK;
    if (prep_bytes) {
        if (parallel && m >= 2 * nth && m * k >= PARALLEL_MIN_WORK / 4)
            ekv_pool_run(pool, prep_task, &job);
        else
            prep_task(&job, 0, 1);
    }
    if (parallel && n > ROW_UNIT)
        ekv_pool_run(pool, gemm_task, &job);
    else
        gemm_task(&job, 0, 1);
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
