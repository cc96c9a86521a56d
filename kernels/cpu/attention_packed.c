/*
 * attention_packed.c - attention over a view whose first tokens hold SparK's
 * packed keys (kern_kv_packed, kernels.h; shared/specs/spark.md sections 3
 * and 9), and the packed row format itself.
 *
 * A packed token's key is rebuilt from its row (kept channels, and
 * sign_j sqrt(m / c_j) for the pruned ones) once per token into a small
 * register-sized buffer and shared by the query heads of a GQA group, then
 * dotted with each query: the packed bytes are what is read from memory.
 * The tokens after the packed ones live in blocks as usual. Views without
 * packed tokens never come here (attention.c), so full-KV speed is unchanged.
 *
 * The scalar path is the reference: masking, the exp and the fp32
 * accumulation follow attention.c's scalar path. The AVX2 and AVX-512 paths
 * (attention_packed_simd.c) rebuild the same keys bit for bit (the kept
 * channels are expanded into place, the pruned ones get sm * inv_sqrt_c[j]
 * with the sign bit set by XOR, exactly as -mag), then differ from the
 * scalar path only in summation order, FMA and attention.c's vector exp: they
 * agree with it to fp32 rounding, as attention.c's SIMD paths do.
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "attention_internal.h"

static size_t mask_bytes(int32_t d) { return ((size_t)d + 7) / 8; }

/* ekv_f16_to_f32, inline (exact for every half, subnormals included): the
 * scalar path converts every key and value element it reads. */
static inline float h2f(ekv_f16 h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        const float f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
        return sign ? -f : f;
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

size_t kern_packed_row_bytes(int32_t head_dim, int32_t n_keep)
{
    size_t b = sizeof(float) + mask_bytes(head_dim) + mask_bytes(head_dim - n_keep);
    b = (b + 1) & ~(size_t)1; /* fp16 values start 2-aligned */
    b += (size_t)n_keep * sizeof(ekv_f16);
    return (b + 3) & ~(size_t)3; /* the next row's m starts 4-aligned */
}

static size_t vals_offset(int32_t d, int32_t n_keep)
{
    return (sizeof(float) + mask_bytes(d) + mask_bytes(d - n_keep) + 1) & ~(size_t)1;
}

void kern_packed_encode(uint8_t *row, const float *k, const uint8_t *keep_mask, float m,
                        int32_t head_dim, int32_t n_keep)
{
    const int32_t d = head_dim;
    uint8_t *mask = row + sizeof(float), *sign = mask + mask_bytes(d);
    ekv_f16 *vals = (ekv_f16 *)(void *)(row + vals_offset(d, n_keep));
    memset(row, 0, kern_packed_row_bytes(d, n_keep));
    memcpy(row, &m, sizeof m);
    for (int32_t j = 0, ki = 0, pi = 0; j < d; j++) {
        if (keep_mask[j / 8] >> (j % 8) & 1) {
            mask[j / 8] |= (uint8_t)(1u << (j % 8));
            vals[ki++] = ekv_f32_to_f16(k[j]);
        } else {
            if (k[j] < 0.0f)
                sign[pi / 8] |= (uint8_t)(1u << (pi % 8));
            pi++;
        }
    }
}

void kern_packed_decode(const uint8_t *row, int32_t head_dim, int32_t n_keep,
                        const float *inv_sqrt_c, float *k)
{
    const int32_t d = head_dim;
    const uint8_t *mask = row + sizeof(float), *sign = mask + mask_bytes(d);
    const ekv_f16 *vals = (const ekv_f16 *)(const void *)(row + vals_offset(d, n_keep));
    float m;
    memcpy(&m, row, sizeof m);
    const float sm = sqrtf(m > 0.0f ? m : 0.0f);
    for (int32_t j = 0, ki = 0, pi = 0; j < d; j++) {
        if (mask[j / 8] >> (j % 8) & 1) {
            k[j] = h2f(vals[ki++]);
            continue;
        }
        const float mag = inv_sqrt_c ? sm * inv_sqrt_c[j] : 0.0f;
        k[j] = (sign[pi / 8] >> (pi % 8) & 1) ? -mag : mag;
        pi++;
    }
}

/* Token t's key as attention uses it: rebuilt from its packed row, or
 * gathered from its block's transposed column. */
static void key_of(const kern_kv_view *kv, int32_t t, float *k)
{
    const kern_kv_packed *pk = kv->packed;
    const int32_t d = kv->head_dim, bt = kv->block_tokens, np = pk->n;
    if (t < np) {
        kern_packed_decode(pk->rows + (size_t)t * pk->row_bytes, d, pk->n_keep, pk->inv_sqrt_c,
                           k);
        return;
    }
    const ekv_f16 *kb = kv->k_blocks[(t - np) / bt] + (t - np) % bt;
    for (int32_t j = 0; j < d; j++)
        k[j] = h2f(kb[(size_t)j * bt]);
}

static int32_t pos_at(const kern_kv_view *kv, int32_t t)
{
    const int32_t np = kv->packed->n, bt = kv->block_tokens;
    return t < np ? kv->packed->pos[t] : kv->pos_blocks[(t - np) / bt][(t - np) % bt];
}

static const ekv_f16 *v_at(const kern_kv_view *kv, int32_t t)
{
    const int32_t np = kv->packed->n, bt = kv->block_tokens, d = kv->head_dim;
    return t < np ? kv->packed->v + (size_t)t * d
                  : kv->v_blocks[(t - np) / bt] + (size_t)((t - np) % bt) * d;
}

static void attend_packed_scalar(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                                 int32_t qpos, float scale, float *out, int out_stride,
                                 float *scores, const kern_attn_probe *pr, int q0)
{
    const int32_t d = kv->head_dim, n = kv->n_tokens;
    float k[KERN_PACKED_MAX_DIM];
    float max[KERN_ATTN_GROUP_MAX];
    for (int i = 0; i < g; i++)
        max[i] = -INFINITY;
    /* each key is rebuilt once for the g queries that share the position;
     * every query's sum runs over j in the same order whatever g is */
    for (int32_t t = 0; t < n; t++) {
        if (pos_at(kv, t) > qpos) {
            for (int i = 0; i < g; i++)
                scores[(size_t)i * n + t] = -INFINITY;
            continue;
        }
        key_of(kv, t, k);
        for (int i = 0; i < g; i++) {
            const float *q = Q + (size_t)i * q_stride;
            /* four partial sums (j mod 4) added in a fixed order: the chains
             * overlap, and the result still does not depend on g */
            float a4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int32_t j = 0;
            for (; j + 4 <= d; j += 4)
                for (int u = 0; u < 4; u++)
                    a4[u] += q[j + u] * k[j + u];
            for (; j < d; j++)
                a4[0] += q[j] * k[j];
            float s = ((a4[0] + a4[1]) + (a4[2] + a4[3])) * scale;
            scores[(size_t)i * n + t] = s;
            max[i] = s > max[i] ? s : max[i];
        }
    }
    if (pr && pr->logits)
        for (int i = 0; i < g; i++)
            memcpy(pr->logits + (size_t)(q0 + i) * n, scores + (size_t)i * n,
                   (size_t)n * sizeof *scores);
    double sum[KERN_ATTN_GROUP_MAX] = {0};
    for (int i = 0; i < g; i++) {
        float *o = out + (size_t)i * out_stride;
        for (int32_t j = 0; j < d; j++)
            o[j] = 0.0f;
    }
    float vf[KERN_PACKED_MAX_DIM];
    for (int32_t t = 0; t < n; t++) {
        bool have_v = false;
        for (int i = 0; i < g; i++) {
            float *sc = scores + (size_t)i * n + t;
            if (max[i] == -INFINITY || *sc == -INFINITY) {
                *sc = 0.0f; /* masked, or nothing visible: a zero output */
                continue;
            }
            const float p = expf(*sc - max[i]);
            *sc = p;
            sum[i] += p;
            if (!have_v) { /* one conversion of the row for the group */
                const ekv_f16 *v = v_at(kv, t);
                for (int32_t j = 0; j < d; j++)
                    vf[j] = h2f(v[j]);
                have_v = true;
            }
            float *o = out + (size_t)i * out_stride;
            for (int32_t j = 0; j < d; j++)
                o[j] += p * vf[j];
        }
    }
    for (int i = 0; i < g; i++) {
        const float inv = sum[i] > 0.0 ? (float)(1.0 / sum[i]) : 0.0f;
        float *o = out + (size_t)i * out_stride;
        for (int32_t j = 0; j < d; j++)
            o[j] *= inv;
        if (pr && pr->probs)
            for (int32_t t = 0; t < n; t++)
                pr->probs[(size_t)(q0 + i) * n + t] = scores[(size_t)i * n + t] * inv;
    }
}

void kern_attend_packed(const kern_kv_view *kv, const float *Q, int g, int q_stride,
                        int32_t qpos, float scale, float *out, int out_stride, float *scores,
                        const kern_attn_probe *pr, int q0)
{
#if defined(__x86_64__)
    if (kern_attend_packed_simd(kv, Q, g, q_stride, qpos, scale, out, out_stride, scores, pr, q0))
        return;
#endif
    attend_packed_scalar(kv, Q, g, q_stride, qpos, scale, out, out_stride, scores, pr, q0);
}
