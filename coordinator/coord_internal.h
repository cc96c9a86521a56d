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

typedef struct coord_group {
    char name[64];
    const coord_group_ops *ops;
    void *impl;
    int64_t in_flight;           /* submitted, not yet done (under coordinator mu) */
} coord_group;

typedef struct affinity_slot {
    uint64_t hash;
    int32_t group;               /* -1: empty */
} affinity_slot;

struct ekv_coordinator {
    const ekv_tokenizer *tok;
    char model_name[128];
    int32_t max_ctx;
    int32_t default_max_tokens;
    const kvc_profile *uncomp_profile;
    ekv_metrics *metrics;
    atomic_bool draining;
    atomic_uint_fast64_t next_id;
    pthread_mutex_t mu;          /* groups' in_flight and the affinity table */
    coord_group groups[COORD_MAX_GROUPS];
    int n_groups;
    affinity_slot affinity[COORD_AFFINITY_SLOTS];
};

struct coord_stream {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;                    /* the caller's and the group's */
    ekv_coordinator *coord;
    int group;
    uint64_t id;                 /* log id */
    uint64_t engine_id;
    bool submitted;              /* engine_id is valid */
    bool cancel_sent;
    int32_t n_prompt;
    const char *protocol;
    /* what the consumer has not taken yet */
    int32_t *ids;
    int32_t n_ids, cap_ids;
    char *text;
    size_t text_len, text_cap;
    bool lost;                   /* an append failed for memory: finish as an error */
    bool done, done_taken;
    gen_finish finish;
    engine_usage usage;
    ekv_status rc;
    char msg[256];
    /* notify hook */
    void (*notify)(void *ctx);
    void *notify_ctx;
    bool armed;
    /* timing for the TTFT and inter-token histograms */
    double t_submit, t_last;
    bool got_first;
};

/* stream.c */
coord_stream *coord_stream_new(ekv_coordinator *c, int group, int32_t n_prompt,
                               const char *protocol);
/* Frees a stream whose request never reached a group. */
void coord_stream_discard(coord_stream *s);
void coord_stream_on_tokens(void *ctx, const int32_t *ids, int32_t n, const char *text,
                            size_t len);
void coord_stream_on_done(void *ctx, gen_finish finish, const engine_usage *u, ekv_status rc,
                          const char *msg);
void coord_stream_set_submitted(coord_stream *s, uint64_t engine_id);

/* coordinator.c */
void coord_group_finished(ekv_coordinator *c, int group);

#endif
