/*
 * lapacke.h (shim) - the one LAPACKE call compress/entropy.c makes, for the
 * standalone CUDA build on machines without LAPACKE: eigenvalues of a
 * symmetric matrix by cyclic Jacobi (lapacke_jacobi.c). Not used by the
 * main build, which links the real LAPACKE.
 */
#ifndef EKV_LAPACKE_SHIM_H
#define EKV_LAPACKE_SHIM_H

typedef int lapack_int;
#define LAPACK_ROW_MAJOR 101
#define LAPACK_COL_MAJOR 102

/* jobz must be 'N' (eigenvalues only); w receives them ascending; a is
 * overwritten. Returns 0, or -1 for an unsupported argument. */
lapack_int LAPACKE_dsyev(int matrix_layout, char jobz, char uplo, lapack_int n, double *a,
                         lapack_int lda, double *w);

#endif
