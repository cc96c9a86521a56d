/*
 * spark.c - SparK key-channel pruning at the end of prefill
 * (shared/specs/spark.md; docs/COMPRESSION.md says where entrokv deviates).
 *
 * After the token policy has chosen each head's tokens, every (layer, KV
 * head) gets a channel weight c_j: the L2 norm over the last w = 32 prompt
 * queries (post-RoPE) of the query averaged over the head's GQA group,
 * clamped to >= 1e-6 (spec pitfall 3). Each kept token then keeps the n_keep
 * = D - int(r D) channels of largest saliency s_j = k_j^2 c_j (ties to the
 * lower channel), and stores m = the mean saliency of its pruned channels
 * plus their signs. kv_seq_pack moves the head into packed storage, so the
 * memory really drops; attention rebuilds each pruned channel as
 * sign_j sqrt(m / c_j) ("avg" recovery, spec section 3) or reads 0 (the
 * zero-fill ablation). Statistics are fp32 over the fp16 keys the cache
 * holds. Decode tokens are never pruned (pitfall 7).
 */
#include "compress_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

ekv_status kvc_spark_parse(double ratio, const char *recovery, kvc_spark_policy *p,
                           ekv_error *err)
{
    memset(p, 0, sizeof *p);
    if (!isfinite(ratio) || ratio < 0 || ratio >= 1)
        return ekv_error_set(err, EKV_EINVAL, "spark ratio must be in [0, 1), got %g", ratio);
    if (!recovery || !*recovery || !strcmp(recovery, "avg"))
        p->recovery = KVC_SPARK_AVG;
    else if (!strcmp(recovery, "zero"))
        p->recovery = KVC_SPARK_ZERO;
    else
        return ekv_error_set(err, EKV_EINVAL, "unknown spark recovery '%.32s' (avg, zero)",
                             recovery);
    p->ratio = ratio;
    return EKV_OK;
}

int32_t kvc_spark_keep(double ratio, int32_t head_dim)
{
    return head_dim - (int32_t)(ratio * head_dim); /* n_prune = int(r D), spec section 1 */
}

void kvc_spark_channel_weights(const float *wq, size_t row_stride, int32_t n_window,
                               int32_t n_group, int32_t head_dim, float *c)
{
    for (int32_t j = 0; j < head_dim; j++) {
        double ss = 0;
        for (int32_t i = 0; i < n_window; i++) {
            float mean = 0.0f;
            for (int32_t g = 0; g < n_group; g++)
                mean += wq[(size_t)i * row_stride + (size_t)g * head_dim + j];
            mean /= (float)n_group;
            ss += (double)mean * mean;
        }
        const float v = (float)sqrt(ss);
        c[j] = v > KVC_SPARK_C_MIN ? v : KVC_SPARK_C_MIN;
    }
}

float kvc_spark_select(const float *k, const float *c, int32_t head_dim, int32_t n_keep,
                       uint8_t *mask)
{
    float s[KVC_MAX_HEAD_DIM];
    uint8_t kept[KVC_MAX_HEAD_DIM];
    for (int32_t j = 0; j < head_dim; j++) {
        s[j] = k[j] * k[j] * c[j];
        kept[j] = 0;
    }
    /* the n_keep largest, ties to the lower channel: repeated argmax (D <= 512) */
    for (int32_t r = 0; r < n_keep; r++) {
        int32_t best = -1;
        for (int32_t j = 0; j < head_dim; j++)
            if (!kept[j] && (best < 0 || s[j] > s[best]))
                best = j;
        kept[best] = 1;
    }
    memset(mask, 0, ((size_t)head_dim + 7) / 8);
    double pruned = 0;
    for (int32_t j = 0; j < head_dim; j++) {
        if (kept[j])
            mask[j / 8] |= (uint8_t)(1u << (j % 8));
        else
            pruned += s[j];
    }
    const int32_t n_prune = head_dim - n_keep;
    return n_prune > 0 ? (float)(pruned / n_prune) : 0.0f;
}

ekv_status kvc_spark_apply(const kvc_spark_policy *p, kv_seq *seq, const float *sq,
                           int32_t n_window, int32_t n_heads, ekv_error *err)
{
    const int32_t L = kv_seq_n_layers(seq), HKV = kv_seq_n_kv_heads(seq);
    const int32_t G = n_heads / HKV;
    if (p->ratio <= 0)
        return EKV_OK; /* spec pitfall 8: ratio 0 is a no-op */
    ekv_status rc = EKV_OK;
    uint8_t *masks = NULL;
    float *m = NULL;
    for (int32_t l = 0; l < L && !rc; l++)
        for (int32_t h = 0; h < HKV && !rc; h++) {
            kern_kv_view view;
            kv_seq_view(seq, l, h, &view);
            const int32_t D = view.head_dim, n = view.n_tokens, n_keep = kvc_spark_keep(p->ratio, D);
            const size_t mb = ((size_t)D + 7) / 8;
            if (D > KVC_MAX_HEAD_DIM)
                return ekv_error_set(err, EKV_EUNSUPPORTED, "spark: head_dim %d > %d", D,
                                     KVC_MAX_HEAD_DIM);
            if (view.packed)
                return ekv_error_set(err, EKV_EINVAL, "spark: layer %d head %d is packed already",
                                     l, h);
            uint8_t *nm = realloc(masks, (size_t)(n ? n : 1) * mb);
            if (nm)
                masks = nm;
            float *mm = realloc(m, (size_t)(n ? n : 1) * sizeof *m);
            if (mm)
                m = mm;
            if (!nm || !mm) {
                rc = ekv_error_set(err, EKV_ENOMEM, "spark: out of memory");
                break;
            }
            float c[KVC_MAX_HEAD_DIM], isc[KVC_MAX_HEAD_DIM], k[KVC_MAX_HEAD_DIM];
            const size_t row = (size_t)n_heads * D;
            kvc_spark_channel_weights(sq + (size_t)l * n_window * row + (size_t)h * G * D, row,
                                      n_window, G, D, c);
            for (int32_t j = 0; j < D; j++)
                isc[j] = 1.0f / sqrtf(c[j]);
            for (int32_t t = 0; t < n; t++) {
                const int32_t bt = view.block_tokens;
                const ekv_f16 *kb = view.k_blocks[t / bt] + t % bt;
                for (int32_t j = 0; j < D; j++)
                    k[j] = ekv_f16_to_f32(kb[(size_t)j * bt]);
                m[t] = kvc_spark_select(k, c, D, n_keep, masks + (size_t)t * mb);
            }
            rc = kv_seq_pack(seq, l, h, n_keep, masks, m,
                             p->recovery == KVC_SPARK_AVG ? isc : NULL, err);
        }
    free(masks);
    free(m);
    return rc;
}
