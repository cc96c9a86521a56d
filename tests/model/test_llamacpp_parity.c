/*
 * test_llamacpp_parity.c - the engine against llama.cpp on the demo GGUF.
 *
 * Fixtures (tests/fixtures, made by make_fixtures.py with llama-cpp-python)
 * hold the prompt ids llama.cpp tokenised, its top-10 logits and the
 * log-sum-exp of its whole row at every position (logits.txt: 8 prompts,
 * 451 positions; logits_long.txt: 4223 tokens of the GPL-3 text, positions
 * up to 4222), and its 64-token greedy continuations. We check: our
 * tokenizer gives the same ids; the logits are as close to llama.cpp's as
 * llama.cpp is to itself (below); greedy continuations are identical up to
 * near-ties.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/kvcache.h"
#include "entrokv/model.h"
#include "entrokv/tokenizer.h"
#include "fixture_parse.h"

/*
 * Why these tolerances. An independent engine cannot reproduce llama.cpp's
 * logits bit for bit: both quantize activations to 8 bits per 32-block before
 * every Q4_1/Q8_0 dot product, so a 1-ulp difference anywhere upstream (SIMD
 * summation order, exp/silu approximations, llama.cpp's fp16 rounding of Q
 * and of the V accumulator in flash attention) flips the rounding of some
 * activation values, and this small model amplifies that through 30 layers.
 * The scale of that noise is measured on llama.cpp itself by
 * tests/fixtures/noise_floor.py: the same llama.cpp build with flash
 * attention off instead of on (the fixtures' setting), over all 4674
 * positions, deviates from the fixtures by mean 0.1518 / max 2.148 in the
 * top-10 logits (mean 0.1440 over the 3199 positions >= 1024), agrees on
 * top-1 at 95.91% of positions, flips top-1 only where the top1-top2 margin
 * is at most 0.58, and keeps the 64-token greedy continuation for 2 of 8
 * prompts. Its systematic statistics (definitions at parity_stats): mean dlp
 * -0.0051; mean kl 0.00260 (0.00251 over positions >= 1024).
 *
 * One such noise source barely moves these means: per position range they
 * differ between llama.cpp-vs-itself and us-vs-llama.cpp by at most ~6%, and
 * over all positions by ~1% (we measured, when written: mean deviation
 * 0.1508, >= 1024 0.1458; mean kl 0.00259, >= 1024 0.00243; mean dlp
 * -0.0047; max deviation 1.55). A systematic error, though, shifts them all:
 * a 5% error in the attention temperature gives mean deviation 0.279 and mean
 * kl 0.0075 (dlp -0.032), a 5% error in the RoPE base mean deviation 0.189
 * (0.193 at positions >= 1024, where its phase error has grown) and mean kl
 * 0.0036 (0.0037). So the checks are:
 *   - mean |deviation| <= llama.cpp's own + 15%, over all positions
 *     (LOGIT_MEAN_TOL) and over positions >= 1024 (LOGIT_MEAN_LONG_TOL);
 *   - mean kl <= llama.cpp's own + 15%, the same two ways (KL_TOL,
 *     KL_LONG_TOL); 15% is 2.5x the largest spread seen between the two
 *     noise sources;
 *   - |mean dlp| <= 2x llama.cpp's own (DLP_TOL): dlp is not zero-mean under
 *     pure noise (the top-1 is the argmax of P, so any noise in Q lowers its
 *     log-probability on average), but a model that is worse everywhere
 *     moves it by multiples;
 *   - every deviation <= LOGIT_MAX_TOL (llama.cpp's own 2.15 plus ~20%);
 *   - top-1: identical at every position where llama.cpp's top1-top2 margin
 *     is at least MARGIN. One logit moving by up to 2.15 under benign changes
 *     means smaller margins are not decided by the model; 1.0 is 1.7x the
 *     largest flip llama.cpp shows itself (0.58) and above the largest we
 *     have shown (0.85, greedy prompt 0 step 9). Overall agreement is
 *     printed (95.79% when written; llama.cpp vs itself 95.91%);
 *   - greedy: free-running, identical until the first step whose llama.cpp
 *     margin is below MARGIN (a near-tie); teacher-forced along llama.cpp's
 *     path, identical at every step with margin >= MARGIN.
 * The statistics are deterministic (the engine gives the same logits run to
 * run and whatever the batch shape, test_chunked_prefill_equals_single_batch),
 * so a limit is a fixed line, not a probability. Regenerating the fixtures
 * means re-measuring these numbers.
 */
#define LOGIT_MEAN_TOL (1.15 * 0.1518)
#define LOGIT_MEAN_LONG_TOL (1.15 * 0.1440)
#define KL_TOL (1.15 * 0.00260)
#define KL_LONG_TOL (1.15 * 0.00251)
#define DLP_TOL (2.0 * 0.0051)
#define LOGIT_MAX_TOL 2.6f
#define MARGIN 1.0f
#define LONG_FROM 1024 /* positions where an error growing with position shows */

static const char *g_model_path;
static ekv_model *g_model;

static kv_pool *new_pool(int32_t ctx)
{
    return model_kv_pool_create(g_model, ctx, NULL);
}

/* All-position logits of ids, prefilled in chunks of `chunk` rows. */
static float *all_logits(ekv_runtime *rt, kv_pool *kv, const int32_t *ids, int32_t n,
                         int32_t chunk)
{
    const ekv_model_config *c = model_config(g_model);
    float *logits = malloc((size_t)n * c->n_vocab * sizeof *logits);
    kv_seq *seq = kv_seq_create(kv, c->n_layers, c->n_kv_heads, NULL);
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    kv_seq **seqs = malloc((size_t)n * sizeof *seqs);
    uint8_t *want = malloc((size_t)n);
    for (int32_t i = 0; i < n; i++) {
        pos[i] = i;
        seqs[i] = seq;
        want[i] = 1;
    }
    ekv_error err = {0};
    for (int32_t s = 0; s < n; s += chunk) {
        int32_t m = n - s < chunk ? n - s : chunk;
        model_batch b = {.n = m, .tokens = ids + s, .pos = pos + s, .seqs = seqs, .want_logits = want};
        if (model_forward(rt, &b, logits + (size_t)s * c->n_vocab, &err)) {
            fprintf(stderr, "forward: %s\n", err.msg);
            free(logits);
            logits = NULL;
            break;
        }
    }
    kv_seq_free(seq);
    free(pos);
    free(seqs);
    free(want);
    return logits;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

static void test_prompt_tokens_match_llamacpp(void)
{
    fix_prompt *ps;
    int n;
    CHECK(fix_load(EKV_FIXTURES "/logits.txt", &ps, &n) == 0);
    for (int p = 0; p < n; p++) {
        int32_t *ids = NULL;
        size_t n_ids = 0;
        CHECK(tok_encode(model_tokenizer(g_model), ps[p].text, strlen(ps[p].text), false,
                         ps[p].parse_special, &ids, &n_ids, NULL) == EKV_OK);
        CHECK_EQ_INT(n_ids, ps[p].n_ids);
        CHECK(n_ids == (size_t)ps[p].n_ids && !memcmp(ids, ps[p].ids, n_ids * sizeof *ids));
        free(ids);
    }
    fix_free(ps, n);
}

#define N_RANGES 5
static const int32_t RANGE_START[N_RANGES + 1] = {0, 512, 1024, 2048, 4096, INT32_MAX};
#define LONG_POS 4096 /* the long fixture must reach past this */

/* How our rows compare with llama.cpp's fixture positions. The definitions
 * are the ones tests/fixtures/noise_floor.py measures llama.cpp against
 * itself with (P: llama.cpp's distribution, Q: ours, t0..t9: its top-10). */
typedef struct parity_stats {
    long positions, top1_same, decided, decided_same, over_max;
    long n_dev;
    double sum_dev, max_dev; /* |Q logit - P logit| of t0..t9 */
    long n_lse;              /* positions with llama.cpp's log-sum-exp */
    double sum_dlp;          /* log Q(t0) - log P(t0) */
    double sum_kl, max_kl;   /* KL(P || Q) over {t0, ..., t9, any other} */
    /* the same by position range [RANGE_START[r], RANGE_START[r + 1]) */
    long range_n[N_RANGES];
    double range_dev[N_RANGES], range_dlp[N_RANGES], range_kl[N_RANGES];
} parity_stats;

static double log_sum_exp(const float *x, int32_t n)
{
    float m = x[0];
    for (int32_t i = 1; i < n; i++)
        if (x[i] > m)
            m = x[i];
    double sum = 0;
    for (int32_t i = 0; i < n; i++)
        sum += exp((double)x[i] - m);
    return m + log(sum);
}

static void stats_add(parity_stats *s, const fix_prompt *p, int32_t i, const float *row,
                      int32_t n_vocab)
{
    const int32_t *id = p->top_id[i];
    const float *ref = p->top_logit[i];
    const int same = argmax(row, n_vocab) == id[0];
    int r = 0;
    while (i >= RANGE_START[r + 1])
        r++;
    s->positions++;
    s->range_n[r]++;
    s->top1_same += same;
    if (ref[0] - ref[1] >= MARGIN) {
        s->decided++;
        s->decided_same += same;
    }
    for (int k = 0; k < FIX_TOPK; k++) {
        const double d = fabs((double)row[id[k]] - ref[k]);
        if (d > s->max_dev)
            s->max_dev = d;
        s->sum_dev += d;
        s->range_dev[r] += d / FIX_TOPK;
        s->n_dev++;
        if (d > LOGIT_MAX_TOL && s->over_max++ < 5)
            fprintf(stderr, "  %d-token prompt, position %d, id %d: ours %.4f llama.cpp %.4f\n",
                    p->n_ids, i, id[k], row[id[k]], ref[k]);
    }
    if (isnan(p->lse[i]))
        return;
    const double lse_p = p->lse[i], lse_q = log_sum_exp(row, n_vocab);
    double kl = 0, mass_p = 0, mass_q = 0;
    for (int k = 0; k < FIX_TOPK; k++) {
        const double lp = ref[k] - lse_p, lq = row[id[k]] - lse_q;
        kl += exp(lp) * (lp - lq);
        mass_p += exp(lp);
        mass_q += exp(lq);
    }
    const double tail_p = 1.0 - mass_p, tail_q = fmax(1.0 - mass_q, 1e-300);
    if (tail_p > 0)
        kl += tail_p * log(tail_p / tail_q);
    const double dlp = ((double)row[id[0]] - lse_q) - ((double)ref[0] - lse_p);
    s->n_lse++;
    s->sum_dlp += dlp;
    s->sum_kl += kl;
    if (kl > s->max_kl)
        s->max_kl = kl;
    s->range_dlp[r] += dlp;
    s->range_kl[r] += kl;
}

/* Prefills p on a fresh sequence in chunks, all rows wanted, adding every
 * position to s (a 4.6k-token prompt's logits would need 0.9 GB at once). */
static int prompt_stats(ekv_runtime *rt, kv_pool *kv, const fix_prompt *p, int32_t chunk,
                        parity_stats *s)
{
    const ekv_model_config *c = model_config(g_model);
    float *logits = malloc((size_t)chunk * c->n_vocab * sizeof *logits);
    kv_seq *seq = kv_seq_create(kv, c->n_layers, c->n_kv_heads, NULL);
    int32_t *pos = malloc((size_t)chunk * sizeof *pos);
    kv_seq **seqs = malloc((size_t)chunk * sizeof *seqs);
    uint8_t *want = malloc((size_t)chunk);
    ekv_error err = {0};
    int rc = 0;
    for (int32_t s0 = 0; s0 < p->n_ids && !rc; s0 += chunk) {
        const int32_t m = p->n_ids - s0 < chunk ? p->n_ids - s0 : chunk;
        for (int32_t i = 0; i < m; i++) {
            pos[i] = s0 + i;
            seqs[i] = seq;
            want[i] = 1;
        }
        model_batch b = {.n = m, .tokens = p->ids + s0, .pos = pos, .seqs = seqs, .want_logits = want};
        if (model_forward(rt, &b, logits, &err)) {
            fprintf(stderr, "forward: %s\n", err.msg);
            rc = -1;
            break;
        }
        for (int32_t i = 0; i < m; i++)
            stats_add(s, p, s0 + i, logits + (size_t)i * c->n_vocab, c->n_vocab);
    }
    kv_seq_free(seq);
    free(logits);
    free(pos);
    free(seqs);
    free(want);
    return rc;
}

static void test_logits_match_llamacpp(void)
{
    fix_prompt *ps[2];
    int n[2];
    CHECK(fix_load(EKV_FIXTURES "/logits.txt", &ps[0], &n[0]) == 0);
    CHECK(fix_load(EKV_FIXTURES "/logits_long.txt", &ps[1], &n[1]) == 0);
    CHECK(n[0] >= 5 && n[1] >= 1);
    int32_t longest = 0;
    for (int f = 0; f < 2; f++)
        for (int p = 0; p < n[f]; p++)
            if (ps[f][p].n_ids > longest)
                longest = ps[f][p].n_ids;
    CHECK(longest > LONG_POS);
    kv_pool *kv = new_pool(longest);
    ekv_runtime *rt = model_runtime_create(g_model, 512, longest, 0, NULL);
    parity_stats s = {0};
    long short_positions = 0, short_decided = 0;
    for (int f = 0; f < 2; f++) {
        for (int p = 0; p < n[f]; p++)
            CHECK(prompt_stats(rt, kv, &ps[f][p], 512, &s) == 0);
        if (f == 0) {
            short_positions = s.positions;
            short_decided = s.decided;
        }
    }
    const double mean_dlp = s.sum_dlp / s.n_lse, mean_kl = s.sum_kl / s.n_lse;
    fprintf(stderr,
            "  %ld positions: top-1 agreement %.2f%% overall, %ld/%ld where llama.cpp's margin >= "
            "%.1f\n  top-10 logit deviation mean %.4f (limit %.4f) max %.4f (limit %.2f); "
            "mean dlp %+.5f (limit +-%.4f); mean kl %.5f (limit %.5f, max %.4f)\n",
            s.positions, 100.0 * s.top1_same / s.positions, s.decided_same, s.decided, MARGIN,
            s.sum_dev / s.n_dev, LOGIT_MEAN_TOL, s.max_dev, LOGIT_MAX_TOL, mean_dlp, DLP_TOL,
            mean_kl, KL_TOL, s.max_kl);
    for (int r = 0; r < N_RANGES; r++)
        if (s.range_n[r])
            fprintf(stderr, "    positions %5d..: %4ld, deviation mean %.4f, dlp %+.5f, kl %.5f\n",
                    RANGE_START[r], s.range_n[r], s.range_dev[r] / s.range_n[r],
                    s.range_dlp[r] / s.range_n[r], s.range_kl[r] / s.range_n[r]);
    long n_long = 0;
    double dev_long = 0, kl_long = 0;
    for (int r = 0; r < N_RANGES; r++)
        if (RANGE_START[r] >= LONG_FROM) {
            n_long += s.range_n[r];
            dev_long += s.range_dev[r];
            kl_long += s.range_kl[r];
        }
    dev_long /= n_long;
    kl_long /= n_long;
    fprintf(stderr, "  positions >= %d: %ld, deviation mean %.4f (limit %.4f), kl %.5f (limit %.5f)\n",
            LONG_FROM, n_long, dev_long, LOGIT_MEAN_LONG_TOL, kl_long, KL_LONG_TOL);
    CHECK(s.range_n[N_RANGES - 1] > 0); /* positions past 4096 were checked */
    CHECK_EQ_INT(s.n_lse, s.positions); /* every position has llama.cpp's normaliser */
    /* the margin criterion must not be vacuous */
    CHECK(short_decided * 2 >= short_positions);
    CHECK_EQ_INT(s.decided_same, s.decided);
    CHECK_EQ_INT(s.over_max, 0);
    CHECK(s.sum_dev / s.n_dev <= LOGIT_MEAN_TOL);
    CHECK(fabs(mean_dlp) <= DLP_TOL);
    CHECK(mean_kl <= KL_TOL);
    CHECK(dev_long <= LOGIT_MEAN_LONG_TOL);
    CHECK(kl_long <= KL_LONG_TOL);
    model_runtime_free(rt);
    kv_pool_destroy(kv);
    for (int f = 0; f < 2; f++)
        fix_free(ps[f], n[f]);
}

/* Prefills ids on a fresh sequence; logits of the last row. */
static kv_seq *prefill(ekv_runtime *rt, kv_pool *kv, const int32_t *ids, int32_t n, float *logits)
{
    const ekv_model_config *c = model_config(g_model);
    kv_seq *seq = kv_seq_create(kv, c->n_layers, c->n_kv_heads, NULL);
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    kv_seq **seqs = malloc((size_t)n * sizeof *seqs);
    for (int32_t i = 0; i < n; i++) {
        pos[i] = i;
        seqs[i] = seq;
    }
    model_batch b = {.n = n, .tokens = ids, .pos = pos, .seqs = seqs};
    CHECK(model_forward(rt, &b, logits, NULL) == EKV_OK);
    free(pos);
    free(seqs);
    return seq;
}

/* Runs the greedy continuation; free-running, or teacher-forced with
 * llama.cpp's tokens. Returns the first step whose argmax differs (n_gen if
 * none), and counts differing steps whose llama.cpp margin is >= MARGIN. */
static int32_t greedy_run(ekv_runtime *rt, kv_pool *kv, const fix_prompt *p, int forced,
                          int32_t *decided_diffs)
{
    const ekv_model_config *c = model_config(g_model);
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    kv_seq *seq = prefill(rt, kv, p->ids, p->n_ids, logits);
    int32_t first_diff = p->n_gen;
    *decided_diffs = 0;
    for (int32_t g = 0; g < p->n_gen; g++) {
        int32_t id = argmax(logits, c->n_vocab), at = p->n_ids + g;
        if (id != p->gen[g]) {
            if (first_diff == p->n_gen)
                first_diff = g;
            if (p->margins[g] >= MARGIN)
                (*decided_diffs)++;
            if (!forced)
                break;
            id = p->gen[g];
        }
        model_batch d = {.n = 1, .tokens = &id, .pos = &at, .seqs = &seq};
        CHECK(model_forward(rt, &d, logits, NULL) == EKV_OK);
    }
    kv_seq_free(seq);
    free(logits);
    return first_diff;
}

static void test_greedy_matches_llamacpp(void)
{
    fix_prompt *ps;
    int n;
    CHECK(fix_load(EKV_FIXTURES "/greedy.txt", &ps, &n) == 0);
    CHECK(n >= 5);
    kv_pool *kv = new_pool(1024);
    ekv_runtime *rt = model_runtime_create(g_model, 512, 1024, 0, NULL);
    int identical = 0;
    for (int p = 0; p < n; p++) {
        CHECK(ps[p].margins != NULL);
        if (!ps[p].margins)
            continue;
        int32_t decided_diffs;
        int32_t free_run = greedy_run(rt, kv, &ps[p], 0, &decided_diffs);
        identical += free_run == ps[p].n_gen;
        if (free_run < ps[p].n_gen) {
            fprintf(stderr, "  prompt %d: free-running greedy equal for %d of %d tokens; "
                    "llama.cpp's margin at the split is %.3f\n",
                    p, free_run, ps[p].n_gen, ps[p].margins[free_run]);
            CHECK(ps[p].margins[free_run] < MARGIN);
        }
        int32_t forced_first = greedy_run(rt, kv, &ps[p], 1, &decided_diffs);
        CHECK_EQ_INT(decided_diffs, 0);
        if (forced_first < ps[p].n_gen)
            fprintf(stderr, "  prompt %d: teacher-forced, first differing step %d, %d differ "
                    "with margin >= %.1f\n", p, forced_first, decided_diffs, MARGIN);
    }
    fprintf(stderr, "  %d of %d greedy continuations identical for all 64 tokens\n", identical, n);
    model_runtime_free(rt);
    kv_pool_destroy(kv);
    fix_free(ps, n);
}

/* Prefill chunking (and so the batch shape) must not change results at all:
 * every kernel computes a row the same way whatever else is in the batch. */
static void test_chunked_prefill_equals_single_batch(void)
{
    const ekv_model_config *c = model_config(g_model);
    fix_prompt *ps;
    int n;
    CHECK(fix_load(EKV_FIXTURES "/logits.txt", &ps, &n) == 0);
    const fix_prompt *p = &ps[n - 1];
    kv_pool *kv = new_pool(1024);
    ekv_runtime *rt = model_runtime_create(g_model, 512, 1024, 0, NULL);
    float *a = all_logits(rt, kv, p->ids, p->n_ids, 512);
    float *b = all_logits(rt, kv, p->ids, p->n_ids, 7);
    double max_dev = 0;
    for (size_t i = 0; a && b && i < (size_t)p->n_ids * c->n_vocab; i++)
        if (fabs(a[i] - b[i]) > max_dev)
            max_dev = fabs(a[i] - b[i]);
    CHECK(a && b);
    CHECK(max_dev == 0.0);
    CHECK_EQ_INT(kv_pool_free_blocks(kv), kv_pool_total_blocks(kv));
    free(a);
    free(b);
    model_runtime_free(rt);
    kv_pool_destroy(kv);
    fix_free(ps, n);
}

/* Decode rows of different sequences in one batch give the same logits as
 * each sequence decoded alone (what continuous batching relies on). */
static void test_batched_decode_equals_each_alone(void)
{
    const ekv_model_config *c = model_config(g_model);
    fix_prompt *ps;
    int n;
    CHECK(fix_load(EKV_FIXTURES "/greedy.txt", &ps, &n) == 0);
    enum { N = 3 };
    kv_pool *kv = new_pool(4096);
    ekv_runtime *rt = model_runtime_create(g_model, 512, 1024, 0, NULL);
    float *alone = malloc((size_t)N * c->n_vocab * sizeof *alone);
    float *batched = malloc((size_t)N * c->n_vocab * sizeof *batched);
    float *scratch = malloc((size_t)c->n_vocab * sizeof *scratch);
    kv_seq *seqs[N];
    int32_t toks[N], pos[N];
    uint8_t want[N] = {1, 1, 1};
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < N; i++)
            seqs[i] = prefill(rt, kv, ps[i + 2].ids, ps[i + 2].n_ids, scratch);
        for (int i = 0; i < N; i++) {
            toks[i] = ps[i + 2].gen[0];
            pos[i] = ps[i + 2].n_ids;
        }
        if (round == 0) { /* one sequence per forward */
            for (int i = 0; i < N; i++) {
                model_batch b = {.n = 1, .tokens = &toks[i], .pos = &pos[i], .seqs = &seqs[i]};
                CHECK(model_forward(rt, &b, alone + (size_t)i * c->n_vocab, NULL) == EKV_OK);
            }
        } else { /* all three rows in one forward */
            model_batch b = {.n = N, .tokens = toks, .pos = pos, .seqs = seqs, .want_logits = want};
            CHECK(model_forward(rt, &b, batched, NULL) == EKV_OK);
        }
        for (int i = 0; i < N; i++)
            kv_seq_free(seqs[i]);
    }
    CHECK(memcmp(alone, batched, (size_t)N * c->n_vocab * sizeof *alone) == 0);
    free(alone);
    free(batched);
    free(scratch);
    model_runtime_free(rt);
    kv_pool_destroy(kv);
    fix_free(ps, n);
}

int main(int argc, char **argv)
{
    g_model_path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    ekv_error err = {0};
    g_model = model_load(g_model_path, &err);
    if (!g_model) {
        fprintf(stderr, "cannot load %s: %s (run scripts/setup.sh)\n", g_model_path, err.msg);
        return 1;
    }
    RUN_TEST(test_prompt_tokens_match_llamacpp);
    RUN_TEST(test_logits_match_llamacpp);
    RUN_TEST(test_greedy_matches_llamacpp);
    RUN_TEST(test_chunked_prefill_equals_single_batch);
    RUN_TEST(test_batched_decode_equals_each_alone);
    model_free(g_model);
    return TEST_EXIT();
}
