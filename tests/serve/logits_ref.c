/*
 * logits_ref.c - the reference logits of the serving tests' log-probability
 * checks (tests/serve/test_openai_api.py, test_lm_eval.py): every row's raw
 * logits of a token sequence straight from model_forward, with none of the
 * serving path (engine, sampler, log-softmax, JSON) in between; the tests
 * take the log-softmax themselves.
 *
 * Usage: logits_ref MODEL.gguf OUT.bin < ids.txt
 * Each line of ids.txt is one sequence of token ids. OUT.bin gets, for each
 * sequence in order, one float32 row of n_vocab logits per token (row i
 * predicts token i + 1), native byte order. Prints n_vocab on stdout.
 * Sequences run 32 rows per forward (the engine uses other chunk sizes:
 * its kernels are batch-invariant, so the rows must agree anyway).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/model.h"

#define CHUNK 32
#define MAX_IDS 4096

static int run(ekv_runtime *rt, kv_pool *pool, const ekv_model_config *c, const int32_t *ids,
               int32_t n, float *logits, FILE *out)
{
    ekv_error err = {0};
    kv_seq *seq = kv_seq_create(pool, c->n_layers, c->n_kv_heads, &err);
    if (!seq) {
        fprintf(stderr, "logits_ref: %s\n", err.msg);
        return 1;
    }
    int32_t pos[CHUNK];
    uint8_t want[CHUNK];
    kv_seq *seqs[CHUNK];
    memset(want, 1, sizeof want);
    for (int32_t i = 0; i < CHUNK; i++)
        seqs[i] = seq;
    for (int32_t s = 0; s < n; s += CHUNK) {
        const int32_t rows = n - s < CHUNK ? n - s : CHUNK;
        for (int32_t i = 0; i < rows; i++)
            pos[i] = s + i;
        model_batch b = {.n = rows, .tokens = ids + s, .pos = pos, .seqs = seqs,
                         .want_logits = want};
        if (model_forward(rt, &b, logits, &err)) {
            fprintf(stderr, "logits_ref: %s\n", err.msg);
            kv_seq_free(seq);
            return 1;
        }
        fwrite(logits, sizeof *logits, (size_t)rows * c->n_vocab, out);
    }
    kv_seq_free(seq);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: logits_ref MODEL.gguf OUT.bin < ids.txt\n");
        return 2;
    }
    ekv_error err = {0};
    ekv_model *m = model_load(argv[1], &err);
    if (!m) {
        fprintf(stderr, "logits_ref: %s\n", err.msg);
        return 1;
    }
    const ekv_model_config *c = model_config(m);
    ekv_runtime *rt = model_runtime_create(m, CHUNK, MAX_IDS, 2, &err);
    kv_pool *pool = rt ? model_kv_pool_create(m, MAX_IDS, &err) : NULL;
    float *logits = malloc((size_t)CHUNK * c->n_vocab * sizeof *logits);
    int32_t *ids = malloc(MAX_IDS * sizeof *ids);
    FILE *out = fopen(argv[2], "wb");
    int rc = 0;
    if (!rt || !pool || !logits || !ids || !out) {
        fprintf(stderr, "logits_ref: setup failed: %s\n", err.msg);
        rc = 1;
    }
    char line[65536];
    while (rc == 0 && fgets(line, sizeof line, stdin)) {
        int32_t n = 0;
        for (char *p = line, *end; n < MAX_IDS; p = end) {
            long v = strtol(p, &end, 10);
            if (end == p)
                break;
            if (v < 0 || v >= c->n_vocab) {
                fprintf(stderr, "logits_ref: token %ld outside the vocabulary\n", v);
                rc = 1;
                break;
            }
            ids[n++] = (int32_t)v;
        }
        if (rc == 0 && n > 0)
            rc = run(rt, pool, c, ids, n, logits, out);
    }
    if (out && fclose(out))
        rc = 1;
    printf("%d\n", c->n_vocab);
    free(ids);
    free(logits);
    kv_pool_destroy(pool);
    model_runtime_free(rt);
    model_free(m);
    return rc;
}
