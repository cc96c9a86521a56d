/*
 * test_reference_forward.c - model_forward against an independent forward
 * pass in double precision, at every position of every sequence, on small
 * synthetic Llama GGUFs this test writes (tests/gguf_writer.h).
 *
 * The reference (llama_ref.h) is written from the model definition and
 * calls nothing in model/ or kernels/; the weights it uses are the bytes
 * written to the file, decoded there from ggml's block definitions.
 *
 * Variants: F32, F16, Q8_0 and Q4_1 matrices; 2-3 layers; GQA 2:1 and 3:1;
 * head_dim 64 and 128; rope base 1e4 and 1e5. The F32 model runs a
 * sequence of more than 4096 tokens. Every variant runs its sequences in
 * three layouts, each compared with the reference at every position:
 *   prefill: model_forward in chunks of the runtime's max_batch rows, all
 *            logits wanted (and model_prefill's last-token logits);
 *   decode:  one row per model_forward;
 *   mixed:   rows of three sequences interleaved in each batch, chunks and
 *            single decode rows of different lengths and positions.
 * Decode and mixed must also give prefill's logits bit for bit (kernels.h:
 * results do not depend on batch composition).
 *
 * Tolerances (derived above TOL_FLOAT): the engine keeps K and V in fp16
 * (the KV cache's storage format); the reference rounds K and V the same
 * way, so for F32 weights only float32 arithmetic separates the two. For
 * F16 weights the engine feeds the matmuls fp16 activations, for Q8_0 and
 * Q4_1 weights 8-bit ones per 32-element block (ggml's Q8_0 / Q8_1); that
 * rounding is chaotic (one rounding that goes the other way changes all
 * later ones) so the reference does not copy it: it measures its size, by
 * a second reference run that rounds its own activations the same way, and
 * the tolerance is a multiple of that measured noise.
 *
 * Sanitizer builds (or EKV_REF_SHORT=1) shorten every sequence.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ekv_test.h"
#include "entrokv/kvcache.h"
#include "entrokv/model.h"
#include "gguf_writer.h"
#include "llama_ref.h"

#if defined(__SANITIZE_ADDRESS__)
#define REF_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define REF_SANITIZED 1
#endif
#endif
#ifndef REF_SANITIZED
#define REF_SANITIZED 0
#endif

/* ---- deterministic random numbers (splitmix64) ---- */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1) */
static float rng_sym(uint64_t *s) { return (float)((double)(rng_next(s) >> 11) * 0x1p-52 - 1.0); }

/* ---- the synthetic model ---- */

typedef struct variant {
    const char *name;
    uint32_t wtype; /* every matrix, token_embd and output included */
    int n_layers, n_embd, n_heads, n_kv_heads, n_ff, n_vocab;
    float rope_base, norm_eps;
    int n_tokens;  /* the main sequence */
    int max_batch; /* runtime max_batch: the prefill chunk */
    uint64_t seed;
} variant;

/* rows x cols, uniform on +-amp times a factor in [0.5, 1.5] per block of
 * 32 columns: blocks of one row have different scales (as real weights'
 * channels do), so a quantized block read with another block's scale
 * shows. */
static float *random_matrix(uint64_t *s, int rows, int cols, double amp)
{
    float *x = malloc((size_t)rows * cols * sizeof *x);
    double f[64];
    if (!x || cols > 64 * 32) {
        free(x);
        return NULL;
    }
    for (int b = 0; b < (cols + 31) / 32; b++)
        f[b] = 1.0 + 0.5 * rng_sym(s);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            x[(size_t)r * cols + c] = (float)(amp * f[c / 32] * rng_sym(s));
    return x;
}

static void add_matrix(gguf_writer *w, uint64_t *s, const char *name, uint32_t type, int cols,
                       int rows, double amp)
{
    float *x = random_matrix(s, rows, cols, amp);
    if (!x) {
        w->oom = 1;
        return;
    }
    gw_tensor_add(w, name, type, (uint64_t)cols, (uint64_t)rows, x);
    free(x);
}

static void add_norm(gguf_writer *w, uint64_t *s, const char *name, int n)
{
    float *x = malloc((size_t)n * sizeof *x);
    if (!x) {
        w->oom = 1;
        return;
    }
    for (int i = 0; i < n; i++) /* in [0.6, 1.4]: a norm that ignores w is visible */
        x[i] = 1.0f + 0.4f * rng_sym(s);
    gw_tensor_add(w, name, GW_T_F32, (uint64_t)n, 1, x);
    free(x);
}

/*
 * Scales chosen so that every part of the block matters to the logits:
 * after RMSNorm (rms ~1) q and k have variance ~1.5 per element, so a
 * query's scores have a standard deviation ~1.5 and attention is far from
 * uniform (its temperature shows); v ~1, and Wo brings the attention
 * output to about the size of the residual; logits have rms ~3.
 */
static void build_model(const variant *v, gguf_writer *w)
{
    uint64_t s = v->seed;
    const int E = v->n_embd, D = E / v->n_heads, Q = E, KV = v->n_kv_heads * D, F = v->n_ff;
    char name[96];
    gw_kv_str(w, "general.architecture", "llama");
    gw_kv_str(w, "general.name", v->name);
    gw_kv_u32(w, "llama.block_count", (uint32_t)v->n_layers);
    gw_kv_u32(w, "llama.context_length", 8192);
    gw_kv_u32(w, "llama.embedding_length", (uint32_t)E);
    gw_kv_u32(w, "llama.feed_forward_length", (uint32_t)F);
    gw_kv_u32(w, "llama.attention.head_count", (uint32_t)v->n_heads);
    gw_kv_u32(w, "llama.attention.head_count_kv", (uint32_t)v->n_kv_heads);
    gw_kv_u32(w, "llama.rope.dimension_count", (uint32_t)D);
    gw_kv_f32(w, "llama.rope.freq_base", v->rope_base);
    gw_kv_f32(w, "llama.attention.layer_norm_rms_epsilon", v->norm_eps);
    gw_kv_str(w, "tokenizer.ggml.model", "gpt2");
    gw_kv_str(w, "tokenizer.ggml.pre", "default");
    char **toks = malloc((size_t)v->n_vocab * sizeof *toks);
    char *text = malloc((size_t)v->n_vocab * 16);
    if (!toks || !text) {
        w->oom = 1;
    } else {
        for (int i = 0; i < v->n_vocab; i++) {
            toks[i] = text + (size_t)i * 16;
            snprintf(toks[i], 16, "tok%d", i);
        }
        gw_kv_str_array(w, "tokenizer.ggml.tokens", (const char *const *)toks,
                        (uint64_t)v->n_vocab);
        gw_kv_str_array(w, "tokenizer.ggml.merges", NULL, 0);
    }
    free(toks);
    free(text);

    add_matrix(w, &s, "token_embd.weight", v->wtype, E, v->n_vocab, 1.0);
    for (int l = 0; l < v->n_layers; l++) {
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d." suffix, l), name)
        add_norm(w, &s, NAME("attn_norm.weight"), E);
        add_matrix(w, &s, NAME("attn_q.weight"), v->wtype, E, Q, sqrt(3.0 * 1.2247 / E));
        add_matrix(w, &s, NAME("attn_k.weight"), v->wtype, E, KV, sqrt(3.0 * 1.2247 / E));
        add_matrix(w, &s, NAME("attn_v.weight"), v->wtype, E, KV, sqrt(3.0 / E));
        add_matrix(w, &s, NAME("attn_output.weight"), v->wtype, Q, E, sqrt(3.0 / Q));
        add_norm(w, &s, NAME("ffn_norm.weight"), E);
        add_matrix(w, &s, NAME("ffn_gate.weight"), v->wtype, E, F, sqrt(3.0 / E));
        add_matrix(w, &s, NAME("ffn_up.weight"), v->wtype, E, F, sqrt(3.0 / E));
        add_matrix(w, &s, NAME("ffn_down.weight"), v->wtype, F, E, sqrt(3.0 * 2.0 / F));
#undef NAME
    }
    add_norm(w, &s, "output_norm.weight", E);
    add_matrix(w, &s, "output.weight", v->wtype, E, v->n_vocab, sqrt(3.0 * 9.0 / E));
}

/* ---- the engine, in three layouts ---- */

typedef struct seq_run {
    const int32_t *tok;
    int n;
    int pos0;
    float *logits; /* n x V, filled by the engine */
} seq_run;

static kv_seq *new_seq(const ekv_model *m, kv_pool *pool)
{
    ekv_error err = {0};
    const ekv_model_config *c = model_config(m);
    kv_seq *s = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    if (!s)
        fprintf(stderr, "kv_seq_create: %s\n", err.msg);
    return s;
}

/* One sequence in chunks of max_batch rows, every row's logits wanted. */
static int run_prefill(ekv_runtime *rt, kv_pool *pool, seq_run *s)
{
    const ekv_model *m = model_runtime_model(rt);
    const int32_t V = model_config(m)->n_vocab, B = model_runtime_max_batch(rt);
    kv_seq *seq = new_seq(m, pool);
    int32_t *pos = malloc((size_t)B * sizeof *pos);
    kv_seq **seqs = malloc((size_t)B * sizeof *seqs);
    uint8_t *want = malloc((size_t)B);
    int ok = seq && pos && seqs && want;
    for (int start = 0; ok && start < s->n; start += B) {
        const int n = s->n - start < B ? s->n - start : B;
        for (int i = 0; i < n; i++) {
            pos[i] = s->pos0 + start + i;
            seqs[i] = seq;
            want[i] = 1;
        }
        model_batch b = {.n = n, .tokens = s->tok + start, .pos = pos, .seqs = seqs,
                         .want_logits = want};
        ekv_error err = {0};
        if (model_forward(rt, &b, s->logits + (size_t)start * V, &err)) {
            fprintf(stderr, "model_forward: %s\n", err.msg);
            ok = 0;
        }
    }
    kv_seq_free(seq);
    free(pos);
    free(seqs);
    free(want);
    return ok;
}

/* model_prefill (max_batch chunks, the last row's logits) into last[V]. */
static int run_model_prefill(ekv_runtime *rt, kv_pool *pool, const seq_run *s, float *last)
{
    kv_seq *seq = new_seq(model_runtime_model(rt), pool);
    ekv_error err = {0};
    int ok = seq && model_prefill(rt, seq, s->tok, s->n, s->pos0, NULL, last, &err) == EKV_OK;
    if (seq && !ok)
        fprintf(stderr, "model_prefill: %s\n", err.msg);
    kv_seq_free(seq);
    return ok;
}

/* One row per model_forward, as decode steps. */
static int run_decode(ekv_runtime *rt, kv_pool *pool, seq_run *s)
{
    const ekv_model *m = model_runtime_model(rt);
    const int32_t V = model_config(m)->n_vocab;
    kv_seq *seq = new_seq(m, pool);
    int ok = seq != NULL;
    for (int t = 0; ok && t < s->n; t++) {
        const int32_t pos = s->pos0 + t;
        model_batch b = {.n = 1, .tokens = s->tok + t, .pos = &pos, .seqs = &seq};
        ekv_error err = {0};
        if (model_forward(rt, &b, s->logits + (size_t)t * V, &err)) {
            fprintf(stderr, "model_forward: %s\n", err.msg);
            ok = 0;
        }
    }
    kv_seq_free(seq);
    return ok;
}

/*
 * Several sequences at once: each batch takes from every unfinished
 * sequence a run of its next tokens (1 - a decode row - up to 40, drawn at
 * random) and interleaves the sequences' rows (a0 b0 c0 a1 b1 ...), each
 * sequence's rows in position order, as a scheduler mixing prefill chunks
 * and decode rows does.
 */
#define MAX_SEQS 3
static int run_mixed(ekv_runtime *rt, kv_pool *pool, seq_run *s, int n_seqs, uint64_t seed)
{
    const ekv_model *m = model_runtime_model(rt);
    const int32_t V = model_config(m)->n_vocab, B = model_runtime_max_batch(rt);
    static const int sizes[] = {1, 1, 1, 2, 5, 16, 40};
    kv_seq *seq[MAX_SEQS] = {0};
    int next[MAX_SEQS] = {0};
    int32_t *tok = malloc((size_t)B * sizeof *tok), *pos = malloc((size_t)B * sizeof *pos);
    int *who = malloc((size_t)B * sizeof *who);
    kv_seq **seqs = malloc((size_t)B * sizeof *seqs);
    uint8_t *want = malloc((size_t)B);
    float *out = malloc((size_t)B * V * sizeof *out);
    int ok = tok && pos && who && seqs && want && out && n_seqs <= MAX_SEQS;
    for (int i = 0; ok && i < n_seqs; i++)
        ok = (seq[i] = new_seq(m, pool)) != NULL;
    const int per_seq = B / n_seqs;
    while (ok) {
        int take[MAX_SEQS], most = 0, n = 0;
        for (int i = 0; i < n_seqs; i++) {
            take[i] = sizes[rng_next(&seed) % (sizeof sizes / sizeof sizes[0])];
            take[i] = take[i] > per_seq ? per_seq : take[i];
            take[i] = take[i] > s[i].n - next[i] ? s[i].n - next[i] : take[i];
            most = take[i] > most ? take[i] : most;
        }
        if (most == 0)
            break;
        for (int r = 0; r < most; r++)
            for (int i = 0; i < n_seqs; i++) {
                if (r >= take[i])
                    continue;
                tok[n] = s[i].tok[next[i] + r];
                pos[n] = s[i].pos0 + next[i] + r;
                seqs[n] = seq[i];
                who[n] = i;
                want[n] = 1;
                n++;
            }
        model_batch b = {.n = n, .tokens = tok, .pos = pos, .seqs = seqs, .want_logits = want};
        ekv_error err = {0};
        if (model_forward(rt, &b, out, &err)) {
            fprintf(stderr, "model_forward (mixed): %s\n", err.msg);
            ok = 0;
            break;
        }
        for (int j = 0; j < n; j++)
            memcpy(s[who[j]].logits + (size_t)(pos[j] - s[who[j]].pos0) * V,
                   out + (size_t)j * V, (size_t)V * sizeof *out);
        for (int i = 0; i < n_seqs; i++)
            next[i] += take[i];
    }
    for (int i = 0; i < n_seqs; i++)
        kv_seq_free(seq[i]);
    free(tok);
    free(pos);
    free(who);
    free(seqs);
    free(want);
    free(out);
    return ok;
}

/* ---- comparison ---- */

typedef struct err_stats {
    double rel_rms; /* rms(engine - ref) / rms(ref), over all positions and tokens */
    double rel_max; /* max |engine - ref| / rms(ref) */
    int worst_pos;
} err_stats;

static err_stats compare(const double *ref, const float *eng, int n, int V)
{
    double ss_ref = 0.0, ss_err = 0.0, mx = 0.0;
    err_stats st = {0};
    for (int t = 0; t < n; t++)
        for (int v = 0; v < V; v++) {
            const double r = ref[(size_t)t * V + v], e = eng[(size_t)t * V + v] - r;
            ss_ref += r * r;
            ss_err += e * e;
            if (!(fabs(e) <= mx)) { /* NaN counts as the worst */
                mx = isnan(e) ? INFINITY : fabs(e);
                st.worst_pos = t;
            }
        }
    const double s = sqrt(ss_ref / ((double)n * V));
    st.rel_rms = sqrt(ss_err / ((double)n * V)) / s;
    st.rel_max = mx / s;
    return st;
}

static err_stats compare_dd(const double *ref, const double *other, int n, int V)
{
    float *f = malloc((size_t)n * V * sizeof *f);
    err_stats st = {INFINITY, INFINITY, 0};
    if (!f)
        return st;
    for (size_t i = 0; i < (size_t)n * V; i++)
        f[i] = (float)other[i];
    st = compare(ref, f, n, V);
    free(f);
    return st;
}

/* ---- the tests ---- */

typedef struct tolerance {
    double rms, max;
} tolerance;

static int g_short; /* sanitizer build or EKV_REF_SHORT: shorter sequences */

static void check_layout(const variant *v, const char *layout, const double *ref,
                         const float *eng, int n, tolerance tol)
{
    err_stats st = compare(ref, eng, n, v->n_vocab);
    printf("  %-5s %-14s %5d positions: rel_rms %.2e = %.3f tol  rel_max %.2e = %.3f tol "
           "(at %d)\n",
           v->name, layout, n, st.rel_rms, st.rel_rms / tol.rms, st.rel_max, st.rel_max / tol.max,
           st.worst_pos);
    fflush(stdout);
    CHECK(st.rel_rms <= tol.rms);
    CHECK(st.rel_max <= tol.max);
}

/* kernels.h: for a given ISA, results are bit-identical across thread
 * counts and batch composition - so the layouts must agree exactly. */
static void check_same(const variant *v, const char *layout, const float *prefill,
                       const float *other, int n)
{
    long differ = 0;
    for (size_t i = 0; i < (size_t)n * v->n_vocab; i++)
        differ += memcmp(&prefill[i], &other[i], sizeof *other) != 0;
    if (differ)
        printf("  %-5s %-14s %ld of %ld logits differ from prefill's bits\n", v->name, layout,
               differ, (long)n * v->n_vocab);
    CHECK_EQ_INT(differ, 0);
}

static int32_t *random_tokens(uint64_t seed, int n, int V)
{
    int32_t *t = malloc((size_t)n * sizeof *t);
    for (int i = 0; t && i < n; i++)
        t[i] = (int32_t)(rng_next(&seed) % (uint64_t)V);
    return t;
}

/*
 * Tolerances, relative to the rms of the reference logits (~3).
 *
 * F32 weights: the reference rounds K and V to fp16 where the engine
 * stores them, so what is left is float32 arithmetic, unit roundoff
 * u = 2^-24 = 6e-8:
 *   - RoPE: the engine advances theta_i by repeated float multiplication
 *     by powf(base, -2/d) (ggml's way), so theta_i is off by up to ~(i+2)u
 *     relative, and the float angle pos * theta_i is rounded (u relative):
 *     at pos 4160 the fast pairs (angles ~10^3 rad) turn up to ~3e-4 rad
 *     off, the slow ones much less; a score q.k (std ~1.5, over 32 pairs)
 *     moves by ~1e-4 or less;
 *   - dot products of n <= 512 terms and softmax sums over <= 4160 terms:
 *     ~sqrt(n)u ~ 1.4e-6 to 4e-6 relative, expf (or the SIMD polynomial,
 *     2e-7) inside;
 *   - a K or V value that lands within that distance of an fp16 rounding
 *     boundary rounds to the neighbouring fp16 value: 2^-11 relative on
 *     that one element, for ~2% of elements (1e-5 / 2^-11); averaged by
 *     attention over many tokens that is ~1e-6.
 * A score error of 1e-4 changes attention weights by 1e-4 relative, and
 * the attention output (and so the residual stream and, through 2-3
 * layers, the logits) by ~1e-5 to 5e-5 relative in rms. The tolerance is
 * 2e-4 in rms (4x the upper estimate) and 2e-3 for the worst single logit
 * of ~1.3e6: a tail of the same errors, 5 sigma for Gaussian errors,
 * heavier with the rare fp16 flips, so 10x the rms tolerance. The bugs
 * this test is for are far above it: a 5% softmax temperature or RoPE
 * base error moves the logits by ~2e-2 and ~1e-1 relative in rms (see
 * the mutation logs, scripts/mutations/ref-*.patch).
 *
 * F16, Q8_0 and Q4_1 weights: the engine rounds every matmul input, to
 * fp16 (relative error up to 2^-11, ~2.8e-4 rms) or to 8 bits per block
 * of 32 (error uniform on +-d/2, d = amax/127: for a Gaussian-like block,
 * amax ~2.2 rms, ~0.5% rms relative), compounding over the 5 matmuls of
 * each layer. Emulating that rounding in the reference does not remove
 * it: the engine's float values differ from the double ones by ~1e-6, so
 * some roundings go the other way, and every later rounding then differs
 * too (a chaotic process). How much of it reaches the logits depends on
 * the network, so the test measures it: the reference run a second time
 * with its own activations rounded the same way gives the noise N (rms
 * and max over the sequence). The engine is another realization of the
 * same noise, so its distance to the exact reference should be ~N; the
 * tolerance is 2.5 N (rms) and 4 N (max, the tail of a different sample)
 * plus the F32 terms.
 */
static const tolerance TOL_FLOAT = {2e-4, 2e-3};

static void run_variant(const variant *v)
{
    const int V = v->n_vocab;
    /* short: still several prefill chunks (max_batch 64, 96) and mixed batches */
    const int n = g_short ? (v->wtype == GW_T_F32 ? 320 : 160) : v->n_tokens;
    const int nb = n / 2 + 13, nc = n / 3 + 7;
    printf("%s: %d layers, embd %d, heads %d/%d (head_dim %d), ff %d, vocab %d, base %g, "
           "%d tokens (+%d, +%d mixed), max_batch %d\n",
           v->name, v->n_layers, v->n_embd, v->n_heads, v->n_kv_heads, v->n_embd / v->n_heads,
           v->n_ff, V, v->rope_base, n, nb, nc, v->max_batch);
    fflush(stdout);

    char dir[256], path[300];
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/ekv-ref-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    gguf_writer w = {0};
    ref_model r = {0};
    ekv_model *m = NULL;
    ekv_runtime *rt = NULL;
    kv_pool *pool = NULL;
    int32_t *ta = random_tokens(v->seed * 31 + 1, n, V), *tb = random_tokens(v->seed * 31 + 2, nb, V),
            *tc = random_tokens(v->seed * 31 + 3, nc, V);
    double *ra = malloc((size_t)n * V * sizeof *ra), *rb = malloc((size_t)nb * V * sizeof *rb),
           *rc = malloc((size_t)nc * V * sizeof *rc), *rq = NULL;
    float *ea = malloc((size_t)n * V * sizeof *ea), *eb = malloc((size_t)nb * V * sizeof *eb),
          *ec = malloc((size_t)nc * V * sizeof *ec), *last = malloc((size_t)V * sizeof *last),
          *ep = malloc((size_t)n * V * sizeof *ep);
    const int quant = v->wtype == GW_T_Q8_0 || v->wtype == GW_T_Q4_1;
    int have_dir = mkdtemp(dir) != NULL;
    CHECK(have_dir);
    CHECK(ta && tb && tc && ra && rb && rc && ea && eb && ec && last && ep);
    if (!have_dir || !ta || !tb || !tc || !ra || !rb || !rc || !ea || !eb || !ec || !last || !ep)
        goto out;
    snprintf(path, sizeof path, "%s/%s.gguf", dir, v->name);

    build_model(v, &w);
    CHECK_EQ_INT(gw_write(&w, path), 0);
    ekv_error err = {0};
    m = model_load(path, &err);
    if (!m)
        fprintf(stderr, "model_load: %s\n", err.msg);
    CHECK(m != NULL);
    const ref_hparams hp = {v->n_layers, v->n_embd, v->n_heads,  v->n_kv_heads,
                            v->n_ff,     v->n_vocab, v->rope_base, v->norm_eps};
    CHECK(ref_load(&hp, &w, &r));
    if (!m || !r.embd)
        goto out;
    const ekv_model_config *c = model_config(m);
    CHECK_EQ_INT(c->n_layers, v->n_layers);
    CHECK_EQ_INT(c->head_dim, v->n_embd / v->n_heads);
    CHECK_EQ_INT(c->n_kv_heads, v->n_kv_heads);
    CHECK_EQ_INT(c->n_vocab, V);

    /* the reference */
    clock_t t0 = clock();
    CHECK(ref_run(&r, ta, n, 0, REF_KV_F16, ra) && ref_run(&r, tb, nb, 0, REF_KV_F16, rb) &&
          ref_run(&r, tc, nc, 0, REF_KV_F16, rc));
    tolerance tol = TOL_FLOAT;
    const int act = v->wtype == GW_T_F16 ? REF_ACT_F16 : quant ? REF_ACT_Q8 : 0;
    if (!act)
        printf("  %-5s tolerance (relative to the logits' rms): rms %.1e, max %.1e\n", v->name,
               tol.rms, tol.max);
    if (act) {
        rq = malloc((size_t)n * V * sizeof *rq);
        CHECK(rq && ref_run(&r, ta, n, 0, REF_KV_F16 | act, rq));
        if (!rq)
            goto out;
        err_stats noise = compare_dd(ra, rq, n, V);
        tol.rms = 2.5 * noise.rel_rms + TOL_FLOAT.rms;
        tol.max = 4.0 * noise.rel_max + TOL_FLOAT.max;
        printf("  %-5s activation rounding noise (reference vs itself rounded): rel_rms %.2e "
               "rel_max %.2e -> tolerance rms %.1e, max %.1e\n",
               v->name, noise.rel_rms, noise.rel_max, tol.rms, tol.max);
    }
    printf("  %-5s reference: %.1f s cpu\n", v->name, (double)(clock() - t0) / CLOCKS_PER_SEC);
    fflush(stdout);

    /* the engine */
    t0 = clock();
    rt = model_runtime_create(m, v->max_batch, n, 2, &err);
    pool = rt ? model_kv_pool_create(m, n + nb + nc + 3 * 16, &err) : NULL;
    if (!rt || !pool)
        fprintf(stderr, "runtime: %s\n", err.msg);
    CHECK(rt && pool);
    if (!rt || !pool)
        goto out;
    seq_run sa = {ta, n, 0, ea}, sb = {tb, nb, 0, eb}, sc = {tc, nc, 0, ec};

    CHECK(run_prefill(rt, pool, &sa));
    check_layout(v, "prefill", ra, ea, n, tol);
    CHECK(run_model_prefill(rt, pool, &sa, last));
    check_layout(v, "model_prefill", ra + (size_t)(n - 1) * V, last, 1, tol);

    memcpy(ep, ea, (size_t)n * V * sizeof *ea);

    memset(ea, 0, (size_t)n * V * sizeof *ea);
    CHECK(run_decode(rt, pool, &sa));
    check_layout(v, "decode", ra, ea, n, tol);
    check_same(v, "decode", ep, ea, n);

    memset(ea, 0, (size_t)n * V * sizeof *ea);
    seq_run mixed[3] = {sa, sb, sc};
    CHECK(run_mixed(rt, pool, mixed, 3, v->seed));
    check_layout(v, "mixed seq 0", ra, ea, n, tol);
    check_same(v, "mixed seq 0", ep, ea, n);
    check_layout(v, "mixed seq 1", rb, eb, nb, tol);
    check_layout(v, "mixed seq 2", rc, ec, nc, tol);
    printf("  %-5s engine: %.1f s cpu\n", v->name, (double)(clock() - t0) / CLOCKS_PER_SEC);
    fflush(stdout);

out:
    kv_pool_destroy(pool);
    model_runtime_free(rt);
    model_free(m);
    ref_free(&r);
    gw_free(&w);
    if (have_dir) {
        unlink(path);
        rmdir(dir);
    }
    free(ta);
    free(tb);
    free(tc);
    free(ra);
    free(rb);
    free(rc);
    free(rq);
    free(ea);
    free(eb);
    free(ec);
    free(last);
    free(ep);
}

/* 2 layers, GQA 4/2, head_dim 64, base 1e4: the long sequence (> 4096). */
static void test_f32_weights_4k_sequence_match_reference(void)
{
    const variant v = {"f32", GW_T_F32, 2, 256, 4, 2, 384, 320, 10000.0f, 1e-5f, 4160, 512, 11};
    run_variant(&v);
}

/* 3 layers, GQA 2/1, head_dim 128, base 1e5, fp16 activations. */
static void test_f16_weights_head_dim_128_match_reference(void)
{
    const variant v = {"f16", GW_T_F16, 3, 256, 2, 1, 256, 256, 100000.0f, 1e-6f, 1100, 64, 22};
    run_variant(&v);
}

/* 2 layers, GQA 6/2 (3 query heads per KV head), head_dim 64. */
static void test_q8_0_weights_match_reference(void)
{
    const variant v = {"q8_0", GW_T_Q8_0, 2, 384, 6, 2, 256, 256, 10000.0f, 1e-5f, 600, 64, 33};
    run_variant(&v);
}

/* 2 layers, GQA 2/1, head_dim 128, base 1e5. */
static void test_q4_1_weights_match_reference(void)
{
    const variant v = {"q4_1", GW_T_Q4_1, 2, 256, 2, 1, 256, 256, 100000.0f, 1e-5f, 600, 96, 44};
    run_variant(&v);
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv; /* the demo model path ctest passes: this test writes its own */
    const char *s = getenv("EKV_REF_SHORT");
    g_short = REF_SANITIZED || (s && *s && strcmp(s, "0") != 0);
    RUN_TEST(test_f32_weights_4k_sequence_match_reference);
    RUN_TEST(test_f16_weights_head_dim_128_match_reference);
    RUN_TEST(test_q8_0_weights_match_reference);
    RUN_TEST(test_q4_1_weights_match_reference);
    return TEST_EXIT();
}
