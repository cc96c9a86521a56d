/*
 * coordinator.c - request checks, tokenization and routing to worker groups
 * (see coordinator.h). The protocol servers turn their wire formats into a
 * coord_request and everything after that is shared, so gRPC and HTTP reject
 * exactly the same inputs with the same messages.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "coord_internal.h"
#include "entrokv/kvrecall.h"

void coord_config_default(coord_config *c)
{
    memset(c, 0, sizeof *c);
    c->model_name = "model";
    c->max_ctx = 2048;
    c->default_max_tokens = 256;
    c->default_kv_budget = 1.0;
}

ekv_coordinator *coord_create(const ekv_tokenizer *tok, const coord_config *cfg,
                              ekv_metrics *metrics, ekv_error *err)
{
    if (!tok || !cfg || cfg->max_ctx < 2 || cfg->default_max_tokens < 1) {
        ekv_error_set(err, EKV_EINVAL, "coordinator: bad configuration");
        return NULL;
    }
    /* the default kv policy is checked once here, as a request's would be */
    kvc_policy kv_default;
    const char *kv_method = cfg->default_kv_method ? cfg->default_kv_method : "";
    if (strlen(kv_method) >= 32) {
        ekv_error_set(err, EKV_EINVAL, "unknown kv method '%.40s'", kv_method);
        return NULL;
    }
    if (kvc_policy_parse(kv_method, cfg->default_kv_budget, &kv_default, err))
        return NULL;
    ekv_coordinator *c = calloc(1, sizeof *c);
    if (!c) {
        ekv_error_set(err, EKV_ENOMEM, "coordinator: out of memory");
        return NULL;
    }
    c->tok = tok;
    snprintf(c->model_name, sizeof c->model_name, "%s",
             cfg->model_name && *cfg->model_name ? cfg->model_name : "model");
    snprintf(c->model_identity, sizeof c->model_identity, "%s",
             cfg->model_identity ? cfg->model_identity : "");
    c->max_ctx = cfg->max_ctx;
    c->max_prompt_bytes = cfg->max_prompt_bytes ? cfg->max_prompt_bytes : COORD_MAX_PROMPT_BYTES;
    c->default_max_tokens = cfg->default_max_tokens;
    snprintf(c->default_kv_method, sizeof c->default_kv_method, "%s", kv_method);
    c->default_kv_budget = cfg->default_kv_budget;
    c->uncomp_profile = cfg->uncomp_profile;
    c->metrics = metrics;
    atomic_init(&c->draining, false);
    atomic_init(&c->shutting_down, false);
    atomic_init(&c->next_id, 0);
    pthread_mutex_init(&c->groups_mu, NULL);
    pthread_mutex_init(&c->mu, NULL);
    for (int i = 0; i < COORD_AFFINITY_SLOTS; i++)
        c->affinity[i].group = -1;
    return c;
}

void coord_free(ekv_coordinator *c)
{
    if (!c)
        return;
    coord_discovery_free(c->discovery); /* first: its thread adds and frees groups */
    for (int i = 0; i < c->n_groups; i++)
        if (c->groups[i].state != GROUP_FREE && c->groups[i].ops->destroy)
            c->groups[i].ops->destroy(c->groups[i].impl);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->groups_mu);
    free(c);
}

ekv_status coord_add_group_slot(ekv_coordinator *c, const char *name, const coord_group_ops *ops,
                                void *impl, bool healthy, int *slot, ekv_error *err)
{
    pthread_mutex_lock(&c->groups_mu);
    pthread_mutex_lock(&c->mu);
    int i = 0;
    while (i < c->n_groups && c->groups[i].state != GROUP_FREE)
        i++;
    if (i == COORD_MAX_GROUPS) {
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_unlock(&c->groups_mu);
        return ekv_error_set(err, EKV_ERANGE, "at most %d worker groups", COORD_MAX_GROUPS);
    }
    coord_group *g = &c->groups[i];
    snprintf(g->name, sizeof g->name, "%s", name ? name : "group");
    g->ops = ops;
    g->impl = impl;
    g->in_flight = 0;
    g->idle_reaps = 0;
    atomic_store(&g->healthy, healthy);
    g->state = GROUP_ACTIVE;
    if (i == c->n_groups)
        c->n_groups++;
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->groups_mu);
    if (slot)
        *slot = i;
    return EKV_OK;
}

ekv_status coord_add_group(ekv_coordinator *c, const char *name, const coord_group_ops *ops,
                           void *impl, ekv_error *err)
{
    return coord_add_group_slot(c, name, ops, impl, true, NULL, err);
}

void coord_set_group_healthy(ekv_coordinator *c, const void *impl, bool healthy)
{
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_groups; i++)
        if (c->groups[i].state != GROUP_FREE && c->groups[i].impl == impl)
            atomic_store(&c->groups[i].healthy, healthy);
    pthread_mutex_unlock(&c->mu);
}

void coord_retire_group(ekv_coordinator *c, int slot)
{
    pthread_mutex_lock(&c->groups_mu);
    pthread_mutex_lock(&c->mu);
    if (c->groups[slot].state == GROUP_ACTIVE) {
        c->groups[slot].state = GROUP_RETIRING;
        c->groups[slot].idle_reaps = 0;
    }
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->groups_mu);
}

void coord_reap_groups(ekv_coordinator *c)
{
    coord_group freed[COORD_MAX_GROUPS];
    int n = 0;
    pthread_mutex_lock(&c->groups_mu);
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->n_groups; i++) {
        coord_group *g = &c->groups[i];
        if (g->state != GROUP_RETIRING)
            continue;
        g->idle_reaps = g->in_flight == 0 ? g->idle_reaps + 1 : 0;
        if (g->idle_reaps >= 2) {
            freed[n++] = *g;
            g->state = GROUP_FREE;
        }
    }
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->groups_mu);
    for (int i = 0; i < n; i++) {
        coord_log("coordinator: worker group %s freed", freed[i].name);
        if (freed[i].ops->destroy)
            freed[i].ops->destroy(freed[i].impl);
    }
}

static bool engine_group_broken(const coord_group *g);

bool coord_ready(ekv_coordinator *c, char *why, size_t cap)
{
    const char *reason = NULL;
    if (atomic_load(&c->shutting_down) || atomic_load(&c->draining)) {
        reason = "draining";
    } else {
        bool any = false;
        pthread_mutex_lock(&c->mu);
        for (int i = 0; i < c->n_groups && !any; i++)
            any = c->groups[i].state == GROUP_ACTIVE && atomic_load(&c->groups[i].healthy) &&
                  !engine_group_broken(&c->groups[i]);
        pthread_mutex_unlock(&c->mu);
        if (!any)
            reason = "no healthy worker group";
    }
    if (why && cap)
        snprintf(why, cap, "%s", reason ? reason : "");
    return !reason;
}

void coord_begin_shutdown(ekv_coordinator *c)
{
    atomic_store(&c->shutting_down, true);
}

/* ---- the in-process engine as a group ---- */

static ekv_status engine_group_submit(void *impl, const engine_request *r, uint64_t *id,
                                      ekv_error *err)
{
    return engine_submit(impl, r, id, err);
}

static void engine_group_cancel(void *impl, uint64_t id)
{
    engine_cancel(impl, id);
}

static void engine_group_stats(void *impl, engine_stats *s)
{
    engine_stats_get(impl, s);
}

static const coord_group_ops engine_group_ops = {
    .submit = engine_group_submit,
    .cancel = engine_group_cancel,
    .stats = engine_group_stats,
};

/* An in-process engine leading a tensor-parallel group that has lost a
 * rank (engine.h: tp_broken) serves nothing more: not ready. */
static bool engine_group_broken(const coord_group *g)
{
    if (g->ops != &engine_group_ops)
        return false;
    engine_stats s;
    engine_stats_get(g->impl, &s);
    return s.tp_broken != 0;
}

ekv_status coord_add_engine(ekv_coordinator *c, const char *name, ekv_engine *e,
                            ekv_error *err)
{
    return coord_add_group(c, name, &engine_group_ops, e, err);
}

const char *coord_model_name(const ekv_coordinator *c)
{
    return c->model_name;
}

const char *coord_model_identity(const ekv_coordinator *c)
{
    return c->model_identity;
}

int32_t coord_max_ctx(const ekv_coordinator *c)
{
    return c->max_ctx;
}

ekv_metrics *coord_metrics(ekv_coordinator *c)
{
    return c->metrics;
}

void coord_gauges(ekv_coordinator *c, metrics_gauges *g)
{
    engine_stats s;
    coord_stats(c, &s);
    memset(g, 0, sizeof *g);
    g->queue_depth = s.queued;
    g->running_sequences = s.running;
    g->kv_blocks_used = s.kv_blocks_total - s.kv_blocks_free;
    g->kv_blocks_free = s.kv_blocks_free;
    g->kv_bytes_saved = s.kv_bytes_saved;
    g->kv_bytes_saved_by[0] = s.kv_bytes_saved_tokens;
    g->kv_bytes_saved_by[1] = s.kv_bytes_saved_channels;
    g->kv_bytes_saved_by[2] = s.kv_bytes_saved_decode;
    g->kv_blocks_shared = s.kv_blocks_shared;
    g->kv_cow_copies = (int64_t)s.kv_cow_copies;
    g->preemptions = (int64_t)s.preemptions;
    g->recall_blocks = s.recall_blocks;
    g->recall_bytes = s.recall_bytes;
    g->recall_deadline_misses = s.recall_deadline_misses;
    g->recall_promotions = s.recall_promotions;
    g->recall_spilled_blocks = s.recall_spilled_blocks;
    g->recall_rankings = s.recall_rankings;
}

void coord_stats(ekv_coordinator *c, engine_stats *sum)
{
    memset(sum, 0, sizeof *sum);
    pthread_mutex_lock(&c->groups_mu);
    for (int i = 0; i < c->n_groups; i++) {
        if (c->groups[i].state == GROUP_FREE)
            continue;
        engine_stats s = {0};
        c->groups[i].ops->stats(c->groups[i].impl, &s);
        sum->queued += s.queued;
        sum->running += s.running;
        sum->kv_blocks_total += s.kv_blocks_total;
        sum->kv_blocks_free += s.kv_blocks_free;
        sum->kv_bytes_saved += s.kv_bytes_saved;
        sum->kv_bytes_saved_tokens += s.kv_bytes_saved_tokens;
        sum->kv_bytes_saved_channels += s.kv_bytes_saved_channels;
        sum->kv_bytes_saved_decode += s.kv_bytes_saved_decode;
        sum->preemptions += s.preemptions;
        sum->steps += s.steps;
        sum->kv_blocks_shared += s.kv_blocks_shared;
        sum->kv_cow_copies += s.kv_cow_copies;
        sum->recall_blocks += s.recall_blocks;
        sum->recall_bytes += s.recall_bytes;
        sum->recall_deadline_misses += s.recall_deadline_misses;
        sum->recall_promotions += s.recall_promotions;
        sum->recall_spilled_blocks += s.recall_spilled_blocks;
        sum->recall_rankings += s.recall_rankings;
        sum->tp_broken |= s.tp_broken;
    }
    pthread_mutex_unlock(&c->groups_mu);
}

void coord_drain(ekv_coordinator *c)
{
    atomic_store(&c->draining, true);
}

bool coord_draining(const ekv_coordinator *c)
{
    return atomic_load(&c->draining);
}

void coord_request_init(const ekv_coordinator *c, coord_request *r)
{
    memset(r, 0, sizeof *r);
    gen_params_default(&r->params);
    r->params.max_tokens = c->default_max_tokens;
    /* Without a seed every request draws differently, as OpenAI's API does. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    r->params.sampling.seed = ((uint64_t)ts.tv_sec * 1000000007u) ^ (uint64_t)ts.tv_nsec ^
                              (atomic_load(&((ekv_coordinator *)c)->next_id) << 32);
    r->kv_method = c->default_kv_method[0] ? c->default_kv_method : NULL;
    r->kv_budget = c->default_kv_budget;
    r->scope_recent = 256; /* SCOPE's R and W (specs/scope.md section 5) */
    r->scope_window = 512;
    r->recall_gather = KV_RECALL_GATHER_DEFAULT; /* token recall (docs/COMPRESSION.md) */
}

const char *coord_finish_reason(gen_finish f)
{
    switch (f) {
    case GEN_FINISH_LENGTH: return "length";
    case GEN_FINISH_EOS:
    case GEN_FINISH_STOP: return "stop";
    case GEN_FINISH_CONTEXT: return "context";
    case GEN_FINISH_CANCELLED: return "cancelled";
    }
    return "stop";
}

void coord_log(const char *fmt, ...)
{
    char line[1024];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(line, sizeof line, "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(line + n, sizeof line - n, ".%03dZ entrokv: ", (int)(tv.tv_usec / 1000));
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    if (k < 0)
        k = 0;
    n += (size_t)k < sizeof line - n - 1 ? (size_t)k : sizeof line - n - 2;
    line[n++] = '\n';
    /* one write(2) per line so lines from different threads never interleave */
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}

bool coord_utf8_valid(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        unsigned cp, min;
        if ((c & 0xE0) == 0xC0) {
            n = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            n = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            n = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (i + n > len)
            return false;
        for (size_t k = 1; k < n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += n;
    }
    return true;
}

/* ---- checks and tokenization ---- */

/* A lower layer's rejection of the request's content, message kept. */
static ekv_status as_invalid(ekv_error *err)
{
    if (err)
        err->code = EKV_EINVAL;
    return EKV_EINVAL;
}

static ekv_status check_messages(const coord_request *r, ekv_error *err)
{
    for (size_t i = 0; i < r->n_messages; i++) {
        const tok_message *m = &r->messages[i];
        if (!m->role || !*m->role)
            return ekv_error_set(err, EKV_EINVAL, "messages[%zu].role is empty", i);
        /* the chat template knows these three; any other role would render
         * as text the model was never trained on */
        if (strcmp(m->role, "system") && strcmp(m->role, "user") && strcmp(m->role, "assistant"))
            return ekv_error_set(err, EKV_EINVAL,
                                 "messages[%zu].role must be system, user or assistant", i);
        if (!m->content)
            return ekv_error_set(err, EKV_EINVAL, "messages[%zu].content is missing", i);
        if (!coord_utf8_valid(m->role, strlen(m->role)) ||
            !coord_utf8_valid(m->content, strlen(m->content)))
            return ekv_error_set(err, EKV_EINVAL, "messages[%zu] is not valid UTF-8", i);
    }
    return EKV_OK;
}

/* The prompt's token ids: raw text (BOS as the model wants, special-token
 * texts left as text) or chat messages through the model's template. */
static ekv_status copy_ids(ekv_coordinator *c, const coord_request *r, int32_t **ids, size_t *n,
                           ekv_error *err)
{
    int32_t vocab = tok_vocab_size(c->tok);
    for (size_t i = 0; i < r->n_prompt_ids; i++)
        if (r->prompt_ids[i] < 0 || r->prompt_ids[i] >= vocab)
            return ekv_error_set(err, EKV_EINVAL, "prompt_ids[%zu] = %d is outside the vocabulary",
                                 i, r->prompt_ids[i]);
    *ids = malloc((r->n_prompt_ids ? r->n_prompt_ids : 1) * sizeof **ids);
    if (!*ids)
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    if (r->n_prompt_ids)
        memcpy(*ids, r->prompt_ids, r->n_prompt_ids * sizeof **ids);
    *n = r->n_prompt_ids;
    return EKV_OK;
}

static ekv_status encode(ekv_coordinator *c, const coord_request *r, int32_t **ids, size_t *n,
                         ekv_error *err)
{
    if (r->prompt_ids)
        return copy_ids(c, r, ids, n, err);
    bool has_prompt = r->prompt && r->prompt_len > 0;
    if (has_prompt && r->n_messages > 0)
        return ekv_error_set(err, EKV_EINVAL, "set either prompt or messages, not both");
    /* bytes before tokens: a prompt of megabytes is refused before it costs
     * the tokenizer (or the chat template) anything */
    size_t bytes = has_prompt ? r->prompt_len : 0;
    for (size_t i = 0; i < r->n_messages; i++)
        bytes += (r->messages[i].role ? strlen(r->messages[i].role) : 0) +
                 (r->messages[i].content ? strlen(r->messages[i].content) : 0);
    if (bytes > c->max_prompt_bytes)
        return ekv_error_set(err, EKV_EINVAL,
                             "the %s is %zu bytes, more than the limit of %zu bytes "
                             "(--max-prompt-bytes)",
                             r->n_messages > 0 ? "messages' text" : "prompt", bytes,
                             c->max_prompt_bytes);
    if (r->n_messages > 0) {
        ekv_status rc = check_messages(r, err);
        if (rc)
            return rc;
        char *text = NULL;
        rc = tok_apply_chat(c->tok, r->messages, r->n_messages, true, &text, err);
        if (rc == EKV_EUNSUPPORTED)
            return as_invalid(err);
        if (rc == EKV_OK)
            rc = tok_encode(c->tok, text, strlen(text), tok_add_bos(c->tok), true, ids, n, err);
        free(text);
        return rc;
    }
    if (!has_prompt)
        return ekv_error_set(err, EKV_EINVAL, "prompt is empty");
    if (!coord_utf8_valid(r->prompt, r->prompt_len))
        return ekv_error_set(err, EKV_EINVAL, "prompt is not valid UTF-8");
    return tok_encode(c->tok, r->prompt, r->prompt_len, tok_add_bos(c->tok), false, ids, n, err);
}

static ekv_status check_prompt_length(ekv_coordinator *c, size_t n, ekv_error *err)
{
    if (n == 0)
        return ekv_error_set(err, EKV_EINVAL, "the prompt encodes to no tokens");
    if (n + 1 > (size_t)c->max_ctx)
        return ekv_error_set(err, EKV_EINVAL,
                             "the prompt has %zu tokens but the context is %d tokens", n,
                             c->max_ctx);
    return EKV_OK;
}

static ekv_status check_params(ekv_coordinator *c, const coord_request *r, kvc_policy *policy,
                               ekv_error *err)
{
    const gen_params *p = &r->params;
    const int min_tokens = p->prompt_logprobs ? 0 : 1; /* echo may only score the prompt */
    if (p->max_tokens < min_tokens || p->max_tokens > c->max_ctx)
        return ekv_error_set(err, EKV_EINVAL, "max_tokens must be in [%d, %d], got %d",
                             min_tokens, c->max_ctx, p->max_tokens);
    ekv_status rc = sampler_params_check(&p->sampling, err);
    if (rc)
        return as_invalid(err);
    for (size_t i = 0; i < p->sampling.n_logit_bias; i++)
        if (p->sampling.logit_bias[i].token >= tok_vocab_size(c->tok))
            return ekv_error_set(err, EKV_EINVAL,
                                 "logit_bias: token %d is outside the vocabulary [0, %d)",
                                 p->sampling.logit_bias[i].token, tok_vocab_size(c->tok));
    if (p->logprobs && (p->top_logprobs < 0 || p->top_logprobs > EKV_MAX_TOP_LOGPROBS))
        return ekv_error_set(err, EKV_EINVAL, "top_logprobs must be in [0, %d], got %d",
                             EKV_MAX_TOP_LOGPROBS, p->top_logprobs);
    if (p->n_stops > COORD_MAX_STOPS)
        return ekv_error_set(err, EKV_EINVAL, "at most %d stop strings, got %zu",
                             COORD_MAX_STOPS, p->n_stops);
    for (size_t i = 0; i < p->n_stops; i++) {
        const char *s = p->stops[i];
        if (!s || !*s)
            return ekv_error_set(err, EKV_EINVAL, "stop[%zu] is empty", i);
        if (!coord_utf8_valid(s, strlen(s)))
            return ekv_error_set(err, EKV_EINVAL, "stop[%zu] is not valid UTF-8", i);
    }
    if (r->kv_method && !coord_utf8_valid(r->kv_method, strlen(r->kv_method)))
        return ekv_error_set(err, EKV_EINVAL, "kv_method is not valid UTF-8");
    if (!isfinite(r->kv_budget))
        return ekv_error_set(err, EKV_EINVAL, "kv_budget must be finite");
    rc = kvc_policy_parse(r->kv_method, r->kv_budget, policy, err);
    if (rc)
        return as_invalid(err);
    if ((r->decode_method && !coord_utf8_valid(r->decode_method, strlen(r->decode_method))) ||
        (r->spark_recovery && !coord_utf8_valid(r->spark_recovery, strlen(r->spark_recovery))))
        return ekv_error_set(err, EKV_EINVAL, "decode_method or spark_recovery is not valid UTF-8");
    if ((rc = kvc_decode_parse(r->decode_method, r->scope_recent, r->scope_window,
                               &policy->decode, err)) ||
        (rc = kvc_spark_parse(r->spark_ratio, r->spark_recovery, &policy->spark, err)))
        return as_invalid(err);
    policy->recall = r->recall;
    policy->recall_every = r->recall_every;
    policy->recall_no_promote = r->recall_no_promote;
    policy->recall_gather = r->recall_gather; /* kvc_policy_check bounds it */
    if ((rc = kvc_policy_check(policy, err)))
        return as_invalid(err);
    if (policy->method == KVC_UNCOMP)
        policy->profile = c->uncomp_profile;
    if (r->n < 0 || r->n > COORD_MAX_N)
        return ekv_error_set(err, EKV_EINVAL, "n must be in [1, %d], got %d", COORD_MAX_N, r->n);
    /* the engine forks the prompt's KV after its prefill: the prompt is
     * scored once, not per choice, and SCOPE would evict from shared blocks */
    if (r->n > 1 && p->prompt_logprobs)
        return ekv_error_set(err, EKV_EINVAL,
                             "n > 1 with the prompt's log-probabilities (echo with logprobs "
                             "or max_tokens 0) is not supported");
    if (r->n > 1 && policy->decode.mode != KVC_DECODE_NONE)
        return ekv_error_set(err, EKV_EINVAL,
                             "n > 1 with a decode_method (SCOPE decode-time eviction) is not "
                             "supported");
    return EKV_OK;
}

ekv_status coord_tokenize(ekv_coordinator *c, const coord_request *r, int32_t **ids,
                          size_t *n, ekv_error *err)
{
    *ids = NULL;
    *n = 0;
    ekv_status rc = encode(c, r, ids, n, err);
    if (rc) {
        free(*ids);
        *ids = NULL;
        *n = 0;
    }
    return rc;
}

/* ---- routing ---- */

static uint64_t prefix_hash(const int32_t *ids, int32_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a over the ids' bytes */
    for (int32_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        for (int b = 0; b < 4; b++) {
            h ^= (v >> (8 * b)) & 0xFF;
            h *= 1099511628211ull;
        }
    }
    return h;
}

static bool routable(const coord_group *g)
{
    return g->state == GROUP_ACTIVE && atomic_load(&g->healthy);
}

/* Picks a healthy group outside the exclude bits for the prompt and
 * counts the request's n_seqs sequences (its choices) in flight there; -1
 * when there is none. */
int coord_route(ekv_coordinator *c, const int32_t *ids, int32_t n, int32_t n_seqs,
                uint64_t exclude)
{
    pthread_mutex_lock(&c->mu);
    int best = -1;
    /* the scan starts one group later each time, so equally loaded groups
     * take turns instead of the lowest index taking every tie */
    const int ng = c->n_groups;
    const unsigned start = ng > 0 ? c->rr++ % (unsigned)ng : 0;
    for (int k = 0; k < ng; k++) {
        int i = (int)((start + (unsigned)k) % (unsigned)ng);
        if (routable(&c->groups[i]) && !(exclude >> i & 1) &&
            (best < 0 || c->groups[i].in_flight < c->groups[best].in_flight))
            best = i;
    }
    if (best < 0) {
        pthread_mutex_unlock(&c->mu);
        return -1;
    }
    if (n >= COORD_PREFIX_BLOCK) {
        uint64_t h = prefix_hash(ids, COORD_PREFIX_BLOCK);
        affinity_slot *slot = &c->affinity[h % COORD_AFFINITY_SLOTS];
        int g = slot->group;
        if (slot->hash == h && g >= 0 && g < c->n_groups && routable(&c->groups[g]) &&
            !(exclude >> g & 1) &&
            c->groups[g].in_flight <= c->groups[best].in_flight + COORD_AFFINITY_SLACK)
            best = g;
        slot->hash = h;
        slot->group = best;
    }
    c->groups[best].in_flight += n_seqs;
    pthread_mutex_unlock(&c->mu);
    return best;
}

/* Once per choice: each was counted in flight. */
void coord_group_finished(ekv_coordinator *c, int group)
{
    pthread_mutex_lock(&c->mu);
    c->groups[group].in_flight--;
    pthread_mutex_unlock(&c->mu);
}

/* ---- submission ---- */

static ekv_status reject(ekv_coordinator *c, const coord_request *r, ekv_status rc,
                         ekv_error *err)
{
    metrics_count_request(c->metrics, rc == EKV_EBUSY ? METRICS_REJECTED
                                      : rc == EKV_EINVAL ? METRICS_INVALID
                                                         : METRICS_ERROR);
    coord_log("%s request rejected (%s): %s", r->protocol ? r->protocol : "?",
              ekv_status_name(rc), err ? err->msg : "");
    return rc;
}

static ekv_status submit_to_group(ekv_coordinator *c, const coord_request *r,
                                  const int32_t *ids, int32_t n, const kvc_policy *policy,
                                  coord_stream **out, ekv_error *err)
{
    const int32_t n_choices = r->n > 1 ? r->n : 1;
    int g = coord_route(c, ids, n, n_choices, 0);
    if (g < 0)
        return ekv_error_set(err, EKV_EBUSY, "no healthy worker group");
    coord_stream *s = coord_stream_new(c, g, n, n_choices, r->protocol);
    if (!s) {
        for (int32_t i = 0; i < n_choices; i++)
            coord_group_finished(c, g);
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    }
    engine_request er = {
        .prompt = ids,
        .n_prompt = n,
        .params = r->params,
        .kv = *policy,
        .on_tokens = coord_stream_on_tokens,
        .on_logprobs = coord_stream_on_logprobs,
        .on_done = coord_stream_on_done,
        .ctx = s->ctxs[0],
        .n = n_choices,
        .choice_ctx = n_choices > 1 ? s->ctxs : NULL,
    };
    /* kept for a resubmission should the group fail before any output;
     * without memory for it the request just is not retried */
    if (er.n <= 1)
        (void)coord_stream_keep_request(s, ids, n, &er);
    uint64_t engine_id = 0;
    ekv_status rc = c->groups[g].ops->submit(c->groups[g].impl, &er, &engine_id, err);
    if (rc) {
        for (int32_t i = 0; i < n_choices; i++)
            coord_group_finished(c, g);
        coord_stream_discard(s);
        return rc == EKV_ERANGE ? EKV_EINVAL : rc;
    }
    coord_stream_set_submitted(s, engine_id);
    coord_log("req-%llu accepted protocol=%s group=%s prompt_tokens=%d max_tokens=%d "
              "temperature=%g kv_method=%s n=%d",
              (unsigned long long)coord_stream_id(s), r->protocol ? r->protocol : "?",
              c->groups[g].name, n, r->params.max_tokens, r->params.sampling.temperature,
              kvc_method_name(policy->method), n_choices);
    *out = s;
    return EKV_OK;
}

ekv_status coord_submit(ekv_coordinator *c, const coord_request *r, coord_stream **out,
                        ekv_error *err)
{
    *out = NULL;
    if (coord_draining(c))
        return reject(c, r, ekv_error_set(err, EKV_EBUSY, "the server is shutting down"), err);
    kvc_policy policy;
    ekv_status rc = check_params(c, r, &policy, err);
    if (rc)
        return reject(c, r, rc, err);
    coord_request with = *r; /* with its response_format compiled (once: grammar_get caches) */
    if (r->response_format && r->response_format_len > 0 &&
        (rc = grammar_get(r->response_format, r->response_format_len, &with.params.grammar,
                          err)))
        return reject(c, r, rc == EKV_ENOMEM ? rc : as_invalid(err), err);
    int32_t *ids = NULL;
    size_t n = 0;
    rc = encode(c, r, &ids, &n, err);
    if (rc == EKV_ERANGE)
        rc = as_invalid(err);
    if (rc == EKV_OK)
        rc = check_prompt_length(c, n, err);
    int32_t kept; /* an absolute budget above the prompt: a 400 now, not a failure after prefill */
    if (rc == EKV_OK && kvc_policy_mean_tokens(&policy, (int32_t)n, &kept, err))
        rc = as_invalid(err);
    if (rc == EKV_OK)
        rc = submit_to_group(c, &with, ids, (int32_t)n, &policy, out, err);
    free(ids);
    grammar_release(with.params.grammar); /* the group holds its own */
    return rc ? reject(c, r, rc, err) : EKV_OK;
}
