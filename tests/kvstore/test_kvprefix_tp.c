/*
 * test_kvprefix_tp.c - the KV store tier under tensor parallelism
 * (worker/engine_tp.c, docs/tp.md "The KV store tier"): a group of 2 ranks
 * as threads, rank 0's step engine and a follower, each with its own
 * kvprefix (its rank, its heads) over one in-process store.
 *
 *  - the reference: the same requests on a group with no tier at all;
 *  - a first run saves (every rank its own heads: each rank's store saves
 *    its blocks), nothing is restored; a second run of the same prompt
 *    restores on every rank (rank 0's agreement sees both ranks hold the
 *    prefix, and both restore it) and gives exactly the reference's tokens,
 *    with full KV and with SnapKV at 25% (the restored prefix compressed
 *    again);
 *  - rank 1's shard gone (its store misses): the agreement keeps 0 tokens,
 *    every rank recomputes, the tokens are the reference's;
 *  - rank 1 holding only the first 2 blocks: every rank keeps 32 tokens
 *    (rank 0 cuts its restore back), the tokens are the reference's.
 * Usage: test_kvprefix_tp MODEL.gguf
 */
#include <stdatomic.h>

#include "entrokv/comm.h"
#include "entrokv/kvprefix.h"
#include "kvstore/kvtest.h"
#include "model/engine_harness.h"

#define TP 2
#define TIMEOUT_MS 8000
#define MAX_TOKENS 12

/* One rank's tier: a kvprefix of its rank, and what the test makes it do. */
typedef struct rank_tier {
    kvprefix *p;
    engine_prefix_cache pc;
    _Atomic int saves;           /* saves asked for that store blocks */
    _Atomic int saves_done;      /* saves whose puts have all finished */
    _Atomic int restored;        /* tokens its restores returned, summed */
    _Atomic int32_t limit;       /* restores ask for at most this many tokens (-1: all) */
    /* rank 0's: the last agreement */
    int32_t held[TP], agreed, n_agreed;
} rank_tier;

static void *t_start(void *ctx, const int32_t *tokens, int32_t n, int32_t max_tokens,
                     void (*wake)(void *), void *wake_arg)
{
    rank_tier *t = ctx;
    const int32_t lim = atomic_load(&t->limit);
    if (lim >= 0 && lim < max_tokens)
        max_tokens = lim;
    return kvprefix_restore_start(t->p, tokens, n, max_tokens, wake, wake_arg);
}

static bool t_ready(void *ctx, void *job)
{
    return kvprefix_restore_ready(job);
}

static int32_t t_finish(void *ctx, void *job, kv_seq *seq)
{
    rank_tier *t = ctx;
    const int32_t got = kvprefix_restore_finish(job, seq);
    if (got > 0)
        atomic_fetch_add(&t->restored, got);
    return got;
}

static void t_save(void *ctx, const kv_seq *seq, const int32_t *tokens, int32_t n, int32_t fb)
{
    rank_tier *t = ctx;
    if (n / kv_pool_block_tokens(kv_seq_pool(seq)) > fb)
        atomic_fetch_add(&t->saves, 1); /* rank 0 then logs it for the follower */
    kvprefix_save(t->p, seq, tokens, n, fb);
}

static void t_agreed(void *ctx, const int32_t *held, int32_t n_ranks, int32_t agreed)
{
    rank_tier *t = ctx; /* the engine thread; read by the test after on_done */
    for (int32_t r = 0; r < n_ranks && r < TP; r++)
        t->held[r] = held[r];
    t->agreed = agreed;
    t->n_agreed++;
}

static void t_saved(void *arg)
{
    atomic_fetch_add(&((rank_tier *)arg)->saves_done, 1);
}

static bool tier_open(rank_tier *t, kvstore_client *client, int rank)
{
    memset(t, 0, sizeof *t);
    atomic_init(&t->limit, -1);
    ekv_error err = {0};
    if (!(t->p = kvprefix_create(g_model, client, rank, TP, &err))) {
        fprintf(stderr, "kvprefix_create rank %d: %s\n", rank, err.msg);
        return false;
    }
    kvprefix_on_saved(t->p, t_saved, t);
    t->pc = (engine_prefix_cache){t_start, t_ready, t_finish, t_save, t, t_agreed};
    return true;
}

/* ---- a group: rank 0's engine and a following thread ---- */

typedef struct group {
    comm_threads_group *g;
    ekv_comm *c0;
    pthread_t th;
    engine_config cfg, fcfg; /* rank 0's, the follower's (its own prefix cache) */
    ekv_status follow_rc;
    ekv_error follow_err;
    ekv_engine *e;
} group;

static void *follow_main(void *arg)
{
    group *gr = arg;
    ekv_comm *c = comm_open_thread(gr->g, 1, &gr->follow_err);
    if (c)
        comm_set_timeout_ms(c, TIMEOUT_MS);
    gr->follow_rc = c ? engine_tp_follow(g_model, &gr->fcfg, c, NULL, &gr->follow_err) : EKV_ENOMEM;
    if (gr->follow_rc) {
        fprintf(stderr, "follower: %s\n", gr->follow_err.msg);
        comm_threads_group_abort(gr->g);
    }
    comm_free(c);
    return NULL;
}

static bool group_start(group *gr, rank_tier *tiers)
{
    memset(gr, 0, sizeof *gr);
    ekv_error err = {0};
    if (!(gr->g = comm_threads_group_create(TP, &err)) ||
        !(gr->c0 = comm_open_thread(gr->g, 0, &err)))
        return false;
    comm_set_timeout_ms(gr->c0, TIMEOUT_MS);
    gr->cfg = small_config(1024, 2, 4);
    gr->cfg.n_threads = 1;
    gr->cfg.tp_comm = gr->c0;
    gr->cfg.tp_heartbeat_ms = 200; /* followers apply a save at the next plan: a ping at idle */
    gr->fcfg = gr->cfg;
    gr->cfg.prefix_cache = tiers ? &tiers[0].pc : NULL;
    gr->fcfg.prefix_cache = tiers ? &tiers[1].pc : NULL;
    if (pthread_create(&gr->th, NULL, follow_main, gr))
        return false;
    if (!(gr->e = engine_create(g_model, &gr->cfg, &err))) {
        fprintf(stderr, "engine_create: %s\n", err.msg);
        comm_threads_group_abort(gr->g);
    }
    return gr->e != NULL;
}

static void group_end(group *gr)
{
    engine_destroy(gr->e);
    pthread_join(gr->th, NULL);
    CHECK_EQ_INT(gr->follow_rc, EKV_OK);
    comm_free(gr->c0);
    comm_threads_group_free(gr->g);
}

static void run(group *gr, const prompt *p, const gen_params *gp, req_out *o)
{
    memset(o, 0, sizeof *o);
    engine_request r = make_request(p, gp, o);
    uint64_t id;
    ekv_error err = {0};
    CHECK_EQ_INT(engine_submit(gr->e, &r, &id, &err), EKV_OK);
    if (err.code) {
        fprintf(stderr, "  engine_submit: %s\n", err.msg);
        return;
    }
    CHECK(wait_done(o, 1));
    CHECK_EQ_INT(o->rc, EKV_OK);
    if (o->rc)
        fprintf(stderr, "  request: %s\n", o->msg);
    CHECK_EQ_INT(o->n_ids, gp->max_tokens);
}

static void check_same(const req_out *a, const req_out *b, const char *what)
{
    int32_t first_diff = a->n_ids == b->n_ids ? -1 : 0;
    for (int32_t i = 0; i < a->n_ids && i < b->n_ids && first_diff < 0; i++)
        if (a->ids[i] != b->ids[i])
            first_diff = i;
    if (first_diff >= 0)
        fprintf(stderr, "  %s: token %d differs from the group without a tier\n", what,
                first_diff);
    CHECK_EQ_INT(first_diff, -1);
}

/* Waits (10 s at most) until the follower has made every save rank 0 made
 * (it does at the next plan) and the store has finished all of them. */
static void wait_saved(rank_tier *tiers)
{
    const double end = kvt_now() + 10;
    bool settled = false;
    while (!settled && kvt_now() < end) {
        settled = atomic_load(&tiers[1].saves) == atomic_load(&tiers[0].saves);
        for (int r = 0; r < TP; r++)
            settled = settled && atomic_load(&tiers[r].saves_done) == atomic_load(&tiers[r].saves);
        if (!settled)
            kvt_sleep_ms(5);
    }
    CHECK(settled);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    prompt ps[2] = {topic_prompt(1, "Tell me a long story about %s, with three characters, "
                                    "a journey across the sea, a storm and a happy ending."),
                    topic_prompt(9, "Describe %s in detail: its history, how people use it "
                                    "today, and one surprising fact about it.")};
    gen_params gps[2] = {greedy(MAX_TOKENS), greedy(MAX_TOKENS)};
    gps[1].kv.method = KVC_SNAPKV;
    gps[1].kv.budget = 0.25;
    for (int i = 0; i < 2; i++) {
        gps[i].ignore_eos = true;
        CHECK(ps[i].n >= 48); /* at least 2 whole blocks restored, a window computed */
    }

    /* the reference: the same group, no tier */
    static req_out ref[2], out;
    group gr;
    CHECK(group_start(&gr, NULL));
    for (int i = 0; i < 2 && gr.e; i++)
        run(&gr, &ps[i], &gps[i], &ref[i]);
    group_end(&gr);

    kvstore_client_config kc;
    kvstore_client_config_default(&kc);
    kc.local_capacity = 64u << 20;
    kvstore_client *client = kvstore_client_create(&kc, NULL);
    static rank_tier tiers[TP];
    CHECK(client && tier_open(&tiers[0], client, 0) && tier_open(&tiers[1], client, 1));
    CHECK(group_start(&gr, tiers));
    for (int i = 0; i < 2 && gr.e; i++) {
        int r0 = atomic_load(&tiers[0].restored), r1 = atomic_load(&tiers[1].restored);
        run(&gr, &ps[i], &gps[i], &out); /* cold: saves on both ranks */
        check_same(&out, &ref[i], "cold");
        /* at most the chat template's first block, which the prompts share */
        CHECK(atomic_load(&tiers[0].restored) - r0 <= 16);
        CHECK_EQ_INT(atomic_load(&tiers[1].restored) - r1, atomic_load(&tiers[0].restored) - r0);
        CHECK(atomic_load(&tiers[0].saves) > 0);
        wait_saved(tiers);

        r0 = atomic_load(&tiers[0].restored);
        r1 = atomic_load(&tiers[1].restored);
        const int n0 = tiers[0].n_agreed;

        run(&gr, &ps[i], &gps[i], &out); /* warm: every rank restores its shard */
        check_same(&out, &ref[i], "restored on every rank");
        const int got0 = atomic_load(&tiers[0].restored) - r0;
        CHECK(got0 >= 32);
        CHECK_EQ_INT(atomic_load(&tiers[1].restored) - r1, got0);
        CHECK_EQ_INT(tiers[0].n_agreed, n0 + 1);
        CHECK_EQ_INT(tiers[0].held[0], got0);
        CHECK_EQ_INT(tiers[0].held[1], got0);
        CHECK_EQ_INT(tiers[0].agreed, got0);

        if (i == 0) {
            /* rank 1's shard gone: every rank recomputes */
            atomic_store(&tiers[1].limit, 0);
            run(&gr, &ps[i], &gps[i], &out);
            check_same(&out, &ref[i], "rank 1's shard missing");
            CHECK_EQ_INT(tiers[0].n_agreed, n0 + 2);
            CHECK_EQ_INT(tiers[0].held[0], got0);
            CHECK_EQ_INT(tiers[0].held[1], 0);
            CHECK_EQ_INT(tiers[0].agreed, 0);
            /* rank 1 holds 2 blocks: every rank keeps those, computes the rest */
            atomic_store(&tiers[1].limit, 32);
            run(&gr, &ps[i], &gps[i], &out);
            check_same(&out, &ref[i], "rank 1 holding 2 blocks");
            CHECK_EQ_INT(tiers[0].n_agreed, n0 + 3);
            CHECK_EQ_INT(tiers[0].held[1], 32);
            CHECK_EQ_INT(tiers[0].agreed, 32);
            atomic_store(&tiers[1].limit, -1);
        }
    }
    group_end(&gr);
    for (int r = 0; r < TP; r++)
        kvprefix_drain(tiers[r].p);
    kvstore_client_destroy(client);
    for (int r = 0; r < TP; r++)
        kvprefix_destroy(tiers[r].p);
    for (int i = 0; i < 2; i++)
        free(ps[i].ids);
    harness_fini();
    return TEST_EXIT();
}
