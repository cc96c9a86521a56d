/*
 * json_strict.h - parsing a request body as RFC 8259 says. cJSON is lenient
 * where a server must not be (it stops at the end of the first value, lets
 * raw control characters through in strings and as whitespace, and keeps
 * both copies of a repeated key, so two parsers could read one body two
 * ways). Private to coordinator/ (openai.c is its user).
 */
#ifndef ENTROKV_JSON_STRICT_H
#define ENTROKV_JSON_STRICT_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "entrokv/status.h"

/* Parses body[0, len) into *out (free with cJSON_Delete) or refuses it with
 * EKV_EINVAL and a message naming the problem: a NUL byte, invalid UTF-8, a
 * raw control character (U+0000..U+001F) inside a string or as whitespace,
 * a syntax error, data after the value, or a key repeated in one object
 * (at any depth). */
ekv_status json_strict_parse(const char *body, size_t len, cJSON **out, ekv_error *err);

#endif
