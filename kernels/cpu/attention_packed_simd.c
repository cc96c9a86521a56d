/*
 * attention_packed_simd.c - the AVX2 and AVX-512 paths of attention over a
 * view with SparK's packed keys (attention_packed.c holds the row format and
 * the scalar reference).
 *
 * Per packed token the key is rebuilt once for the GQA group, a vector of
 * channels at a time: the kept fp16 values are widened and expanded into
 * the kept lanes (AVX-512 vexpandps; AVX2 a vpermps whose lane indices are
 * the lanes' ranks among the kept ones, from BMI2 pdep), the pruned lanes
 * get sm * inv_sqrt_c[j] and their sign bit from the row's sign field by XOR.
 * That is the scalar rebuild's arithmetic lane for lane, so the keys are
 * bit-identical; the dot products run per query in lanes of j (fixed order,
 * independent of g), the softmax is attention.c's vector exp and the values
 * are widened with F16C and accumulated with FMA, token by token as in the
 * scalar path.
 */
#include <math.h>
#include <string.h>

#include "attention_internal.h"

#if defined(__x86_64__)

#include <immintrin.h>

#define AVX2_FN __attribute__((target("avx2,fma,f16c,bmi2")))
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

static size_t mask_bytes(int32_t d) { return ((size_t)d + 7) / 8; }

/* n (<= 16) bits of the field f (nbytes long) from bit p; bits past the
 * field read as 0. */
static inline uint32_t bits_at(const uint8_t *f, size_t nbytes, int32_t p, int n)
{
    const size_t b = (size_t)p / 8;
    uint32_t w = 0;
    for (size_t i = 0; i < 3 && b + i < nbytes; i++)
        w |= (uint32_t)f[b + i] << (8 * i);
    return (w >> (p % 8)) & ((1u << n) - 1u);
}

typedef struct packed_row {
    const uint8_t *mask, *sign;
    size_t sign_bytes;
    float sm; /* sqrt(max(m, 0)) */
    int32_t n_keep;
    const ekv_f16 *vals;
} packed_row;

static inline packed_row row_at(const kern_kv_packed *pk, int32_t t, int32_t d)
{
    const uint8_t *row = pk->rows + (size_t)t * pk->row_bytes;
    packed_row r;
    float m;
    memcpy(&m, row, sizeof m);
    r.sm = sqrtf(m > 0.0f ? m : 0.0f);
    r.mask = row + sizeof(float);
    r.sign = r.mask + mask_bytes(d);
    r.sign_bytes = mask_bytes(d - pk->n_keep);
    r.n_keep = pk->n_keep;
    r.vals = (const ekv_f16 *)(const void *)(row +
                                             ((sizeof(float) + mask_bytes(d) + r.sign_bytes + 1) &
                                              ~(size_t)1));
    return r;
}

static inline int32_t pos_at(const kern_kv_view *kv, int32_t t)
{
    const int32_t np = kv->packed->n, bt = kv->block_tokens;
    return t < np ? kv->packed->pos[t] : kv->pos_blocks[(t - np) / bt][(t - np) % bt];
}

static inline const ekv_f16 *v_at(const kern_kv_view *kv, int32_t t)
{
    const int32_t np = kv->packed->n, bt = kv->block_tokens, d = kv->head_dim;
    return t < np ? kv->packed->v + (size_t)t * d
                  : kv->v_blocks[(t - np) / bt] + (size_t)((t - np) % bt) * d;
}

/* A block token's key, gathered from its block's transposed column. */
static void key_of_block(const kern_kv_view *kv, int32_t t, float *k)
{
    const int32_t np = kv->packed->n, bt = kv->block_tokens;
    const ekv_f16 *kb = kv->k_blocks[(t - np) / bt] + (t - np) % bt;
    for (int32_t j = 0; j < kv->head_dim; j++)
        k[j] = ekv_f16_to_f32(kb[(size_t)j * bt]);
}

/* ---- AVX-512 (head_dim % 16 == 0) ---- */

AVX512_FN static void rebuild_avx512(const packed_row *r, int32_t d, const float *isc, float *k)
{
    float kept[KERN_PACKED_MAX_DIM + 16];
    for (int32_t i = 0; i < r->n_keep; i += 16) { /* masked loads stay in the row */
        const int32_t left = r->n_keep - i;
        const __mmask16 lm = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        _mm512_storeu_ps(kept + i, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, r->vals + i)));
    }
    const __m512 vsm = _mm512_set1_ps(r->sm);
    const __m512i sbit = _mm512_set1_epi32((int32_t)0x80000000u);
    /* head_dim <= 64 (the common case): the whole sign field in one word */
    uint64_t sw = 0;
    if (d <= 64)
        for (size_t b = 0; b < r->sign_bytes; b++)
            sw |= (uint64_t)r->sign[b] << (8 * b);
    int32_t ki = 0, pi = 0;
    for (int32_t j = 0; j < d; j += 16) {
        const uint32_t keep = (uint32_t)r->mask[j / 8] | (uint32_t)r->mask[j / 8 + 1] << 8;
        const int nk = __builtin_popcount(keep);
        /* the sign bits of the next 16 - nk pruned channels, moved to the
         * pruned lanes */
        const __mmask16 s =
            d <= 64 ? (__mmask16)(pi < 64 ? (sw >> pi) & ((1u << (16 - nk)) - 1u) : 0)
                    : (__mmask16)bits_at(r->sign, r->sign_bytes, pi, 16 - nk);
        const __m512i neg = _mm512_maskz_expand_epi32((__mmask16)~keep,
                                                      _mm512_maskz_mov_epi32(s, sbit));
        const __m512 kv = _mm512_maskz_expandloadu_ps((__mmask16)keep, kept + ki);
        const __m512 mag = isc ? _mm512_mul_ps(vsm, _mm512_loadu_ps(isc + j)) : _mm512_setzero_ps();
        const __m512 v = _mm512_mask_blend_ps((__mmask16)keep, mag, kv);
        _mm512_storeu_ps(k + j, _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), neg)));
        ki += nk;
        pi += 16 - nk;
    }
}

/* out_i[j0, j0 + 16 nc) = sum_t p_it v_t (unnormalised), i < G, nc <= 4:
 * the accumulators stay in registers across the tokens (G and NC are
 * compile-time constants at each call). Masked or
 * underflowed probabilities add nothing, so a token is skipped when every
 * query's is 0; a query's FMAs over t are the same whatever G is (adding
 * 0 * v to an accumulator that started at +0 never changes it). */
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
AVX512_INLINE void values_avx512(const kern_kv_view *kv, const float *scores, int32_t n,
                                 float *out, int out_stride, int32_t j0, const int NC, const int G)
{
    __m512 acc[KERN_ATTN_GROUP_MAX][4];
    #pragma GCC unroll 4
    for (int i = 0; i < G; i++)
        #pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
            acc[i][c] = _mm512_setzero_ps();
    for (int32_t t = 0; t < n; t++) {
        __m512 vp[KERN_ATTN_GROUP_MAX];
        bool any = false;
        #pragma GCC unroll 4
        for (int i = 0; i < G; i++) {
            const float p = scores[(size_t)i * n + t];
            vp[i] = _mm512_set1_ps(p);
            any |= p != 0.0f;
        }
        if (!any)
            continue;
        const ekv_f16 *v = v_at(kv, t) + j0;
        if (t + 8 < n) /* the rows are scattered across blocks and arrays */
            _mm_prefetch((const char *)(v_at(kv, t + 8) + j0), _MM_HINT_T0);
        #pragma GCC unroll 4
        for (int c = 0; c < NC; c++) {
            const __m512 vf =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 16 * c)));
            #pragma GCC unroll 4
            for (int i = 0; i < G; i++)
                acc[i][c] = _mm512_fmadd_ps(vp[i], vf, acc[i][c]);
        }
    }
    #pragma GCC unroll 4
    for (int i = 0; i < G; i++)
        #pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(out + (size_t)i * out_stride + j0 + 16 * c, acc[i][c]);
}

/* r[k] = the sum of v[k]'s 16 lanes, k < 16, by a fixed tree: 256-bit
 * halves, then 128-bit quarters, then within quarters; lane 4j + m ends up
 * holding v[4m + j], which the last permute puts back in order. */
AVX512_FN static inline __m512 sum16(const __m512 *v)
{
    __m512 a[8], b[4];
    for (int k = 0; k < 8; k++)
        a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xee));
    for (int k = 0; k < 4; k++)
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xdd));
    const __m512 c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
    const __m512 c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
    const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c0, c1, 0x44), _mm512_shuffle_ps(c0, c1, 0xee));
    return _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d);
}

AVX512_FN static void attend_avx512(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                    int32_t qpos, float scale, float *out, int out_stride,
                                    float *scores, const kern_attn_probe *pr, int q0)
{
    const kern_kv_packed *pk = kv->packed;
    const int32_t d = kv->head_dim, n = kv->n_tokens;
    float k[KERN_PACKED_MAX_DIM], max[KERN_ATTN_GROUP_MAX], inv[KERN_ATTN_GROUP_MAX];
    for (int i = 0; i < KERN_ATTN_GROUP_MAX; i++)
        max[i] = -INFINITY;
    /* a tile of 16 tokens at a time: each token's dot stays a vector of 16
     * partial sums until sum16 reduces the tile's 16 vectors together
     * (a fixed tree per token, so a token's score depends on its own
     * partials only, never on its neighbours or on g) */
    __m512 part[KERN_ATTN_GROUP_MAX][16];
    for (int32_t t0 = 0; t0 < n; t0 += 16) {
        const int cnt = n - t0 < 16 ? (int)(n - t0) : 16;
        uint32_t vis = 0;
        for (int tt = 0; tt < 16; tt++) {
            const int32_t t = t0 + tt;
            if (tt >= cnt || pos_at(kv, t) > qpos) {
                for (int i = 0; i < g; i++)
                    part[i][tt] = _mm512_setzero_ps();
                continue;
            }
            vis |= 1u << tt;
            if (t < pk->n) {
                const packed_row r = row_at(pk, t, d);
                if (t + 8 < pk->n)
                    _mm_prefetch((const char *)(pk->rows + (size_t)(t + 8) * pk->row_bytes),
                                 _MM_HINT_T0);
                rebuild_avx512(&r, d, pk->inv_sqrt_c, k);
            } else {
                key_of_block(kv, t, k);
            }
            for (int i = 0; i < g; i++) {
                const float *q = Q + (size_t)i * q_stride;
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
                for (int32_t j = 16; j < d; j += 16)
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), _mm512_loadu_ps(k + j), acc);
                part[i][tt] = acc;
            }
        }
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int i = 0; i < g; i++) {
            const __m512 sc = _mm512_mask_blend_ps((__mmask16)vis, ninf,
                                                   _mm512_mul_ps(sum16(part[i]), _mm512_set1_ps(scale)));
            _mm512_mask_storeu_ps(scores + (size_t)i * n + t0, (__mmask16)((1u << cnt) - 1u), sc);
            const float mx = _mm512_reduce_max_ps(sc);
            max[i] = mx > max[i] ? mx : max[i];
        }
    }
    if (pr && pr->logits)
        for (int i = 0; i < g; i++)
            memcpy(pr->logits + (size_t)(q0 + i) * n, scores + (size_t)i * n,
                   (size_t)n * sizeof *scores);
    kern_attn_softmax_avx2(scores, n, g, max, inv);
    for (int32_t j0 = 0; j0 < d; j0 += 64) {
        const int nc = d - j0 >= 64 ? 4 : (int)(d - j0) / 16;
#define VALUES_NC(NC)                                                                      \
    switch (g) {                                                                           \
    case 1: values_avx512(kv, scores, n, out, out_stride, j0, NC, 1); break;               \
    case 2: values_avx512(kv, scores, n, out, out_stride, j0, NC, 2); break;               \
    case 3: values_avx512(kv, scores, n, out, out_stride, j0, NC, 3); break;               \
    default: values_avx512(kv, scores, n, out, out_stride, j0, NC, 4); break;              \
    }
        switch (nc) {
        case 1: VALUES_NC(1); break;
        case 2: VALUES_NC(2); break;
        case 3: VALUES_NC(3); break;
        default: VALUES_NC(4); break;
        }
#undef VALUES_NC
    }
    for (int i = 0; i < g; i++) {
        float *o = out + (size_t)i * out_stride;
        const __m512 vi = _mm512_set1_ps(inv[i]);
        for (int32_t j = 0; j < d; j += 16)
            _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), vi));
        if (pr && pr->probs)
            for (int32_t t = 0; t < n; t++)
                pr->probs[(size_t)(q0 + i) * n + t] = scores[(size_t)i * n + t] * inv[i];
    }
}

/* ---- AVX2 + BMI2 (head_dim % 8 == 0) ---- */

AVX2_FN static void rebuild_avx2(const packed_row *r, int32_t d, const float *isc, float *k)
{
    ekv_f16 h[KERN_PACKED_MAX_DIM + 8];
    float kept[KERN_PACKED_MAX_DIM + 8];
    memcpy(h, r->vals, (size_t)r->n_keep * sizeof *h);
    memset(h + r->n_keep, 0, 8 * sizeof *h);
    for (int32_t i = 0; i < r->n_keep; i += 8)
        _mm256_storeu_ps(kept + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    memset(kept + r->n_keep, 0, 8 * sizeof *kept); /* lanes past n_keep: defined, unused */
    const __m256 vsm = _mm256_set1_ps(r->sm);
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i sbit = _mm256_set1_epi32((int32_t)0x80000000u);
    int32_t ki = 0, pi = 0;
    for (int32_t j = 0; j < d; j += 8) {
        const uint32_t keep = r->mask[j / 8];
        const int nk = __builtin_popcount(keep);
        /* lane l (kept) takes kept value ki + its rank among the kept lanes:
         * pdep drops the bytes 0, 1, 2, ... into the kept lanes' bytes */
        const uint64_t lanes = _pdep_u64(keep, 0x0101010101010101ull) * 0xffu;
        const uint64_t rank = _pdep_u64(0x0706050403020100ull, lanes);
        const __m256 kv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(kept + ki),
                                                   _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)rank)));
        /* the next 8 - nk sign bits, moved to the pruned lanes */
        const uint32_t neg = _pdep_u32(bits_at(r->sign, r->sign_bytes, pi, 8 - nk), ~keep & 0xffu);
        const __m256i km = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)keep), lane), lane);
        const __m256i nm = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)neg), lane), lane);
        const __m256 mag = isc ? _mm256_mul_ps(vsm, _mm256_loadu_ps(isc + j)) : _mm256_setzero_ps();
        const __m256 v = _mm256_blendv_ps(mag, kv, _mm256_castsi256_ps(km));
        _mm256_storeu_ps(k + j, _mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(nm, sbit))));
        ki += nk;
        pi += 8 - nk;
    }
}

AVX2_FN static float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* values_avx512's AVX2 twin: out_i[j0, j0 + 8 NC), NC <= 2, i < G, the
 * accumulators (at most 8 ymm) in registers across the tokens. */
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c,bmi2")))
AVX2_INLINE void values_avx2(const kern_kv_view *kv, const float *scores, int32_t n, float *out,
                             int out_stride, int32_t j0, const int NC, const int G)
{
    __m256 acc[KERN_ATTN_GROUP_MAX][2];
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
#pragma GCC unroll 2
        for (int c = 0; c < 2; c++)
            acc[i][c] = _mm256_setzero_ps();
    for (int32_t t = 0; t < n; t++) {
        __m256 vp[KERN_ATTN_GROUP_MAX];
        bool any = false;
#pragma GCC unroll 4
        for (int i = 0; i < G; i++) {
            const float p = scores[(size_t)i * n + t];
            vp[i] = _mm256_set1_ps(p);
            any |= p != 0.0f;
        }
        if (!any)
            continue;
        const ekv_f16 *v = v_at(kv, t) + j0;
#pragma GCC unroll 2
        for (int c = 0; c < NC; c++) {
            const __m256 vf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8 * c)));
#pragma GCC unroll 4
            for (int i = 0; i < G; i++)
                acc[i][c] = _mm256_fmadd_ps(vp[i], vf, acc[i][c]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < G; i++)
#pragma GCC unroll 2
        for (int c = 0; c < NC; c++)
            _mm256_storeu_ps(out + (size_t)i * out_stride + j0 + 8 * c, acc[i][c]);
}

AVX2_FN static void attend_avx2(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                int32_t qpos, float scale, float *out, int out_stride,
                                float *scores, const kern_attn_probe *pr, int q0)
{
    const kern_kv_packed *pk = kv->packed;
    const int32_t d = kv->head_dim, n = kv->n_tokens;
    float k[KERN_PACKED_MAX_DIM], max[KERN_ATTN_GROUP_MAX], inv[KERN_ATTN_GROUP_MAX];
    for (int i = 0; i < KERN_ATTN_GROUP_MAX; i++)
        max[i] = -INFINITY;
    for (int32_t t = 0; t < n; t++) {
        if (pos_at(kv, t) > qpos) {
            for (int i = 0; i < g; i++)
                scores[(size_t)i * n + t] = -INFINITY;
            continue;
        }
        if (t < pk->n) {
            const packed_row r = row_at(pk, t, d);
            rebuild_avx2(&r, d, pk->inv_sqrt_c, k);
        } else {
            key_of_block(kv, t, k);
        }
        for (int i = 0; i < g; i++) {
            const float *q = Q + (size_t)i * q_stride;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
            for (int32_t j = 8; j < d; j += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(k + j), acc);
            const float sc = hsum8(acc) * scale;
            scores[(size_t)i * n + t] = sc;
            max[i] = sc > max[i] ? sc : max[i];
        }
    }
    if (pr && pr->logits)
        for (int i = 0; i < g; i++)
            memcpy(pr->logits + (size_t)(q0 + i) * n, scores + (size_t)i * n,
                   (size_t)n * sizeof *scores);
    kern_attn_softmax_avx2(scores, n, g, max, inv);
    for (int32_t j0 = 0; j0 < d; j0 += 16) {
        if (d - j0 >= 16) {
            switch (g) {
            case 1: values_avx2(kv, scores, n, out, out_stride, j0, 2, 1); break;
            case 2: values_avx2(kv, scores, n, out, out_stride, j0, 2, 2); break;
            case 3: values_avx2(kv, scores, n, out, out_stride, j0, 2, 3); break;
            default: values_avx2(kv, scores, n, out, out_stride, j0, 2, 4); break;
            }
        } else {
            switch (g) {
            case 1: values_avx2(kv, scores, n, out, out_stride, j0, 1, 1); break;
            case 2: values_avx2(kv, scores, n, out, out_stride, j0, 1, 2); break;
            case 3: values_avx2(kv, scores, n, out, out_stride, j0, 1, 3); break;
            default: values_avx2(kv, scores, n, out, out_stride, j0, 1, 4); break;
            }
        }
    }
    for (int i = 0; i < g; i++) {
        float *o = out + (size_t)i * out_stride;
        const __m256 vi = _mm256_set1_ps(inv[i]);
        for (int32_t j = 0; j < d; j += 8)
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(o + j), vi));
        if (pr && pr->probs)
            for (int32_t t = 0; t < n; t++)
                pr->probs[(size_t)(q0 + i) * n + t] = scores[(size_t)i * n + t] * inv[i];
    }
}

bool kern_attend_packed_simd(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                             int32_t qpos, float scale, float *out, int out_stride,
                             float *scores, const kern_attn_probe *pr, int q0)
{
    const kern_isa isa = kern_active_isa();
    const int32_t d = kv->head_dim;
    if (d > KERN_PACKED_MAX_DIM)
        return false;
    if (isa >= KERN_ISA_AVX512 && d % 16 == 0) {
        attend_avx512(kv, Q, g, q_stride, qpos, scale, out, out_stride, scores, pr, q0);
        return true;
    }
    /* pdep is BMI2's; every AVX2 CPU but a few early AMD parts has it */
    if (isa >= KERN_ISA_AVX2 && d % 8 == 0 && __builtin_cpu_supports("bmi2")) {
        attend_avx2(kv, Q, g, q_stride, qpos, scale, out, out_stride, scores, pr, q0);
        return true;
    }
    return false;
}

#endif
