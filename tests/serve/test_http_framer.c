/*
 * test_http_framer.c - the HTTP front's framer (coordinator/http_front.c)
 * against RFC 9112: which request heads pass and which are refused and why
 * (sections 2.2, 5, 6.1-6.3, 7.1), and that a body - Content-Length bytes,
 * or chunks, the last chunk and trailers - is passed whole and the next
 * head checked after it. Every stream is fed whole, then one byte at a
 * time, then in 7-byte pieces: the framer must give the same bytes and the
 * same verdict however the reads fall.
 */
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "http_internal.h"

typedef struct verdict {
    int error;
    size_t out_len;
    uint64_t requests;
} verdict;

/* Feeds in[0..n) in pieces of step bytes (0: whole); out gets what passed. */
static verdict feed(const char *in, size_t n, size_t step, uint8_t *out)
{
    http_framer *f = calloc(1, sizeof *f);
    verdict v = {0};
    for (size_t i = 0; i < n && !f->error;) {
        size_t k = step && n - i > step ? step : n - i;
        size_t took = http_framer_feed(f, (const uint8_t *)in + i, k, out, &v.out_len);
        CHECK(took == k || f->error);
        i += took;
    }
    v.error = f->error;
    v.requests = f->requests;
    free(f);
    return v;
}

/* in passes: out is want (in, less leading empty lines), nreq heads. */
static void passes(const char *in, size_t n, const char *want, size_t want_n, uint64_t nreq)
{
    static const size_t steps[] = {0, 1, 7};
    uint8_t *out = malloc(n + (64u << 10));
    for (int s = 0; s < 3; s++) {
        verdict v = feed(in, n, steps[s], out);
        CHECK_EQ_INT(v.error, FRONT_OK);
        CHECK_EQ_INT(v.requests, nreq);
        CHECK_EQ_INT(v.out_len, want_n);
        CHECK(v.out_len == want_n && !memcmp(out, want, want_n));
        if (v.error || v.out_len != want_n)
            fprintf(stderr, "  step %zu: %.60s\n", steps[s], in);
    }
    free(out);
}

#define PASSES(s, nreq) passes(s, sizeof s - 1, s, sizeof s - 1, nreq)

/* in is refused with why; only the first ok_n bytes (earlier whole
 * requests) were passed on. */
static void refused(const char *in, size_t n, int why, size_t ok_n)
{
    static const size_t steps[] = {0, 1, 7};
    uint8_t *out = malloc(n + (64u << 10));
    for (int s = 0; s < 3; s++) {
        verdict v = feed(in, n, steps[s], out);
        CHECK_EQ_INT(v.error, why);
        CHECK(v.out_len <= ok_n + (why == FRONT_BAD_CHUNK ? n : 0));
        if (why != FRONT_BAD_CHUNK) /* heads: nothing of the bad one goes on */
            CHECK(v.out_len == ok_n && !memcmp(out, in, ok_n));
        if (v.error != why)
            fprintf(stderr, "  step %zu: %.70s\n", steps[s], in);
    }
    free(out);
}

#define REFUSED(s, why) refused(s, sizeof s - 1, why, 0)

#define POST "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
#define GET "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"

static void test_good_heads_and_bodies_pass(void)
{
    PASSES(GET, 1);
    PASSES(POST "Content-Length: 5\r\n\r\nhello" GET, 2);
    PASSES(POST "content-length:5\r\n\r\nhello", 1);         /* no OWS, any case */
    PASSES(POST "Content-Length: \t 5 \t\r\n\r\nhello", 1); /* OWS around the value */
    PASSES(POST "Content-Length: 0\r\n\r\n" GET GET, 3);
    /* chunks: an extension, upper-case hex, trailers; then the next head */
    PASSES(POST "Transfer-Encoding: Chunked\r\n\r\n"
                "5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n" GET,
           2);
    PASSES(POST "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 1);
    /* a body that looks like a head is a body */
    PASSES(POST "Content-Length: 23\r\n\r\nContent-Length: 1\r\n\r\nx" GET, 2);
    /* empty lines before a request line are dropped (RFC 9112 2.2) */
    static const char lead[] = "\r\n\r\n" GET;
    passes(lead, sizeof lead - 1, GET, sizeof GET - 1, 1);
    /* 18 digits is the most taken (no overflow): an incomplete body, no error */
    http_framer *f = calloc(1, sizeof *f);
    uint8_t *out = malloc(64u << 10);
    size_t n = 0;
    static const char big[] = POST "Content-Length: 999999999999999999\r\n\r\nab";
    http_framer_feed(f, (const uint8_t *)big, sizeof big - 1, out, &n);
    CHECK_EQ_INT(f->error, FRONT_OK);
    CHECK(f->left == 999999999999999999ull - 2);
    free(out);
    free(f);
}

static void test_ambiguous_lengths_are_refused(void)
{
    REFUSED(POST "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", FRONT_TWO_LENGTHS);
    REFUSED(POST "Content-Length: 5\r\ncontent-length: 7\r\n\r\nhello", FRONT_TWO_LENGTHS);
    REFUSED(POST "Content-Length: abc\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: 1x\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: -1\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: +5\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: 5, 5\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: 5 5\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length:\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: 0x5\r\n\r\nhello", FRONT_BAD_LENGTH);
    REFUSED(POST "Content-Length: 1234567890123456789\r\n\r\n", FRONT_BAD_LENGTH); /* 19 */
    REFUSED(POST "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            FRONT_LENGTH_AND_ENCODING);
    REFUSED(POST "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            FRONT_LENGTH_AND_ENCODING);
    REFUSED(POST "Transfer-Encoding: gzip\r\n\r\nhello", FRONT_BAD_ENCODING);
    REFUSED(POST "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", FRONT_BAD_ENCODING);
    REFUSED(POST "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            FRONT_TWO_ENCODINGS);
}

static void test_malformed_heads_are_refused(void)
{
    REFUSED(POST "X-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n", FRONT_OBS_FOLD);
    REFUSED(POST "X-A: 1\r\n\tContent-Length: 5\r\n\r\nhello", FRONT_OBS_FOLD);
    REFUSED(POST "Content-Length : 5\r\n\r\nhello", FRONT_BAD_HEADER);
    REFUSED(POST " Content-Length: 5\r\n\r\nhello", FRONT_OBS_FOLD);
    REFUSED(POST "no colon here\r\n\r\n", FRONT_BAD_HEADER);
    REFUSED(POST ": empty name\r\n\r\n", FRONT_BAD_HEADER);
    REFUSED(POST "X(A): 1\r\n\r\n", FRONT_BAD_HEADER);
    REFUSED("POST / HTTP/1.1\nContent-Length: 5\n\nhello", FRONT_BAD_LINE_END);
    REFUSED(POST "X-A: 1\r\nContent-Length: 5\n\r\nhello", FRONT_BAD_LINE_END);
    REFUSED(POST "X-A: a\rb\r\nContent-Length: 0\r\n\r\n", FRONT_BAD_LINE_END);
    static const char nul[] = POST "X-A: a\0b\r\n\r\n";
    refused(nul, sizeof nul - 1, FRONT_BAD_LINE_END, 0);
    /* a head past 32 KiB, with or without its end */
    size_t n = 40u << 10;
    char *big = malloc(n + 64);
    int k = snprintf(big, 64, "%sX-Pad: ", POST);
    memset(big + k, 'a', n - (size_t)k);
    memcpy(big + n, "\r\n\r\n", 4);
    refused(big, n + 4, FRONT_HEAD_TOO_LARGE, 0);
    free(big);
}

static void test_broken_chunks_are_refused(void)
{
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n1000000000000000\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXY0\r\n\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n0\r\n folded\r\n\r\n", FRONT_BAD_CHUNK);
    REFUSED(POST "Transfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n", FRONT_BAD_CHUNK);
}

/* Keep-alive and pipelining: the head after a good request gets the same
 * check, and nothing of it goes on. */
static void test_later_heads_are_checked_too(void)
{
    static const char a[] = GET POST "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
    refused(a, sizeof a - 1, FRONT_TWO_LENGTHS, sizeof GET - 1);
    static const char b[] = POST "Content-Length: 5\r\n\r\nhello" POST "Content-Length: x\r\n\r\n";
    refused(b, sizeof b - 1, FRONT_BAD_LENGTH, sizeof POST - 1 + 26);
    static const char c[] = POST "Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
                                 "GET / HTTP/1.1\nHost: x\n\n";
    refused(c, sizeof c - 1, FRONT_BAD_LINE_END, sizeof c - 1 - 24);
}

static void test_reasons(void)
{
    unsigned code = 0;
    CHECK(http_front_reason(FRONT_OK, &code) == NULL);
    CHECK(http_front_reason(FRONT_N_REASONS, &code) == NULL);
    CHECK(http_front_reason(-1, &code) == NULL);
    for (int i = FRONT_OK + 1; i < FRONT_N_REASONS; i++) {
        const char *m = http_front_reason(i, &code);
        CHECK(m && *m);
        CHECK_EQ_INT(code, i == FRONT_HEAD_TOO_LARGE ? 431 : 400);
    }
}

int main(void)
{
    RUN_TEST(test_good_heads_and_bodies_pass);
    RUN_TEST(test_ambiguous_lengths_are_refused);
    RUN_TEST(test_malformed_heads_are_refused);
    RUN_TEST(test_broken_chunks_are_refused);
    RUN_TEST(test_later_heads_are_checked_too);
    RUN_TEST(test_reasons);
    return TEST_EXIT();
}
