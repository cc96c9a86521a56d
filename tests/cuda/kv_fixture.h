/*
 * kv_fixture.h - a batch of KV heads built on the CPU's kv_seq (random K/V,
 * ragged lengths, optionally compressed so positions have gaps) and
 * uploaded to a device pool with the same block layout, so a CUDA kernel and
 * its CPU reference read the very same tokens.
 */
#ifndef EKV_KV_FIXTURE_H
#define EKV_KV_FIXTURE_H

#include <string.h>

#include "cuda_test.h"
#include "entrokv/kvcache.h"

typedef struct heads_fixture {
    kv_pool *pool;
    kv_seq **seqs;
    int n_seq, n_kv, d;
    int32_t max_len;
    ekv_cuda_kv_pool *dpool;
    int32_t *table, *off, *len; /* host */
    ekv_cuda_kv_heads dev;      /* device arrays */
} heads_fixture;

/* n_seq sequences of n_kv heads; head (s, h) gets len(s, h) tokens at
 * positions 0.. then, when sparse, keeps every other one (gaps in positions). */
static inline void fixture_make(heads_fixture *f, int n_seq, int n_kv, int d, const int32_t *lens,
                         int sparse)
{
    memset(f, 0, sizeof *f);
    f->n_seq = n_seq;
    f->n_kv = n_kv;
    f->d = d;
    int64_t blocks = 0;
    for (int i = 0; i < n_seq * n_kv; i++)
        blocks += lens[i] / 16 + 2;
    f->pool = kv_pool_create(16, d, blocks, &g_err);
    /* room for as many again: compaction and restores take fresh blocks */
    CHECK_OK(ekv_cuda_kv_pool_create(g_ctx, 16, d, 2 * blocks + 8, &f->dpool, &g_err));
    f->seqs = calloc((size_t)n_seq, sizeof *f->seqs);
    f->table = malloc((size_t)blocks * 4);
    f->off = malloc((size_t)n_seq * n_kv * 4);
    f->len = malloc((size_t)n_seq * n_kv * 4);
    float *k = malloc((size_t)d * 4), *v = malloc((size_t)d * 4);
    int32_t longest = 1;
    for (int i = 0; i < n_seq * n_kv; i++)
        longest = lens[i] > longest ? lens[i] : longest;
    int32_t *keep = malloc((size_t)longest * sizeof *keep);
    int32_t used = 0;
    for (int s = 0; s < n_seq; s++) {
        f->seqs[s] = kv_seq_create(f->pool, 1, n_kv, &g_err);
        for (int h = 0; h < n_kv; h++) {
            const int32_t n = lens[s * n_kv + h];
            for (int32_t t = 0; t < n; t++) {
                rnd_fill(k, (size_t)d, -1, 1);
                rnd_fill(v, (size_t)d, -1, 1);
                CHECK_OK(kv_seq_append(f->seqs[s], 0, h, k, v, t, &g_err));
            }
            if (sparse && n > 1) {
                int32_t nk = 0;
                for (int32_t t = 0; t < n; t += 2)
                    keep[nk++] = t;
                CHECK_OK(kv_seq_keep(f->seqs[s], 0, h, keep, nk, &g_err));
            }
            kern_kv_view view;
            kv_seq_view(f->seqs[s], 0, h, &view);
            f->off[s * n_kv + h] = used;
            f->len[s * n_kv + h] = view.n_tokens;
            if (view.n_tokens > f->max_len)
                f->max_len = view.n_tokens;
            CHECK_OK(ekv_cuda_kv_upload_view(f->dpool, &view, f->table + used, &g_err));
            used += (view.n_tokens + 15) / 16;
        }
    }
    f->dev.n_heads = n_seq * n_kv;
    f->dev.table = dev_from(f->table, (size_t)(used + 1) * 4);
    f->dev.table_off = dev_from(f->off, (size_t)n_seq * n_kv * 4);
    f->dev.n_tokens = dev_from(f->len, (size_t)n_seq * n_kv * 4);
    free(k);
    free(v);
    free(keep);
}

static inline void fixture_free(heads_fixture *f)
{
    for (int s = 0; s < f->n_seq; s++)
        kv_seq_free(f->seqs[s]);
    free(f->seqs);
    kv_pool_destroy(f->pool);
    ekv_cuda_kv_pool_destroy(f->dpool);
    ekv_cuda_free((void *)f->dev.table);
    ekv_cuda_free((void *)f->dev.table_off);
    ekv_cuda_free((void *)f->dev.n_tokens);
    free(f->table);
    free(f->off);
    free(f->len);
}

#endif
