/*
 * metrics.h - the serving counters and histograms, rendered in the
 * Prometheus text exposition format (version 0.0.4) for GET /metrics.
 *
 * Counters and histograms live here and are updated from any thread (the
 * engine thread, the gRPC thread, HTTP connection threads) under one mutex;
 * gauges (queue depth, running sequences, KV blocks) are not stored but
 * passed in by the caller at render time from engine_stats, so they are
 * never stale. The KV store tier fills the metrics_kvstore counters it is
 * handed (metrics_kvstore_counters); until it exists they stay 0.
 *
 * Names (all prefixed entrokv_): requests_total{status}, prompt_tokens_total,
 * generated_tokens_total, ttft_seconds, inter_token_latency_seconds,
 * queue_depth, running_sequences, kv_blocks_used, kv_blocks_free,
 * kv_blocks_shared, kv_cow_copies_total, kv_bytes_saved_total,
 * kvstore_hits_total, kvstore_misses_total, recall_blocks_total,
 * recall_bytes_total, recall_deadline_misses_total, recall_promotions_total,
 * recall_spilled_blocks_total, recall_rankings_total.
 */
#ifndef ENTROKV_METRICS_H
#define ENTROKV_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct ekv_metrics ekv_metrics;

/* How a request ended, the label of entrokv_requests_total. */
typedef enum metrics_status {
    METRICS_OK = 0,      /* finished: length, stop or context */
    METRICS_CANCELLED,   /* client went away, deadline, or server shutdown */
    METRICS_INVALID,     /* rejected as a bad request (INVALID_ARGUMENT / 400) */
    METRICS_REJECTED,    /* queue full or draining (RESOURCE_EXHAUSTED / 429 / 503) */
    METRICS_ERROR,       /* the engine failed it */
    METRICS_N_STATUS
} metrics_status;

/* Filled by the KV store tier (cli/cmd_serve.c copies its totals after each
 * restore and save); plain atomics so no lock is needed. */
typedef struct metrics_kvstore {
    atomic_uint_fast64_t hits;      /* prefix block-rows restored */
    atomic_uint_fast64_t misses;    /* restores that found nothing */
    atomic_uint_fast64_t bytes_in[2];  /* stored into the tier: [0] host, [1] daemons */
    atomic_uint_fast64_t bytes_out[2]; /* served from the tier */
    atomic_uint_fast64_t restore_ns_sum; /* restore latency over get hits */
    atomic_uint_fast64_t restore_count;
} metrics_kvstore;

/* Point-in-time values the caller reads from its engines before rendering. */
typedef struct metrics_gauges {
    int64_t queue_depth;
    int64_t running_sequences;
    int64_t kv_blocks_used;
    int64_t kv_blocks_free;
    int64_t kv_bytes_saved;   /* a counter in the output: it only grows */
    int64_t kv_bytes_saved_by[3]; /* of which by token policies, SparK, SCOPE (counters) */
    int64_t kv_blocks_shared; /* blocks held by more than one sequence (n > 1 choices) */
    int64_t kv_cow_copies;    /* blocks copied on write (a counter in the output) */
    int64_t preemptions;      /* sequences preempted and recomputed (a counter) */
    /* recall (kvrecall_tier.h), counters in the output */
    int64_t recall_blocks, recall_bytes, recall_deadline_misses, recall_promotions;
    int64_t recall_spilled_blocks, recall_rankings;
} metrics_gauges;

/* NULL when out of memory. */
ekv_metrics *metrics_create(void);
void metrics_free(ekv_metrics *m);

const char *metrics_status_name(metrics_status s);
void metrics_count_request(ekv_metrics *m, metrics_status s);
void metrics_add_tokens(ekv_metrics *m, int64_t prompt, int64_t generated);
/* A request resubmitted to another worker group after its group failed. */
void metrics_count_retry(ekv_metrics *m);
void metrics_observe_ttft(ekv_metrics *m, double seconds);
/* n gaps of seconds each (a callback that delivered n tokens at once after
 * a gap g observes n gaps of g / n). */
void metrics_observe_itl(ekv_metrics *m, double seconds, int64_t n);
metrics_kvstore *metrics_kvstore_counters(ekv_metrics *m);

/* The whole exposition, malloc'd and NUL-terminated (caller frees); NULL
 * when out of memory. *len may be NULL. */
char *metrics_render(ekv_metrics *m, const metrics_gauges *g, size_t *len);

#endif
