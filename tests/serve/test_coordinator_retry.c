/*
 * test_coordinator_retry.c - the coordinator's retry path with every party
 * on its own thread, as with remote worker groups (remote.c: each group's
 * gRPC client thread calls on_done, and a resubmission runs on the failed
 * group's thread, inside that on_done, and submits to another group's
 * thread). Meant for ThreadSanitizer (scripts/tsan.sh) and ASan; no UCX,
 * no network, no engine: fake groups play the workers.
 *
 * Each request's seed names its fate (fate_of): served; failed before its
 * first token once (retried on another group; one group refuses retries
 * synchronously, so a refused retry moves on again); failed before its
 * first token while its submit has not even returned yet (the group's
 * thread ran ahead of the submitting client); failed on every group
 * (after each was tried the error ends it); or failed mid-stream, after
 * some tokens (the stream ends with that error, never resubmitted, never
 * hangs). Client threads drain their streams, or walk away mid-flight,
 * right after submit included, so cancels race the resubmissions.
 *
 * Checks, written from the contract in coordinator.h and stream.c's
 * comments: a client that stays sees exactly its fate (every token in
 * order and OK; or the tokens before the failure then one done record with
 * EKV_EUNAVAILABLE; or no token and EKV_EUNAVAILABLE); every job a group
 * took gets exactly one on_done; every cancel a group receives names a job
 * of that group; once all is done every group has nothing in flight.
 * Usage: test_coordinator_retry MODEL.gguf (for the tokenizer).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coord_internal.h"
#include "ekv_test.h"
#include "entrokv/coordinator.h"
#include "entrokv/gguf.h"
#include "entrokv/metrics.h"

#define N_GROUPS 3
#define N_CLIENTS 4
#define PER_CLIENT 40
#define N_TOKENS 8
#define MID_FAIL_AT 3 /* a mid-stream failure comes after this many tokens */
#define N_REQS (N_CLIENTS * PER_CLIENT)
#define MAX_JOBS (N_REQS * (COORD_MAX_RETRIES + 1))
#define WAIT_S 5.0

typedef enum fate {
    F_SERVED,
    F_FAIL_FIRST,      /* fails before its first token on its first group */
    F_FAIL_FIRST_FAST, /* the same, before the client's submit has returned */
    F_FAIL_MID,        /* fails after MID_FAIL_AT tokens */
    F_FAIL_ALL,        /* fails before its first token on every group */
    N_FATES
} fate;

static fate fate_of(uint64_t tag)
{
    return (fate)(tag % N_FATES);
}

static atomic_int attempts[N_REQS]; /* submits seen per request, over all groups */

/* ---- fake worker groups, each with its own thread ---- */

typedef struct job {
    engine_request r;
    uint64_t id;
    int tag, attempt;
    bool done;
} job;

typedef struct group {
    int index;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job q[MAX_JOBS];
    int head, tail;
    bool stop;
    atomic_bool cancelled[MAX_JOBS];
    atomic_int done_calls, bad_cancels, refused;
} group;

static group groups[N_GROUPS];

static ekv_status fake_submit(void *impl, const engine_request *r, uint64_t *id, ekv_error *err)
{
    group *g = impl;
    const int tag = (int)r->params.sampling.seed;
    if (tag < 0 || tag >= N_REQS)
        return ekv_error_set(err, EKV_EINVAL, "no such tag");
    const int attempt = atomic_fetch_add(&attempts[tag], 1);
    /* group 0 refuses every retry of a request that failed first: the
     * retry loop must move on to the next group */
    if (g->index == 0 && attempt > 0 && fate_of((uint64_t)tag) == F_FAIL_FIRST) {
        atomic_fetch_add(&g->refused, 1);
        return ekv_error_set(err, EKV_EBUSY, "group 0 is full");
    }
    pthread_mutex_lock(&g->mu);
    if (g->tail == MAX_JOBS) {
        pthread_mutex_unlock(&g->mu);
        return ekv_error_set(err, EKV_EBUSY, "fake group full");
    }
    const int k = g->tail++;
    job *j = &g->q[k];
    *j = (job){.r = *r, .id = (uint64_t)g->index << 32 | (uint64_t)k, .tag = tag,
               .attempt = attempt};
    j->r.prompt = NULL; /* not ours after submit */
    *id = j->id;
    pthread_cond_broadcast(&g->cv);
    if (fate_of((uint64_t)tag) == F_FAIL_FIRST_FAST && attempt == 0)
        while (!j->done) /* the group's thread fails it before submit returns */
            pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    return EKV_OK;
}

static void fake_cancel(void *impl, uint64_t id)
{
    group *g = impl;
    pthread_mutex_lock(&g->mu);
    const bool ours = (int)(id >> 32) == g->index && (id & 0xffffffffu) < (uint64_t)g->tail;
    pthread_mutex_unlock(&g->mu);
    if (!ours) {
        fprintf(stderr, "group %d was told to cancel job %d of group %d\n", g->index,
                (int)(id & 0xffffffffu), (int)(id >> 32));
        atomic_fetch_add(&g->bad_cancels, 1);
        return;
    }
    atomic_store(&g->cancelled[id & 0xffffffffu], true);
}

static void fake_stats(void *impl, engine_stats *s)
{
    (void)impl;
    memset(s, 0, sizeof *s);
    s->kv_blocks_total = 100;
    s->kv_blocks_free = 90;
}

static const coord_group_ops fake_ops = {fake_submit, fake_cancel, fake_stats, NULL};

/* Token k of every request is id 100 + k with the text "k,". */
static void play(group *g, job *j, int k_job)
{
    const fate f = fate_of((uint64_t)j->tag);
    const bool fail_first = f == F_FAIL_ALL || ((f == F_FAIL_FIRST || f == F_FAIL_FIRST_FAST) &&
                                                j->attempt == 0);
    const int n = fail_first ? 0 : f == F_FAIL_MID ? MID_FAIL_AT : N_TOKENS;
    gen_finish finish = GEN_FINISH_LENGTH;
    int k = 0;
    for (; k < n; k++) {
        if (atomic_load(&g->cancelled[k_job])) {
            finish = GEN_FINISH_CANCELLED;
            break;
        }
        int32_t id = 100 + k;
        char text[16];
        int len = snprintf(text, sizeof text, "%d,", k);
        j->r.on_tokens(j->r.ctx, &id, 1, text, (size_t)len);
        if (k % 2 == 0)
            sched_yield();
    }
    atomic_fetch_add(&g->done_calls, 1);
    engine_usage u = {.prompt_tokens = 3, .completion_tokens = k};
    if (finish == GEN_FINISH_LENGTH && (fail_first || f == F_FAIL_MID))
        j->r.on_done(j->r.ctx, GEN_FINISH_CANCELLED, NULL, EKV_EUNAVAILABLE,
                     fail_first ? "worker gone: Socket closed" : "worker died mid-stream");
    else
        j->r.on_done(j->r.ctx, finish, &u, EKV_OK, NULL);
}

static void *group_main(void *p)
{
    group *g = p;
    for (;;) {
        pthread_mutex_lock(&g->mu);
        while (g->head == g->tail && !g->stop)
            pthread_cond_wait(&g->cv, &g->mu);
        if (g->head == g->tail) {
            pthread_mutex_unlock(&g->mu);
            return NULL;
        }
        const int k = g->head++;
        job j = g->q[k];
        pthread_mutex_unlock(&g->mu);
        play(g, &j, k);
        pthread_mutex_lock(&g->mu);
        g->q[k].done = true;
        pthread_cond_broadcast(&g->cv);
        pthread_mutex_unlock(&g->mu);
    }
}

/* ---- clients ---- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct client {
    ekv_coordinator *c;
    int index;
    int bad, stayed, left;
} client;

/* Drains s to its done record and compares it with what tag's fate says
 * the client must see; stops early (true) after leave_after tokens. */
static bool drain(coord_stream *s, int tag, int leave_after)
{
    const fate f = fate_of((uint64_t)tag);
    const int want = f == F_FAIL_ALL ? 0 : f == F_FAIL_MID ? MID_FAIL_AT : N_TOKENS;
    const ekv_status want_rc = f == F_FAIL_ALL || f == F_FAIL_MID ? EKV_EUNAVAILABLE : EKV_OK;
    int n_ids = 0;
    char got[128] = "", expect[128] = "";
    for (int k = 0; k < want; k++) {
        size_t n = strlen(expect);
        snprintf(expect + n, sizeof expect - n, "%d,", k);
    }
    for (;;) {
        if (leave_after >= 0 && n_ids >= leave_after)
            return true;
        double t0 = now_s();
        if (!coord_stream_wait(s, WAIT_S) && now_s() - t0 >= WAIT_S * 0.95) {
            fprintf(stderr, "req %d (fate %d): no news for %.0f s after %d tokens: a hang\n",
                    tag, f, WAIT_S, n_ids);
            return false;
        }
        coord_chunk ch;
        if (!coord_stream_take(s, &ch))
            continue;
        bool ok = true;
        for (int32_t i = 0; i < ch.n_ids; i++, n_ids++)
            ok &= ch.ids[i] == 100 + n_ids;
        if (ch.text_len) {
            size_t n = strlen(got);
            if (n + ch.text_len < sizeof got)
                memcpy(got + n, ch.text, ch.text_len + 1);
            else
                ok = false;
        }
        const bool done = ch.done;
        if (done) {
            ok &= ch.rc == want_rc && n_ids == want && !strcmp(got, expect);
            ok &= want_rc != EKV_OK || ch.finish == GEN_FINISH_LENGTH;
            if (f == F_FAIL_MID)
                ok &= strstr(ch.msg, "mid-stream") != NULL;
            if (!ok)
                fprintf(stderr, "req %d (fate %d): done rc=%d after %d tokens '%s' (%s)\n", tag,
                        f, ch.rc, n_ids, got, ch.msg);
        }
        coord_chunk_free(&ch);
        if (!ok)
            return false;
        if (done)
            return !coord_stream_take(s, &(coord_chunk){0}); /* nothing after the end */
    }
}

static void *client_main(void *p)
{
    client *cl = p;
    for (int i = 0; i < PER_CLIENT; i++) {
        const int tag = cl->index * PER_CLIENT + i;
        coord_request r;
        coord_request_init(cl->c, &r);
        r.prompt = "Hello there";
        r.prompt_len = strlen(r.prompt);
        r.params.max_tokens = N_TOKENS;
        r.params.sampling.seed = (uint64_t)tag;
        r.protocol = "test";
        coord_stream *s = NULL;
        ekv_error err = {0};
        if (coord_submit(cl->c, &r, &s, &err) != EKV_OK) {
            fprintf(stderr, "client %d: submit: %s\n", cl->index, err.msg);
            cl->bad++;
            continue;
        }
        /* every fourth request is abandoned after 0 to 2 tokens (0: at once,
         * while a failed first attempt may be moving to another group) */
        const int leave_after = i % 4 == 3 ? (i / 4) % 3 : -1;
        if (!drain(s, tag, leave_after))
            cl->bad++;
        else if (leave_after >= 0)
            cl->left++;
        else
            cl->stayed++;
        coord_stream_release(s);
    }
    return NULL;
}

static const ekv_tokenizer *tok;

static void test_retries_across_threads(void)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_error err = {0};
    ekv_coordinator *c = coord_create(tok, &cfg, m, &err);
    CHECK(c != NULL);
    if (!c)
        return;
    for (int i = 0; i < N_GROUPS; i++) {
        group *g = &groups[i];
        memset(g, 0, sizeof *g);
        g->index = i;
        pthread_mutex_init(&g->mu, NULL);
        pthread_cond_init(&g->cv, NULL);
        CHECK_EQ_INT(coord_add_group(c, "fake", &fake_ops, g, &err), EKV_OK);
        pthread_create(&g->thread, NULL, group_main, g);
    }
    pthread_t cli[N_CLIENTS];
    client cls[N_CLIENTS];
    for (int i = 0; i < N_CLIENTS; i++) {
        cls[i] = (client){.c = c, .index = i};
        pthread_create(&cli[i], NULL, client_main, &cls[i]);
    }
    int stayed = 0, left = 0;
    for (int i = 0; i < N_CLIENTS; i++) {
        pthread_join(cli[i], NULL);
        CHECK_EQ_INT(cls[i].bad, 0);
        stayed += cls[i].stayed;
        left += cls[i].left;
    }
    int jobs = 0, done_calls = 0, refused = 0;
    for (int i = 0; i < N_GROUPS; i++) {
        group *g = &groups[i];
        pthread_mutex_lock(&g->mu);
        g->stop = true;
        pthread_cond_broadcast(&g->cv);
        pthread_mutex_unlock(&g->mu);
        pthread_join(g->thread, NULL);
        jobs += g->tail;
        done_calls += atomic_load(&g->done_calls);
        refused += atomic_load(&g->refused);
        CHECK_EQ_INT(atomic_load(&g->bad_cancels), 0);
    }
    CHECK_EQ_INT(stayed + left, N_REQS);
    /* every job a group took ended exactly once */
    CHECK_EQ_INT(done_calls, jobs);
    /* a request that failed first ran again elsewhere: more jobs than requests */
    CHECK(jobs > N_REQS);
    CHECK(refused > 0);
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < N_GROUPS; i++)
        CHECK_EQ_INT(c->groups[i].in_flight, 0);
    pthread_mutex_unlock(&c->mu);
    fprintf(stderr, "  %d requests (%d drained, %d abandoned), %d jobs on %d groups, %d retries "
                    "refused\n",
            N_REQS, stayed, left, jobs, N_GROUPS, refused);
    coord_free(c);
    metrics_free(m);
    for (int i = 0; i < N_GROUPS; i++) {
        pthread_cond_destroy(&groups[i].cv);
        pthread_mutex_destroy(&groups[i].mu);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_coordinator_retry MODEL.gguf\n");
        return 2;
    }
    ekv_error err = {0};
    gguf_file *f = gguf_open(argv[1], &err);
    ekv_tokenizer *t = f ? tok_load(f, &err) : NULL;
    gguf_close(f);
    tok = t;
    if (!t) {
        fprintf(stderr, "loading the tokenizer of %s: %s\n", argv[1], err.msg);
        return 1;
    }
    RUN_TEST(test_retries_across_threads);
    tok_free(t);
    return TEST_EXIT();
}
