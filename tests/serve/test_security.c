/*
 * test_security.c - the API key check and the PEM/key file loaders
 * (security.h) against what RFC 6750 and RFC 9110 say an Authorization
 * value is: "Bearer" in any case, one or more spaces, the token exactly.
 */
#include "ekv_test.h"

#include "entrokv/security.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool check(const ekv_api_key *k, const char *v)
{
    return ekv_api_key_check(k, v, strlen(v));
}

static void test_bearer(void)
{
    ekv_api_key k;
    ekv_error err = {0};
    CHECK(ekv_api_key_set(&k, "s3cret-KEY_1", &err) == EKV_OK);
    CHECK(check(&k, "Bearer s3cret-KEY_1"));
    CHECK(check(&k, "bearer s3cret-KEY_1"));
    CHECK(check(&k, "BEARER   s3cret-KEY_1"));
    CHECK(check(&k, "Bearer s3cret-KEY_1 "));   /* trailing OWS */
    CHECK(!check(&k, "Bearer s3cret-KEY_"));    /* a prefix */
    CHECK(!check(&k, "Bearer s3cret-KEY_12"));  /* a longer key */
    CHECK(!check(&k, "Bearer S3CRET-KEY_1"));   /* the token is case-sensitive */
    CHECK(!check(&k, "Bearer "));
    CHECK(!check(&k, "Bearer"));
    CHECK(!check(&k, "s3cret-KEY_1"));
    CHECK(!check(&k, "Basic s3cret-KEY_1"));
    CHECK(!check(&k, "Bearers3cret-KEY_1"));
    CHECK(!check(&k, ""));
    CHECK(!ekv_api_key_check(&k, NULL, 0));
    /* len is what counts: a NUL inside, or bytes past len, are not the key */
    const char nul[] = "Bearer s3cret-KEY_1\0x";
    CHECK(!ekv_api_key_check(&k, nul, sizeof nul - 1));
    CHECK(!ekv_api_key_check(&k, "Bearer s3cret-KEY_1", 18));
    /* no key configured: everything passes */
    ekv_api_key none = {0};
    CHECK(ekv_api_key_check(&none, NULL, 0));
    CHECK(check(&none, "Bearer anything"));
    /* keys a Bearer header could not carry are refused */
    CHECK(ekv_api_key_set(&k, "", &err) == EKV_EINVAL);
    CHECK(ekv_api_key_set(&k, "with space", &err) == EKV_EINVAL);
    CHECK(ekv_api_key_set(&k, "tab\there", &err) == EKV_EINVAL);
    CHECK(ekv_api_key_set(&k, "caf\xc3\xa9", &err) == EKV_EINVAL);
    CHECK(!k.set);
}

static char *write_tmp(const char *text)
{
    char *path = strdup("/tmp/ekv-sec-XXXXXX");
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd >= 0) {
        CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
        close(fd);
    }
    return path;
}

static void test_files(void)
{
    ekv_error err = {0};
    ekv_api_key k;
    char *f = write_tmp("  key-from-file\n");
    CHECK(ekv_api_key_load(&k, f, &err) == EKV_OK);
    CHECK(check(&k, "Bearer key-from-file"));
    CHECK(!check(&k, "Bearer   key-from-file\n"));
    unlink(f);
    free(f);
    f = write_tmp("\n\n");
    CHECK(ekv_api_key_load(&k, f, &err) == EKV_EINVAL);
    unlink(f);
    free(f);
    CHECK(ekv_api_key_load(&k, "/nonexistent/key", &err) == EKV_EIO);

    ekv_tls_server t;
    CHECK(ekv_tls_server_load(&t, NULL, NULL, NULL, &err) == EKV_OK && !ekv_tls_server_on(&t));
    f = write_tmp("PEM");
    CHECK(ekv_tls_server_load(&t, f, NULL, NULL, &err) == EKV_EINVAL);     /* cert alone */
    CHECK(ekv_tls_server_load(&t, NULL, NULL, f, &err) == EKV_EINVAL);     /* CA alone */
    CHECK(ekv_tls_server_load(&t, f, f, f, &err) == EKV_OK && ekv_tls_server_on(&t));
    CHECK(t.client_ca_pem && !strcmp(t.client_ca_pem, "PEM"));
    ekv_tls_server_free(&t);
    ekv_tls_client c;
    CHECK(ekv_tls_client_load(&c, NULL, f, f, NULL, &err) == EKV_EINVAL); /* cert, no CA */
    CHECK(ekv_tls_client_load(&c, f, f, NULL, NULL, &err) == EKV_EINVAL); /* cert, no key */
    CHECK(ekv_tls_client_load(&c, NULL, NULL, NULL, "name", &err) == EKV_EINVAL);
    CHECK(ekv_tls_client_load(&c, f, NULL, NULL, "w", &err) == EKV_OK && !strcmp(c.server_name, "w"));
    ekv_tls_client_free(&c);
    unlink(f);
    free(f);
    f = write_tmp("");
    CHECK(ekv_tls_server_load(&t, f, f, NULL, &err) == EKV_EINVAL); /* empty */
    unlink(f);
    free(f);
}

int main(void)
{
    RUN_TEST(test_bearer);
    RUN_TEST(test_files);
    return TEST_EXIT();
}
