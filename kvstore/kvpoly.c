/*
 * kvpoly.c - the polynomial hash over GF(2^128) of kvpoly.h.
 */
#include "kvpoly.h"

#include <stdbool.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EKV_POLY_CLMUL 1
#endif

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

void kvpoly_mul_ref(uint64_t r[2], const uint64_t a[2], const uint64_t b[2])
{
    uint64_t z0 = 0, z1 = 0, v0 = a[0], v1 = a[1];
    for (int i = 0; i < 128; i++) {
        uint64_t bit = (i < 64 ? b[0] >> i : b[1] >> (i - 64)) & 1;
        z0 ^= v0 & (0 - bit);
        z1 ^= v1 & (0 - bit);
        uint64_t carry = v1 >> 63; /* v *= x; x^128 = x^7 + x^2 + x + 1 */
        v1 = v1 << 1 | v0 >> 63;
        v0 = v0 << 1 ^ (0x87 & (0 - carry));
    }
    r[0] = z0;
    r[1] = z1;
}

void kvpoly_key_init(kvpoly_key *k, const uint8_t key[16])
{
    k->pow[0][0] = le64(key);
    k->pow[0][1] = le64(key + 8);
    uint64_t pw[16][2];
    memcpy(pw[0], k->pow[0], sizeof pw[0]);
    for (int i = 1; i < 16; i++)
        kvpoly_mul_ref(pw[i], pw[i - 1], pw[0]);
    for (int i = 0; i < 16; i++) {
        if (i < 4)
            memcpy(k->pow[i], pw[i], sizeof pw[i]);
        memcpy(k->rev[i], pw[15 - i], sizeof pw[i]);
    }
}

void kvpoly_init(kvpoly *p, const kvpoly_key *k)
{
    p->key = k;
    p->x[0] = p->x[1] = 0;
    p->n_buf = 0;
}

/* One block the slow way: X = (X ^ b) * k. */
static void block_ref(kvpoly *p, const uint8_t *b)
{
    uint64_t t[2] = {p->x[0] ^ le64(b), p->x[1] ^ le64(b + 8)};
    kvpoly_mul_ref(p->x, t, p->key->pow[0]);
}

#ifdef EKV_POLY_CLMUL
#define CLMUL __attribute__((target("pclmul,sse2")))

/* The 256-bit product a * b as (lo, hi), unreduced. */
CLMUL static inline void mul256(__m128i a, __m128i b, __m128i *lo, __m128i *hi)
{
    __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x10),
                                _mm_clmulepi64_si128(a, b, 0x01));
    *lo = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x00), _mm_slli_si128(mid, 8));
    *hi = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x11), _mm_srli_si128(mid, 8));
}

/* (lo, hi) mod x^128 + x^7 + x^2 + x + 1: hi * x^128 = hi * 0x87, whose
 * bits past 127 (at most 7) fold once more. */
CLMUL static inline __m128i reduce(__m128i lo, __m128i hi)
{
    const __m128i p = _mm_set_epi64x(0, 0x87);
    __m128i t = _mm_clmulepi64_si128(hi, p, 0x00); /* hi.low * P: < 2^71 */
    __m128i u = _mm_clmulepi64_si128(hi, p, 0x01); /* hi.high * P, at x^64 */
    __m128i r = _mm_xor_si128(_mm_xor_si128(lo, t), _mm_slli_si128(u, 8));
    return _mm_xor_si128(r, _mm_clmulepi64_si128(u, p, 0x01)); /* u's top at x^128 */
}

/* n whole blocks (n a multiple of 4 takes the fast loop; the rest one by
 * one): X = (X ^ b0) k^4 ^ b1 k^3 ^ b2 k^2 ^ b3 k per four. */
CLMUL static void blocks_clmul(kvpoly *p, const uint8_t *b, size_t n)
{
    const kvpoly_key *k = p->key;
    __m128i k1 = _mm_set_epi64x((long long)k->pow[0][1], (long long)k->pow[0][0]);
    __m128i k2 = _mm_set_epi64x((long long)k->pow[1][1], (long long)k->pow[1][0]);
    __m128i k3 = _mm_set_epi64x((long long)k->pow[2][1], (long long)k->pow[2][0]);
    __m128i k4 = _mm_set_epi64x((long long)k->pow[3][1], (long long)k->pow[3][0]);
    __m128i x = _mm_set_epi64x((long long)p->x[1], (long long)p->x[0]);
    for (; n >= 4; n -= 4, b += 64) {
        __m128i lo, hi, l, h;
        mul256(_mm_xor_si128(x, _mm_loadu_si128((const __m128i *)b)), k4, &lo, &hi);
        mul256(_mm_loadu_si128((const __m128i *)(b + 16)), k3, &l, &h);
        lo = _mm_xor_si128(lo, l), hi = _mm_xor_si128(hi, h);
        mul256(_mm_loadu_si128((const __m128i *)(b + 32)), k2, &l, &h);
        lo = _mm_xor_si128(lo, l), hi = _mm_xor_si128(hi, h);
        mul256(_mm_loadu_si128((const __m128i *)(b + 48)), k1, &l, &h);
        x = reduce(_mm_xor_si128(lo, l), _mm_xor_si128(hi, h));
    }
    for (; n > 0; n--, b += 16) {
        __m128i lo, hi;
        mul256(_mm_xor_si128(x, _mm_loadu_si128((const __m128i *)b)), k1, &lo, &hi);
        x = reduce(lo, hi);
    }
    _mm_storeu_si128((__m128i *)p->x, x); /* x86: the low half first */
}

#define VCLMUL __attribute__((target("avx512f,avx512bw,avx512dq,vpclmulqdq,pclmul,sse2")))

/* Sixteen blocks at a time, four per 512-bit register, each times its power
 * of k (k^16 for the first, carrying X, down to k^1), the products summed
 * lane-wise, the four lanes summed, one reduction. The rest: blocks_clmul. */
VCLMUL static void blocks_vclmul(kvpoly *p, const uint8_t *b, size_t n)
{
    const kvpoly_key *k = p->key;
    __m512i kz[4];
    for (int j = 0; j < 4; j++)
        kz[j] = _mm512_loadu_si512((const void *)k->rev[4 * j]);
    __m128i x = _mm_loadu_si128((const __m128i *)p->x);
    for (; n >= 16; n -= 16, b += 256) {
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            __m512i v = _mm512_loadu_si512((const void *)(b + 64 * j));
            if (j == 0)
                v = _mm512_xor_si512(v, _mm512_zextsi128_si512(x));
            __m512i mid = _mm512_xor_si512(_mm512_clmulepi64_epi128(v, kz[j], 0x10),
                                           _mm512_clmulepi64_epi128(v, kz[j], 0x01));
            lo = _mm512_xor_si512(lo, _mm512_xor_si512(_mm512_clmulepi64_epi128(v, kz[j], 0x00),
                                                       _mm512_bslli_epi128(mid, 8)));
            hi = _mm512_xor_si512(hi, _mm512_xor_si512(_mm512_clmulepi64_epi128(v, kz[j], 0x11),
                                                       _mm512_bsrli_epi128(mid, 8)));
        }
        __m128i l = _mm_xor_si128(
            _mm_xor_si128(_mm512_castsi512_si128(lo), _mm512_extracti64x2_epi64(lo, 1)),
            _mm_xor_si128(_mm512_extracti64x2_epi64(lo, 2), _mm512_extracti64x2_epi64(lo, 3)));
        __m128i h = _mm_xor_si128(
            _mm_xor_si128(_mm512_castsi512_si128(hi), _mm512_extracti64x2_epi64(hi, 1)),
            _mm_xor_si128(_mm512_extracti64x2_epi64(hi, 2), _mm512_extracti64x2_epi64(hi, 3)));
        x = reduce(l, h);
    }
    _mm_storeu_si128((__m128i *)p->x, x);
    if (n)
        blocks_clmul(p, b, n);
}

/* 0: bit-serial, 1: PCLMULQDQ, 2: VPCLMULQDQ on AVX-512. */
static int clmul_level(void)
{
    static int known = -1; /* a benign race: every thread computes the same answer */
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k < 0) {
        __builtin_cpu_init();
        k = !__builtin_cpu_supports("pclmul")       ? 0
            : __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq")
                ? 2
                : 1;
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k;
}
#endif

static void blocks(kvpoly *p, const uint8_t *b, size_t n)
{
#ifdef EKV_POLY_CLMUL
    int level = clmul_level();
    if (level == 2 && n >= 16) {
        blocks_vclmul(p, b, n);
        return;
    }
    if (level >= 1) {
        blocks_clmul(p, b, n);
        return;
    }
#endif
    for (; n > 0; n--, b += 16)
        block_ref(p, b);
}

void kvpoly_update(kvpoly *p, const void *data, size_t len)
{
    const uint8_t *d = data;
    if (p->n_buf) {
        size_t take = 16 - p->n_buf < len ? 16 - p->n_buf : len;
        memcpy(p->buf + p->n_buf, d, take);
        p->n_buf += take;
        d += take;
        len -= take;
        if (p->n_buf < 16)
            return;
        blocks(p, p->buf, 1);
        p->n_buf = 0;
    }
    blocks(p, d, len / 16);
    d += len / 16 * 16;
    memcpy(p->buf, d, len % 16);
    p->n_buf = len % 16;
}

void kvpoly_final(kvpoly *p, uint8_t out[16])
{
    if (p->n_buf) {
        memset(p->buf + p->n_buf, 0, 16 - p->n_buf);
        blocks(p, p->buf, 1);
        p->n_buf = 0;
    }
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(p->x[0] >> (8 * i));
        out[8 + i] = (uint8_t)(p->x[1] >> (8 * i));
    }
}
