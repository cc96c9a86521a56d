/*
 * kvpoly.h - private to kvstore/: a polynomial hash over GF(2^128), the
 * fast, keyed, almost-universal half of the value MAC (kvns.c).
 *
 * A value is cut into 16-byte blocks (the last zero-padded), each read as a
 * little-endian 128-bit integer whose bit i is the coefficient of x^i; the
 * hash under key k is the polynomial with those blocks as coefficients,
 * evaluated at k (Horner: X = (X ^ b) * k, from X = 0), in GF(2^128) modulo
 * x^128 + x^7 + x^2 + x + 1 (GCM's field, without GCM's bit reflection).
 * Two different values of n blocks collide for at most n of the 2^128 keys,
 * so with k secret, and the hash itself never revealed (the MAC is an HMAC
 * over it), a forger's chance per try is n / 2^128. With VPCLMULQDQ
 * (AVX-512) sixteen blocks share one reduction, with PCLMULQDQ four;
 * elsewhere a bit-serial multiply does.
 */
#ifndef ENTROKV_KVPOLY_H
#define ENTROKV_KVPOLY_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvpoly_key {
    uint64_t pow[4][2]; /* k^1 .. k^4 as (low, high) 64-bit halves */
    uint64_t rev[16][2]; /* k^16 .. k^1: the factors of 16 blocks, in block order */
} kvpoly_key;

typedef struct kvpoly {
    const kvpoly_key *key;
    uint64_t x[2];
    uint8_t buf[16];
    size_t n_buf;
} kvpoly;

void kvpoly_key_init(kvpoly_key *k, const uint8_t key[16]);
void kvpoly_init(kvpoly *p, const kvpoly_key *k);
void kvpoly_update(kvpoly *p, const void *data, size_t len);
void kvpoly_final(kvpoly *p, uint8_t out[16]);

/* a * b in the field, one bit at a time: the reference (and the fallback) */
void kvpoly_mul_ref(uint64_t r[2], const uint64_t a[2], const uint64_t b[2]);

#endif
