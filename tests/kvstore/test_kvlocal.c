/*
 * test_kvlocal.c - the in-process tier: put / get / exists / delete, LRU
 * order, the byte capacity (never exceeded, whatever is pinned), checksum
 * failure as a miss, zero-copy reserve / commit / abort and pins that
 * outlive eviction; plus key derivation and the checksum itself.
 */
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kvstore.h"

static kvstore_key key_n(int n)
{
    int32_t tok[16];
    for (int i = 0; i < 16; i++)
        tok[i] = n * 16 + i;
    kvstore_key k;
    kvstore_key_make("test-model", NULL, tok, 16, n % 30, n % 3, 0, 1, &k);
    return k;
}

static void fill(uint8_t *b, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++)
        b[i] = (uint8_t)(seed * 31 + i * 7);
}

static void test_local_put_get_exists_delete(void)
{
    kvstore_metrics m = {0};
    kvstore_local *s = kvstore_local_create(1 << 20, &m, NULL);
    uint8_t v[4096], out[4096];
    fill(v, sizeof v, 1);
    kvstore_key k = key_n(1), other = key_n(2);
    size_t len = 0;
    CHECK_EQ_INT(kvstore_local_get(s, &k, out, sizeof out, &len), KVSTORE_MISS);
    CHECK_EQ_INT(kvstore_local_put(s, &k, v, sizeof v), KVSTORE_OK);
    CHECK(kvstore_local_exists(s, &k));
    CHECK(!kvstore_local_exists(s, &other));
    CHECK_EQ_INT(kvstore_local_get(s, &k, out, sizeof out, &len), KVSTORE_OK);
    CHECK_EQ_INT(len, sizeof v);
    CHECK(!memcmp(out, v, sizeof v));
    CHECK_EQ_INT(kvstore_local_get(s, &k, out, 100, &len), KVSTORE_TOOSMALL);
    CHECK_EQ_INT(len, sizeof v);
    fill(v, sizeof v, 2); /* replace */
    CHECK_EQ_INT(kvstore_local_put(s, &k, v, 1000), KVSTORE_OK);
    CHECK_EQ_INT(kvstore_local_get(s, &k, out, sizeof out, &len), KVSTORE_OK);
    CHECK_EQ_INT(len, 1000);
    CHECK(!memcmp(out, v, 1000));
    kvstore_local_stats st;
    kvstore_local_stats_get(s, &st);
    CHECK_EQ_INT(st.entries, 1);
    CHECK(kvstore_local_delete(s, &k));
    CHECK(!kvstore_local_delete(s, &k));
    CHECK(!kvstore_local_exists(s, &k));
    kvstore_local_stats_get(s, &st);
    CHECK_EQ_INT(st.entries, 0);
    CHECK_EQ_INT(st.used, 0);
    CHECK_EQ_INT(m.tier[KVSTORE_TIER_LOCAL].hits, 2);
    CHECK_EQ_INT(m.tier[KVSTORE_TIER_LOCAL].misses, 1);
    CHECK_EQ_INT(m.tier[KVSTORE_TIER_LOCAL].bytes_in, 4096 + 1000);
    kvstore_local_destroy(s);
}

static void test_local_lru_evicts_least_recent_and_never_exceeds_capacity(void)
{
    /* room for 4 values of 16 KiB (+ overhead), not 5 */
    kvstore_metrics m = {0};
    kvstore_local *s = kvstore_local_create(4 * (16384 + 256), &m, NULL);
    uint8_t v[16384], out[16384];
    kvstore_local_stats st;
    for (int i = 0; i < 4; i++) {
        fill(v, sizeof v, i);
        kvstore_key k = key_n(i);
        CHECK_EQ_INT(kvstore_local_put(s, &k, v, sizeof v), KVSTORE_OK);
    }
    kvstore_key k0 = key_n(0);
    size_t len;
    CHECK_EQ_INT(kvstore_local_get(s, &k0, out, sizeof out, &len), KVSTORE_OK); /* 0 is recent */
    kvstore_key k4 = key_n(4);
    CHECK_EQ_INT(kvstore_local_put(s, &k4, v, sizeof v), KVSTORE_OK);
    kvstore_key k1 = key_n(1);
    CHECK(!kvstore_local_exists(s, &k1)); /* the least recently used went */
    CHECK(kvstore_local_exists(s, &k0));
    for (int i = 2; i <= 4; i++) {
        kvstore_key k = key_n(i);
        CHECK(kvstore_local_exists(s, &k));
    }
    CHECK_EQ_INT(m.evictions, 1);
    for (int i = 5; i < 200; i++) {
        kvstore_key k = key_n(i);
        CHECK_EQ_INT(kvstore_local_put(s, &k, v, (size_t)(1000 + (97 * i) % 15000)), KVSTORE_OK);
        kvstore_local_stats_get(s, &st);
        CHECK(st.used <= st.capacity);
    }
    uint8_t *big = calloc(1, 5 * 16384);
    kvstore_key kb = key_n(999);
    CHECK_EQ_INT(kvstore_local_put(s, &kb, big, 5 * 16384), KVSTORE_NOSPACE);
    kvstore_local_stats_get(s, &st);
    CHECK(st.entries > 0); /* a value that can never fit evicts nothing */
    free(big);
    kvstore_local_destroy(s);
}

/* The daemon's store: values in one shared region, each in a power-of-two
 * block that is what counts against capacity. Mixed sizes fragment the
 * region; puts then evict until a block frees, capacity still holds, every
 * value read back is intact and every value lies inside the region. */
static void test_shared_store_keeps_capacity_through_fragmentation(void)
{
    kvstore_metrics m = {0};
    /* capacity = the whole region (one 64 MiB top block, its label page
     * included), so a block can be missing while bytes are free */
    kvstore_local *s = kvstore_local_create_shared(64u << 20, &m, NULL);
    CHECK(s != NULL);
    if (!s)
        return;
    uint8_t *base, *label;
    size_t bytes;
    int fd = -1;
    CHECK(kvstore_local_region(s, (void **)&base, &bytes, &fd, &label));
    CHECK(fd >= 0 && bytes == (64u << 20) && label >= base && label + 4096 <= base + bytes);
    uint8_t *v = malloc(4 << 20), *out = malloc(4 << 20);
    kvstore_local_stats st;
    for (int i = 0; i < 300; i++) {
        size_t len = (size_t)(1 + (7919u * 131u * (unsigned)i) % (4u << 20));
        fill(v, len, i);
        kvstore_key k = key_n(i);
        CHECK_EQ_INT(kvstore_local_put(s, &k, v, len), KVSTORE_OK);
        kvstore_local_stats_get(s, &st);
        CHECK(st.used <= st.capacity);
        kvstore_entry *e = kvstore_local_acquire(s, &k);
        CHECK(e && (uint8_t *)kvstore_entry_data(e) >= base &&
              (uint8_t *)kvstore_entry_data(e) + len <= base + bytes);
        if (e)
            kvstore_local_release(s, e);
        size_t got;
        CHECK_EQ_INT(kvstore_local_get(s, &k, out, 4 << 20, &got), KVSTORE_OK);
        CHECK(got == len && !memcmp(v, out, len));
    }
    CHECK(m.evictions > 0);
    kvstore_local *priv = kvstore_local_create(1 << 20, NULL, NULL);
    CHECK(!kvstore_local_region(priv, (void **)&base, &bytes, &fd, &label));
    kvstore_local_destroy(priv);
    free(v);
    free(out);
    kvstore_local_destroy(s);
}

static void test_local_checksum_failure_is_a_miss_and_drops_the_entry(void)
{
    kvstore_metrics m = {0};
    kvstore_local *s = kvstore_local_create(1 << 20, &m, NULL);
    uint8_t v[3000], out[3000];
    fill(v, sizeof v, 9);
    kvstore_key k = key_n(7);
    CHECK_EQ_INT(kvstore_local_put(s, &k, v, sizeof v), KVSTORE_OK);
    CHECK(kvstore_local_debug_corrupt(s, &k, 2999));
    CHECK(!kvstore_local_debug_corrupt(s, &k, 3000));
    size_t len;
    CHECK_EQ_INT(kvstore_local_get(s, &k, out, sizeof out, &len), KVSTORE_MISS);
    CHECK(!kvstore_local_exists(s, &k));
    CHECK_EQ_INT(m.checksum_failures, 1);
    kvstore_local_destroy(s);
}

static void test_local_pins_survive_eviction_and_count_against_capacity(void)
{
    kvstore_local *s = kvstore_local_create(2 * (8192 + 256), NULL, NULL);
    uint8_t v[8192];
    fill(v, sizeof v, 3);
    kvstore_key a = key_n(1), b = key_n(2), c = key_n(3);
    CHECK_EQ_INT(kvstore_local_put(s, &a, v, sizeof v), KVSTORE_OK);
    kvstore_entry *pa = kvstore_local_acquire(s, &a);
    CHECK(pa != NULL);
    CHECK_EQ_INT(kvstore_local_put(s, &b, v, sizeof v), KVSTORE_OK);
    /* a is pinned, b is not: c evicts b, and a stays readable */
    CHECK_EQ_INT(kvstore_local_put(s, &c, v, sizeof v), KVSTORE_OK);
    CHECK(!kvstore_local_exists(s, &b));
    CHECK(kvstore_local_exists(s, &a));
    /* replacing a while pinned: the old bytes stay valid until release */
    uint8_t w[8192];
    fill(w, sizeof w, 4);
    kvstore_result why;
    kvstore_entry *r = kvstore_local_reserve(s, &a, sizeof w, kvstore_checksum(w, sizeof w), &why);
    CHECK(r != NULL); /* evicts c to make room */
    memcpy(kvstore_entry_data(r), w, sizeof w);
    kvstore_local_commit(s, r);
    CHECK(!memcmp(kvstore_entry_data(pa), v, sizeof v));
    /* the old a (pinned) and a reservation fill the store: the new a, not
     * pinned, is evicted for the reservation, and nothing more fits */
    kvstore_entry *rb = kvstore_local_reserve(s, &b, sizeof v, 0, &why);
    CHECK(rb != NULL);
    CHECK(!kvstore_local_exists(s, &a));
    kvstore_entry *rc = kvstore_local_reserve(s, &c, 1000, 0, &why);
    CHECK(rc == NULL);
    if (rc)
        kvstore_local_abort(s, rc);
    CHECK_EQ_INT(why, KVSTORE_NOSPACE);
    CHECK(!kvstore_local_exists(s, &b)); /* reserved is not visible */
    kvstore_local_abort(s, rb);
    CHECK(!memcmp(kvstore_entry_data(pa), v, sizeof v));
    kvstore_local_release(s, pa);
    kvstore_local_stats st;
    kvstore_local_stats_get(s, &st);
    CHECK_EQ_INT(st.entries, 0);
    CHECK_EQ_INT(st.used, 0);
    CHECK_EQ_INT(kvstore_local_put(s, &a, w, sizeof w), KVSTORE_OK);
    uint8_t out[8192];
    size_t len;
    CHECK_EQ_INT(kvstore_local_get(s, &a, out, sizeof out, &len), KVSTORE_OK);
    CHECK(!memcmp(out, w, sizeof w));
    kvstore_local_destroy(s);
}

static void test_key_depends_on_every_field(void)
{
    int32_t tok[16] = {1, 2, 3};
    uint8_t chain[32], chain2[32];
    kvstore_chain_hash(NULL, tok, 16, chain);
    kvstore_key base, k;
    kvstore_key_make("m", chain, tok, 16, 1, 2, 0, 2, &base);
    kvstore_key_make("m", chain, tok, 16, 1, 2, 0, 2, &k);
    CHECK(!memcmp(&k, &base, sizeof k));
    kvstore_key variants[7];
    kvstore_key_make("n", chain, tok, 16, 1, 2, 0, 2, &variants[0]);
    kvstore_key_make("m", NULL, tok, 16, 1, 2, 0, 2, &variants[1]);
    kvstore_key_make("m", chain, tok, 15, 1, 2, 0, 2, &variants[2]);
    kvstore_key_make("m", chain, tok, 16, 2, 2, 0, 2, &variants[3]);
    kvstore_key_make("m", chain, tok, 16, 1, 1, 0, 2, &variants[4]);
    kvstore_key_make("m", chain, tok, 16, 1, 2, 1, 2, &variants[5]);
    kvstore_key_make("m", chain, tok, 16, 1, 2, 0, 4, &variants[6]);
    for (int i = 0; i < 7; i++)
        CHECK(memcmp(&variants[i], &base, sizeof base) != 0);
    /* the chain covers the whole prefix: same block tokens, other history */
    int32_t other[16] = {9};
    kvstore_chain_hash(NULL, other, 16, chain2);
    kvstore_key_make("m", chain2, tok, 16, 1, 2, 0, 2, &k);
    CHECK(memcmp(&k, &base, sizeof k) != 0);
    char hex[17];
    kvstore_key_hex(&base, hex);
    CHECK_EQ_INT(strlen(hex), 16);
}

/* kvhash.c test hooks */
uint64_t kvstore_checksum_reference(const void *data, size_t len);
bool kvstore_checksum_isa(int isa, const void *data, size_t len, uint64_t *out);

/* Every instruction set this CPU runs (0 scalar, 1 SSE2, 2 AVX2, 3 AVX-512)
 * equals the portable checksum, at lengths around the stripe (64 B) and
 * block (1 KiB) edges and at unaligned starts; kvstore_checksum too. */
static void test_checksum_simd_equals_scalar_reference(void)
{
    uint8_t *b = malloc(70000);
    fill(b, 70000, 11);
    size_t sizes[] = {0, 1, 7, 63, 64, 65, 127, 1023, 1024, 1025, 2048, 4160, 65536, 69999};
    int ran = 0;
    for (int isa = 0; isa < 4; isa++) {
        uint64_t got;
        if (!kvstore_checksum_isa(isa, b, 1, &got))
            continue;
        ran++;
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            for (size_t off = 0; off < 3 && sizes[i] + off <= 70000; off++) {
                uint64_t want = kvstore_checksum_reference(b + off, sizes[i]);
                CHECK(kvstore_checksum_isa(isa, b + off, sizes[i], &got) && got == want);
                CHECK(kvstore_checksum(b + off, sizes[i]) == want);
            }
    }
    CHECK(ran >= 1);
    free(b);
}

/* The fused copies (cached and non-temporal) write exactly src and return
 * its checksum, at every edge length, with the destination 64-byte aligned
 * (where the non-temporal one streams) and not, and the source not. */
static void test_checksum_copy_copies_and_equals_checksum(void)
{
    uint8_t *b = malloc(70000), *d = aligned_alloc(64, 70144);
    fill(b, 70000, 5);
    size_t sizes[] = {0, 1, 63, 64, 65, 1023, 1024, 1025, 4160, 65536, 69990};
    size_t dst_offs[] = {64, 65, 67, 128};
    for (int nt = 0; nt < 2; nt++)
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            for (size_t j = 0; j < sizeof dst_offs / sizeof dst_offs[0]; j++) {
                size_t off = j % 3, at = dst_offs[j];
                memset(d, 0xee, 70144);
                uint64_t got = nt ? kvstore_checksum_copy_nt(d + at, b + off, sizes[i])
                                  : kvstore_checksum_copy(d + at, b + off, sizes[i]);
                CHECK(got == kvstore_checksum_reference(b + off, sizes[i]));
                CHECK(memcmp(d + at, b + off, sizes[i]) == 0);
                CHECK(d[at - 1] == 0xee && d[at + sizes[i]] == 0xee); /* nothing outside */
            }
    free(b);
    free(d);
}

/* Hashed in steps of any budget, a value has the checksum of one pass,
 * at every edge length: budgets below, at and between whole KiB. */
static void test_checksum_in_steps_equals_one_pass(void)
{
    uint8_t *b = malloc(70000);
    fill(b, 70000, 9);
    size_t sizes[] = {0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 4160, 65536, 69999};
    size_t budgets[] = {0, 1, 1024, 1500, 3072, 65536, 1u << 20};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (size_t j = 0; j < sizeof budgets / sizeof budgets[0]; j++) {
            kvstore_sum sum;
            kvstore_sum_init(&sum);
            uint64_t got = 0;
            int steps = 0;
            while (!kvstore_sum_step(&sum, b + 1, sizes[i], budgets[j], &got))
                steps++;
            CHECK(got == kvstore_checksum_reference(b + 1, sizes[i]));
            /* each step but the last covers at least a KiB */
            CHECK((size_t)steps <= sizes[i] / 1024);
        }
    free(b);
}

static void test_checksum_detects_flips_and_is_stable(void)
{
    uint8_t *b = malloc(5000);
    fill(b, 5000, 5);
    /* the format is shared by processes and machines: lock it down */
    CHECK(kvstore_checksum(b, 5000) == kvstore_checksum(b, 5000));
    uint64_t seen[301];
    for (size_t n = 0; n <= 300; n++) {
        seen[n] = kvstore_checksum(b, n);
        for (size_t j = 0; j < n; j++)
            CHECK(seen[j] != seen[n]);
    }
    size_t sizes[] = {1, 63, 64, 65, 1023, 1024, 1025, 4999, 5000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        uint64_t base = kvstore_checksum(b, n);
        for (size_t pos = 0; pos < n; pos += (n / 17) + 1) {
            for (int bit = 0; bit < 8; bit++) {
                b[pos] ^= (uint8_t)(1 << bit);
                CHECK(kvstore_checksum(b, n) != base);
                b[pos] ^= (uint8_t)(1 << bit);
            }
        }
        b[n - 1] ^= 0x40; /* the very last byte */
        CHECK(kvstore_checksum(b, n) != base);
        b[n - 1] ^= 0x40;
    }
    /* zero padding of the tail must not collide with real zeros */
    uint8_t z[128] = {0};
    CHECK(kvstore_checksum(z, 100) != kvstore_checksum(z, 128));
    free(b);
}

int main(void)
{
    RUN_TEST(test_local_put_get_exists_delete);
    RUN_TEST(test_local_lru_evicts_least_recent_and_never_exceeds_capacity);
    RUN_TEST(test_shared_store_keeps_capacity_through_fragmentation);
    RUN_TEST(test_local_checksum_failure_is_a_miss_and_drops_the_entry);
    RUN_TEST(test_local_pins_survive_eviction_and_count_against_capacity);
    RUN_TEST(test_key_depends_on_every_field);
    RUN_TEST(test_checksum_simd_equals_scalar_reference);
    RUN_TEST(test_checksum_copy_copies_and_equals_checksum);
    RUN_TEST(test_checksum_in_steps_equals_one_pass);
    RUN_TEST(test_checksum_detects_flips_and_is_stable);
    return TEST_EXIT();
}
