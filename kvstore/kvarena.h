/*
 * kvarena.h - private to kvstore/: a buddy allocator over one memfd-backed
 * shared-memory region, where the KV store daemon keeps its values.
 *
 * Same-host clients map the memfd read-only, so a get becomes a plain copy
 * out of the mapping. The arena owns the region (and the fd) and hands out
 * power-of-two blocks of it; its own bookkeeping never lives in the region.
 *
 * Not thread-safe: the caller holds its own lock around every call.
 */
#ifndef ENTROKV_KVARENA_H
#define ENTROKV_KVARENA_H

#include <stddef.h>

#include "entrokv/status.h"

typedef struct kvarena kvarena;

#define KVARENA_MIN_ORDER 12 /* smallest block: 4 KiB (one page) */
#define KVARENA_MAX_ORDER 26 /* largest block: 64 MiB */

/* The largest region: pages are named by uint32_t indices (UINT32_MAX is
 * the free lists' sentinel), in whole 64 MiB top blocks: 16 TiB - 64 MiB. */
#define KVARENA_MAX_BYTES (((size_t)1 << 44) - ((size_t)1 << KVARENA_MAX_ORDER))

/* A region of at least `bytes` (rounded up to a whole number of 64 MiB top
 * blocks), backed by a memfd and mapped shared, read-write. Pages are only
 * touched when used. NULL and err on failure (bytes 0 or above
 * KVARENA_MAX_BYTES, out of memory, or a system call failing). */
kvarena *kvarena_create(size_t bytes, ekv_error *err);
/* Unmaps the region and closes the memfd (clients' mappings stay valid).
 * NULL is ok. */
void kvarena_destroy(kvarena *a);

/* A block of at least n bytes (1 <= n <= 64 MiB), aligned to its own size
 * (so at least to 4 KiB). NULL when n is out of range or no free block is
 * large enough (the caller evicts and retries). *block_bytes (if not NULL)
 * gets the block's size, a power of two. The block's bytes are whatever was
 * there last: a fresh page reads as zeros, a reused block as its old value. */
void *kvarena_alloc(kvarena *a, size_t n, size_t *block_bytes);
/* Returns a block from kvarena_alloc, merging it with its free buddy as far
 * as it goes. p must be a live block of this arena (asserted in debug
 * builds, and in this project's Release, which keeps asserts); NULL is ok. */
void kvarena_free(kvarena *a, void *p);

void *kvarena_base(const kvarena *a);
size_t kvarena_size(const kvarena *a); /* bytes mapped */
int kvarena_fd(const kvarena *a);      /* the memfd, for /proc/<pid>/fd/<fd> */
size_t kvarena_free_bytes(const kvarena *a); /* for tests and stats */

#endif
