/*
 * coordinator.h - the front of the serving path, shared by the gRPC and HTTP
 * servers: checks and tokenizes a request, routes it to a worker group, and
 * turns the group's engine callbacks into a per-request stream that the
 * protocol layer drains.
 *
 * Worker groups: each is a small vtable (submit / cancel / stats) over an
 * implementation: an in-process ekv_engine (coord_add_engine, what `entrokv
 * serve` uses) or, later, a remote worker reached over the internal Worker
 * gRPC service. Routing is least loaded (requests in flight per group) with
 * prefix affinity: the hash of a prompt's first 16-token block remembers the
 * group that last served it, and a request goes there unless that group is
 * busier than the least loaded one by more than COORD_AFFINITY_SLACK.
 * Ties between equally loaded groups go round-robin, not to the lowest
 * index. A request whose group fails with EKV_EUNAVAILABLE (a remote
 * worker died, stalled or is draining) before it produced anything is
 * submitted again to another healthy group, at most COORD_MAX_RETRIES
 * times (entrokv_request_retries_total); after its first output the
 * failure ends the stream with EKV_EUNAVAILABLE (gRPC UNAVAILABLE, HTTP
 * 503 or an error event).
 *
 * Streams: coord_submit returns a coord_stream holding the caller's
 * reference and the group's (one per choice: a request of n choices gets
 * n done records, each choice's callbacks their own ctx). The group's
 * callbacks (on its engine thread) append tokens and text and finally the
 * done record; the caller takes what is new with coord_stream_take, waiting on coord_stream_wait or on a notify
 * hook (the gRPC server wakes its completion queue from it). The caller
 * drops its reference with coord_stream_release, which cancels the request
 * if it has not finished (a client that went away frees its KV at once).
 *
 * Threading: everything here may be called from any thread. The coordinator
 * must outlive its streams' requests: destroy the groups' engines (which
 * finish every request) before coord_free.
 */
#ifndef ENTROKV_COORDINATOR_H
#define ENTROKV_COORDINATOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/engine.h"
#include "entrokv/generate.h"
#include "entrokv/metrics.h"
#include "entrokv/security.h"
#include "entrokv/status.h"
#include "entrokv/tokenizer.h"

#define COORD_MAX_STOPS 16
#define COORD_PREFIX_BLOCK 16     /* tokens hashed for prefix affinity */
#define COORD_AFFINITY_SLACK 4    /* in-flight requests an affine group may exceed the least loaded by */
#define COORD_MAX_GROUPS 64
#define COORD_MAX_N 16            /* choices (n, best_of) of one request */
#define COORD_MAX_PROMPT_BYTES (1u << 20) /* coord_config.max_prompt_bytes' default */
#define COORD_MAX_RETRIES 2       /* resubmissions of a request whose group failed before output */

typedef struct ekv_coordinator ekv_coordinator;
typedef struct coord_stream coord_stream;

/* One worker group behind the router. */
typedef struct coord_group_ops {
    ekv_status (*submit)(void *impl, const engine_request *r, uint64_t *id, ekv_error *err);
    void (*cancel)(void *impl, uint64_t id);
    void (*stats)(void *impl, engine_stats *s);
    /* NULL, or: finish every request (on_done for each) and free impl;
     * coord_free calls it for groups the coordinator owns. */
    void (*destroy)(void *impl);
} coord_group_ops;

typedef struct coord_config {
    const char *model_name;      /* reported by /v1/models and in responses (copied) */
    int32_t max_ctx;             /* tokens of one sequence, the groups' engine max_ctx */
    int32_t default_max_tokens;  /* when a request does not say (256) */
    const char *default_kv_method; /* kv_method when a request names none (NULL: full) */
    double default_kv_budget;    /* kv_budget when a request gives none (1.0) */
    const kvc_profile *uncomp_profile; /* offline UNComp groups for kv_method "uncomp";
                                        * NULL: online entropy; must outlive the coordinator */
    size_t max_prompt_bytes;     /* a prompt, or the messages' roles and contents together,
                                  * longer than this is refused before tokenizing
                                  * (EKV_EINVAL naming the limit); 0: COORD_MAX_PROMPT_BYTES */
    const char *model_identity;  /* kvprefix_model_id of the model (copied): remote groups
                                  * whose Stats report another are refused; NULL: unchecked */
} coord_config;

/* A request as both protocols describe it. coord_request_init sets the
 * defaults of every field a client may leave out; the protocol layer then
 * overwrites what the client sent, and coord_submit checks all of it. */
typedef struct coord_request {
    const char *prompt;          /* raw text (may hold NULs: prompt_len counts) */
    size_t prompt_len;
    const tok_message *messages; /* or chat messages */
    size_t n_messages;
    const int32_t *prompt_ids;   /* or token ids already (the Worker service) */
    size_t n_prompt_ids;
    gen_params params;           /* max_tokens, sampling, stops, ignore_eos */
    const char *kv_method;       /* NULL or "" is full */
    double kv_budget;
    const char *response_format; /* NULL, or OpenAI's response_format as JSON text: */
    size_t response_format_len;  /* structured output (grammar.h), compiled and cached */
    const char *decode_method;   /* NULL or "" is none; else SCOPE (compress.h) */
    int32_t scope_recent, scope_window;
    double spark_ratio;          /* 0: no SparK */
    const char *spark_recovery;  /* NULL or "" is avg */
    int32_t recall;              /* blocks per KV head recalled each step (0: off) */
    int32_t recall_every;        /* rank every this many steps (0: default, 1) */
    bool recall_no_promote;      /* recall without promotion (default: promote) */
    int32_t recall_gather;       /* token recall's K, in [0, KV_RECALL_GATHER_MAX]: 0 whole
                                  * blocks (coord_request_init: KV_RECALL_GATHER_DEFAULT) */
    const char *protocol;        /* "grpc" / "http", for the log */
    /* n choices (0 or 1: one), in [1, COORD_MAX_N]: n continuations of the
     * one prompt, prefilled and compressed once, its KV blocks shared
     * (engine.h); choice i samples with seed params.sampling.seed + i. Not
     * with prompt_logprobs or a decode_method (EKV_EINVAL). */
    int32_t n;
} coord_request;

/* Everything new in one choice of a stream since the previous take. ids
 * and text are malloc'd and owned by the chunk (coord_chunk_free). */
typedef struct coord_chunk {
    int32_t index;               /* the choice, in [0, coord_stream_choices) */
    int32_t *ids;
    int32_t n_ids;
    char *text;
    size_t text_len;
    ekv_logprob *lps;            /* logprobs: one per id above, and with done perhaps one
                                  * more: the end-of-generation token's (malloc'd, owned) */
    int32_t n_lps;
    ekv_logprob *prompt_lps;     /* echo with logprobs: the prompt's tokens, the first with */
    int32_t n_prompt_lps;        /* logprob NaN; before any generated token's (owned) */
    bool done;                   /* the choice has finished; the fields below are set */
    bool last;                   /* with done: every choice's done has now been taken */
    gen_finish finish;
    engine_usage usage;
    ekv_status rc;               /* EKV_OK, or why the engine failed it */
    char msg[256];
} coord_chunk;

void coord_config_default(coord_config *c);
ekv_coordinator *coord_create(const ekv_tokenizer *tok, const coord_config *cfg,
                              ekv_metrics *metrics, ekv_error *err);
void coord_free(ekv_coordinator *c);

/* Adds a group; impl stays owned by the caller and must outlive the
 * coordinator's use of it. EKV_ERANGE past COORD_MAX_GROUPS. */
ekv_status coord_add_group(ekv_coordinator *c, const char *name, const coord_group_ops *ops,
                           void *impl, ekv_error *err);
/* Adds an in-process engine as a group. */
ekv_status coord_add_engine(ekv_coordinator *c, const char *name, ekv_engine *e,
                            ekv_error *err);

const char *coord_model_name(const ekv_coordinator *c);
int32_t coord_max_ctx(const ekv_coordinator *c);
/* cfg->model_identity, or "" when none was given. */
const char *coord_model_identity(const ekv_coordinator *c);
ekv_metrics *coord_metrics(ekv_coordinator *c);
/* Sums the groups' engine_stats into gauges for /metrics. */
void coord_gauges(ekv_coordinator *c, metrics_gauges *g);
/* Sums the groups' engine_stats (the Worker service's Stats). */
void coord_stats(ekv_coordinator *c, engine_stats *sum);

/* Adds a remote worker group at target ("host:port"), reached over the
 * internal entrokv.v1.Worker gRPC service (remote.c). It need not answer
 * yet: a Stats call once a second (2 s deadline) keeps it healthy while it
 * answers with a context of at least the coordinator's and the
 * coordinator's model identity (when it has one; another model is refused,
 * with a log line), and only healthy groups are routed to. The channel
 * sends keepalive pings, so a worker killed or stopped (SIGSTOP) fails its
 * running calls with EKV_EUNAVAILABLE within seconds, never a hang. The
 * coordinator owns it and stops it in coord_free. */
ekv_status coord_add_remote(ekv_coordinator *c, const char *target, ekv_error *err);
/* TLS for the remote groups added after this call (NULL or no ca_pem:
 * plaintext); tls must outlive the coordinator. */
void coord_set_worker_tls(ekv_coordinator *c, const ekv_tls_client *tls);

/* Adds the worker groups of a comma list (discovery.c): HOST:PORT entries
 * are remote groups as above; dns:NAME:PORT entries are one group per
 * A/AAAA record of NAME (a headless Service), resolved now and again every
 * dns_interval_s seconds on a background thread, which adds the groups of
 * new records and retires those of vanished ones (no new requests; their
 * running streams finish, then the group is freed). EKV_EINVAL for a
 * malformed entry; a name that does not resolve yet is not an error. */
ekv_status coord_add_workers(ekv_coordinator *c, const char *list, double dns_interval_s,
                             ekv_error *err);

/* Readiness (/readyz, gRPC health): true while the coordinator is not
 * shutting down and at least one group is healthy; otherwise false with
 * the reason in why. */
bool coord_ready(ekv_coordinator *c, char *why, size_t cap);
/* The first step of a shutdown: readiness fails at once, requests are
 * still accepted until coord_drain. */
void coord_begin_shutdown(ekv_coordinator *c);

/* After this, coord_submit refuses new requests with EKV_EBUSY and
 * coord_draining is true; requests already accepted run to the end. */
void coord_drain(ekv_coordinator *c);
bool coord_draining(const ekv_coordinator *c);

void coord_request_init(const ekv_coordinator *c, coord_request *r);

/* Checks r, tokenizes it, routes it and queues it on a group.
 * EKV_EINVAL with a message naming the problem (empty prompt, invalid
 * UTF-8, prompt longer than the context, max_tokens outside [1, context],
 * bad sampling values, unknown kv_method, too many stops); EKV_EBUSY when
 * the chosen group's queue is full or the coordinator is draining; other
 * codes for internal failures. The request is counted in the metrics
 * either way. On success *out holds the caller's reference. */
ekv_status coord_submit(ekv_coordinator *c, const coord_request *r, coord_stream **out,
                        ekv_error *err);

/* The ids the model would see for r's prompt or messages (same checks as
 * coord_submit for the text part). *ids is malloc'd; the caller frees it. */
ekv_status coord_tokenize(ekv_coordinator *c, const coord_request *r, int32_t **ids,
                          size_t *n, ekv_error *err);

/* The request's id in the log ("req-<n>"). */
uint64_t coord_stream_id(const coord_stream *s);
int32_t coord_stream_prompt_tokens(const coord_stream *s);
/* The request's n choices (1 unless coord_request.n said more). */
int32_t coord_stream_choices(const coord_stream *s);
/* Moves what is new in one choice into *c (zeroed first; choices in turn,
 * so none starves). Returns whether anything was: tokens, text or the
 * choice's done record (which is returned once). The stream is over when
 * a chunk has last set. */
bool coord_stream_take(coord_stream *s, coord_chunk *c);
/* Blocks until something is new or timeout_s passes; true if something is. */
bool coord_stream_wait(coord_stream *s, double timeout_s);
/* Sets the hook called (on the group's thread, with the stream's lock
 * held, so it must only signal) when something new arrives and the
 * consumer has taken everything since the previous call: one call per
 * take at most. NULL detaches; once it returns the old hook is never
 * called again. Called at once if something is already waiting. */
void coord_stream_set_notify(coord_stream *s, void (*fn)(void *ctx), void *ctx);
/* Asks the group to stop the request (its KV is freed); the done record
 * follows with GEN_FINISH_CANCELLED. Harmless after it finished. */
void coord_stream_cancel(coord_stream *s);
/* Drops the caller's reference, cancelling the request if still running. */
void coord_stream_release(coord_stream *s);
void coord_chunk_free(coord_chunk *c);

/* "length", "stop", "context", "cancelled" as the APIs report them. */
const char *coord_finish_reason(gen_finish f);

/* One line to stderr: "<UTC time> entrokv: <message>". Thread-safe. */
void coord_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Validity of UTF-8 (no overlongs, surrogates or values above U+10FFFF). */
bool coord_utf8_valid(const char *s, size_t len);

#endif
