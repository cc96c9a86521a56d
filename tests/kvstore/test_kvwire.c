/*
 * test_kvwire.c - the KV store wire header: byte layout, round trips for
 * every op, and rejection of every truncation, every bad field and every
 * payload length an op does not allow.
 */
#include <stdbool.h>
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kvwire.h"

static kvwire_hdr make(uint8_t op, uint16_t flags, uint32_t len, uint16_t status)
{
    kvwire_hdr h = {.version = KVWIRE_VERSION, .op = op, .flags = flags,
                    .request_id = 0x1122334455667788ull, .payload_len = len, .status = status,
                    .checksum = 0xa1b2c3d4e5f60718ull};
    for (int i = 0; i < KVWIRE_KEY_BYTES; i++)
        h.key[i] = (uint8_t)(0xc0 + i);
    for (int i = 0; i < KVWIRE_MAC_BYTES; i++)
        h.mac[i] = (uint8_t)(0x40 + i);
    return h;
}

static bool decodes(const kvwire_hdr *h)
{
    uint8_t b[KVWIRE_HEADER_BYTES];
    kvwire_hdr out;
    kvwire_encode(h, b);
    return kvwire_decode(b, sizeof b, &out, NULL) == EKV_OK;
}

static void test_kvwire_layout_is_little_endian_fixed(void)
{
    kvwire_hdr h = make(KVWIRE_OP_PUT, 0, 0x01020304, 0);
    uint8_t b[KVWIRE_HEADER_BYTES];
    kvwire_encode(&h, b);
    CHECK(!memcmp(b, "EKVS", 4));
    CHECK_EQ_INT(b[4], KVWIRE_VERSION);
    CHECK_EQ_INT(b[5], KVWIRE_OP_PUT);
    CHECK_EQ_INT(b[8], 0x88);
    CHECK_EQ_INT(b[15], 0x11);
    CHECK_EQ_INT(b[16], 0xc0);
    CHECK_EQ_INT(b[47], 0xc0 + 31);
    CHECK_EQ_INT(b[48], 0x04);
    CHECK_EQ_INT(b[51], 0x01);
    CHECK_EQ_INT(b[54] | b[55], 0);
    CHECK_EQ_INT(b[56], 0x18);
    CHECK_EQ_INT(b[63], 0xa1);
    CHECK_EQ_INT(KVWIRE_HEADER_BYTES, 96);
    CHECK_EQ_INT(b[64], 0x40); /* the value's MAC, as is */
    CHECK_EQ_INT(b[95], 0x40 + 31);
}

static void test_kvwire_round_trips_every_op(void)
{
    kvwire_hdr cases[] = {
        make(KVWIRE_OP_CHALLENGE, 0, KVWIRE_NONCE_BYTES, 0),
        make(KVWIRE_OP_AUTH, 0, KVWIRE_NONCE_BYTES + KVWIRE_MAC_BYTES, 0),
        make(KVWIRE_OP_AUTH_OK, 0, KVWIRE_MAC_BYTES, 0),
        make(KVWIRE_OP_PUT, 0, 16384, 0),
        make(KVWIRE_OP_PUT, 0, KVWIRE_MAX_PAYLOAD, 0),
        make(KVWIRE_OP_PUT, KVWIRE_F_REPLY, 0, KVWIRE_ST_NOSPACE),
        make(KVWIRE_OP_GET, 0, 0, 0),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY, 1, KVWIRE_ST_OK),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY, 0, KVWIRE_ST_MISS),
        make(KVWIRE_OP_EXISTS, 0, 0, 0),
        make(KVWIRE_OP_EXISTS, KVWIRE_F_REPLY, 0, KVWIRE_ST_OK),
        make(KVWIRE_OP_DEL, KVWIRE_F_REPLY, 0, KVWIRE_ST_ERROR),
        make(KVWIRE_OP_GET, KVWIRE_F_DIRECT, 0, 0),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, KVWIRE_SPAN_BYTES, KVWIRE_ST_OK),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, 0, KVWIRE_ST_MISS),
        make(KVWIRE_OP_DIRECT, 0, 0, 0),
        make(KVWIRE_OP_DIRECT, KVWIRE_F_REPLY, KVWIRE_DIRECT_BYTES, KVWIRE_ST_OK),
        make(KVWIRE_OP_DIRECT, KVWIRE_F_REPLY, 0, KVWIRE_ST_ERROR),
        make(KVWIRE_OP_RELEASE, 0, 0, 0),
        make(KVWIRE_OP_PUT, KVWIRE_F_DIRECT, KVWIRE_LEN_BYTES, 0),
        make(KVWIRE_OP_PUT, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, KVWIRE_SPAN_BYTES, KVWIRE_ST_OK),
        make(KVWIRE_OP_PUT, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, 0, KVWIRE_ST_NOSPACE),
        make(KVWIRE_OP_COMMIT, 0, 0, 0),
        make(KVWIRE_OP_COMMIT, KVWIRE_F_REPLY, 0, KVWIRE_ST_ERROR),
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t b[KVWIRE_HEADER_BYTES];
        kvwire_hdr out;
        kvwire_encode(&cases[i], b);
        ekv_error err = {0};
        CHECK_EQ_INT(kvwire_decode(b, sizeof b, &out, &err), EKV_OK);
        CHECK(!memcmp(&out.key, cases[i].key, KVWIRE_KEY_BYTES));
        CHECK_EQ_INT(out.op, cases[i].op);
        CHECK_EQ_INT(out.flags, cases[i].flags);
        CHECK(out.request_id == cases[i].request_id);
        CHECK_EQ_INT(out.payload_len, cases[i].payload_len);
        CHECK_EQ_INT(out.status, cases[i].status);
        CHECK(out.checksum == cases[i].checksum);
        CHECK(!memcmp(out.mac, cases[i].mac, KVWIRE_MAC_BYTES));
        CHECK_EQ_INT(kvwire_check_payload(&out, cases[i].payload_len, NULL), EKV_OK);
    }
}

static void test_kvwire_rejects_every_truncation_and_overlong(void)
{
    kvwire_hdr h = make(KVWIRE_OP_GET, 0, 0, 0), out;
    uint8_t b[KVWIRE_HEADER_BYTES + 1] = {0};
    kvwire_encode(&h, b);
    for (size_t len = 0; len < KVWIRE_HEADER_BYTES; len++) {
        /* a truncated copy on the heap, so ASan sees any read past it */
        uint8_t *t = malloc(len ? len : 1);
        memcpy(t, b, len);
        ekv_error err = {0};
        CHECK_EQ_INT(kvwire_decode(t, len, &out, &err), EKV_EFORMAT);
        CHECK(strstr(err.msg, "header is") != NULL);
        free(t);
    }
    CHECK_EQ_INT(kvwire_decode(b, sizeof b, &out, NULL), EKV_EFORMAT);
    CHECK_EQ_INT(kvwire_decode(NULL, KVWIRE_HEADER_BYTES, &out, NULL), EKV_EFORMAT);
}

static void test_kvwire_rejects_bad_fields(void)
{
    kvwire_hdr h = make(KVWIRE_OP_GET, 0, 0, 0), out;
    uint8_t good[KVWIRE_HEADER_BYTES], b[KVWIRE_HEADER_BYTES];
    kvwire_encode(&h, good);
    struct { int off; uint8_t val; const char *why; } bad[] = {
        {0, 'X', "magic"}, {3, 0, "magic"}, {4, 0, "version"}, {4, 1, "version"}, {4, 3, "version"},
        {5, 0, "op"}, {5, KVWIRE_OP_MAX + 1, "op"}, {5, 255, "op"},
        {6, 0x04, "flags"}, {7, 0x80, "flags"}, {54, 1, "reserved"}, {55, 1, "reserved"},
        {52, 1, "status"}, /* status on a request */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memcpy(b, good, sizeof b);
        b[bad[i].off] = bad[i].val;
        ekv_error err = {0};
        CHECK_EQ_INT(kvwire_decode(b, sizeof b, &out, &err), EKV_EFORMAT);
        if (!strstr(err.msg, bad[i].why))
            fprintf(stderr, "  offset %d: message '%s' does not name %s\n", bad[i].off, err.msg,
                    bad[i].why);
        CHECK(strstr(err.msg, bad[i].why) != NULL);
    }
    kvwire_hdr r = make(KVWIRE_OP_GET, KVWIRE_F_REPLY, 0, KVWIRE_ST_COUNT);
    CHECK(!decodes(&r));
    r = make(KVWIRE_OP_AUTH, KVWIRE_F_REPLY, 64, 0);
    CHECK(!decodes(&r));
    r = make(KVWIRE_OP_EXISTS, KVWIRE_F_DIRECT, 0, 0); /* direct is for gets and puts */
    CHECK(!decodes(&r));
    r = make(KVWIRE_OP_RELEASE, KVWIRE_F_REPLY, 0, 0); /* release has no reply */
    CHECK(!decodes(&r));
}

static void test_kvwire_direct_and_span_round_trip(void)
{
    kvwire_direct d = {.pid = 0x01020304, .fd = -7, .region_bytes = 0x1122334455667788ull,
                       .id_offset = 4096}, d2;
    for (int i = 0; i < KVWIRE_ID_BYTES; i++)
        d.id[i] = (uint8_t)(i * 3 + 1);
    uint8_t b[KVWIRE_DIRECT_BYTES];
    kvwire_direct_encode(&d, b);
    CHECK_EQ_INT(b[0], 0x04); /* little-endian */
    kvwire_direct_decode(b, &d2);
    CHECK(d2.pid == d.pid && d2.fd == d.fd && d2.region_bytes == d.region_bytes &&
          d2.id_offset == d.id_offset && !memcmp(d2.id, d.id, KVWIRE_ID_BYTES));
    kvwire_span s = {.offset = 1ull << 40, .len = 12345}, s2;
    uint8_t sb[KVWIRE_SPAN_BYTES];
    kvwire_span_encode(&s, sb);
    kvwire_span_decode(sb, &s2);
    CHECK(s2.offset == s.offset && s2.len == s.len);
    uint8_t lb[KVWIRE_LEN_BYTES];
    kvwire_len_encode(0x0102030405060708ull, lb);
    CHECK_EQ_INT(lb[0], 0x08);
    CHECK(kvwire_len_decode(lb) == 0x0102030405060708ull);
}

static void test_kvwire_rejects_bad_lengths(void)
{
    kvwire_hdr bad[] = {
        make(KVWIRE_OP_CHALLENGE, 0, KVWIRE_NONCE_BYTES - 1, 0),
        make(KVWIRE_OP_CHALLENGE, 0, KVWIRE_NONCE_BYTES + 1, 0),
        make(KVWIRE_OP_AUTH, 0, 63, 0),
        make(KVWIRE_OP_AUTH, 0, 0xffffffffu, 0),
        make(KVWIRE_OP_AUTH_OK, 0, 0, 0),
        make(KVWIRE_OP_PUT, 0, 0, 0),
        make(KVWIRE_OP_PUT, 0, KVWIRE_MAX_PAYLOAD + 1, 0),
        make(KVWIRE_OP_PUT, 0, 0xffffffffu, 0),
        make(KVWIRE_OP_PUT, KVWIRE_F_REPLY, 1, KVWIRE_ST_OK),
        make(KVWIRE_OP_GET, 0, 1, 0),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY, 0, KVWIRE_ST_OK),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, 1000, KVWIRE_ST_OK),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, KVWIRE_SPAN_BYTES, KVWIRE_ST_MISS),
        make(KVWIRE_OP_DIRECT, 0, 1, 0),
        make(KVWIRE_OP_DIRECT, KVWIRE_F_REPLY, KVWIRE_DIRECT_BYTES - 1, KVWIRE_ST_OK),
        make(KVWIRE_OP_RELEASE, 0, 1, 0),
        make(KVWIRE_OP_PUT, KVWIRE_F_DIRECT, 1000, 0), /* a direct put carries no value */
        make(KVWIRE_OP_PUT, KVWIRE_F_REPLY | KVWIRE_F_DIRECT, 0, KVWIRE_ST_OK),
        make(KVWIRE_OP_COMMIT, 0, 8, 0),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY, 5, KVWIRE_ST_MISS),
        make(KVWIRE_OP_GET, KVWIRE_F_REPLY, KVWIRE_MAX_PAYLOAD + 1, KVWIRE_ST_OK),
        make(KVWIRE_OP_EXISTS, 0, 1, 0),
        make(KVWIRE_OP_DEL, KVWIRE_F_REPLY, 8, KVWIRE_ST_OK),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (decodes(&bad[i]))
            fprintf(stderr, "  case %zu decoded\n", i);
        CHECK(!decodes(&bad[i]));
    }
}

static void test_kvwire_payload_must_match_header(void)
{
    kvwire_hdr h = make(KVWIRE_OP_PUT, 0, 4096, 0);
    CHECK_EQ_INT(kvwire_check_payload(&h, 4096, NULL), EKV_OK);
    CHECK_EQ_INT(kvwire_check_payload(&h, 4095, NULL), EKV_EFORMAT);
    CHECK_EQ_INT(kvwire_check_payload(&h, 4097, NULL), EKV_EFORMAT);
    CHECK_EQ_INT(kvwire_check_payload(&h, 0, NULL), EKV_EFORMAT);
}

int main(void)
{
    RUN_TEST(test_kvwire_layout_is_little_endian_fixed);
    RUN_TEST(test_kvwire_round_trips_every_op);
    RUN_TEST(test_kvwire_rejects_every_truncation_and_overlong);
    RUN_TEST(test_kvwire_rejects_bad_fields);
    RUN_TEST(test_kvwire_direct_and_span_round_trip);
    RUN_TEST(test_kvwire_rejects_bad_lengths);
    RUN_TEST(test_kvwire_payload_must_match_header);
    return TEST_EXIT();
}
