/*
 * test_kvring.c - consistent hashing: keys spread evenly over nodes, the
 * ring is a pure function of its membership, and adding or removing a node
 * moves only the keys that must move (about 1/N, all to / from that node).
 */
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/kvstore.h"

#define NKEYS 20000

static kvstore_key *make_keys(void)
{
    kvstore_key *k = malloc(NKEYS * sizeof *k);
    for (int i = 0; i < NKEYS; i++) {
        int32_t t = i;
        kvstore_key_make("ring", NULL, &t, 1, 0, 0, 0, 1, &k[i]);
    }
    return k;
}

static kvstore_ring *ring_of(int n, int vnodes)
{
    kvstore_ring *r = kvstore_ring_create(vnodes, NULL);
    for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "10.77.%d.2:7000", i + 1);
        CHECK_EQ_INT(kvstore_ring_add(r, name, i, NULL), EKV_OK);
    }
    return r;
}

static void test_ring_spreads_keys_evenly(void)
{
    kvstore_key *k = make_keys();
    for (int n = 2; n <= 8; n *= 2) {
        kvstore_ring *r = ring_of(n, KVSTORE_RING_DEFAULT_VNODES);
        int count[8] = {0};
        for (int i = 0; i < NKEYS; i++)
            count[kvstore_ring_lookup(r, &k[i])]++;
        double fair = (double)NKEYS / n;
        for (int j = 0; j < n; j++) {
            if (count[j] < 0.75 * fair || count[j] > 1.25 * fair)
                fprintf(stderr, "  %d nodes: node %d has %d keys (fair %.0f)\n", n, j, count[j],
                        fair);
            CHECK(count[j] >= 0.75 * fair && count[j] <= 1.25 * fair);
        }
        kvstore_ring_destroy(r);
    }
    free(k);
}

static void test_ring_is_deterministic_and_order_independent(void)
{
    kvstore_key *k = make_keys();
    kvstore_ring *a = ring_of(3, 64);
    kvstore_ring *b = kvstore_ring_create(64, NULL);
    kvstore_ring_add(b, "10.77.3.2:7000", 2, NULL);
    kvstore_ring_add(b, "10.77.1.2:7000", 0, NULL);
    kvstore_ring_add(b, "10.77.2.2:7000", 1, NULL);
    int diff = 0;
    for (int i = 0; i < NKEYS; i++)
        diff += kvstore_ring_lookup(a, &k[i]) != kvstore_ring_lookup(b, &k[i]);
    CHECK_EQ_INT(diff, 0);
    CHECK_EQ_INT(kvstore_ring_add(b, "again", 1, NULL), EKV_EINVAL);
    kvstore_ring_destroy(a);
    kvstore_ring_destroy(b);
    free(k);
}

static void test_ring_add_and_remove_move_only_what_must_move(void)
{
    kvstore_key *k = make_keys();
    kvstore_ring *r = ring_of(4, KVSTORE_RING_DEFAULT_VNODES);
    int *before = malloc(NKEYS * sizeof *before);
    for (int i = 0; i < NKEYS; i++)
        before[i] = kvstore_ring_lookup(r, &k[i]);
    /* add a fifth node: keys move only onto it, about 1/5 of them */
    kvstore_ring_add(r, "10.77.5.2:7000", 4, NULL);
    int moved = 0, wrong = 0;
    for (int i = 0; i < NKEYS; i++) {
        int now = kvstore_ring_lookup(r, &k[i]);
        if (now != before[i]) {
            moved++;
            wrong += now != 4;
        }
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK(moved > NKEYS / 5 * 0.7 && moved < NKEYS / 5 * 1.3);
    /* remove node 1: only its keys move, the rest stay put */
    for (int i = 0; i < NKEYS; i++)
        before[i] = kvstore_ring_lookup(r, &k[i]);
    kvstore_ring_remove(r, 1);
    CHECK_EQ_INT(kvstore_ring_nodes(r), 4);
    wrong = 0;
    for (int i = 0; i < NKEYS; i++) {
        int now = kvstore_ring_lookup(r, &k[i]);
        CHECK(now != 1);
        wrong += before[i] != 1 && now != before[i];
    }
    CHECK_EQ_INT(wrong, 0);
    free(before);
    kvstore_ring_destroy(r);
    free(k);
}

static void test_ring_empty_has_no_owner(void)
{
    kvstore_ring *r = kvstore_ring_create(8, NULL);
    kvstore_key k = {{0}};
    CHECK_EQ_INT(kvstore_ring_lookup(r, &k), -1);
    CHECK(kvstore_ring_create(0, NULL) == NULL);
    kvstore_ring_destroy(r);
}

int main(void)
{
    RUN_TEST(test_ring_spreads_keys_evenly);
    RUN_TEST(test_ring_is_deterministic_and_order_independent);
    RUN_TEST(test_ring_add_and_remove_move_only_what_must_move);
    RUN_TEST(test_ring_empty_has_no_owner);
    return TEST_EXIT();
}
