/*
 * test_stopper.c - the stop-string matcher against a whole-text reference
 * under arbitrary splits of the text into feeds.
 */
#include "ekv_test.h"

#include "entrokv/stopper.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static uint64_t test_rng = 88172645463325252ULL;
static uint64_t test_next(void)
{
    test_rng ^= test_rng << 13;
    test_rng ^= test_rng >> 7;
    test_rng ^= test_rng << 17;
    return test_rng;
}


typedef struct stream {
    char text[4096];
    size_t len;
    bool stopped;
} stream;

static ekv_stopper *make_stopper(const char *const *stops, size_t n)
{
    ekv_error err = {0};
    ekv_stopper *s = stopper_create(stops, n, &err);
    if (!s)
        fprintf(stderr, "stopper_create: %s\n", err.msg);
    return s;
}

/* Feeds piece, appends the output to st, and returns the bytes emitted. */
static size_t feed(ekv_stopper *s, stream *st, const char *piece, size_t len)
{
    char out[EKV_STOPPER_HOLD_MAX + 512];
    size_t n = 0;
    bool stopped = false;
    ekv_error err = {0};
    CHECK_EQ_INT(stopper_feed(s, piece, len, out, sizeof out, &n, &stopped, &err), EKV_OK);
    if (st->len + n >= sizeof st->text) {
        CHECK(st->len + n < sizeof st->text);
        return 0;
    }
    memcpy(st->text + st->len, out, n);
    st->len += n;
    st->text[st->len] = '\0';
    st->stopped = stopped;
    return n;
}

static void feed_str(ekv_stopper *s, stream *st, const char *piece)
{
    feed(s, st, piece, strlen(piece));
}

static void flush(ekv_stopper *s, stream *st)
{
    char out[EKV_STOPPER_HOLD_MAX];
    size_t n = 0;
    CHECK_EQ_INT(stopper_flush(s, out, sizeof out, &n, NULL), EKV_OK);
    memcpy(st->text + st->len, out, n);
    st->len += n;
    st->text[st->len] = '\0';
}

static void test_stopper_stop_split_across_feeds(void)
{
    const char *stops[] = {"</s>"};
    ekv_stopper *s = make_stopper(stops, 1);
    stream st = {0};
    feed_str(s, &st, "Hello <");
    CHECK_STR(st.text, "Hello ");
    feed_str(s, &st, "/");
    feed_str(s, &st, "s");
    CHECK(!st.stopped);
    CHECK_STR(st.text, "Hello ");
    feed_str(s, &st, "> and more");
    CHECK(st.stopped);
    CHECK_STR(st.text, "Hello ");
    /* stopped stays stopped; nothing more comes out */
    CHECK_EQ_INT(feed(s, &st, "x", 1), 0);
    CHECK(st.stopped);
    flush(s, &st);
    CHECK_STR(st.text, "Hello ");
    stopper_free(s);
}

static void test_stopper_failed_partial_match_is_emitted_exactly(void)
{
    const char *stops[] = {"</s>"};
    ekv_stopper *s = make_stopper(stops, 1);
    stream st = {0};
    feed_str(s, &st, "a </");
    CHECK_STR(st.text, "a ");
    feed_str(s, &st, "x b <");
    CHECK_STR(st.text, "a </x b ");
    feed_str(s, &st, "<");
    CHECK_STR(st.text, "a </x b <");
    flush(s, &st);
    CHECK(!st.stopped);
    CHECK_STR(st.text, "a </x b <<");
    stopper_free(s);
}

static void test_stopper_multiple_stop_strings(void)
{
    const char *stops[] = {"STOP", "END", "\n\n"};
    ekv_stopper *s = make_stopper(stops, 3);
    stream st = {0};
    feed_str(s, &st, "abc EN");
    feed_str(s, &st, "D def STOP");
    CHECK(st.stopped);
    CHECK_STR(st.text, "abc ");
    stopper_free(s);

    s = make_stopper(stops, 3);
    memset(&st, 0, sizeof st);
    feed_str(s, &st, "line\n");
    feed_str(s, &st, "\nSTOP");
    CHECK(st.stopped);
    CHECK_STR(st.text, "line");
    stopper_free(s);
}

/* The first stop string to appear wins, however the text is split: "bc" is
 * complete before "abcd" is. Among ones ending on the same byte, the longest
 * is cut. */
static void test_stopper_earliest_appearance_wins(void)
{
    const char *stops[] = {"abcd", "bc"};
    ekv_stopper *s = make_stopper(stops, 2);
    stream st = {0};
    feed_str(s, &st, "xabcd");
    CHECK(st.stopped);
    CHECK_STR(st.text, "xa");
    stopper_free(s);

    const char *nested[] = {"cd", "bcd"};
    s = make_stopper(nested, 2);
    memset(&st, 0, sizeof st);
    feed_str(s, &st, "ab");
    feed_str(s, &st, "cd");
    CHECK(st.stopped);
    CHECK_STR(st.text, "a");
    stopper_free(s);
}

static void test_stopper_stop_at_first_byte(void)
{
    const char *stops[] = {"X"};
    ekv_stopper *s = make_stopper(stops, 1);
    stream st = {0};
    CHECK_EQ_INT(feed(s, &st, "Xabc", 4), 0);
    CHECK(st.stopped);
    CHECK_EQ_INT(st.len, 0);
    stopper_free(s);
}

static void test_stopper_flush_emits_held_tail(void)
{
    const char *stops[] = {"###"};
    ekv_stopper *s = make_stopper(stops, 1);
    stream st = {0};
    feed_str(s, &st, "done ##");
    CHECK_STR(st.text, "done ");
    flush(s, &st);
    CHECK_STR(st.text, "done ##");
    CHECK(!st.stopped);
    /* finished: more text is ignored, a second flush is empty */
    CHECK_EQ_INT(feed(s, &st, "#", 1), 0);
    flush(s, &st);
    CHECK_STR(st.text, "done ##");
    stopper_free(s);
}

static void test_stopper_without_stops_passes_text_through(void)
{
    ekv_stopper *s = make_stopper(NULL, 0);
    stream st = {0};
    feed_str(s, &st, "plain ");
    CHECK_STR(st.text, "plain ");
    feed(s, &st, "\xC3", 1); /* first byte of 'é': held */
    CHECK_STR(st.text, "plain ");
    feed(s, &st, "\xA9!", 2);
    CHECK_STR(st.text, "plain \xC3\xA9!");
    stopper_free(s);
}

/* True if out[0..n) ends on a character boundary of text (which is valid UTF-8). */
static bool on_char_boundary(const char *text, size_t text_len, size_t n)
{
    return n == text_len || ((unsigned char)text[n] & 0xC0) != 0x80;
}

static void test_stopper_never_splits_utf8_characters(void)
{
    /* "wö" + "r" partially matches "wörk" and fails; the held bytes include a
     * two-byte character, and every split point of the text is tried. */
    const char *text = "h\xC3\xA9llo w\xC3\xB6rld \xE2\x9C\x93 \xF0\x9D\x84\x9E w\xC3\xB3 end";
    const char *stops[] = {"w\xC3\xB6rk", "\xE2\x9C\x94"}; /* U+2714 shares 2 bytes with U+2713 */
    size_t len = strlen(text);
    ekv_stopper *s = make_stopper(stops, 2);
    stream st = {0};
    for (size_t i = 0; i < len; i++) {
        feed(s, &st, text + i, 1);
        CHECK(on_char_boundary(text, len, st.len));
    }
    flush(s, &st);
    CHECK(!st.stopped);
    CHECK_EQ_INT(st.len, len);
    CHECK(memcmp(st.text, text, len) == 0);
    stopper_free(s);
}

static void test_stopper_multibyte_stop_string(void)
{
    const char *text = "caf\xC3\xA9 \xE2\x9C\x93 more";
    const char *stops[] = {"\xE2\x9C\x93"};
    ekv_stopper *s = make_stopper(stops, 1);
    stream st = {0};
    for (size_t i = 0; i < strlen(text) && !st.stopped; i++)
        feed(s, &st, text + i, 1);
    CHECK(st.stopped);
    CHECK_STR(st.text, "caf\xC3\xA9 ");
    stopper_free(s);
}

static void test_stopper_longest_stop_fed_byte_by_byte(void)
{
    char stop[EKV_STOPPER_MAX_LEN + 1], text[3 * EKV_STOPPER_MAX_LEN];
    for (int i = 0; i < EKV_STOPPER_MAX_LEN; i++)
        stop[i] = i == EKV_STOPPER_MAX_LEN - 1 ? 'b' : 'a';
    stop[EKV_STOPPER_MAX_LEN] = '\0';
    /* 300 'a' then 'b': the stop string is the last 256 bytes */
    size_t n = 0;
    for (int i = 0; i < 300; i++)
        text[n++] = 'a';
    text[n++] = 'b';
    const char *stops[] = {stop};
    ekv_stopper *s = make_stopper(stops, 1);
    stream st = {0};
    for (size_t i = 0; i < n; i++)
        feed(s, &st, text + i, 1);
    CHECK(st.stopped);
    CHECK_EQ_INT(st.len, 300 - (EKV_STOPPER_MAX_LEN - 1));
    stopper_free(s);
}

/* Reference: the text before the first-ending occurrence of any stop string
 * (the longest among those ending on the same byte). */
static size_t reference_cut(const char *text, size_t len, const char *const *stops, size_t n,
                            bool *stopped)
{
    for (size_t end = 1; end <= len; end++) {
        size_t best = 0;
        for (size_t j = 0; j < n; j++) {
            size_t m = strlen(stops[j]);
            if (m <= end && m > best && memcmp(text + end - m, stops[j], m) == 0)
                best = m;
        }
        if (best) {
            *stopped = true;
            return end - best;
        }
    }
    *stopped = false;
    return len;
}

static void test_stopper_random_splits_match_reference(void)
{
    /* a small alphabet (with a two-byte character) makes near misses common */
    const char *alphabet[] = {"a", "b", "c", "\xC3\xA9"};
    for (int iter = 0; iter < 3000; iter++) {
        char stop_buf[4][16];
        const char *stops[4];
        size_t n_stops = test_next() % 4;
        for (size_t j = 0; j < n_stops; j++) {
            size_t m = 0, n_sym = 1 + test_next() % 4;
            for (size_t k = 0; k < n_sym; k++) {
                const char *sym = alphabet[test_next() % 4];
                memcpy(stop_buf[j] + m, sym, strlen(sym));
                m += strlen(sym);
            }
            stop_buf[j][m] = '\0';
            stops[j] = stop_buf[j];
        }
        char text[256];
        size_t len = 0, n_sym = test_next() % 60;
        for (size_t k = 0; k < n_sym; k++) {
            const char *sym = alphabet[test_next() % 4];
            memcpy(text + len, sym, strlen(sym));
            len += strlen(sym);
        }
        bool ref_stopped;
        size_t ref_len = reference_cut(text, len, stops, n_stops, &ref_stopped);

        ekv_stopper *s = make_stopper(stops, n_stops);
        stream st = {0};
        for (size_t pos = 0; pos < len && !st.stopped;) {
            size_t piece = 1 + test_next() % 5;
            piece = piece > len - pos ? len - pos : piece;
            feed(s, &st, text + pos, piece);
            if (!st.stopped)
                CHECK(on_char_boundary(text, len, st.len));
            pos += piece;
        }
        if (!st.stopped)
            flush(s, &st);
        CHECK_EQ_INT(st.stopped, ref_stopped);
        CHECK_EQ_INT(st.len, ref_len);
        CHECK(memcmp(st.text, text, ref_len) == 0);
        stopper_free(s);
        if (ekv_test_failures)
            return; /* one failing case is enough output */
    }
}

static void test_stopper_create_rejects_bad_stops(void)
{
    ekv_error err = {0};
    const char *empty[] = {"ok", ""};
    CHECK(stopper_create(empty, 2, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(strstr(err.msg, "empty") != NULL);
    const char *null_entry[] = {NULL};
    CHECK(stopper_create(null_entry, 1, &err) == NULL);
    CHECK(stopper_create(NULL, 1, &err) == NULL);

    const char *many[EKV_STOPPER_MAX_STOPS + 1];
    for (int i = 0; i <= EKV_STOPPER_MAX_STOPS; i++)
        many[i] = "x";
    CHECK(stopper_create(many, EKV_STOPPER_MAX_STOPS + 1, &err) == NULL);
    CHECK(strstr(err.msg, "16") != NULL);
    ekv_stopper *ok = stopper_create(many, EKV_STOPPER_MAX_STOPS, &err);
    CHECK(ok != NULL);
    stopper_free(ok);

    char longest[EKV_STOPPER_MAX_LEN + 2];
    memset(longest, 'z', sizeof longest - 1);
    longest[EKV_STOPPER_MAX_LEN + 1] = '\0';
    const char *too_long[] = {longest};
    CHECK(stopper_create(too_long, 1, &err) == NULL);
    CHECK(strstr(err.msg, "256") != NULL);
    longest[EKV_STOPPER_MAX_LEN] = '\0';
    ok = stopper_create(too_long, 1, &err);
    CHECK(ok != NULL);
    stopper_free(ok);
}

static void test_stopper_small_output_is_erange_and_consumes_nothing(void)
{
    const char *stops[] = {"</s>"};
    ekv_stopper *s = make_stopper(stops, 1);
    char out[64];
    size_t n = 99;
    bool stopped = true;
    ekv_error err = {0};
    CHECK_EQ_INT(stopper_feed(s, "hello </", 8, out, 4, &n, &stopped, &err), EKV_ERANGE);
    CHECK_EQ_INT(n, 0);
    CHECK(!stopped);
    stream st = {0};
    feed_str(s, &st, "hello </");
    CHECK_STR(st.text, "hello ");
    CHECK_EQ_INT(stopper_flush(s, out, 1, &n, &err), EKV_ERANGE);
    flush(s, &st);
    CHECK_STR(st.text, "hello </");
    stopper_free(s);
}

int main(void)
{
    RUN_TEST(test_stopper_stop_split_across_feeds);
    RUN_TEST(test_stopper_failed_partial_match_is_emitted_exactly);
    RUN_TEST(test_stopper_multiple_stop_strings);
    RUN_TEST(test_stopper_earliest_appearance_wins);
    RUN_TEST(test_stopper_stop_at_first_byte);
    RUN_TEST(test_stopper_flush_emits_held_tail);
    RUN_TEST(test_stopper_without_stops_passes_text_through);
    RUN_TEST(test_stopper_never_splits_utf8_characters);
    RUN_TEST(test_stopper_multibyte_stop_string);
    RUN_TEST(test_stopper_longest_stop_fed_byte_by_byte);
    RUN_TEST(test_stopper_random_splits_match_reference);
    RUN_TEST(test_stopper_create_rejects_bad_stops);
    RUN_TEST(test_stopper_small_output_is_erange_and_consumes_nothing);
    return TEST_EXIT();
}
