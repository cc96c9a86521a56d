/*
 * coord_internal.h - what coordinator.c and stream.c share: the
 * coordinator's groups and the stream object. Private to coordinator/.
 */
#ifndef ENTROKV_COORD_INTERNAL_H
#define ENTROKV_COORD_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "entrokv/coordinator.h"

#define COORD_AFFINITY_SLOTS 4096

/* A slot of groups[]: FREE slots are reused; a RETIRING group gets no new
 * requests and is freed once its running ones are done (discovery.c). */
typedef enum group_state { GROUP_FREE, GROUP_ACTIVE, GROUP_RETIRING } group_state;

typedef struct coord_group {
    char name[64];
    const coord_group_ops *ops;
    void *impl;
    int64_t in_flight;           /* submitted, not yet done (under coordinator mu) */
    group_state state;           /* changed under groups_mu and mu */
    atomic_bool healthy;         /* routed to only when true (remote.c's health checks) */
    int idle_reaps;              /* RETIRING: reaps seen with nothing in flight */
} coord_group;

typedef struct coord_discovery coord_discovery;

typedef struct affinity_slot {
    uint64_t hash;
    int32_t group;               /* -1: empty */
} affinity_slot;

struct ekv_coordinator {
    const ekv_tokenizer *tok;
    char model_name[128];
    char model_identity[160];    /* "" : remote groups' models are not checked */
    int32_t max_ctx;
    size_t max_prompt_bytes;
    int32_t default_max_tokens;
    char default_kv_method[32];  /* "" is full */
    double default_kv_budget;
    const kvc_profile *uncomp_profile;
    ekv_metrics *metrics;
    atomic_bool draining;
    atomic_uint_fast64_t next_id;
    atomic_bool shutting_down;   /* readiness fails (coord_begin_shutdown) */
    pthread_mutex_t groups_mu;   /* group membership (before mu): add, retire, free, stats */
    pthread_mutex_t mu;          /* groups' in_flight, the affinity table, rr */
    unsigned rr;                 /* where route's scan starts: ties go round-robin */
    coord_group groups[COORD_MAX_GROUPS];
    int n_groups;                /* slots in use or freed, the high-water mark */
    struct coord_discovery *discovery;
    affinity_slot affinity[COORD_AFFINITY_SLOTS];
    const ekv_tls_client *worker_tls; /* remote.c's channels (coord_set_worker_tls) */
};

/* What coord_stream_on_done needs to submit a request again (stream.c). */
typedef struct coord_retry {
    int32_t *ids;
    int32_t n;
    engine_request er;           /* prompt ids, params (stops copied, grammar held), kv */
    char **stops;                /* er.params.stops' copies, one allocation */
    uint64_t tried;              /* bit g: group g failed this request */
    int attempts;
} coord_retry;

/* One choice of a stream (n > 1: one per continuation), what its
 * callbacks get as ctx: its news not taken yet and its done record. */
typedef struct coord_choice {
    coord_stream *s;
    int32_t index;
    int32_t *ids;
    int32_t n_ids, cap_ids;
    char *text;
    size_t text_len, text_cap;
    ekv_logprob *lps;            /* generated tokens' log-probabilities (logprobs) */
    int32_t n_lps, cap_lps;
    ekv_logprob *plps;           /* the prompt's (echo) */
    int32_t n_plps, cap_plps;
    bool done, done_taken;
    gen_finish finish;
    engine_usage usage;
    ekv_status rc;
    char msg[256];
    double t_last;               /* for the inter-token histogram */
    bool got_first;
} coord_choice;

struct coord_stream {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;                    /* the caller's, and the group's: one per choice */
    ekv_coordinator *coord;
    int group;
    uint64_t id;                 /* log id */
    uint64_t engine_id;
    bool submitted;              /* engine_id is valid */
    bool cancel_sent;
    bool cancel_wanted;          /* coord_stream_cancel ran (a retry must not resurrect it) */
    bool produced;               /* anything reached the stream: no retry after that */
    coord_retry *retry;          /* NULL: the request is not resubmitted (n > 1 never is) */
    int32_t n_prompt;
    const char *protocol;
    coord_choice *ch;            /* n_choices of them */
    void **ctxs;                 /* &ch[i], the engine_request's choice_ctx */
    int32_t n_choices;
    int32_t n_done, n_done_taken;
    int32_t cursor;              /* the choice take looks at first (round robin) */
    ekv_status worst_rc;         /* the first failure among the choices, for the metrics */
    gen_finish worst_finish;
    bool lost;                   /* an append failed for memory: finish as an error */
    /* notify hook */
    void (*notify)(void *ctx);
    void *notify_ctx;
    bool armed;
    /* timing for the TTFT histogram */
    double t_submit;
    bool got_first;
};

/* stream.c */
/* A stream of n_choices (>= 1) choices. */
coord_stream *coord_stream_new(ekv_coordinator *c, int group, int32_t n_prompt,
                               int32_t n_choices, const char *protocol);
/* Frees a stream whose request never reached a group. */
void coord_stream_discard(coord_stream *s);
void coord_stream_on_logprobs(void *ctx, const ekv_logprob *lp, int32_t n, bool prompt);
void coord_stream_on_tokens(void *ctx, const int32_t *ids, int32_t n, const char *text,
                            size_t len);
void coord_stream_on_done(void *ctx, gen_finish finish, const engine_usage *u, ekv_status rc,
                          const char *msg);
void coord_stream_set_submitted(coord_stream *s, uint64_t engine_id);
/* Keeps what a resubmission needs (a copy of ids and er's stops, a
 * reference to its grammar); false when out of memory (no retries then). */
bool coord_stream_keep_request(coord_stream *s, const int32_t *ids, int32_t n,
                               const engine_request *er);

/* coordinator.c */
void coord_group_finished(ekv_coordinator *c, int group);
/* Picks a healthy group outside the exclude bits and counts the request's
 * n_seqs sequences in flight there; -1 when there is none. */
int coord_route(ekv_coordinator *c, const int32_t *ids, int32_t n, int32_t n_seqs,
                uint64_t exclude);
/* coord_add_group that also says which slot (for coord_retire_group) and
 * whether the group starts healthy. */
ekv_status coord_add_group_slot(ekv_coordinator *c, const char *name, const coord_group_ops *ops,
                                void *impl, bool healthy, int *slot, ekv_error *err);
/* Marks the group of impl healthy or not (its own health checks). */
void coord_set_group_healthy(ekv_coordinator *c, const void *impl, bool healthy);
/* No new requests for the group in slot; coord_reap_groups frees it later. */
void coord_retire_group(ekv_coordinator *c, int slot);
/* Frees retiring groups that have had nothing in flight for two reaps in a
 * row (one reap apart covers a cancel racing the request's end). */
void coord_reap_groups(ekv_coordinator *c);

/* remote.c: coord_add_remote that says which slot the group took. */
ekv_status coord_add_remote_slot(ekv_coordinator *c, const char *target, int *slot,
                                 ekv_error *err);

/* discovery.c: stops the resolver thread and frees (coord_free). */
void coord_discovery_free(struct coord_discovery *d);

#endif
