/*
 * cli_device.c - --device cpu|cuda for generate, eval, serve and worker
 * (docs/cuda.md "Serving on the GPU"): which forward a command's runtime
 * runs. The CUDA runtime exists only in builds with the CUDA backend
 * (EKV_HAVE_CUDA, cmake/cuda.cmake); elsewhere --device cuda is refused with
 * a message saying so.
 */
#include <string.h>

#include "cli.h"
#include "entrokv/engine.h"
#include "entrokv/model.h"
#include "entrokv/status.h"
#ifdef EKV_HAVE_CUDA
#include "entrokv/model_cuda.h"
#endif

bool cli_take_device(const char *cmd, int argc, char **argv, int *i, const char **out)
{
    if (!cli_take_str(argc, argv, i, out))
        return false;
    if (strcmp(*out, "cpu") && strcmp(*out, "cuda")) {
        cli_error(cmd, "--device: 'cpu' or 'cuda', not '%s'", *out);
        return false;
    }
    return true;
}

bool cli_device_cuda(const char *dev) { return dev && !strcmp(dev, "cuda"); }

/* CUDA device 0's runtime; kv_tokens: its device KV pool (<= 0: max_ctx) */
static ekv_runtime *runtime_cuda(const ekv_model *m, int32_t max_batch, int32_t max_ctx,
                                 int64_t kv_tokens, ekv_error *err)
{
#ifdef EKV_HAVE_CUDA
    return model_runtime_create_cuda(m, max_batch, max_ctx, 0, kv_tokens, err);
#else
    (void)m;
    (void)max_batch;
    (void)max_ctx;
    (void)kv_tokens;
    ekv_error_set(err, EKV_EUNSUPPORTED,
                  "--device cuda: this build has no CUDA backend (EKV_CUDA=OFF: nvcc was not "
                  "found when it was configured; docs/cuda.md)");
    return NULL;
#endif
}

ekv_runtime *cli_engine_runtime_cuda(const ekv_model *m, const engine_config *cfg, void *arg,
                                     ekv_error *err)
{
    (void)arg;
    /* the engine admits kv_tokens per head over all its sequences: the device
     * pool holds as many, so concurrent streams never evict each other there */
    return runtime_cuda(m, cfg->max_batch, cfg->max_ctx, cfg->kv_tokens, err);
}

ekv_runtime *cli_runtime_create(const char *dev, const ekv_model *m, int32_t max_batch,
                                int32_t max_ctx, int threads, ekv_error *err)
{
    if (cli_device_cuda(dev))
        return runtime_cuda(m, max_batch, max_ctx, 0, err);
    return model_runtime_create(m, max_batch, max_ctx, threads, err);
}
