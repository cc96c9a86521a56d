/*
 * test_coordinator_threads.c - the coordinator's streams with the producer
 * and the consumers on different threads, as in `entrokv serve`: client
 * threads submit requests and drain their streams (coord_stream_wait and
 * take), or walk away mid-stream (coord_stream_release, which cancels),
 * while a fake engine thread plays each request's on_tokens and on_done.
 *
 * Every fourth request asks for N_CHOICES choices, whose tokens the engine
 * plays interleaved, one choice after another, each with its own ctx.
 *
 * Checks: every request finishes exactly once; a client that stays gets
 * every token, in order, with its text, and the done record once, each
 * waking its coord_stream_wait (not found when the wait timed out); a client
 * that leaves early costs nothing (the stream is freed by whichever side
 * drops the last reference: ASan sees a use after free or a leak, TSan a
 * race, scripts/tsan.sh). Usage: test_coordinator_threads MODEL.gguf.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ekv_test.h"
#include "entrokv/coordinator.h"
#include "entrokv/gguf.h"
#include "entrokv/metrics.h"

#define N_CLIENTS 4
#define PER_CLIENT 24
#define N_TOKENS 12
#define N_CHOICES 3
#define MAX_REQS (N_CLIENTS * PER_CLIENT)

/* ---- a fake engine on its own thread ---- */

typedef struct job {
    engine_request r;
    uint64_t id;
    void *ctx[N_CHOICES];        /* each choice's (r.choice_ctx is read at submit) */
    int n;
} job;

typedef struct fake_engine {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job queue[MAX_REQS];
    int head, tail;
    bool stop;
    atomic_bool cancelled[MAX_REQS + 1];
    atomic_int done_calls;
    atomic_int cancelled_done;
} fake_engine;

static ekv_status fake_submit(void *impl, const engine_request *r, uint64_t *id, ekv_error *err)
{
    fake_engine *e = impl;
    pthread_mutex_lock(&e->mu);
    if (e->tail == MAX_REQS) {
        pthread_mutex_unlock(&e->mu);
        return ekv_error_set(err, EKV_EBUSY, "fake engine full");
    }
    job *j = &e->queue[e->tail];
    j->r = *r;
    j->r.prompt = NULL; /* the caller's only during submit */
    j->n = r->n > 1 ? r->n : 1;
    for (int i = 0; i < j->n && i < N_CHOICES; i++)
        j->ctx[i] = r->n > 1 ? r->choice_ctx[i] : r->ctx;
    j->id = (uint64_t)++e->tail;
    *id = j->id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return EKV_OK;
}

static void fake_cancel(void *impl, uint64_t id)
{
    fake_engine *e = impl;
    if (id >= 1 && id <= MAX_REQS)
        atomic_store(&e->cancelled[id], true);
}

static void fake_stats(void *impl, engine_stats *s)
{
    (void)impl;
    memset(s, 0, sizeof *s);
}

static const coord_group_ops fake_ops = {fake_submit, fake_cancel, fake_stats, NULL};

/* Token k of every request is id 100 + k with the text "k,". */
static void *engine_main(void *p)
{
    fake_engine *e = p;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (e->head == e->tail && !e->stop)
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->head == e->tail) {
            pthread_mutex_unlock(&e->mu);
            return NULL;
        }
        job j = e->queue[e->head++];
        pthread_mutex_unlock(&e->mu);
        gen_finish finish = GEN_FINISH_LENGTH;
        for (int k = 0; k < N_TOKENS; k++) {
            if (atomic_load(&e->cancelled[j.id])) {
                finish = GEN_FINISH_CANCELLED;
                break;
            }
            int32_t id = 100 + k;
            char text[16];
            int len = snprintf(text, sizeof text, "%d,", k);
            for (int i = 0; i < j.n; i++)
                j.r.on_tokens(j.ctx[i], &id, 1, text, (size_t)len);
            if (k % 3 == 0)
                sched_yield(); /* let a consumer in between tokens */
        }
        if (j.id % 2) { /* the consumer has taken the last token and waits for the end */
            struct timespec pause = {0, 2000000};
            nanosleep(&pause, NULL);
        }
        engine_usage u = {.prompt_tokens = 3, .completion_tokens = N_TOKENS};
        if (finish == GEN_FINISH_CANCELLED)
            atomic_fetch_add(&e->cancelled_done, 1);
        atomic_fetch_add(&e->done_calls, 1);
        for (int i = 0; i < j.n; i++)
            j.r.on_done(j.ctx[i], finish, &u, EKV_OK, NULL);
    }
}

/* ---- clients ---- */

#define WAIT_S 3.0

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct client {
    ekv_coordinator *c;
    int index;
    int bad;            /* wrong tokens, text or done records */
    int finished;       /* requests drained to their done record */
    int left;           /* requests walked away from */
} client;

static bool drain(coord_stream *s, int n_choices, int leave_after)
{
    char expect[256] = "", got[N_CHOICES][256] = {""};
    for (int k = 0; k < N_TOKENS; k++) {
        size_t n = strlen(expect);
        snprintf(expect + n, sizeof expect - n, "%d,", k);
    }
    int n_ids[N_CHOICES] = {0}, dones = 0, lasts = 0;
    bool ok = coord_stream_choices(s) == n_choices;
    while (dones < n_choices) {
        /* the engine answers within milliseconds; a wait that lasts its
         * whole time (and then finds news anyway) was never woken */
        double t0 = now_s();
        if (!coord_stream_wait(s, WAIT_S) || now_s() - t0 >= WAIT_S * 0.95) {
            fprintf(stderr, "a wait lasted %.1f s: the producer's news did not wake it\n",
                    now_s() - t0);
            return false;
        }
        coord_chunk ch;
        coord_stream_take(s, &ch);
        if (ch.index < 0 || ch.index >= n_choices) {
            coord_chunk_free(&ch);
            return false;
        }
        const int c = ch.index;
        for (int32_t i = 0; i < ch.n_ids; i++, n_ids[c]++)
            if (ch.ids[i] != 100 + n_ids[c])
                ok = false;
        if (ch.text_len) {
            size_t n = strlen(got[c]);
            if (n + ch.text_len < sizeof got[c])
                memcpy(got[c] + n, ch.text, ch.text_len + 1);
            else
                ok = false;
        }
        if (ch.done) {
            dones++;
            lasts += ch.last;
            if (ch.rc != EKV_OK || ch.finish != GEN_FINISH_LENGTH || ch.last != (dones == n_choices))
                ok = false;
        }
        coord_chunk_free(&ch);
        if (leave_after >= 0 && n_ids[c] >= leave_after)
            return true; /* the caller releases the stream mid-flight */
    }
    for (int c = 0; c < n_choices; c++)
        if (n_ids[c] != N_TOKENS || strcmp(got[c], expect) != 0)
            ok = false;
    if (lasts != 1)
        ok = false;
    if (coord_stream_take(s, &(coord_chunk){0})) /* nothing after the done record */
        ok = false;
    return ok;
}

static void *client_main(void *p)
{
    client *cl = p;
    for (int i = 0; i < PER_CLIENT; i++) {
        coord_request r;
        coord_request_init(cl->c, &r);
        r.prompt = "Hello there";
        r.prompt_len = strlen(r.prompt);
        r.params.max_tokens = N_TOKENS;
        r.protocol = "test";
        r.n = i % 4 == 1 ? N_CHOICES : 1;
        coord_stream *s = NULL;
        ekv_error err = {0};
        if (coord_submit(cl->c, &r, &s, &err) != EKV_OK) {
            fprintf(stderr, "client %d: submit: %s\n", cl->index, err.msg);
            cl->bad++;
            continue;
        }
        /* every third request is abandoned, after 0 to 2 tokens */
        int leave_after = i % 3 == 2 ? (i / 3) % 3 : -1;
        if (!drain(s, r.n, leave_after)) {
            cl->bad++;
            coord_stream_release(s);
            break; /* one is enough; the counts below show the rest missing */
        } else if (leave_after >= 0)
            cl->left++;
        else
            cl->finished++;
        coord_stream_release(s);
    }
    return NULL;
}

static const ekv_tokenizer *tok;

static void test_streams_across_threads(void)
{
    coord_config cfg;
    coord_config_default(&cfg);
    ekv_metrics *m = metrics_create();
    ekv_error err = {0};
    ekv_coordinator *c = coord_create(tok, &cfg, m, &err);
    CHECK(c != NULL);
    static fake_engine e;
    memset(&e, 0, sizeof e);
    pthread_mutex_init(&e.mu, NULL);
    pthread_cond_init(&e.cv, NULL);
    CHECK_EQ_INT(coord_add_group(c, "fake", &fake_ops, &e, &err), EKV_OK);
    pthread_t eng, cli[N_CLIENTS];
    client cls[N_CLIENTS];
    pthread_create(&eng, NULL, engine_main, &e);
    for (int i = 0; i < N_CLIENTS; i++) {
        cls[i] = (client){.c = c, .index = i};
        pthread_create(&cli[i], NULL, client_main, &cls[i]);
    }
    int finished = 0, left = 0;
    for (int i = 0; i < N_CLIENTS; i++) {
        pthread_join(cli[i], NULL);
        CHECK_EQ_INT(cls[i].bad, 0);
        finished += cls[i].finished;
        left += cls[i].left;
    }
    pthread_mutex_lock(&e.mu);
    e.stop = true;
    pthread_cond_broadcast(&e.cv);
    pthread_mutex_unlock(&e.mu);
    pthread_join(eng, NULL);
    CHECK_EQ_INT(finished, N_CLIENTS * (PER_CLIENT - PER_CLIENT / 3));
    CHECK_EQ_INT(left, N_CLIENTS * (PER_CLIENT / 3));
    /* every request got exactly one on_done, the engine having run them all */
    CHECK_EQ_INT(atomic_load(&e.done_calls), MAX_REQS);
    CHECK_EQ_INT(e.tail, MAX_REQS);
    fprintf(stderr, "  %d drained, %d abandoned (%d of them cancelled before the end)\n",
            finished, left, atomic_load(&e.cancelled_done));
    coord_free(c);
    metrics_free(m);
    pthread_cond_destroy(&e.cv);
    pthread_mutex_destroy(&e.mu);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_coordinator_threads MODEL.gguf\n");
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
    RUN_TEST(test_streams_across_threads);
    tok_free(t);
    return TEST_EXIT();
}
