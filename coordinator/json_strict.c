/*
 * json_strict.c - RFC 8259 checks around cJSON (see json_strict.h).
 */
#include "json_strict.h"

#include "entrokv/coordinator.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* The bytes RFC 8259 allows between tokens (cJSON skips every byte <= 0x20). */
static bool json_ws(unsigned char b)
{
    return b == ' ' || b == '\t' || b == '\n' || b == '\r';
}

static bool is_digit(unsigned char b)
{
    return b >= '0' && b <= '9';
}

/* The length of the number RFC 8259 section 6 allows at p
 * (-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?), 0 when p does
 * not start one. cJSON hands every run of [0-9+-.eE] to strtod, which also
 * takes 01, 1., -.5 and 1.e5; those are refused here. */
static size_t number_len(const unsigned char *p, size_t n)
{
    size_t i = 0;
    if (i < n && p[i] == '-')
        i++;
    if (i < n && p[i] == '0')
        i++;
    else if (i < n && is_digit(p[i]))
        while (i < n && is_digit(p[i]))
            i++;
    else
        return 0;
    if (i < n && p[i] == '.') {
        if (++i >= n || !is_digit(p[i]))
            return 0;
        while (i < n && is_digit(p[i]))
            i++;
    }
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        if (++i < n && (p[i] == '+' || p[i] == '-'))
            i++;
        if (i >= n || !is_digit(p[i]))
            return 0;
        while (i < n && is_digit(p[i]))
            i++;
    }
    return i;
}

static bool number_char(unsigned char b)
{
    return is_digit(b) || b == '-' || b == '+' || b == '.' || b == 'e' || b == 'E';
}

/* Raw control characters: never inside a string (RFC 8259 section 7), and
 * outside one only the four whitespace bytes. The scan follows string state
 * through escapes; on a body that is not JSON it may misjudge, but then the
 * body is refused either way. */
static ekv_status check_controls(const char *body, size_t len, ekv_error *err)
{
    bool in_str = false, esc = false;
    for (size_t i = 0; i < len; i++) {
        const unsigned char b = (unsigned char)body[i];
        if (in_str) {
            if (b < 0x20)
                return ekv_error_set(err, EKV_EINVAL,
                                     "the body has a raw control character U+%04X inside a "
                                     "string at byte %zu (escape it)",
                                     b, i);
            if (esc)
                esc = false;
            else if (b == '\\')
                esc = true;
            else if (b == '"')
                in_str = false;
        } else if (b == '"') {
            in_str = true;
        } else if (b != 'e' && b != 'E' && number_char(b) &&
                   (i == 0 || !number_char((unsigned char)body[i - 1]))) {
            /* outside strings, a run of these bytes that does not start with
             * a letter is a number (true and false hold an 'e', never first) */
            size_t run = i;
            while (run < len && number_char((unsigned char)body[run]))
                run++;
            if (number_len((const unsigned char *)body + i, run - i) != run - i)
                return ekv_error_set(err, EKV_EINVAL,
                                     "the body has a malformed number '%.*s' at byte %zu",
                                     (int)(run - i > 24 ? 24 : run - i), body + i, i);
            i = run - 1;
        } else if (b < 0x20 && !json_ws(b)) {
            return ekv_error_set(err, EKV_EINVAL,
                                 "the body has a control character U+%04X at byte %zu", b, i);
        }
    }
    return EKV_OK;
}

static int cmp_keys(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A key repeated in one object, anywhere in v: RFC 8259 leaves the meaning
 * open, and parsers differ (first or last wins), so refusing is the one
 * reading every client and proxy agrees with. Sorting keeps a hostile
 * object with many keys O(n log n). */
static ekv_status check_duplicates(const cJSON *v, ekv_error *err)
{
    if (!cJSON_IsObject(v) && !cJSON_IsArray(v))
        return EKV_OK;
    size_t n = 0;
    for (const cJSON *c = v->child; c; c = c->next)
        n++;
    if (cJSON_IsObject(v) && n > 1) {
        const char **keys = malloc(n * sizeof *keys);
        if (!keys)
            return ekv_error_set(err, EKV_ENOMEM, "out of memory");
        size_t i = 0;
        for (const cJSON *c = v->child; c; c = c->next)
            keys[i++] = c->string ? c->string : "";
        qsort(keys, n, sizeof *keys, cmp_keys);
        for (i = 1; i < n; i++)
            if (!strcmp(keys[i - 1], keys[i]))
                break;
        ekv_status rc = EKV_OK;
        if (i < n)
            rc = ekv_error_set(err, EKV_EINVAL, "the body repeats the key '%.64s' in one object",
                               keys[i]);
        free(keys);
        if (rc)
            return rc;
    }
    for (const cJSON *c = v->child; c; c = c->next) {
        ekv_status rc = check_duplicates(c, err);
        if (rc)
            return rc;
    }
    return EKV_OK;
}

ekv_status json_strict_parse(const char *body, size_t len, cJSON **out, ekv_error *err)
{
    *out = NULL;
    if (!body)
        len = 0;
    if (len > 0 && memchr(body, 0, len))
        return ekv_error_set(err, EKV_EINVAL, "the body contains a NUL byte");
    if (len > 0 && !coord_utf8_valid(body, len))
        return ekv_error_set(err, EKV_EINVAL, "the body is not valid UTF-8");
    ekv_status rc = check_controls(body, len, err);
    if (rc)
        return rc;
    const char *end = NULL;
    cJSON *j = len > 0 ? cJSON_ParseWithLengthOpts(body, len, &end, 0) : NULL;
    if (!j)
        return ekv_error_set(err, EKV_EINVAL, "the body is not valid JSON");
    size_t at = end && end >= body && end <= body + len ? (size_t)(end - body) : len;
    while (at < len && json_ws((unsigned char)body[at]))
        at++;
    if (at < len) {
        cJSON_Delete(j);
        return ekv_error_set(err, EKV_EINVAL,
                             "the body has data after its JSON value (at byte %zu)", at);
    }
    if ((rc = check_duplicates(j, err))) {
        cJSON_Delete(j);
        return rc;
    }
    *out = j;
    return EKV_OK;
}
