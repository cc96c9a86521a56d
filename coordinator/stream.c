/*
 * stream.c - one request's stream between a worker group's callbacks (the
 * producer, on the engine thread) and a protocol server (the consumer).
 *
 * The producer appends tokens and text and finally the done record; the
 * consumer takes everything new at once, so a slow client gets its tokens
 * coalesced into fewer messages instead of an ever-growing queue of them.
 * Two references keep the stream alive: the caller's (dropped by
 * coord_stream_release) and the group's (dropped after on_done).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coord_internal.h"

coord_stream *coord_stream_new(ekv_coordinator *c, int group, int32_t n_prompt,
                               int32_t n_choices, const char *protocol)
{
    if (n_choices < 1)
        n_choices = 1;
    coord_stream *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->ch = calloc((size_t)n_choices, sizeof *s->ch);
    s->ctxs = calloc((size_t)n_choices, sizeof *s->ctxs);
    if (!s->ch || !s->ctxs) {
        free(s->ch);
        free(s->ctxs);
        free(s);
        return NULL;
    }
    for (int32_t i = 0; i < n_choices; i++) {
        s->ch[i].s = s;
        s->ch[i].index = i;
        s->ctxs[i] = &s->ch[i];
    }
    s->n_choices = n_choices;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->mu, NULL);
    s->refs = 1 + n_choices;
    s->coord = c;
    s->group = group;
    s->id = atomic_fetch_add(&c->next_id, 1) + 1;
    s->n_prompt = n_prompt;
    s->protocol = protocol ? protocol : "?";
    s->armed = true;
    s->t_submit = gen_now();
    return s;
}

static void retry_free(coord_retry *r)
{
    if (!r)
        return;
    grammar_release(r->er.params.grammar);
    free(r->ids);
    free(r->stops);
    free(r);
}

bool coord_stream_keep_request(coord_stream *s, const int32_t *ids, int32_t n,
                               const engine_request *er)
{
    size_t bytes = er->params.n_stops * sizeof(char *);
    for (size_t i = 0; i < er->params.n_stops; i++)
        bytes += strlen(er->params.stops[i]) + 1;
    coord_retry *r = calloc(1, sizeof *r);
    if (r) {
        r->ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *ids);
        r->stops = malloc(bytes ? bytes : 1);
    }
    if (!r || !r->ids || !r->stops) {
        retry_free(r);
        return false;
    }
    memcpy(r->ids, ids, (size_t)n * sizeof *ids);
    r->n = n;
    char *text = (char *)(r->stops + er->params.n_stops);
    for (size_t i = 0; i < er->params.n_stops; i++) {
        size_t len = strlen(er->params.stops[i]) + 1;
        memcpy(text, er->params.stops[i], len);
        r->stops[i] = text;
        text += len;
    }
    r->er = *er;
    r->er.prompt = r->ids;
    r->er.params.stops = (const char *const *)r->stops;
    grammar_retain(r->er.params.grammar);
    s->retry = r;
    return true;
}

static void stream_free(coord_stream *s)
{
    retry_free(s->retry);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    for (int32_t i = 0; i < s->n_choices; i++) {
        free(s->ch[i].ids);
        free(s->ch[i].text);
        free(s->ch[i].lps);
        free(s->ch[i].plps);
    }
    free(s->ch);
    free(s->ctxs);
    free(s);
}

void coord_stream_discard(coord_stream *s)
{
    if (s)
        stream_free(s);
}

uint64_t coord_stream_id(const coord_stream *s)
{
    return s->id;
}

int32_t coord_stream_prompt_tokens(const coord_stream *s)
{
    return s->n_prompt;
}

void coord_stream_set_submitted(coord_stream *s, uint64_t engine_id)
{
    pthread_mutex_lock(&s->mu);
    /* The group's thread may have run ahead of this one: the request failed
     * there and resubmit moved it to another group, whose engine id it set.
     * engine_id is the failed group's and must not replace it (a cancel
     * would go to the new group naming another of its requests). */
    const bool moved = s->retry && s->retry->attempts > 0;
    bool cancel = false;
    if (!moved) {
        s->engine_id = engine_id;
        s->submitted = true;
        cancel = s->cancel_wanted && !s->cancel_sent && s->n_done < s->n_choices;
        s->cancel_sent |= cancel;
    }
    const int group = s->group;
    pthread_mutex_unlock(&s->mu);
    if (cancel) { /* cancelled (a buffer lost) before the submit returned */
        coord_group *g = &s->coord->groups[group];
        g->ops->cancel(g->impl, engine_id);
    }
}

int32_t coord_stream_choices(const coord_stream *s)
{
    return s->n_choices;
}

static bool choice_has_new(const coord_choice *ch)
{
    return ch->n_ids > 0 || ch->text_len > 0 || ch->n_plps > 0 || (ch->done && !ch->done_taken);
}

static bool has_new(const coord_stream *s)
{
    for (int32_t i = 0; i < s->n_choices; i++)
        if (choice_has_new(&s->ch[i]))
            return true;
    return false;
}

/* With s->mu held: tells the consumer, once per take. */
static void signal_consumer(coord_stream *s)
{
    pthread_cond_broadcast(&s->cv);
    if (s->notify && s->armed) {
        s->armed = false;
        s->notify(s->notify_ctx);
    }
}

static bool append(coord_choice *s, const int32_t *ids, int32_t n, const char *text, size_t len)
{
    if (s->n_ids + n > s->cap_ids) {
        int32_t cap = s->cap_ids ? s->cap_ids : 16;
        while (cap < s->n_ids + n)
            cap *= 2;
        int32_t *p = realloc(s->ids, (size_t)cap * sizeof *p);
        if (!p)
            return false;
        s->ids = p;
        s->cap_ids = cap;
    }
    if (s->text_len + len + 1 > s->text_cap) {
        size_t cap = s->text_cap ? s->text_cap : 256;
        while (cap < s->text_len + len + 1)
            cap *= 2;
        char *p = realloc(s->text, cap);
        if (!p)
            return false;
        s->text = p;
        s->text_cap = cap;
    }
    if (n > 0)
        memcpy(s->ids + s->n_ids, ids, (size_t)n * sizeof *ids);
    s->n_ids += n;
    if (len > 0)
        memcpy(s->text + s->text_len, text, len);
    s->text_len += len;
    s->text[s->text_len] = 0;
    return true;
}

/* TTFT once per request (its first token of any choice); the inter-token
 * gaps per choice, each choice being a sequence of its own. */
static void observe_timing(coord_choice *ch, int32_t n)
{
    coord_stream *s = ch->s;
    ekv_metrics *m = s->coord->metrics;
    double now = gen_now();
    if (n <= 0)
        return;
    if (!s->got_first) {
        s->got_first = true;
        metrics_observe_ttft(m, now - s->t_submit);
    }
    if (!ch->got_first) {
        ch->got_first = true;
        if (n > 1)
            metrics_observe_itl(m, 0, n - 1);
    } else {
        metrics_observe_itl(m, (now - ch->t_last) / n, n);
    }
    ch->t_last = now;
}

static bool append_lps(ekv_logprob **v, int32_t *n, int32_t *cap, const ekv_logprob *lp,
                       int32_t k)
{
    if (*n + k > *cap) {
        int32_t c = *cap ? *cap : 16;
        while (c < *n + k)
            c *= 2;
        ekv_logprob *p = realloc(*v, (size_t)c * sizeof *p);
        if (!p)
            return false;
        *v = p;
        *cap = c;
    }
    memcpy(*v + *n, lp, (size_t)k * sizeof *lp);
    *n += k;
    return true;
}

/* A generated token's entry comes just before the on_tokens carrying its
 * id, so the consumer is told with that; take keeps the two aligned. */
void coord_stream_on_logprobs(void *ctx, const ekv_logprob *lp, int32_t n, bool prompt)
{
    coord_choice *ch = ctx;
    coord_stream *s = ch->s;
    if (n <= 0)
        return;
    pthread_mutex_lock(&s->mu);
    s->produced = true;
    if (!s->lost && !(prompt ? append_lps(&ch->plps, &ch->n_plps, &ch->cap_plps, lp, n)
                             : append_lps(&ch->lps, &ch->n_lps, &ch->cap_lps, lp, n)))
        s->lost = true;
    bool lost = s->lost;
    if (prompt)
        signal_consumer(s);
    pthread_mutex_unlock(&s->mu);
    if (lost)
        coord_stream_cancel(s);
}

void coord_stream_on_tokens(void *ctx, const int32_t *ids, int32_t n, const char *text,
                            size_t len)
{
    coord_choice *ch = ctx;
    coord_stream *s = ch->s;
    pthread_mutex_lock(&s->mu);
    s->produced |= n > 0 || len > 0;
    observe_timing(ch, n);
    if (!s->lost && !append(ch, ids, n > 0 ? n : 0, text, len))
        s->lost = true;
    bool lost = s->lost;
    signal_consumer(s);
    pthread_mutex_unlock(&s->mu);
    if (lost)
        coord_stream_cancel(s); /* the group's reference keeps s alive until on_done */
}

static metrics_status done_status(gen_finish finish, ekv_status rc)
{
    if (rc == EKV_EBUSY) /* a remote worker's queue was full */
        return METRICS_REJECTED;
    if (rc == EKV_EUNAVAILABLE) /* a remote worker failed */
        return METRICS_ERROR;
    if (rc == EKV_EINVAL)
        return METRICS_INVALID;
    if (rc != EKV_OK)
        return METRICS_ERROR;
    return finish == GEN_FINISH_CANCELLED ? METRICS_CANCELLED : METRICS_OK;
}

/* The failed group's request submitted to another healthy group, if it
 * produced nothing yet (the client has seen nothing, so it cannot tell) and
 * attempts remain; true when a group took it. On the failed group's
 * thread, inside its on_done. */
static bool resubmit(coord_stream *s, const char *why)
{
    ekv_coordinator *c = s->coord;
    pthread_mutex_lock(&s->mu);
    coord_retry *r = s->retry;
    const int failed = s->group;
    if (!r || s->produced || s->cancel_wanted || s->n_done > 0) {
        pthread_mutex_unlock(&s->mu);
        return false;
    }
    s->refs++; /* the new group's on_done may finish s before we are done with it */
    r->tried |= 1ull << failed;
    pthread_mutex_unlock(&s->mu);
    /* r's ids and er are read-only from here; tried and attempts change
     * under s->mu, as the new group may fail and retry on its own thread */
    bool taken = false;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        const uint64_t tried = r->tried;
        const bool more = !taken && r->attempts < COORD_MAX_RETRIES;
        pthread_mutex_unlock(&s->mu);
        int g = more ? coord_route(c, r->ids, r->n, 1, tried) : -1;
        if (g < 0)
            break;
        pthread_mutex_lock(&s->mu);
        const int attempt = ++r->attempts;
        s->group = g;
        s->submitted = false;
        pthread_mutex_unlock(&s->mu);
        metrics_count_retry(c->metrics);
        coord_log("req-%llu retried on group %s (attempt %d): group %s failed before its "
                  "first token: %s",
                  (unsigned long long)s->id, c->groups[g].name, attempt,
                  c->groups[failed].name, why ? why : "");
        uint64_t engine_id = 0;
        ekv_error err = {0};
        if (c->groups[g].ops->submit(c->groups[g].impl, &r->er, &engine_id, &err) != EKV_OK) {
            coord_log("req-%llu: group %s refused the retry: %s", (unsigned long long)s->id,
                      c->groups[g].name, err.msg);
            coord_group_finished(c, g);
            pthread_mutex_lock(&s->mu);
            r->tried |= 1ull << g;
            s->group = failed; /* the failed group's on_done finishes s */
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        taken = true;
        pthread_mutex_lock(&s->mu);
        /* unless the new group already failed and retried in turn */
        bool cancel = false;
        if (r->attempts == attempt && s->n_done == 0) {
            s->engine_id = engine_id;
            s->submitted = true;
            cancel = s->cancel_wanted && !s->cancel_sent;
            s->cancel_sent |= cancel;
        }
        pthread_mutex_unlock(&s->mu);
        if (cancel) /* the client left while the request moved */
            c->groups[g].ops->cancel(c->groups[g].impl, engine_id);
    }
    if (taken)
        coord_group_finished(c, failed);
    else
        coord_log("req-%llu: group %s failed before its first token and no other healthy "
                  "group took it",
                  (unsigned long long)s->id, c->groups[failed].name);
    pthread_mutex_lock(&s->mu);
    bool last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu);
    if (last)
        stream_free(s);
    return taken;
}

/* Once per choice. The request is counted in the metrics once, when its
 * last choice is done; its prompt's tokens once, each choice's completion. */
void coord_stream_on_done(void *ctx, gen_finish finish, const engine_usage *u, ekv_status rc,
                          const char *msg)
{
    coord_choice *ch = ctx;
    coord_stream *s = ch->s;
    ekv_coordinator *c = s->coord;
    if (rc == EKV_EUNAVAILABLE && resubmit(s, msg))
        return;
    engine_usage usage = u ? *u : (engine_usage){0};
    pthread_mutex_lock(&s->mu);
    ch->done = true;
    ch->finish = finish;
    ch->usage = usage;
    ch->rc = rc;
    if (rc == EKV_OK && s->lost) {
        ch->rc = EKV_ENOMEM;
        msg = "out of memory buffering the stream";
    }
    snprintf(ch->msg, sizeof ch->msg, "%s", msg ? msg : "");
    if (s->n_done == 0 || (ch->rc && !s->worst_rc) ||
        (!s->worst_rc && finish == GEN_FINISH_CANCELLED)) {
        s->worst_rc = ch->rc;
        s->worst_finish = finish;
    }
    const bool first = s->n_done == 0;
    const bool all = ++s->n_done == s->n_choices;
    if (all)
        metrics_count_request(c->metrics, done_status(s->worst_finish, s->worst_rc));
    metrics_add_tokens(c->metrics, first ? usage.prompt_tokens : 0, usage.completion_tokens);
    char which[32] = "";
    if (s->n_choices > 1)
        snprintf(which, sizeof which, " choice=%d", ch->index);
    coord_log("req-%llu%s done finish=%s prompt_tokens=%d completion_tokens=%d ttft_s=%.3f "
              "kv_bytes=%lld kv_bytes_full=%lld%s%s",
              (unsigned long long)s->id, which, ch->rc ? "error" : coord_finish_reason(finish),
              usage.prompt_tokens, usage.completion_tokens, usage.ttft_s,
              (long long)usage.kv_bytes, (long long)usage.kv_bytes_full, ch->rc ? " error=" : "",
              ch->rc ? ch->msg : "");
    signal_consumer(s);
    int group = s->group;
    bool last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu); /* s may be freed by its consumer from here on */
    coord_group_finished(c, group);
    if (last)
        stream_free(s);
}

/* Moves choice ch's news into c (under s->mu). */
static void take_choice(coord_stream *s, coord_choice *ch, coord_chunk *c)
{
    c->index = ch->index;
    if (ch->n_ids > 0 || ch->text_len > 0) {
        c->ids = ch->ids;
        c->n_ids = ch->n_ids;
        c->text = ch->text;
        c->text_len = ch->text_len;
        ch->ids = NULL;
        ch->text = NULL;
        ch->n_ids = ch->cap_ids = 0;
        ch->text_len = ch->text_cap = 0;
    }
    if (ch->n_plps > 0) {
        c->prompt_lps = ch->plps;
        c->n_prompt_lps = ch->n_plps;
        ch->plps = NULL;
        ch->n_plps = ch->cap_plps = 0;
    }
    /* the ids' entries only: one may be in ahead of its on_tokens; at the
     * end also an end-of-generation token's, which has no id */
    const int32_t k = ch->done || ch->n_lps < c->n_ids ? ch->n_lps : c->n_ids;
    if (k > 0 && (c->lps = malloc((size_t)k * sizeof *c->lps))) {
        memcpy(c->lps, ch->lps, (size_t)k * sizeof *c->lps);
        c->n_lps = k;
        memmove(ch->lps, ch->lps + k, (size_t)(ch->n_lps - k) * sizeof *ch->lps);
        ch->n_lps -= k;
    } else if (k > 0) {
        s->lost = true; /* (an error at the end: the stream cannot stay aligned) */
        ch->n_lps -= k;
        memmove(ch->lps, ch->lps + k, (size_t)ch->n_lps * sizeof *ch->lps);
    }
    if (ch->done && !ch->done_taken) {
        ch->done_taken = true;
        c->done = true;
        c->finish = ch->finish;
        c->usage = ch->usage;
        c->rc = ch->rc;
        memcpy(c->msg, ch->msg, sizeof c->msg);
        c->last = ++s->n_done_taken == s->n_choices;
    }
}

bool coord_stream_take(coord_stream *s, coord_chunk *c)
{
    memset(c, 0, sizeof *c);
    pthread_mutex_lock(&s->mu);
    bool any = false;
    /* one choice per take, round robin, so none starves the others */
    for (int32_t k = 0; k < s->n_choices && !any; k++) {
        coord_choice *ch = &s->ch[(s->cursor + k) % s->n_choices];
        if (!choice_has_new(ch))
            continue;
        any = true;
        take_choice(s, ch, c);
        s->cursor = (ch->index + 1) % s->n_choices;
    }
    /* re-armed only once nothing is left, so a notify follows any news */
    s->armed = !has_new(s);
    if (!s->armed)
        pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return any;
}

bool coord_stream_wait(coord_stream *s, double timeout_s)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double end = (double)ts.tv_sec + ts.tv_nsec * 1e-9 + (timeout_s > 0 ? timeout_s : 0);
    ts.tv_sec = (time_t)end;
    ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
    pthread_mutex_lock(&s->mu);
    while (!has_new(s)) {
        if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) != 0)
            break;
    }
    bool any = has_new(s);
    pthread_mutex_unlock(&s->mu);
    return any;
}

void coord_stream_set_notify(coord_stream *s, void (*fn)(void *ctx), void *ctx)
{
    pthread_mutex_lock(&s->mu);
    s->notify = fn;
    s->notify_ctx = ctx;
    s->armed = true;
    if (fn && has_new(s)) {
        s->armed = false;
        fn(ctx);
    }
    pthread_mutex_unlock(&s->mu);
}

void coord_stream_cancel(coord_stream *s)
{
    pthread_mutex_lock(&s->mu);
    s->cancel_wanted = true;
    bool send = s->submitted && s->n_done < s->n_choices && !s->cancel_sent;
    if (send)
        s->cancel_sent = true;
    uint64_t engine_id = s->engine_id;
    const int group = s->group; /* under mu: a resubmission moves the request */
    pthread_mutex_unlock(&s->mu);
    if (send) {
        coord_group *g = &s->coord->groups[group];
        g->ops->cancel(g->impl, engine_id);
    }
}

void coord_stream_release(coord_stream *s)
{
    if (!s)
        return;
    coord_stream_cancel(s);
    pthread_mutex_lock(&s->mu);
    s->notify = NULL;
    s->notify_ctx = NULL;
    bool last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu);
    if (last)
        stream_free(s);
}

void coord_chunk_free(coord_chunk *c)
{
    free(c->ids);
    free(c->text);
    free(c->lps);
    free(c->prompt_lps);
    c->ids = NULL;
    c->text = NULL;
    c->lps = c->prompt_lps = NULL;
    c->n_lps = c->n_prompt_lps = 0;
    c->n_ids = 0;
    c->text_len = 0;
}
