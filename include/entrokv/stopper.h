/*
 * stopper.h - stop strings over streamed text.
 *
 * Generated text arrives in pieces; a stopper passes on only the bytes that
 * can no longer be the start of a stop string (nor half a UTF-8 character),
 * and reports the first moment any stop string is complete.
 */
#ifndef ENTROKV_STOPPER_H
#define ENTROKV_STOPPER_H

#include <stdbool.h>
#include <stddef.h>

#include "entrokv/status.h"

#define EKV_STOPPER_MAX_STOPS 16
#define EKV_STOPPER_MAX_LEN 256
/* The most bytes a stopper ever holds back between calls: a stop string's
 * length minus one, plus up to three bytes of a split UTF-8 character. */
#define EKV_STOPPER_HOLD_MAX (EKV_STOPPER_MAX_LEN + 3)

typedef struct ekv_stopper ekv_stopper;

/* Copies the n stop strings (n may be 0: text passes straight through, minus
 * the UTF-8 hold-back). EKV_EINVAL for a NULL or empty string, more than
 * EKV_STOPPER_MAX_STOPS strings, or one longer than EKV_STOPPER_MAX_LEN
 * bytes. The caller owns the result and releases it with stopper_free. */
ekv_stopper *stopper_create(const char *const *stops, size_t n, ekv_error *err);

void stopper_free(ekv_stopper *s);

/* Appends len bytes of newly generated text and writes to out the bytes that
 * are now safe to emit, setting *n_out. When a stop string is complete,
 * *stopped becomes true and out ends just before that stop string; the
 * stopper then emits nothing more. The stop is the first moment any stop
 * string appears in the text (the earliest end; among stop strings ending
 * on the same byte, the longest), so how the text is split into feeds never
 * changes the result. cap >= len + EKV_STOPPER_HOLD_MAX always suffices;
 * with less room than the call could need, it consumes nothing and returns
 * EKV_ERANGE. */
ekv_status stopper_feed(ekv_stopper *s, const char *text, size_t len, char *out, size_t cap,
                        size_t *n_out, bool *stopped, ekv_error *err);

/* Generation ended for another reason (length, end-of-sequence): writes the
 * held-back tail to out (cap >= EKV_STOPPER_HOLD_MAX always suffices, else
 * EKV_ERANGE) and finishes the stopper; later feeds emit nothing. After a
 * stop, the tail is part of the stop string and nothing is written. */
ekv_status stopper_flush(ekv_stopper *s, char *out, size_t cap, size_t *n_out, ekv_error *err);

#endif
