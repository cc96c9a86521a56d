/*
 * hmac.c - HMAC-SHA256 after RFC 2104: H((K ^ opad) || H((K ^ ipad) || m)).
 */
#include "entrokv/hmac.h"

#include <string.h>

void hmac_sha256_init(ekv_hmac *h, const void *key, size_t key_len)
{
    uint8_t k[64] = {0}, ikey[64];
    if (key_len > sizeof k) {
        ekv_sha256 s;
        sha256_init(&s);
        sha256_update(&s, key, key_len);
        sha256_final(&s, k); /* the first 32 bytes; the rest stay zero */
    } else if (key_len) {
        memcpy(k, key, key_len);
    }
    for (int i = 0; i < 64; i++) {
        ikey[i] = k[i] ^ 0x36;
        h->okey[i] = k[i] ^ 0x5c;
    }
    sha256_init(&h->inner);
    sha256_update(&h->inner, ikey, sizeof ikey);
    memset(k, 0, sizeof k);
    memset(ikey, 0, sizeof ikey);
}

void hmac_sha256_update(ekv_hmac *h, const void *data, size_t len)
{
    sha256_update(&h->inner, data, len);
}

void hmac_sha256_final(ekv_hmac *h, uint8_t mac[32])
{
    uint8_t inner[32];
    ekv_sha256 outer;
    sha256_final(&h->inner, inner);
    sha256_init(&outer);
    sha256_update(&outer, h->okey, sizeof h->okey);
    sha256_update(&outer, inner, sizeof inner);
    sha256_final(&outer, mac);
    memset(h, 0, sizeof *h);
}

void hmac_sha256(const void *key, size_t key_len, const void *msg, size_t msg_len,
                 uint8_t mac[32])
{
    ekv_hmac h;
    hmac_sha256_init(&h, key, key_len);
    hmac_sha256_update(&h, msg, msg_len);
    hmac_sha256_final(&h, mac);
}

bool hmac_equal(const uint8_t *a, const uint8_t *b, size_t n)
{
    volatile uint8_t diff = 0;
    for (size_t i = 0; i < n; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}
