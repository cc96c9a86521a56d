/*
 * kvwire.h - the KV store's wire header: one fixed 96-byte, versioned,
 * little-endian header per message, carried as the UCX active message
 * header; the message's data (a block value, nonces, proofs) is the active
 * message payload. Layout (docs/kvstore.md has the full table):
 *
 *   0 magic "EKVS" | 4 version | 5 op | 6 flags | 8 request id
 *  16 key[32] | 48 payload length | 52 status | 54 reserved (0) | 56 checksum
 *  64 mac[32]: PUT and a GET reply: the value's keyed MAC, computed by the
 *     writer, stored by the daemon beside the value, checked by readers
 *
 * kvwire_decode accepts exactly one well-formed header: every field is
 * checked against the op before anything uses it (known op and flags,
 * reserved zero, status only on replies, the payload length each op allows,
 * at most KVWIRE_MAX_PAYLOAD). kvwire_check_payload then checks that the
 * data that actually arrived has the declared length. Pure functions, no
 * allocation: this is what tests/fuzz/fuzz_kvwire.c drives.
 */
#ifndef ENTROKV_KVWIRE_H
#define ENTROKV_KVWIRE_H

#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

#define KVWIRE_MAGIC 0x53564b45u /* bytes 'E' 'K' 'V' 'S' */
#define KVWIRE_VERSION 2 /* 2: the value MAC (namespaces, docs/kvstore.md) */
#define KVWIRE_HEADER_BYTES 96
#define KVWIRE_KEY_BYTES 32
#define KVWIRE_NONCE_BYTES 32
#define KVWIRE_MAC_BYTES 32
#define KVWIRE_MAX_PAYLOAD (64u << 20) /* one block value, at most 64 MiB */
#define KVWIRE_AM_ID 0x4b              /* the one UCX active message id used */

typedef enum kvwire_op {
    KVWIRE_OP_CHALLENGE = 1, /* daemon -> client: server nonce */
    KVWIRE_OP_AUTH = 2,      /* client -> daemon: client nonce || client proof */
    KVWIRE_OP_AUTH_OK = 3,   /* daemon -> client: daemon proof */
    KVWIRE_OP_PUT = 4,       /* payload: the value; checksum: its kvstore_checksum */
    KVWIRE_OP_GET = 5,       /* reply with status OK carries the value */
    KVWIRE_OP_EXISTS = 6,
    KVWIRE_OP_DEL = 7,
    KVWIRE_OP_DIRECT = 8,  /* client -> daemon on one host: may I map your values? reply
                              with status OK carries a kvwire_direct (KVWIRE_DIRECT_BYTES) */
    KVWIRE_OP_RELEASE = 9, /* client -> daemon, no reply: done reading the direct GET
                              whose request id this carries */
    KVWIRE_OP_COMMIT = 10, /* client -> daemon: the direct PUT whose request id this
                              carries is written; checksum: the value's */
    KVWIRE_OP_MAX = 10
} kvwire_op;

#define KVWIRE_F_REPLY 0x0001u  /* the answer to request_id */
#define KVWIRE_F_DIRECT 0x0002u /* GET and PUT only: the value moves through the mapped
                                   region. A direct PUT carries the value's length (8
                                   bytes), not the value; a direct reply with status OK
                                   carries a kvwire_span (KVWIRE_SPAN_BYTES): where to read
                                   the value, or where to write it and then COMMIT. The
                                   daemon refuses direct PUTs and COMMITs: clients map
                                   its region read-only (docs/kvstore.md) */
#define KVWIRE_LEN_BYTES 8
#define KVWIRE_F_KNOWN (KVWIRE_F_REPLY | KVWIRE_F_DIRECT)

/* The payload of a DIRECT reply: the daemon's pid and the descriptor of its
 * value region (opened as /proc/<pid>/fd/<fd>), the region's size, and
 * where in it the daemon wrote `id`, so the client can tell it mapped the
 * right region (pid namespaces differ between containers). */
#define KVWIRE_ID_BYTES 32
typedef struct kvwire_direct {
    uint32_t pid;
    int32_t fd;
    uint64_t region_bytes;
    uint64_t id_offset;
    uint8_t id[KVWIRE_ID_BYTES];
} kvwire_direct;
#define KVWIRE_DIRECT_BYTES (4 + 4 + 8 + 8 + KVWIRE_ID_BYTES)

/* The payload of a direct GET reply: where the value lies in the region. */
typedef struct kvwire_span {
    uint64_t offset, len;
} kvwire_span;
#define KVWIRE_SPAN_BYTES 16

typedef enum kvwire_status {
    KVWIRE_ST_OK = 0,     /* stored / found / deleted */
    KVWIRE_ST_MISS = 1,   /* no such key */
    KVWIRE_ST_BADSUM = 2, /* value failed its checksum */
    KVWIRE_ST_NOSPACE = 3, /* value larger than the store, or all of it pinned */
    KVWIRE_ST_ERROR = 4,  /* anything else the daemon could not do */
    KVWIRE_ST_COUNT = 5
} kvwire_status;

typedef struct kvwire_hdr {
    uint8_t version;
    uint8_t op;
    uint16_t flags;
    uint64_t request_id;
    uint8_t key[KVWIRE_KEY_BYTES];
    uint32_t payload_len;
    uint16_t status;
    uint64_t checksum;
    uint8_t mac[KVWIRE_MAC_BYTES]; /* PUT, GET reply: the value's (kvstore_value_mac) */
} kvwire_hdr;

/* Writes h into out[KVWIRE_HEADER_BYTES] (magic and reserved filled in). */
void kvwire_encode(const kvwire_hdr *h, uint8_t out[KVWIRE_HEADER_BYTES]);

/* Parses and validates a header of len bytes. EKV_EFORMAT (with a reason in
 * err) for anything but one well-formed header; h is then unspecified. */
ekv_status kvwire_decode(const void *buf, size_t len, kvwire_hdr *h, ekv_error *err);

/* EKV_EFORMAT unless data_len equals the header's payload length. */
ekv_status kvwire_check_payload(const kvwire_hdr *h, size_t data_len, ekv_error *err);

const char *kvwire_op_name(uint8_t op);

void kvwire_direct_encode(const kvwire_direct *d, uint8_t out[KVWIRE_DIRECT_BYTES]);
void kvwire_direct_decode(const uint8_t in[KVWIRE_DIRECT_BYTES], kvwire_direct *d);
void kvwire_span_encode(const kvwire_span *s, uint8_t out[KVWIRE_SPAN_BYTES]);
void kvwire_span_decode(const uint8_t in[KVWIRE_SPAN_BYTES], kvwire_span *s);
/* A direct PUT's payload: the value's length. */
void kvwire_len_encode(uint64_t len, uint8_t out[KVWIRE_LEN_BYTES]);
uint64_t kvwire_len_decode(const uint8_t in[KVWIRE_LEN_BYTES]);

#endif
