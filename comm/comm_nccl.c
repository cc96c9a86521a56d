/*
 * comm_nccl.c - the NCCL backend's entry point in builds without it.
 *
 * The NCCL backend itself (kernels/cuda/comm_nccl.cu) is compiled only
 * where nvcc and NCCL exist (cmake/cuda.cmake defines EKV_HAVE_NCCL); this
 * file answers comm_open_nccl everywhere else.
 */
#include "comm_internal.h"

#ifndef EKV_HAVE_NCCL
ekv_comm *comm_open_nccl(ekv_comm *boot, int device, ekv_error *err)
{
    (void)boot;
    (void)device;
    ekv_error_set(err, EKV_EUNSUPPORTED,
                  "NCCL communicator: this build has no NCCL (build with EKV_CUDA=ON where "
                  "nvcc and NCCL exist)");
    return NULL;
}
#endif
