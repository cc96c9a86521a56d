/*
 * model_cuda.h - model_forward on an NVIDIA GPU (model/cuda/llama_cuda.c,
 * docs/cuda.md "Forward pass"). Present only in builds with the CUDA
 * backend (EKV_HAVE_CUDA: the entrokv_cuda library is linked).
 *
 * The runtime it returns is an ordinary ekv_runtime: model_forward,
 * model_prefill, gen_run and the rest take it unchanged. Weights are
 * dequantized to fp16 once at creation; each forward runs on the device
 * (cuBLAS GEMMs with fp32 accumulation, the kernels of cuda.h, decode
 * attention over a device KV pool of the host pool's block layout) and
 * copies back the wanted logits and the batch's K and V, which are
 * appended to the host kv_seq as the CPU forward appends them, so the host
 * sequence stays the record of what each sequence holds.
 *
 * Unsupported for now, EKV_EUNSUPPORTED at model_forward: decode-time
 * attention probes (model_probe: SCOPE), recall (kv_seq_recall_enable) and
 * SparK's packed keys. A tap (model_tap) is served by copying each layer's
 * queries to the host. Prompt compression (kv_seq_keep on the host) works:
 * a sequence whose host KV changed is re-uploaded before its next forward.
 */
#ifndef ENTROKV_MODEL_CUDA_H
#define ENTROKV_MODEL_CUDA_H

#include <stdint.h>

#include "entrokv/model.h"

/*
 * A runtime whose forward runs on CUDA device `device`. kv_tokens: tokens
 * per (layer, KV head) the device KV pool holds over all sequences (<= 0:
 * max_ctx); a sequence that does not fit evicts the device copies of
 * sequences outside the batch (rebuilt from the host when they return).
 * EKV_EUNSUPPORTED without a usable device or for a model the kernels
 * cannot run (GQA group > 8, head_dim other than 64 / 128 / 256, a weight
 * type without a dequantizer).
 */
ekv_runtime *model_runtime_create_cuda(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                       int device, int64_t kv_tokens, ekv_error *err);

#endif
