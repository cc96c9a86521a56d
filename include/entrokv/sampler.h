/*
 * sampler.h - choosing the next token from logits, and cutting the generated
 * text at stop strings.
 *
 * Sampler: one per request, fed the logits of every step. The chain is the
 * one llama.cpp's common sampler uses, so the same settings behave the same:
 *
 *   repetition penalty -> (greedy: argmax) | top-k -> top-p -> min-p
 *   -> temperature -> softmax -> seeded draw
 *
 * top-p and min-p see the probabilities before temperature. Draws come from
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

typedef struct ekv_sampler_params {
    float temperature;    /* 0: greedy (argmax); > 0: sample; negative is an error */
    int32_t top_k;        /* <= 0 or >= n_vocab: off */
    float top_p;          /* in (0, 1]; 1: off */
    float min_p;          /* in [0, 1]; 0: off; keeps p >= min_p * p_max */
    float repeat_penalty; /* > 0; 1: off; < 1 encourages repetition */
    int32_t repeat_last_n; /* >= 0; how many most recent history tokens count */
    uint64_t seed;        /* every value, 0 included, is a fixed seed */
} ekv_sampler_params;

typedef struct ekv_sampler ekv_sampler;

/* temperature 1, top_k 0, top_p 1, min_p 0, repeat_penalty 1,
 * repeat_last_n 64, seed 0: plain sampling from the model's distribution.
 * Whether a request without settings is greedy is the caller's decision. */
void sampler_params_default(ekv_sampler_params *p);

/* EKV_EINVAL with a message naming the field for anything out of range:
 * NaN or infinite floats, negative temperature (send 0 for greedy), top_p
 * outside (0, 1], min_p outside [0, 1], repeat_penalty <= 0, negative
 * repeat_last_n. Parameters from the network must pass through this. */
ekv_status sampler_params_check(const ekv_sampler_params *p, ekv_error *err);

/* Checks p, then allocates scratch for n_vocab tokens (about 8 bytes each).
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

#endif
