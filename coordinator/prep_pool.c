/*
 * prep_pool.c - a few threads that run request preparation (chat
 * rendering, tokenization, checks) for the gRPC server, so its one
 * completion-queue thread never waits for a large prompt's tokenizer and
 * an unrelated call's messages keep flowing (see grpc_internal.h).
 *
 * Jobs run in arrival order on whichever thread is free; with two threads
 * one huge prompt holds only one of them. --max-prompt-bytes bounds what
 * one job can cost.
 */
#include <stdlib.h>

#include "grpc_internal.h"

struct prep_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    prep_job *head, *tail;
    bool stop;
    int n_threads;
    pthread_t threads[PREP_MAX_THREADS];
};

static void *prep_main(void *arg)
{
    prep_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->head && !p->stop)
            pthread_cond_wait(&p->cv, &p->mu);
        prep_job *j = p->head;
        if (!j)
            break; /* stop, and nothing left to run */
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->mu);
        j->run(j);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

prep_pool *prep_pool_create(int n_threads)
{
    prep_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (n_threads > PREP_MAX_THREADS)
        n_threads = PREP_MAX_THREADS;
    for (int i = 0; i < n_threads; i++)
        if (pthread_create(&p->threads[p->n_threads], NULL, prep_main, p) == 0)
            p->n_threads++;
    if (p->n_threads == 0) {
        prep_pool_free(p);
        return NULL;
    }
    return p;
}

void prep_pool_submit(prep_pool *p, prep_job *j)
{
    j->next = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void prep_pool_free(prep_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL); /* each runs what is queued first */
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}
