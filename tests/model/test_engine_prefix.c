/*
 * test_engine_prefix.c - the step engine with a prefix cache: a stored
 * prefix is restored in the background while the other sequences keep
 * stepping, the request then equals its solo run, and a request cancelled
 * mid-restore discards its job.
 */
#include "engine_harness.h"

/* Keeps the whole blocks of the first prompt saved (every head's blocks,
 * exported) and restores them for a later prompt that starts with all of
 * them. A
 * job lands at once, or, while `hold` is set, only once the test releases
 * it (and calls the engine's wake), so a restore can be kept in flight. */
typedef struct fake_cache {
    pthread_mutex_t mu;
    uint8_t *blocks; /* [n_blocks][layers * kv heads] blocks */
    int32_t *tokens, n_blocks, bt, heads;
    size_t block_bytes;
    bool hold, released;
    void (*wake)(void *);
    void *wake_arg;
    int starts, finishes, discards;
    int32_t restored;
} fake_cache;

static void *fake_start(void *ctx, const int32_t *tokens, int32_t n, int32_t max_tokens,
                        void (*wake)(void *), void *wake_arg)
{
    fake_cache *f = ctx;
    pthread_mutex_lock(&f->mu);
    int32_t b = 0;
    while (b < f->n_blocks && (b + 1) * f->bt <= max_tokens && (b + 1) * f->bt <= n &&
           !memcmp(tokens + (size_t)b * f->bt, f->tokens + (size_t)b * f->bt,
                   (size_t)f->bt * sizeof *tokens))
        b++;
    int32_t want = f->n_blocks;
    if (want > max_tokens / f->bt)
        want = max_tokens / f->bt;
    int32_t *job = NULL; /* only the whole stored prompt: not a shared chat header */
    if (b > 0 && b == want && (job = malloc(sizeof *job))) {
        *job = b;
        f->wake = wake;
        f->wake_arg = wake_arg;
        f->starts++;
    }
    pthread_mutex_unlock(&f->mu);
    return job;
}

static bool fake_ready(void *ctx, void *job)
{
    fake_cache *f = ctx;
    pthread_mutex_lock(&f->mu);
    const bool ready = !f->hold || f->released;
    pthread_mutex_unlock(&f->mu);
    return ready;
}

static int32_t fake_finish(void *ctx, void *job, kv_seq *seq)
{
    fake_cache *f = ctx;
    const int32_t n_blocks = *(int32_t *)job;
    free(job);
    pthread_mutex_lock(&f->mu);
    if (seq)
        f->finishes++;
    else
        f->discards++;
    pthread_mutex_unlock(&f->mu);
    if (!seq)
        return 0;
    const ekv_model_config *c = model_config(g_model);
    for (int32_t b = 0; b < n_blocks; b++)
        for (int32_t l = 0; l < c->n_layers; l++)
            for (int32_t h = 0; h < c->n_kv_heads; h++)
                CHECK(kv_seq_block_import(seq, l, h,
                                          f->blocks + ((size_t)b * f->heads + (size_t)l *
                                                       c->n_kv_heads + h) * f->block_bytes,
                                          f->bt, NULL) == EKV_OK);
    const int32_t got = n_blocks * f->bt;
    pthread_mutex_lock(&f->mu);
    f->restored += got;
    pthread_mutex_unlock(&f->mu);
    return got;
}

static void fake_save(void *ctx, const kv_seq *seq, const int32_t *tokens, int32_t n,
                      int32_t first_block)
{
    fake_cache *f = ctx;
    const ekv_model_config *c = model_config(g_model);
    pthread_mutex_lock(&f->mu);
    if (!f->blocks && n / f->bt > 0) {
        f->n_blocks = n / f->bt;
        f->blocks = malloc((size_t)f->n_blocks * f->heads * f->block_bytes);
        f->tokens = malloc((size_t)f->n_blocks * f->bt * sizeof *tokens);
        memcpy(f->tokens, tokens, (size_t)f->n_blocks * f->bt * sizeof *tokens);
        for (int32_t b = 0; b < f->n_blocks; b++)
            for (int32_t l = 0; l < c->n_layers; l++)
                for (int32_t h = 0; h < c->n_kv_heads; h++)
                    kv_seq_block_export(seq, l, h, b,
                                        f->blocks + ((size_t)b * f->heads + (size_t)l *
                                                     c->n_kv_heads + h) * f->block_bytes);
    }
    pthread_mutex_unlock(&f->mu);
}

static void fake_release(fake_cache *f)
{
    pthread_mutex_lock(&f->mu);
    f->released = true;
    void (*wake)(void *) = f->wake;
    void *arg = f->wake_arg;
    pthread_mutex_unlock(&f->mu);
    if (wake)
        wake(arg);
}

static int fake_count(fake_cache *f, const int *field)
{
    pthread_mutex_lock(&f->mu);
    const int v = *field;
    pthread_mutex_unlock(&f->mu);
    return v;
}

/* A second request with a stored prefix restores it in the background: while
 * its restore is held in flight, another sequence keeps decoding; once it
 * lands, the request gives exactly its solo tokens. A request cancelled
 * while restoring finishes at once and its restore is discarded. */
static void test_prefix_restore_runs_in_the_background(void)
{
    static fake_cache f = {.mu = PTHREAD_MUTEX_INITIALIZER};
    const ekv_model_config *c = model_config(g_model);
    f.bt = kv_pool_block_tokens(g_kv);
    f.heads = c->n_layers * c->n_kv_heads;
    f.block_bytes = kv_pool_block_bytes(g_kv);
    engine_prefix_cache pc = {fake_start, fake_ready, fake_finish, fake_save, &f, NULL};
    engine_config cfg = small_config(4096, 4, 8);
    cfg.prefix_cache = &pc;
    ekv_error err = {0};
    ekv_engine *e = engine_create(g_model, &cfg, &err);
    CHECK(e != NULL);
    if (!e)
        return;
    prompt doc = chat_prompt("Here is a list of things: the moon, bread, rivers, the violin, owls, "
                             "glass, volcanoes, chess, honey, the desert, comets, paper, tigers, "
                             "rain, copper and bicycles. Which of them is the heaviest?");
    prompt other = topic_prompt(3, "Write a long story about %s.");
    CHECK(doc.n > 48);
    static req_out out[4];
    memset(out, 0, sizeof out);
    gen_params g8 = greedy(8), g40 = greedy(40);
    g40.ignore_eos = true;
    /* turn 1 stores the prefix */
    engine_request r = make_request(&doc, &g8, &out[0]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    CHECK(wait_done(&out[0], 1));
    CHECK_EQ_INT(f.n_blocks, doc.n / f.bt);
    /* another sequence decodes; turn 2's restore is held in flight */
    pthread_mutex_lock(&f.mu);
    f.hold = true;
    pthread_mutex_unlock(&f.mu);
    r = make_request(&other, &g40, &out[1]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    CHECK(wait_tokens(&out[1], 2));
    r = make_request(&doc, &g8, &out[2]);
    CHECK_EQ_INT(engine_submit(e, &r, NULL, &err), EKV_OK);
    while (fake_count(&f, &f.starts) < 1)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    pthread_mutex_lock(&g_mu);
    const int32_t before = out[1].n_ids;
    pthread_mutex_unlock(&g_mu);
    CHECK(wait_tokens(&out[1], before + 10)); /* not stalled by the restore */
    pthread_mutex_lock(&g_mu);
    CHECK_EQ_INT(out[2].n_ids, 0); /* still waiting for its prefix */
    pthread_mutex_unlock(&g_mu);
    fake_release(&f);
    CHECK(wait_done(&out[1], 2));
    CHECK_EQ_INT(fake_count(&f, &f.finishes), 1);
    CHECK_EQ_INT(f.restored, f.n_blocks * f.bt);
    /* cancelled while restoring: finishes, the restore is discarded */
    pthread_mutex_lock(&f.mu);
    f.released = false;
    pthread_mutex_unlock(&f.mu);
    uint64_t id = 0;
    r = make_request(&doc, &g8, &out[3]);
    CHECK_EQ_INT(engine_submit(e, &r, &id, &err), EKV_OK);
    while (fake_count(&f, &f.starts) < 2)
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    engine_cancel(e, id);
    CHECK(wait_done(&out[3], 1));
    CHECK_EQ_INT(out[3].finish, GEN_FINISH_CANCELLED);
    CHECK_EQ_INT(fake_count(&f, &f.discards), 1);
    check_idle_pool(e);
    engine_destroy(e);
    check_equals_solo(&doc, &g8, &out[2]);
    check_equals_solo(&other, &g40, &out[1]);
    free(doc.ids);
    free(other.ids);
    free(f.blocks);
    free(f.tokens);
}

int main(int argc, char **argv)
{
    if (!harness_init(argc, argv))
        return 1;
    RUN_TEST(test_prefix_restore_runs_in_the_background);
    harness_fini();
    return TEST_EXIT();
}
