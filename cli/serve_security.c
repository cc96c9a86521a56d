/*
 * serve_security.c - the security flags of serve, worker and coordinator
 * (see serve_security.h).
 */
#include "serve_security.h"

#include <stddef.h>
#include <string.h>

#include "cli.h"

void serve_sec_defaults(serve_sec_opts *o)
{
    memset(o, 0, sizeof *o);
    o->worker_port = -1;
    o->http_max_connections = 512;
    o->http_max_per_client = 256;
    o->http_timeout = 60;
}

int serve_sec_take(const char *cmd, int argc, char **argv, int *i, serve_sec_opts *o)
{
    (void)cmd;
    static const struct {
        const char *flag;
        size_t off;
    } strs[] = {
        {"--tls-cert", offsetof(serve_sec_opts, tls_cert)},
        {"--tls-key", offsetof(serve_sec_opts, tls_key)},
        {"--tls-client-ca", offsetof(serve_sec_opts, tls_client_ca)},
        {"--tls-ca", offsetof(serve_sec_opts, tls_ca)},
        {"--tls-client-cert", offsetof(serve_sec_opts, tls_client_cert)},
        {"--tls-client-key", offsetof(serve_sec_opts, tls_client_key)},
        {"--tls-server-name", offsetof(serve_sec_opts, tls_server_name)},
        {"--api-key", offsetof(serve_sec_opts, api_key)},
        {"--api-key-file", offsetof(serve_sec_opts, api_key_file)},
    };
    const char *a = argv[*i];
    for (size_t k = 0; k < sizeof strs / sizeof *strs; k++)
        if (!strcmp(a, strs[k].flag))
            return cli_take_str(argc, argv, i, (const char **)((char *)o + strs[k].off)) ? 1
                                                                                         : -1;
    bool ok;
    if (!strcmp(a, "--worker-port"))
        ok = cli_take_int(argc, argv, i, 0, 65535, &o->worker_port);
    else if (!strcmp(a, "--http-max-connections"))
        ok = cli_take_int(argc, argv, i, 1, 1 << 20, &o->http_max_connections);
    else if (!strcmp(a, "--http-max-per-client"))
        ok = cli_take_int(argc, argv, i, 0, 1 << 20, &o->http_max_per_client);
    else if (!strcmp(a, "--http-timeout"))
        ok = cli_take_int(argc, argv, i, 0, 86400, &o->http_timeout);
    else
        return 0;
    return ok ? 1 : -1;
}

bool serve_sec_load(const char *cmd, const serve_sec_opts *o, serve_sec *out)
{
    memset(out, 0, sizeof *out);
    ekv_error err = {0};
    if (o->api_key && o->api_key_file) {
        cli_error(cmd, "--api-key and --api-key-file: give one");
        return false;
    }
    if (ekv_tls_server_load(&out->tls, o->tls_cert, o->tls_key, o->tls_client_ca, &err) ||
        ekv_tls_client_load(&out->worker_tls, o->tls_ca, o->tls_client_cert, o->tls_client_key,
                            o->tls_server_name, &err) ||
        (o->api_key && ekv_api_key_set(&out->api_key, o->api_key, &err)) ||
        (o->api_key_file && ekv_api_key_load(&out->api_key, o->api_key_file, &err))) {
        cli_error(cmd, "%s", err.msg);
        serve_sec_free(out);
        return false;
    }
    out->tls_public = out->tls;
    out->tls_public.client_ca_pem = NULL; /* clients of the public API have no certificates */
    return true;
}

void serve_sec_free(serve_sec *s)
{
    ekv_tls_server_free(&s->tls);
    ekv_tls_client_free(&s->worker_tls);
    memset(s, 0, sizeof *s);
}
