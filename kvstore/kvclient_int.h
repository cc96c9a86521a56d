/*
 * kvclient_int.h - private to kvstore/: the client's state, shared by
 * kvclient.c (API, batches, the worker thread, the local tier) and
 * kvremote.c (peers, the ring, remote ops in flight).
 *
 * Threads: submit / wait / release run on callers' threads and touch only
 * the fields under `mu`. Everything else - the UCX worker, peers, slots,
 * the remote queue - belongs to the client's worker thread.
 */
#ifndef ENTROKV_KVCLIENT_INT_H
#define ENTROKV_KVCLIENT_INT_H

#include <pthread.h>

#include "entrokv/hmac.h"
#include "entrokv/kvstore.h"
#include "kvpoly.h"
#include "kvucx.h"

typedef struct kvc_item {
    kvstore_batch *b;
    kvstore_op *op;
    kvstore_key key;                /* op->key in the client's namespace (kvstore_ns_key) */
    uint8_t mac[KVSTORE_MAC_BYTES]; /* get: the verified MAC of a remote hit (promotion) */
    struct kvc_item *next; /* remote queue */
    bool local_ok;         /* put / del: the local tier already succeeded */
} kvc_item;

struct kvstore_batch {
    kvstore_client *c;
    kvstore_op *ops;
    size_t n, remaining;
    kvstore_done_fn done;
    void *arg;
    bool auto_free;
    double t_submit;
    _Atomic bool finished;
    kvstore_batch *next; /* submit queue, then completed list */
    kvc_item items[];
};

enum { PEER_DOWN, PEER_WAIT_CHALLENGE, PEER_WAIT_AUTH_OK, PEER_WAIT_DIRECT, PEER_READY };

typedef struct kvc_peer {
    char name[128];
    struct sockaddr_storage sa;
    socklen_t salen;
    ucp_ep_h ep;
    int state;
    bool same_host;  /* kvx_addr_is_local: may map the daemon's region */
    double deadline; /* connect + auth must finish by then */
    double retry_at; /* DOWN: next connect attempt */
    const char *fail; /* set by the error callback, acted on in the loop */
    uint8_t cnonce[KVWIRE_NONCE_BYTES];
    uint8_t snonce_copy[KVWIRE_NONCE_BYTES];
    const uint8_t *region; /* the daemon's value region, mapped read-only (same host) */
    size_t region_bytes;
    _Atomic bool up;
} kvc_peer;

/* A remote op in flight. Request ids are (sequence << 16 | slot index). */
typedef struct kvc_slot {
    uint64_t id; /* 0: free */
    kvc_item *it;
    int peer;
    double deadline;
    void *send_req, *recv_req;
    bool replied;
    bool direct;     /* a get that asked for a span of the peer's region */
    bool hashing;    /* on the hash list (kvremote.c, hash_step) */
    bool mac_only;   /* hashing: the checksum is known (a direct get), only the MAC is left */
    int hash_next;   /* the next slot on it, -1 at its end */
    kvstore_sum sum; /* how far the checksum got */
    kvpoly poly;     /* the value's MAC: its polynomial hash, as far as mac_done */
    size_t mac_done;
    size_t mac_len;  /* the value's length, which the MAC covers */
    kvstore_result result;
    uint64_t checksum;     /* the value's, as the daemon sent it */
    uint64_t checksum_got; /* mac_only: what the copy hashed to */
    bool direct_hit;       /* read from the peer's region */
    uint8_t want_mac[KVSTORE_MAC_BYTES]; /* get: the MAC that came with the value */
    size_t value_len;
    uint8_t hdr[KVWIRE_HEADER_BYTES];
} kvc_slot;

struct kvstore_client {
    kvstore_client_config cfg;
    uint8_t *token;
    uint8_t *ns_key; /* the namespace's secret (cfg.ns_key, the token, or random) */
    size_t ns_key_len;
    char ns[256];
    kvpoly_key poly_key; /* the MAC's polynomial hash key (kvns_poly_key) */
    char **peer_names;
    kvstore_local *local;
    kvstore_metrics m;

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    kvstore_batch *sub_head, *sub_tail; /* under mu */
    int unfinished;                     /* under mu */
    bool stopping;                      /* under mu */
    bool connected;                     /* under mu: the first connect round is over */
    _Atomic int submitted;              /* batches in the submit queue: a lock-free peek */

    /* worker thread only */
    int n_active;
    kvstore_batch *completed;
    kvc_item *rq_head, *rq_tail;
    kvx_worker x;
    kvstore_ring *ring;
    kvc_peer *peers;
    int n_peers;
    kvc_slot *slots;
    int n_slots, n_inflight;
    int *free_slots, n_free;
    int hash_head, hash_tail; /* slots whose values are hashed a step at a time; -1: none */
    uint64_t seq;
    double last_sweep;
    bool stopping_remote; /* no reconnects while closing */
};

/* kvclient.c: records the op's result; completes its batch when it was the
 * last one. */
void kvc_item_finish(kvstore_client *c, kvc_item *it, kvstore_result r, kvstore_tier tier,
                     size_t value_len);
void kvc_log(kvstore_client *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* kvns.c: kvstore_value_mac a piece at a time: the namespace's polynomial
 * hash key; the MAC from the value's polynomial hash (kvpoly_final). */
void kvns_poly_key(const uint8_t *ns_key, size_t ns_key_len, const char *ns, kvpoly_key *out);
void kvns_mac_finish(const uint8_t *ns_key, size_t ns_key_len, const char *ns,
                     const kvstore_key *stored_key, uint64_t len, const uint8_t poly[16],
                     uint8_t mac[KVSTORE_MAC_BYTES]);
/* kvclient.c: the MAC of it->op's value (len bytes of buf), stored under it->key. */
void kvc_mac(const kvstore_client *c, const kvc_item *it, const void *buf, size_t len,
             uint8_t mac[KVSTORE_MAC_BYTES]);

/* kvremote.c */
ekv_status kvr_init(kvstore_client *c, ekv_error *err);
void kvr_fini(kvstore_client *c);
void kvr_connect_all(kvstore_client *c);
bool kvr_connecting(const kvstore_client *c);
/* Sends it to the peer owning its key, or finishes it as a miss / failure
 * when that peer is down. false: no free slot, try again later. */
bool kvr_issue(kvstore_client *c, kvc_item *it);
/* Progress, timeouts, reconnects. true when anything happened. */
bool kvr_progress(kvstore_client *c);
/* Sleeps up to ms for UCX events. */
void kvr_wait(kvstore_client *c, int ms);

#endif
