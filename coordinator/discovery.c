/*
 * discovery.c - the coordinator's worker list (see coord_add_workers):
 * static HOST:PORT entries and dns:NAME:PORT entries, the latter resolved
 * with getaddrinfo (so /etc/hosts and the cluster's DNS both work) once at
 * start and then every interval on a background thread.
 *
 * Each record of a name is one worker group ("ADDR:PORT"). A record that
 * appears adds a group (unhealthy until its first Stats answers, remote.c);
 * one that is missing from DNS_MISSES lookups in a row (one answer without
 * it may be a record being replaced) retires its group: the router stops
 * choosing it, its running streams finish, and coord_reap_groups frees it
 * once idle. A
 * failed lookup (the DNS server not answering) keeps the groups as they
 * are; only an answer without the name ("no such name") empties the list,
 * as a headless Service with no ready pods does.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "coord_internal.h"

#define DNS_MAX_NAMES 16
#define DNS_REAP_S 1.0 /* how often retiring groups are checked for idleness */
#define DNS_MISSES 2

typedef struct dns_member {
    char target[80]; /* "ADDR:PORT" or "[ADDR6]:PORT" */
    int slot;
    int misses;      /* lookups in a row without this record */
} dns_member;

typedef struct dns_name {
    char name[256];
    int port;
    dns_member members[COORD_MAX_GROUPS];
    int n_members;
} dns_name;

struct coord_discovery {
    ekv_coordinator *c;
    double interval_s;
    dns_name names[DNS_MAX_NAMES];
    int n_names;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
};

/* The name's records as "ADDR:PORT" targets, without duplicates. Returns
 * the count, or -1 when the lookup failed without an answer. */
static int resolve(const dns_name *n, char targets[][80], int cap)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
    int e = getaddrinfo(n->name, NULL, &hints, &ai);
    if (e == EAI_NONAME || e == EAI_NODATA)
        return 0;
    if (e != 0) {
        coord_log("coordinator: dns:%s: lookup failed (%s); keeping its groups", n->name,
                  gai_strerror(e));
        return -1;
    }
    int k = 0;
    for (struct addrinfo *a = ai; a && k < cap; a = a->ai_next) {
        char addr[INET6_ADDRSTRLEN];
        const void *src = a->ai_family == AF_INET
                              ? (const void *)&((struct sockaddr_in *)a->ai_addr)->sin_addr
                              : (const void *)&((struct sockaddr_in6 *)a->ai_addr)->sin6_addr;
        if ((a->ai_family != AF_INET && a->ai_family != AF_INET6) ||
            !inet_ntop(a->ai_family, src, addr, sizeof addr))
            continue;
        snprintf(targets[k], 80, a->ai_family == AF_INET6 ? "[%s]:%d" : "%s:%d", addr, n->port);
        bool dup = false;
        for (int j = 0; j < k && !dup; j++)
            dup = !strcmp(targets[j], targets[k]);
        k += !dup;
    }
    freeaddrinfo(ai);
    return k;
}

/* One lookup of n: add the groups of new records, retire those of gone ones. */
static void refresh(coord_discovery *d, dns_name *n)
{
    char targets[COORD_MAX_GROUPS][80];
    int k = resolve(n, targets, COORD_MAX_GROUPS);
    if (k < 0)
        return;
    for (int m = 0; m < n->n_members;) {
        bool still = false;
        for (int j = 0; j < k && !still; j++)
            still = !strcmp(targets[j], n->members[m].target);
        n->members[m].misses = still ? 0 : n->members[m].misses + 1;
        if (n->members[m].misses < DNS_MISSES) {
            m++;
            continue;
        }
        coord_log("coordinator: worker group %s left dns:%s; retiring it (its streams finish)",
                  n->members[m].target, n->name);
        coord_retire_group(d->c, n->members[m].slot);
        n->members[m] = n->members[--n->n_members];
    }
    for (int j = 0; j < k; j++) {
        bool known = false;
        for (int m = 0; m < n->n_members && !known; m++)
            known = !strcmp(targets[j], n->members[m].target);
        if (known)
            continue;
        ekv_error err = {0};
        int slot = -1;
        if (coord_add_remote_slot(d->c, targets[j], &slot, &err) != EKV_OK) {
            coord_log("coordinator: dns:%s: cannot add %s: %s", n->name, targets[j], err.msg);
            continue;
        }
        coord_log("coordinator: worker group %s added from dns:%s", targets[j], n->name);
        dns_member *mem = &n->members[n->n_members++];
        memcpy(mem->target, targets[j], sizeof mem->target);
        mem->slot = slot;
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Sleeps until the next lookup is due or DNS_REAP_S has passed, whichever
 * is sooner; reaps idle retired groups every time. */
static void *discovery_main(void *arg)
{
    coord_discovery *d = arg;
    double next = now_s() + d->interval_s;
    pthread_mutex_lock(&d->mu);
    while (!d->stop) {
        double t = now_s(), wake = next < t + DNS_REAP_S ? next : t + DNS_REAP_S;
        struct timespec ts = {(time_t)wake, (long)((wake - (double)(time_t)wake) * 1e9)};
        if (wake > t)
            pthread_cond_timedwait(&d->cv, &d->mu, &ts);
        if (d->stop)
            break;
        pthread_mutex_unlock(&d->mu);
        if (now_s() >= next) {
            for (int i = 0; i < d->n_names; i++)
                refresh(d, &d->names[i]);
            next = now_s() + d->interval_s;
        }
        coord_reap_groups(d->c);
        pthread_mutex_lock(&d->mu);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

void coord_discovery_free(coord_discovery *d)
{
    if (!d)
        return;
    if (d->started) {
        pthread_mutex_lock(&d->mu);
        d->stop = true;
        pthread_cond_broadcast(&d->cv);
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->thread, NULL);
    }
    pthread_mutex_destroy(&d->mu);
    pthread_cond_destroy(&d->cv);
    free(d);
}

/* "dns:NAME:PORT" into n. */
static ekv_status parse_dns(const char *entry, dns_name *n, ekv_error *err)
{
    const char *name = entry + 4, *colon = strrchr(name, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == name || !colon[1] || *end || port < 1 || port > 65535 ||
        (size_t)(colon - name) >= sizeof n->name)
        return ekv_error_set(err, EKV_EINVAL, "--workers: '%s' is not dns:NAME:PORT", entry);
    memset(n, 0, sizeof *n);
    snprintf(n->name, sizeof n->name, "%.*s", (int)(colon - name), name);
    n->port = (int)port;
    return EKV_OK;
}

static ekv_status add_static(ekv_coordinator *c, const char *entry, ekv_error *err)
{
    const char *colon = strrchr(entry, ':');
    if (!colon || colon == entry || !colon[1])
        return ekv_error_set(err, EKV_EINVAL, "--workers: '%s' is not HOST:PORT", entry);
    ekv_status rc = coord_add_remote(c, entry, err);
    if (rc == EKV_OK)
        coord_log("coordinator: worker %s added", entry);
    return rc;
}

ekv_status coord_add_workers(ekv_coordinator *c, const char *list, double dns_interval_s,
                             ekv_error *err)
{
    if (c->discovery)
        return ekv_error_set(err, EKV_EINVAL, "coord_add_workers: called twice");
    if (!(dns_interval_s >= 0.1))
        return ekv_error_set(err, EKV_EINVAL, "--dns-interval must be at least 0.1 s");
    coord_discovery *d = calloc(1, sizeof *d);
    char *copy = strdup(list ? list : "");
    if (!d || !copy) {
        free(d);
        free(copy);
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    }
    d->c = c;
    d->interval_s = dns_interval_s;
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
    ekv_status rc = EKV_OK;
    int n_entries = 0;
    char *save = NULL;
    for (char *w = strtok_r(copy, ",", &save); w && rc == EKV_OK; w = strtok_r(NULL, ",", &save)) {
        n_entries++;
        if (strncmp(w, "dns:", 4))
            rc = add_static(c, w, err);
        else if (d->n_names == DNS_MAX_NAMES)
            rc = ekv_error_set(err, EKV_ERANGE, "--workers: at most %d dns: entries",
                               DNS_MAX_NAMES);
        else
            rc = parse_dns(w, &d->names[d->n_names++], err);
    }
    free(copy);
    if (rc == EKV_OK && n_entries == 0)
        rc = ekv_error_set(err, EKV_EINVAL, "--workers is empty");
    for (int i = 0; rc == EKV_OK && i < d->n_names; i++) {
        refresh(d, &d->names[i]);
        coord_log("coordinator: dns:%s:%d has %d record(s); re-resolved every %g s",
                  d->names[i].name, d->names[i].port, d->names[i].n_members, dns_interval_s);
    }
    if (rc == EKV_OK && d->n_names > 0) {
        if (pthread_create(&d->thread, NULL, discovery_main, d) != 0)
            rc = ekv_error_set(err, EKV_EIO, "cannot start the DNS discovery thread");
        else
            d->started = true;
    }
    c->discovery = d; /* coord_free stops and frees it, whatever happened */
    return rc;
}
