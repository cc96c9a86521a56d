/*
 * kvstore_http.h - the KV store daemon's HTTP side (`entrokv kvstore
 * --http-listen HOST:PORT`): GET /livez, /readyz and /metrics (Prometheus
 * text). Read-only, on its own thread; docs/kvstore.md, "Health and
 * metrics".
 */
#ifndef ENTROKV_CLI_KVSTORE_HTTP_H
#define ENTROKV_CLI_KVSTORE_HTTP_H

#include <signal.h>

#include "entrokv/kvstore.h"

typedef struct kvstore_http kvstore_http;

/* Serves d's health and counters on listen ("host:port"; port 0 picks one)
 * until kvstore_http_stop. /readyz answers 503 once *stopping is set. */
kvstore_http *kvstore_http_start(const char *listen, kvstore_daemon *d,
                                 const volatile sig_atomic_t *stopping, ekv_error *err);
int kvstore_http_port(const kvstore_http *h);
void kvstore_http_stop(kvstore_http *h);

/* The Prometheus text of d's counters into out (at most cap bytes, NUL
 * terminated); returns its length. */
size_t kvstore_metrics_text(kvstore_daemon *d, char *out, size_t cap);

#endif
