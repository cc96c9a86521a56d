/*
 * kvwire.c - encode and validate the 96-byte KV store message header.
 *
 * Every byte is read with explicit little-endian loads, never by casting
 * the buffer to a struct, so alignment and host byte order do not matter
 * and a truncated buffer is rejected before any field is read.
 */
#include "entrokv/kvwire.h"

#include <string.h>

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

void kvwire_encode(const kvwire_hdr *h, uint8_t out[KVWIRE_HEADER_BYTES])
{
    put32(out, KVWIRE_MAGIC);
    out[4] = h->version;
    out[5] = h->op;
    put16(out + 6, h->flags);
    put64(out + 8, h->request_id);
    memcpy(out + 16, h->key, KVWIRE_KEY_BYTES);
    put32(out + 48, h->payload_len);
    put16(out + 52, h->status);
    put16(out + 54, 0);
    put64(out + 56, h->checksum);
    memcpy(out + 64, h->mac, KVWIRE_MAC_BYTES);
}

const char *kvwire_op_name(uint8_t op)
{
    static const char *names[] = {"?",   "challenge", "auth", "auth_ok", "put",
                                  "get", "exists",    "del",  "direct",  "release", "commit"};
    return op <= KVWIRE_OP_MAX ? names[op] : "?";
}

/* The payload length an (op, reply, status) may carry: exactly `fixed`
 * bytes, or 1..KVWIRE_MAX_PAYLOAD when value is set. */
static ekv_status check_len(const kvwire_hdr *h, ekv_error *err)
{
    int reply = (h->flags & KVWIRE_F_REPLY) != 0;
    int value = 0;
    uint32_t fixed = 0;
    switch (h->op) {
    case KVWIRE_OP_CHALLENGE: fixed = KVWIRE_NONCE_BYTES; break;
    case KVWIRE_OP_AUTH: fixed = KVWIRE_NONCE_BYTES + KVWIRE_MAC_BYTES; break;
    case KVWIRE_OP_AUTH_OK: fixed = KVWIRE_MAC_BYTES; break;
    case KVWIRE_OP_PUT:
        if (h->flags & KVWIRE_F_DIRECT)
            fixed = !reply ? KVWIRE_LEN_BYTES : h->status == KVWIRE_ST_OK ? KVWIRE_SPAN_BYTES : 0;
        else
            value = !reply;
        break;
    case KVWIRE_OP_GET:
        if (reply && h->status == KVWIRE_ST_OK && (h->flags & KVWIRE_F_DIRECT))
            fixed = KVWIRE_SPAN_BYTES;
        else
            value = reply && h->status == KVWIRE_ST_OK;
        break;
    case KVWIRE_OP_DIRECT: fixed = reply && h->status == KVWIRE_ST_OK ? KVWIRE_DIRECT_BYTES : 0; break;
    default: break; /* EXISTS, DEL, RELEASE: header only */
    }
    if (value) {
        if (h->payload_len == 0 || h->payload_len > KVWIRE_MAX_PAYLOAD)
            return ekv_error_set(err, EKV_EFORMAT, "kvwire: %s payload length %u out of range",
                                 kvwire_op_name(h->op), h->payload_len);
        return EKV_OK;
    }
    if (h->payload_len != fixed)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: %s%s payload length %u, expected %u",
                             kvwire_op_name(h->op), reply ? " reply" : "", h->payload_len, fixed);
    return EKV_OK;
}

ekv_status kvwire_decode(const void *buf, size_t len, kvwire_hdr *h, ekv_error *err)
{
    const uint8_t *p = buf;
    if (!buf || len != KVWIRE_HEADER_BYTES)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: header is %zu bytes, expected %d", len,
                             KVWIRE_HEADER_BYTES);
    if (get32(p) != KVWIRE_MAGIC)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: bad magic 0x%08x", get32(p));
    h->version = p[4];
    h->op = p[5];
    h->flags = get16(p + 6);
    h->request_id = get64(p + 8);
    memcpy(h->key, p + 16, KVWIRE_KEY_BYTES);
    h->payload_len = get32(p + 48);
    h->status = get16(p + 52);
    h->checksum = get64(p + 56);
    memcpy(h->mac, p + 64, KVWIRE_MAC_BYTES);
    if (h->version != KVWIRE_VERSION)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: version %u, expected %u", h->version,
                             KVWIRE_VERSION);
    if (h->op < 1 || h->op > KVWIRE_OP_MAX)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: unknown op %u", h->op);
    if (h->flags & ~KVWIRE_F_KNOWN)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: unknown flags 0x%04x", h->flags);
    if (get16(p + 54) != 0)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: reserved field not zero");
    int reply = (h->flags & KVWIRE_F_REPLY) != 0;
    int auth = h->op <= KVWIRE_OP_AUTH_OK;
    if (auth && reply)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: %s cannot be a reply",
                             kvwire_op_name(h->op));
    if ((h->flags & KVWIRE_F_DIRECT) && h->op != KVWIRE_OP_GET && h->op != KVWIRE_OP_PUT)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: direct flag on %s", kvwire_op_name(h->op));
    if (h->op == KVWIRE_OP_RELEASE && reply)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: release has no reply");
    if (h->status >= KVWIRE_ST_COUNT || (!reply && h->status != KVWIRE_ST_OK))
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: status %u not allowed on %s%s",
                             h->status, kvwire_op_name(h->op), reply ? " reply" : "");
    return check_len(h, err);
}

ekv_status kvwire_check_payload(const kvwire_hdr *h, size_t data_len, ekv_error *err)
{
    if (data_len != h->payload_len)
        return ekv_error_set(err, EKV_EFORMAT, "kvwire: %s carries %zu bytes, header says %u",
                             kvwire_op_name(h->op), data_len, h->payload_len);
    return EKV_OK;
}

void kvwire_direct_encode(const kvwire_direct *d, uint8_t out[KVWIRE_DIRECT_BYTES])
{
    put32(out, d->pid);
    put32(out + 4, (uint32_t)d->fd);
    put64(out + 8, d->region_bytes);
    put64(out + 16, d->id_offset);
    memcpy(out + 24, d->id, KVWIRE_ID_BYTES);
}

void kvwire_direct_decode(const uint8_t in[KVWIRE_DIRECT_BYTES], kvwire_direct *d)
{
    d->pid = get32(in);
    d->fd = (int32_t)get32(in + 4);
    d->region_bytes = get64(in + 8);
    d->id_offset = get64(in + 16);
    memcpy(d->id, in + 24, KVWIRE_ID_BYTES);
}

void kvwire_span_encode(const kvwire_span *s, uint8_t out[KVWIRE_SPAN_BYTES])
{
    put64(out, s->offset);
    put64(out + 8, s->len);
}

void kvwire_span_decode(const uint8_t in[KVWIRE_SPAN_BYTES], kvwire_span *s)
{
    s->offset = get64(in);
    s->len = get64(in + 8);
}

void kvwire_len_encode(uint64_t len, uint8_t out[KVWIRE_LEN_BYTES])
{
    put64(out, len);
}

uint64_t kvwire_len_decode(const uint8_t in[KVWIRE_LEN_BYTES])
{
    return get64(in);
}
