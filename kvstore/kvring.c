/*
 * kvring.c - consistent hashing (Karger et al., STOC 1997) with virtual
 * nodes: each node owns vnodes points on a 64-bit ring, a key belongs to the
 * first point at or after its own (wrapping). Adding or removing a node
 * moves only the keys whose successor point changes, about 1/N of them,
 * and virtual nodes even out the arc lengths.
 *
 * A point is the first 8 bytes of SHA-256("ekv-ring1" || name || vnode
 * index), so every process with the same membership builds the same ring.
 * The points are kept sorted; lookup is a binary search.
 */
#include "entrokv/kvstore.h"

#include <stdlib.h>
#include <string.h>

#include "entrokv/sha256.h"

typedef struct ring_point {
    uint64_t point;
    int id;
} ring_point;

struct kvstore_ring {
    int vnodes;
    ring_point *pts;
    size_t n, cap;
    int n_nodes;
};

kvstore_ring *kvstore_ring_create(int vnodes_per_node, ekv_error *err)
{
    if (vnodes_per_node <= 0 || vnodes_per_node > 4096) {
        ekv_error_set(err, EKV_EINVAL, "kvstore ring: %d virtual nodes per node (1..4096)",
                      vnodes_per_node);
        return NULL;
    }
    kvstore_ring *r = calloc(1, sizeof *r);
    if (!r) {
        ekv_error_set(err, EKV_ENOMEM, "kvstore ring: out of memory");
        return NULL;
    }
    r->vnodes = vnodes_per_node;
    return r;
}

void kvstore_ring_destroy(kvstore_ring *r)
{
    if (!r)
        return;
    free(r->pts);
    free(r);
}

static uint64_t load_u64(const uint8_t *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

static uint64_t vnode_point(const char *name, int i)
{
    uint8_t d[32], idx[4] = {(uint8_t)i, (uint8_t)(i >> 8), (uint8_t)(i >> 16), 0};
    ekv_sha256 s;
    sha256_init(&s);
    sha256_update(&s, "ekv-ring1", 9);
    sha256_update(&s, name, strlen(name) + 1); /* the NUL separates name from index */
    sha256_update(&s, idx, sizeof idx);
    sha256_final(&s, d);
    return load_u64(d);
}

static int cmp_point(const void *a, const void *b)
{
    const ring_point *x = a, *y = b;
    if (x->point != y->point)
        return x->point < y->point ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id); /* ties: deterministic */
}

ekv_status kvstore_ring_add(kvstore_ring *r, const char *name, int id, ekv_error *err)
{
    if (id < 0 || !name)
        return ekv_error_set(err, EKV_EINVAL, "kvstore ring: bad node");
    for (size_t i = 0; i < r->n; i++)
        if (r->pts[i].id == id)
            return ekv_error_set(err, EKV_EINVAL, "kvstore ring: node %d already present", id);
    if (r->n + (size_t)r->vnodes > r->cap) {
        size_t cap = (r->n + (size_t)r->vnodes) * 2;
        ring_point *p = realloc(r->pts, cap * sizeof *p);
        if (!p)
            return ekv_error_set(err, EKV_ENOMEM, "kvstore ring: out of memory");
        r->pts = p;
        r->cap = cap;
    }
    for (int i = 0; i < r->vnodes; i++)
        r->pts[r->n++] = (ring_point){vnode_point(name, i), id};
    qsort(r->pts, r->n, sizeof *r->pts, cmp_point);
    r->n_nodes++;
    return EKV_OK;
}

void kvstore_ring_remove(kvstore_ring *r, int id)
{
    size_t k = 0;
    for (size_t i = 0; i < r->n; i++)
        if (r->pts[i].id != id)
            r->pts[k++] = r->pts[i];
    if (k != r->n)
        r->n_nodes--;
    r->n = k;
}

int kvstore_ring_nodes(const kvstore_ring *r)
{
    return r->n_nodes;
}

int kvstore_ring_lookup(const kvstore_ring *r, const kvstore_key *key)
{
    if (!r || r->n == 0)
        return -1;
    uint64_t h = load_u64(key->b);
    size_t lo = 0, hi = r->n; /* first point >= h */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (r->pts[mid].point < h)
            lo = mid + 1;
        else
            hi = mid;
    }
    return r->pts[lo == r->n ? 0 : lo].id;
}
