/*
 * hmac.h - HMAC-SHA256 (RFC 2104, FIPS 198-1) over common/sha256.
 *
 * Used by the KV store's mutual challenge-response authentication
 * (docs/kvstore.md). Keys longer than the 64-byte SHA-256 block are hashed
 * first, as the RFC says. hmac_equal compares MACs in constant time so a
 * peer cannot learn a proof byte by byte from timing.
 */
#ifndef ENTROKV_HMAC_H
#define ENTROKV_HMAC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/sha256.h"

typedef struct ekv_hmac {
    ekv_sha256 inner;
    uint8_t okey[64]; /* key ^ opad, for the outer hash */
} ekv_hmac;

/* Streaming form: init with the key, update with the message pieces. */
void hmac_sha256_init(ekv_hmac *h, const void *key, size_t key_len);
void hmac_sha256_update(ekv_hmac *h, const void *data, size_t len);
void hmac_sha256_final(ekv_hmac *h, uint8_t mac[32]);

/* One-shot HMAC-SHA256(key, msg). */
void hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len,
                 uint8_t mac[32]);

/* Constant-time equality of two n-byte strings (n is public). */
bool hmac_equal(const uint8_t *a, const uint8_t *b, size_t n);

#endif
