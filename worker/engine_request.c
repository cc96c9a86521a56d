/*
 * engine_request.c - the checks engine_submit runs on a request before it
 * is queued (moved from engine.c): every field a client controls, so a bad
 * request fails at submit with a message rather than in a step.
 */
#include "engine_internal.h"

#include <math.h>

ekv_status engine_request_check(const ekv_engine *e, const engine_request *r, ekv_error *err)
{
    if (!r)
        return ekv_error_set(err, EKV_EINVAL, "engine: no request");
    if (!r->prompt || r->n_prompt <= 0)
        return ekv_error_set(err, EKV_EINVAL, "the prompt is empty");
    if ((int64_t)r->n_prompt + 1 > e->cfg.max_ctx)
        return ekv_error_set(err, EKV_ERANGE,
                             "the prompt has %d tokens; the context holds %d (prompt + at least 1)",
                             r->n_prompt, e->cfg.max_ctx);
    if (r->params.max_tokens < 0)
        return ekv_error_set(err, EKV_EINVAL, "max_tokens must be >= 0");
    ekv_status rc = sampler_params_check(&r->params.sampling, err);
    if (rc)
        return rc;
    if (r->params.logprobs &&
        (r->params.top_logprobs < 0 || r->params.top_logprobs > EKV_MAX_TOP_LOGPROBS))
        return ekv_error_set(err, EKV_EINVAL, "top_logprobs must be in [0, %d], got %d",
                             EKV_MAX_TOP_LOGPROBS, r->params.top_logprobs);
    for (size_t i = 0; i < r->params.sampling.n_logit_bias; i++)
        if (r->params.sampling.logit_bias[i].token >= e->n_vocab)
            return ekv_error_set(err, EKV_EINVAL,
                                 "logit_bias: token %d is outside the vocabulary [0, %d)",
                                 r->params.sampling.logit_bias[i].token, e->n_vocab);
    if (r->params.n_stops && !r->params.stops)
        return ekv_error_set(err, EKV_EINVAL, "%zu stop strings but no array", r->params.n_stops);
    for (int32_t i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= e->n_vocab)
            return ekv_error_set(err, EKV_EINVAL, "prompt token %d is %d, outside [0, %d)", i,
                                 r->prompt[i], e->n_vocab);
    if (r->n < 0 || r->n > e->cfg.max_running)
        return ekv_error_set(err, EKV_EINVAL, "n must be in [1, %d] (max_running), got %d",
                             e->cfg.max_running, r->n);
    if (r->n > 1 && !r->choice_ctx)
        return ekv_error_set(err, EKV_EINVAL, "n %d choices but no choice_ctx", r->n);
    if (r->n > 1 && r->params.prompt_logprobs)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "prompt log-probabilities (echo) with n > 1");
    if (r->n > 1 && r->kv.decode.mode != KVC_DECODE_NONE)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "decode-time KV eviction (SCOPE) with n > 1");
    if (!e->on_cpu && (r->kv.decode.mode != KVC_DECODE_NONE || r->kv.recall > 0 ||
                       r->kv.spark.ratio > 0))
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "the %s forward does not run %s yet (docs/cuda.md)",
                             model_runtime_device(e->rt),
                             r->kv.decode.mode != KVC_DECODE_NONE ? "SCOPE's decode eviction"
                             : r->kv.recall > 0                    ? "recall"
                                                                   : "SparK's packed keys");
    if ((int)r->kv.method < 0 || (int)r->kv.method >= KVC_N_METHODS)
        return ekv_error_set(err, EKV_EINVAL, "unknown kv compression method %d",
                             (int)r->kv.method);
    if (r->kv.method != KVC_FULL && !(isfinite(r->kv.budget) && r->kv.budget > 0))
        return ekv_error_set(err, EKV_EINVAL, "kv budget %g must be > 0 and finite",
                             r->kv.budget);
    /* an absolute budget above the prompt fails here, not after its prefill
     * (the coordinator checks it too; a direct Worker.Generate relies on this) */
    int32_t kept;
    ekv_status rc_budget = kvc_policy_mean_tokens(&r->kv, r->n_prompt, &kept, err);
    if (rc_budget)
        return rc_budget;
    return kvc_policy_check(&r->kv, err);
}
