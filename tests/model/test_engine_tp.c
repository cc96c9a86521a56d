/*
 * test_engine_tp.c - the step engine leading a tensor-parallel group of 2
 * ranks as threads (worker/engine_tp.c, docs/tp.md "A worker group"):
 *
 *  - concurrent requests in a pool small enough to force preemption (rank
 *    0 frees and recreates sequences; the followers must mirror it) give
 *    exactly the tokens gen_run + gen_follow give for each alone on a group
 *    of the same shape: an independent driver of the same sharding;
 *    likewise with SnapKV at 10% (captures and compression mirrored) and
 *    n = 2 choices (forks mirrored);
 *  - the plan as docs/tp.md specifies it, written byte by byte here: a
 *    follower refuses a bad magic, version, counter, length, sequence id,
 *    token, or a save's or restore's tokens, blocks or plan with
 *    EKV_EFORMAT, and ends with EKV_OK on a well-formed end;
 *  - a rank that fails (the group aborted, as a dead peer): the running
 *    request ends with EKV_EUNAVAILABLE, stats say tp_broken, new requests
 *    are refused with EKV_EUNAVAILABLE;
 *  - recall (R = 2, promotion on; every 4 steps, promotion off; token
 *    recall K = 2) on three concurrent requests equals gen_run +
 *    gen_follow alone; a capture op with recall fields out of range is
 *    EKV_EFORMAT. SCOPE and recall
 *    against the single-process worker: serve.test_tp_worker.
 */
#include "engine_harness.h"

#include "entrokv/comm.h"
#include "entrokv/kvrecall.h"

#define TP 2
#define TIMEOUT_MS 5000

/* ---- the reference: gen_run on rank 0, gen_follow on rank 1 ---- */

typedef struct ref_follower {
    comm_threads_group *g;
    const prompt *p;
    const gen_params *gp;
    ekv_status rc;
} ref_follower;

static void *ref_follow(void *arg)
{
    ref_follower *f = arg;
    ekv_error err = {0};
    ekv_comm *c = comm_open_thread(f->g, 1, &err);
    ekv_runtime *rt = c ? model_runtime_create_tp(g_model, 64, 512, 1, c, &err) : NULL;
    kv_pool *kv = rt ? model_kv_pool_create_shard(g_model, model_runtime_shard(rt), 512, &err)
                     : NULL;
    f->rc = kv ? gen_follow(rt, kv, f->p->ids, f->p->n, f->gp, &err) : EKV_ENOMEM;
    if (!kv)
        comm_threads_group_abort(f->g);
    kv_pool_destroy(kv);
    model_runtime_free(rt);
    comm_free(c);
    return NULL;
}

static bool ref_tp(const prompt *p, const gen_params *gp, gen_result *out)
{
    ekv_error err = {0};
    comm_threads_group *g = comm_threads_group_create(TP, &err);
    ekv_comm *c = g ? comm_open_thread(g, 0, &err) : NULL;
    if (!c)
        return false;
    ref_follower f = {.g = g, .p = p, .gp = gp};
    pthread_t th;
    pthread_create(&th, NULL, ref_follow, &f);
    ekv_runtime *rt = model_runtime_create_tp(g_model, 64, 512, 1, c, &err);
    kv_pool *kv = rt ? model_kv_pool_create_shard(g_model, model_runtime_shard(rt), 512, &err)
                     : NULL;
    ekv_status rc = kv ? gen_run(rt, kv, p->ids, p->n, gp, NULL, NULL, out, &err) : EKV_ENOMEM;
    if (rc) {
        fprintf(stderr, "reference gen_run --tp: %s\n", err.msg);
        comm_threads_group_abort(g);
    }
    pthread_join(th, NULL);
    kv_pool_destroy(kv);
    model_runtime_free(rt);
    comm_free(c);
    comm_threads_group_free(g);
    return rc == EKV_OK && f.rc == EKV_OK;
}

static void check_equals_ref(const prompt *p, const gen_params *gp, const req_out *o)
{
    gen_result ref;
    memset(&ref, 0, sizeof ref);
    CHECK(ref_tp(p, gp, &ref));
    CHECK_EQ_INT(o->n_done, 1);
    CHECK_EQ_INT(o->rc, EKV_OK);
    CHECK_EQ_INT(o->n_ids, ref.n_ids);
    int32_t first_diff = -1;
    for (int32_t i = 0; i < ref.n_ids && i < o->n_ids && first_diff < 0; i++)
        if (o->ids[i] != ref.ids[i])
            first_diff = i;
    if (first_diff >= 0)
        fprintf(stderr, "  token %d differs from gen_run --tp alone\n", first_diff);
    CHECK_EQ_INT(first_diff, -1);
    gen_result_free(&ref);
}

/* ---- a group: rank 0's engine (the caller's) and a following thread ---- */

typedef struct group {
    comm_threads_group *g;
    ekv_comm *c0;
    pthread_t th;
    engine_config cfg;
    ekv_status follow_rc;
    ekv_error follow_err;
} group;

static void *follow_main(void *arg)
{
    group *gr = arg;
    ekv_comm *c = comm_open_thread(gr->g, 1, &gr->follow_err);
    if (c)
        comm_set_timeout_ms(c, TIMEOUT_MS);
    gr->follow_rc = c ? engine_tp_follow(g_model, &gr->cfg, c, NULL, &gr->follow_err) : EKV_ENOMEM;
    if (gr->follow_rc)
        comm_threads_group_abort(gr->g);
    comm_free(c);
    return NULL;
}

static bool group_start(group *gr, engine_config cfg)
{
    memset(gr, 0, sizeof *gr);
    ekv_error err = {0};
    if (!(gr->g = comm_threads_group_create(TP, &err)) ||
        !(gr->c0 = comm_open_thread(gr->g, 0, &err)))
        return false;
    comm_set_timeout_ms(gr->c0, TIMEOUT_MS);
    cfg.n_threads = 1;
    cfg.tp_comm = gr->c0;
    cfg.tp_heartbeat_ms = TIMEOUT_MS / 4;
    gr->cfg = cfg;
    return pthread_create(&gr->th, NULL, follow_main, gr) == 0;
}

static void group_end(group *gr)
{
    pthread_join(gr->th, NULL);
    comm_free(gr->c0);
    comm_threads_group_free(gr->g);
}

/* Rank 0's engine over a started group; NULL (the group aborted and
 * ended, the failure counted) if it cannot be created. */
static ekv_engine *leader_engine(group *gr)
{
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &gr->cfg, &err);
    CHECK(e != NULL);
    if (!e) {
        fprintf(stderr, "engine_create: %s\n", err.msg);
        comm_threads_group_abort(gr->g);
        group_end(gr);
    }
    return e;
}

/* ---- tests ---- */

#define N_REQ 4

static void test_requests_equal_gen_tp(void)
{
    group gr;
    /* 128 tokens per head (test_engine.c's preemption case): ~40-token
     * prompts growing by 40 run out of blocks, the newest are preempted */
    CHECK(group_start(&gr, small_config(128, N_REQ, 16)));
    ekv_engine *e = leader_engine(&gr);
    if (!e)
        return;
    ekv_error err = {0};
    static req_out out[N_REQ + 2];
    memset(out, 0, sizeof out);
    prompt ps[N_REQ + 1];
    gen_params gps[N_REQ + 1];
    for (int i = 0; i < N_REQ; i++) {
        ps[i] = topic_prompt(i + 3, "Explain %s to a child.");
        gps[i] = greedy(40);
        gps[i].ignore_eos = true;
        if (i == 1) { /* a capture and its compression, mirrored */
            gps[i].kv.method = KVC_SNAPKV;
            gps[i].kv.budget = 0.1;
        }
        engine_request r = make_request(&ps[i], &gps[i], &out[i]);
        uint64_t id;
        CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
    }
    CHECK(wait_done(out, N_REQ));
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK(s.preemptions > 0); /* the pool really forced frees and recreations */
    CHECK_EQ_INT(s.tp_broken, 0);

    /* n = 2: one prefill, then a fork on every rank */
    ps[N_REQ] = topic_prompt(5, "Give me one fact about %s.");
    gps[N_REQ] = greedy(8);
    engine_request r = make_request(&ps[N_REQ], &gps[N_REQ], &out[N_REQ]);
    void *ctxs[2] = {&out[N_REQ], &out[N_REQ + 1]};
    r.n = 2;
    r.choice_ctx = ctxs;
    uint64_t id;
    CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
    CHECK(wait_done(&out[N_REQ], 2));
    engine_destroy(e); /* its end releases the follower */
    group_end(&gr);
    CHECK_EQ_INT(gr.follow_rc, EKV_OK);
    if (gr.follow_rc)
        fprintf(stderr, "follower: %s\n", gr.follow_err.msg);
    for (int i = 0; i < N_REQ; i++)
        check_equals_ref(&ps[i], &gps[i], &out[i]);
    check_equals_ref(&ps[N_REQ], &gps[N_REQ], &out[N_REQ]);
    check_equals_ref(&ps[N_REQ], &gps[N_REQ], &out[N_REQ + 1]);
    for (int i = 0; i <= N_REQ; i++)
        free(ps[i].ids);
}

/* The plan, as docs/tp.md's table gives it (host byte order). */
typedef struct wire_hdr {
    uint32_t magic;
    uint16_t version, kind;
    uint32_t counter;
    int32_t n_ops, n_rows, arg;
    uint32_t payload_bytes, n_toks;
} wire_hdr;
typedef struct wire_op {
    int32_t code, id, parent, n_prompt, pos0, method;
    double budget, spark_ratio;
    int32_t spark_recovery, has_profile;
    int32_t scope_mode, scope_recent, scope_window, scope_max_new, max_new;
    int32_t recall, recall_every, recall_no_promote;
    int32_t tok_off, n_tok;
    int32_t recall_gather, reserved;
} wire_op;
_Static_assert(sizeof(wire_hdr) == 32 && sizeof(wire_op) == 96, "docs/tp.md's sizes");
#define ROW_BYTES 16 /* token, position, sequence id, SCOPE step */
#define MAGIC 0x656b7470u

/* Sends hdr (and payload) as rank 0; returns the follower's status. */
static ekv_status send_raw(const wire_hdr *h, const void *payload, size_t len)
{
    group gr;
    if (!group_start(&gr, small_config(256, 4, 4)))
        return EKV_ENOMEM;
    ekv_error err = {0};
    wire_hdr copy = *h;
    ekv_status rc = comm_broadcast(gr.c0, &copy, sizeof copy, 0, &err);
    if (rc == EKV_OK && len)
        rc = comm_broadcast(gr.c0, (void *)payload, len, 0, &err);
    (void)rc; /* the follower's verdict is what counts */
    group_end(&gr);
    return gr.follow_rc;
}

static wire_hdr hdr(uint16_t kind, uint32_t counter, int32_t n_ops, int32_t n_rows)
{
    wire_hdr h = {.magic = MAGIC, .version = 4, .kind = kind, .counter = counter, .n_ops = n_ops,
                  .n_rows = n_rows,
                  .payload_bytes = (uint32_t)(n_ops * sizeof(wire_op) + (size_t)n_rows * ROW_BYTES)};
    return h;
}

static void test_malformed_plans(void)
{
    wire_hdr h = hdr(0, 0, 0, 0); /* a well-formed end */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_OK);
    h.magic ^= 1;
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    h = hdr(0, 0, 0, 0);
    h.version = 2; /* before the plan carried saves and restores */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    h.version = 3; /* before the capture carried token recall's K (88-byte ops) */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    h = hdr(3, 1, 0, 0); /* a ping out of order: the first message is counter 0 */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    h = hdr(9, 0, 0, 0); /* unknown kind */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    h = hdr(1, 0, 0, 1);
    h.payload_bytes += 4; /* length disagrees with the counts */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    h = hdr(1, 0, 0, 100000); /* more rows than max_batch */
    CHECK_EQ_INT(send_raw(&h, NULL, 0), EKV_EFORMAT);
    /* a step naming a sequence that was never created */
    int32_t rows[4] = {1, 0, 0, -1};
    h = hdr(1, 0, 0, 1);
    CHECK_EQ_INT(send_raw(&h, rows, sizeof rows), EKV_EFORMAT);
    /* create id 0, then a step with a token outside the vocabulary */
    struct {
        wire_op op;
        int32_t rows[4];
    } p = {.op = {.code = 1, .id = 0, .parent = -1}, .rows = {1 << 30, 0, 0, -1}};
    h = hdr(1, 0, 1, 1);
    CHECK_EQ_INT(send_raw(&h, &p, sizeof p.op + sizeof p.rows), EKV_EFORMAT);
    /* ops: an id out of range, a free of a free id, an unknown code */
    wire_op op = {.code = 1, .id = 4, .parent = -1}; /* max_running 4: ids 0..3 */
    h = hdr(0, 0, 1, 0);
    CHECK_EQ_INT(send_raw(&h, &op, sizeof op), EKV_EFORMAT);
    op = (wire_op){.code = 2, .id = 0, .parent = -1};
    CHECK_EQ_INT(send_raw(&h, &op, sizeof op), EKV_EFORMAT);
    op = (wire_op){.code = 77, .id = 0, .parent = -1};
    CHECK_EQ_INT(send_raw(&h, &op, sizeof op), EKV_EFORMAT);
    /* a SCOPE row of a sequence that has no SCOPE */
    struct {
        wire_op op;
        int32_t rows[4];
    } q = {.op = {.code = 1, .id = 0, .parent = -1}, .rows = {1, 0, 0, 0}};
    h = hdr(1, 0, 1, 1);
    CHECK_EQ_INT(send_raw(&h, &q, sizeof q.op + sizeof q.rows), EKV_EFORMAT);
    /* a capture whose recall fields rank 0 would have refused */
    struct {
        wire_op create, capture;
    } c = {.create = {.code = 1, .id = 0, .parent = -1},
           .capture = {.code = 4, .id = 0, .parent = -1, .n_prompt = 40, .method = KVC_SNAPKV,
                       .budget = 0.5, .recall = KVC_RECALL_MAX + 1}};
    h = hdr(0, 0, 2, 0);
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_EFORMAT);
    c.capture.recall = 2;
    c.capture.recall_no_promote = 7;
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_EFORMAT);
    c.capture.recall_no_promote = 1;
    c.capture.recall_every = KV_RECALL_EVERY_MAX + 1;
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_EFORMAT);
    c.capture.recall_every = 4;
    c.capture.recall_gather = KV_RECALL_GATHER_MAX + 1;
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_EFORMAT);
    c.capture.recall_gather = -1;
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_EFORMAT);
    c.capture.recall_gather = 0; /* well-formed: created, captured, freed at the end */
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_OK);
    c.capture.recall_gather = KV_RECALL_GATHER_DEFAULT;
    CHECK_EQ_INT(send_raw(&h, &c, sizeof c), EKV_OK);
    /* the KV store tier: a save's tokens outside the plan's, or outside
     * the vocabulary; a save of 1 whole block (16 tokens) from block 1; a
     * restore in a plan not its own, or naming another sequence than the
     * plan's; then a well-formed save (this follower has no tier: a no-op) */
    struct {
        wire_op create, save;
        int32_t toks[32];
    } sv = {.create = {.code = 1, .id = 0, .parent = -1},
            .save = {.code = 6, .id = 0, .parent = -1, .tok_off = 0, .n_tok = 32}};
    for (int i = 0; i < 32; i++)
        sv.toks[i] = 100 + i;
    h = hdr(0, 0, 2, 0);
    h.n_toks = 16;
    h.payload_bytes += 16 * 4;
    CHECK_EQ_INT(send_raw(&h, &sv, 2 * sizeof(wire_op) + 16 * 4), EKV_EFORMAT);
    h = hdr(0, 0, 2, 0);
    h.n_toks = 32;
    h.payload_bytes += 32 * 4;
    sv.toks[20] = 1 << 30;
    CHECK_EQ_INT(send_raw(&h, &sv, sizeof sv), EKV_EFORMAT);
    sv.toks[20] = 120;
    sv.save.pos0 = 2; /* 2 whole blocks: blocks 0 and 1 */
    CHECK_EQ_INT(send_raw(&h, &sv, sizeof sv), EKV_EFORMAT);
    sv.save.pos0 = 1;
    sv.save.code = 7; /* a restore in an end plan */
    CHECK_EQ_INT(send_raw(&h, &sv, sizeof sv), EKV_EFORMAT);
    h.kind = 4; /* a restore plan for sequence 1, whose op restores 0 */
    h.arg = 1;
    CHECK_EQ_INT(send_raw(&h, &sv, sizeof sv), EKV_EFORMAT);
    h = hdr(0, 0, 2, 0);
    h.n_toks = 32;
    h.payload_bytes += 32 * 4;
    sv.save.code = 6;
    CHECK_EQ_INT(send_raw(&h, &sv, sizeof sv), EKV_OK);
    h = hdr(0, 0, 1, 0);
    /* create then end: the follower frees it and ends well */
    op = (wire_op){.code = 1, .id = 3, .parent = -1};
    CHECK_EQ_INT(send_raw(&h, &op, sizeof op), EKV_OK);
}

static void test_rank_failure(void)
{
    group gr;
    CHECK(group_start(&gr, small_config(512, 2, 4)));
    ekv_engine *e = leader_engine(&gr);
    if (!e)
        return;
    ekv_error err = {0};
    static req_out out[2];
    memset(out, 0, sizeof out);
    prompt p = topic_prompt(2, "Write a line about %s");
    gen_params gp = greedy(400);
    gp.ignore_eos = true;
    engine_request r = make_request(&p, &gp, &out[0]);
    uint64_t id;
    CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
    CHECK(wait_tokens(&out[0], 2));
    comm_threads_group_abort(gr.g); /* as a rank that died */
    CHECK(wait_done(out, 1));
    CHECK_EQ_INT(out[0].rc, EKV_EUNAVAILABLE);
    CHECK(strstr(out[0].msg, "tensor-parallel group broken") != NULL);
    engine_stats s;
    engine_stats_get(e, &s);
    CHECK_EQ_INT(s.tp_broken, 1);
    CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_EUNAVAILABLE);
    engine_destroy(e);
    group_end(&gr);
    CHECK_EQ_INT(gr.follow_rc, EKV_EUNAVAILABLE);
    free(p.ids);
}

/* Recall under TP: each rank keeps the recall store of its own heads
 * (enabled by the compression the capture op carries), ranks and promotes
 * them itself. Two concurrent requests (promotion on; ranking every 4
 * steps with promotion off; token recall, K = 2) each equal gen_run +
 * gen_follow alone, which enable recall from the same policy on every rank
 * without a plan; the whole-block reference must have recalled and
 * promoted blocks (rank 0's counters), token recall's recalled and
 * promoted none. */
static const char RECALL_TEXT[] =
    "Summarize this passage. The river leaves the mountains as a narrow stream, cold and fast, "
    "cutting through granite and pine. In the valley it slows, spreads into marshes where herons "
    "stand in the reeds, and feeds the orchards of three villages. Each spring the snowmelt "
    "floods the lower fields; the farmers built stone walls and channels to guide the water, "
    "and the mills along the bank grind the grain of the whole province. Near the coast the "
    "river widens into an estuary, brackish and slow, where fishing boats wait for the tide.";

static void test_recall_equals_gen_tp(void)
{
    group gr;
    CHECK(group_start(&gr, small_config(1024, 2, 4)));
    ekv_engine *e = leader_engine(&gr);
    if (!e)
        return;
    ekv_error err = {0};
    static req_out out[3];
    memset(out, 0, sizeof out);
    prompt p = chat_prompt(RECALL_TEXT);
    CHECK(p.n > 120); /* 50% of it leaves blocks to recall beside R = 2 of them */
    gen_params gps[3];
    for (int i = 0; i < 3; i++) {
        gps[i] = greedy(24);
        gps[i].ignore_eos = true;
        gps[i].kv.method = KVC_SNAPKV;
        gps[i].kv.budget = 0.5;
        gps[i].kv.recall = 2;
    }
    gps[1].kv.recall_every = 4;
    gps[1].kv.recall_no_promote = 1;
    gps[2].kv.recall_gather = KV_RECALL_GATHER_DEFAULT; /* the capture op carries K */
    for (int i = 0; i < 3; i++) {
        engine_request r = make_request(&p, &gps[i], &out[i]);
        uint64_t id;
        CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
    }
    CHECK(wait_done(out, 3));
    engine_destroy(e);
    group_end(&gr);
    CHECK_EQ_INT(gr.follow_rc, EKV_OK);
    if (gr.follow_rc)
        fprintf(stderr, "follower: %s\n", gr.follow_err.msg);
    for (int i = 0; i < 3; i++)
        check_equals_ref(&p, &gps[i], &out[i]);
    gen_result ref;
    memset(&ref, 0, sizeof ref);
    CHECK(ref_tp(&p, &gps[0], &ref));
    CHECK(ref.recall.blocks_recalled > 0);
    CHECK(ref.recall.promotions > 0);
    gen_result_free(&ref);
    memset(&ref, 0, sizeof ref);
    CHECK(ref_tp(&p, &gps[2], &ref));
    CHECK(ref.recall.blocks_recalled > 0);
    CHECK_EQ_INT(ref.recall.promotions, 0);
    gen_result_free(&ref);
    free(p.ids);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_malformed_plans);
    RUN_TEST(test_recall_equals_gen_tp);
    RUN_TEST(test_rank_failure);
    RUN_TEST(test_requests_equal_gen_tp);
    harness_fini();
    return TEST_EXIT();
}
