/*
 * sampler.h - choosing the next token from logits, and cutting the generated
 * text at stop strings.
 *
 * Sampler: one per request, fed the logits of every step. The chain is the
 * one llama.cpp's common sampler uses, so the same settings behave the same,
 * with OpenAI's logit_bias and presence/frequency penalties in front:
 *
 *   logit mask (grammar hook) -> logit_bias -> repetition penalty
 *   -> presence/frequency penalty -> (greedy: argmax) | top-k -> top-p
 *   -> min-p -> temperature -> softmax -> seeded draw
 *
 * top-p and min-p see the probabilities before temperature. The "processed
 * logits" are those after the penalties: log-probabilities (sampler_next)
 * are their log-softmax divided by the temperature (by 1 when greedy), over
 * the whole vocabulary, before top-k/top-p/min-p truncation. Draws come from
 * the sampler's own xoshiro256** stream and its own exp(), so the same seed
 * and the same sequence of logits give the same tokens on every platform and
 * libc (given IEEE doubles and no FMA contraction; see sampler.c).
 *
 * Stopper: one per request, fed the detokenized text as it is produced. It
 * holds back any tail that could still grow into a stop string (and any
 * incomplete UTF-8 character at the end), so what it emits can be streamed to
 * the client at once and never has to be taken back.
 *
 * Neither object is thread-safe; each belongs to the one request that made it.
 */
#ifndef ENTROKV_SAMPLER_H
#define ENTROKV_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

/* ---- sampler ---- */

#define EKV_MAX_LOGIT_BIAS 1024  /* entries of logit_bias */
#define EKV_MAX_TOP_LOGPROBS 20  /* alternatives per token (OpenAI's top_logprobs limit) */

/* OpenAI's logit_bias: bias in [-100, 100] added to token's logit. */
typedef struct ekv_logit_bias {
    int32_t token;
    float bias;
} ekv_logit_bias;

/* A per-request hook run first on the (scratch copy of the) logits of
 * every sampling step: it may set entries to -inf to forbid tokens (the
 * grammar-constrained sampling of structured output plugs in here).
 * generated: the tokens this request has sampled so far. */
typedef struct ekv_logit_mask {
    void (*apply)(void *ctx, float *logits, int32_t n_vocab, const int32_t *generated,
                  size_t n_generated);
    void *ctx;
} ekv_logit_mask;

typedef struct ekv_sampler_params {
    float temperature;    /* 0: greedy (argmax); > 0: sample; negative is an error */
    int32_t top_k;        /* <= 0 or >= n_vocab: off */
    float top_p;          /* in (0, 1]; 1: off */
    float min_p;          /* in [0, 1]; 0: off; keeps p >= min_p * p_max */
    float repeat_penalty; /* > 0; 1: off; < 1 encourages repetition */
    int32_t repeat_last_n; /* >= 0; how many most recent history tokens count */
    uint64_t seed;        /* every value, 0 included, is a fixed seed */
    /* OpenAI's, in [-2, 2]; 0: off. Over the generated tokens only:
     * logit[t] -= count[t] * frequency + (count[t] > 0) * presence. */
    float presence_penalty;
    float frequency_penalty;
    const ekv_logit_bias *logit_bias; /* n_logit_bias entries; copied by sampler_create */
    size_t n_logit_bias;
    const ekv_logit_mask *mask;       /* NULL: none; must outlive the sampler */
} ekv_sampler_params;

/* A token's log-probability and the n_top most likely tokens of the same
 * distribution, best first (ties: lower id first). -inf where a token
 * cannot be drawn (masked, or bias -100 on a finite range is not -inf). */
typedef struct ekv_logprob {
    int32_t token;
    float logprob;
    int32_t n_top;
    int32_t top_ids[EKV_MAX_TOP_LOGPROBS];
    float top_logprobs[EKV_MAX_TOP_LOGPROBS];
} ekv_logprob;

typedef struct ekv_sampler ekv_sampler;

/* temperature 1, top_k 0, top_p 1, min_p 0, repeat_penalty 1,
 * repeat_last_n 64, seed 0: plain sampling from the model's distribution.
 * Whether a request without settings is greedy is the caller's decision. */
void sampler_params_default(ekv_sampler_params *p);

/* EKV_EINVAL with a message naming the field for anything out of range:
 * NaN or infinite floats, negative temperature (send 0 for greedy), top_p
 * outside (0, 1], min_p outside [0, 1], repeat_penalty <= 0, negative
 * repeat_last_n, presence/frequency penalty outside [-2, 2], more than
 * EKV_MAX_LOGIT_BIAS biases, a bias outside [-100, 100] or a negative
 * token. Token ids past the vocabulary are sampler_create's (it knows
 * n_vocab). Parameters from the network must pass through this. */
ekv_status sampler_params_check(const ekv_sampler_params *p, ekv_error *err);

/* Checks p (logit_bias tokens against n_vocab too), then allocates scratch
 * for n_vocab tokens (about 16 bytes each).
 * NULL with err filled on bad parameters (EKV_EINVAL) or no memory. The
 * caller owns the result and releases it with sampler_free. */
ekv_sampler *sampler_create(const ekv_sampler_params *p, int32_t n_vocab, ekv_error *err);

void sampler_free(ekv_sampler *s);

/* The next token, in [0, n_vocab). logits has n_vocab entries and is only
 * read. history holds the tokens so far, oldest first (prompt included if
 * the caller wants the prompt penalized); ids outside the vocabulary are
 * ignored. Each distinct token among the last repeat_last_n is penalized
 * once. Ties go to the lowest id. NaN logits are treated as -inf; if every
 * logit is -inf, the result is still a valid id. Greedy calls do not advance
 * the random stream. */
int32_t sampler_sample(ekv_sampler *s, const float *logits, const int32_t *history,
                       size_t n_history);

/* sampler_sample with history split: its first n_prompt tokens are the
 * prompt, seen by the repetition penalty but not by presence/frequency
 * (OpenAI counts the generated text). With lp non-NULL, also the sampled
 * token's log-probability and the n_top (clamped to [0,
 * EKV_MAX_TOP_LOGPROBS]) best of the processed distribution (see above). */
int32_t sampler_next(ekv_sampler *s, const float *logits, const int32_t *history,
                     size_t n_history, size_t n_prompt, int32_t n_top, ekv_logprob *lp);

/* log-softmax of raw logits (no sampler: the prompt's tokens under echo):
 * token's log-probability and the n_top best; NaN logits count as -inf. */
void sampler_logprobs(const float *logits, int32_t n_vocab, int32_t token, int32_t n_top,
                      ekv_logprob *out);

#endif
