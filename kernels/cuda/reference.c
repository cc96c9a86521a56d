/*
 * reference.c - plain C references for the CUDA kernels that have no CPU
 * backend counterpart (the others are tested against kernels/cpu and
 * compress/ directly). Compiled into entrokv_cuda; no CUDA headers.
 */
#include <math.h>
#include <stdlib.h>

#include "entrokv/cuda.h"

static int by_float_desc(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/*
 * The rule ekv_cuda_sample implements, with a sort instead of bisection:
 * keep logits >= the top_k-th largest; then keep logits >= the value at which
 * the descending cumulative mass first reaches top_p of the kept mass; draw
 * the first kept token (index order) whose running mass exceeds u * mass.
 */
int32_t ekv_cuda_sample_ref(const float *logits, int n, float temp, int top_k, float top_p,
                            float u)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best])
            best = i;
    if (!(temp > 0.0f))
        return best;
    const float m = logits[best];
    float *sorted = malloc((size_t)n * sizeof *sorted);
    if (!sorted)
        return best;
    for (int i = 0; i < n; i++)
        sorted[i] = logits[i];
    qsort(sorted, (size_t)n, sizeof *sorted, by_float_desc);
    float thr = top_k > 0 && top_k < n ? sorted[top_k - 1] : sorted[n - 1];
    if (top_p < 1.0f) {
        double z = 0;
        for (int i = 0; i < n; i++)
            if (logits[i] >= thr)
                z += (double)expf((logits[i] - m) / temp);
        const double target = (double)top_p * z;
        double acc = 0;
        for (int i = 0; i < n && sorted[i] >= thr; i++) {
            /* the mass of every logit >= sorted[i] (ties included) */
            acc += (double)expf((sorted[i] - m) / temp);
            if (i + 1 < n && sorted[i + 1] == sorted[i])
                continue;
            if (acc >= target) {
                thr = sorted[i];
                break;
            }
        }
    }
    free(sorted);
    double z = 0;
    for (int i = 0; i < n; i++)
        if (logits[i] >= thr)
            z += (double)expf((logits[i] - m) / temp);
    const double target = (double)u * z;
    double acc = 0;
    for (int i = 0; i < n; i++) {
        if (logits[i] < thr)
            continue;
        acc += (double)expf((logits[i] - m) / temp);
        if (acc > target)
            return i;
    }
    return best;
}
