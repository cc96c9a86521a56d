/*
 * recall_harness.h - what the recall tests on the demo model share
 * (test_recall_model.c, test_recall_tier_model.c): the model, a runtime and
 * a prompt of RH_PROMPT tokens of the GPL; a prefilled sequence compressed
 * by a policy with recall enabled before compression; RH_STEPS greedy
 * decode steps. Header-only, static: each test is one translation unit.
 */
#ifndef ENTROKV_TESTS_RECALL_HARNESS_H
#define ENTROKV_TESTS_RECALL_HARNESS_H

#include <stdio.h>
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/kvrecall.h"
#include "entrokv/model.h"

#define RH_STEPS 6
#define RH_PROMPT 320

static ekv_model *g_model;
static int32_t *g_prompt;
static ekv_runtime *g_rt;

/* Loads argv[1], tokenises the prompt and makes a runtime; 1 (with a
 * message) when any of it fails. */
static int rh_open(int argc, char **argv, const char *name)
{
    ekv_error err = {0};
    if (argc < 2 || !(g_model = model_load(argv[1], &err))) {
        fprintf(stderr, "usage: %s MODEL.gguf (%s)\n", name, err.msg);
        return 1;
    }
    kern_init();
    FILE *fp = fopen("/usr/share/common-licenses/GPL-3", "rb");
    char text[8192];
    size_t len = fp ? fread(text, 1, sizeof text, fp) : 0;
    if (fp)
        fclose(fp);
    size_t n = 0;
    if (tok_encode(model_tokenizer(g_model), text, len, false, false, &g_prompt, &n, &err) ||
        n < RH_PROMPT) {
        fprintf(stderr, "cannot build the prompt: %s\n", err.msg);
        return 1;
    }
    if (!(g_rt = model_runtime_create(g_model, 64, RH_PROMPT + RH_STEPS + 16, 2, &err))) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    return 0;
}

static void rh_close(void)
{
    model_runtime_free(g_rt);
    free(g_prompt);
    model_free(g_model);
}

/* A pool for n sequences of the prompt and the decoded tokens. */
static kv_pool *rh_pool(int n)
{
    return model_kv_pool_create(g_model, (int64_t)n * (RH_PROMPT + RH_STEPS + 16), NULL);
}

static int32_t rh_argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* The prompt prefilled into pool and compressed with pol (NULL: full),
 * the prefill's last logits into logits. With force_r > 0, recall is
 * enabled before compression, without taking from the budget. */
static kv_seq *rh_prepare(kv_pool *pool, const kvc_policy *pol, int32_t force_r, float *logits)
{
    const ekv_model_config *c = model_config(g_model);
    ekv_error err = {0};
    kv_seq *seq = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    kvc_capture *cap = pol ? kvc_capture_create(pol, g_model, RH_PROMPT, 0, &err) : NULL;
    CHECK(seq && (!pol || cap));
    CHECK(model_prefill(g_rt, seq, g_prompt, RH_PROMPT, 0, cap ? kvc_capture_tap(cap, seq) : NULL,
                        logits, &err) == EKV_OK);
    if (force_r)
        CHECK(kv_seq_recall_enable(seq, force_r, &err) == EKV_OK);
    kvc_report rep;
    if (cap)
        CHECK(kvc_capture_compress(cap, g_rt, seq, &rep, &err) == EKV_OK);
    if (err.code)
        fprintf(stderr, "error: %s\n", err.msg);
    kvc_capture_free(cap);
    return seq;
}

/* RH_STEPS decode steps from first (n_vocab logits), every step's logits
 * into out: greedy (each step feeds the argmax of the logits before it),
 * or, with ref (RH_STEPS x n_vocab logits of another decode), teacher-forced
 * on that decode's greedy tokens, so that a near-tie it breaks differently
 * cannot make the two decodes part ways; after_step(arg, s), when given,
 * runs after step s. */
static void rh_decode_on(kv_seq *seq, const float *first, const float *ref, float *out,
                         void (*after_step)(void *arg, int s), void *arg)
{
    const int32_t V = model_config(g_model)->n_vocab;
    for (int s = 0; s < RH_STEPS; s++) {
        const float *from = ref ? (s ? ref + (size_t)(s - 1) * V : first)
                                : (s ? out + (size_t)(s - 1) * V : first);
        int32_t id = rh_argmax(from, V);
        const int32_t pos = RH_PROMPT + s;
        model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq};
        CHECK(model_forward(g_rt, &b, out + (size_t)s * V, NULL) == EKV_OK);
        if (after_step)
            after_step(arg, s);
    }
}

static void rh_decode(kv_seq *seq, const float *first, float *out,
                      void (*after_step)(void *arg, int s), void *arg)
{
    rh_decode_on(seq, first, NULL, out, after_step, arg);
}

#endif
