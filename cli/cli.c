/*
 * cli.c - flag value parsing shared by the subcommands.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void cli_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "entrokv %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

bool cli_take_str(int argc, char **argv, int *i, const char **out)
{
    if (*i + 1 >= argc) {
        fprintf(stderr, "entrokv: %s needs a value\n", argv[*i]);
        return false;
    }
    *out = argv[++*i];
    return true;
}

bool cli_take_int(int argc, char **argv, int *i, long min, long max, int32_t *out)
{
    const char *flag = argv[*i], *s;
    if (!cli_take_str(argc, argv, i, &s))
        return false;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) {
        fprintf(stderr, "entrokv: %s expects an integer in [%ld, %ld], got '%s'\n", flag, min,
                max, s);
        return false;
    }
    *out = (int32_t)v;
    return true;
}

bool cli_take_float(int argc, char **argv, int *i, double min, double max, float *out)
{
    const char *flag = argv[*i], *s;
    if (!cli_take_str(argc, argv, i, &s))
        return false;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < min || v > max) {
        fprintf(stderr, "entrokv: %s expects a number in [%g, %g], got '%s'\n", flag, min, max, s);
        return false;
    }
    *out = (float)v;
    return true;
}

bool cli_take_u64(int argc, char **argv, int *i, uint64_t *out)
{
    const char *flag = argv[*i], *s;
    if (!cli_take_str(argc, argv, i, &s))
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || *s == '-') {
        fprintf(stderr, "entrokv: %s expects a non-negative integer, got '%s'\n", flag, s);
        return false;
    }
    *out = v;
    return true;
}
