/*
 * attention_packed.c - attention over a view whose first tokens hold SparK's
 * packed keys (kern_kv_packed, kernels.h; shared/specs/spark.md sections 3
 * and 9), and the packed row format itself.
 *
 * A packed token's logit is rebuilt inside the dot product without
 * materialising its key: scale * (sum over kept j of q_j k_j + sqrt(m) *
 * sum over pruned j of sign_j u_j), with u_j = q_j / sqrt(c_j) computed once
 * per query (the spec's section 9 trick). The tokens after the packed ones
 * live in blocks as usual. This path is scalar and per query; views without
 * packed tokens never come here (attention.c), so full-KV speed is
 * unchanged. Masking, the exp and the fp32 accumulation follow the scalar
 * reference in attention.c.
 */
#include <math.h>
#include <string.h>

#include "attention_internal.h"

static size_t mask_bytes(int32_t d) { return ((size_t)d + 7) / 8; }

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
            k[j] = ekv_f16_to_f32(vals[ki++]);
            continue;
        }
        const float mag = inv_sqrt_c ? sm * inv_sqrt_c[j] : 0.0f;
        k[j] = (sign[pi / 8] >> (pi % 8) & 1) ? -mag : mag;
        pi++;
    }
}

/* q . k of packed row r, with u = q / sqrt(c) precomputed (NULL: zero-fill) */
static float packed_dot(const uint8_t *row, int32_t d, int32_t n_keep, const float *q,
                        const float *u)
{
    const uint8_t *mask = row + sizeof(float), *sign = mask + mask_bytes(d);
    const ekv_f16 *vals = (const ekv_f16 *)(const void *)(row + vals_offset(d, n_keep));
    float kept = 0.0f, pruned = 0.0f;
    for (int32_t j = 0, ki = 0, pi = 0; j < d; j++) {
        if (mask[j / 8] >> (j % 8) & 1) {
            kept += q[j] * ekv_f16_to_f32(vals[ki++]);
            continue;
        }
        if (u)
            pruned += (sign[pi / 8] >> (pi % 8) & 1) ? -u[j] : u[j];
        pi++;
    }
    if (!u)
        return kept;
    float m;
    memcpy(&m, row, sizeof m);
    return kept + sqrtf(m > 0.0f ? m : 0.0f) * pruned;
}

void kern_attend_packed(const kern_kv_view *kv, const float *q, int32_t qpos, float scale,
                        float *out, float *scores, const kern_attn_probe *pr)
{
    const kern_kv_packed *pk = kv->packed;
    const int32_t d = kv->head_dim, bt = kv->block_tokens, n = kv->n_tokens, np = pk->n;
    float u[KERN_PACKED_MAX_DIM];
    if (pk->inv_sqrt_c)
        for (int32_t j = 0; j < d; j++)
            u[j] = q[j] * pk->inv_sqrt_c[j];
    float max = -INFINITY;
    for (int32_t t = 0; t < n; t++) {
        float s = 0.0f;
        if (t < np) {
            if (pk->pos[t] > qpos) {
                scores[t] = -INFINITY;
                continue;
            }
            s = packed_dot(pk->rows + (size_t)t * pk->row_bytes, d, pk->n_keep, q,
                           pk->inv_sqrt_c ? u : NULL);
        } else {
            const int32_t b = (t - np) / bt, r = (t - np) % bt;
            if (kv->pos_blocks[b][r] > qpos) {
                scores[t] = -INFINITY;
                continue;
            }
            const ekv_f16 *kb = kv->k_blocks[b] + r;
            for (int32_t j = 0; j < d; j++)
                s += q[j] * ekv_f16_to_f32(kb[(size_t)j * bt]);
        }
        scores[t] = s * scale;
        if (scores[t] > max)
            max = scores[t];
    }
    if (pr && pr->logits)
        memcpy(pr->logits, scores, (size_t)n * sizeof *scores);
    for (int32_t j = 0; j < d; j++)
        out[j] = 0.0f;
    double sum = 0.0;
    for (int32_t t = 0; t < n; t++) {
        if (max == -INFINITY || scores[t] == -INFINITY) {
            scores[t] = 0.0f; /* nothing visible: a zero output */
            continue;
        }
        const float p = expf(scores[t] - max);
        scores[t] = p;
        sum += p;
        const ekv_f16 *v = t < np ? pk->v + (size_t)t * d
                                  : kv->v_blocks[(t - np) / bt] + (size_t)((t - np) % bt) * d;
        for (int32_t j = 0; j < d; j++)
            out[j] += p * ekv_f16_to_f32(v[j]);
    }
    const float inv = sum > 0.0 ? (float)(1.0 / sum) : 0.0f;
    for (int32_t j = 0; j < d; j++)
        out[j] *= inv;
    if (pr && pr->probs)
        for (int32_t t = 0; t < n; t++)
            pr->probs[t] = scores[t] * inv;
}
