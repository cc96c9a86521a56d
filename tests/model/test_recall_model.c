/*
 * test_recall_model.c - recall of evicted KV (kvrecall.h) on the demo model:
 *   - with R large enough to recall every evicted block, decode logits are
 *     bit-identical to a sequence holding the same tokens as ordinary KV in
 *     the order attention sees them, and equal full KV's up to summation
 *     order, while the same compression without recall does not;
 *   - the digest bound and the ranking score hold on real post-RoPE keys against real decode
 *     queries, in every layer and KV head;
 *   - a policy with recall keeps resident + recall buffer within its budget
 *     at every step;
 *   - a batch mixing a recalling sequence and a plain compressed one gives
 *     each the logits it gets alone, bit for bit.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "recall_harness.h"

#define STEPS RH_STEPS
#define N_PROMPT RH_PROMPT

static kv_pool *g_pool;

static double max_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

/* A sequence holding, per (layer, KV head), rec's recall blocks then its
 * resident blocks: the tokens attention sees with recall, in the order it
 * sees them, as ordinary KV (needs whole blocks: no padding anywhere). */
static kv_seq *same_order_reference(const kv_seq *rec)
{
    const ekv_model_config *c = model_config(g_model);
    const kv_recall *rc = kv_seq_recall(rec);
    kv_seq *ref = kv_seq_create(g_pool, c->n_layers, c->n_kv_heads, NULL);
    uint8_t *blk = calloc(1, kv_pool_block_bytes(g_pool));
    const int32_t D = c->head_dim;
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int32_t h = 0; h < c->n_kv_heads; h++) {
            CHECK_EQ_INT(kv_recall_tokens(rc, l, h) % 16, 0);
            CHECK_EQ_INT(kv_seq_len(rec, l, h) % 16, 0);
            for (int32_t b = 0; b < kv_recall_blocks(rc, l, h); b++) {
                const ekv_f16 *k, *v;
                const int32_t *pos;
                kv_recall_block(rc, l, h, b, &k, &v, &pos, NULL, NULL);
                /* the pool's block layout (kvcache.c): K, V, positions */
                memcpy(blk, k, (size_t)D * 16 * sizeof *k);
                memcpy(blk + (size_t)D * 16 * sizeof *k, v, (size_t)D * 16 * sizeof *v);
                memcpy(blk + (size_t)D * 32 * sizeof *k, pos, 16 * sizeof *pos);
                CHECK(kv_seq_block_import(ref, l, h, blk, 16, NULL) == EKV_OK);
            }
            for (int32_t b = 0; b * 16 < kv_seq_len(rec, l, h); b++) {
                const int32_t n = kv_seq_block_export(rec, l, h, b, blk);
                CHECK(kv_seq_block_import(ref, l, h, blk, n, NULL) == EKV_OK);
            }
        }
    free(blk);
    return ref;
}

static void test_recalling_every_block_equals_full_kv(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *first = malloc(V * sizeof *first), *ref = malloc(STEPS * V * sizeof *ref);
    float *got = malloc(STEPS * V * sizeof *got), *plain = malloc(STEPS * V * sizeof *plain);
    float *same = malloc(STEPS * V * sizeof *same);
    kv_seq *full = rh_prepare(g_pool, NULL, 0, first);
    rh_decode(full, first, ref, NULL, NULL);
    /* streaming at 0.2 keeps 64 of 320 tokens per head: 16 whole blocks evicted */
    kvc_policy p;
    CHECK(kvc_policy_parse("streaming", 0.2, &p, NULL) == EKV_OK);
    kv_seq *rec = rh_prepare(g_pool, &p, (N_PROMPT + 15) / 16, first);
    kv_recall_stats st;
    kv_recall_get_stats(kv_seq_recall(rec), &st);
    CHECK_EQ_INT(st.evicted_tokens, (int64_t)(N_PROMPT - 64) * 90);
    kv_seq *order = same_order_reference(rec);
    rh_decode_on(rec, first, ref, got, NULL, NULL);
    rh_decode_on(order, first, ref, same, NULL, NULL);
    kv_seq *cmp = rh_prepare(g_pool, &p, 0, first);
    rh_decode_on(cmp, first, ref, plain, NULL, NULL);
    const double d_recall = max_diff(ref, got, STEPS * V), d_plain = max_diff(ref, plain, STEPS * V);
    fprintf(stderr, "  max |logit - full|: recall-all %.3g, streaming 0.2 alone %.3g\n",
            d_recall, d_plain);
    /* the same keys at the same positions in the same order as ordinary KV:
     * bit for bit (recalled tokens are ordinary keys to attention) */
    CHECK(memcmp(got, same, STEPS * V * sizeof *got) == 0);
    /* against full KV only attention's summation order differs, which the
     * Q8 activation quantization of the next matmul can amplify to a few
     * tenths of a logit; dropping the tokens costs far more. All three
     * decodes are teacher-forced on full KV's greedy tokens, so a near-tie
     * broken the other way does not make the decodes part ways (on an AVX2
     * machine step 2's top two, 0.22 apart in full KV, swap). */
    CHECK(d_recall < 1.0);
    CHECK(d_recall < 0.25 * d_plain);
    /* full KV's token wherever its lead over the runner-up is beyond the
     * project's near-tie margin (0.6 logit, as the TP tests use): a 1-logit
     * rule left no step of the six to check once 9b73648's Q4_1 grouping
     * moved full KV's leads to 0.05-0.84 on this prompt */
    int clear = 0, agree = 0;
    for (int s = 0; s < STEPS; s++) {
        const float *r = ref + (size_t)s * V;
        const int32_t a = rh_argmax(r, (int32_t)V);
        float second = -INFINITY;
        for (size_t i = 0; i < V; i++)
            if ((int32_t)i != a && r[i] > second)
                second = r[i];
        if (r[a] - second > 0.6f) {
            clear++;
            agree += rh_argmax(got + (size_t)s * V, (int32_t)V) == a;
        }
    }
    CHECK(clear > 0);
    CHECK_EQ_INT(agree, clear);
    kv_seq_free(full);
    kv_seq_free(rec);
    kv_seq_free(order);
    kv_seq_free(cmp);
    free(first);
    free(ref);
    free(got);
    free(plain);
    free(same);
}

/* model_tap: the decode row's post-RoPE queries of every layer. */
typedef struct qtap {
    float *q; /* [layer][n_heads * head_dim] */
    size_t per_layer;
} qtap;

static void tap_fn(void *ctx, int32_t layer, const struct model_batch *b, const float *q)
{
    (void)b;
    qtap *t = ctx;
    memcpy(t->q + (size_t)layer * t->per_layer, q, t->per_layer * sizeof *q);
}

static void test_bound_holds_on_real_keys_and_queries(void)
{
    const ekv_model_config *c = model_config(g_model);
    const int32_t D = c->head_dim, G = c->n_heads / c->n_kv_heads;
    const size_t V = (size_t)c->n_vocab;
    float *first = malloc(V * sizeof *first), *out = malloc(V * sizeof *out);
    kvc_policy p;
    CHECK(kvc_policy_parse("streaming", 0.2, &p, NULL) == EKV_OK);
    p.recall = 2;
    kv_seq *seq = rh_prepare(g_pool, &p, 0, first);
    qtap t = {.per_layer = (size_t)c->n_heads * D};
    t.q = malloc((size_t)c->n_layers * t.per_layer * sizeof *t.q);
    model_tap tap = {.fn = tap_fn, .ctx = &t};
    int32_t id = rh_argmax(first, (int32_t)V);
    const int32_t pos = N_PROMPT;
    model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq, .tap = &tap};
    CHECK(model_forward(g_rt, &b, out, NULL) == EKV_OK);
    const kv_recall *rc = kv_seq_recall(seq);
    int64_t checked = 0, violations = 0, tighter = 0;
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int32_t h = 0; h < c->n_kv_heads; h++)
            for (int32_t blk = 0; blk < kv_recall_blocks(rc, l, h); blk++) {
                const ekv_f16 *kb;
                const float *mn, *mx;
                const int32_t filled = kv_recall_block(rc, l, h, blk, &kb, NULL, NULL, &mn, &mx);
                for (int32_t g = 0; g < G; g++) {
                    const float *q = t.q + (size_t)l * t.per_layer + (size_t)(h * G + g) * D;
                    double exact = -INFINITY, mag = 0;
                    for (int32_t r = 0; r < filled; r++) {
                        double s = 0;
                        for (int32_t j = 0; j < D; j++)
                            s += (double)q[j] * ekv_f16_to_f32(kb[(size_t)j * 16 + r]);
                        exact = fmax(exact, s);
                    }
                    for (int32_t j = 0; j < D; j++)
                        mag += fabs(q[j]) * fmax(fabs(mn[j]), fabs(mx[j]));
                    violations += !(kv_digest_bound(mn, mx, q, D) >= exact - 1e-6 * mag);
                    /* the ranking's score (exact channels + box) too */
                    const float score = kv_recall_block_bound(rc, l, h, blk, q);
                    violations += !(score >= exact - 1e-6 * mag);
                    tighter += score < kv_digest_bound(mn, mx, q, D);
                    checked++;
                }
            }
    fprintf(stderr, "  %lld (block, query head) pairs checked, ranking score below the box on %lld\n",
            (long long)checked, (long long)tighter);
    CHECK(checked > 1000);
    CHECK(tighter > checked / 2);
    CHECK_EQ_INT(violations, 0);
    kv_seq_free(seq);
    free(t.q);
    free(first);
    free(out);
}

static void test_budget_holds_at_every_step(void)
{
    const ekv_model_config *c = model_config(g_model);
    const int32_t nh = c->n_layers * c->n_kv_heads, R = 3;
    const size_t V = (size_t)c->n_vocab;
    float *first = malloc(V * sizeof *first), *out = malloc(STEPS * V * sizeof *out);
    kvc_policy p;
    CHECK(kvc_policy_parse("snapkv", 0.25, &p, NULL) == EKV_OK);
    p.recall = R;
    int32_t mean;
    CHECK(kvc_policy_mean_tokens(&p, N_PROMPT, &mean, NULL) == EKV_OK);
    kv_seq *seq = rh_prepare(g_pool, &p, 0, first);
    const kv_recall *rc = kv_seq_recall(seq);
    CHECK(rc != NULL);
    int64_t resident = 0;
    for (int32_t i = 0; i < nh; i++)
        resident += kv_seq_len(seq, i / c->n_kv_heads, i % c->n_kv_heads);
    /* resident + the recall buffer within the policy's budget */
    CHECK(resident + (int64_t)nh * R * 16 <= (int64_t)mean * nh);
    const float *prev = first;
    kv_recall_stats before, after;
    for (int s = 0; s < STEPS; s++) {
        kv_recall_get_stats(rc, &before);
        int32_t id = rh_argmax(prev, (int32_t)V);
        const int32_t pos = N_PROMPT + s;
        model_batch b = {.n = 1, .tokens = &id, .pos = &pos, .seqs = &seq};
        CHECK(model_forward(g_rt, &b, out + (size_t)s * V, NULL) == EKV_OK);
        prev = out + (size_t)s * V;
        kv_recall_get_stats(rc, &after);
        CHECK_EQ_INT(after.selections - before.selections, nh);
        CHECK(after.blocks_recalled - before.blocks_recalled <= (int64_t)nh * R);
        CHECK(after.blocks_recalled - before.blocks_recalled > 0);
        int64_t now = 0;
        for (int32_t i = 0; i < nh; i++)
            now += kv_seq_len(seq, i / c->n_kv_heads, i % c->n_kv_heads);
        CHECK_EQ_INT(now, resident + (int64_t)nh * (s + 1)); /* decode tokens only */
    }
    kv_seq_free(seq);
    free(first);
    free(out);
}

static void test_mixed_batch_equals_each_alone(void)
{
    const size_t V = (size_t)model_config(g_model)->n_vocab;
    float *first = malloc(V * sizeof *first), *alone = malloc(2 * V * sizeof *alone);
    float *mixed = malloc(2 * V * sizeof *mixed);
    kvc_policy pr, pp;
    CHECK(kvc_policy_parse("snapkv", 0.25, &pr, NULL) == EKV_OK);
    pr.recall = 2;
    CHECK(kvc_policy_parse("snapkv", 0.25, &pp, NULL) == EKV_OK);
    kv_seq *a = rh_prepare(g_pool, &pr, 0, first), *b = rh_prepare(g_pool, &pp, 0, first);
    kv_seq *a2 = kv_seq_clone(a, NULL), *b2 = kv_seq_clone(b, NULL);
    int32_t ids[2] = {rh_argmax(first, (int32_t)V), rh_argmax(first, (int32_t)V)};
    const int32_t pos[2] = {N_PROMPT, N_PROMPT};
    model_batch ba = {.n = 1, .tokens = ids, .pos = pos, .seqs = &a};
    model_batch bb = {.n = 1, .tokens = ids + 1, .pos = pos + 1, .seqs = &b};
    CHECK(model_forward(g_rt, &ba, alone, NULL) == EKV_OK);
    CHECK(model_forward(g_rt, &bb, alone + V, NULL) == EKV_OK);
    kv_seq *seqs[2] = {a2, b2};
    const uint8_t want[2] = {1, 1};
    model_batch bm = {.n = 2, .tokens = ids, .pos = pos, .seqs = seqs, .want_logits = want};
    CHECK(model_forward(g_rt, &bm, mixed, NULL) == EKV_OK);
    CHECK(memcmp(alone, mixed, 2 * V * sizeof *mixed) == 0);
    CHECK(max_diff(alone, alone + V, V) > 0); /* recall changed something */
    kv_seq_free(a);
    kv_seq_free(b);
    kv_seq_free(a2);
    kv_seq_free(b2);
    free(first);
    free(alone);
    free(mixed);
}

int main(int argc, char **argv)
{
    if (rh_open(argc, argv, "test_recall_model"))
        return 1;
    if (!(g_pool = rh_pool(8))) {
        fprintf(stderr, "no KV pool\n");
        return 1;
    }
    RUN_TEST(test_recalling_every_block_equals_full_kv);
    RUN_TEST(test_bound_holds_on_real_keys_and_queries);
    RUN_TEST(test_budget_holds_at_every_step);
    RUN_TEST(test_mixed_batch_equals_each_alone);
    kv_pool_destroy(g_pool);
    rh_close();
    return TEST_EXIT();
}
