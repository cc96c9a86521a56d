/*
 * kvprefix.c - prompt KV blocks to and from the KV store (see kvprefix.h).
 */
#include "entrokv/kvprefix.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/sha256.h"

struct kvprefix {
    kvstore_client *client;
    char model_id[160];
    int32_t L, HKV, bt, tp_rank, tp_size;
    size_t block_bytes, value_bytes; /* one head's block; one block-row of every head */
    _Atomic uint64_t saved, skipped, restored, misses, restored_tokens;
};

/* What a save hands the store: the ops and the values they point into. */
typedef struct save_job {
    kvstore_op *ops;
    uint8_t *values;
} save_job;

/* The model's identity: its shape and name, plus a hash of the start of its
 * token embeddings, so two finetunes of one architecture never share KV. */
static void model_id(const ekv_model *m, char *out, size_t cap)
{
    const ekv_model_config *c = model_config(m);
    const gguf_tensor *t = gguf_find_tensor(model_gguf(m), "token_embd.weight");
    uint8_t h[32] = {0};
    if (t) {
        ekv_sha256 s;
        sha256_init(&s);
        sha256_update(&s, t->data, t->nbytes < 65536 ? (size_t)t->nbytes : 65536);
        sha256_final(&s, h);
    }
    snprintf(out, cap, "%s/%d/%d/%d/%d/%d/%02x%02x%02x%02x%02x%02x%02x%02x", c->arch,
             c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->n_vocab, h[0], h[1], h[2],
             h[3], h[4], h[5], h[6], h[7]);
}

kvprefix *kvprefix_create(const ekv_model *m, kvstore_client *client, int32_t tp_rank,
                          int32_t tp_size, ekv_error *err)
{
    const ekv_model_config *c = model_config(m);
    kvprefix *p = calloc(1, sizeof *p);
    kv_pool *probe = model_kv_pool_create(m, 16, err);
    if (!p || !probe) {
        free(p);
        kv_pool_destroy(probe);
        if (!probe)
            return NULL;
        ekv_error_set(err, EKV_ENOMEM, "kvprefix: out of memory");
        return NULL;
    }
    p->client = client;
    p->L = c->n_layers;
    p->HKV = c->n_kv_heads;
    p->bt = kv_pool_block_tokens(probe);
    p->block_bytes = kv_pool_block_bytes(probe);
    p->value_bytes = (size_t)p->L * p->HKV * p->block_bytes;
    p->tp_rank = tp_rank;
    p->tp_size = tp_size;
    kv_pool_destroy(probe);
    model_id(m, p->model_id, sizeof p->model_id);
    return p;
}

void kvprefix_destroy(kvprefix *p)
{
    free(p);
}

/* keys[i] for block i of tokens (whole blocks only). */
static void make_keys(const kvprefix *p, const int32_t *tokens, int32_t n_blocks,
                      kvstore_key *keys)
{
    uint8_t chain[KVSTORE_HASH_BYTES] = {0};
    for (int32_t i = 0; i < n_blocks; i++) {
        const int32_t *blk = tokens + (size_t)i * p->bt;
        kvstore_key_make(p->model_id, chain, blk, p->bt, -1, -1, p->tp_rank, p->tp_size,
                         &keys[i]);
        kvstore_chain_hash(chain, blk, p->bt, chain);
    }
}

static void save_done(kvstore_batch *b, kvstore_op *ops, size_t n, void *arg)
{
    save_job *job = arg;
    free(job->values);
    free(job->ops);
    free(job);
}

void kvprefix_save(kvprefix *p, const kv_seq *seq, const int32_t *tokens, int32_t n,
                   int32_t first_block)
{
    const int32_t n_blocks = n / p->bt;
    if (first_block < 0)
        first_block = 0;
    if (n_blocks <= first_block)
        return;
    const int32_t n_save = n_blocks - first_block;
    save_job *job = calloc(1, sizeof *job);
    kvstore_key *keys = malloc((size_t)n_blocks * sizeof *keys);
    if (job) {
        job->ops = calloc((size_t)n_save, sizeof *job->ops);
        job->values = malloc((size_t)n_save * p->value_bytes);
    }
    if (!job || !keys || !job->ops || !job->values)
        goto skip;
    make_keys(p, tokens, n_blocks, keys);
    for (int32_t i = 0; i < n_save; i++) {
        uint8_t *v = job->values + (size_t)i * p->value_bytes;
        for (int32_t l = 0; l < p->L; l++)
            for (int32_t h = 0; h < p->HKV; h++)
                kv_seq_block_export(seq, l, h, first_block + i,
                                    v + ((size_t)l * p->HKV + h) * p->block_bytes);
        job->ops[i].kind = KVSTORE_PUT;
        job->ops[i].key = keys[first_block + i];
        job->ops[i].buf = v;
        job->ops[i].len = p->value_bytes;
    }
    free(keys);
    if (kvstore_client_submit(p->client, job->ops, (size_t)n_save, save_done, job, NULL, NULL) ==
        EKV_OK) {
        atomic_fetch_add(&p->saved, (uint64_t)n_save);
        return;
    }
    keys = NULL;
skip:
    atomic_fetch_add(&p->skipped, 1);
    free(keys);
    if (job) {
        free(job->ops);
        free(job->values);
        free(job);
    }
}

int32_t kvprefix_restore(kvprefix *p, kv_seq *seq, const int32_t *tokens, int32_t n,
                         int32_t max_tokens)
{
    int32_t n_blocks = (n < max_tokens ? n : max_tokens) / p->bt;
    const int64_t room = kv_pool_free_blocks(kv_seq_pool(seq)) / ((int64_t)p->L * p->HKV);
    if (n_blocks > room)
        n_blocks = (int32_t)room;
    if (n_blocks <= 0 || kv_seq_max_len(seq) != 0)
        return 0;
    kvstore_key *keys = malloc((size_t)n_blocks * sizeof *keys);
    kvstore_op *ops = calloc((size_t)n_blocks, sizeof *ops);
    uint8_t *values = malloc((size_t)n_blocks * p->value_bytes);
    kvstore_batch *batch = NULL;
    int32_t got = 0;
    if (!keys || !ops || !values)
        goto out;
    make_keys(p, tokens, n_blocks, keys);
    for (int32_t i = 0; i < n_blocks; i++) {
        ops[i].kind = KVSTORE_GET;
        ops[i].key = keys[i];
        ops[i].buf = values + (size_t)i * p->value_bytes;
        ops[i].len = p->value_bytes;
    }
    if (kvstore_client_submit(p->client, ops, (size_t)n_blocks, NULL, NULL, &batch, NULL) != EKV_OK)
        goto out;
    kvstore_batch_wait(batch, -1); /* bounded by the client's op timeout */
    kvstore_batch_release(batch);
    while (got < n_blocks && ops[got].result == KVSTORE_OK && ops[got].value_len == p->value_bytes)
        got++;
    for (int32_t i = 0; i < got; i++) {
        const uint8_t *v = values + (size_t)i * p->value_bytes;
        for (int32_t l = 0; l < p->L; l++)
            for (int32_t h = 0; h < p->HKV; h++)
                if (kv_seq_block_import(seq, l, h, v + ((size_t)l * p->HKV + h) * p->block_bytes,
                                        p->bt, NULL) != EKV_OK)
                    goto undo; /* cannot happen: room was checked */
    }
    goto out;
undo:
    for (int32_t l = 0; l < p->L; l++)
        for (int32_t h = 0; h < p->HKV; h++)
            kv_seq_keep(seq, l, h, NULL, 0, NULL);
    got = 0;
out:
    if (got > 0) {
        atomic_fetch_add(&p->restored, (uint64_t)got);
        atomic_fetch_add(&p->restored_tokens, (uint64_t)got * p->bt);
    } else {
        atomic_fetch_add(&p->misses, 1);
    }
    free(keys);
    free(ops);
    free(values);
    return got * p->bt;
}

void kvprefix_stats_get(const kvprefix *p, kvprefix_stats *s)
{
    s->saved_blocks = atomic_load(&p->saved);
    s->save_skipped = atomic_load(&p->skipped);
    s->restored_blocks = atomic_load(&p->restored);
    s->restore_misses = atomic_load(&p->misses);
    s->restored_tokens = atomic_load(&p->restored_tokens);
}
