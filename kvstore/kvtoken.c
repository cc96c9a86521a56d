/*
 * kvtoken.c - the shared secret behind the KV store's authentication, read
 * from --auth-token-file. The token is raw bytes (any printable secret
 * works); trailing whitespace goes so `echo secret > file` and
 * `printf secret > file` give the same token.
 */
#include "entrokv/kvstore.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOKEN_MAX 4096

ekv_status kvstore_token_load(const char *path, uint8_t **token, size_t *len, ekv_error *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return ekv_error_set(err, EKV_EIO, "auth token file %s: %s", path, strerror(errno));
    uint8_t *buf = malloc(TOKEN_MAX + 1);
    if (!buf) {
        fclose(f);
        return ekv_error_set(err, EKV_ENOMEM, "auth token: out of memory");
    }
    size_t n = fread(buf, 1, TOKEN_MAX + 1, f);
    bool bad_read = ferror(f) != 0;
    fclose(f);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' ' ||
                     buf[n - 1] == '\t'))
        n--;
    if (bad_read || n == 0 || n > TOKEN_MAX) {
        memset(buf, 0, TOKEN_MAX + 1);
        free(buf);
        return ekv_error_set(err, EKV_EINVAL, "auth token file %s: %s", path,
                             bad_read ? "read error" : n ? "longer than 4096 bytes" : "empty");
    }
    *token = buf;
    *len = n;
    return EKV_OK;
}
