/*
 * entropy.c - UNComp's truncated matrix entropy of a head's query states
 * (specs/uncomp.md section 1).
 *
 * The Gram matrix is d x d (never N x N): each token's query, centred and
 * scaled to unit length, adds its outer product. Centring needs the mean of
 * the rows first, so rows are added a window at a time (compress.c buffers
 * KVC_ENTROPY_WINDOW prompt tokens per head; for prompts up to that length
 * this is exactly the reference's whole-sequence centring). The spectrum
 * comes from LAPACK's symmetric eigen-solver in double precision.
 */
#include "compress_internal.h"

#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int32_t kvc_entropy_rank(int32_t head_dim)
{
    return head_dim >= 4 ? head_dim / 4 : 1;
}

void kvc_gram_add(double *A, const float *rows, int32_t n, int32_t stride, int32_t d)
{
    if (n <= 0)
        return;
    double mean[KVC_MAX_HEAD_DIM] = {0};
    for (int32_t t = 0; t < n; t++)
        for (int32_t j = 0; j < d; j++)
            mean[j] += rows[(size_t)t * stride + j];
    for (int32_t j = 0; j < d; j++)
        mean[j] /= n;
    /* the window's outer products in float (at most a few hundred terms of
     * magnitude <= 1 each), added to the double total once */
    float *g = calloc((size_t)d * d, sizeof *g);
    float z[KVC_MAX_HEAD_DIM];
    if (!g)
        return;
    for (int32_t t = 0; t < n; t++) {
        const float *x = rows + (size_t)t * stride;
        double ss = 0;
        for (int32_t j = 0; j < d; j++) {
            z[j] = (float)(x[j] - mean[j]);
            ss += (double)z[j] * z[j];
        }
        const float inv = (float)(1.0 / fmax(sqrt(ss), 1e-12)); /* F.normalize's eps */
        for (int32_t j = 0; j < d; j++)
            z[j] *= inv;
        for (int32_t i = 0; i < d; i++) {
            const float zi = z[i];
            float *gi = g + (size_t)i * d;
            for (int32_t j = 0; j < d; j++)
                gi[j] += zi * z[j];
        }
    }
    for (size_t i = 0; i < (size_t)d * d; i++)
        A[i] += g[i];
    free(g);
}

ekv_status kvc_entropy(double *A, int32_t d, int32_t k, double *entropy, ekv_error *err)
{
    double trace = 0;
    for (int32_t i = 0; i < d; i++)
        trace += A[(size_t)i * d + i];
    if (!(trace > 0))
        return ekv_error_set(err, EKV_EINVAL, "entropy: empty Gram matrix");
    for (size_t i = 0; i < (size_t)d * d; i++)
        A[i] /= trace;
    for (int32_t i = 0; i < d; i++)
        A[(size_t)i * d + i] += 1e-10;
    double lambda[KVC_MAX_HEAD_DIM];
    lapack_int info = LAPACKE_dsyev(LAPACK_ROW_MAJOR, 'N', 'U', d, A, d, lambda);
    if (info != 0)
        return ekv_error_set(err, EKV_EINVAL, "entropy: eigen-solver failed (info %d)", (int)info);
    if (k > d)
        k = d;
    /* dsyev sorts ascending: the top k are the last k. Like the reference's
     * nansum, terms with lambda <= 0 (log undefined) are skipped. */
    double h = 0;
    for (int32_t i = d - k; i < d; i++)
        if (lambda[i] > 0)
            h -= lambda[i] * log(lambda[i]);
    *entropy = h / log((double)d);
    return EKV_OK;
}
