/*
 * kvrecall_store.c - the recall tier's backend over a KV store client (see
 * kvrecall_store.h): one batch per put or get, one per set's deletion;
 * each batch owns its ops and frees them in its done callback.
 */
#include "entrokv/kvrecall_store.h"

#include <stdlib.h>
#include <string.h>

typedef struct rs_job {
    kv_recall_done_fn done;
    void *arg;
    size_t len;
    kvstore_op op;
} rs_job;

static void one_done(kvstore_batch *b, kvstore_op *ops, size_t n, void *arg)
{
    (void)b;
    (void)n;
    rs_job *j = arg;
    /* a get counts only with exactly the block's bytes (the client checked
     * the checksum and the MAC) */
    const bool ok = ops[0].result == KVSTORE_OK &&
                    (ops[0].kind != KVSTORE_GET || ops[0].value_len == j->len);
    j->done(j->arg, ok);
    free(j);
}

static bool submit_one(kvstore_client *c, kvstore_op_kind kind, const uint8_t *key, void *buf,
                       size_t len, kv_recall_done_fn done, void *arg)
{
    rs_job *j = calloc(1, sizeof *j);
    if (!j)
        return false;
    j->done = done;
    j->arg = arg;
    j->len = len;
    j->op.kind = kind;
    memcpy(j->op.key.b, key, KVSTORE_KEY_BYTES);
    j->op.buf = buf;
    j->op.len = len;
    if (kvstore_client_submit(c, &j->op, 1, one_done, j, NULL, NULL) != EKV_OK) {
        free(j);
        return false;
    }
    return true;
}

static bool rs_put(void *ctx, const uint8_t key[KV_RECALL_KEY_BYTES], const void *val,
                   size_t len, kv_recall_done_fn done, void *arg)
{
    return submit_one(ctx, KVSTORE_PUT, key, (void *)val, len, done, arg);
}

static bool rs_get(void *ctx, const uint8_t key[KV_RECALL_KEY_BYTES], void *buf, size_t len,
                   kv_recall_done_fn done, void *arg)
{
    return submit_one(ctx, KVSTORE_GET, key, buf, len, done, arg);
}

static void del_done(kvstore_batch *b, kvstore_op *ops, size_t n, void *arg)
{
    (void)b;
    (void)n;
    (void)arg;
    free(ops);
}

static bool rs_del(void *ctx, const uint8_t (*keys)[KV_RECALL_KEY_BYTES], size_t n)
{
    kvstore_op *ops = calloc(n, sizeof *ops);
    if (!ops)
        return false;
    for (size_t i = 0; i < n; i++) {
        ops[i].kind = KVSTORE_DEL;
        memcpy(ops[i].key.b, keys[i], KVSTORE_KEY_BYTES);
    }
    if (kvstore_client_submit(ctx, ops, n, del_done, NULL, NULL, NULL) != EKV_OK) {
        free(ops);
        return false;
    }
    return true;
}

void kvrecall_store_backend(kvstore_client *c, kv_recall_backend *out)
{
    *out = (kv_recall_backend){rs_put, rs_get, rs_del, c};
}
