/*
 * metrics.c - Prometheus counters and histograms for the serving path (see
 * metrics.h). Histograms use fixed buckets chosen for CPU decode: TTFT from
 * 5 ms to a minute, inter-token latency from 1 ms to 2.5 s.
 */
#include "entrokv/metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUCKETS 16

typedef struct histogram {
    const char *name, *help;
    const double *bounds;
    int n_bounds;
    uint64_t counts[MAX_BUCKETS]; /* per bucket, not cumulative; +Inf is implicit */
    uint64_t count;
    double sum;
} histogram;

static const double ttft_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                     1,     2.5,  5,     10,   30,  60};
static const double itl_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.05,
                                    0.1,   0.25,   0.5,   1,    2.5};

struct ekv_metrics {
    pthread_mutex_t mu;
    uint64_t requests[METRICS_N_STATUS];
    uint64_t prompt_tokens, generated_tokens;
    uint64_t retries;            /* metrics_count_retry */
    histogram ttft, itl;
    metrics_kvstore kvstore;
};

static const char *status_names[METRICS_N_STATUS] = {"ok", "cancelled", "invalid", "rejected",
                                                     "error"};

const char *metrics_status_name(metrics_status s)
{
    return (unsigned)s < METRICS_N_STATUS ? status_names[s] : "unknown";
}

ekv_metrics *metrics_create(void)
{
    ekv_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    pthread_mutex_init(&m->mu, NULL);
    m->ttft = (histogram){.name = "entrokv_ttft_seconds",
                          .help = "Time from request arrival to its first generated token.",
                          .bounds = ttft_bounds,
                          .n_bounds = (int)(sizeof ttft_bounds / sizeof *ttft_bounds)};
    m->itl = (histogram){.name = "entrokv_inter_token_latency_seconds",
                         .help = "Time between consecutive generated tokens of a request.",
                         .bounds = itl_bounds,
                         .n_bounds = (int)(sizeof itl_bounds / sizeof *itl_bounds)};
    atomic_init(&m->kvstore.hits, 0);
    atomic_init(&m->kvstore.misses, 0);
    for (int t = 0; t < 2; t++) {
        atomic_init(&m->kvstore.bytes_in[t], 0);
        atomic_init(&m->kvstore.bytes_out[t], 0);
    }
    atomic_init(&m->kvstore.restore_ns_sum, 0);
    atomic_init(&m->kvstore.restore_count, 0);
    return m;
}

void metrics_free(ekv_metrics *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void metrics_count_request(ekv_metrics *m, metrics_status s)
{
    if (!m || (unsigned)s >= METRICS_N_STATUS)
        return;
    pthread_mutex_lock(&m->mu);
    m->requests[s]++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_count_retry(ekv_metrics *m)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->retries++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_add_tokens(ekv_metrics *m, int64_t prompt, int64_t generated)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    m->prompt_tokens += (uint64_t)(prompt > 0 ? prompt : 0);
    m->generated_tokens += (uint64_t)(generated > 0 ? generated : 0);
    pthread_mutex_unlock(&m->mu);
}

static void hist_observe(histogram *h, double v, uint64_t n)
{
    int b = 0;
    while (b < h->n_bounds && v > h->bounds[b])
        b++;
    h->counts[b] += n;
    h->count += n;
    h->sum += v * (double)n;
}

void metrics_observe_ttft(ekv_metrics *m, double seconds)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->mu);
    hist_observe(&m->ttft, seconds < 0 ? 0 : seconds, 1);
    pthread_mutex_unlock(&m->mu);
}

void metrics_observe_itl(ekv_metrics *m, double seconds, int64_t n)
{
    if (!m || n <= 0)
        return;
    pthread_mutex_lock(&m->mu);
    hist_observe(&m->itl, seconds < 0 ? 0 : seconds, (uint64_t)n);
    pthread_mutex_unlock(&m->mu);
}

metrics_kvstore *metrics_kvstore_counters(ekv_metrics *m)
{
    return m ? &m->kvstore : NULL;
}

/* ---- rendering ---- */

typedef struct outbuf {
    char *p;
    size_t len, cap;
    int failed;
} outbuf;

static void out_printf(outbuf *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void out_printf(outbuf *o, const char *fmt, ...)
{
    if (o->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->p + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            o->failed = 1;
            return;
        }
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        size_t cap = o->cap * 2 + (size_t)n;
        char *p = realloc(o->p, cap);
        if (!p) {
            o->failed = 1;
            return;
        }
        o->p = p;
        o->cap = cap;
    }
}

static void render_scalar(outbuf *o, const char *name, const char *type, const char *help,
                          int64_t v)
{
    out_printf(o, "# HELP %s %s\n# TYPE %s %s\n%s %lld\n", name, help, name, type, name,
               (long long)v);
}

static void render_histogram(outbuf *o, const histogram *h)
{
    out_printf(o, "# HELP %s %s\n# TYPE %s histogram\n", h->name, h->help, h->name);
    uint64_t cum = 0;
    for (int b = 0; b < h->n_bounds; b++) {
        cum += h->counts[b];
        out_printf(o, "%s_bucket{le=\"%g\"} %llu\n", h->name, h->bounds[b],
                   (unsigned long long)cum);
    }
    out_printf(o, "%s_bucket{le=\"+Inf\"} %llu\n", h->name, (unsigned long long)h->count);
    out_printf(o, "%s_sum %.9g\n%s_count %llu\n", h->name, h->sum, h->name,
               (unsigned long long)h->count);
}

/* Copies the mutable state under the lock so formatting runs unlocked. */
static void snapshot(ekv_metrics *m, ekv_metrics *copy)
{
    pthread_mutex_lock(&m->mu);
    memcpy(copy->requests, m->requests, sizeof m->requests);
    copy->prompt_tokens = m->prompt_tokens;
    copy->generated_tokens = m->generated_tokens;
    copy->retries = m->retries;
    copy->ttft = m->ttft;
    copy->itl = m->itl;
    pthread_mutex_unlock(&m->mu);
}

char *metrics_render(ekv_metrics *m, const metrics_gauges *g, size_t *len)
{
    ekv_metrics *s = calloc(1, sizeof *s);
    outbuf o = {.p = malloc(4096), .cap = 4096};
    if (!s || !o.p || !m) {
        free(s);
        free(o.p);
        return NULL;
    }
    snapshot(m, s);
    const metrics_gauges *gg = g ? g : &(metrics_gauges){0};
    out_printf(&o, "# HELP entrokv_requests_total Requests by how they ended.\n"
                   "# TYPE entrokv_requests_total counter\n");
    for (int i = 0; i < METRICS_N_STATUS; i++)
        out_printf(&o, "entrokv_requests_total{status=\"%s\"} %llu\n", status_names[i],
                   (unsigned long long)s->requests[i]);
    render_scalar(&o, "entrokv_prompt_tokens_total", "counter",
                  "Prompt tokens of finished requests.", (int64_t)s->prompt_tokens);
    render_scalar(&o, "entrokv_generated_tokens_total", "counter",
                  "Tokens generated for finished requests.", (int64_t)s->generated_tokens);
    render_scalar(&o, "entrokv_request_retries_total", "counter",
                  "Requests resubmitted to another worker group after theirs failed before "
                  "their first token.",
                  (int64_t)s->retries);
    render_histogram(&o, &s->ttft);
    render_histogram(&o, &s->itl);
    render_scalar(&o, "entrokv_queue_depth", "gauge", "Requests waiting to be scheduled.",
                  gg->queue_depth);
    render_scalar(&o, "entrokv_running_sequences", "gauge", "Sequences in the running batch.",
                  gg->running_sequences);
    render_scalar(&o, "entrokv_kv_blocks_used", "gauge", "KV pool blocks in use.",
                  gg->kv_blocks_used);
    render_scalar(&o, "entrokv_kv_blocks_free", "gauge", "KV pool blocks free.",
                  gg->kv_blocks_free);
    render_scalar(&o, "entrokv_kv_blocks_shared", "gauge",
                  "KV pool blocks held by more than one sequence (the prompt of n > 1 choices).",
                  gg->kv_blocks_shared);
    render_scalar(&o, "entrokv_kv_cow_copies_total", "counter",
                  "Shared KV blocks copied on write when a choice first wrote to them.",
                  gg->kv_cow_copies);
    render_scalar(&o, "entrokv_preemptions_total", "counter",
                  "Running sequences whose KV was dropped for room, to be recomputed.",
                  gg->preemptions);
    render_scalar(&o, "entrokv_kv_bytes_saved_total", "counter",
                  "KV bytes compression saved over finished sequences (full - held).",
                  gg->kv_bytes_saved);
    static const char *const mech[3] = {"tokens", "channels", "decode"};
    out_printf(&o, "# HELP entrokv_kv_bytes_saved_by_mechanism_total KV bytes freed by the "
                   "prompt's token policy, SparK's key channels and SCOPE's decode eviction.\n"
                   "# TYPE entrokv_kv_bytes_saved_by_mechanism_total counter\n");
    for (int i = 0; i < 3; i++)
        out_printf(&o, "entrokv_kv_bytes_saved_by_mechanism_total{mechanism=\"%s\"} %lld\n",
                   mech[i], (long long)gg->kv_bytes_saved_by[i]);
    render_scalar(&o, "entrokv_recall_blocks_total", "counter",
                  "Evicted KV blocks recalled into attention (per layer, KV head and step).",
                  gg->recall_blocks);
    render_scalar(&o, "entrokv_recall_bytes_total", "counter",
                  "K, V and position bytes of the recalled blocks.", gg->recall_bytes);
    render_scalar(&o, "entrokv_recall_deadline_misses_total", "counter",
                  "Recall blocks skipped for a step because the KV store had not delivered "
                  "them in time.",
                  gg->recall_deadline_misses);
    render_scalar(&o, "entrokv_recall_promotions_total", "counter",
                  "Recall blocks promoted into the resident set.", gg->recall_promotions);
    render_scalar(&o, "entrokv_recall_spilled_blocks_total", "counter",
                  "Recall blocks put to the KV store daemons beyond the host cap "
                  "(--recall-host-mb).",
                  gg->recall_spilled_blocks);
    render_scalar(&o, "entrokv_recall_rankings_total", "counter",
                  "Recall rankings of a KV head's evicted blocks (per layer, KV head and step "
                  "ranked: every step with token recall, every recall_every with whole blocks).",
                  gg->recall_rankings);
    render_scalar(&o, "entrokv_kvstore_hits_total", "counter",
                  "Prefix KV blocks restored from the KV store.",
                  (int64_t)atomic_load(&m->kvstore.hits));
    render_scalar(&o, "entrokv_kvstore_misses_total", "counter",
                  "Prompt KV restores that found nothing in the KV store.",
                  (int64_t)atomic_load(&m->kvstore.misses));
    static const char *const tier[2] = {"host", "daemon"};
    out_printf(&o, "# HELP entrokv_kvstore_bytes_in_total KV bytes stored into each tier.\n"
                   "# TYPE entrokv_kvstore_bytes_in_total counter\n");
    for (int t = 0; t < 2; t++)
        out_printf(&o, "entrokv_kvstore_bytes_in_total{tier=\"%s\"} %llu\n", tier[t],
                   (unsigned long long)atomic_load(&m->kvstore.bytes_in[t]));
    out_printf(&o, "# HELP entrokv_kvstore_bytes_out_total KV bytes served from each tier.\n"
                   "# TYPE entrokv_kvstore_bytes_out_total counter\n");
    for (int t = 0; t < 2; t++)
        out_printf(&o, "entrokv_kvstore_bytes_out_total{tier=\"%s\"} %llu\n", tier[t],
                   (unsigned long long)atomic_load(&m->kvstore.bytes_out[t]));
    out_printf(&o, "# HELP entrokv_kvstore_restore_seconds Latency of KV store gets that hit.\n"
                   "# TYPE entrokv_kvstore_restore_seconds summary\n"
                   "entrokv_kvstore_restore_seconds_sum %.9f\n"
                   "entrokv_kvstore_restore_seconds_count %llu\n",
               (double)atomic_load(&m->kvstore.restore_ns_sum) * 1e-9,
               (unsigned long long)atomic_load(&m->kvstore.restore_count));
    free(s);
    if (o.failed) {
        free(o.p);
        return NULL;
    }
    if (len)
        *len = o.len;
    return o.p;
}
