/*
 * quant.c - the reference side of the quantized formats: activation
 * quantizers (exactly ggml's, so our logits match llama.cpp's) and row
 * dequantizers (embedding lookup, tests).
 *
 * The activation quantizer follows ggml's x86 path rather than its plain-C
 * reference, because that is what llama.cpp runs on the machines we compare
 * against: d = amax / 127, quants = round-half-even(x * (127 / amax)), d kept
 * as fp16; Q8_1's s = fp16(d * sum(quants)) with the unrounded d. The two
 * differ from the plain-C reference (x / d, roundf) only on rare ties.
 * The AVX2 quantizer in dot_avx2.c reproduces this one bit for bit.
 */
#include "quant.h"

#include <math.h>

quant_kind quant_kind_of(uint32_t wtype)
{
    switch (wtype) {
    case EKV_F32: return QKIND_F32;
    case EKV_F16: return QKIND_F16;
    case EKV_Q4_0: return QKIND_Q4_0;
    case EKV_Q4_1: return QKIND_Q4_1;
    case EKV_Q8_0: return QKIND_Q8_0;
    case EKV_Q4_K: return QKIND_Q4_K;
    case EKV_Q6_K: return QKIND_Q6_K;
    default: return QKIND_NONE;
    }
}

size_t quant_prep_row_bytes(quant_kind kind, int64_t k)
{
    switch (kind) {
    case QKIND_F32:
        return 0;
    case QKIND_F16:
        return quant_align64((size_t)k * sizeof(ekv_f16));
    case QKIND_Q4_0:
    case QKIND_Q4_1: /* plus the AVX-512 lane scales, 16 floats per block pair */
        return q8x_lanes_offset(k) + (size_t)q8x_blocks(k) / 2 * 16 * sizeof(float);
    case QKIND_Q8_0:
        return q8x_lanes_offset(k);
    case QKIND_Q4_K:
    case QKIND_Q6_K:
        return quant_align64((size_t)(k / QK_K) * sizeof(blk_q8_k));
    default:
        return 0;
    }
}

void quant_prep_q8(const float *x, int64_t k, uint8_t *out)
{
    int64_t nb = k / QK, nbp = q8x_blocks(k);
    int8_t *qs = (int8_t *)out;
    float *dd = (float *)(out + nbp * QK);
    float *ss = dd + nbp;
    int32_t *sums = (int32_t *)(ss + nbp);
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            int32_t q = quant_round(xb[j] * id);
            qs[b * QK + j] = (int8_t)q;
            sum += q;
        }
        dd[b] = ekv_f16_to_f32(ekv_f32_to_f16(d));
        ss[b] = ekv_f16_to_f32(ekv_f32_to_f16(d * (float)sum));
        sums[b] = sum;
    }
    for (int64_t b = nb; b < nbp; b++) { /* the zero padding block */
        memset(qs + b * QK, 0, QK);
        dd[b] = ss[b] = 0.0f;
        sums[b] = 0;
    }
}

/* ggml's quantize_row_q8_K_ref: scale by the signed extreme, -127 at the max. */
void quant_prep_q8k(const float *x, int64_t k, uint8_t *out)
{
    blk_q8_k *y = (blk_q8_k *)out;
    for (int64_t b = 0; b < k / QK_K; b++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            memset(&y[b], 0, sizeof y[b]);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            int32_t v = quant_round(iscale * x[j]);
            y[b].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++)
                sum += y[b].qs[g * 16 + j];
            y[b].bsums[g] = (int16_t)sum;
        }
        y[b].d = 1.0f / iscale;
    }
}

void quant_prep_f16(const float *x, int64_t k, uint8_t *out)
{
    ekv_f16 *h = (ekv_f16 *)out;
    for (int64_t j = 0; j < k; j++)
        h[j] = ekv_f32_to_f16(x[j]);
}

/* ---- dequantization, as ggml's dequantize_row_* ---- */

static void dequant_q4_0(const blk_q4_0 *b, int64_t nb, float *y)
{
    for (int64_t i = 0; i < nb; i++, y += QK) {
        const float d = quant_f16(b[i].d);
        for (int j = 0; j < QK / 2; j++) {
            y[j] = (float)((b[i].qs[j] & 0x0F) - 8) * d;
            y[j + QK / 2] = (float)((b[i].qs[j] >> 4) - 8) * d;
        }
    }
}

static void dequant_q4_1(const blk_q4_1 *b, int64_t nb, float *y)
{
    for (int64_t i = 0; i < nb; i++, y += QK) {
        const float d = quant_f16(b[i].d), m = quant_f16(b[i].m);
        for (int j = 0; j < QK / 2; j++) {
            y[j] = (float)(b[i].qs[j] & 0x0F) * d + m;
            y[j + QK / 2] = (float)(b[i].qs[j] >> 4) * d + m;
        }
    }
}

static void dequant_q8_0(const blk_q8_0 *b, int64_t nb, float *y)
{
    for (int64_t i = 0; i < nb; i++, y += QK) {
        const float d = quant_f16(b[i].d);
        for (int j = 0; j < QK; j++)
            y[j] = (float)b[i].qs[j] * d;
    }
}

static void dequant_q4_k(const blk_q4_k *b, int64_t nb, float *y)
{
    for (int64_t i = 0; i < nb; i++) {
        const float d = quant_f16(b[i].d), dmin = quant_f16(b[i].dmin);
        const uint8_t *q = b[i].qs;
        for (int j = 0; j < QK_K / 64; j++, q += 32) {
            uint8_t sc, mn;
            q4k_scale_min(2 * j, b[i].scales, &sc, &mn);
            const float d1 = d * sc, m1 = dmin * mn;
            q4k_scale_min(2 * j + 1, b[i].scales, &sc, &mn);
            const float d2 = d * sc, m2 = dmin * mn;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
        }
    }
}

static void dequant_q6_k(const blk_q6_k *b, int64_t nb, float *y)
{
    for (int64_t i = 0; i < nb; i++) {
        const float d = quant_f16(b[i].d);
        const uint8_t *ql = b[i].ql, *qh = b[i].qh;
        const int8_t *sc = b[i].scales;
        for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

void quant_dequant_row(quant_kind kind, const void *row, int64_t k, float *out)
{
    switch (kind) {
    case QKIND_F32:
        memcpy(out, row, (size_t)k * sizeof(float));
        break;
    case QKIND_F16: {
        const ekv_f16 *h = row;
        for (int64_t j = 0; j < k; j++)
            out[j] = quant_f16(h[j]);
        break;
    }
    case QKIND_Q4_0: dequant_q4_0(row, k / QK, out); break;
    case QKIND_Q4_1: dequant_q4_1(row, k / QK, out); break;
    case QKIND_Q8_0: dequant_q8_0(row, k / QK, out); break;
    case QKIND_Q4_K: dequant_q4_k(row, k / QK_K, out); break;
    case QKIND_Q6_K: dequant_q6_k(row, k / QK_K, out); break;
    default: break;
    }
}
