/*
 * test_compress_model.c - compression on the demo model: a 100% budget
 * leaves logits bit-identical to full KV for every method; compression
 * frees exactly the blocks its budgets imply; results are deterministic;
 * UNComp's entropies and profiles behave (another model's profile is
 * refused).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/model.h"

#define STEPS 4

static ekv_model *g_model;
static int32_t *g_prompt;
static int32_t g_n;

/* Prefill (compressing with pol unless NULL), then STEPS greedy steps;
 * logits of each step into out (STEPS x n_vocab). Returns blocks held after
 * compression, or -1. */
static int64_t run(const kvc_policy *pol, float *out, kvc_report *rep)
{
    const ekv_model_config *c = model_config(g_model);
    ekv_error err = {0};
    kv_pool *pool = model_kv_pool_create(g_model, g_n + STEPS + 16, &err);
    ekv_runtime *rt = model_runtime_create(g_model, 128, g_n + STEPS + 16, 2, &err);
    kv_seq *seq = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    kvc_capture *cap = pol ? kvc_capture_create(pol, g_model, g_n, 0, &err) : NULL;
    int64_t blocks = -1;
    CHECK(pool && rt && seq && (!pol || cap));
    if (!pool || !rt || !seq || (pol && !cap))
        goto out;
    float *logits = out;
    CHECK(model_prefill(rt, seq, g_prompt, g_n, 0, cap ? kvc_capture_tap(cap, seq) : NULL, logits,
                        &err) == EKV_OK);
    if (cap)
        CHECK(kvc_capture_compress(cap, rt, seq, rep, &err) == EKV_OK);
    blocks = kv_seq_blocks(seq);
    for (int s = 1; s < STEPS; s++) {
        const float *prev = out + (size_t)(s - 1) * c->n_vocab;
        int32_t id = 0;
        for (int32_t t = 1; t < c->n_vocab; t++)
            if (prev[t] > prev[id])
                id = t;
        const int32_t pos = g_n + s - 1;
        model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq};
        CHECK(model_forward(rt, &b, out + (size_t)s * c->n_vocab, &err) == EKV_OK);
    }
out:
    if (err.code)
        fprintf(stderr, "error: %s\n", err.msg);
    kvc_capture_free(cap);
    kv_seq_free(seq);
    model_runtime_free(rt);
    kv_pool_destroy(pool);
    return blocks;
}

static void test_full_budget_gives_identical_logits_for_every_method(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *ref = malloc(STEPS * V * sizeof *ref), *got = malloc(STEPS * V * sizeof *got);
    kvc_report rep;
    run(NULL, ref, &rep);
    for (int m = 0; m < KVC_N_METHODS; m++) {
        kvc_policy p;
        CHECK(kvc_policy_parse(kvc_method_name((kvc_method_id)m), 1.0, &p, NULL) == EKV_OK);
        memset(got, 0, STEPS * V * sizeof *got);
        run(&p, got, &rep);
        CHECK_EQ_INT(rep.kept_total, (int64_t)g_n * 90);
        if (memcmp(ref, got, STEPS * V * sizeof *got) != 0) {
            fprintf(stderr, "method %s changed logits at budget 1.0\n",
                    kvc_method_name((kvc_method_id)m));
            CHECK(0);
        }
    }
    free(ref);
    free(got);
}

static void test_compression_frees_the_blocks_its_budgets_imply(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *a = malloc(STEPS * V * sizeof *a), *b = malloc(STEPS * V * sizeof *b);
    const char *methods[] = {"streaming", "snapkv", "pyramidkv", "uncomp"};
    for (size_t m = 0; m < sizeof methods / sizeof methods[0]; m++) {
        kvc_policy p;
        kvc_report rep;
        CHECK(kvc_policy_parse(methods[m], 0.2, &p, NULL) == EKV_OK);
        int64_t blocks = run(&p, a, &rep);
        const int64_t full = 90 * (int64_t)((g_n + 15) / 16);
        CHECK_EQ_INT(rep.blocks_before, full);
        CHECK_EQ_INT(rep.blocks_after, blocks);
        CHECK(rep.kept_total <= rep.budget_total);
        CHECK(rep.kept_total >= rep.budget_total - 90);
        /* each head holds ceil(kept / 16) blocks: at least kept/16 overall,
         * at most one partial block per head more */
        CHECK(blocks * 16 >= rep.kept_total);
        CHECK(blocks <= (rep.kept_total + 15 * 90) / 16);
        CHECK(blocks < full / 3);
        /* the same request compresses the same way */
        kvc_report rep2;
        run(&p, b, &rep2);
        CHECK(!memcmp(a, b, STEPS * V * sizeof *a));
        CHECK_EQ_INT(rep2.blocks_after, rep.blocks_after);
    }
    free(a);
    free(b);
}

static void test_online_entropy_is_in_range_and_profiles_check_the_model(void)
{
    const ekv_model_config *c = model_config(g_model);
    kvc_policy p = {.method = KVC_UNCOMP, .budget = 0.5};
    ekv_error err = {0};
    kv_pool *pool = model_kv_pool_create(g_model, g_n, &err);
    ekv_runtime *rt = model_runtime_create(g_model, 128, g_n, 2, &err);
    kv_seq *seq = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    kvc_capture *cap = kvc_capture_create(&p, g_model, g_n, 0, &err);
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    const float *e = NULL;
    CHECK(kvc_capture_entropy(cap, &e, &err) == EKV_EINVAL); /* nothing recorded yet */
    CHECK(model_prefill(rt, seq, g_prompt, g_n, 0, kvc_capture_tap(cap, seq), logits, &err) ==
          EKV_OK);
    CHECK(kvc_capture_entropy(cap, &e, &err) == EKV_OK);
    double lo = 1, hi = 0;
    for (int i = 0; e && i < c->n_layers * c->n_heads; i++) {
        lo = e[i] < lo ? e[i] : lo;
        hi = e[i] > hi ? e[i] : hi;
    }
    CHECK(lo > 0.05 && hi < 1.0 && hi - lo > 0.05); /* heads differ: there is something to use */
    /* a calibration of one sample round-trips; the file names the model */
    char path[] = "/tmp/ekv_profile_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    kvc_calibration *cal = kvc_calibration_create(g_model, &err);
    kvc_calibration_add(cal, e);
    CHECK(kvc_calibration_save(cal, path, &err) == EKV_OK);
    kvc_profile *prof = kvc_profile_load(path, g_model, &err);
    CHECK(prof != NULL);
    kvc_profile_free(prof);
    /* the same file claiming another model is refused */
    FILE *f = fopen(path, "r");
    char buf[65536];
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = 0;
    char *layers = strstr(buf, " 30 9 3 64 ");
    CHECK(layers != NULL);
    if (layers)
        memcpy(layers, " 32 9 3 64 ", 11);
    f = fopen(path, "w");
    fputs(buf, f);
    fclose(f);
    CHECK(kvc_profile_load(path, g_model, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EINVAL);
    CHECK(strstr(err.msg, "another model") != NULL);
    f = fopen(path, "w");
    fputs("garbage\n", f);
    fclose(f);
    CHECK(kvc_profile_load(path, g_model, &err) == NULL);
    CHECK_EQ_INT(err.code, EKV_EFORMAT);
    remove(path);
    kvc_calibration_free(cal);
    free(logits);
    kvc_capture_free(cap);
    kv_seq_free(seq);
    model_runtime_free(rt);
    kv_pool_destroy(pool);
}

int main(int argc, char **argv)
{
    ekv_error err = {0};
    if (argc < 2 || !(g_model = model_load(argv[1], &err))) {
        fprintf(stderr, "usage: test_compress_model MODEL.gguf (%s)\n", err.msg);
        return 1;
    }
    FILE *f = fopen("/usr/share/common-licenses/Apache-2.0", "rb");
    char text[4096];
    size_t len = f ? fread(text, 1, sizeof text, f) : 0;
    if (f)
        fclose(f);
    size_t n = 0;
    if (tok_encode(model_tokenizer(g_model), text, len, false, false, &g_prompt, &n, &err) ||
        n < 300) {
        fprintf(stderr, "cannot build the prompt: %s\n", err.msg);
        return 1;
    }
    g_n = 300;
    RUN_TEST(test_full_budget_gives_identical_logits_for_every_method);
    RUN_TEST(test_compression_frees_the_blocks_its_budgets_imply);
    RUN_TEST(test_online_entropy_is_in_range_and_profiles_check_the_model);
    free(g_prompt);
    model_free(g_model);
    return TEST_EXIT();
}
