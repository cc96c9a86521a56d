/*
 * test_reference_forward.c - model_forward against an independent forward
 * pass in double precision, at every position of every sequence, on small
 * synthetic Llama GGUFs this test writes (tests/gguf_writer.h).
 *
 * The reference (ref_*) is written from the model definition, not from
 * model/ or kernels/ (it calls neither): Touvron et al. 2023 (RMSNorm,
 * SwiGLU, pre-norm residual blocks), RoFormer (Su et al. 2021, eq. 34:
 * theta_i = pos * base^(-2i/d)) with GGUF llama's pairing of adjacent
 * elements (2i, 2i+1) - convert_hf_to_gguf.py permutes q and k so that
 * llama.cpp's normal, non-NeoX rope applies - and GQA (Ainslie et al.
 * 2023: query head h reads KV head h / (n_heads / n_kv_heads), HF's
 * repeat_kv). Weights are read back from the encoded file bytes and
 * dequantized here from ggml's block definitions.
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
#include <errno.h>
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

#define MAX_LAYERS 4

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

static float *random_matrix(uint64_t *s, int64_t n, double amp)
{
    float *x = malloc((size_t)n * sizeof *x);
    for (int64_t i = 0; x && i < n; i++)
        x[i] = (float)(amp * rng_sym(s));
    return x;
}

static void add_matrix(gguf_writer *w, uint64_t *s, const char *name, uint32_t type, int cols,
                       int rows, double amp)
{
    float *x = random_matrix(s, (int64_t)cols * rows, amp);
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

/* ---- the reference ---- */

/* Reference options: roundings the engine's data formats imply. */
enum {
    REF_KV_F16 = 1,  /* K and V are stored as fp16 */
    REF_ACT_F16 = 2, /* matmul inputs rounded to fp16 (F16 weights) */
    REF_ACT_Q8 = 4,  /* matmul inputs quantized to 8 bits per block of 32 */
};

typedef struct ref_model {
    int L, E, H, HKV, D, F, V;
    double base, eps;
    double *embd, *out_norm, *out;
    double *attn_norm[MAX_LAYERS], *ffn_norm[MAX_LAYERS];
    double *wq[MAX_LAYERS], *wk[MAX_LAYERS], *wv[MAX_LAYERS], *wo[MAX_LAYERS];
    double *wg[MAX_LAYERS], *wu[MAX_LAYERS], *wd[MAX_LAYERS];
} ref_model;

/* IEEE binary16 bits to a double, exactly. */
static double ref_half(const uint8_t *p)
{
    const unsigned h = (unsigned)p[0] | (unsigned)p[1] << 8;
    const int e = (int)((h >> 10) & 31), m = (int)(h & 1023);
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(m + 1024, e - 25);
    return h & 0x8000 ? -v : v;
}

/* Nearest binary16 value (ties to even) of x, as a double. */
static double ref_round_f16(double x)
{
    const double ax = fabs(x);
    if (ax == 0.0 || !isfinite(x))
        return x;
    int e;
    frexp(ax, &e);            /* ax in [2^(e-1), 2^e) */
    int q = e - 1 - 10;       /* spacing of 11-bit significands at this binade */
    if (q < -24)
        q = -24;              /* subnormal spacing */
    const double step = ldexp(1.0, q);
    double r = nearbyint(ax / step) * step; /* the default rounding mode is to even */
    if (r > 65504.0)
        r = INFINITY;
    return x < 0 ? -r : r;
}

/* Decodes an ne1 x ne0 tensor from its GGUF bytes (ggml's block layouts). */
static double *ref_dequant(const gw_tensor *t)
{
    if (!t)
        return NULL;
    const int64_t k = (int64_t)t->ne0, n = (int64_t)t->ne1;
    double *y = malloc((size_t)(k * n) * sizeof *y);
    if (!y)
        return NULL;
    const uint8_t *p = t->data;
    for (int64_t i = 0; i < k * n;) {
        switch (t->type) {
        case GW_T_F32: {
            float f;
            memcpy(&f, p, 4);
            y[i++] = f;
            p += 4;
            break;
        }
        case GW_T_F16:
            y[i++] = ref_half(p);
            p += 2;
            break;
        case GW_T_Q8_0: /* d, then 32 signed bytes */
            for (int j = 0; j < 32; j++)
                y[i + j] = ref_half(p) * (int8_t)p[2 + j];
            i += 32;
            p += 34;
            break;
        case GW_T_Q4_1: /* d, m, then element j low nibble / j+16 high nibble */
            for (int j = 0; j < 16; j++) {
                y[i + j] = ref_half(p) * (p[4 + j] & 15) + ref_half(p + 2);
                y[i + 16 + j] = ref_half(p) * (p[4 + j] >> 4) + ref_half(p + 2);
            }
            i += 32;
            p += 20;
            break;
        default:
            free(y);
            return NULL;
        }
    }
    return y;
}

static void ref_free(ref_model *r)
{
    free(r->embd);
    free(r->out_norm);
    free(r->out);
    for (int l = 0; l < MAX_LAYERS; l++) {
        free(r->attn_norm[l]);
        free(r->ffn_norm[l]);
        free(r->wq[l]);
        free(r->wk[l]);
        free(r->wv[l]);
        free(r->wo[l]);
        free(r->wg[l]);
        free(r->wu[l]);
        free(r->wd[l]);
    }
    memset(r, 0, sizeof *r);
}

static int ref_load(const variant *v, const gguf_writer *w, ref_model *r)
{
    memset(r, 0, sizeof *r);
    r->L = v->n_layers;
    r->E = v->n_embd;
    r->H = v->n_heads;
    r->HKV = v->n_kv_heads;
    r->D = v->n_embd / v->n_heads;
    r->F = v->n_ff;
    r->V = v->n_vocab;
    r->base = v->rope_base; /* the f32 in the file, widened */
    r->eps = v->norm_eps;
    char name[96];
    int ok = (r->embd = ref_dequant(gw_tensor_find(w, "token_embd.weight"))) &&
             (r->out_norm = ref_dequant(gw_tensor_find(w, "output_norm.weight"))) &&
             (r->out = ref_dequant(gw_tensor_find(w, "output.weight")));
    for (int l = 0; ok && l < r->L; l++) {
#define T(suffix) gw_tensor_find(w, (snprintf(name, sizeof name, "blk.%d." suffix, l), name))
        ok = (r->attn_norm[l] = ref_dequant(T("attn_norm.weight"))) &&
             (r->wq[l] = ref_dequant(T("attn_q.weight"))) &&
             (r->wk[l] = ref_dequant(T("attn_k.weight"))) &&
             (r->wv[l] = ref_dequant(T("attn_v.weight"))) &&
             (r->wo[l] = ref_dequant(T("attn_output.weight"))) &&
             (r->ffn_norm[l] = ref_dequant(T("ffn_norm.weight"))) &&
             (r->wg[l] = ref_dequant(T("ffn_gate.weight"))) &&
             (r->wu[l] = ref_dequant(T("ffn_up.weight"))) &&
             (r->wd[l] = ref_dequant(T("ffn_down.weight")));
#undef T
    }
    return ok;
}

/* y = x / sqrt(mean(x^2) + eps) * w */
static void ref_rmsnorm(double *y, const double *x, const double *w, int n, double eps)
{
    double ss = 0.0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    const double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * inv * w[i];
}

/* The matmul input as the engine's weight format requires it (flags). A
 * block of 32 goes to 8 bits as ggml's Q8_0/Q8_1: d = amax / 127 stored as
 * fp16, q = round(x / amax * 127), x' = d * q. */
static void ref_act(double *y, const double *x, int n, int flags)
{
    if (flags & REF_ACT_F16) {
        for (int i = 0; i < n; i++)
            y[i] = ref_round_f16(x[i]);
    } else if (flags & REF_ACT_Q8) {
        for (int b = 0; b < n; b += 32) {
            double amax = 0.0;
            for (int j = 0; j < 32; j++)
                amax = fmax(amax, fabs(x[b + j]));
            const double d = ref_round_f16(amax / 127.0);
            for (int j = 0; j < 32; j++)
                y[b + j] = amax > 0 ? d * nearbyint(x[b + j] / amax * 127.0) : 0.0;
        }
    } else {
        memcpy(y, x, (size_t)n * sizeof *y);
    }
}

/* a . b over n (a multiple of 8) terms; eight partial sums so the
 * additions do not wait on each other (this is most of the test's time) */
static double ref_dot(const double *a, const double *b, int n)
{
    double s[8] = {0};
    for (int i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++)
            s[j] += a[i + j] * b[i + j];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* y[rows] = W[rows][cols] . x */
static void ref_matvec(double *y, const double *W, const double *x, int rows, int cols)
{
    for (int r = 0; r < rows; r++)
        y[r] = ref_dot(W + (size_t)r * cols, x, cols);
}

/* Rotates the pairs (x[2i], x[2i+1]) of one head by pos * base^(-2i/d). */
static void ref_rope(double *x, int d, int pos, double base)
{
    for (int i = 0; i < d / 2; i++) {
        const double a = pos * pow(base, -2.0 * i / d);
        const double c = cos(a), s = sin(a), x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
    }
}

/*
 * Causal attention of one query head over rows 0..n-1 of the sequence:
 * out[t] = sum_{s<=t} softmax_s(q[t] . k[s] / sqrt(D)) v[s]. Queries are
 * taken in tiles of QT so each K and V row is read once per tile (the
 * caches are larger than the CPU's caches at 4k tokens).
 */
#define QT 32
static void ref_attention_head(const double *q, int q_stride, const double *k, const double *v,
                               int kv_stride, int n, int D, double *out, int out_stride,
                               double *sc /* QT x n */)
{
    const double scale = 1.0 / sqrt((double)D);
    for (int t0 = 0; t0 < n; t0 += QT) {
        const int t1 = t0 + QT < n ? t0 + QT : n;
        for (int s = 0; s < t1; s++)
            for (int t = s > t0 ? s : t0; t < t1; t++) /* only t >= s: causal */
                sc[(size_t)(t - t0) * n + s] =
                    ref_dot(q + (size_t)t * q_stride, k + (size_t)s * kv_stride, D) * scale;
        for (int t = t0; t < t1; t++) {
            double *p = sc + (size_t)(t - t0) * n, mx = -INFINITY, sum = 0.0;
            for (int s = 0; s <= t; s++)
                mx = fmax(mx, p[s]);
            for (int s = 0; s <= t; s++)
                sum += (p[s] = exp(p[s] - mx));
            for (int s = 0; s <= t; s++)
                p[s] /= sum;
            for (int j = 0; j < D; j++)
                out[(size_t)t * out_stride + j] = 0.0;
        }
        for (int s = 0; s < t1; s++) {
            const double *vs = v + (size_t)s * kv_stride;
            for (int t = s > t0 ? s : t0; t < t1; t++) {
                const double p = sc[(size_t)(t - t0) * n + s];
                double *o = out + (size_t)t * out_stride;
                for (int j = 0; j < D; j++)
                    o[j] += p * vs[j];
            }
        }
    }
}

/*
 * Runs one sequence of n tokens at positions pos0.. through the model and
 * writes the n x V logits; 1 on success. Layer by layer over the whole
 * sequence: the residual stream x holds every position.
 */
static int ref_run(const ref_model *r, const int32_t *tok, int n, int pos0, int flags,
                   double *logits)
{
    const int E = r->E, H = r->H, HKV = r->HKV, D = r->D, F = r->F, G = H / HKV;
    const int Q = H * D, KV = HKV * D;
    const int big = E > F ? (E > Q ? E : Q) : (F > Q ? F : Q);
    double *x = malloc((size_t)n * E * sizeof *x);    /* residual stream [t][E] */
    double *q = malloc((size_t)n * Q * sizeof *q);    /* [t][h][D] */
    double *k = malloc((size_t)n * KV * sizeof *k);   /* [t][kvh][D] */
    double *v = malloc((size_t)n * KV * sizeof *v);
    double *att = malloc((size_t)n * Q * sizeof *att);
    double *xn = malloc((size_t)big * sizeof *xn), *xa = malloc((size_t)big * sizeof *xa);
    double *o = malloc((size_t)E * sizeof *o);
    double *gate = malloc((size_t)F * sizeof *gate), *up = malloc((size_t)F * sizeof *up);
    double *sc = malloc((size_t)QT * n * sizeof *sc);
    const int ok = x && q && k && v && att && xn && xa && o && gate && up && sc;
    for (int t = 0; ok && t < n; t++)
        memcpy(x + (size_t)t * E, r->embd + (size_t)tok[t] * E, (size_t)E * sizeof *x);
    for (int l = 0; ok && l < r->L; l++) {
        for (int t = 0; t < n; t++) {
            double *qt = q + (size_t)t * Q, *kt = k + (size_t)t * KV, *vt = v + (size_t)t * KV;
            ref_rmsnorm(xn, x + (size_t)t * E, r->attn_norm[l], E, r->eps);
            ref_act(xa, xn, E, flags);
            ref_matvec(qt, r->wq[l], xa, Q, E);
            ref_matvec(kt, r->wk[l], xa, KV, E);
            ref_matvec(vt, r->wv[l], xa, KV, E);
            for (int h = 0; h < H; h++)
                ref_rope(qt + h * D, D, pos0 + t, r->base);
            for (int h = 0; h < HKV; h++)
                ref_rope(kt + h * D, D, pos0 + t, r->base);
            for (int j = 0; (flags & REF_KV_F16) && j < KV; j++) {
                kt[j] = ref_round_f16(kt[j]);
                vt[j] = ref_round_f16(vt[j]);
            }
        }
        for (int h = 0; h < H; h++) /* query head h reads KV head h / G */
            ref_attention_head(q + h * D, Q, k + (h / G) * D, v + (h / G) * D, KV, n, D,
                               att + h * D, Q, sc);
        for (int t = 0; t < n; t++) {
            double *xt = x + (size_t)t * E;
            ref_act(xa, att + (size_t)t * Q, Q, flags);
            ref_matvec(o, r->wo[l], xa, E, Q);
            for (int i = 0; i < E; i++)
                xt[i] += o[i];
            ref_rmsnorm(xn, xt, r->ffn_norm[l], E, r->eps);
            ref_act(xa, xn, E, flags);
            ref_matvec(gate, r->wg[l], xa, F, E);
            ref_matvec(up, r->wu[l], xa, F, E);
            for (int i = 0; i < F; i++) /* SwiGLU: silu(gate) * up */
                gate[i] = gate[i] / (1.0 + exp(-gate[i])) * up[i];
            ref_act(xa, gate, F, flags);
            ref_matvec(o, r->wd[l], xa, E, F);
            for (int i = 0; i < E; i++)
                xt[i] += o[i];
        }
    }
    for (int t = 0; ok && t < n; t++) {
        ref_rmsnorm(xn, x + (size_t)t * E, r->out_norm, E, r->eps);
        ref_act(xa, xn, E, flags);
        ref_matvec(logits + (size_t)t * r->V, r->out, xa, r->V, E);
    }
    free(x);
    free(q);
    free(k);
    free(v);
    free(att);
    free(xn);
    free(xa);
    free(o);
    free(gate);
    free(up);
    free(sc);
    return ok;
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
 * F32 and F16 weights: the reference rounds K/V (and F16 matmul inputs) to
 * fp16 exactly where the engine stores them, so what is left is float32
 * arithmetic, unit roundoff u = 2^-24 = 6e-8:
 *   - RoPE: the engine advances theta_i by repeated float multiplication
 *     by powf(base, -2/d) (ggml's way), so theta_i carries a relative error
 *     up to ~(i + 2)u, i < d/2 = 64: ~4e-6 relative of an angle pos*theta_i,
 *     i.e. up to 1e-5 rad at pos*theta ~ 4; q and k move by that much;
 *   - dot products of n <= 512 terms and softmax sums over <= 4160 terms:
 *     ~sqrt(n)u ~ 1.4e-6 to 4e-6 relative, expf (or the SIMD polynomial,
 *     2e-7) inside;
 *   - a float that lands within that distance of an fp16 rounding boundary
 *     rounds to the neighbouring fp16 value: 2^-11 relative on that one
 *     element, with probability ~1e-5 / 2^-11 ~ 2% per element; averaged
 *     over a dot product of n such elements that is 2^-11 * sqrt(0.02 / n)
 *     ~ 3e-6 relative.
 * Each of these is ~1e-5 or less per stage; through 2-3 layers, where the
 * residual stream carries an error forward and attention with scores of
 * standard deviation ~1.5 amplifies a score error a few-fold, the logits
 * should see ~1e-5 to 5e-5 in rms. The tolerance allows 2e-4 in rms and
 * 2e-3 at the worst single logit of ~10^6 (a tail of the same errors).
 * The bugs this test is for are far above that: a 5% softmax temperature
 * or RoPE base error moves the logits by ~1e-2 relative (printed by the
 * mutation runs, scripts/mutations/ref-*.patch).
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
    const int n = g_short ? (v->n_tokens > 400 ? 400 : v->n_tokens) / (v->wtype == GW_T_F32 ? 1 : 2)
                          : v->n_tokens;
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
    CHECK(ref_load(v, &w, &r));
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
