/*
 * stopper.c - stop-string matching over streamed text (see stopper.h).
 *
 * One KMP automaton per stop string runs over the text byte by byte.
 * An automaton's state is the longest suffix of the text that is a prefix of
 * its stop string, which is exactly what has to be held back; the automata
 * survive between feeds, so a stop string split across any number of feeds
 * is found without rescanning.
 */
#include "entrokv/stopper.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct stop_pattern {
    uint16_t len;
    uint16_t state; /* length of the longest text suffix that is a prefix of bytes */
    uint16_t fail[EKV_STOPPER_MAX_LEN + 1]; /* KMP: longest proper border of bytes[0..q) */
    unsigned char bytes[EKV_STOPPER_MAX_LEN];
} stop_pattern;

struct ekv_stopper {
    bool stopped;  /* a stop string was found; nothing more is emitted */
    bool finished; /* flushed; nothing more is emitted */
    size_t n_hold;
    char hold[EKV_STOPPER_HOLD_MAX]; /* text received but not yet emitted */
    size_t n_stops;
    stop_pattern stops[];
};

static void pattern_init(stop_pattern *p, const char *str, size_t len)
{
    p->len = (uint16_t)len;
    p->state = 0;
    memcpy(p->bytes, str, len);
    p->fail[0] = p->fail[1] = 0;
    for (size_t i = 1; i < len; i++) {
        uint16_t k = p->fail[i];
        while (k > 0 && p->bytes[k] != p->bytes[i])
            k = p->fail[k];
        if (p->bytes[k] == p->bytes[i])
            k++;
        p->fail[i + 1] = k;
    }
}

/* Advances the automaton by one byte; the state reaches len on a match. */
static void pattern_step(stop_pattern *p, unsigned char c)
{
    uint16_t q = p->state;
    while (q > 0 && p->bytes[q] != c)
        q = p->fail[q];
    if (p->bytes[q] == c)
        q++;
    p->state = q;
}

ekv_stopper *stopper_create(const char *const *stops, size_t n, ekv_error *err)
{
    if (n > EKV_STOPPER_MAX_STOPS) {
        ekv_error_set(err, EKV_EINVAL, "%zu stop strings; at most %d are allowed", n,
                      EKV_STOPPER_MAX_STOPS);
        return NULL;
    }
    if (n > 0 && !stops) {
        ekv_error_set(err, EKV_EINVAL, "stop strings missing");
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        /* strnlen: a huge string from a request is rejected without reading it all */
        size_t len = stops[i] ? strnlen(stops[i], EKV_STOPPER_MAX_LEN + 1) : 0;
        if (len == 0) {
            ekv_error_set(err, EKV_EINVAL, "stop string %zu is %s", i,
                          stops[i] ? "empty" : "missing");
            return NULL;
        }
        if (len > EKV_STOPPER_MAX_LEN) {
            ekv_error_set(err, EKV_EINVAL, "stop string %zu is longer than %d bytes", i,
                          EKV_STOPPER_MAX_LEN);
            return NULL;
        }
    }
    ekv_stopper *s = calloc(1, sizeof *s + n * sizeof s->stops[0]);
    if (!s) {
        ekv_error_set(err, EKV_ENOMEM, "no memory for %zu stop strings", n);
        return NULL;
    }
    s->n_stops = n;
    for (size_t i = 0; i < n; i++)
        pattern_init(&s->stops[i], stops[i], strlen(stops[i]));
    return s;
}

void stopper_free(ekv_stopper *s)
{
    free(s);
}

/* Byte i of the virtual string hold || text. */
static unsigned char joined_at(const ekv_stopper *s, const char *text, size_t i)
{
    return (unsigned char)(i < s->n_hold ? s->hold[i] : text[i - s->n_hold]);
}

/* Copies bytes [from, to) of hold || text to dst. */
static void joined_copy(const ekv_stopper *s, const char *text, size_t from, size_t to, char *dst)
{
    if (from >= to)
        return; /* dst may be NULL when there is nothing to copy */
    if (from < s->n_hold) {
        size_t h_end = to < s->n_hold ? to : s->n_hold;
        memcpy(dst, s->hold + from, h_end - from);
        dst += h_end - from;
        from = h_end;
    }
    if (to > from)
        memcpy(dst, text + (from - s->n_hold), to - from);
}

static size_t utf8_seq_len(unsigned char lead)
{
    if (lead >= 0xF0 && lead <= 0xF7)
        return 4;
    if (lead >= 0xE0)
        return lead <= 0xEF ? 3 : 1;
    if (lead >= 0xC0)
        return 2;
    return 1; /* ASCII, a stray continuation byte, or not UTF-8 at all */
}

/* Moves a cut at byte e of hold || text back to the start of the character
 * it would split, so no emitted chunk ends in half a character. Invalid
 * UTF-8 is cut where it lies; the concatenation is exact either way. */
static size_t utf8_safe_cut(const ekv_stopper *s, const char *text, size_t e)
{
    size_t q = e, back = 0;
    while (q > 0 && back < 3 && (joined_at(s, text, q - 1) & 0xC0) == 0x80) {
        q--;
        back++;
    }
    if (q == 0)
        return e;
    size_t lead = q - 1;
    return lead + utf8_seq_len(joined_at(s, text, lead)) > e ? lead : e;
}

/* Runs all automata over one byte; the length of the longest stop string that
 * ends here, or 0. */
static size_t stopper_step(ekv_stopper *s, unsigned char c)
{
    size_t matched = 0;
    for (size_t j = 0; j < s->n_stops; j++) {
        stop_pattern *p = &s->stops[j];
        pattern_step(p, c);
        if (p->state == p->len && p->len > matched)
            matched = p->len;
    }
    return matched;
}

static size_t stopper_longest_partial(const ekv_stopper *s)
{
    size_t keep = 0;
    for (size_t j = 0; j < s->n_stops; j++)
        if (s->stops[j].state > keep)
            keep = s->stops[j].state;
    return keep;
}

ekv_status stopper_feed(ekv_stopper *s, const char *text, size_t len, char *out, size_t cap,
                        size_t *n_out, bool *stopped, ekv_error *err)
{
    *n_out = 0;
    *stopped = s->stopped;
    if (s->stopped || s->finished)
        return EKV_OK;
    if (len > 0 && !text)
        return ekv_error_set(err, EKV_EINVAL, "stopper fed NULL text");
    if (len > SIZE_MAX - s->n_hold || cap < s->n_hold + len)
        return ekv_error_set(err, EKV_ERANGE,
                             "stopper output has %zu bytes of room, needs up to %zu", cap,
                             s->n_hold + len);
    for (size_t i = 0; i < len; i++) {
        size_t matched = stopper_step(s, (unsigned char)text[i]);
        if (matched) {
            /* Every byte of the match is still held or in text: the hold
             * keeps at least the longest partial match. */
            size_t start = s->n_hold + i + 1 - matched;
            joined_copy(s, text, 0, start, out);
            *n_out = start;
            s->n_hold = 0;
            s->stopped = *stopped = true;
            return EKV_OK;
        }
    }
    size_t total = s->n_hold + len;
    size_t cut = utf8_safe_cut(s, text, total - stopper_longest_partial(s));
    char tail[EKV_STOPPER_HOLD_MAX];
    joined_copy(s, text, cut, total, tail); /* <= longest stop - 1 + 3 bytes */
    joined_copy(s, text, 0, cut, out);
    *n_out = cut;
    s->n_hold = total - cut;
    memcpy(s->hold, tail, s->n_hold);
    return EKV_OK;
}

ekv_status stopper_flush(ekv_stopper *s, char *out, size_t cap, size_t *n_out, ekv_error *err)
{
    *n_out = 0;
    if (s->stopped || s->finished)
        return EKV_OK;
    if (cap < s->n_hold)
        return ekv_error_set(err, EKV_ERANGE,
                             "stopper output has %zu bytes of room, needs %zu", cap, s->n_hold);
    if (s->n_hold > 0)
        memcpy(out, s->hold, s->n_hold);
    *n_out = s->n_hold;
    s->n_hold = 0;
    s->finished = true;
    return EKV_OK;
}
