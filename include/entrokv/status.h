/*
 * status.h - error values that travel up.
 *
 * Every fallible function returns an ekv_status (or NULL) and, when given an
 * ekv_error, fills it with a one-line human message. Nothing below cli/ exits
 * the process or prints errors itself.
 */
#ifndef ENTROKV_STATUS_H
#define ENTROKV_STATUS_H

typedef enum ekv_status {
    EKV_OK = 0,
    EKV_EINVAL,      /* bad argument or request */
    EKV_EIO,         /* file or system call failed */
    EKV_EFORMAT,     /* malformed input file / data */
    EKV_ENOMEM,      /* allocation failed or pool exhausted */
    EKV_ERANGE,      /* value out of the supported range (e.g. context) */
    EKV_EUNSUPPORTED, /* valid but not supported by this build */
    EKV_EBUSY,        /* a bounded queue or pool is full; try again later */
    EKV_EUNAVAILABLE  /* a peer (a remote worker group) failed or stopped answering */
} ekv_status;

typedef struct ekv_error {
    ekv_status code;
    char msg[512];
} ekv_error;

/* Fills err (which may be NULL) and returns code, so callers can write
 * `return ekv_error_set(err, EKV_EFORMAT, "...")`. */
ekv_status ekv_error_set(ekv_error *err, ekv_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes an existing message with context ("loading model: ..."). */
ekv_status ekv_error_wrap(ekv_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

const char *ekv_status_name(ekv_status code);

#endif
