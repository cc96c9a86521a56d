/*
 * backend.h - the seam between model_forward and the device that runs it
 * (internal to model/). A runtime without a backend runs model/llama.c's CPU
 * forward; a runtime with one (model/cuda/llama_cuda.c) hands every batch
 * to it after model_forward has validated the batch against the host KV
 * (capacity, shapes, token ids), so both paths share one set of rules.
 *
 * The host kv_seq stays the record of what each sequence holds (lengths,
 * positions, the tokens compression reads): a backend that keeps KV on a
 * device appends every row's K and V to the host sequence as the CPU
 * forward would, and may drop and rebuild its device copy of a sequence
 * from the host at any time.
 */
#ifndef ENTROKV_MODEL_BACKEND_H
#define ENTROKV_MODEL_BACKEND_H

#include "entrokv/model.h"

typedef struct model_backend {
    const char *name; /* "cuda" */
    /* Runs the validated batch as model_forward documents it. */
    ekv_status (*forward)(void *state, ekv_runtime *rt, const model_batch *b, float *logits,
                          ekv_error *err);
    /* Drops whatever the backend holds for seq (about to be freed). */
    void (*forget_seq)(void *state, const kv_seq *seq);
    void (*destroy)(void *state);
} model_backend;

/* Hands rt's forward to be (state owned by rt from now on: destroyed with
 * it). Once, right after the runtime is created. */
void model_runtime_set_backend(ekv_runtime *rt, const model_backend *be, void *state);

#endif
