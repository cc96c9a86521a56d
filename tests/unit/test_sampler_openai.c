/*
 * test_sampler_openai.c - the OpenAI parts of the sampler (issue 23):
 * presence/frequency penalties, logit_bias, the logit-mask hook and the
 * log-probabilities of sampler_next, against references written from the
 * definitions, not from sampler.c:
 *
 *   OpenAI (API reference, "frequency and presence penalties"):
 *     mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
 *   where c[j] counts token j in the text generated so far (not the prompt);
 *   logit_bias adds its value to the token's logit before sampling.
 *   log-probabilities: log-softmax of the processed logits divided by the
 *   temperature (by 1 when greedy), over the whole vocabulary
 *   (docs/serving.md).
 *
 * A vocabulary of 16 tokens lets top_logprobs (up to 20) return the whole
 * distribution, so every token's value is checked, not only the top ones.
 */
#include "ekv_test.h"

#include "entrokv/sampler.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define V 16

static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static double uni(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) * 0x1.0p-53;
}

/* The reference: processed logits from the definition, in double. */
static void reference(const float *logits, const int32_t *hist, size_t n_hist, size_t n_prompt,
                      double presence, double frequency, const ekv_logit_bias *bias,
                      size_t n_bias, double temp, double *lp)
{
    double x[V];
    int count[V] = {0};
    for (size_t i = n_prompt; i < n_hist; i++)
        count[hist[i]]++;
    for (int t = 0; t < V; t++)
        x[t] = logits[t];
    for (size_t i = 0; i < n_bias; i++)
        x[bias[i].token] += bias[i].bias;
    for (int t = 0; t < V; t++)
        x[t] = x[t] - count[t] * frequency - (count[t] > 0 ? 1.0 : 0.0) * presence;
    double T = temp > 0 ? temp : 1.0, mx = -INFINITY, sum = 0;
    for (int t = 0; t < V; t++)
        mx = fmax(mx, x[t] / T);
    for (int t = 0; t < V; t++)
        sum += exp(x[t] / T - mx);
    for (int t = 0; t < V; t++)
        lp[t] = x[t] / T - mx - log(sum);
}

static ekv_sampler *make(float temp, float presence, float frequency, const ekv_logit_bias *bias,
                         size_t n_bias, const ekv_logit_mask *mask, uint64_t seed)
{
    ekv_sampler_params p;
    sampler_params_default(&p);
    p.temperature = temp;
    p.presence_penalty = presence;
    p.frequency_penalty = frequency;
    p.logit_bias = bias;
    p.n_logit_bias = n_bias;
    p.mask = mask;
    p.seed = seed;
    ekv_error err = {0};
    ekv_sampler *s = sampler_create(&p, V, &err);
    if (!s)
        fprintf(stderr, "sampler_create: %s\n", err.msg);
    return s;
}

/* float logits carry about 7 digits: a -100 bias leaves values near -150 */
#define TOL(ref) (1e-5 + 2e-7 * fabs(ref))

/* Every token's log-probability from one sampler_next with top_logprobs V
 * (capped at 20 >= V), checked against lp_ref; and the order. */
static void check_full(const ekv_logprob *got, const double *lp_ref, int32_t chosen)
{
    CHECK_EQ_INT(got->token, chosen);
    CHECK_EQ_INT(got->n_top, V);
    CHECK_NEAR(got->logprob, lp_ref[chosen], TOL(lp_ref[chosen]));
    for (int j = 0; j < got->n_top; j++) {
        CHECK_NEAR(got->top_logprobs[j], lp_ref[got->top_ids[j]], TOL(lp_ref[got->top_ids[j]]));
        if (j > 0) {
            const float a = got->top_logprobs[j - 1], b = got->top_logprobs[j];
            CHECK(a > b || (a == b && got->top_ids[j - 1] < got->top_ids[j]));
        }
    }
}

static void test_penalties_and_bias_match_the_definition(void)
{
    /* prompt: token 1 many times (must not count); generated: 2 x3, 5 x1, 9 x2 */
    const int32_t hist[] = {1, 1, 1, 1, 3, 2, 5, 2, 9, 2, 9};
    const size_t n_hist = sizeof hist / sizeof *hist, n_prompt = 5;
    const ekv_logit_bias bias[] = {{4, 3.5f}, {7, -100.0f}, {2, 0.75f}};
    const float temps[] = {0.0f, 0.7f, 1.0f, 1.6f};
    const float pres[] = {0.0f, 0.6f, -1.5f, 2.0f};
    const float freq[] = {0.0f, 0.9f, 1.2f, -2.0f};
    for (int round = 0; round < 64; round++) {
        float logits[V];
        for (int t = 0; t < V; t++)
            logits[t] = (float)(uni() * 8.0 - 4.0);
        const float T = temps[round % 4], pp = pres[(round / 4) % 4], fp = freq[(round / 16) % 4];
        const size_t n_bias = round % 2 ? 3 : 0;
        ekv_sampler *s = make(T, pp, fp, bias, n_bias, NULL, (uint64_t)round);
        CHECK(s != NULL);
        if (!s)
            return;
        double ref[V];
        reference(logits, hist, n_hist, n_prompt, pp, fp, bias, n_bias, T, ref);
        ekv_logprob lp;
        const int32_t id = sampler_next(s, logits, hist, n_hist, n_prompt, 20, &lp);
        check_full(&lp, ref, id);
        if (T == 0.0f) { /* greedy takes the best processed token */
            int best = 0;
            for (int t = 1; t < V; t++)
                if (ref[t] > ref[best])
                    best = t;
            CHECK_EQ_INT(id, best);
        }
        if (n_bias)
            CHECK(id != 7); /* -100 bans a token whose logits span 8 */
        sampler_free(s);
    }
}

/* Seeded draws follow the processed distribution the log-probabilities
 * describe: 40000 draws, each frequency within 0.012 of exp(lp). */
static void test_draws_follow_the_reported_distribution(void)
{
    const int32_t hist[] = {0, 6, 6, 6, 8};
    float logits[V];
    for (int t = 0; t < V; t++)
        logits[t] = (float)(uni() * 3.0 - 1.5);
    logits[6] = 2.0f; /* the frequency penalty has to pull it down */
    ekv_sampler *s = make(0.8f, 0.4f, 0.5f, NULL, 0, NULL, 11);
    CHECK(s != NULL);
    if (!s)
        return;
    double ref[V], freq[V] = {0};
    reference(logits, hist, 5, 1, 0.4, 0.5, NULL, 0, 0.8, ref);
    const int n = 40000;
    for (int i = 0; i < n; i++)
        freq[sampler_next(s, logits, hist, 5, 1, 0, NULL)] += 1.0 / n;
    for (int t = 0; t < V; t++)
        CHECK_NEAR(freq[t], exp(ref[t]), 0.012);
    sampler_free(s);
}

/* sampler_sample counts the whole history as generated (no prompt). */
static void test_sample_counts_all_history(void)
{
    const int32_t hist[] = {3, 3, 4};
    float logits[V] = {0};
    logits[3] = 1.0f;
    logits[4] = 0.9f;
    logits[5] = 0.5f;
    ekv_sampler *s = make(0.0f, 0.0f, 0.3f, NULL, 0, NULL, 0);
    CHECK(s != NULL);
    if (!s)
        return;
    /* 3: 1.0 - 0.6 = 0.4; 4: 0.9 - 0.3 = 0.6; 5: 0.5 */
    CHECK_EQ_INT(sampler_sample(s, logits, hist, 3), 4);
    /* with the two 3s as prompt: 3 stays 1.0 */
    CHECK_EQ_INT(sampler_next(s, logits, hist, 3, 2, 0, NULL), 3);
    sampler_free(s);
}

typedef struct mask_seen {
    size_t n_generated;
    int32_t last;
} mask_seen;

static void ban_token_3(void *ctx, float *logits, int32_t n_vocab, const int32_t *gen,
                        size_t n_gen)
{
    mask_seen *m = ctx;
    m->n_generated = n_gen;
    m->last = n_gen ? gen[n_gen - 1] : -1;
    if (n_vocab > 3)
        logits[3] = -INFINITY;
}

static void test_mask_hook_runs_first(void)
{
    mask_seen seen = {0};
    const ekv_logit_mask mask = {ban_token_3, &seen};
    const int32_t hist[] = {1, 2, 9, 10};
    float logits[V] = {0};
    logits[3] = 50.0f;
    ekv_sampler *s = make(1.0f, 0.0f, 0.0f, NULL, 0, &mask, 5);
    CHECK(s != NULL);
    if (!s)
        return;
    for (int i = 0; i < 200; i++) {
        ekv_logprob lp;
        CHECK(sampler_next(s, logits, hist, 4, 2, 20, &lp) != 3);
        for (int j = 0; j < lp.n_top; j++)
            if (lp.top_ids[j] == 3)
                CHECK(isinf(lp.top_logprobs[j]) && lp.top_logprobs[j] < 0);
    }
    CHECK_EQ_INT((int)seen.n_generated, 2);
    CHECK_EQ_INT(seen.last, 10);
    sampler_free(s);
}

static void test_raw_logprobs(void)
{
    float logits[V];
    for (int t = 0; t < V; t++)
        logits[t] = (float)(uni() * 20.0 - 10.0);
    logits[2] = logits[11]; /* a tie: lower id first */
    double ref[V];
    reference(logits, NULL, 0, 0, 0, 0, NULL, 0, 1.0, ref);
    ekv_logprob lp;
    sampler_logprobs(logits, V, 13, 20, &lp);
    check_full(&lp, ref, 13);
    sampler_logprobs(logits, V, 13, 0, &lp);
    CHECK_EQ_INT(lp.n_top, 0);
    CHECK_NEAR(lp.logprob, ref[13], 1e-5);
}

static void test_parameter_checks(void)
{
    ekv_sampler_params p;
    ekv_error err = {0};
    sampler_params_default(&p);
    CHECK(sampler_params_check(&p, &err) == EKV_OK);
    p.presence_penalty = 2.01f;
    CHECK(sampler_params_check(&p, &err) == EKV_EINVAL && strstr(err.msg, "presence_penalty"));
    p.presence_penalty = 0;
    p.frequency_penalty = NAN;
    CHECK(sampler_params_check(&p, &err) == EKV_EINVAL && strstr(err.msg, "frequency_penalty"));
    p.frequency_penalty = 0;
    ekv_logit_bias b = {3, 100.5f};
    p.logit_bias = &b;
    p.n_logit_bias = 1;
    CHECK(sampler_params_check(&p, &err) == EKV_EINVAL && strstr(err.msg, "logit_bias"));
    b = (ekv_logit_bias){-1, 1.0f};
    CHECK(sampler_params_check(&p, &err) == EKV_EINVAL && strstr(err.msg, "logit_bias"));
    b = (ekv_logit_bias){V, 1.0f};
    CHECK(sampler_params_check(&p, &err) == EKV_OK);
    CHECK(sampler_create(&p, V, &err) == NULL && strstr(err.msg, "vocabulary"));
    /* the sampler keeps its own copy of the biases */
    b = (ekv_logit_bias){5, 100.0f};
    ekv_sampler *s = sampler_create(&p, V, &err);
    CHECK(s != NULL);
    b = (ekv_logit_bias){6, 100.0f};
    float logits[V] = {0};
    if (s)
        CHECK_EQ_INT(sampler_next(s, logits, NULL, 0, 0, 0, NULL), 5);
    sampler_free(s);
}

int main(void)
{
    RUN_TEST(test_penalties_and_bias_match_the_definition);
    RUN_TEST(test_draws_follow_the_reported_distribution);
    RUN_TEST(test_sample_counts_all_history);
    RUN_TEST(test_mask_hook_runs_first);
    RUN_TEST(test_raw_logprobs);
    RUN_TEST(test_parameter_checks);
    return TEST_EXIT();
}
