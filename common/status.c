/*
 * status.c - filling ekv_error messages.
 */
#include "entrokv/status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

ekv_status ekv_error_set(ekv_error *err, ekv_status code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

ekv_status ekv_error_wrap(ekv_error *err, const char *fmt, ...)
{
    if (!err)
        return EKV_EINVAL;
    char prefix[256], old[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    /* truncating a long message is fine; it is for humans */
    size_t n = strlen(prefix);
    if (n > sizeof err->msg - 3)
        n = sizeof err->msg - 3;
    memcpy(err->msg, prefix, n);
    memcpy(err->msg + n, ": ", 2);
    size_t room = sizeof err->msg - n - 3;
    size_t m = strnlen(old, room);
    memcpy(err->msg + n + 2, old, m);
    err->msg[n + 2 + m] = 0;
    return err->code;
}

const char *ekv_status_name(ekv_status code)
{
    switch (code) {
    case EKV_OK: return "ok";
    case EKV_EINVAL: return "invalid argument";
    case EKV_EIO: return "i/o error";
    case EKV_EFORMAT: return "bad format";
    case EKV_ENOMEM: return "out of memory";
    case EKV_ERANGE: return "out of range";
    case EKV_EUNSUPPORTED: return "unsupported";
    case EKV_EBUSY: return "busy";
    case EKV_EUNAVAILABLE: return "unavailable";
    }
    return "unknown";
}
