/*
 * synth_model.h - the synthetic Llama GGUFs of the CUDA forward tests
 * (test_cuda_forward.c, test_cuda_engine.c): F16 weights drawn from a seeded
 * generator at test_reference_forward.c's scales (attention far from
 * uniform, logits of rms ~3), written with tests/gguf_writer.h. Header-only
 * (static functions) for the test programs that include it.
 */
#ifndef ENTROKV_TESTS_CUDA_SYNTH_MODEL_H
#define ENTROKV_TESTS_CUDA_SYNTH_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "gguf_writer.h"

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rng_sym(uint64_t *s) { return (float)((double)(rng_next(s) >> 11) * 0x1p-52 - 1.0); }

typedef struct shape {
    const char *name;
    int n_layers, n_embd, n_heads, n_kv_heads, n_ff, n_vocab;
    uint64_t seed;
} shape;

static void add_matrix(gguf_writer *w, uint64_t *s, const char *name, int cols, int rows,
                       double amp)
{
    float *x = malloc((size_t)rows * cols * sizeof *x);
    if (!x) {
        w->oom = 1;
        return;
    }
    for (size_t i = 0; i < (size_t)rows * cols; i++)
        x[i] = (float)(amp * rng_sym(s));
    gw_tensor_add(w, name, GW_T_F16, (uint64_t)cols, (uint64_t)rows, x);
    free(x);
}

static void add_norm(gguf_writer *w, uint64_t *s, const char *name, int n)
{
    float *x = malloc((size_t)n * sizeof *x);
    if (!x) {
        w->oom = 1;
        return;
    }
    for (int i = 0; i < n; i++)
        x[i] = 1.0f + 0.4f * rng_sym(s);
    gw_tensor_add(w, name, GW_T_F32, (uint64_t)n, 1, x);
    free(x);
}

/* Scales as test_reference_forward.c's: attention far from uniform,
 * logits of rms ~3. */
static int write_model(const shape *v, const char *path)
{
    gguf_writer w = {0};
    uint64_t s = v->seed;
    const int E = v->n_embd, D = E / v->n_heads, Q = E, KV = v->n_kv_heads * D, F = v->n_ff;
    char name[96];
    gw_kv_str(&w, "general.architecture", "llama");
    gw_kv_str(&w, "general.name", v->name);
    gw_kv_u32(&w, "llama.block_count", (uint32_t)v->n_layers);
    gw_kv_u32(&w, "llama.context_length", 4096);
    gw_kv_u32(&w, "llama.embedding_length", (uint32_t)E);
    gw_kv_u32(&w, "llama.feed_forward_length", (uint32_t)F);
    gw_kv_u32(&w, "llama.attention.head_count", (uint32_t)v->n_heads);
    gw_kv_u32(&w, "llama.attention.head_count_kv", (uint32_t)v->n_kv_heads);
    gw_kv_u32(&w, "llama.rope.dimension_count", (uint32_t)D);
    gw_kv_f32(&w, "llama.rope.freq_base", 10000.0f);
    gw_kv_f32(&w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gw_kv_str(&w, "tokenizer.ggml.model", "gpt2");
    gw_kv_str(&w, "tokenizer.ggml.pre", "default");
    char **toks = malloc((size_t)v->n_vocab * sizeof *toks);
    char *text = malloc((size_t)v->n_vocab * 16);
    if (toks && text) {
        for (int i = 0; i < v->n_vocab; i++) {
            toks[i] = text + (size_t)i * 16;
            snprintf(toks[i], 16, "tok%d", i);
        }
        gw_kv_str_array(&w, "tokenizer.ggml.tokens", (const char *const *)toks,
                        (uint64_t)v->n_vocab);
        gw_kv_str_array(&w, "tokenizer.ggml.merges", NULL, 0);
    } else {
        w.oom = 1;
    }
    free(toks);
    free(text);
    add_matrix(&w, &s, "token_embd.weight", E, v->n_vocab, 1.0);
    for (int l = 0; l < v->n_layers; l++) {
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d." suffix, l), name)
        add_norm(&w, &s, NAME("attn_norm.weight"), E);
        add_matrix(&w, &s, NAME("attn_q.weight"), E, Q, sqrt(3.0 * 1.2247 / E));
        add_matrix(&w, &s, NAME("attn_k.weight"), E, KV, sqrt(3.0 * 1.2247 / E));
        add_matrix(&w, &s, NAME("attn_v.weight"), E, KV, sqrt(3.0 / E));
        add_matrix(&w, &s, NAME("attn_output.weight"), Q, E, sqrt(3.0 / Q));
        add_norm(&w, &s, NAME("ffn_norm.weight"), E);
        add_matrix(&w, &s, NAME("ffn_gate.weight"), E, F, sqrt(3.0 / E));
        add_matrix(&w, &s, NAME("ffn_up.weight"), E, F, sqrt(3.0 / E));
        add_matrix(&w, &s, NAME("ffn_down.weight"), F, E, sqrt(3.0 * 2.0 / F));
#undef NAME
    }
    add_norm(&w, &s, "output_norm.weight", E);
    add_matrix(&w, &s, "output.weight", E, v->n_vocab, sqrt(3.0 * 9.0 / E));
    /* every tensor made it in (an allocation failure skips one) */
    int rc = !gw_tensor_find(&w, "output.weight") || gw_write(&w, path);
    gw_free(&w);
    return rc;
}

#endif
