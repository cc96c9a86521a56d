/*
 * sha256.h - SHA-256 (FIPS 180-4), streaming. Used to verify downloaded
 * model files; the KV store's prefix hash chain will use it too.
 */
#ifndef ENTROKV_SHA256_H
#define ENTROKV_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

typedef struct ekv_sha256 {
    uint32_t h[8];
    uint64_t n_bytes;
    uint8_t buf[64];
    size_t n_buf;
} ekv_sha256;

void sha256_init(ekv_sha256 *s);
void sha256_update(ekv_sha256 *s, const void *data, size_t len);
void sha256_final(ekv_sha256 *s, uint8_t digest[32]);
/* Lower-case hex digest of a whole file into hex[65]. */
ekv_status sha256_file_hex(const char *path, char hex[65], ekv_error *err);

#endif
