/*
 * score.c - observation-window attention scores over one KV head's tokens.
 *
 * The last queries of the prompt say which earlier tokens matter (SnapKV,
 * Li et al. 2024): each window query's softmax over the head's tokens is
 * recomputed here from the cached K (flash attention never materialises it;
 * softmax rows are independent, so the values are the reference's) and the
 * probabilities are summed over the window and over the query heads that
 * share the KV head (entrokv's GQA pooling, docs/COMPRESSION.md).
 */
#include "compress_internal.h"

#include <math.h>
#include <string.h>

void kvc_window_scores(const kern_kv_view *view, const float *wq, size_t row_stride,
                       int32_t n_window, int32_t n_group, const int32_t *q_pos, float *scores,
                       float *scratch)
{
    const int32_t n = view->n_tokens, bt = view->block_tokens, d = view->head_dim;
    const int32_t nq = n_window * n_group;
    const float scale = 1.0f / sqrtf((float)d);
    float kf[KVC_MAX_HEAD_DIM];
    memset(scores, 0, (size_t)n * sizeof *scores);
    /* logits[q][t] for every window query (scratch: nq * n floats) */
    for (int32_t b = 0; b * bt < n; b++) {
        const int32_t rows = n - b * bt < bt ? n - b * bt : bt;
        const ekv_f16 *kb = view->k_blocks[b];
        const int32_t *pb = view->pos_blocks[b];
        for (int32_t r = 0; r < rows; r++) {
            for (int32_t j = 0; j < d; j++)
                kf[j] = ekv_f16_to_f32(kb[(size_t)j * bt + r]);
            for (int32_t q = 0; q < nq; q++) {
                const float *qv = wq + (size_t)(q / n_group) * row_stride + (size_t)(q % n_group) * d;
                float s = 0;
                for (int32_t j = 0; j < d; j++)
                    s += qv[j] * kf[j];
                const int masked = pb[r] > q_pos[q / n_group];
                scratch[(size_t)q * n + b * bt + r] = masked ? -INFINITY : s * scale;
            }
        }
    }
    for (int32_t q = 0; q < nq; q++) {
        float *row = scratch + (size_t)q * n;
        float mx = -INFINITY;
        for (int32_t t = 0; t < n; t++)
            if (row[t] > mx)
                mx = row[t];
        if (mx == -INFINITY)
            continue;
        float sum = 0;
        for (int32_t t = 0; t < n; t++) {
            row[t] = row[t] == -INFINITY ? 0.0f : expf(row[t] - mx);
            sum += row[t];
        }
        const float inv = 1.0f / sum;
        for (int32_t t = 0; t < n; t++)
            scores[t] += row[t] * inv;
    }
}
