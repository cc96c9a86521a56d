/*
 * serve_security.h - the serving processes' security flags (TLS, the API
 * key, the Worker listener, HTTP connection caps and timeouts; see
 * docs/serving.md, "Security"), kept apart from cmd_serve.c's engine flags.
 */
#ifndef ENTROKV_CLI_SERVE_SECURITY_H
#define ENTROKV_CLI_SERVE_SECURITY_H

#include <stdbool.h>
#include <stdint.h>

#include "entrokv/security.h"

typedef struct serve_sec_opts {
    const char *tls_cert, *tls_key, *tls_client_ca;  /* this process's listeners */
    const char *tls_ca, *tls_client_cert, *tls_client_key, *tls_server_name; /* to workers */
    const char *api_key, *api_key_file;
    int32_t worker_port;                 /* serve: the Worker listener; -1: none */
    int32_t http_max_connections, http_max_per_client, http_timeout;
} serve_sec_opts;

/* What the flags name, loaded: files read, the key hashed. */
typedef struct serve_sec {
    ekv_tls_server tls;         /* the Worker listener's (client_ca_pem as given) */
    ekv_tls_server tls_public;  /* the public listeners': the same without client CA */
    ekv_tls_client worker_tls;  /* the coordinator's channels to workers */
    ekv_api_key api_key;
} serve_sec;

void serve_sec_defaults(serve_sec_opts *o);
/* argv[*i] if it is one of the flags here: 1 (taken, *i advanced), 0 (not
 * one of them), -1 (one of them with a bad value, reported). */
int serve_sec_take(const char *cmd, int argc, char **argv, int *i, serve_sec_opts *o);
/* Reads the files and the key; false with the error reported. */
bool serve_sec_load(const char *cmd, const serve_sec_opts *o, serve_sec *out);
void serve_sec_free(serve_sec *s);

#define SERVE_SEC_USAGE                                                                        \
    "  --tls-cert FILE, --tls-key FILE  PEM certificate (chain) and key: gRPC and HTTP\n"     \
    "                        listeners speak TLS only (default: plaintext)\n"                 \
    "  --api-key KEY         clients must send Authorization: Bearer KEY (HTTP) or\n"         \
    "                        authorization metadata (gRPC Generation); /livez, /readyz,\n"   \
    "                        /health, /metrics and gRPC Health stay open\n"                   \
    "  --api-key-file FILE   the same, the key read from FILE (a mounted Secret)\n"           \
    "  --http-max-connections N  open HTTP connections in all (default 512)\n"                \
    "  --http-max-per-client N   open HTTP connections per client address (default 256;\n"    \
    "                        0: no cap, e.g. behind a proxy)\n"                               \
    "  --http-timeout S      an HTTP connection idle this long is closed, and a request\n"    \
    "                        body must arrive within it (default 60; 0: never)\n"

#define SERVE_SEC_WORKER_USAGE                                                                 \
    "  --tls-client-ca FILE  the Worker listener requires client certificates signed by\n"    \
    "                        this CA (mutual TLS; needs --tls-cert)\n"

#define SERVE_SEC_COORD_USAGE                                                                  \
    "  --tls-ca FILE         reach the workers over TLS, trusting this CA\n"                  \
    "  --tls-client-cert FILE, --tls-client-key FILE  the certificate shown to workers\n"     \
    "                        that require one (--tls-client-ca)\n"                            \
    "  --tls-server-name N   the name the workers' certificates carry, when not the host\n"   \
    "                        of the --workers entry\n"

#endif
