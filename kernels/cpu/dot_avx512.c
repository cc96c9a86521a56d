/*
 * dot_avx512.c - matmul kernels for AVX-512 F/BW/VL with VNNI (Ice Lake,
 * Sapphire Rapids, Zen 4): tiles of 4 weight rows x 4 activation rows, two
 * 32-element blocks per 512-bit register.
 *
 * The block dot is one VPDPBUSD (unsigned bytes x signed bytes, summed in
 * int32 without saturation), so every weight format is turned into unsigned
 * bytes and the offset is taken back out exactly with the activation sums
 * that the prepared rows carry (quant.h):
 *   Q4_1: nibbles 0..15                 -> no offset; the m_b * s_b term
 *         of the block offsets is a float pass of its own, 16 blocks per
 *         register, that seeds the accumulators
 *   Q4_0: nibbles 0..15 = q + 8         -> accumulator starts at -8 * sum(x)
 *   Q8_0: w ^ 0x80 = w + 128            -> accumulator starts at -128 * sum(x)
 * so the integer sums equal the scalar kernels' and only the float
 * accumulation order differs.
 *
 * Register layout of a block pair (b, b+1). Q8_0 loads both blocks in order,
 * so int32 lanes 0-7 belong to b and 8-15 to b+1. The 4-bit formats load the
 * 16 nibble bytes of each block twice, [qs(b) qs(b+1) qs(b) qs(b+1)], by two
 * broadcast loads, and mask low nibbles in the first half and high nibbles in
 * the second, which leaves the high ones multiplied by 16 (no shift, no
 * shuffle); the activation register is permuted to match (one shuffle per
 * activation row, shared by four weight rows) and its scale carries the exact
 * 1/16 for lanes 8-15. Lanes 0-3 and 8-11 are block b. Scales are spread over
 * the lanes with the same pattern.
 *
 * The activation quantizer is the AVX2 one. For the 4-bit formats this
 * level then reorders each prepared block pair's bytes into the register
 * layout above and stores its lane scales (d of b, b+1, and the same times
 * 1/16) beside the row (quant.h), so a tile's activation operand is two
 * plain loads rather than a load, a shuffle, a permute and a multiply per
 * activation row and block pair; the values are the same, so are the bits.
 */
#include "quant.h"

#if defined(__x86_64__)

#include <immintrin.h>

#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"
#define AVX512_FN __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((always_inline, target(AVX512_TARGET)))

#define TW 4 /* weight rows per tile */
#define TX 4 /* activation rows per tile */

static inline uint32_t load_u32(const void *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* How far ahead of the weight rows being read decode prefetches: the same
 * row 2-4 tiles on, a few KB, which measured best (the hardware prefetcher
 * alone leaves ~30% of the bandwidth unused with four interleaved rows). */
static inline size_t prefetch_distance(size_t w_stride)
{
    return (size_t)TW * w_stride * (w_stride < 640 ? 4 : 2);
}

/* The block (0 = b, 1 = b+1) each int32 lane of a block-pair register holds. */
AVX512_INLINE __m512i lane_block(const int split)
{
    if (split)
        return _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    return _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
}

/* The hi16 lane factor: high nibbles stay in place (x16) in lanes 8-15. */
AVX512_INLINE __m512 hi16_lanes(void)
{
    const float h = 1.0f / 16.0f;
    return _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, h, h, h, h, h, h, h, h);
}

/* A Q4_0/Q4_1 activation row: quant_prep_q8's values, each block pair's qs
 * as [b lo16, b1 lo16, b hi16, b1 hi16] and its scales spread over the lanes
 * (quant.h), which is what tile_q8x used to build per weight tile. */
AVX512_FN static void prep_q8_split_avx512(const float *x, int64_t k, uint8_t *out)
{
    quant_prep_q8_avx2(x, k, out);
    const q8x_row r = q8x_view(out, k);
    const int64_t nbp = q8x_blocks(k);
    const __m512i bidx = lane_block(1);
    const __m512 hi16 = hi16_lanes();
    int8_t *qs = (int8_t *)out;
    float *lanes = (float *)(out + q8x_lanes_offset(k));
    for (int64_t b = 0; b < nbp; b += 2) {
        const __m512i xv = _mm512_loadu_si512((const void *)(qs + b * QK));
        _mm512_storeu_si512((void *)(qs + b * QK), _mm512_shuffle_i64x2(xv, xv, _MM_SHUFFLE(3, 1, 2, 0)));
        const __m512 xd = _mm512_permutexvar_ps(
            bidx, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(r.d + b)))));
        _mm512_storeu_ps(lanes + b / 2 * 16, _mm512_mul_ps(xd, hi16));
    }
}

/*
 * One tile: weight rows i..i+nw-1 x activation rows j..j+nx-1. `kind`, nw and
 * nx are constants at every call site, so the branches and loops fold away.
 */
AVX512_INLINE void tile_q8x(const quant_gemm *g, int64_t i, int64_t j, const int nw, const int nx,
                            const quant_kind kind)
{
    const int split = kind != QKIND_Q8_0;
    const __m512i bidx = lane_block(split);
    const __m512i didx = _mm512_add_epi32(bidx, bidx); /* d of [d0 m0 d1 m1] */
    const __mmask16 first = split ? 0x0011 : 0x0101; /* one lane per block */
    const int shift = kind == QKIND_Q8_0 ? 7 : 3;     /* offset 128 or 8 */
    /* 4-bit formats: low nibbles in lanes 0-7, high nibbles (x16) in 8-15 */
    const __m512i nibbles = _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8((char)0xF0), 1);
    const int64_t nb = g->k / QK;
    const uint8_t *wr[TW];
    q8x_row xr[TX];
    const float *xl[TX]; /* 4-bit formats: the rows' lane scales */
    __m512 acc[TW][TX];
#pragma GCC unroll 4
    for (int r = 0; r < nw; r++)
        wr[r] = g->w + (size_t)(i + r) * g->w_stride;
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        xr[c] = q8x_view(g->x + (size_t)(j + c) * g->x_stride, g->k);
        xl[c] = (const float *)(g->x + (size_t)(j + c) * g->x_stride + q8x_lanes_offset(g->k));
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            acc[r][c] = _mm512_setzero_ps();
    }
    /* block geometry: every block starts with fp16 d (Q4_1: then fp16 m) */
    const size_t bs = kind == QKIND_Q4_0 ? sizeof(blk_q4_0)
                      : kind == QKIND_Q4_1 ? sizeof(blk_q4_1) : sizeof(blk_q8_0);
    if (kind == QKIND_Q4_1) {
        /* The offsets' term sum_b m_b * s_b needs no integer dot: it runs
         * first, 16 blocks per register (the m of 16 blocks gathered, the
         * activations' s loaded), and seeds the accumulators, rather than one
         * FMA per block pair with two useful lanes in the loop below. */
        const __m512i gidx = _mm512_add_epi32(
            _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                               _mm512_set1_epi32((int)bs)),
            _mm512_set1_epi32(2)); /* m after d: its 2 bytes and 2 of qs, low half kept */
        for (int64_t b0 = 0; b0 < nb; b0 += 16) {
            const __mmask16 live = nb - b0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - b0)) - 1);
            __m512 wm16[TW];
#pragma GCC unroll 4
            for (int r = 0; r < nw; r++)
                wm16[r] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_mask_i32gather_epi32(
                    _mm512_setzero_si512(), live, gidx, wr[r] + (size_t)b0 * bs, 1)));
#pragma GCC unroll 4
            for (int c = 0; c < nx; c++) {
                const __m512 xs16 = _mm512_maskz_loadu_ps(live, xr[c].s + b0);
#pragma GCC unroll 4
                for (int r = 0; r < nw; r++)
                    acc[r][c] = _mm512_fmadd_ps(wm16[r], xs16, acc[r][c]);
            }
        }
    }
    const size_t qoff = kind == QKIND_Q4_1 ? 4 : 2;
    const size_t pf = prefetch_distance(g->w_stride);
    for (int64_t b = 0; b < nb; b += 2) {
        /* an odd last block pairs with itself; the activations' zero padding
         * block makes the duplicate contribute exactly nothing */
        const size_t off0 = (size_t)b * bs, off1 = b + 1 < nb ? off0 + bs : off0;
        __m512i wv[TW];
        __m512 wd[TW];
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++) {
            const uint8_t *p0 = wr[r] + off0, *p1 = wr[r] + off1;
            if (nx <= 2) /* decode streams the weights once: fetch a few KB ahead */
                _mm_prefetch((const char *)p0 + pf, _MM_HINT_T0);
            if (split) {
                /* [qs(b) qs(b1) qs(b) qs(b1)] by two broadcast loads; the high
                 * nibbles stay in place (x16), which xd undoes exactly */
                __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p0 + qoff)));
                z = _mm512_mask_broadcast_i32x4(z, 0xF0F0, _mm_loadu_si128((const __m128i *)(p1 + qoff)));
                wv[r] = _mm512_and_si512(z, nibbles);
            } else {
                __m512i z = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(p0 + qoff)));
                z = _mm512_mask_broadcast_i64x4(z, 0xF0, _mm256_loadu_si256((const __m256i *)(p1 + qoff)));
                wv[r] = _mm512_xor_si512(z, _mm512_set1_epi8((char)0x80));
            }
            const __m512 dm = _mm512_castps128_ps512(
                _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)load_u32(p0)), (int)load_u32(p1), 1)));
            wd[r] = _mm512_permutexvar_ps(didx, dm); /* [d0 m0 d1 m1] -> lanes */
        }
#pragma GCC unroll 4
        for (int c = 0; c < nx; c++) {
            /* 4-bit formats: qs already in the weights' order, scales in lanes */
            const __m512i xv = _mm512_loadu_si512((const void *)(xr[c].qs + b * QK));
            const __m512 xd = split ? _mm512_loadu_ps(xl[c] + b / 2 * 16)
                                    : _mm512_permutexvar_ps(bidx, _mm512_castps128_ps512(_mm_castsi128_ps(
                                                                      _mm_loadl_epi64((const __m128i *)(xr[c].d + b)))));
            __m512i bias = _mm512_setzero_si512();
            if (kind != QKIND_Q4_1) {
                __m512i sums = _mm512_maskz_permutexvar_epi32(
                    first, bidx, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(xr[c].sum + b))));
                bias = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, (unsigned)shift));
            }
#pragma GCC unroll 4
            for (int r = 0; r < nw; r++) {
                const __m512i isum = _mm512_dpbusd_epi32(bias, wv[r], xv);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(wd[r], xd), acc[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++)
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            g->y[(j + c) * g->ldy + i + r] = _mm512_reduce_add_ps(acc[r][c]);
}

/* Dispatches a tile whose shape is only known at run time to the instance
 * compiled for it. */
#define TILE_SWITCH(fn, g, i, j, nw, nx, arg)                                               \
    switch ((nw) * 8 + (nx)) {                                                             \
    case 4 * 8 + 4: fn(g, i, j, 4, 4, arg); break;                                         \
    case 4 * 8 + 3: fn(g, i, j, 4, 3, arg); break;                                         \
    case 4 * 8 + 2: fn(g, i, j, 4, 2, arg); break;                                         \
    case 4 * 8 + 1: fn(g, i, j, 4, 1, arg); break;                                         \
    case 3 * 8 + 4: fn(g, i, j, 3, 4, arg); break;                                         \
    case 3 * 8 + 3: fn(g, i, j, 3, 3, arg); break;                                         \
    case 3 * 8 + 2: fn(g, i, j, 3, 2, arg); break;                                         \
    case 3 * 8 + 1: fn(g, i, j, 3, 1, arg); break;                                         \
    case 2 * 8 + 4: fn(g, i, j, 2, 4, arg); break;                                         \
    case 2 * 8 + 3: fn(g, i, j, 2, 3, arg); break;                                         \
    case 2 * 8 + 2: fn(g, i, j, 2, 2, arg); break;                                         \
    case 2 * 8 + 1: fn(g, i, j, 2, 1, arg); break;                                         \
    case 1 * 8 + 4: fn(g, i, j, 1, 4, arg); break;                                         \
    case 1 * 8 + 3: fn(g, i, j, 1, 3, arg); break;                                         \
    case 1 * 8 + 2: fn(g, i, j, 1, 2, arg); break;                                         \
    default: fn(g, i, j, 1, 1, arg); break;                                                \
    }

AVX512_INLINE void gemm_q8x(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                            const quant_kind kind)
{
    for (int64_t i = i0; i < i1; i += TW) {
        const int nw = i1 - i < TW ? (int)(i1 - i) : TW;
        for (int64_t j = j0; j < j1; j += TX) {
            const int nx = j1 - j < TX ? (int)(j1 - j) : TX;
            TILE_SWITCH(tile_q8x, g, i, j, nw, nx, kind)
        }
    }
}

AVX512_FN static void gemm_q4_0_avx512(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_q8x(g, i0, i1, j0, j1, QKIND_Q4_0);
}

AVX512_FN static void gemm_q4_1_avx512(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_q8x(g, i0, i1, j0, j1, QKIND_Q4_1);
}

AVX512_FN static void gemm_q8_0_avx512(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_q8x(g, i0, i1, j0, j1, QKIND_Q8_0);
}

/* ---- F32 / F16 weights: sixteen float lanes, masked tail ---- */

AVX512_INLINE __m512 load16(const uint8_t *row, int64_t e, __mmask16 mask, const int half)
{
    if (half)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const ekv_f16 *)row + e));
    return _mm512_maskz_loadu_ps(mask, (const float *)row + e);
}

AVX512_INLINE void tile_float(const quant_gemm *g, int64_t i, int64_t j, const int nw, const int nx,
                              const int half)
{
    const size_t pf = prefetch_distance(g->w_stride);
    const uint8_t *wr[TW], *xr[TX];
    __m512 acc[TW][TX];
#pragma GCC unroll 4
    for (int r = 0; r < nw; r++)
        wr[r] = g->w + (size_t)(i + r) * g->w_stride;
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++) {
        xr[c] = g->x + (size_t)(j + c) * g->x_stride;
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            acc[r][c] = _mm512_setzero_ps();
    }
    for (int64_t e = 0; e < g->k; e += 16) {
        const __mmask16 mask = g->k - e >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (g->k - e)) - 1);
        __m512 wv[TW];
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++) {
            if (nx <= 2)
                _mm_prefetch((const char *)wr[r] + pf + (size_t)e * (half ? 2 : 4), _MM_HINT_T0);
            wv[r] = load16(wr[r], e, mask, half);
        }
#pragma GCC unroll 4
        for (int c = 0; c < nx; c++) {
            const __m512 xv = load16(xr[c], e, mask, half);
#pragma GCC unroll 4
            for (int r = 0; r < nw; r++)
                acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < nx; c++)
#pragma GCC unroll 4
        for (int r = 0; r < nw; r++)
            g->y[(j + c) * g->ldy + i + r] = _mm512_reduce_add_ps(acc[r][c]);
}

AVX512_INLINE void gemm_float(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                              const int half)
{
    for (int64_t i = i0; i < i1; i += TW) {
        const int nw = i1 - i < TW ? (int)(i1 - i) : TW;
        for (int64_t j = j0; j < j1; j += TX) {
            const int nx = j1 - j < TX ? (int)(j1 - j) : TX;
            TILE_SWITCH(tile_float, g, i, j, nw, nx, half)
        }
    }
}

AVX512_FN static void gemm_f32_avx512(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_float(g, i0, i1, j0, j1, 0);
}

AVX512_FN static void gemm_f16_avx512(const quant_gemm *g, int64_t i0, int64_t i1, int64_t j0, int64_t j1)
{
    gemm_float(g, i0, i1, j0, j1, 1);
}

void quant_register_avx512(quant_kernels *t)
{
    t->gemm[QKIND_F32] = gemm_f32_avx512;
    t->gemm[QKIND_F16] = gemm_f16_avx512;
    t->gemm[QKIND_Q4_0] = gemm_q4_0_avx512;
    t->gemm[QKIND_Q4_1] = gemm_q4_1_avx512;
    t->gemm[QKIND_Q8_0] = gemm_q8_0_avx512;
    t->prep[QKIND_Q4_0] = prep_q8_split_avx512;
    t->prep[QKIND_Q4_1] = prep_q8_split_avx512;
}

#endif /* __x86_64__ */
