/*
 * kvns.c - namespaces: the namespaced key an entry is stored under and the
 * keyed MAC its value carries (kvstore.h; docs/kvstore.md, "Namespaces and
 * the threat model").
 *
 * Both are HMAC-SHA256 under the namespace key, with distinct labels so
 * neither can stand in for the other, and with every variable-length field
 * length-prefixed so no two inputs encode alike. The MAC is hash-then-PRF:
 * the value goes through the polynomial hash of kvpoly.c (at memory speed
 * with PCLMULQDQ; SHA-256 over every byte ran at a tenth of that), under a
 * key derived from the namespace key, and only its 16-byte result through
 * the HMAC, which also binds the namespace, the stored key and the length.
 */
#include <string.h>

#include "kvclient_int.h"

static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void start(ekv_hmac *h, const uint8_t *ns_key, size_t ns_key_len, const char *label,
                  const char *ns)
{
    uint8_t n[4];
    size_t ns_len = ns ? strlen(ns) : 0;
    put_le(n, ns_len, 4);
    hmac_sha256_init(h, ns_key, ns_key_len);
    hmac_sha256_update(h, label, strlen(label));
    hmac_sha256_update(h, n, sizeof n);
    hmac_sha256_update(h, ns, ns_len);
}

void kvstore_ns_key(const uint8_t *ns_key, size_t ns_key_len, const char *ns,
                    const kvstore_key *key, kvstore_key *out)
{
    ekv_hmac h;
    start(&h, ns_key, ns_key_len, "ekv-ns1", ns);
    hmac_sha256_update(&h, key->b, KVSTORE_KEY_BYTES);
    hmac_sha256_final(&h, out->b);
}

void kvns_poly_key(const uint8_t *ns_key, size_t ns_key_len, const char *ns, kvpoly_key *out)
{
    ekv_hmac h;
    uint8_t k[32];
    start(&h, ns_key, ns_key_len, "ekv-poly1", ns);
    hmac_sha256_final(&h, k);
    kvpoly_key_init(out, k); /* the first 16 bytes */
    memset(k, 0, sizeof k);
}

void kvns_mac_finish(const uint8_t *ns_key, size_t ns_key_len, const char *ns,
                     const kvstore_key *stored_key, uint64_t len, const uint8_t poly[16],
                     uint8_t mac[KVSTORE_MAC_BYTES])
{
    ekv_hmac h;
    uint8_t n[8];
    put_le(n, len, 8);
    start(&h, ns_key, ns_key_len, "ekv-val2", ns);
    hmac_sha256_update(&h, stored_key->b, KVSTORE_KEY_BYTES);
    hmac_sha256_update(&h, n, sizeof n);
    hmac_sha256_update(&h, poly, 16);
    hmac_sha256_final(&h, mac);
}

void kvstore_value_mac(const uint8_t *ns_key, size_t ns_key_len, const char *ns,
                       const kvstore_key *stored_key, const void *value, size_t len,
                       uint8_t mac[KVSTORE_MAC_BYTES])
{
    kvpoly_key k;
    kvpoly p;
    uint8_t poly[16];
    kvns_poly_key(ns_key, ns_key_len, ns, &k);
    kvpoly_init(&p, &k);
    kvpoly_update(&p, value, len);
    kvpoly_final(&p, poly);
    kvns_mac_finish(ns_key, ns_key_len, ns, stored_key, len, poly, mac);
}
