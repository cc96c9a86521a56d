/*
 * test_kvprefix_tp.c - the KV store tier under tensor parallelism
 * (worker/engine_tp.c, docs/tp.md "The KV store tier"): a group of 2 (then
 * 3) ranks as threads, rank 0's step engine and followers, each with its
 * own kvprefix (its rank, its heads) over one in-process store.
 *
 *  - the reference: the same requests on a group with no tier at all;
 *  - a first run saves (every rank its own heads: each rank's store saves
 *    its blocks), nothing is restored; a second run of the same prompt
 *    restores on every rank (rank 0's agreement sees both ranks hold the
 *    prefix, and both restore it) and gives exactly the reference's tokens,
 *    with full KV and with SnapKV at 25% (the restored prefix compressed
 *    again);
 *  - the last rank's shard gone (its store misses): the agreement keeps 0
 *    tokens, every rank recomputes, the tokens are the reference's;
 *  - the last rank holding only the first 2 blocks: every rank keeps 32
 *    tokens (rank 0, and at np 3 rank 1, cut their restores back), the
 *    tokens are the reference's.
 * Usage: test_kvprefix_tp MODEL.gguf
 */
#include <stdatomic.h>

#include "entrokv/comm.h"
#include "entrokv/kvprefix.h"
#include "kvstore/kvtest.h"
#include "model/engine_harness.h"

#define MAX_TP 3
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
    int32_t held[MAX_TP], agreed, n_agreed;
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
    for (int32_t r = 0; r < n_ranks && r < MAX_TP; r++)
        t->held[r] = held[r];
    t->agreed = agreed;
    t->n_agreed++;
}

static void t_saved(void *arg)
{
    atomic_fetch_add(&((rank_tier *)arg)->saves_done, 1);
}

static bool tier_open(rank_tier *t, kvstore_client *client, int rank, int n)
{
    memset(t, 0, sizeof *t);
    atomic_init(&t->limit, -1);
    ekv_error err = {0};
    if (!(t->p = kvprefix_create(g_model, client, rank, n, &err))) {
        fprintf(stderr, "kvprefix_create rank %d: %s\n", rank, err.msg);
        return false;
    }
    kvprefix_on_saved(t->p, t_saved, t);
    t->pc = (engine_prefix_cache){t_start, t_ready, t_finish, t_save, t, t_agreed};
    return true;
}

/* ---- a group: rank 0's engine and following threads ---- */

typedef struct follower_th {
    struct group *gr;
    int rank;
    pthread_t th;
    engine_config cfg; /* the group's, with its own prefix cache */
    ekv_status rc;
    ekv_error err;
} follower_th;

typedef struct group {
    int n;
    comm_threads_group *g;
    ekv_comm *c0;
    engine_config cfg;
    follower_th f[MAX_TP];
    ekv_engine *e;
} group;

static void *follow_main(void *arg)
{
    follower_th *f = arg;
    ekv_comm *c = comm_open_thread(f->gr->g, f->rank, &f->err);
    if (c)
        comm_set_timeout_ms(c, TIMEOUT_MS);
    f->rc = c ? engine_tp_follow(g_model, &f->cfg, c, NULL, &f->err) : EKV_ENOMEM;
    if (f->rc) {
        fprintf(stderr, "follower %d: %s\n", f->rank, f->err.msg);
        comm_threads_group_abort(f->gr->g);
    }
    comm_free(c);
    return NULL;
}

static bool group_start(group *gr, int n, rank_tier *tiers)
{
    memset(gr, 0, sizeof *gr);
    gr->n = n;
    ekv_error err = {0};
    if (!(gr->g = comm_threads_group_create(n, &err)) ||
        !(gr->c0 = comm_open_thread(gr->g, 0, &err)))
        return false;
    comm_set_timeout_ms(gr->c0, TIMEOUT_MS);
    gr->cfg = small_config(1024, 2, 4);
    gr->cfg.n_threads = 1;
    gr->cfg.tp_comm = gr->c0;
    gr->cfg.tp_heartbeat_ms = 200; /* followers apply a save at the next plan: a ping at idle */
    for (int r = 1; r < n; r++) {
        gr->f[r] = (follower_th){.gr = gr, .rank = r, .cfg = gr->cfg};
        gr->f[r].cfg.prefix_cache = tiers ? &tiers[r].pc : NULL;
        if (pthread_create(&gr->f[r].th, NULL, follow_main, &gr->f[r]))
            return false;
    }
    gr->cfg.prefix_cache = tiers ? &tiers[0].pc : NULL;
    if (!(gr->e = engine_create(g_model, &gr->cfg, &err))) {
        fprintf(stderr, "engine_create: %s\n", err.msg);
        comm_threads_group_abort(gr->g);
    }
    return gr->e != NULL;
}

static void group_end(group *gr)
{
    engine_destroy(gr->e);
    for (int r = 1; r < gr->n; r++) {
        pthread_join(gr->f[r].th, NULL);
        CHECK_EQ_INT(gr->f[r].rc, EKV_OK);
    }
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

/* Waits (10 s at most) until every follower has made every save rank 0
 * made (it does at the next plan) and the store has finished all of them. */
static void wait_saved(rank_tier *tiers, int n)
{
    const double end = kvt_now() + 10;
    bool settled = false;
    while (!settled && kvt_now() < end) {
        settled = true;
        for (int r = 0; r < n; r++)
            settled = settled && atomic_load(&tiers[r].saves) == atomic_load(&tiers[0].saves) &&
                      atomic_load(&tiers[r].saves_done) == atomic_load(&tiers[r].saves);
        if (!settled)
            kvt_sleep_ms(5);
    }
    CHECK(settled);
}

static prompt g_ps[2];
static gen_params g_gps[2];

/* Every rank's restored tokens since `since` all equal want. */
static void check_restored(rank_tier *tiers, int n, const int *since, int want, const char *what)
{
    for (int r = 0; r < n; r++) {
        const int got = atomic_load(&tiers[r].restored) - since[r];
        if (got != want)
            fprintf(stderr, "  %s: rank %d of %d restored %d tokens, not %d\n", what, r, n, got,
                    want);
        CHECK_EQ_INT(got, want);
    }
}

/* A group of n: the reference without a tier, then with one, prompts 0 and
 * 1 cold and warm; on prompt 0, the last rank's shard gone, then holding
 * only its first 2 blocks (np 3: rank 1 then cuts its restore back too). */
static void scenario(int n, int n_prompts)
{
    static req_out ref[2], out;
    group gr;
    CHECK(group_start(&gr, n, NULL));
    for (int i = 0; i < n_prompts && gr.e; i++)
        run(&gr, &g_ps[i], &g_gps[i], &ref[i]);
    group_end(&gr);

    kvstore_client_config kc;
    kvstore_client_config_default(&kc);
    kc.local_capacity = 64u << 20;
    kvstore_client *client = kvstore_client_create(&kc, NULL);
    static rank_tier tiers[MAX_TP];
    bool ok = client != NULL;
    for (int r = 0; r < n && ok; r++)
        ok = tier_open(&tiers[r], client, r, n);
    CHECK(ok);
    CHECK(ok && group_start(&gr, n, tiers));
    rank_tier *last = &tiers[n - 1];
    for (int i = 0; i < n_prompts && gr.e; i++) {
        int since[MAX_TP];
        for (int r = 0; r < n; r++)
            since[r] = atomic_load(&tiers[r].restored);
        run(&gr, &g_ps[i], &g_gps[i], &out); /* cold: saves on every rank */
        check_same(&out, &ref[i], "cold");
        /* nothing, or the chat template's first block, which the prompts share */
        const int cold = atomic_load(&tiers[0].restored) - since[0];
        CHECK(cold == 0 || cold == 16);
        check_restored(tiers, n, since, cold, "cold");
        CHECK(atomic_load(&tiers[0].saves) > 0);
        wait_saved(tiers, n);

        for (int r = 0; r < n; r++)
            since[r] = atomic_load(&tiers[r].restored);
        const int n0 = tiers[0].n_agreed;
        run(&gr, &g_ps[i], &g_gps[i], &out); /* warm: every rank restores its shard */
        check_same(&out, &ref[i], "restored on every rank");
        const int got0 = atomic_load(&tiers[0].restored) - since[0];
        CHECK(got0 >= 32);
        check_restored(tiers, n, since, got0, "warm");
        CHECK_EQ_INT(tiers[0].n_agreed, n0 + 1);
        for (int r = 0; r < n; r++)
            CHECK_EQ_INT(tiers[0].held[r], got0);
        CHECK_EQ_INT(tiers[0].agreed, got0);
        if (i > 0)
            continue;
        /* the last rank's shard gone: every rank recomputes */
        atomic_store(&last->limit, 0);
        run(&gr, &g_ps[i], &g_gps[i], &out);
        check_same(&out, &ref[i], "the last rank's shard missing");
        CHECK_EQ_INT(tiers[0].n_agreed, n0 + 2);
        CHECK_EQ_INT(tiers[0].held[0], got0);
        CHECK_EQ_INT(tiers[0].held[n - 1], 0);
        CHECK_EQ_INT(tiers[0].agreed, 0);
        /* it holds 2 blocks: every rank keeps those, computes the rest */
        atomic_store(&last->limit, 32);
        run(&gr, &g_ps[i], &g_gps[i], &out);
        check_same(&out, &ref[i], "the last rank holding 2 blocks");
        CHECK_EQ_INT(tiers[0].n_agreed, n0 + 3);
        CHECK_EQ_INT(tiers[0].held[n - 1], 32);
        CHECK_EQ_INT(tiers[0].agreed, 32);
        atomic_store(&last->limit, -1);
    }
    group_end(&gr);
    for (int r = 0; r < n; r++)
        kvprefix_drain(tiers[r].p);
    kvstore_client_destroy(client);
    for (int r = 0; r < n; r++)
        kvprefix_destroy(tiers[r].p);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    g_ps[0] = topic_prompt(1, "Tell me a long story about %s, with three characters, a journey "
                              "across the sea, a storm and a happy ending.");
    g_ps[1] = topic_prompt(9, "Describe %s in detail: its history, how people use it today, "
                              "and one surprising fact about it.");
    g_gps[0] = g_gps[1] = greedy(MAX_TOKENS);
    g_gps[1].kv.method = KVC_SNAPKV;
    g_gps[1].kv.budget = 0.25;
    for (int i = 0; i < 2; i++) {
        g_gps[i].ignore_eos = true;
        CHECK(g_ps[i].n >= 48); /* at least 2 whole blocks restored, a window computed */
    }
    scenario(2, 2);
    scenario(3, 1); /* one KV head per rank */
    for (int i = 0; i < 2; i++)
        free(g_ps[i].ids);
    harness_fini();
    return TEST_EXIT();
}
