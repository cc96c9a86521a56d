/*
 * security.c - PEM files and the API key (see security.h).
 */
#include "entrokv/security.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "entrokv/sha256.h"

ekv_status ekv_read_text_file(const char *what, const char *path, size_t max, char **out,
                              ekv_error *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ekv_error_set(err, EKV_EIO, "%s %s: %s", what, path, strerror(errno));
    char *buf = malloc(max + 2);
    if (!buf) {
        fclose(f);
        return ekv_error_set(err, EKV_ENOMEM, "%s: out of memory", what);
    }
    size_t n = fread(buf, 1, max + 1, f);
    bool bad = ferror(f) != 0;
    fclose(f);
    if (bad || n == 0 || n > max || memchr(buf, 0, n)) {
        free(buf);
        return ekv_error_set(err, EKV_EINVAL, "%s %s: %s", what, path,
                             bad ? "read error" : n == 0 ? "empty" : n > max ? "too large"
                                                                       : "holds a NUL byte");
    }
    buf[n] = 0;
    *out = buf;
    return EKV_OK;
}

/* Frees a string that may hold a secret, wiping it first. */
static void free_secret(char **s)
{
    if (*s) {
        memset(*s, 0, strlen(*s));
        free(*s);
    }
    *s = NULL;
}

static ekv_status load_opt(const char *what, const char *path, char **out, ekv_error *err)
{
    return path ? ekv_read_text_file(what, path, EKV_PEM_MAX, out, err) : EKV_OK;
}

ekv_status ekv_tls_server_load(ekv_tls_server *t, const char *cert, const char *key,
                               const char *client_ca, ekv_error *err)
{
    memset(t, 0, sizeof *t);
    if (!cert != !key)
        return ekv_error_set(err, EKV_EINVAL, "--tls-cert and --tls-key go together");
    if (client_ca && !cert)
        return ekv_error_set(err, EKV_EINVAL, "--tls-client-ca needs --tls-cert and --tls-key");
    ekv_status rc;
    if ((rc = load_opt("--tls-cert", cert, &t->cert_pem, err)) ||
        (rc = load_opt("--tls-key", key, &t->key_pem, err)) ||
        (rc = load_opt("--tls-client-ca", client_ca, &t->client_ca_pem, err))) {
        ekv_tls_server_free(t);
        return rc;
    }
    return EKV_OK;
}

void ekv_tls_server_free(ekv_tls_server *t)
{
    free(t->cert_pem);
    free_secret(&t->key_pem);
    free(t->client_ca_pem);
    memset(t, 0, sizeof *t);
}

bool ekv_tls_server_on(const ekv_tls_server *t)
{
    return t && t->cert_pem && t->key_pem;
}

ekv_status ekv_tls_client_load(ekv_tls_client *t, const char *ca, const char *cert,
                               const char *key, const char *server_name, ekv_error *err)
{
    memset(t, 0, sizeof *t);
    if (!cert != !key)
        return ekv_error_set(err, EKV_EINVAL,
                             "--tls-client-cert and --tls-client-key go together");
    if ((cert || server_name) && !ca)
        return ekv_error_set(err, EKV_EINVAL, "%s needs --tls-ca",
                             cert ? "--tls-client-cert" : "--tls-server-name");
    ekv_status rc;
    if ((rc = load_opt("--tls-ca", ca, &t->ca_pem, err)) ||
        (rc = load_opt("--tls-client-cert", cert, &t->cert_pem, err)) ||
        (rc = load_opt("--tls-client-key", key, &t->key_pem, err))) {
        ekv_tls_client_free(t);
        return rc;
    }
    if (server_name && !(t->server_name = strdup(server_name))) {
        ekv_tls_client_free(t);
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    }
    return EKV_OK;
}

void ekv_tls_client_free(ekv_tls_client *t)
{
    free(t->ca_pem);
    free(t->cert_pem);
    free_secret(&t->key_pem);
    free(t->server_name);
    memset(t, 0, sizeof *t);
}

/* ---- the API key ---- */

static void digest_of(const char *s, size_t n, uint8_t out[32])
{
    ekv_sha256 h;
    sha256_init(&h);
    sha256_update(&h, s, n);
    sha256_final(&h, out);
}

ekv_status ekv_api_key_set(ekv_api_key *k, const char *key, ekv_error *err)
{
    memset(k, 0, sizeof *k);
    size_t n = strlen(key);
    if (n == 0 || n > EKV_API_KEY_MAX)
        return ekv_error_set(err, EKV_EINVAL, "the API key must be 1 to %d characters",
                             EKV_API_KEY_MAX);
    for (size_t i = 0; i < n; i++)
        if (key[i] <= ' ' || key[i] > '~')
            return ekv_error_set(err, EKV_EINVAL,
                                 "the API key may hold printable ASCII characters only, "
                                 "no spaces");
    digest_of(key, n, k->digest);
    k->set = true;
    return EKV_OK;
}

ekv_status ekv_api_key_load(ekv_api_key *k, const char *path, ekv_error *err)
{
    char *text;
    ekv_status rc = ekv_read_text_file("--api-key-file", path, EKV_API_KEY_MAX + 64, &text, err);
    if (rc)
        return rc;
    char *s = text, *e = text + strlen(text);
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
        *--e = 0;
    rc = ekv_api_key_set(k, s, err);
    free_secret(&text);
    return rc;
}

bool ekv_api_key_check(const ekv_api_key *k, const char *authorization, size_t len)
{
    if (!k || !k->set)
        return true;
    if (!authorization || len < 7 || strncasecmp(authorization, "Bearer ", 7))
        return false;
    size_t i = 7;
    while (i < len && authorization[i] == ' ')
        i++;
    size_t n = len - i;
    while (n > 0 && (authorization[i + n - 1] == ' ' || authorization[i + n - 1] == '\t'))
        n--; /* RFC 9110: optional whitespace around a field value */
    if (n == 0)
        return false;
    /* Compare digests, every byte: the time depends on the presented
     * token's length only, never on how much of the key it matches. */
    uint8_t d[32];
    digest_of(authorization + i, n, d);
    volatile uint8_t diff = 0;
    for (int j = 0; j < 32; j++)
        diff |= (uint8_t)(d[j] ^ k->digest[j]);
    return diff == 0;
}
