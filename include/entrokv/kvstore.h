/*
 * kvstore.h - the KV store tier: evicted-but-recoverable KV blocks kept in
 * host memory and on kvstore daemons, reached over UCX.
 *
 * A block is stored under a 32-byte key the caller derives
 * (kvstore_key_make: model id, prefix hash chain, layer, KV head, TP
 * layout), which the client stores under its namespaced form; its value is
 * the block's bytes, opaque here, guarded by a 64-bit checksum and a keyed
 * MAC (the namespace's) computed on put and verified on every get. A value
 * that fails either, a peer that is down, slow or dies mid-transfer: all
 * are a miss, reported within the configured timeout, never a wrong value
 * or a hang.
 *
 * Tiers (docs/kvstore.md):
 *   kvstore_local  - an in-process host pool: capacity in bytes, LRU
 *                    eviction, thread-safe; also the daemon's storage.
 *   kvstore_ring   - consistent hashing with virtual nodes: key -> daemon.
 *   kvstore_client - fronts them: local first, then the daemon that owns the
 *                    key on the ring. Batched and asynchronous: submit
 *                    returns at once, a worker thread does the work, the
 *                    batch is polled, waited on, or completes by callback.
 *   kvstore_daemon - `entrokv kvstore`: a local store served over UCX to
 *                    authenticated clients.
 *
 * Memory: the store copies values in (put) and out (get); the caller's
 * buffers in a submitted batch must stay valid until the batch is done.
 */
#ifndef ENTROKV_KVSTORE_H
#define ENTROKV_KVSTORE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

/* ---- keys and checksums ---- */

#define KVSTORE_KEY_BYTES 32
#define KVSTORE_HASH_BYTES 32

typedef struct kvstore_key {
    uint8_t b[KVSTORE_KEY_BYTES];
} kvstore_key;

/* One link of the prefix hash chain: SHA-256("ekv-chain1" || prev ||
 * tokens as int32 LE). prev NULL means the empty prefix (the first block). */
void kvstore_chain_hash(const uint8_t prev[KVSTORE_HASH_BYTES], const int32_t *tokens, int32_t n,
                        uint8_t out[KVSTORE_HASH_BYTES]);

/* The key of one (block, layer, KV head) under one model and TP layout:
 * SHA-256("ekv-key1" || model id || chain(prev, tokens) || layer || head ||
 * tp_rank || tp_size). prev_chain_hash is the chain value of the prefix
 * before this block (NULL for the first block); tokens are this block's. */
void kvstore_key_make(const char *model_id, const uint8_t prev_chain_hash[KVSTORE_HASH_BYTES],
                      const int32_t *tokens, int32_t n, int32_t layer, int32_t head,
                      int32_t tp_rank, int32_t tp_size, kvstore_key *out);

/* The first 8 bytes as 16 hex digits, for log lines. */
void kvstore_key_hex(const kvstore_key *key, char out[17]);

/* The value checksum: a 64-bit, xxHash3-style multiply-accumulate hash over
 * 64-byte stripes (kvstore/kvhash.c), fast enough to run on every get. */
uint64_t kvstore_checksum(const void *data, size_t len);
/* Copies len bytes from src to dst and returns kvstore_checksum of the bytes
 * written to dst, in one pass where the CPU allows (AVX-512): reading a
 * value out of memory another process may reuse, the result checks what
 * the caller got, not what src holds afterwards. */
uint64_t kvstore_checksum_copy(void *dst, const void *src, size_t len);
/* kvstore_checksum_copy for a destination nobody reads soon (a store's
 * memory, or a value too large to stay in cache until it is read): where
 * dst is 64-byte aligned it is written with non-temporal stores, which skip
 * reading its lines first and leave the cache alone. The bytes are visible
 * to other threads and processes on return. */
uint64_t kvstore_checksum_copy_nt(void *dst, const void *src, size_t len);

/* kvstore_checksum of one value, a step at a time: for a thread that must
 * not stop for a whole value (the client's, which keeps UCX moving between
 * steps). Start with kvstore_sum_init; each step hashes `budget` more bytes
 * (rounded down to whole KiB, at least one KiB) of the same len-byte value
 * and returns true once the whole value is done, its checksum in *out. */
typedef struct kvstore_sum {
    uint64_t acc[8];
    size_t done; /* bytes hashed so far */
} kvstore_sum;
void kvstore_sum_init(kvstore_sum *s);
bool kvstore_sum_step(kvstore_sum *s, const void *value, size_t len, size_t budget,
                      uint64_t *out);

/* ---- namespaces and value MACs ----
 *
 * A client works in one namespace (a name, e.g. the model's file hash or a
 * tenant, and a secret namespace key; docs/kvstore.md, "Threat model").
 * What it stores goes under the namespaced key kvstore_ns_key derives from
 * the caller's, so a client without the namespace key can neither name nor
 * collide with another namespace's entries; each value carries the keyed
 * MAC kvstore_value_mac, computed by the writer and checked by every
 * reader, so a value written without the key is never accepted. */

#define KVSTORE_MAC_BYTES 32

/* HMAC-SHA256(ns_key, "ekv-ns1" || u32 len(ns) || ns || key), 32 bytes. */
void kvstore_ns_key(const uint8_t *ns_key, size_t ns_key_len, const char *ns,
                    const kvstore_key *key, kvstore_key *out);
/* The MAC of a value stored under stored_key (the namespaced key):
 *   K   = the first 16 bytes of HMAC-SHA256(ns_key, "ekv-poly1" || u32 len(ns) || ns)
 *   P   = the polynomial hash of the value under K (kvstore/kvpoly.h: GF(2^128))
 *   MAC = HMAC-SHA256(ns_key, "ekv-val2" || u32 len(ns) || ns || stored_key
 *                     || u64 len || P)
 * All integers little-endian. */
void kvstore_value_mac(const uint8_t *ns_key, size_t ns_key_len, const char *ns,
                       const kvstore_key *stored_key, const void *value, size_t len,
                       uint8_t mac[KVSTORE_MAC_BYTES]);

/* ---- results and metrics ---- */

typedef enum kvstore_result {
    KVSTORE_OK = 0,   /* put stored, get hit, exists: yes, del: removed */
    KVSTORE_MISS,     /* absent, failed its checksum, or its tier is down / timed out */
    KVSTORE_TOOSMALL, /* get: the value is larger than the buffer (value_len says how large) */
    KVSTORE_NOSPACE,  /* put: larger than the capacity, or everything else is pinned */
    KVSTORE_FAILED    /* put / del could not reach its tier (peer down, timeout, error) */
} kvstore_result;

typedef enum kvstore_tier {
    KVSTORE_TIER_NONE = 0, /* nothing served the op */
    KVSTORE_TIER_LOCAL,
    KVSTORE_TIER_REMOTE,
    KVSTORE_TIER_COUNT
} kvstore_tier;

const char *kvstore_result_name(kvstore_result r);

/* Counters a /metrics endpoint reads at any time from any thread (relaxed
 * atomics: each counter is exact, a snapshot of several is not atomic). */
typedef struct kvstore_tier_metrics {
    _Atomic uint64_t hits;      /* gets answered with a verified value */
    _Atomic uint64_t misses;    /* gets that found nothing (incl. checksum failures, timeouts) */
    _Atomic uint64_t bytes_in;  /* value bytes stored into this tier */
    _Atomic uint64_t bytes_out; /* value bytes served from this tier */
} kvstore_tier_metrics;

typedef struct kvstore_metrics {
    kvstore_tier_metrics tier[KVSTORE_TIER_COUNT];
    _Atomic uint64_t restore_ns_sum; /* get hits: submit to completion, summed */
    _Atomic uint64_t restore_count;
    _Atomic uint64_t checksum_failures;
    _Atomic uint64_t timeouts;    /* remote ops that hit op_timeout_ms */
    _Atomic uint64_t peer_failures; /* connections lost or refused */
    _Atomic uint64_t evictions;   /* LRU evictions in the local tier */
    _Atomic uint64_t rejected;    /* daemon: messages / connections dropped (auth, malformed) */
    _Atomic uint64_t direct_gets; /* client: remote gets read from a daemon's shared memory */
    _Atomic uint64_t mac_failures; /* client: values whose MAC did not verify (written
                                      without the namespace key, or spoilt): misses */
    _Atomic uint64_t auth_failures; /* daemon: connections that failed or skipped the token
                                       handshake (a wrong proof, a request before it, none
                                       in time) */
    _Atomic uint64_t requests[16]; /* daemon: requests received, by wire op (kvwire_op) */
} kvstore_metrics;

/* ---- tier (a): the in-process host pool ---- */

typedef struct kvstore_local kvstore_local;
typedef struct kvstore_entry kvstore_entry;

typedef struct kvstore_local_stats {
    uint64_t capacity;   /* bytes */
    uint64_t used;       /* bytes held, entry overhead included; never above capacity */
    uint64_t entries;    /* visible entries */
    uint64_t evictions;
    uint64_t pinned;     /* bytes of entries a reader holds (a send, a direct get) */
} kvstore_local_stats;

/* A store that never holds more than capacity bytes (values plus per-entry
 * overhead). metrics, if given, receives its counters (tier LOCAL). */
kvstore_local *kvstore_local_create(uint64_t capacity, kvstore_metrics *metrics, ekv_error *err);
/* The same store with its values in one shared-memory region (a memfd,
 * kvstore/kvarena.c) that clients on this host may map read-only: the
 * daemon's store. Each value takes a power-of-two block of at least 4 KiB,
 * and that block is what counts against capacity. */
kvstore_local *kvstore_local_create_shared(uint64_t capacity, kvstore_metrics *metrics,
                                           ekv_error *err);
/* A shared store's region (false for a private one): its mapping, size and
 * memfd, and a 4 KiB label page inside it, outside any value, that the
 * daemon writes an id into so clients can check what they mapped. */
bool kvstore_local_region(const kvstore_local *s, void **base, size_t *bytes, int *fd,
                          uint8_t **label);
void kvstore_local_destroy(kvstore_local *s); /* every entry must be released */

/* Copies the value in, replacing any older value, evicting least recently
 * used entries as needed. KVSTORE_NOSPACE when it cannot fit; nothing
 * changes then. */
kvstore_result kvstore_local_put(kvstore_local *s, const kvstore_key *key, const void *val,
                                 size_t len);

/* Copies the value out after checking its checksum; a value that fails is
 * deleted and reported as KVSTORE_MISS. *value_len gets the value's size on
 * KVSTORE_OK and KVSTORE_TOOSMALL. */
kvstore_result kvstore_local_get(kvstore_local *s, const kvstore_key *key, void *buf, size_t cap,
                                 size_t *value_len);
/* The same, keeping a MAC beside the value (the client's host tier): put
 * stores mac with the value, get copies the stored one out (all zero when
 * none was given). The store does not check it; its reader does. */
kvstore_result kvstore_local_put_mac(kvstore_local *s, const kvstore_key *key, const void *val,
                                     size_t len, const uint8_t mac[KVSTORE_MAC_BYTES]);
kvstore_result kvstore_local_get_mac(kvstore_local *s, const kvstore_key *key, void *buf,
                                     size_t cap, size_t *value_len,
                                     uint8_t mac[KVSTORE_MAC_BYTES]);
bool kvstore_local_exists(kvstore_local *s, const kvstore_key *key);
bool kvstore_local_delete(kvstore_local *s, const kvstore_key *key);
void kvstore_local_stats_get(kvstore_local *s, kvstore_local_stats *out);

/*
 * Zero-copy access, for the daemon's transport. acquire pins a visible
 * entry (NULL: miss); its bytes stay valid, even if it is evicted or
 * replaced meanwhile, until release. reserve sets aside room for a value of
 * len bytes that is not visible until commit (which replaces any older value
 * and unpins it) or is dropped by abort.
 */
kvstore_entry *kvstore_local_acquire(kvstore_local *s, const kvstore_key *key);
kvstore_entry *kvstore_local_reserve(kvstore_local *s, const kvstore_key *key, size_t len,
                                     uint64_t checksum, kvstore_result *why);
void kvstore_local_commit(kvstore_local *s, kvstore_entry *e);
void kvstore_local_abort(kvstore_local *s, kvstore_entry *e);
void kvstore_local_release(kvstore_local *s, kvstore_entry *e);
void *kvstore_entry_data(kvstore_entry *e);
size_t kvstore_entry_len(const kvstore_entry *e);
uint64_t kvstore_entry_checksum(const kvstore_entry *e);
/* A reserved entry's checksum, when it is known only once the value is
 * written (the daemon's direct puts); before commit. */
void kvstore_entry_set_checksum(kvstore_entry *e, uint64_t checksum);
/* The MAC kept beside an entry's value, in private memory (the daemon's
 * entries: what the writer's PUT carried, sent back with every GET). */
const uint8_t *kvstore_entry_mac(const kvstore_entry *e);
void kvstore_entry_set_mac(kvstore_entry *e, const uint8_t mac[KVSTORE_MAC_BYTES]);

/* Test hook: flips one bit of the stored value at offset (the checksum is
 * left as is). false when the key is absent or offset out of range. */
bool kvstore_local_debug_corrupt(kvstore_local *s, const kvstore_key *key, size_t offset);

/* ---- the hash ring ---- */

typedef struct kvstore_ring kvstore_ring;

#define KVSTORE_RING_DEFAULT_VNODES 160

kvstore_ring *kvstore_ring_create(int vnodes_per_node, ekv_error *err);
void kvstore_ring_destroy(kvstore_ring *r);
/* Adds node id (the caller's index, >= 0) named name ("host:port"); its
 * virtual nodes sit at points derived from the name only, so every client
 * with the same membership builds the same ring. */
ekv_status kvstore_ring_add(kvstore_ring *r, const char *name, int id, ekv_error *err);
void kvstore_ring_remove(kvstore_ring *r, int id);
int kvstore_ring_nodes(const kvstore_ring *r);
/* The node owning key (the first virtual node clockwise), -1 when empty. */
int kvstore_ring_lookup(const kvstore_ring *r, const kvstore_key *key);

/* ---- the client: local first, then the ring ---- */

typedef struct kvstore_client kvstore_client;
typedef struct kvstore_batch kvstore_batch;

typedef void (*kvstore_log_fn)(void *arg, const char *line);

typedef struct kvstore_client_config {
    uint64_t local_capacity;    /* bytes of the in-process tier; 0: none */
    const char *const *peers;   /* "host:port" of the daemons on the ring */
    int n_peers;
    const uint8_t *auth_token;  /* shared secret, required with peers */
    size_t auth_token_len;
    int op_timeout_ms;          /* a remote op completes (maybe as a miss) by then; 2000 */
    int connect_timeout_ms;     /* connect + authenticate; 2000 */
    int reconnect_ms;           /* a failed peer is tried again after this; 1000 */
    int vnodes;                 /* virtual nodes per peer; KVSTORE_RING_DEFAULT_VNODES */
    int max_batches;            /* submitted, unfinished batches before EKV_EBUSY; 256 */
    int max_inflight;           /* remote ops in flight at once; 256 */
    bool write_through;         /* puts also go to the ring when there is a local tier; true */
    bool promote_remote_hits;   /* remote get hits are copied into the local tier; true */
    bool no_direct;             /* gets from a daemon on this host go by UCX even where its
                                   region can be mapped (benchmarks of the transport) */
    const char *ns;             /* the namespace: what this client stores and reads lives
                                   under keys and MACs of (ns, ns_key); NULL: "default" */
    const uint8_t *ns_key;      /* the namespace's secret; none: the auth token (every
                                   token holder shares the namespace), or with no peers a
                                   random key of this process */
    size_t ns_key_len;
    kvstore_log_fn log;         /* one line per event (connect, failure); NULL: silent */
    void *log_arg;
} kvstore_client_config;

void kvstore_client_config_default(kvstore_client_config *cfg);

/* Starts the worker thread and connects to every peer (in parallel, bounded
 * by connect_timeout_ms). A peer that cannot be reached is not an error: its
 * keys miss until a reconnect succeeds. */
kvstore_client *kvstore_client_create(const kvstore_client_config *cfg, ekv_error *err);
/* Finishes every submitted batch (bounded by the timeouts), then stops. */
void kvstore_client_destroy(kvstore_client *c);

typedef enum kvstore_op_kind {
    KVSTORE_PUT = 1,
    KVSTORE_GET,
    KVSTORE_EXISTS,
    KVSTORE_DEL
} kvstore_op_kind;

typedef struct kvstore_op {
    kvstore_op_kind kind;
    kvstore_key key;
    void *buf;  /* put: the value (read only); get: where the value goes */
    size_t len; /* put: value bytes; get: capacity of buf */
    /* filled in when the batch completes */
    kvstore_result result;
    kvstore_tier tier; /* the tier that answered */
    size_t value_len;  /* get: bytes of the value (on OK and TOOSMALL) */
} kvstore_op;

/* Called once, on the worker thread, when every op of the batch has its
 * result. It must not block or call kvstore_batch_wait. */
typedef void (*kvstore_done_fn)(kvstore_batch *b, kvstore_op *ops, size_t n, void *arg);

/*
 * Queues ops[0..n) and returns at once. ops and the buffers they name belong
 * to the store until the batch is done. With out != NULL the caller gets a
 * handle to poll or wait on and must kvstore_batch_release it; with out ==
 * NULL the batch frees itself after done runs. EKV_EBUSY when max_batches
 * batches are already unfinished (nothing is queued then).
 */
ekv_status kvstore_client_submit(kvstore_client *c, kvstore_op *ops, size_t n,
                                 kvstore_done_fn done, void *arg, kvstore_batch **out,
                                 ekv_error *err);
bool kvstore_batch_done(const kvstore_batch *b);
/* EKV_OK once done; EKV_EBUSY if still running after timeout_ms (< 0: wait
 * until done, which the op timeouts bound). */
ekv_status kvstore_batch_wait(kvstore_batch *b, int timeout_ms);
/* Waits for the batch if needed, then frees the handle. NULL is a no-op. */
void kvstore_batch_release(kvstore_batch *b);
/* Gives the handle back without waiting: freed now if the batch is done,
 * else by the store once its done callback has run (that callback must
 * then free what the ops point into). For a caller that must not block,
 * such as the engine dropping a cancelled request's restore. */
void kvstore_batch_abandon(kvstore_batch *b);

/* Synchronous one-op helpers (submit + wait). */
kvstore_result kvstore_client_put(kvstore_client *c, const kvstore_key *key, const void *val,
                                  size_t len);
kvstore_result kvstore_client_get(kvstore_client *c, const kvstore_key *key, void *buf,
                                  size_t cap, size_t *value_len);

const kvstore_metrics *kvstore_client_metrics(const kvstore_client *c);
/* The peer index that owns key on the ring (-1: no peers), and whether that
 * peer is connected now. */
int kvstore_client_peer_of(const kvstore_client *c, const kvstore_key *key);
bool kvstore_client_peer_up(const kvstore_client *c, int peer);

/* Reads a shared auth token (or a namespace key) from a file (trailing
 * whitespace dropped; 1 to 4096 bytes). *token is malloc'd; the caller
 * wipes and frees it. */
ekv_status kvstore_token_load(const char *path, uint8_t **token, size_t *len, ekv_error *err);

/* ---- the daemon ---- */

typedef struct kvstore_daemon kvstore_daemon;

typedef struct kvstore_daemon_config {
    const char *listen;         /* "host:port"; port 0 picks a free one */
    uint64_t capacity;          /* bytes */
    const uint8_t *auth_token;  /* shared secret, required */
    size_t auth_token_len;
    const char *const *peers;   /* the other daemons of the ring, logged and advertised */
    int n_peers;
    int auth_timeout_ms;        /* a connection must authenticate within this; 2000 */
    int max_conns;              /* further connections are refused; 256 */
    kvstore_log_fn log;
    void *log_arg;
} kvstore_daemon_config;

void kvstore_daemon_config_default(kvstore_daemon_config *cfg);
/* Creates the store and binds the listener. */
kvstore_daemon *kvstore_daemon_create(const kvstore_daemon_config *cfg, ekv_error *err);
/* The port actually bound (useful with port 0). */
int kvstore_daemon_port(const kvstore_daemon *d);
/* Serves on the calling thread until kvstore_daemon_stop, then closes every
 * connection. */
ekv_status kvstore_daemon_run(kvstore_daemon *d, ekv_error *err);
/* Async-signal-safe: asks run to return within ~100 ms. */
void kvstore_daemon_stop(kvstore_daemon *d);
void kvstore_daemon_destroy(kvstore_daemon *d);
kvstore_local *kvstore_daemon_store(kvstore_daemon *d);
const kvstore_metrics *kvstore_daemon_metrics(const kvstore_daemon *d);

#endif
