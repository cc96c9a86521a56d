/*
 * llama_ref.h - a Llama forward pass in double precision, written from the
 * model definition for tests to compare model_forward with; it calls
 * nothing in model/ or kernels/.
 *
 * Sources: Touvron et al. 2023 (pre-norm blocks, RMSNorm, SwiGLU), RoFormer
 * (Su et al. 2021, eq. 34: pair i of a head turns by pos * base^(-2i/d)),
 * with GGUF llama's pairing of adjacent elements (2i, 2i+1) -
 * convert_hf_to_gguf.py permutes the q and k rows so that llama.cpp's
 * normal (non-NeoX) rope applies - and GQA (Ainslie et al. 2023: query
 * head h reads KV head h / (n_heads / n_kv_heads), HF's repeat_kv). The
 * weights are read back from the bytes a gguf_writer encoded and decoded
 * here from ggml's block definitions (F32, F16, Q8_0, Q4_1).
 *
 * Flags add the roundings of the engine's data formats, each applied where
 * the format puts it: fp16 K/V (the KV cache), fp16 or 8-bit-per-block
 * matmul inputs (what the matmul kernels take for F16 and Q8_0/Q4_1
 * weights). Used by tests/model/test_reference_forward.c.
 */
#ifndef EKV_TEST_LLAMA_REF_H
#define EKV_TEST_LLAMA_REF_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_writer.h"

#define REF_MAX_LAYERS 4

typedef struct ref_hparams {
    int n_layers, n_embd, n_heads, n_kv_heads, n_ff, n_vocab;
    double rope_base, norm_eps;
} ref_hparams;

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
    double *attn_norm[REF_MAX_LAYERS], *ffn_norm[REF_MAX_LAYERS];
    double *wq[REF_MAX_LAYERS], *wk[REF_MAX_LAYERS], *wv[REF_MAX_LAYERS], *wo[REF_MAX_LAYERS];
    double *wg[REF_MAX_LAYERS], *wu[REF_MAX_LAYERS], *wd[REF_MAX_LAYERS];
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
    for (int l = 0; l < REF_MAX_LAYERS; l++) {
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

/* Decodes every tensor of the model w holds (names as model/model.c
 * expects them in a llama GGUF); 1 on success. ref_free releases r,
 * also after a failure. */
static int ref_load(const ref_hparams *hp, const gguf_writer *w, ref_model *r)
{
    memset(r, 0, sizeof *r);
    if (hp->n_layers > REF_MAX_LAYERS)
        return 0;
    r->L = hp->n_layers;
    r->E = hp->n_embd;
    r->H = hp->n_heads;
    r->HKV = hp->n_kv_heads;
    r->D = hp->n_embd / hp->n_heads;
    r->F = hp->n_ff;
    r->V = hp->n_vocab;
    r->base = hp->rope_base;
    r->eps = hp->norm_eps;
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

#endif
