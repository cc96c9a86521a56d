/*
 * test_compress_ref.c - what each (layer, KV head) keeps after
 * kvc_capture_compress, against a brute-force reference in double written
 * from the specs, not from compress/:
 *
 *   - SnapKV's rule (specs/uncomp.md section 3 steps 1, 3, 4): window w =
 *     min(8, N, B / 2); the last w queries' causal softmax (scale 1/sqrt(d))
 *     summed over the window rows, for j in the prefix [0, N - w); max-pool
 *     kernel 7, stride 1, padding -inf; the top B - w of the prefix plus the
 *     window. GQA pooling (docs/COMPRESSION.md deviation 1): the scores of
 *     the query heads sharing a KV head are summed.
 *   - StreamingLLM (Xiao et al. 2023): 4 attention sinks + the most recent.
 *   - PyramidKV (Cai et al. 2024, pyramidkv_utils.py's schedule): layer l
 *     keeps w + max_num - l (max_num - min_num) / (L - 1), min_num =
 *     (B - w) // beta, max_num = 2 (B - w) - min_num, capped at the prompt;
 *     entrokv scales it to sum L x B (deviation 3), so each layer is within
 *     one token of the formula and the layers sum to L x B.
 *   - UNComp (section 1 entropy, section 3 step 2 budgets, deviations 1, 2,
 *     4): a KV head's entropy is the mean of its query heads' truncated
 *     matrix entropy (k = d / 4); the n/2 highest (at least 1) are HIGH and
 *     keep twice a LOW head (3 KV heads: 1.5 M and 0.75 M); online, layer
 *     budgets are proportional to the layer's mean entropy clamped to
 *     [M/2, 2M]; with a profile the profile's groups and uniform layers.
 *
 * Each case runs the public path the engine uses: kvc_capture_create, its
 * tap fed every layer's post-RoPE queries (with rows of another sequence in
 * the same batches, before and after this one's), kvc_capture_compress on a
 * real kv_seq; then every head's kept positions (kv_seq_positions) must be
 * the reference's and their K and V the values before compression. Inputs
 * are synthetic (random keys, per-layer queries with distinct spectra per
 * head) and real (the demo model's prefill of a licence text).
 * Budgets cover tiny (2, 3, 9, 16, 17 tokens), fractions and N - 1.
 *
 * Ties: max-pooling makes exact ties between neighbours; the reference
 * breaks them to the lower index. Two scores within float rounding of each
 * other (1e-5 relative) may come out either way; such swaps are counted and
 * must stay rare.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ekv_test.h"
#include "entrokv/compress.h"
#include "entrokv/model.h"

#include "compress_ref.h"

static ekv_model *g_model;
static ekv_runtime *g_rt;

/* ---- the path under test ---- */

static kv_seq *seq_of(const dataset *ds, kv_pool *pool)
{
    kv_seq *seq = kv_seq_create(pool, L, HKV, NULL);
    float k[512], v[512];
    for (int32_t l = 0; seq && l < L; l++)
        for (int32_t g = 0; g < HKV; g++)
            for (int32_t t = 0; t < ds->n; t++) {
                for (int32_t j = 0; j < D; j++) {
                    k[j] = ekv_f16_to_f32(ds->k[kv_at(ds, l, g, t) + j]);
                    v[j] = ekv_f16_to_f32(ds->v[kv_at(ds, l, g, t) + j]);
                }
                if (kv_seq_append(seq, l, g, k, v, ds->pos[t], NULL)) {
                    kv_seq_free(seq);
                    return NULL;
                }
            }
    return seq;
}

/* Feeds the capture's tap as a chunked prefill would: per chunk and layer
 * one batch holding another sequence's rows at the same positions (other
 * queries) before and after this sequence's rows. */
static void feed_tap(const model_tap *tap, kv_seq *seq, kv_seq *other, const dataset *ds)
{
    enum { CHUNK = 50 };
    const size_t row = (size_t)H * D;
    float *qb = malloc(3 * CHUNK * row * sizeof *qb);
    int32_t tokens[3 * CHUNK] = {0}, pos[3 * CHUNK];
    kv_seq *seqs[3 * CHUNK];
    for (int32_t a = 0; a < ds->n; a += CHUNK) {
        const int32_t m = ds->n - a < CHUNK ? ds->n - a : CHUNK;
        for (int32_t i = 0; i < 3 * m; i++) {
            pos[i] = ds->pos[a + i % m];
            seqs[i] = i / m == 1 ? seq : other;
        }
        model_batch b = {.n = 3 * m, .tokens = tokens, .pos = pos, .seqs = seqs, .tap = tap};
        for (int32_t l = 0; l < L; l++) {
            for (int32_t i = 0; i < 3 * m; i++)
                for (size_t j = 0; j < row; j++)
                    qb[i * row + j] = i / m == 1 ? q_at(ds, l, a + i % m, 0)[j] : (float)nrand();
            tap->fn(tap->ctx, l, &b, qb);
        }
    }
    free(qb);
}

typedef struct tally {
    int heads, tie_swaps, bad_heads, bad_kv, bad_budget;
} tally;

/* Checks one compressed sequence against the reference; budgets are read
 * from the heads' lengths, which must be within a token of the spec's. */
static void check_against_reference(const kvc_policy *p, const dataset *ds, kv_seq *seq,
                                    const int *profile_high, tally *t)
{
    const int32_t n = ds->n, M = ref_mean(p->budget, n);
    double *x = malloc((size_t)L * HKV * sizeof *x);
    int *high = malloc((size_t)L * HKV * sizeof *high);
    int32_t *got = malloc((size_t)n * sizeof *got);
    ref_sel r = {.keep = malloc((size_t)n * sizeof(int32_t)),
                 .pooled = malloc((size_t)n * sizeof(double))};
    ref_budgets(p, ds, profile_high, x, high);
    int64_t total = 0;
    for (int32_t l = 0; l < L; l++) {
        double layer = 0;
        for (int32_t g = 0; g < HKV; g++)
            layer += kv_seq_len(seq, l, g);
        total += (int64_t)layer;
        layer /= HKV;
        if (p->method == KVC_UNCOMP && fabs(layer - x[l * HKV]) >= 1.0) {
            if (t->bad_budget++ < 6)
                fprintf(stderr, "  %s %s %g: layer %d keeps %.3f per head, spec %.3f\n", ds->name,
                        kvc_method_name(p->method), p->budget, l, layer, x[l * HKV]);
        }
    }
    double *layer_mean = NULL;
    if (p->method == KVC_UNCOMP) { /* the split of each layer's total */
        layer_mean = malloc((size_t)L * sizeof *layer_mean);
        for (int32_t l = 0; l < L; l++)
            layer_mean[l] = x[l * HKV];
        ref_uncomp_split(seq, high, n, x);
    }
    for (int32_t l = 0; l < L; l++) {
        for (int32_t g = 0; g < HKV; g++) {
            const int32_t b = kv_seq_len(seq, l, g);
            if (fabs(b - x[l * HKV + g]) >= 1.0 && !(x[l * HKV + g] >= n && b == n)) {
                if (t->bad_budget++ < 6)
                    fprintf(stderr, "  %s %s %g: layer %d head %d keeps %d, spec %.3f%s\n",
                            ds->name, kvc_method_name(p->method), p->budget, l, g, b,
                            x[l * HKV + g], high[l * HKV + g] ? " (HIGH)" : "");
            }
            if (p->method == KVC_PYRAMIDKV && b != kv_seq_len(seq, l, 0))
                t->bad_budget++; /* one budget per layer */
        }
    }
    if (layer_mean) /* the cap below is the layers' */
        for (int32_t l = 0; l < L; l++)
            for (int32_t g = 0; g < HKV; g++)
                x[l * HKV + g] = layer_mean[l];
    free(layer_mean);
    /* the layers sum to exactly L x HKV x M unless the prompt caps them */
    bool capped = false;
    for (int32_t i = 0; i < L * HKV; i++)
        capped |= x[i] >= n - 1e-9;
    if (!capped && total != (int64_t)L * HKV * M) {
        fprintf(stderr, "  %s %s %g: %lld tokens kept, budget %lld\n", ds->name,
                kvc_method_name(p->method), p->budget, (long long)total,
                (long long)L * HKV * M);
        t->bad_budget++;
    }
    CHECK(total <= (int64_t)L * HKV * M);
    for (int32_t l = 0; l < L; l++)
        for (int32_t g = 0; g < HKV; g++) {
            const int32_t b = kv_seq_len(seq, l, g);
            t->heads++;
            if (p->method == KVC_STREAMING)
                ref_streaming(n, b, &r);
            else
                ref_snap(ds, l, g, b, &r);
            const int32_t ng = kv_seq_positions(seq, l, g, got);
            /* positions back to indices */
            for (int32_t i = 0, t0 = 0; i < ng; i++) {
                while (t0 < n && ds->pos[t0] != got[i])
                    t0++;
                got[i] = t0 < n ? t0 : -1;
            }
            bool same = ng == r.n_keep;
            int swaps = 0;
            for (int32_t i = 0, j = 0; same && (i < ng || j < r.n_keep);) {
                if (i < ng && j < r.n_keep && got[i] == r.keep[j]) {
                    i++, j++;
                    continue;
                }
                /* a difference: allowed only between near-tied prefix scores */
                const int32_t tok = j >= r.n_keep || (i < ng && got[i] < r.keep[j]) ? got[i++]
                                                                                   : r.keep[j++];
                const bool snap = p->method != KVC_STREAMING;
                const int32_t w = snap ? (W_MAX < b / 2 ? W_MAX : b / 2) : 0;
                if (!snap || tok < 0 || tok >= n - w ||
                    fabs(r.pooled[tok] - r.thr) > NEAR_TIE * r.scale)
                    same = false;
                swaps++;
            }
            if (!same) {
                if (t->bad_heads++ < 4) {
                    fprintf(stderr, "  %s %s %g: layer %d head %d (budget %d) keeps", ds->name,
                            kvc_method_name(p->method), p->budget, l, g, b);
                    for (int32_t i = 0; i < ng && i < 24; i++)
                        fprintf(stderr, " %d", got[i]);
                    fprintf(stderr, "%s\n    reference", ng > 24 ? " ..." : "");
                    for (int32_t i = 0; i < r.n_keep && i < 24; i++)
                        fprintf(stderr, " %d", r.keep[i]);
                    fprintf(stderr, "%s\n", r.n_keep > 24 ? " ..." : "");
                }
                continue;
            }
            t->tie_swaps += swaps / 2;
            /* compaction: the kept tokens' K and V are the ones they had */
            kern_kv_view view;
            kv_seq_view(seq, l, g, &view);
            const int32_t bt = view.block_tokens;
            for (int32_t i = 0; i < ng; i++) {
                const ekv_f16 *k = ds->k + kv_at(ds, l, g, got[i]);
                const ekv_f16 *v = ds->v + kv_at(ds, l, g, got[i]);
                const ekv_f16 *kb = view.k_blocks[i / bt], *vb = view.v_blocks[i / bt];
                bool ok = view.pos_blocks[i / bt][i % bt] == ds->pos[got[i]];
                for (int32_t j = 0; j < D; j++)
                    ok &= kb[(size_t)j * bt + i % bt] == k[j] &&
                          vb[(size_t)(i % bt) * D + j] == v[j];
                if (!ok && t->bad_kv++ < 4)
                    fprintf(stderr, "  %s %s %g: layer %d head %d row %d: K/V not token %d's\n",
                            ds->name, kvc_method_name(p->method), p->budget, l, g, i, got[i]);
            }
        }
    free(x);
    free(high);
    free(got);
    free(r.keep);
    free(r.pooled);
}

static void report(const char *what, const tally *t)
{
    fprintf(stderr, "  %s: %d heads, %d near-tie swaps\n", what, t->heads, t->tie_swaps);
    CHECK_EQ_INT(t->bad_budget, 0);
    CHECK_EQ_INT(t->bad_heads, 0);
    CHECK_EQ_INT(t->bad_kv, 0);
    CHECK(t->tie_swaps * 50 <= t->heads); /* near ties are rare, not a way out */
}

/* A profile whose HIGH head of layer l is (l + 1) % HKV: one calibration
 * sample whose entropies favour it. */
static kvc_profile *make_profile(int *high)
{
    float *e = malloc((size_t)L * H * sizeof *e);
    for (int32_t l = 0; l < L; l++)
        for (int32_t h = 0; h < H; h++) {
            const int32_t g = h / G;
            high[l * HKV + g] = g == (l + 1) % HKV;
            e[l * H + h] = high[l * HKV + g] ? 0.7f : 0.3f + 0.01f * g;
        }
    char path[] = "/tmp/ekv_ref_profile_XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0)
        close(fd);
    kvc_calibration *cal = kvc_calibration_create(g_model, NULL);
    kvc_profile *prof = NULL;
    if (cal) {
        kvc_calibration_add(cal, e);
        if (kvc_calibration_save(cal, path, NULL) == EKV_OK)
            prof = kvc_profile_load(path, g_model, NULL);
    }
    kvc_calibration_free(cal);
    remove(path);
    free(e);
    return prof;
}

typedef struct policy_case {
    kvc_method_id method;
    double budget;
    bool profile;
} policy_case;

/* Each case compresses a fresh sequence holding ds. Without a shared
 * capture, a fresh capture per case is fed through its tap (feed_tap);
 * with one (a real prefill's, recording everything), the case switches its
 * policy and compresses a clone of base. */
static void run_cases(const dataset *ds, const policy_case *cases, size_t n_cases,
                      const kvc_profile *prof, const int *prof_high, kvc_capture *shared,
                      const kv_seq *base)
{
    kv_pool *pool = base ? kv_seq_pool(base) : model_kv_pool_create(g_model, 2 * ds->n + 32, NULL);
    CHECK(pool != NULL);
    for (size_t c = 0; pool && c < n_cases; c++) {
        kvc_policy p = {.method = cases[c].method, .budget = cases[c].budget,
                        .profile = cases[c].profile ? prof : NULL};
        ekv_error err = {0};
        kv_seq *seq = base ? kv_seq_clone(base, NULL) : seq_of(ds, pool);
        kv_seq *other = base ? NULL : kv_seq_create(pool, L, HKV, NULL);
        kvc_capture *cap = shared;
        if (!shared) {
            cap = kvc_capture_create(&p, g_model, ds->n, ds->pos[0], &err);
            const model_tap *tap = cap && seq ? kvc_capture_tap(cap, seq) : NULL;
            if (tap && other)
                feed_tap(tap, seq, other, ds);
        } else {
            CHECK_EQ_INT(kvc_capture_set_policy(cap, &p, &err), EKV_OK);
        }
        CHECK(seq && (base || other) && cap);
        if (seq && (base || other) && cap) {
            kvc_report rep;
            const ekv_status rc = kvc_capture_compress(cap, g_rt, seq, &rep, &err);
            if (rc)
                fprintf(stderr, "  compress: %s\n", err.msg);
            CHECK_EQ_INT(rc, EKV_OK);
            char what[96];
            snprintf(what, sizeof what, "%s %s%s %g", ds->name, kvc_method_name(p.method),
                     p.profile ? " (profile)" : "", p.budget);
            tally t = {0};
            if (!rc) {
                CHECK(rep.kept_total <= rep.budget_total);
                check_against_reference(&p, ds, seq, prof_high, &t);
                report(what, &t);
            }
        }
        if (!shared)
            kvc_capture_free(cap);
        kv_seq_free(other);
        kv_seq_free(seq);
    }
    if (!base)
        kv_pool_destroy(pool);
}

/* ---- synthetic prompt ---- */

/* Keys and values random; queries of (layer, query head) with a spectrum
 * exp(-alpha j) over dimensions, alpha differing per KV head (order
 * shuffled per layer) and per layer, so entropies separate heads and layers
 * and every layer scores with its own queries. */
static bool make_synthetic(dataset *ds, int32_t n)
{
    if (!dataset_alloc(ds, n))
        return false;
    ds->name = "synthetic";
    for (int32_t t = 0; t < n; t++)
        ds->pos[t] = t;
    for (size_t i = 0; i < (size_t)L * HKV * n * D; i++) {
        ds->k[i] = ekv_f32_to_f16(f16_round(1.3 * nrand()));
        ds->v[i] = ekv_f32_to_f16(f16_round(nrand()));
    }
    for (int32_t l = 0; l < L; l++) {
        const double base = 0.01 + 0.012 * (l % 5);
        const int32_t rot = (int32_t)(urand() * HKV);
        for (int32_t h = 0; h < H; h++) {
            const double alpha = base * (1 + 2.5 * ((h / G + rot) % HKV)) * (1 + 0.05 * (h % G));
            double *dir = malloc((size_t)D * sizeof *dir); /* a per-head offset */
            for (int32_t j = 0; j < D; j++)
                dir[j] = 0.5 * nrand();
            for (int32_t t = 0; t < n; t++) {
                float *q = ds->q + (((size_t)l * n + t) * H + h) * D;
                for (int32_t j = 0; j < D; j++)
                    q[j] = (float)(dir[j] + 1.6 * exp(-alpha * j) * nrand());
            }
            free(dir);
        }
    }
    return true;
}

static void test_every_method_keeps_the_reference_tokens_on_synthetic_input(void)
{
    dataset ds = {0};
    const int32_t n = 203; /* not a whole number of blocks */
    CHECK(make_synthetic(&ds, n));
    dataset_entropy(&ds);
    /* the synthetic heads must be separable for "highest entropy" to mean one head */
    for (int32_t l = 0; l < L; l++) {
        double e[3];
        memcpy(e, ds.kv_ent + l * HKV, sizeof e);
        qsort(e, 3, sizeof *e, by_double_desc);
        CHECK(e[0] - e[1] > 1e-3);
    }
    int prof_high[256 * 8];
    kvc_profile *prof = make_profile(prof_high);
    CHECK(prof != NULL);
    const policy_case cases[] = {
        {KVC_STREAMING, 8, false},    {KVC_STREAMING, 9, false},    {KVC_STREAMING, 0.1, false},
        {KVC_STREAMING, 0.5, false},  {KVC_STREAMING, n - 1, false},
        {KVC_SNAPKV, 2, false},       {KVC_SNAPKV, 3, false},       {KVC_SNAPKV, 9, false},
        {KVC_SNAPKV, 16, false},      {KVC_SNAPKV, 17, false},      {KVC_SNAPKV, 0.1, false},
        {KVC_SNAPKV, 0.3, false},     {KVC_SNAPKV, n - 1, false},
        {KVC_PYRAMIDKV, 16, false},   {KVC_PYRAMIDKV, 0.1, false},  {KVC_PYRAMIDKV, 0.3, false},
        {KVC_PYRAMIDKV, n - 1, false},
        {KVC_UNCOMP, 12, false},      {KVC_UNCOMP, 0.1, false},     {KVC_UNCOMP, 0.3, false},
        {KVC_UNCOMP, n - 1, false},
        {KVC_UNCOMP, 24, true}, {KVC_UNCOMP, 0.1, true}, {KVC_UNCOMP, 0.3, true},
    };
    run_cases(&ds, cases, sizeof cases / sizeof cases[0], prof, prof_high, NULL, NULL);
    kvc_profile_free(prof);
    dataset_free(&ds);
}

/* ---- the demo model's own prefill ---- */

typedef struct recorder {
    dataset *ds;
    const model_tap *inner;
} recorder;

/* Records every layer's queries of the prompt, then hands the batch on. */
static void record_tap(void *ctx, int32_t layer, const model_batch *b, const float *q)
{
    recorder *r = ctx;
    const size_t row = (size_t)H * D;
    for (int32_t i = 0; i < b->n; i++)
        if (b->pos[i] >= 0 && b->pos[i] < r->ds->n)
            memcpy(r->ds->q + ((size_t)layer * r->ds->n + b->pos[i]) * row, q + i * row,
                   row * sizeof(float));
    if (r->inner)
        r->inner->fn(r->inner->ctx, layer, b, q);
}

static void test_every_method_keeps_the_reference_tokens_on_the_models_prefill(void)
{
    FILE *f = fopen("/usr/share/common-licenses/Apache-2.0", "rb");
    char text[4096];
    const size_t len = f ? fread(text, 1, sizeof text, f) : 0;
    if (f)
        fclose(f);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    dataset ds = {0};
    const int32_t n = 250;
    CHECK(tok_encode(model_tokenizer(g_model), text, len, true, false, &ids, &n_ids, NULL) ==
              EKV_OK &&
          n_ids >= (size_t)n);
    if (n_ids < (size_t)n || !dataset_alloc(&ds, n)) {
        free(ids);
        return;
    }
    ds.name = "model";
    for (int32_t t = 0; t < n; t++)
        ds.pos[t] = t;
    /* one prefill through the model, its tap recording the queries for the
     * reference and feeding an online UNComp capture, which records what
     * every method needs; each case then compresses a clone */
    kv_pool *pool = model_kv_pool_create(g_model, 2 * n + 32, NULL);
    kv_seq *seq = pool ? kv_seq_create(pool, L, HKV, NULL) : NULL;
    const kvc_policy all = {.method = KVC_UNCOMP, .budget = 0.5};
    kvc_capture *cap = kvc_capture_create(&all, g_model, n, 0, NULL);
    recorder rec = {.ds = &ds, .inner = cap && seq ? kvc_capture_tap(cap, seq) : NULL};
    const model_tap tap = {.fn = record_tap, .ctx = &rec};
    float *logits = malloc((size_t)model_config(g_model)->n_vocab * sizeof *logits);
    ekv_error err = {0};
    CHECK(rec.inner && model_prefill(g_rt, seq, ids, n, 0, &tap, logits, &err) == EKV_OK);
    for (int32_t l = 0; seq && l < L; l++)
        for (int32_t g = 0; g < HKV; g++) {
            kern_kv_view view;
            kv_seq_view(seq, l, g, &view);
            CHECK_EQ_INT(view.n_tokens, n);
            for (int32_t t = 0; t < n && t < view.n_tokens; t++)
                for (int32_t j = 0; j < D; j++) {
                    const int32_t bt = view.block_tokens;
                    ds.k[kv_at(&ds, l, g, t) + j] = view.k_blocks[t / bt][(size_t)j * bt + t % bt];
                    ds.v[kv_at(&ds, l, g, t) + j] = view.v_blocks[t / bt][(size_t)(t % bt) * D + j];
                }
        }
    dataset_entropy(&ds);
    int prof_high[256 * 8];
    kvc_profile *prof = make_profile(prof_high);
    const policy_case cases[] = {
        {KVC_STREAMING, 0.1, false}, {KVC_SNAPKV, 10, false},      {KVC_SNAPKV, 0.1, false},
        {KVC_SNAPKV, 0.3, false},    {KVC_SNAPKV, n - 1, false},   {KVC_PYRAMIDKV, 0.2, false},
        {KVC_UNCOMP, 0.2, false},    {KVC_UNCOMP, 0.3, true},
    };
    /* online UNComp's groups follow the entropy: only where the top two KV
     * heads are apart by more than the float Gram's rounding */
    bool separable = true;
    for (int32_t l = 0; l < L; l++) {
        double e[3];
        memcpy(e, ds.kv_ent + l * HKV, sizeof e);
        qsort(e, 3, sizeof *e, by_double_desc);
        separable &= e[0] - e[1] > 1e-4;
    }
    CHECK(separable);
    if (cap && seq)
        run_cases(&ds, cases, sizeof cases / sizeof cases[0], prof, prof_high, cap, seq);
    kvc_profile_free(prof);
    kvc_capture_free(cap);
    kv_seq_free(seq);
    kv_pool_destroy(pool);
    free(logits);
    free(ids);
    dataset_free(&ds);
}

int main(int argc, char **argv)
{
    ekv_error err = {0};
    if (argc < 2 || !(g_model = model_load(argv[1], &err))) {
        fprintf(stderr, "usage: test_compress_ref MODEL.gguf (%s)\n", err.msg);
        return 1;
    }
    const ekv_model_config *c = model_config(g_model);
    L = c->n_layers;
    H = c->n_heads;
    HKV = c->n_kv_heads;
    D = c->head_dim;
    G = H / HKV;
    if (L > 256 || HKV > 8 || D > 512 || !(g_rt = model_runtime_create(g_model, 64, 512, 2, &err))) {
        fprintf(stderr, "model too large for this test or no runtime: %s\n", err.msg);
        return 1;
    }
    RUN_TEST(test_every_method_keeps_the_reference_tokens_on_synthetic_input);
    RUN_TEST(test_every_method_keeps_the_reference_tokens_on_the_models_prefill);
    model_runtime_free(g_rt);
    model_free(g_model);
    return TEST_EXIT();
}
