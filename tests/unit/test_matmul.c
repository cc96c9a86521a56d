/*
 * test_matmul.c - kern_matmul and kern_get_row for every weight type and
 * every ISA this CPU has, against references written here from the ggml
 * block layouts (not from kernels/cpu), so a layout mistake shared by the
 * library's scalar and SIMD paths still fails.
 *
 * Per type and shape the test checks that
 *   (a) every SIMD path equals the scalar path within 1e-5 of sum|w*x|:
 *       integer block sums are exact, only float accumulation order differs;
 *   (b) the scalar path equals two double-precision references:
 *       - the dot of the weights with activations quantized here the way
 *         ggml does it (tight: float rounding over the accumulation only),
 *       - the dot with the original float activations, within the bound the
 *         activation quantization allows (derived at quant_bound below);
 *   (c) kern_get_row equals the dequantization written here;
 *   (d) unsupported types and bad shapes are errors, not crashes;
 *   (e) pools of 1, 2 and 3 threads give bit-identical results, and a row
 *       computed alone equals the same row computed in a batch;
 *   (f) a slice of a matrix's columns read in place with the full row
 *       stride equals a packed copy of the slice.
 */
#include <stdint.h>
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kernels.h"

#define U24 (1.0 / 16777216.0) /* float unit roundoff */

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static float frand(void) /* uniform in [-1, 1) */
{
    return (float)(rnd32() * (1.0 / 4294967296.0)) * 2.0f - 1.0f;
}
static float grand(void) /* roughly normal, unit variance */
{
    return (frand() + frand() + frand()) * 1.0f;
}

static float h2f(ekv_f16 h) { return ekv_f16_to_f32(h); }
static ekv_f16 f2h(float f) { return ekv_f32_to_f16(f); }
static ekv_f16 rd16(const uint8_t *p) { return (ekv_f16)(p[0] | p[1] << 8); }
static void wr16(uint8_t *p, ekv_f16 h) { p[0] = (uint8_t)h; p[1] = (uint8_t)(h >> 8); }

/* ---- weights: ggml's reference quantizers, and a dequantizer from the layout ---- */

typedef struct wmat {
    uint32_t type;
    int64_t n, k;
    size_t row_bytes;
    uint8_t *data;
    double *deq;  /* n x k dequantized values */
    double *off;  /* n x k: the Q4_1 min m of the element's block, else 0 */
    double *mag;  /* n x k: |scale * quant| + |offset| (rounding budget of get_row) */
} wmat;

static int block_elems(uint32_t type)
{
    switch (type) {
    case EKV_F32: case EKV_F16: return 1;
    case EKV_Q4_K: case EKV_Q6_K: return 256;
    default: return 32;
    }
}

static void quantize_block(uint32_t type, const float *x, uint8_t *o)
{
    float amax = 0.0f, max = 0.0f, mn = x[0], mx = x[0];
    for (int j = 0; j < 32; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
        mn = x[j] < mn ? x[j] : mn;
        mx = x[j] > mx ? x[j] : mx;
    }
    if (type == EKV_Q4_0) { /* ggml quantize_row_q4_0_ref */
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr16(o, f2h(d));
        for (int j = 0; j < 16; j++) {
            int a = (int)(int8_t)(x[j] * id + 8.5f), b = (int)(int8_t)(x[j + 16] * id + 8.5f);
            a = a < 15 ? a : 15;
            b = b < 15 ? b : 15;
            o[2 + j] = (uint8_t)(a | b << 4);
        }
    } else if (type == EKV_Q4_1) { /* ggml quantize_row_q4_1_ref */
        const float d = (mx - mn) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr16(o, f2h(d));
        wr16(o + 2, f2h(mn));
        for (int j = 0; j < 16; j++) {
            int a = (int)(int8_t)((x[j] - mn) * id + 0.5f), b = (int)(int8_t)((x[j + 16] - mn) * id + 0.5f);
            a = a < 15 ? a : 15;
            b = b < 15 ? b : 15;
            o[4 + j] = (uint8_t)(a | b << 4);
        }
    } else { /* Q8_0, ggml quantize_row_q8_0_ref */
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr16(o, f2h(d));
        for (int j = 0; j < 32; j++)
            o[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

/* Element e of a block as value = scale * quant + offset, from the layouts. */
static void element(uint32_t type, const uint8_t *blk, int e, double *scale_q, double *offset)
{
    *offset = 0.0;
    switch (type) {
    case EKV_Q4_0: {
        int q = e < 16 ? blk[2 + e] & 15 : blk[2 + e - 16] >> 4;
        *scale_q = h2f(rd16(blk)) * (double)(q - 8);
        break;
    }
    case EKV_Q4_1: {
        int q = e < 16 ? blk[4 + e] & 15 : blk[4 + e - 16] >> 4;
        *scale_q = h2f(rd16(blk)) * (double)q;
        *offset = h2f(rd16(blk + 2));
        break;
    }
    case EKV_Q8_0:
        *scale_q = h2f(rd16(blk)) * (double)(int8_t)blk[2 + e];
        break;
    case EKV_Q4_K: { /* d, dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes of nibbles */
        const uint8_t *s = blk + 4;
        int sb = e / 32, sc, mn;
        if (sb < 4) {
            sc = s[sb] & 63;
            mn = s[sb + 4] & 63;
        } else { /* low 4 bits in bytes 8..11, top 2 bits in the top of bytes 0..7 */
            sc = (s[sb + 4] & 15) | (s[sb - 4] >> 6) << 4;
            mn = (s[sb + 4] >> 4) | (s[sb] >> 6) << 4;
        }
        int byte = blk[16 + 32 * (e / 64) + e % 32];
        int q = e % 64 < 32 ? byte & 15 : byte >> 4;
        *scale_q = (double)h2f(rd16(blk)) * sc * q;
        *offset = -(double)h2f(rd16(blk + 2)) * mn;
        break;
    }
    case EKV_Q6_K: { /* ql[128], qh[64], int8 scales[16], d */
        int h = e / 128, t = e % 128, l = t % 32, quad = t / 32;
        int low = blk[64 * h + l + (quad & 1) * 32];
        low = quad >= 2 ? low >> 4 : low & 15;
        int hi = (blk[128 + 32 * h + l] >> (2 * quad)) & 3;
        *scale_q = (double)h2f(rd16(blk + 208)) * (int8_t)blk[192 + e / 16] * ((low | hi << 4) - 32);
        break;
    }
    default:
        *scale_q = 0.0;
    }
}

static void make_weights(wmat *w, uint32_t type, int64_t n, int64_t k)
{
    uint64_t rb = 0;
    ekv_dtype_row_bytes(type, (uint64_t)k, &rb);
    w->type = type;
    w->n = n;
    w->k = k;
    w->row_bytes = (size_t)rb;
    w->data = malloc(w->row_bytes * (size_t)n);
    w->deq = malloc(sizeof(double) * (size_t)(n * k));
    w->off = malloc(sizeof(double) * (size_t)(n * k));
    w->mag = malloc(sizeof(double) * (size_t)(n * k));
    const int be = block_elems(type);
    const int bb = (int)ekv_dtype_get(type)->block_bytes;
    float x[32];
    for (int64_t i = 0; i < n; i++) {
        uint8_t *row = w->data + (size_t)i * w->row_bytes;
        for (int64_t b = 0; b < k / be; b++) {
            uint8_t *blk = row + b * bb;
            double *deq = w->deq + i * k + b * be, *off = w->off + i * k + b * be;
            double *mag = w->mag + i * k + b * be;
            if (type == EKV_F32 || type == EKV_F16) {
                float v = grand() * 0.1f;
                if (type == EKV_F32)
                    memcpy(blk, &v, 4);
                else
                    wr16(blk, f2h(v));
                deq[0] = type == EKV_F32 ? v : h2f(rd16(blk));
                off[0] = 0.0;
                mag[0] = fabs(deq[0]);
                continue;
            }
            if (type == EKV_Q4_K || type == EKV_Q6_K) { /* any bit pattern is a valid block */
                for (int t = 0; t < bb; t++)
                    blk[t] = (uint8_t)rnd32();
                if (type == EKV_Q4_K) {
                    wr16(blk, f2h(0.0005f + 0.002f * (frand() + 1.0f)));
                    wr16(blk + 2, f2h(0.0005f + 0.002f * (frand() + 1.0f)));
                } else {
                    wr16(blk + 208, f2h(0.00005f + 0.0002f * (frand() + 1.0f)));
                }
            } else {
                const float bias = type == EKV_Q4_1 ? 0.05f * frand() : 0.0f;
                for (int t = 0; t < 32; t++)
                    x[t] = grand() * 0.1f + bias;
                quantize_block(type, x, blk);
            }
            for (int t = 0; t < be; t++) {
                double sq, o;
                element(type, blk, t, &sq, &o);
                deq[t] = sq + o;
                off[t] = type == EKV_Q4_1 ? o : 0.0;
                mag[t] = fabs(sq) + fabs(o);
            }
        }
    }
}

static void free_weights(wmat *w)
{
    free(w->data);
    free(w->deq);
    free(w->off);
    free(w->mag);
}

/* ---- references ---- */

typedef struct ref {
    double exact; /* sum w * x with the float activations */
    double quant; /* sum w * x with the activations quantized as ggml does */
    double abs;   /* sum |w * x_quantized|: the scale of rounding errors */
    double bound; /* |quant - exact| allowed by the activation quantization */
    double tight; /* float rounding allowed between quant and the kernel */
} ref;

/*
 * ggml's x86 activation quantizer for 32-blocks: d = amax/127 stored fp16,
 * q = round-half-even(x * 127/amax), s = fp16(d * sum q) with the exact d.
 * quant_bound: |x - fp16(d) q| <= 0.5 d (rounding, + float slop) + 127 d 2^-11
 * (fp16 rounding of d) < 0.57 d per element; for the Q4_1 min term,
 * |s - sum x| <= 32 * 0.5001 d + 2^-11 |s|, taken with margin as 16.01 d + 2^-10 |s|.
 * Q8_K keeps d in float: |x - d q| <= 0.5001 |d| < 0.51 |d|. F16 rounds x by 2^-11.
 */
static void reference(const wmat *w, const float *xrow, int64_t i, ref *r)
{
    const int64_t k = w->k;
    const double *deq = w->deq + i * k, *off = w->off + i * k;
    memset(r, 0, sizeof *r);
    int64_t nterms = k;
    if (w->type == EKV_F32 || w->type == EKV_F16) {
        for (int64_t e = 0; e < k; e++) {
            double xq = w->type == EKV_F16 ? h2f(f2h(xrow[e])) : xrow[e];
            r->exact += deq[e] * xrow[e];
            r->quant += deq[e] * xq;
            r->abs += fabs(deq[e] * xq);
            if (w->type == EKV_F16)
                r->bound += fabs(deq[e] * xrow[e]) / 2048.0;
        }
    } else if (w->type == EKV_Q4_K || w->type == EKV_Q6_K) {
        nterms = k / 256 + 4;
        for (int64_t b = 0; b < k / 256; b++) {
            const float *x = xrow + b * 256;
            float max = 0.0f, amax = 0.0f;
            for (int t = 0; t < 256; t++)
                if (fabsf(x[t]) > amax) {
                    amax = fabsf(x[t]);
                    max = x[t];
                }
            float iscale = amax != 0.0f ? -127.0f / max : 0.0f, d = amax != 0.0f ? 1.0f / iscale : 0.0f;
            for (int t = 0; t < 256; t++) {
                float v = rintf(iscale * x[t]);
                double xq = (double)d * (v < 127.0f ? v : 127.0f);
                double wv = deq[b * 256 + t];
                r->exact += wv * x[t];
                r->quant += wv * xq;
                r->abs += fabs(wv * xq);
                r->bound += 0.51 * fabs((double)d) * fabs(wv);
            }
        }
    } else {
        nterms = k / 32 + 4;
        for (int64_t b = 0; b < k / 32; b++) {
            const float *x = xrow + b * 32;
            float amax = 0.0f;
            for (int t = 0; t < 32; t++)
                amax = fabsf(x[t]) > amax ? fabsf(x[t]) : amax;
            const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
            const double dh = h2f(f2h(d));
            int qsum = 0;
            for (int t = 0; t < 32; t++) {
                float q = rintf(x[t] * id);
                qsum += (int)q;
                double wq = deq[b * 32 + t] - off[b * 32 + t]; /* scale * quant part */
                r->exact += deq[b * 32 + t] * x[t];
                r->quant += wq * dh * q;
                r->abs += fabs(wq * dh * q);
                r->bound += 0.57 * d * fabs(wq);
            }
            const double m = off[b * 32], s = h2f(f2h(d * (float)qsum));
            r->quant += m * s;
            r->abs += fabs(m * s);
            r->bound += fabs(m) * (16.01 * d + fabs(s) / 1024.0);
        }
    }
    /* the kernels' float arithmetic: per-block products plus a chain of
     * nterms additions, each within one unit roundoff of the running sum */
    r->tight = 1.01 * (double)(nterms + 2) * U24 * r->abs + 1e-30;
}

/* ---- running the library ---- */

static void *scratch_for(uint32_t type, int64_t m, int64_t k)
{
    size_t bytes = kern_matmul_scratch_bytes(type, m, k);
    return bytes ? aligned_alloc(64, (bytes + 63) & ~(size_t)63) : NULL;
}

static const float SENTINEL = 12345.0f;

/* Y = X W^T with ldy = n + 3; checks the padding columns are untouched. */
static float *run_matmul(ekv_pool *pool, const wmat *w, const float *X, int64_t m)
{
    const int64_t ldy = w->n + 3;
    float *Y = malloc(sizeof(float) * (size_t)(m * ldy));
    for (int64_t t = 0; t < m * ldy; t++)
        Y[t] = SENTINEL;
    void *scratch = scratch_for(w->type, m, w->k);
    ekv_error err = {0};
    ekv_status st = kern_matmul(pool, w->data, w->type, w->n, w->k, 0, X, m, Y, ldy, scratch, &err);
    if (st != EKV_OK)
        fprintf(stderr, "kern_matmul: %s\n", err.msg);
    CHECK_EQ_INT(st, EKV_OK);
    for (int64_t j = 0; j < m; j++)
        for (int64_t t = w->n; t < ldy; t++)
            CHECK(Y[j * ldy + t] == SENTINEL);
    free(scratch);
    return Y;
}

static const uint32_t TYPES[] = {EKV_F32, EKV_F16, EKV_Q4_0, EKV_Q4_1, EKV_Q8_0, EKV_Q4_K, EKV_Q6_K};
static const int64_t NS[] = {1, 3, 17, 192, 576};
static const int64_t MS[] = {1, 2, 5, 16, 33};
static const int64_t KS_32[] = {32, 64, 576, 1536};
static const int64_t KS_256[] = {256, 768, 1536};

static ekv_pool *pools[4]; /* pools[t] has t threads */

static float *make_activations(int64_t m, int64_t k)
{
    float *X = malloc(sizeof(float) * (size_t)(m * k));
    for (int64_t t = 0; t < m * k; t++)
        X[t] = grand();
    if (m > 1) /* an all-zero block takes the amax == 0 path */
        memset(X + k, 0, sizeof(float) * (size_t)(k < 256 ? k : 256));
    if (m > 2) /* a large outlier, as real activations have */
        X[2 * k + k / 3] = 40.0f;
    return X;
}

static int isa_available(kern_isa isa)
{
    int ok = kern_set_isa(isa) == isa;
    kern_set_isa(KERN_ISA_AVX512);
    return ok;
}

static void check_shape(uint32_t type, int64_t n, int64_t k, int64_t m)
{
    wmat w;
    make_weights(&w, type, n, k);
    float *X = make_activations(m, k);
    const int64_t ldy = n + 3;

    kern_set_isa(KERN_ISA_SCALAR);
    float *ys = run_matmul(pools[2], &w, X, m);
    int fails = ekv_test_failures;
    ref *refs = malloc(sizeof(ref) * (size_t)(n * m));
    for (int64_t j = 0; j < m; j++)
        for (int64_t i = 0; i < n; i++) {
            ref *r = &refs[j * n + i];
            reference(&w, X + j * k, i, r);
            double y = ys[j * ldy + i];
            CHECK_NEAR(y, r->quant, r->tight);          /* (b) tight */
            CHECK_NEAR(y, r->exact, r->bound + r->tight); /* (b) quantization bound */
            if (ekv_test_failures - fails > 4)
                goto report;
        }

    for (kern_isa isa = KERN_ISA_SCALAR; isa <= KERN_ISA_AVX512; isa++) {
        if (!isa_available(isa))
            continue;
        kern_set_isa(isa);
        float *yv = run_matmul(pools[1], &w, X, m);
        if (isa == KERN_ISA_SCALAR) {
            CHECK(memcmp(yv, ys, sizeof(float) * (size_t)(m * ldy)) == 0);
        } else {
            for (int64_t j = 0; j < m; j++)
                for (int64_t i = 0; i < n; i++) /* (a) */
                    CHECK_NEAR(yv[j * ldy + i], ys[j * ldy + i], 1e-5 * refs[j * n + i].abs + 1e-30);
        }
        if (n >= 17) { /* (e): the thread split must not change a single bit */
            for (int t = 2; t <= 3; t++) {
                float *yt = run_matmul(pools[t], &w, X, m);
                CHECK(memcmp(yt, yv, sizeof(float) * (size_t)(m * ldy)) == 0);
                free(yt);
            }
        }
        if (m > 1 && n >= 17) { /* nor the batch: each row alone gives the same bits */
            for (int64_t j = 0; j < m; j += m / 2) {
                float *y1 = run_matmul(pools[2], &w, X + j * k, 1);
                CHECK(memcmp(y1, yv + j * ldy, sizeof(float) * (size_t)n) == 0);
                free(y1);
            }
        }
        free(yv);
        if (ekv_test_failures - fails > 4)
            break;
    }
report:
    if (ekv_test_failures != fails)
        fprintf(stderr, "  ... in %s n=%lld k=%lld m=%lld\n", ekv_dtype_get(type)->name,
                (long long)n, (long long)k, (long long)m);
    kern_set_isa(KERN_ISA_AVX512);
    free(refs);
    free(ys);
    free(X);
    free_weights(&w);
}

static void check_type(uint32_t type)
{
    const int k256 = block_elems(type) == 256;
    const int64_t *ks = k256 ? KS_256 : KS_32;
    const int nk = k256 ? 3 : 4;
    for (int a = 0; a < nk; a++)
        for (size_t b = 0; b < sizeof NS / sizeof NS[0]; b++)
            for (size_t c = 0; c < sizeof MS / sizeof MS[0]; c++) {
                if (ks[a] * NS[b] * MS[c] > 8000000) /* keep the double references fast */
                    continue;
                check_shape(type, NS[b], ks[a], MS[c]);
            }
}

static void test_matmul_f32(void) { check_type(EKV_F32); }
static void test_matmul_f16(void) { check_type(EKV_F16); }
static void test_matmul_q4_0(void) { check_type(EKV_Q4_0); }
static void test_matmul_q4_1(void) { check_type(EKV_Q4_1); }
static void test_matmul_q8_0(void) { check_type(EKV_Q8_0); }
static void test_matmul_q4_k(void) { check_type(EKV_Q4_K); }
static void test_matmul_q6_k(void) { check_type(EKV_Q6_K); }

/* One large prefill shape per type, so the L1/L2 chunking in the dispatcher
 * (several activation chunks and weight blocks) is exercised. */
static void test_matmul_large_prefill_chunks(void)
{
    const uint32_t types[] = {EKV_Q4_1, EKV_Q8_0, EKV_F16};
    for (size_t t = 0; t < 3; t++)
        check_shape(types[t], 1500, 64, 100);
}

/* (f) a weight slice: columns [c0, c0 + kk) of every row of a wider matrix,
 * read in place with the full matrix's row stride (a tensor-parallel rank's
 * share of a row-split projection). It must give the bits a packed copy of
 * those columns gives, and match the double reference over them. */
static void test_matmul_strided_column_slice(void)
{
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; t++) {
        const int be = block_elems(TYPES[t]);
        const int64_t k = be == 256 ? 1536 : 576, n = 19, m = 3;
        const int64_t c0 = be == 256 ? 512 : 192, kk = be == 256 ? 768 : 320;
        wmat w, p;
        make_weights(&w, TYPES[t], n, k);
        make_weights(&p, TYPES[t], n, kk); /* overwritten with w's columns */
        const size_t off = (size_t)(c0 / be) * ekv_dtype_get(TYPES[t])->block_bytes;
        for (int64_t i = 0; i < n; i++) {
            memcpy(p.data + (size_t)i * p.row_bytes, w.data + (size_t)i * w.row_bytes + off,
                   p.row_bytes);
            memcpy(p.deq + i * kk, w.deq + i * k + c0, sizeof(double) * (size_t)kk);
            memcpy(p.off + i * kk, w.off + i * k + c0, sizeof(double) * (size_t)kk);
            memcpy(p.mag + i * kk, w.mag + i * k + c0, sizeof(double) * (size_t)kk);
        }
        float *X = make_activations(m, kk);
        float *ys = malloc(sizeof(float) * (size_t)(m * n));
        void *scratch = scratch_for(TYPES[t], m, kk);
        ekv_error err = {0};
        CHECK_EQ_INT(kern_matmul(pools[2], w.data + off, w.type, n, kk, w.row_bytes, X, m, ys, n,
                                 scratch, &err), EKV_OK);
        float *yp = run_matmul(pools[2], &p, X, m);
        for (int64_t j = 0; j < m; j++) {
            CHECK(memcmp(ys + j * n, yp + j * (n + 3), sizeof(float) * (size_t)n) == 0);
            for (int64_t i = 0; i < n; i++) {
                ref r;
                reference(&p, X + j * kk, i, &r);
                CHECK_NEAR(ys[j * n + i], r.exact, r.bound + 1e-5 * r.abs + 1e-30);
            }
        }
        /* a stride shorter than a row of the slice is an error */
        CHECK_EQ_INT(kern_matmul(pools[2], w.data, w.type, n, kk, p.row_bytes - 1, X, m, ys, n,
                                 scratch, &err), EKV_EINVAL);
        free(scratch);
        free(ys);
        free(yp);
        free(X);
        free_weights(&p);
        free_weights(&w);
    }
}

/* ---- kern_matmul_multi: several products in one region ---- */

/* What a rows_done callback sees: each column range must arrive once, after
 * every op's outputs there are final (they equal the single products). */
typedef struct multi_check {
    int64_t n, m, ldy;
    const float *y[2];      /* the multi call's outputs */
    const float *single[2]; /* kern_matmul's, same ldy */
    int *hits;              /* per column */
    _Atomic int bad;
} multi_check;

static void multi_rows_done(void *ctx, int64_t i0, int64_t i1)
{
    multi_check *c = ctx;
    if (i0 < 0 || i1 > c->n || i0 >= i1) {
        c->bad++;
        return;
    }
    for (int64_t i = i0; i < i1; i++) {
        c->hits[i]++; /* ranges are disjoint, so no two threads touch one column */
        for (int o = 0; o < 2; o++)
            for (int64_t j = 0; j < c->m; j++)
                if (memcmp(&c->y[o][j * c->ldy + i], &c->single[o][j * c->ldy + i], sizeof(float)))
                    c->bad++;
    }
}

/* The ops' outputs equal kern_matmul's bit for bit, for every ISA and
 * thread count, concatenated (Q, K, V) and aligned with rows_done (gate, up);
 * weights of mixed types fall back to one product each. */
static void check_multi(const uint32_t *types, const int64_t *ns, int n_ops, int64_t k, int64_t m,
                        int aligned)
{
    wmat w[KERN_MM_MAX_OPS];
    float *single[KERN_MM_MAX_OPS], *y[KERN_MM_MAX_OPS];
    kern_mm_op ops[KERN_MM_MAX_OPS];
    size_t sb = 0;
    for (int o = 0; o < n_ops; o++) {
        make_weights(&w[o], types[o], ns[o], k);
        size_t b = kern_matmul_scratch_bytes(types[o], m, k);
        sb = b > sb ? b : sb;
    }
    float *X = make_activations(m, k);
    void *scratch = aligned_alloc(64, (sb + 64) & ~(size_t)63);
    int fails = ekv_test_failures;
    for (kern_isa isa = KERN_ISA_SCALAR; isa <= KERN_ISA_AVX512; isa++) {
        if (!isa_available(isa))
            continue;
        kern_set_isa(isa);
        for (int o = 0; o < n_ops; o++)
            single[o] = run_matmul(pools[2], &w[o], X, m);
        for (int t = 1; t <= 3; t++) {
            for (int o = 0; o < n_ops; o++) {
                const int64_t ldy = ns[o] + 3;
                y[o] = malloc(sizeof(float) * (size_t)(m * ldy));
                for (int64_t e = 0; e < m * ldy; e++)
                    y[o][e] = SENTINEL;
                ops[o] = (kern_mm_op){.w = w[o].data, .wtype = types[o], .n = ns[o], .y = y[o],
                                      .ldy = ldy};
            }
            multi_check c = {.n = ns[0], .m = m, .ldy = ns[0] + 3,
                             .y = {y[0], n_ops > 1 ? y[1] : y[0]},
                             .single = {single[0], n_ops > 1 ? single[1] : single[0]},
                             .hits = calloc((size_t)ns[0], sizeof(int))};
            ekv_error err = {0};
            CHECK_EQ_INT(kern_matmul_multi(pools[t], ops, n_ops, k, X, m, scratch,
                                           aligned ? multi_rows_done : NULL, &c, &err),
                         EKV_OK);
            for (int o = 0; o < n_ops; o++) /* padding columns included: untouched */
                CHECK(memcmp(y[o], single[o], sizeof(float) * (size_t)(m * (ns[o] + 3))) == 0);
            if (aligned) {
                CHECK_EQ_INT(c.bad, 0);
                for (int64_t i = 0; i < ns[0]; i++)
                    CHECK_EQ_INT(c.hits[i], 1);
            }
            free(c.hits);
            for (int o = 0; o < n_ops; o++)
                free(y[o]);
            if (ekv_test_failures != fails) {
                fprintf(stderr, "  ... multi %s %s k=%lld m=%lld isa %s threads %d\n",
                        ekv_dtype_get(types[0])->name, aligned ? "aligned" : "concat",
                        (long long)k, (long long)m, kern_isa_name(isa), t);
                break;
            }
        }
        for (int o = 0; o < n_ops; o++)
            free(single[o]);
        if (ekv_test_failures != fails)
            break;
    }
    kern_set_isa(KERN_ISA_AVX512);
    free(scratch);
    free(X);
    for (int o = 0; o < n_ops; o++)
        free_weights(&w[o]);
}

static void test_matmul_multi_matches_single(void)
{
    const uint32_t types[] = {EKV_Q4_1, EKV_Q8_0, EKV_Q4_K, EKV_F32};
    const int64_t ms[] = {1, 5, 40}; /* 40 rows of 576 span two activation chunks */
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        const int64_t k = block_elems(types[t]) == 256 ? 768 : 576;
        const uint32_t ty[3] = {types[t], types[t], types[t]};
        const int64_t qkv[3] = {70, 17, 9}; /* 18 + 5 + 3 row units, two partial */
        const int64_t gu[2] = {70, 70};
        for (size_t a = 0; a < sizeof ms / sizeof ms[0]; a++) {
            check_multi(ty, qkv, 3, k, ms[a], 0);
            check_multi(ty, gu, 2, k, ms[a], 1);
        }
    }
    /* mixed types: one product each, rows_done once over all columns */
    const uint32_t mixed[2] = {EKV_Q4_1, EKV_Q8_0};
    const int64_t gu[2] = {70, 70}, qk[2] = {70, 17};
    check_multi(mixed, qk, 2, 576, 5, 0);
    check_multi(mixed, gu, 2, 576, 5, 1);

    /* errors: no ops, too many, unequal n with rows_done, a bad op */
    wmat w;
    make_weights(&w, EKV_Q4_1, 8, 64);
    float X[64] = {0}, y[16];
    void *scratch = scratch_for(EKV_Q4_1, 1, 64);
    kern_mm_op ops[KERN_MM_MAX_OPS + 1];
    for (int o = 0; o <= KERN_MM_MAX_OPS; o++)
        ops[o] = (kern_mm_op){.w = w.data, .wtype = EKV_Q4_1, .n = 8, .y = y, .ldy = 8};
    ekv_error err = {0};
    CHECK_EQ_INT(kern_matmul_multi(pools[2], ops, 0, 64, X, 1, scratch, NULL, NULL, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul_multi(pools[2], ops, KERN_MM_MAX_OPS + 1, 64, X, 1, scratch, NULL,
                                   NULL, &err), EKV_EINVAL);
    ops[1].n = 4;
    multi_check c = {0};
    CHECK_EQ_INT(kern_matmul_multi(pools[2], ops, 2, 64, X, 1, scratch, multi_rows_done, &c, &err),
                 EKV_EINVAL);
    ops[1].n = 8;
    ops[1].ldy = 7; /* below n */
    CHECK_EQ_INT(kern_matmul_multi(pools[2], ops, 2, 64, X, 1, scratch, NULL, NULL, &err), EKV_EINVAL);
    free(scratch);
    free_weights(&w);
}

/* (c) */
static void test_get_row_matches_dequantization(void)
{
    float out[1536];
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; t++) {
        const int64_t k = block_elems(TYPES[t]) == 256 ? 1536 : 576;
        wmat w;
        make_weights(&w, TYPES[t], 9, k);
        for (int64_t i = 0; i < w.n; i++) {
            ekv_error err = {0};
            CHECK_EQ_INT(kern_get_row(w.data, w.type, k, i, out, &err), EKV_OK);
            /* float evaluation of scale * quant + offset: two roundings */
            for (int64_t e = 0; e < k; e++)
                CHECK_NEAR(out[e], w.deq[i * k + e], 3.0 * U24 * w.mag[i * k + e]);
        }
        free_weights(&w);
    }
}

/* (d) */
static void test_unsupported_and_bad_shapes_are_errors(void)
{
    const uint32_t bad[] = {EKV_Q5_0, EKV_Q5_1, EKV_Q2_K, EKV_BF16, EKV_I32, 77, 100000};
    float X[64] = {0}, Y[64] = {0}, row[64];
    uint8_t W[4096] = {0};
    void *scratch = aligned_alloc(64, 65536);
    ekv_error err;
    for (size_t t = 0; t < sizeof bad / sizeof bad[0]; t++) {
        CHECK(!kern_matmul_supports(bad[t]));
        CHECK_EQ_INT(kern_matmul_scratch_bytes(bad[t], 1, 64), 0);
        err.code = EKV_OK;
        CHECK_EQ_INT(kern_matmul(pools[1], W, bad[t], 2, 64, 0, X, 1, Y, 2, scratch, &err), EKV_EUNSUPPORTED);
        CHECK(err.msg[0] != '\0');
        CHECK_EQ_INT(kern_get_row(W, bad[t], 64, 0, row, &err), EKV_EUNSUPPORTED);
    }
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; t++)
        CHECK(kern_matmul_supports(TYPES[t]));
    /* k not a whole number of blocks, ldy < n, negative sizes, missing scratch */
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q4_1, 2, 48, 0, X, 1, Y, 2, scratch, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q6_K, 2, 64, 0, X, 1, Y, 2, scratch, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q8_0, 4, 64, 0, X, 1, Y, 2, scratch, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q8_0, -1, 64, 0, X, 1, Y, 2, scratch, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q8_0, 2, 64, 0, X, 1, Y, 2, NULL, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q8_0, 2, 64, 0, X, 1, Y, 2, (char *)scratch + 8, &err),
                 EKV_EINVAL);
    CHECK_EQ_INT(kern_get_row(W, EKV_Q4_0, 40, 0, row, &err), EKV_EINVAL);
    CHECK_EQ_INT(kern_matmul_scratch_bytes(EKV_Q4_0, 1, 40), 0);
    /* F32 needs no scratch; empty products are fine */
    CHECK_EQ_INT(kern_matmul_scratch_bytes(EKV_F32, 4, 64), 0);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_F32, 2, 16, 0, X, 1, Y, 2, NULL, &err), EKV_OK);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q8_0, 0, 64, 0, X, 1, Y, 0, NULL, &err), EKV_OK);
    CHECK_EQ_INT(kern_matmul(pools[1], W, EKV_Q8_0, 2, 64, 0, X, 0, Y, 2, NULL, &err), EKV_OK);
    free(scratch);
}

static void test_isa_selection(void)
{
    kern_init();
    CHECK_STR(kern_isa_name(KERN_ISA_SCALAR), "scalar");
    CHECK_STR(kern_isa_name(KERN_ISA_AVX2), "avx2");
    CHECK_STR(kern_isa_name(KERN_ISA_AVX512), "avx512");
    CHECK_EQ_INT(kern_set_isa(KERN_ISA_SCALAR), KERN_ISA_SCALAR);
    CHECK_EQ_INT(kern_active_isa(), KERN_ISA_SCALAR);
    kern_isa best = kern_set_isa(KERN_ISA_AVX512);
    CHECK_EQ_INT(kern_active_isa(), best);
    CHECK(kern_set_isa(KERN_ISA_AVX2) <= KERN_ISA_AVX2);
    kern_set_isa(KERN_ISA_AVX512);
    fprintf(stderr, "     best ISA here: %s\n", kern_isa_name(best));
}

int main(void)
{
    ekv_error err;
    for (int t = 1; t <= 3; t++) {
        pools[t] = ekv_pool_create(t, &err);
        if (!pools[t]) {
            fprintf(stderr, "pool: %s\n", err.msg);
            return 1;
        }
    }
    RUN_TEST(test_isa_selection);
    RUN_TEST(test_unsupported_and_bad_shapes_are_errors);
    RUN_TEST(test_get_row_matches_dequantization);
    RUN_TEST(test_matmul_f32);
    RUN_TEST(test_matmul_f16);
    RUN_TEST(test_matmul_q4_0);
    RUN_TEST(test_matmul_q4_1);
    RUN_TEST(test_matmul_q8_0);
    RUN_TEST(test_matmul_q4_k);
    RUN_TEST(test_matmul_q6_k);
    RUN_TEST(test_matmul_large_prefill_chunks);
    RUN_TEST(test_matmul_strided_column_slice);
    RUN_TEST(test_matmul_multi_matches_single);
    for (int t = 1; t <= 3; t++)
        ekv_pool_destroy(pools[t]);
    return TEST_EXIT();
}
