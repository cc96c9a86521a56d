/*
 * kvarena.c - a buddy allocator over one memfd-backed shared-memory region.
 *
 * The region is a whole number of 64 MiB top blocks; every block is a power
 * of two from 4 KiB to 64 MiB at an offset that is a multiple of its size,
 * so a block's buddy is at offset ^ size and always inside the region.
 *
 * Clients can read the region, so all bookkeeping is in private malloc'd
 * memory: per 4 KiB page, state[] holds the order of the block starting
 * there (with ST_FREE while it is free) or ST_INNER for any page that does
 * not start a block; free blocks of each order form a doubly linked list of
 * page indices through next[] / prev[]. Alloc and free then do a constant
 * amount of work per order and never search. Lists are LIFO, so a freed
 * block is the next one handed out and its pages are already resident.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memfd_create */
#endif
#include "kvarena.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE_SHIFT KVARENA_MIN_ORDER
#define N_ORDERS (KVARENA_MAX_ORDER - KVARENA_MIN_ORDER + 1)
#define TOP_BYTES ((size_t)1 << KVARENA_MAX_ORDER)
#define ST_FREE 0x80
#define ST_INNER 0xff /* never a valid order, with or without ST_FREE */
#define NIL UINT32_MAX

struct kvarena {
    uint8_t *base;
    size_t size, free_bytes;
    int fd;
    uint8_t *state;        /* per page: order | ST_FREE, or ST_INNER */
    uint32_t *next, *prev; /* per page, meaningful only for free block heads */
    uint32_t head[N_ORDERS]; /* free list per order, NIL when empty */
};

static uint32_t *list_head(kvarena *a, int order)
{
    return &a->head[order - KVARENA_MIN_ORDER];
}

/* Marks the block at page pg free and puts it first on its order's list. */
static void list_push(kvarena *a, int order, uint32_t pg)
{
    uint32_t *h = list_head(a, order);
    a->prev[pg] = NIL;
    a->next[pg] = *h;
    if (*h != NIL)
        a->prev[*h] = pg;
    *h = pg;
    a->state[pg] = (uint8_t)(ST_FREE | order);
}

/* Takes the block at page pg off its list; the caller sets its state. */
static void list_unlink(kvarena *a, int order, uint32_t pg)
{
    uint32_t n = a->next[pg], p = a->prev[pg];
    if (p != NIL)
        a->next[p] = n;
    else
        *list_head(a, order) = n;
    if (n != NIL)
        a->prev[n] = p;
}

/* Pages spanned by a block of this order. */
static uint32_t order_pages(int order)
{
    return (uint32_t)1 << (order - PAGE_SHIFT);
}

kvarena *kvarena_create(size_t bytes, ekv_error *err)
{
    if (bytes == 0 || bytes > KVARENA_MAX_BYTES) {
        ekv_error_set(err, EKV_EINVAL, "kvarena: size %zu is out of range (1 to %zu bytes)",
                      bytes, (size_t)KVARENA_MAX_BYTES);
        return NULL;
    }
    size_t size = (bytes + TOP_BYTES - 1) / TOP_BYTES * TOP_BYTES;
    size_t npages = size >> PAGE_SHIFT;

    kvarena *a = calloc(1, sizeof *a);
    if (!a) {
        ekv_error_set(err, EKV_ENOMEM, "kvarena: out of memory");
        return NULL;
    }
    a->fd = -1;
    a->state = malloc(npages);
    a->next = malloc(npages * sizeof *a->next);
    a->prev = malloc(npages * sizeof *a->prev);
    if (!a->state || !a->next || !a->prev) {
        ekv_error_set(err, EKV_ENOMEM, "kvarena: out of memory for the metadata of %zu pages",
                      npages);
        goto fail;
    }
    a->fd = memfd_create("entrokv-kvstore", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (a->fd < 0) {
        ekv_error_set(err, EKV_EIO, "kvarena: memfd_create: %s", strerror(errno));
        goto fail;
    }
    /* A sparse file: tmpfs allocates a page on its first touch. */
    if (ftruncate(a->fd, (off_t)size) != 0) {
        ekv_error_set(err, EKV_EIO, "kvarena: ftruncate to %zu bytes: %s", size,
                      strerror(errno));
        goto fail;
    }
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
    if (m == MAP_FAILED) {
        ekv_error_set(err, EKV_EIO, "kvarena: mmap of %zu bytes: %s", size, strerror(errno));
        goto fail;
    }
    /* Only this mapping may write: once sealed, the kernel refuses every new
     * writable mapping and write(2) of the file, so a client that opens it
     * through /proc/<pid>/fd (even read-write) can map it read-only only
     * (docs/kvstore.md, "Threat model"). Sealing also forbids growing or
     * shrinking it, which nothing here does. */
    if (fcntl(a->fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_GROW | F_SEAL_SHRINK |
                                      F_SEAL_SEAL) != 0) {
        ekv_error_set(err, EKV_EIO, "kvarena: sealing the region: %s", strerror(errno));
        munmap(m, size);
        goto fail;
    }
    a->base = m;
    a->size = a->free_bytes = size;

    memset(a->state, ST_INNER, npages);
    for (int i = 0; i < N_ORDERS; i++)
        a->head[i] = NIL;
    /* Pushed last to first, so the first allocations come from offset 0. */
    for (size_t t = size / TOP_BYTES; t-- > 0;)
        list_push(a, KVARENA_MAX_ORDER, (uint32_t)(t * order_pages(KVARENA_MAX_ORDER)));
    return a;

fail:
    kvarena_destroy(a);
    return NULL;
}

void kvarena_destroy(kvarena *a)
{
    if (!a)
        return;
    if (a->base)
        munmap(a->base, a->size);
    if (a->fd >= 0)
        close(a->fd);
    free(a->state);
    free(a->next);
    free(a->prev);
    free(a);
}

void *kvarena_alloc(kvarena *a, size_t n, size_t *block_bytes)
{
    if (n == 0 || n > TOP_BYTES)
        return NULL;
    int want = KVARENA_MIN_ORDER;
    while (((size_t)1 << want) < n)
        want++;
    int order = want;
    while (order <= KVARENA_MAX_ORDER && *list_head(a, order) == NIL)
        order++;
    if (order > KVARENA_MAX_ORDER)
        return NULL;

    uint32_t pg = *list_head(a, order);
    list_unlink(a, order, pg);
    /* Keep the lower half, free the upper one, until the block fits n. */
    while (order > want) {
        order--;
        list_push(a, order, pg + order_pages(order));
    }
    a->state[pg] = (uint8_t)order;
    a->free_bytes -= (size_t)1 << order;
    if (block_bytes)
        *block_bytes = (size_t)1 << order;
    return a->base + ((size_t)pg << PAGE_SHIFT);
}

void kvarena_free(kvarena *a, void *p)
{
    if (!p)
        return;
    size_t off = (size_t)((uintptr_t)p - (uintptr_t)a->base);
    assert((uintptr_t)p >= (uintptr_t)a->base && off < a->size);
    assert(off % ((size_t)1 << PAGE_SHIFT) == 0);
    uint32_t pg = (uint32_t)(off >> PAGE_SHIFT);
    int order = a->state[pg];
    /* Not a block head (ST_INNER) and not already free (ST_FREE). */
    assert(order >= KVARENA_MIN_ORDER && order <= KVARENA_MAX_ORDER);
    a->free_bytes += (size_t)1 << order;

    while (order < KVARENA_MAX_ORDER) {
        uint32_t buddy = pg ^ order_pages(order);
        if (a->state[buddy] != (ST_FREE | order))
            break; /* in use, or split into smaller blocks */
        list_unlink(a, order, buddy);
        /* The merged block starts at the lower of the two pages. */
        a->state[pg > buddy ? pg : buddy] = ST_INNER;
        pg = pg < buddy ? pg : buddy;
        order++;
    }
    list_push(a, order, pg);
}

void *kvarena_base(const kvarena *a)
{
    return a->base;
}

size_t kvarena_size(const kvarena *a)
{
    return a->size;
}

int kvarena_fd(const kvarena *a)
{
    return a->fd;
}

size_t kvarena_free_bytes(const kvarena *a)
{
    return a->free_bytes;
}
