/*
 * security.h - the front door's secrets (docs/serving.md, "Security"): TLS
 * certificates and keys read from PEM files, and the API key that clients
 * present as `Authorization: Bearer KEY` (HTTP) or `authorization` metadata
 * (gRPC).
 *
 * The key itself is never kept: only its SHA-256, and a presented key is
 * hashed and compared with it in constant time, so neither the comparison's
 * time nor a prefix match says anything about the key.
 */
#ifndef ENTROKV_SECURITY_H
#define ENTROKV_SECURITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

#define EKV_PEM_MAX (1 << 20)   /* a PEM file larger than this is refused */
#define EKV_API_KEY_MAX 4096

/* A server's TLS identity (both PEM strings set, or neither: plaintext) and,
 * optionally, the CA whose certificates clients must present (client_ca_pem:
 * the handshake requires and verifies a client certificate). Owned strings. */
typedef struct ekv_tls_server {
    char *cert_pem, *key_pem, *client_ca_pem;
} ekv_tls_server;

/* A client of the Worker service: TLS when ca_pem is set (the roots the
 * workers' certificates must chain to); cert_pem/key_pem its own identity
 * for workers that require one; server_name the name the workers'
 * certificates must carry when it is not the host in the target (a
 * headless Service's pods are reached by IP). Owned strings. */
typedef struct ekv_tls_client {
    char *ca_pem, *cert_pem, *key_pem, *server_name;
} ekv_tls_client;

/* The SHA-256 of the API key; set false: no key, every request passes. */
typedef struct ekv_api_key {
    bool set;
    uint8_t digest[32];
} ekv_api_key;

/* Reads a whole text file of at most max bytes into *out (NUL-terminated,
 * malloc'd). what names the flag for the error. */
ekv_status ekv_read_text_file(const char *what, const char *path, size_t max, char **out,
                              ekv_error *err);

/* Loads the server's PEM files (cert and key both or neither; client_ca
 * only with them). Any path may be NULL. */
ekv_status ekv_tls_server_load(ekv_tls_server *t, const char *cert, const char *key,
                               const char *client_ca, ekv_error *err);
void ekv_tls_server_free(ekv_tls_server *t);
bool ekv_tls_server_on(const ekv_tls_server *t);

/* Loads a Worker-service client's PEM files (cert and key both or
 * neither, and only with ca). server_name is copied. */
ekv_status ekv_tls_client_load(ekv_tls_client *t, const char *ca, const char *cert,
                               const char *key, const char *server_name, ekv_error *err);
void ekv_tls_client_free(ekv_tls_client *t);

/* The key from a flag's value, or from a file (surrounding whitespace and a
 * trailing newline dropped). A key must be 1..EKV_API_KEY_MAX printable
 * ASCII characters without spaces (what a Bearer token may carry). */
ekv_status ekv_api_key_set(ekv_api_key *k, const char *key, ekv_error *err);
ekv_status ekv_api_key_load(ekv_api_key *k, const char *path, ekv_error *err);

/* Whether an Authorization value (len bytes, not NUL-terminated) is
 * "Bearer KEY" for k's key: the scheme in any case, then spaces, then the
 * key exactly. True when k is not set. */
bool ekv_api_key_check(const ekv_api_key *k, const char *authorization, size_t len);

#endif
