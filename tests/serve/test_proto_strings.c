/*
 * test_proto_strings.c - proto_strings_valid (coordinator/proto_strings.c)
 * on GenerateRequest bytes written by hand from the protobuf encoding
 * rules (key = field << 3 | wire type; wire type 2 = varint length, then
 * the bytes), not by protobuf-c: a NUL or invalid UTF-8 in a string field,
 * at the top level or inside a nested Message, is refused with the field's
 * name; the same bytes in unknown fields and valid strings pass; bytes cut
 * short are refused.
 */
#include <string.h>

#include "ekv_test.h"
#include "entrokv/proto/entrokv.pb-c.h"
#include "proto_strings.h"

static const ProtobufCMessageDescriptor *GEN = &entrokv__v1__generate_request__descriptor;

static bool check(const void *wire, size_t n, const char *want_why)
{
    char why[160];
    bool ok = proto_strings_valid(GEN, wire, n, why, sizeof why);
    if (want_why) {
        CHECK(!ok);
        CHECK(strstr(why, want_why) != NULL);
        if (!strstr(why, want_why))
            fprintf(stderr, "  why: '%s', wanted '%s'\n", why, want_why);
    } else {
        CHECK(ok);
        if (!ok)
            fprintf(stderr, "  refused: %s\n", why);
    }
    return ok;
}

static void test_valid_strings_pass(void)
{
    /* prompt = "Hi é" (c3 a9), max_tokens (3, varint) = 300, stop (10) = "x" */
    static const unsigned char w[] = {0x0a, 5,    'H', 'i', ' ',  0xc3, 0xa9, 0x18,
                                      0xac, 0x02, 0x52, 1,  'x'};
    check(w, sizeof w, NULL);
    check(w, 0, NULL); /* the empty message */
    /* messages (2) = {role (1) "user", content (2) "ok"} */
    static const unsigned char m[] = {0x12, 10, 0x0a, 4, 'u', 's', 'e', 'r', 0x12, 2, 'o', 'k'};
    check(m, sizeof m, NULL);
}

static void test_nul_is_refused(void)
{
    static const unsigned char w[] = {0x0a, 3, 'H', 0, 'i'};
    check(w, sizeof w, "field 'prompt' contains a NUL byte");
    static const unsigned char stop[] = {0x0a, 1, 'H', 0x52, 2, 'x', 0};
    check(stop, sizeof stop, "field 'stop' contains a NUL");
    /* inside a nested Message's content */
    static const unsigned char m[] = {0x12, 11, 0x0a, 4, 'u', 's', 'e', 'r', 0x12, 3, 'o', 0, 'k'};
    check(m, sizeof m, "field 'content' contains a NUL");
}

static void test_invalid_utf8_is_refused(void)
{
    static const unsigned char lone[] = {0x0a, 2, 'H', 0x80}; /* a continuation byte alone */
    check(lone, sizeof lone, "field 'prompt' is not valid UTF-8");
    static const unsigned char overlong[] = {0x0a, 2, 0xc0, 0xaf};
    check(overlong, sizeof overlong, "not valid UTF-8");
    static const unsigned char surrogate[] = {0x12, 7, 0x0a, 1, 'u', 0x12, 2, 0xed, 0xa0};
    check(surrogate, sizeof surrogate, "field 'content' is not valid UTF-8");
}

static void test_unknown_fields_are_not_strings(void)
{
    /* field 999 (wire type 2) holding a NUL and a lone 0x80, then a valid prompt */
    static const unsigned char w[] = {0xba, 0x3e, 3, 0, 0x80, 'z', 0x0a, 1, 'H'};
    check(w, sizeof w, NULL);
    /* fixed32 (field 7 is a float: top_p) and fixed64 (field 900) pass whole */
    static const unsigned char f[] = {0x3d, 0, 0, 0x80, 0x3f, 0xa1, 0x38, 1, 2, 3, 4, 5, 6, 7, 8};
    check(f, sizeof f, NULL);
}

static void test_cut_short_is_refused(void)
{
    static const unsigned char len[] = {0x0a, 5, 'H', 'i'};
    check(len, sizeof len, "cut short");
    static const unsigned char varint[] = {0x18, 0xac};
    check(varint, sizeof varint, "cut short");
    static const unsigned char fixed[] = {0x3d, 0, 0};
    check(fixed, sizeof fixed, "cut short");
    static const unsigned char group[] = {0x0b};
    check(group, sizeof group, "not proto3");
}

int main(void)
{
    RUN_TEST(test_valid_strings_pass);
    RUN_TEST(test_nul_is_refused);
    RUN_TEST(test_invalid_utf8_is_refused);
    RUN_TEST(test_unknown_fields_are_not_strings);
    RUN_TEST(test_cut_short_is_refused);
    return TEST_EXIT();
}
