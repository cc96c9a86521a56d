/*
 * lapacke_jacobi.c - LAPACKE_dsyev (eigenvalues only) by cyclic Jacobi
 * rotations in double, for the standalone CUDA build (see lapacke.h here).
 * The symmetric matrix is read from the `uplo` triangle; at most 100 sweeps,
 * stopping when the off-diagonal mass is below 1e-30 of the total.
 */
#include "lapacke.h"

#include <math.h>
#include <stdlib.h>

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

lapack_int LAPACKE_dsyev(int matrix_layout, char jobz, char uplo, lapack_int n, double *a,
                         lapack_int lda, double *w)
{
    if (jobz != 'N' || n < 0 || lda < n)
        return -1;
    /* symmetric copy from the given triangle (row-major; col-major swaps it) */
    const int upper = (uplo == 'U' || uplo == 'u') == (matrix_layout == LAPACK_ROW_MAJOR);
    for (lapack_int i = 0; i < n; i++)
        for (lapack_int j = i + 1; j < n; j++) {
            if (upper)
                a[(size_t)j * lda + i] = a[(size_t)i * lda + j];
            else
                a[(size_t)i * lda + j] = a[(size_t)j * lda + i];
        }
    double total = 0;
    for (lapack_int i = 0; i < n; i++)
        for (lapack_int j = 0; j < n; j++)
            total += a[(size_t)i * lda + j] * a[(size_t)i * lda + j];
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0;
        for (lapack_int p = 0; p < n; p++)
            for (lapack_int q = p + 1; q < n; q++)
                off += 2 * a[(size_t)p * lda + q] * a[(size_t)p * lda + q];
        if (off <= 1e-30 * total)
            break;
        for (lapack_int p = 0; p < n; p++)
            for (lapack_int q = p + 1; q < n; q++) {
                const double apq = a[(size_t)p * lda + q];
                if (apq == 0)
                    continue;
                const double app = a[(size_t)p * lda + p], aqq = a[(size_t)q * lda + q];
                const double theta = (aqq - app) / (2 * apq);
                const double t = (theta >= 0 ? 1 : -1) / (fabs(theta) + sqrt(theta * theta + 1));
                const double c = 1 / sqrt(t * t + 1), s = t * c;
                for (lapack_int k = 0; k < n; k++) { /* A <- J^T A J */
                    const double akp = a[(size_t)k * lda + p], akq = a[(size_t)k * lda + q];
                    a[(size_t)k * lda + p] = c * akp - s * akq;
                    a[(size_t)k * lda + q] = s * akp + c * akq;
                }
                for (lapack_int k = 0; k < n; k++) {
                    const double apk = a[(size_t)p * lda + k], aqk = a[(size_t)q * lda + k];
                    a[(size_t)p * lda + k] = c * apk - s * aqk;
                    a[(size_t)q * lda + k] = s * apk + c * aqk;
                }
            }
    }
    for (lapack_int i = 0; i < n; i++)
        w[i] = a[(size_t)i * lda + i];
    qsort(w, (size_t)n, sizeof *w, cmp_double);
    return 0;
}
