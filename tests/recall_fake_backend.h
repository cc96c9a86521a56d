/*
 * recall_fake_backend.h - an in-process backend for the recall tier
 * (kvrecall_tier.h) whose ops complete only when the test pumps them (a
 * daemon's latency, made deterministic), fail (MODE_DOWN: a daemon that is
 * down) or never complete (MODE_STALL: a stopped one). The test pumps
 * between steps, never inside one; ops are queued from the forward's pool
 * threads (views of different heads run concurrently), so the queue and the
 * entries are under one lock (unlocked, two threads' gets could take the
 * same queue slot: a lost get never calls back, and its sequence, holding
 * the reference, never deletes its keys).
 */
#ifndef EKV_RECALL_FAKE_BACKEND_H
#define EKV_RECALL_FAKE_BACKEND_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/kvrecall_tier.h"

enum { MODE_OK, MODE_DOWN, MODE_STALL };

typedef struct fake_op {
    int kind; /* 1 put, 2 get */
    uint8_t key[KV_RECALL_KEY_BYTES];
    void *buf;
    size_t len;
    kv_recall_done_fn done;
    void *arg;
} fake_op;

typedef struct fake_entry {
    uint8_t key[KV_RECALL_KEY_BYTES];
    uint8_t *val;
    size_t len;
} fake_entry;

typedef struct fake_be {
    int mode;
    fake_op q[4096];
    int nq;
    fake_entry e[4096];
    int ne;
    int64_t puts, gets, dels;
} fake_be;

static pthread_mutex_t fake_mu = PTHREAD_MUTEX_INITIALIZER;

static inline fake_entry *find(fake_be *f, const uint8_t *key)
{
    for (int i = 0; i < f->ne; i++)
        if (!memcmp(f->e[i].key, key, KV_RECALL_KEY_BYTES))
            return &f->e[i];
    return NULL;
}

static inline bool fake_queue(fake_be *f, int kind, const uint8_t *key, void *buf, size_t len,
                       kv_recall_done_fn done, void *arg)
{
    pthread_mutex_lock(&fake_mu);
    if (f->nq == 4096) {
        pthread_mutex_unlock(&fake_mu);
        return false;
    }
    fake_op *o = &f->q[f->nq++];
    o->kind = kind;
    memcpy(o->key, key, KV_RECALL_KEY_BYTES);
    o->buf = buf;
    o->len = len;
    o->done = done;
    o->arg = arg;
    if (kind == 1)
        f->puts++;
    else
        f->gets++;
    pthread_mutex_unlock(&fake_mu);
    return true;
}

static inline bool fake_put(void *ctx, const uint8_t *key, const void *val, size_t len,
                     kv_recall_done_fn done, void *arg)
{
    return fake_queue(ctx, 1, key, (void *)val, len, done, arg);
}

static inline bool fake_get(void *ctx, const uint8_t *key, void *buf, size_t len, kv_recall_done_fn done,
                     void *arg)
{
    return fake_queue(ctx, 2, key, buf, len, done, arg);
}

static inline bool fake_del(void *ctx, const uint8_t (*keys)[KV_RECALL_KEY_BYTES], size_t n)
{
    fake_be *f = ctx;
    pthread_mutex_lock(&fake_mu);
    for (size_t i = 0; i < n; i++) {
        fake_entry *e = find(f, keys[i]);
        if (!e)
            continue;
        free(e->val);
        *e = f->e[--f->ne];
        f->dels++;
    }
    pthread_mutex_unlock(&fake_mu);
    return true;
}

/* Completes every queued op (unless stalled); returns how many. */
static inline int pump(fake_be *f)
{
    if (f->mode == MODE_STALL)
        return 0;
    static fake_op ops[4096]; /* pump runs on the test's thread only */
    pthread_mutex_lock(&fake_mu);
    int n = f->nq;
    memcpy(ops, f->q, (size_t)n * sizeof *ops);
    f->nq = 0;
    pthread_mutex_unlock(&fake_mu);
    for (int i = 0; i < n; i++) {
        fake_op *o = &ops[i];
        bool ok = false;
        pthread_mutex_lock(&fake_mu);
        if (f->mode == MODE_OK && o->kind == 1) {
            fake_entry *e = find(f, o->key);
            if (!e) {
                e = &f->e[f->ne++];
                memcpy(e->key, o->key, KV_RECALL_KEY_BYTES);
            } else {
                free(e->val);
            }
            e->val = malloc(o->len);
            memcpy(e->val, o->buf, o->len);
            e->len = o->len;
            ok = true;
        } else if (f->mode == MODE_OK && o->kind == 2) {
            fake_entry *e = find(f, o->key);
            if (e && e->len == o->len) {
                memcpy(o->buf, e->val, o->len);
                ok = true;
            }
        }
        pthread_mutex_unlock(&fake_mu); /* done may delete (fake_del locks) */
        o->done(o->arg, ok);
    }
    return n;
}

static inline kv_recall_backend backend_of(fake_be *f)
{
    return (kv_recall_backend){fake_put, fake_get, fake_del, f};
}

#endif
