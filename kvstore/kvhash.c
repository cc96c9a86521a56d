/*
 * kvhash.c - key derivation and the value checksum.
 *
 * Keys are SHA-256 over a domain label and fixed-width little-endian fields,
 * so two different (model, prefix, layer, head, TP layout) tuples cannot
 * serialise to the same bytes. The chain value of block i covers every token
 * up to and including block i, so a key names a whole prefix, not just the
 * block's own 16 tokens.
 *
 * The checksum follows xxHash3's long-input design (Yann Collet, xxhash.h,
 * "XXH3_accumulate_512" and "XXH3_mergeAccs"): eight 64-bit lanes, each
 * 64-byte stripe adds lo32(x ^ s) * hi32(x ^ s) to its lane and x to the
 * neighbouring lane; every 1 KiB the lanes are scrambled; the tail is
 * zero-padded and the length mixed into the result. It is not xxHash3 (own
 * secret, simplified tail), it detects corruption, it is not a MAC. The
 * stripe loop has SSE2, AVX2 and AVX-512 versions (the best this CPU runs is
 * chosen once) that must equal the scalar reference bit for bit;
 * test_kvlocal checks each.
 */
#include "entrokv/kvstore.h"

#include <string.h>

#include "entrokv/sha256.h"

/* Test hooks (not in the public header): the portable checksum, and the
 * checksum with one instruction set (false if this CPU lacks it); every
 * variant must equal the portable one. */
enum { KVHASH_SCALAR, KVHASH_SSE2, KVHASH_AVX2, KVHASH_AVX512 };
uint64_t kvstore_checksum_reference(const void *data, size_t len);
bool kvstore_checksum_isa(int isa, const void *data, size_t len, uint64_t *out);

static void put_u32(ekv_sha256 *s, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    sha256_update(s, b, sizeof b);
}

void kvstore_chain_hash(const uint8_t prev[KVSTORE_HASH_BYTES], const int32_t *tokens, int32_t n,
                        uint8_t out[KVSTORE_HASH_BYTES])
{
    static const uint8_t zero[KVSTORE_HASH_BYTES];
    ekv_sha256 s;
    sha256_init(&s);
    sha256_update(&s, "ekv-chain1", 10);
    sha256_update(&s, prev ? prev : zero, KVSTORE_HASH_BYTES);
    put_u32(&s, (uint32_t)(n > 0 ? n : 0));
    for (int32_t i = 0; i < n; i++)
        put_u32(&s, (uint32_t)tokens[i]);
    sha256_final(&s, out);
}

void kvstore_key_make(const char *model_id, const uint8_t prev_chain_hash[KVSTORE_HASH_BYTES],
                      const int32_t *tokens, int32_t n, int32_t layer, int32_t head,
                      int32_t tp_rank, int32_t tp_size, kvstore_key *out)
{
    uint8_t chain[KVSTORE_HASH_BYTES];
    size_t mlen = model_id ? strlen(model_id) : 0;
    kvstore_chain_hash(prev_chain_hash, tokens, n, chain);
    ekv_sha256 s;
    sha256_init(&s);
    sha256_update(&s, "ekv-key1", 8);
    put_u32(&s, (uint32_t)mlen);
    sha256_update(&s, model_id ? model_id : "", mlen);
    sha256_update(&s, chain, sizeof chain);
    put_u32(&s, (uint32_t)layer);
    put_u32(&s, (uint32_t)head);
    put_u32(&s, (uint32_t)tp_rank);
    put_u32(&s, (uint32_t)tp_size);
    sha256_final(&s, out->b);
}

void kvstore_key_hex(const kvstore_key *key, char out[17])
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 8; i++) {
        out[2 * i] = hex[key->b[i] >> 4];
        out[2 * i + 1] = hex[key->b[i] & 15];
    }
    out[16] = 0;
}

const char *kvstore_result_name(kvstore_result r)
{
    switch (r) {
    case KVSTORE_OK: return "ok";
    case KVSTORE_MISS: return "miss";
    case KVSTORE_TOOSMALL: return "too_small";
    case KVSTORE_NOSPACE: return "no_space";
    case KVSTORE_FAILED: return "failed";
    }
    return "?";
}

/* ---- checksum ---- */

#define P32_1 0x9E3779B1u
#define P32_2 0x85EBCA77u
#define P32_3 0xC2B2AE3Du
#define P64_1 0x9E3779B185EBCA87ull
#define P64_2 0xC2B2AE3D27D4EB4Full
#define P64_3 0x165667B19E3779F9ull
#define P64_4 0x85EBCA77C2B2AE63ull
#define P64_5 0x27D4EB2F165667C5ull

#define STRIPE 64
#define STRIPES_PER_BLOCK 16

static const uint64_t SECRET[8] = {
    0xbe4ba423396cfeb8ull, 0x1cad21f72c81017cull, 0xdb979083e96dd4deull, 0x1f67b3b7a4a44072ull,
    0x78e5c0cc4ee679cbull, 0x2172ffcc7dd05a82ull, 0x8e2443f7744608b8ull, 0x4c263a81e69035e0ull,
};

static void scramble(uint64_t acc[8])
{
    for (int i = 0; i < 8; i++)
        acc[i] = (acc[i] ^ (acc[i] >> 47) ^ SECRET[7 - i]) * P32_1;
}

/* n whole stripes into acc: acc[i] += x[i ^ 1] + lo32(k) * hi32(k) with
 * k = x[i] ^ SECRET[i], and a scramble after each whole block of 16
 * stripes. The portable reference; the SIMD versions below compute exactly
 * the same sums (compilers vectorise this form poorly). */
static void stripes_scalar(uint64_t acc[8], const uint8_t *p, size_t n)
{
    for (size_t s = 0; s < n; s++, p += STRIPE) {
        uint64_t x[8];
        memcpy(x, p, sizeof x);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        for (int i = 0; i < 8; i++)
            x[i] = __builtin_bswap64(x[i]);
#endif
        for (int i = 0; i < 8; i++) {
            uint64_t k = x[i] ^ SECRET[i];
            acc[i] += x[i ^ 1] + (k & 0xffffffffu) * (k >> 32);
        }
        if (s % STRIPES_PER_BLOCK == STRIPES_PER_BLOCK - 1)
            scramble(acc);
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

/* Values usually arrive cold (received a MiB ago, or sitting in a store),
 * and one thread hashing them reads at about 10 GB/s on the hardware
 * prefetcher alone. Asking for the line 4 KiB ahead of each stripe cut the
 * time a client spends checking a 1 MiB get over TCP by about a third
 * (docs/kvstore.md) and costs nothing measurable on hot data. The
 * address is formed as an integer: it may lie past the value, which a
 * prefetch tolerates and pointer arithmetic would not. */
#define PREFETCH_AHEAD 4096
#define PREFETCH(p) _mm_prefetch((const char *)((uintptr_t)(p) + PREFETCH_AHEAD), _MM_HINT_T0)

/* SSE2 (every x86-64): 4 vectors of 2 lanes; the shuffle swaps the two
 * 64-bit halves, which is x[i ^ 1]. The scramble stays scalar: SSE2 has
 * no cheap 64-bit multiply and it runs once per KiB. */
static void stripes_sse2(uint64_t acc[8], const uint8_t *p, size_t n)
{
    __m128i sec[4];
    for (int j = 0; j < 4; j++)
        sec[j] = _mm_loadu_si128((const __m128i *)(SECRET + 2 * j));
    while (n) {
        size_t m = n < STRIPES_PER_BLOCK ? n : STRIPES_PER_BLOCK;
        __m128i a[4];
        for (int j = 0; j < 4; j++)
            a[j] = _mm_loadu_si128((const __m128i *)(acc + 2 * j));
        for (size_t s = 0; s < m; s++, p += STRIPE) {
            PREFETCH(p);
            for (int j = 0; j < 4; j++) {
                __m128i x = _mm_loadu_si128((const __m128i *)(p + 16 * j));
                __m128i k = _mm_xor_si128(x, sec[j]);
                __m128i prod = _mm_mul_epu32(k, _mm_srli_epi64(k, 32));
                __m128i sw = _mm_shuffle_epi32(x, _MM_SHUFFLE(1, 0, 3, 2));
                a[j] = _mm_add_epi64(a[j], _mm_add_epi64(prod, sw));
            }
        }
        for (int j = 0; j < 4; j++)
            _mm_storeu_si128((__m128i *)(acc + 2 * j), a[j]);
        if (m == STRIPES_PER_BLOCK)
            scramble(acc);
        n -= m;
    }
}

/* The lanes stay in registers for the whole value, scramble included:
 * (v ^ v >> 47 ^ s) * P32_1 mod 2^64 is lo32(v) * P + (hi32(v) * P << 32). */
#define SCRAMBLE_VEC(W, v, srev, prime)                                                           \
    do {                                                                                           \
        v = _mm##W##_xor_si##W(_mm##W##_xor_si##W(v, _mm##W##_srli_epi64(v, 47)), srev);          \
        v = _mm##W##_add_epi64(                                                                    \
            _mm##W##_mul_epu32(v, prime),                                                          \
            _mm##W##_slli_epi64(_mm##W##_mul_epu32(_mm##W##_srli_epi64(v, 32), prime), 32));       \
    } while (0)

__attribute__((target("avx2"))) static void stripes_avx2(uint64_t acc[8], const uint8_t *p,
                                                          size_t n)
{
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc);
    __m256i a1 = _mm256_loadu_si256((const __m256i *)(acc + 4));
    const __m256i s0 = _mm256_loadu_si256((const __m256i *)SECRET);
    const __m256i s1 = _mm256_loadu_si256((const __m256i *)(SECRET + 4));
    const __m256i r0 = _mm256_set_epi64x((long long)SECRET[4], (long long)SECRET[5],
                                         (long long)SECRET[6], (long long)SECRET[7]);
    const __m256i r1 = _mm256_set_epi64x((long long)SECRET[0], (long long)SECRET[1],
                                         (long long)SECRET[2], (long long)SECRET[3]);
    const __m256i prime = _mm256_set1_epi64x(P32_1);
    while (n) {
        size_t m = n < STRIPES_PER_BLOCK ? n : STRIPES_PER_BLOCK;
        for (size_t s = 0; s < m; s++, p += STRIPE) {
            PREFETCH(p);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)p);
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(p + 32));
            __m256i k0 = _mm256_xor_si256(x0, s0), k1 = _mm256_xor_si256(x1, s1);
            __m256i p0 = _mm256_mul_epu32(k0, _mm256_srli_epi64(k0, 32));
            __m256i p1 = _mm256_mul_epu32(k1, _mm256_srli_epi64(k1, 32));
            a0 = _mm256_add_epi64(a0, _mm256_add_epi64(p0, _mm256_shuffle_epi32(x0, 0x4e)));
            a1 = _mm256_add_epi64(a1, _mm256_add_epi64(p1, _mm256_shuffle_epi32(x1, 0x4e)));
        }
        if (m == STRIPES_PER_BLOCK) {
            SCRAMBLE_VEC(256, a0, r0, prime);
            SCRAMBLE_VEC(256, a1, r1, prime);
        }
        n -= m;
    }
    _mm256_storeu_si256((__m256i *)acc, a0);
    _mm256_storeu_si256((__m256i *)(acc + 4), a1);
}

/* One 64-byte stripe is one register: half the instructions of AVX2. With
 * dst, each stripe hashed is also stored there: the checksum is of exactly
 * the bytes written, whatever the source does meanwhile, and the value
 * crosses the memory system once. With nt the stores are non-temporal (dst
 * 64-byte aligned): they neither read dst's lines first nor push the
 * caller's data out of cache, which for a value going into a store that
 * nobody reads soon nearly doubled put bandwidth into a same-host daemon's
 * region (docs/kvstore.md). Inlined into callers with constant dst and nt,
 * so no loop tests them. */
__attribute__((target("avx512f"), always_inline)) static inline void
avx512_loop(uint64_t acc[8], uint8_t *dst, const uint8_t *p, size_t n, bool nt)
{
    __m512i a = _mm512_loadu_si512(acc);
    const __m512i sec = _mm512_loadu_si512(SECRET);
    const __m512i rev = _mm512_set_epi64(
        (long long)SECRET[0], (long long)SECRET[1], (long long)SECRET[2], (long long)SECRET[3],
        (long long)SECRET[4], (long long)SECRET[5], (long long)SECRET[6], (long long)SECRET[7]);
    const __m512i prime = _mm512_set1_epi64(P32_1);
    while (n) {
        size_t m = n < STRIPES_PER_BLOCK ? n : STRIPES_PER_BLOCK;
        for (size_t s = 0; s < m; s++, p += STRIPE) {
            PREFETCH(p);
            __m512i x = _mm512_loadu_si512(p);
            if (dst) {
                if (nt)
                    _mm512_stream_si512((void *)dst, x);
                else
                    _mm512_storeu_si512(dst, x);
                dst += STRIPE;
            }
            __m512i k = _mm512_xor_si512(x, sec);
            __m512i prod = _mm512_mul_epu32(k, _mm512_srli_epi64(k, 32));
            a = _mm512_add_epi64(a, _mm512_add_epi64(prod, _mm512_shuffle_epi32(x, 0x4e)));
        }
        if (m == STRIPES_PER_BLOCK)
            SCRAMBLE_VEC(512, a, rev, prime);
        n -= m;
    }
    if (nt)
        _mm_sfence(); /* the value is visible before whatever the caller sends next */
    _mm512_storeu_si512(acc, a);
}

__attribute__((target("avx512f"))) static void stripes_avx512(uint64_t acc[8], const uint8_t *p,
                                                              size_t n)
{
    avx512_loop(acc, NULL, p, n, false);
}

__attribute__((target("avx512f"))) static void copy_stripes_avx512(uint64_t acc[8], uint8_t *dst,
                                                                   const uint8_t *p, size_t n)
{
    avx512_loop(acc, dst, p, n, false);
}

__attribute__((target("avx512f"))) static void
copy_stripes_nt_avx512(uint64_t acc[8], uint8_t *dst, const uint8_t *p, size_t n)
{
    avx512_loop(acc, dst, p, n, true);
}
#endif

typedef void (*stripes_fn)(uint64_t acc[8], const uint8_t *p, size_t n);

/* The variants, best last; test_kvlocal checks each this CPU runs against
 * the scalar one. */
static stripes_fn variant(int isa)
{
#if defined(__x86_64__)
    switch (isa) {
    case KVHASH_SSE2: return stripes_sse2;
    case KVHASH_AVX2: return __builtin_cpu_supports("avx2") ? stripes_avx2 : NULL;
    case KVHASH_AVX512: return __builtin_cpu_supports("avx512f") ? stripes_avx512 : NULL;
    default: break;
    }
#endif
    return isa == KVHASH_SCALAR ? stripes_scalar : NULL;
}

static uint64_t fold(uint64_t a, uint64_t b)
{
    __extension__ unsigned __int128 m = (unsigned __int128)a * b;
    return (uint64_t)m ^ (uint64_t)(m >> 64);
}

static uint64_t avalanche(uint64_t h)
{
    h ^= h >> 37;
    h *= 0x165667919E3779F9ull;
    return h ^ (h >> 32);
}

static const uint64_t ACC_INIT[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};

/* The zero-padded last partial stripe, then the lanes folded with len. */
static uint64_t finish(uint64_t acc[8], stripes_fn fn, const uint8_t *tail, size_t len)
{
    if (len % STRIPE) {
        uint8_t last[STRIPE] = {0};
        memcpy(last, tail, len % STRIPE);
        fn(acc, last, 1);
    }
    uint64_t h = (uint64_t)len * P64_1;
    for (int i = 0; i < 4; i++)
        h += fold(acc[2 * i] ^ SECRET[(2 * i + 3) & 7], acc[2 * i + 1] ^ SECRET[(2 * i + 6) & 7]);
    return avalanche(h);
}

static uint64_t checksum_with(stripes_fn fn, const void *data, size_t len)
{
    uint64_t acc[8];
    memcpy(acc, ACC_INIT, sizeof acc);
    fn(acc, data, len / STRIPE);
    return finish(acc, fn, (const uint8_t *)data + len / STRIPE * STRIPE, len);
}

static stripes_fn best_variant(void)
{
    static stripes_fn best; /* racy first use is harmless: every thread finds the same */
    if (!best)
        for (int isa = KVHASH_SCALAR; isa <= KVHASH_AVX512; isa++)
            if (variant(isa))
                best = variant(isa);
    return best;
}

uint64_t kvstore_checksum(const void *data, size_t len)
{
    return checksum_with(best_variant(), data, len);
}

static uint64_t checksum_copy(void *dst, const void *src, size_t len, bool nt)
{
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f")) {
        uint64_t acc[8];
        size_t whole = len / STRIPE * STRIPE;
        memcpy(acc, ACC_INIT, sizeof acc);
        if (nt && (uintptr_t)dst % STRIPE == 0)
            copy_stripes_nt_avx512(acc, dst, src, len / STRIPE);
        else
            copy_stripes_avx512(acc, dst, src, len / STRIPE);
        memcpy((uint8_t *)dst + whole, (const uint8_t *)src + whole, len - whole);
        return finish(acc, stripes_avx512, (const uint8_t *)dst + whole, len);
    }
#endif
    (void)nt;
    memcpy(dst, src, len);
    return kvstore_checksum(dst, len); /* of the copy: what the caller got is what was checked */
}

uint64_t kvstore_checksum_copy(void *dst, const void *src, size_t len)
{
    return checksum_copy(dst, src, len, false);
}

uint64_t kvstore_checksum_copy_nt(void *dst, const void *src, size_t len)
{
    return checksum_copy(dst, src, len, true);
}

void kvstore_sum_init(kvstore_sum *s)
{
    memcpy(s->acc, ACC_INIT, sizeof s->acc);
    s->done = 0;
}

/* Every step but the last covers whole 1 KiB blocks, so the scrambles fall
 * where one pass puts them. */
bool kvstore_sum_step(kvstore_sum *s, const void *value, size_t len, size_t budget,
                      uint64_t *out)
{
    const size_t block = STRIPE * STRIPES_PER_BLOCK;
    stripes_fn fn = best_variant();
    size_t whole = len / STRIPE * STRIPE;
    size_t n = budget < block ? block : budget / block * block;
    if (n > whole - s->done)
        n = whole - s->done;
    fn(s->acc, (const uint8_t *)value + s->done, n / STRIPE);
    s->done += n;
    if (s->done < whole)
        return false;
    *out = finish(s->acc, fn, (const uint8_t *)value + whole, len);
    return true;
}

bool kvstore_checksum_isa(int isa, const void *data, size_t len, uint64_t *out)
{
    stripes_fn fn = variant(isa);
    if (fn)
        *out = checksum_with(fn, data, len);
    return fn != NULL;
}

uint64_t kvstore_checksum_reference(const void *data, size_t len)
{
    return checksum_with(stripes_scalar, data, len);
}
