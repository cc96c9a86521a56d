/*
 * test_kvarena.c - the shared-memory buddy allocator: region size rounding,
 * block sizes and alignment, exhaustion and full coalescing, a randomised
 * stress against a shadow page map (no overlap, no lost space, NULL only
 * when no aligned free block of the size exists), and the memfd seen
 * through a second, read-only mapping.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../kvstore/kvarena.h"
#include "ekv_test.h"

#define KIB ((size_t)1 << 10)
#define MIB ((size_t)1 << 20)

static size_t offset_of(kvarena *a, void *p)
{
    return (size_t)((uint8_t *)p - (uint8_t *)kvarena_base(a));
}

static void test_create_rounds_up_and_alloc_splits_exhausts_and_coalesces(void)
{
    ekv_error err = {0};
    kvarena *a = kvarena_create(100 * MIB, &err);
    CHECK(a != NULL);
    if (!a)
        return;
    CHECK_EQ_INT(kvarena_size(a), 128 * MIB);
    CHECK_EQ_INT(kvarena_free_bytes(a), kvarena_size(a));
    CHECK(kvarena_fd(a) >= 0);

    size_t bb = 0;
    void *one = kvarena_alloc(a, 1, &bb);
    CHECK(one != NULL);
    CHECK_EQ_INT(bb, 4 * KIB);
    CHECK_EQ_INT(offset_of(a, one) % (4 * KIB), 0);
    CHECK_EQ_INT(kvarena_free_bytes(a), 128 * MIB - 4 * KIB);

    /* The 1-byte block split the first top block: one 64 MiB block is left,
     * and smaller ones still fit in the split top block. */
    void *big = kvarena_alloc(a, 64 * MIB, &bb);
    CHECK(big != NULL);
    CHECK_EQ_INT(bb, 64 * MIB);
    CHECK_EQ_INT(offset_of(a, big), 64 * MIB);
    CHECK(kvarena_alloc(a, 64 * MIB, NULL) == NULL);
    void *half = kvarena_alloc(a, 32 * MIB, &bb);
    CHECK(half != NULL);
    CHECK_EQ_INT(bb, 32 * MIB);
    void *mid = kvarena_alloc(a, 5 * MIB, &bb);
    CHECK(mid != NULL);
    CHECK_EQ_INT(bb, 8 * MIB);
    CHECK_EQ_INT(kvarena_free_bytes(a), 128 * MIB - 4 * KIB - 64 * MIB - 32 * MIB - 8 * MIB);

    /* Freeing the small blocks rebuilds the first top block. */
    kvarena_free(a, one);
    kvarena_free(a, half);
    kvarena_free(a, mid);
    CHECK_EQ_INT(kvarena_free_bytes(a), 64 * MIB);
    void *again = kvarena_alloc(a, 64 * MIB, NULL);
    CHECK(again != NULL);
    CHECK_EQ_INT(offset_of(a, again), 0);
    kvarena_free(a, again);
    kvarena_free(a, big);
    CHECK_EQ_INT(kvarena_free_bytes(a), kvarena_size(a));

    /* Everything whole again: 64 MiB twice, not three times, and once both
     * are taken nothing smaller fits either. */
    void *b1 = kvarena_alloc(a, 64 * MIB, NULL);
    void *b2 = kvarena_alloc(a, 64 * MIB, NULL);
    CHECK(b1 != NULL && b2 != NULL);
    if (b1 && b2)
        CHECK_EQ_INT(offset_of(a, b1) + offset_of(a, b2), 64 * MIB);
    CHECK(kvarena_alloc(a, 64 * MIB, NULL) == NULL);
    CHECK(kvarena_alloc(a, 1, NULL) == NULL);
    CHECK_EQ_INT(kvarena_free_bytes(a), 0);
    kvarena_free(a, b2);
    CHECK(kvarena_alloc(a, 64 * MIB, NULL) == b2);
    kvarena_free(a, b1);
    kvarena_free(a, b2);
    CHECK_EQ_INT(kvarena_free_bytes(a), kvarena_size(a));
    kvarena_destroy(a);
}

static void test_block_size_is_the_next_power_of_two_and_bad_sizes_are_null(void)
{
    kvarena *a = kvarena_create(1, NULL);
    CHECK(a != NULL);
    if (!a)
        return;
    CHECK_EQ_INT(kvarena_size(a), 64 * MIB);
    size_t bb = 0;
    void *p = kvarena_alloc(a, 4097, &bb);
    CHECK(p != NULL);
    CHECK_EQ_INT(bb, 8 * KIB);
    CHECK_EQ_INT(offset_of(a, p) % (8 * KIB), 0);
    void *q = kvarena_alloc(a, 4096, &bb);
    CHECK(q != NULL);
    CHECK_EQ_INT(bb, 4 * KIB);
    void *r = kvarena_alloc(a, 3 * MIB + 1, &bb);
    CHECK(r != NULL);
    CHECK_EQ_INT(bb, 4 * MIB);
    CHECK_EQ_INT(offset_of(a, r) % (4 * MIB), 0);
    bb = 12345;
    CHECK(kvarena_alloc(a, 64 * MIB + 1, &bb) == NULL);
    CHECK(kvarena_alloc(a, 0, &bb) == NULL);
    CHECK(kvarena_alloc(a, SIZE_MAX, &bb) == NULL);
    CHECK_EQ_INT(bb, 12345); /* untouched on failure */
    kvarena_free(a, p);
    kvarena_free(a, q);
    kvarena_free(a, r);
    kvarena_free(a, NULL);
    CHECK_EQ_INT(kvarena_free_bytes(a), 64 * MIB);
    void *whole = kvarena_alloc(a, 64 * MIB, &bb);
    CHECK(whole == kvarena_base(a));
    CHECK_EQ_INT(bb, 64 * MIB);
    kvarena_destroy(a);
}

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
    return *s;
}

/* Every page of a live block carries a word naming the block and the page,
 * so a block handed out twice, or overlapping another, breaks the words. */
static uint64_t tag(uint32_t id, size_t page)
{
    return ((uint64_t)id << 32 | page) * 0x9E3779B97F4A7C15ull;
}

typedef struct live_block {
    uint8_t *p;
    size_t bytes;
    uint32_t id;
} live_block;

static void fill_tags(const live_block *b)
{
    for (size_t pg = 0; pg < b->bytes / (4 * KIB); pg++) {
        uint64_t t = tag(b->id, pg);
        memcpy(b->p + pg * 4 * KIB, &t, sizeof t);
    }
    uint64_t t = ~tag(b->id, 0);
    memcpy(b->p + b->bytes - sizeof t, &t, sizeof t);
}

static int tags_intact(const live_block *b)
{
    uint64_t t;
    for (size_t pg = 0; pg < b->bytes / (4 * KIB); pg++) {
        memcpy(&t, b->p + pg * 4 * KIB, sizeof t);
        if (t != tag(b->id, pg))
            return 0;
    }
    memcpy(&t, b->p + b->bytes - sizeof t, sizeof t);
    return t == ~tag(b->id, 0);
}

/* Whether some block of `bytes`, aligned to its size, is entirely free in
 * the shadow page map: then a NULL from kvarena_alloc would be wrong. */
static int shadow_has_free_block(const uint8_t *used, size_t npages, size_t bytes)
{
    size_t span = bytes / (4 * KIB);
    for (size_t start = 0; start < npages; start += span) {
        size_t i = 0;
        while (i < span && !used[start + i])
            i++;
        if (i == span)
            return 1;
    }
    return 0;
}

static void test_random_alloc_free_never_overlaps_or_loses_space(void)
{
    kvarena *a = kvarena_create(256 * MIB, NULL);
    CHECK(a != NULL);
    if (!a)
        return;
    uint8_t *base = kvarena_base(a);
    size_t size = kvarena_size(a), npages = size / (4 * KIB);
    uint8_t *used = calloc(npages, 1); /* shadow: page belongs to a live block */
    live_block *live = calloc(npages, sizeof *live);
    size_t n_live = 0, live_bytes = 0, n_null = 0, max_live = 0;
    uint64_t rng = 0x243F6A8885A308D3ull;
    int bad = 0;

    for (uint32_t op = 1; op <= 20000 && !bad; op++) {
        if (n_live == 0 || rng_next(&rng) % 100 < 55) {
            /* 1 B to 8 MiB, uniform in log2: mostly small. */
            int bits = (int)(rng_next(&rng) % 24);
            size_t n = 1 + (size_t)(rng_next(&rng) % ((uint64_t)1 << bits));
            size_t want = 4 * KIB;
            while (want < n)
                want *= 2;
            size_t bb = 0;
            uint8_t *p = kvarena_alloc(a, n, &bb);
            if (!p) {
                n_null++;
                if (shadow_has_free_block(used, npages, want)) {
                    fprintf(stderr, "  op %u: NULL for %zu bytes with a free block\n", op, n);
                    bad = 1;
                }
            } else {
                size_t off = (size_t)(p - base);
                if (bb != want || off % bb != 0 || p < base || off + bb > size) {
                    fprintf(stderr, "  op %u: block %zu bytes at %zu for n=%zu\n", op, bb, off, n);
                    bad = 1;
                    break;
                }
                for (size_t pg = off / (4 * KIB); pg < (off + bb) / (4 * KIB); pg++) {
                    if (used[pg]) {
                        fprintf(stderr, "  op %u: page %zu handed out twice\n", op, pg);
                        bad = 1;
                    }
                    used[pg] = 1;
                }
                live[n_live] = (live_block){p, bb, op};
                fill_tags(&live[n_live++]);
                live_bytes += bb;
                if (n_live > max_live)
                    max_live = n_live;
            }
        } else {
            size_t i = (size_t)(rng_next(&rng) % n_live);
            live_block b = live[i];
            if (!tags_intact(&b)) {
                fprintf(stderr, "  op %u: block %u was overwritten\n", op, b.id);
                bad = 1;
            }
            kvarena_free(a, b.p);
            memset(used + (size_t)(b.p - base) / (4 * KIB), 0, b.bytes / (4 * KIB));
            live_bytes -= b.bytes;
            live[i] = live[--n_live];
        }
        if (kvarena_free_bytes(a) + live_bytes != size) {
            fprintf(stderr, "  op %u: free %zu + live %zu != %zu\n", op, kvarena_free_bytes(a),
                    live_bytes, size);
            bad = 1;
        }
    }
    CHECK(!bad);
    CHECK(n_null > 0); /* the arena did fill up: the NULL path was exercised */
    fprintf(stderr, "  (%zu NULLs, up to %zu live blocks)\n", n_null, max_live);

    while (n_live > 0) {
        CHECK(tags_intact(&live[n_live - 1]));
        kvarena_free(a, live[--n_live].p);
    }
    CHECK_EQ_INT(kvarena_free_bytes(a), size);
    for (int i = 0; i < 4; i++)
        CHECK(kvarena_alloc(a, 64 * MIB, NULL) != NULL);
    CHECK(kvarena_alloc(a, 1, NULL) == NULL);
    free(used);
    free(live);
    kvarena_destroy(a);
}

static void test_all_pages_taken_then_freed_in_random_order_coalesce(void)
{
    kvarena *a = kvarena_create(64 * MIB, NULL);
    CHECK(a != NULL);
    if (!a)
        return;
    size_t n = 64 * MIB / (4 * KIB);
    void **pages = malloc(n * sizeof *pages);
    size_t got = 0;
    while (got < n && (pages[got] = kvarena_alloc(a, 1, NULL)) != NULL)
        got++;
    CHECK_EQ_INT(got, n);
    CHECK(kvarena_alloc(a, 1, NULL) == NULL);
    CHECK_EQ_INT(kvarena_free_bytes(a), 0);
    uint64_t rng = 7;
    for (size_t i = got; i > 1; i--) { /* Fisher-Yates */
        size_t j = (size_t)(rng_next(&rng) % i);
        void *t = pages[i - 1];
        pages[i - 1] = pages[j];
        pages[j] = t;
    }
    for (size_t i = 0; i < got; i++)
        kvarena_free(a, pages[i]);
    CHECK_EQ_INT(kvarena_free_bytes(a), 64 * MIB);
    CHECK(kvarena_alloc(a, 64 * MIB, NULL) == kvarena_base(a));
    free(pages);
    kvarena_destroy(a);
}

static void test_fd_maps_the_same_bytes_read_only(void)
{
    kvarena *a = kvarena_create(64 * MIB, NULL);
    CHECK(a != NULL);
    if (!a)
        return;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", kvarena_fd(a));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    CHECK(fd >= 0);
    if (fd < 0) {
        kvarena_destroy(a);
        return;
    }
    const uint8_t *view = mmap(NULL, kvarena_size(a), PROT_READ, MAP_SHARED, fd, 0);
    CHECK(view != MAP_FAILED);
    if (view != MAP_FAILED) {
        uint8_t *base = kvarena_base(a);
        uint8_t *p = kvarena_alloc(a, 100, NULL);
        uint8_t *q = kvarena_alloc(a, 2 * MIB, NULL);
        CHECK(p && q);
        if (p && q) {
            memcpy(p, "hello, client", 14);
            memset(q, 0xA5, 2 * MIB);
            CHECK(!memcmp(view + (p - base), "hello, client", 14));
            CHECK(!memcmp(view + (q - base), q, 2 * MIB));
            CHECK_EQ_INT(view[q - base + 2 * MIB - 1], 0xA5);
            /* A client's mapping outlives the arena. */
            size_t p_off = (size_t)(p - base);
            kvarena_destroy(a);
            a = NULL;
            CHECK(!memcmp(view + p_off, "hello, client", 14));
        }
        munmap((void *)view, 64 * MIB);
    }
    close(fd);
    kvarena_destroy(a);
}

/* Whether kvarena_free(a, p) aborts, run in a child so the arena here is
 * untouched. */
static int free_aborts(kvarena *a, void *p)
{
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0)
            dup2(devnull, 2); /* the assertion message is expected */
        kvarena_free(a, p);
        _exit(0);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid)
        return 0;
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

static void test_free_of_a_non_block_asserts_in_debug_builds(void)
{
#ifdef NDEBUG
    fprintf(stderr, "  (skipped: NDEBUG build has no asserts)\n");
#else
    kvarena *a = kvarena_create(64 * MIB, NULL);
    CHECK(a != NULL);
    if (!a)
        return;
    /* Two pages merged back into the whole region, the upper one last: its
     * page must no longer read as a block of its own. */
    uint8_t *p0 = kvarena_alloc(a, 1, NULL), *p1 = kvarena_alloc(a, 1, NULL);
    CHECK(p0 == kvarena_base(a) && p1 == p0 + 4 * KIB);
    kvarena_free(a, p0);
    kvarena_free(a, p1);
    uint8_t *whole = kvarena_alloc(a, 64 * MIB, NULL);
    CHECK(whole == p0);
    CHECK(free_aborts(a, whole + 4 * KIB)); /* inside a block */
    CHECK(free_aborts(a, whole + 100));     /* not page-aligned */
    CHECK(free_aborts(a, whole + 64 * MIB)); /* past the end */
    kvarena_free(a, whole);
    CHECK(free_aborts(a, whole)); /* twice */
    CHECK_EQ_INT(kvarena_free_bytes(a), 64 * MIB);
    kvarena_destroy(a);
#endif
}

static void test_create_rejects_zero_and_too_large_with_a_message(void)
{
    ekv_error err = {0};
    CHECK(kvarena_create(0, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(strstr(err.msg, "kvarena") != NULL);
    memset(&err, 0, sizeof err);
    CHECK(kvarena_create(KVARENA_MAX_BYTES + 1, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(err.msg[0] != '\0');
    CHECK(kvarena_create(SIZE_MAX, NULL) == NULL);
    kvarena_destroy(NULL);
}

int main(void)
{
    RUN_TEST(test_create_rounds_up_and_alloc_splits_exhausts_and_coalesces);
    RUN_TEST(test_block_size_is_the_next_power_of_two_and_bad_sizes_are_null);
    RUN_TEST(test_random_alloc_free_never_overlaps_or_loses_space);
    RUN_TEST(test_all_pages_taken_then_freed_in_random_order_coalesce);
    RUN_TEST(test_fd_maps_the_same_bytes_read_only);
    RUN_TEST(test_free_of_a_non_block_asserts_in_debug_builds);
    RUN_TEST(test_create_rejects_zero_and_too_large_with_a_message);
    return TEST_EXIT();
}
