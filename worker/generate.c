/*
 * generate.c - the single-sequence generation loop (see generate.h).
 */
#include "entrokv/generate.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "entrokv/tokenizer.h"

#define TEXT_CHUNK 8192

double gen_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void gen_params_default(gen_params *p)
{
    memset(p, 0, sizeof *p);
    p->max_tokens = 256;
    sampler_params_default(&p->sampling);
}

const char *gen_finish_name(gen_finish f)
{
    switch (f) {
    case GEN_FINISH_LENGTH: return "length";
    case GEN_FINISH_EOS: return "stop";
    case GEN_FINISH_STOP: return "stop";
    case GEN_FINISH_CONTEXT: return "context";
    case GEN_FINISH_CANCELLED: return "cancelled";
    }
    return "unknown";
}

void gen_result_free(gen_result *r)
{
    free(r->ids);
    free(r->text);
    memset(r, 0, sizeof *r);
}

typedef struct gen_state {
    gen_result *out;
    int32_t *history; /* prompt then generated ids */
    int32_t n_history;
    size_t text_cap;
    gen_text_fn on_text;
    void *ctx;
    bool cancelled;
} gen_state;

static ekv_status emit(gen_state *st, const char *text, size_t len, ekv_error *err)
{
    if (len == 0)
        return EKV_OK;
    gen_result *r = st->out;
    if (r->text_len + len + 1 > st->text_cap) {
        size_t cap = st->text_cap ? st->text_cap : TEXT_CHUNK;
        while (cap < r->text_len + len + 1)
            cap *= 2;
        char *t = realloc(r->text, cap);
        if (!t)
            return ekv_error_set(err, EKV_ENOMEM, "out of memory for generated text");
        r->text = t;
        st->text_cap = cap;
    }
    memcpy(r->text + r->text_len, text, len);
    r->text_len += len;
    r->text[r->text_len] = 0;
    if (st->on_text && !st->on_text(st->ctx, text, len))
        st->cancelled = true;
    return EKV_OK;
}

/* Passes newly detokenised text through the stop strings, if any, then out. */
static ekv_status emit_filtered(gen_state *st, ekv_stopper *stopper, const char *text, size_t len,
                                bool *stopped, ekv_error *err)
{
    if (!stopper)
        return emit(st, text, len, err);
    char safe[TEXT_CHUNK + EKV_STOPPER_HOLD_MAX];
    size_t n = 0;
    ekv_status rc = stopper_feed(stopper, text, len, safe, sizeof safe, &n, stopped, err);
    return rc ? rc : emit(st, safe, n, err);
}

/* Prefills the prompt and, with a compression policy, compresses it. A
 * tensor-parallel rank's capture and compression cover its own heads. */
static ekv_status prefill(ekv_runtime *rt, kv_seq *seq, const int32_t *prompt, int32_t n_prompt,
                          const kvc_policy *kv, float *logits, kvc_report *rep, ekv_error *err)
{
    if (kv->method == KVC_FULL && kv->spark.ratio <= 0)
        return model_prefill(rt, seq, prompt, n_prompt, 0, NULL, logits, err);
    int32_t mean;
    ekv_status rc = kvc_policy_mean_tokens(kv, n_prompt, &mean, err);
    if (rc)
        return rc;
    kvc_capture *cap = kvc_capture_create_shard(kv, model_runtime_model(rt),
                                                model_runtime_shard(rt), n_prompt, 0, err);
    if (!cap)
        return err ? err->code : EKV_ENOMEM;
    rc = model_prefill(rt, seq, prompt, n_prompt, 0, kvc_capture_tap(cap, seq), logits, err);
    if (!rc)
        rc = kvc_capture_compress(cap, rt, seq, rep, err);
    kvc_capture_free(cap);
    return rc;
}

/* model_probe's fn for gen_run's one decode row: SCOPE reads the step's
 * attention logits of every (layer, KV head). */
typedef struct scope_probe {
    kvc_scope *scope;
    kv_seq *seq;
} scope_probe;

static void scope_probe_fn(void *ctx, int32_t layer, int32_t row, int32_t kv_head,
                           const float *logits, const float *probs, int32_t n_q, int32_t n_tokens)
{
    (void)row;
    scope_probe *sp = ctx;
    kvc_scope_observe(sp->scope, sp->seq, layer, kv_head, logits, probs, n_q, n_tokens);
}

/*
 * Tensor parallelism: rank 0 runs gen_run, the other ranks gen_follow with
 * the same prompt and policy. Before each forward rank 0 broadcasts the
 * step's plan, so every rank runs the same rows; GEN_PLAN_END (sent on
 * every way out once the group is reachable) releases the followers.
 * SCOPE and recall are per (layer, KV head): each rank runs its own over
 * its heads (the prefill's compression enables recall on every rank).
 */
enum { GEN_PLAN_END = 0, GEN_PLAN_PREFILL = 1, GEN_PLAN_DECODE = 2 };
typedef struct gen_plan {
    int32_t op, token, pos;
} gen_plan;

static ekv_status plan_send(ekv_comm *comm, int32_t op, int32_t token, int32_t pos,
                            ekv_error *err)
{
    gen_plan pl = {op, token, pos};
    return comm ? comm_broadcast(comm, &pl, sizeof pl, 0, err) : EKV_OK;
}

ekv_status gen_follow(ekv_runtime *rt, kv_pool *kv, const int32_t *prompt, int32_t n_prompt,
                      const gen_params *p, ekv_error *err)
{
    const ekv_model_config *c = model_config(model_runtime_model(rt));
    ekv_comm *comm = model_runtime_comm(rt);
    if (!comm || comm_rank(comm) == 0)
        return ekv_error_set(err, EKV_EINVAL, "gen_follow: not a follower rank");
    kv_seq *seq = kv_seq_create(kv, c->n_layers, model_runtime_shard(rt)->n_kv_heads, err);
    ekv_status rc = seq ? EKV_OK : (err ? err->code : EKV_ENOMEM), first = EKV_OK;
    ekv_error mine = {0};
    kvc_scope *scope = NULL; /* SCOPE on this rank's heads, as rank 0 runs it on its own */
    scope_probe sp = {.seq = seq};
    const uint8_t probe_row = 1;
    const model_probe probe = {.rows = &probe_row, .fn = scope_probe_fn, .ctx = &sp};
    while (!comm_broken(comm)) {
        gen_plan pl = {0};
        if ((rc = comm_broadcast(comm, &pl, sizeof pl, 0, err)))
            break;
        if (pl.op == GEN_PLAN_END)
            break;
        ekv_status step = EKV_OK;
        kvc_report rep;
        if (!seq) {
            step = EKV_ENOMEM;
        } else if (pl.op == GEN_PLAN_PREFILL) {
            step = prefill(rt, seq, prompt, n_prompt, &p->kv, NULL, &rep, &mine);
            if (!step && p->kv.decode.mode != KVC_DECODE_NONE &&
                !(sp.scope = scope = kvc_scope_create(&p->kv.decode, seq, p->max_tokens, &mine)))
                step = mine.code ? mine.code : EKV_ENOMEM;
        } else {
            model_batch b = {.n = 1, .tokens = &pl.token, .pos = &pl.pos, .seqs = &seq,
                             .probe = scope ? &probe : NULL};
            if (scope) /* gen_run's step: the decode token's index */
                kvc_scope_begin(scope, pl.pos - n_prompt);
            step = model_forward(rt, &b, NULL, &mine);
            if (!step && scope)
                step = kvc_scope_status(scope, &mine);
        }
        /* rank 0 meets the same error on the same rows and ends the run; keep
         * listening for its END */
        if (step && !first) {
            first = step;
            if (err)
                *err = mine;
        }
    }
    kvc_scope_free(scope);
    kv_seq_free(seq);
    return rc ? rc : first;
}

static ekv_status run_leader(ekv_runtime *rt, ekv_comm *comm, kv_pool *kv,
                             const int32_t *prompt, int32_t n_prompt, const gen_params *p,
                             gen_text_fn on_text, void *ctx, gen_result *out, ekv_error *err)
{
    const ekv_model *m = model_runtime_model(rt);
    const ekv_model_config *c = model_config(m);
    const ekv_tokenizer *tok = model_tokenizer(m);
    const int32_t max_ctx = model_runtime_max_ctx(rt);
    if (n_prompt <= 0)
        return ekv_error_set(err, EKV_EINVAL, "the prompt is empty");
    if (n_prompt >= max_ctx)
        return ekv_error_set(err, EKV_ERANGE,
                             "the prompt has %d tokens; the context holds %d (prompt + at least 1)",
                             n_prompt, max_ctx);
    if (p->max_tokens < 0)
        return ekv_error_set(err, EKV_EINVAL, "max_tokens must be >= 0");
    ekv_status rc = EKV_OK;
    gen_state st = {.out = out, .on_text = on_text, .ctx = ctx};
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    st.history = malloc(((size_t)n_prompt + (size_t)p->max_tokens) * sizeof *st.history);
    out->ids = malloc(((size_t)p->max_tokens + 1) * sizeof *out->ids);
    ekv_sampler *sampler = sampler_create(&p->sampling, c->n_vocab, err);
    ekv_stopper *stopper = NULL;
    ekv_grammar_vocab *gvocab = NULL;
    grammar_state *gs = NULL;
    kvc_scope *scope = NULL;
    kv_seq *seq = kv_seq_create(kv, c->n_layers, model_runtime_shard(rt)->n_kv_heads, err);
    if (!sampler || !seq) {
        rc = err ? err->code : EKV_ENOMEM;
        goto out;
    }
    if (!logits || !st.history || !out->ids) {
        rc = ekv_error_set(err, EKV_ENOMEM, "out of memory");
        goto out;
    }
    if (p->n_stops && !(stopper = stopper_create(p->stops, p->n_stops, err))) {
        rc = err ? err->code : EKV_EINVAL;
        goto out;
    }
    if (p->grammar && (!(gvocab = grammar_vocab_create(tok, err)) ||
                       !(gs = grammar_state_new(p->grammar, gvocab, err)))) {
        rc = err ? err->code : EKV_ENOMEM;
        goto out;
    }
    memcpy(st.history, prompt, (size_t)n_prompt * sizeof *prompt);
    st.n_history = n_prompt;
    out->prompt_tokens = n_prompt;

    double t0 = gen_now();
    if ((rc = plan_send(comm, GEN_PLAN_PREFILL, 0, 0, err)) ||
        (rc = prefill(rt, seq, prompt, n_prompt, &p->kv, logits, &out->compression, err)))
        goto out;
    out->kv_bytes_prompt = kv_seq_bytes(seq);
    if (p->kv.decode.mode != KVC_DECODE_NONE &&
        !(scope = kvc_scope_create(&p->kv.decode, seq, p->max_tokens, err))) {
        rc = err ? err->code : EKV_ENOMEM;
        goto out;
    }
    scope_probe sp = {.scope = scope, .seq = seq};
    const uint8_t probe_row = 1;
    const model_probe probe = {.rows = &probe_row, .fn = scope_probe_fn, .ctx = &sp};
    double t1 = gen_now();
    out->prefill_s = t1 - t0;

    tok_stream ts;
    tok_stream_init(&ts, false);
    char piece[TEXT_CHUNK];
    bool stopped = false;
    out->finish = GEN_FINISH_LENGTH;
    for (;;) {
        if (out->n_ids >= p->max_tokens) {
            out->finish = GEN_FINISH_LENGTH;
            break;
        }
        if (gs) {
            const double t_mask = gen_now();
            const int32_t n_allowed = grammar_mask_logits(gs, logits, c->n_vocab);
            out->grammar_s += gen_now() - t_mask;
            if (n_allowed == 0) {
                rc = ekv_error_set(err, EKV_EINVAL,
                                   "structured output: no token can continue the JSON");
                goto out;
            }
        }
        const int32_t id = sampler_next(sampler, logits, st.history, (size_t)st.n_history,
                                        (size_t)n_prompt, 0, NULL);
        if (!p->ignore_eos && tok_is_eog(tok, id)) {
            out->finish = GEN_FINISH_EOS;
            break;
        }
        if (gs && (rc = grammar_accept_token(gs, id, err)))
            goto out;
        out->ids[out->n_ids++] = id;
        st.history[st.n_history++] = id;
        size_t n = tok_stream_push(&ts, tok, id, piece, sizeof piece);
        if ((rc = emit_filtered(&st, stopper, piece, n, &stopped, err)))
            goto out;
        if (stopped) {
            out->finish = GEN_FINISH_STOP;
            break;
        }
        if (gs && grammar_done(gs)) { /* the JSON is complete: nothing may follow */
            out->finish = GEN_FINISH_EOS;
            break;
        }
        if (st.cancelled) {
            out->finish = GEN_FINISH_CANCELLED;
            break;
        }
        if (out->n_ids >= p->max_tokens)
            continue; /* no forward needed for a token nobody will sample after */
        const int32_t pos = n_prompt + out->n_ids - 1;
        if (pos + 1 >= max_ctx) {
            out->finish = GEN_FINISH_CONTEXT;
            break;
        }
        model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq,
                         .probe = scope ? &probe : NULL};
        if (scope)
            kvc_scope_begin(scope, out->n_ids - 1);
        if ((rc = plan_send(comm, GEN_PLAN_DECODE, id, pos, err)) ||
            (rc = model_forward(rt, &b, logits, err)) ||
            (scope && (rc = kvc_scope_status(scope, err))))
            goto out;
        if (kv_seq_bytes(seq) > out->kv_bytes_peak)
            out->kv_bytes_peak = kv_seq_bytes(seq);
    }
    out->decode_s = gen_now() - t1;
    if (!stopped) { /* the text held back for UTF-8 and stop strings */
        size_t n = tok_stream_flush(&ts, piece, sizeof piece);
        if ((rc = emit_filtered(&st, stopper, piece, n, &stopped, err)))
            goto out;
        if (stopped) {
            out->finish = GEN_FINISH_STOP;
        } else if (stopper) {
            char tail[EKV_STOPPER_HOLD_MAX];
            if ((rc = stopper_flush(stopper, tail, sizeof tail, &n, err)) ||
                (rc = emit(&st, tail, n, err)))
                goto out;
        }
    }
    out->kv_bytes = kv_seq_bytes(seq);
    if (scope)
        kvc_scope_get_stats(scope, &out->scope);
    if (kv_seq_recall(seq))
        kv_recall_get_stats(kv_seq_recall(seq), &out->recall);
out:
    kvc_scope_free(scope);
    if (!out->text && rc == EKV_OK)
        out->text = calloc(1, 1);
    if (rc)
        gen_result_free(out);
    model_runtime_forget_seq(rt, seq);
    kv_seq_free(seq);
    stopper_free(stopper);
    grammar_state_free(gs);
    grammar_vocab_free(gvocab);
    sampler_free(sampler);
    free(st.history);
    free(logits);
    return rc;
}

ekv_status gen_run(ekv_runtime *rt, kv_pool *kv, const int32_t *prompt, int32_t n_prompt,
                   const gen_params *p, gen_text_fn on_text, void *ctx, gen_result *out,
                   ekv_error *err)
{
    memset(out, 0, sizeof *out);
    ekv_comm *comm = model_runtime_comm(rt);
    if (comm && comm_rank(comm) != 0)
        return ekv_error_set(err, EKV_EINVAL, "gen_run: rank %d of a group follows (gen_follow)",
                             comm_rank(comm));
    ekv_status rc = run_leader(rt, comm, kv, prompt, n_prompt, p, on_text, ctx, out, err);
    if (comm && !comm_broken(comm)) { /* every way out releases the followers */
        ekv_error e2 = {0};
        ekv_status rc2 = plan_send(comm, GEN_PLAN_END, 0, 0, &e2);
        if (rc2 && !rc) {
            gen_result_free(out);
            rc = rc2;
            if (err)
                *err = e2;
        }
    }
    return rc;
}
