/*
 * kvcache.c - block pool and per-(layer, KV head) block tables.
 *
 * Pool memory is one allocation of n_blocks fixed-size blocks, laid out as
 * [K][V rows][positions] per block, K transposed ([head_dim][block_tokens],
 * the layout kern_kv_view documents: attention scores a block's tokens in
 * SIMD lanes); free blocks sit on a stack of ids. A block is zeroed when a
 * head takes it, so its unused rows are never uninitialised (after a keep
 * they may hold rows of dropped tokens: finite, and past n_tokens).
 * Each head of a sequence keeps parallel arrays of block ids and of K / V /
 * position pointers, so a kern_kv_view is built without copying.
 *
 * Sharing: every block has a reference count (the heads whose tables hold
 * it). kv_seq_fork makes a second table over the same blocks; a block held
 * more than once is read-only, and whatever would write into it (an append
 * into a partly filled last block, keep's compaction, insert) first gives
 * the writing head a private copy (kv_block_own: copy-on-write). A block goes
 * back to the free stack when its last holder drops it.
 */
#include "entrokv/kvcache.h"

#include "kvcache_int.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

kv_pool *kv_pool_create(int32_t block_tokens, int32_t head_dim, int64_t n_blocks, ekv_error *err)
{
    if (block_tokens <= 0 || head_dim <= 0 || n_blocks <= 0 || n_blocks > INT32_MAX ||
        block_tokens > 4096 || head_dim > 4096) {
        ekv_error_set(err, EKV_EINVAL, "kv pool: bad geometry (%d tokens x %d dims x %lld blocks)",
                      block_tokens, head_dim, (long long)n_blocks);
        return NULL;
    }
    kv_pool *pool = calloc(1, sizeof *pool);
    if (!pool)
        goto nomem;
    pool->block_tokens = block_tokens;
    pool->head_dim = head_dim;
    pool->n_blocks = n_blocks;
    /* K and V rows, then positions; rounded up to 64 bytes per block */
    size_t bytes = 2 * (size_t)block_tokens * head_dim * sizeof(ekv_f16) +
                   (size_t)block_tokens * sizeof(int32_t);
    pool->block_bytes = (bytes + 63) & ~(size_t)63;
    if ((size_t)n_blocks > SIZE_MAX / pool->block_bytes)
        goto nomem;
    pool->mem = aligned_alloc(64, (size_t)n_blocks * pool->block_bytes);
    pool->free_ids = malloc((size_t)n_blocks * sizeof *pool->free_ids);
    pool->refs = calloc((size_t)n_blocks, sizeof *pool->refs);
    if (!pool->mem || !pool->free_ids || !pool->refs)
        goto nomem;
    if (!(pool->pins_ok = kv_pins_init(&pool->pins)))
        goto nomem;
    /* pop order = 0, 1, 2, ... so a fresh pool hands out consecutive blocks */
    for (int64_t i = 0; i < n_blocks; i++)
        pool->free_ids[i] = (int32_t)(n_blocks - 1 - i);
    pool->n_free = n_blocks;
    return pool;
nomem:
    kv_pool_destroy(pool);
    ekv_error_set(err, EKV_ENOMEM, "kv pool: cannot allocate %lld blocks", (long long)n_blocks);
    return NULL;
}

void kv_pool_destroy(kv_pool *pool)
{
    if (!pool)
        return;
    if (pool->pins_ok)
        kv_pins_fini(pool, &pool->pins); /* waits for pins still being copied */
    free(pool->mem);
    free(pool->free_ids);
    free(pool->refs);
    free(pool);
}

int64_t kv_pool_total_blocks(const kv_pool *pool) { return pool->n_blocks; }
int64_t kv_pool_free_blocks(const kv_pool *pool) { return pool->n_free; }
int32_t kv_pool_block_tokens(const kv_pool *pool) { return pool->block_tokens; }
size_t kv_pool_block_bytes(const kv_pool *pool) { return pool->block_bytes; }
int64_t kv_pool_shared_blocks(const kv_pool *pool) { return pool->n_shared; }
uint64_t kv_pool_cow_copies(const kv_pool *pool) { return pool->n_cow; }

void kv_pool_set_recall_tier(kv_pool *pool, kv_recall_tier *tier) { pool->recall_tier = tier; }

void kv_pool_set_evict_hook(kv_pool *pool, kv_evict_fn fn, void *ctx)
{
    pool->evict = fn;
    pool->evict_ctx = ctx;
}

static void block_ref(kv_pool *pool, int32_t id)
{
    if (++pool->refs[id] == 2)
        pool->n_shared++;
}

/* Drops one holder of block id; the last one returns it to the pool. */
static void block_unref(kv_pool *pool, int32_t id)
{
    if (pool->refs[id] == 2)
        pool->n_shared--;
    if (--pool->refs[id] == 0)
        pool->free_ids[pool->n_free++] = id;
}

kv_pin_state *kv_pool_pin_state(kv_pool *pool) { return &pool->pins; }
uint8_t *kv_pool_block_mem(const kv_pool *pool, int32_t id) { return block_base(pool, id); }
void kv_pool_block_ref(kv_pool *pool, int32_t id) { block_ref(pool, id); }
void kv_pool_block_unref(kv_pool *pool, int32_t id) { block_unref(pool, id); }

static int32_t block_pop(kv_pool *pool)
{
    const int32_t id = pool->free_ids[--pool->n_free];
    pool->refs[id] = 1;
    return id;
}

static void head_set_block(const kv_pool *pool, kv_head *h, int32_t b, int32_t id)
{
    h->ids[b] = id;
    h->k[b] = block_k(pool, id);
    h->v[b] = block_v(pool, id);
    h->pos[b] = block_pos(pool, id);
}

/* Copy-on-write (kvcache_int.h). */
void kv_block_own(kv_pool *pool, kv_head *h, int32_t b)
{
    const int32_t old = h->ids[b];
    if (pool->refs[old] <= 1)
        return;
    const int32_t id = block_pop(pool);
    memcpy(block_base(pool, id), block_base(pool, old), pool->block_bytes);
    block_unref(pool, old);
    head_set_block(pool, h, b, id);
    pool->n_cow++;
}

/* Blocks among h's [from, to) that others hold too: what writing them costs. */
static int64_t head_shared_in(const kv_pool *pool, const kv_head *h, int32_t from, int32_t to)
{
    int64_t n = 0;
    for (int32_t b = from < 0 ? 0 : from; b < to && b < h->n_blocks; b++)
        n += pool->refs[h->ids[b]] > 1;
    return n;
}

kv_seq *kv_seq_create(kv_pool *pool, int32_t n_layers, int32_t n_kv_heads, ekv_error *err)
{
    if (!pool || n_layers <= 0 || n_kv_heads <= 0 || n_layers > 4096 || n_kv_heads > 4096) {
        ekv_error_set(err, EKV_EINVAL, "kv seq: bad shape (%d layers x %d heads)", n_layers,
                      n_kv_heads);
        return NULL;
    }
    kv_seq *seq = calloc(1, sizeof *seq);
    if (!seq)
        goto nomem;
    seq->pool = pool;
    seq->n_layers = n_layers;
    seq->n_kv_heads = n_kv_heads;
    seq->heads = calloc((size_t)n_layers * n_kv_heads, sizeof *seq->heads);
    if (!seq->heads)
        goto nomem;
    return seq;
nomem:
    free(seq);
    ekv_error_set(err, EKV_ENOMEM, "kv seq: out of memory");
    return NULL;
}

static void head_release(kv_pool *pool, kv_head *h)
{
    for (int32_t b = 0; b < h->n_blocks; b++)
        block_unref(pool, h->ids[b]);
    free(h->ids);
    free(h->k);
    free(h->v);
    free(h->pos);
    free(h->p_rows);
    free(h->p_v);
    free(h->p_pos);
    free(h->p_inv_sqrt_c);
    memset(h, 0, sizeof *h);
}

void kv_seq_free(kv_seq *seq)
{
    if (!seq)
        return;
    for (int32_t i = 0; i < seq->n_layers * seq->n_kv_heads; i++)
        head_release(seq->pool, &seq->heads[i]);
    kv_recall_free(seq->recall);
    free(seq->heads);
    free(seq);
}

int64_t kv_seq_blocks_needed(const kv_seq *seq, int32_t n_tokens)
{
    const int32_t bt = seq->pool->block_tokens;
    int64_t need = 0;
    for (int32_t i = 0; i < seq->n_layers * seq->n_kv_heads; i++) {
        const kv_head *h = &seq->heads[i];
        int64_t room = (int64_t)h->n_blocks * bt - h->n_tokens;
        if (n_tokens > room)
            need += (n_tokens - room + bt - 1) / bt;
        if (n_tokens > 0 && room > 0) /* a shared last block is copied first */
            need += head_shared_in(seq->pool, h, h->n_blocks - 1, h->n_blocks);
    }
    return need;
}

static int head_grow(kv_head *h)
{
    int32_t cap = h->cap ? h->cap * 2 : 8;
    int32_t *ids = realloc(h->ids, (size_t)cap * sizeof *ids);
    if (ids)
        h->ids = ids;
    const ekv_f16 **k = realloc(h->k, (size_t)cap * sizeof *k);
    if (k)
        h->k = k;
    const ekv_f16 **v = realloc(h->v, (size_t)cap * sizeof *v);
    if (v)
        h->v = v;
    const int32_t **pos = realloc(h->pos, (size_t)cap * sizeof *pos);
    if (pos)
        h->pos = pos;
    if (!ids || !k || !v || !pos)
        return 0;
    h->cap = cap;
    return 1;
}

/* Moves a free block to the end of h's table (the caller checked that the
 * pool has one and the table has room); returns its id. */
static int32_t head_take_block(kv_pool *pool, kv_head *h)
{
    const int32_t id = block_pop(pool);
    head_set_block(pool, h, h->n_blocks++, id);
    return id;
}

ekv_status kv_seq_append(kv_seq *seq, int32_t layer, int32_t head, const float *k, const float *v,
                         int32_t pos, ekv_error *err)
{
    kv_pool *pool = seq->pool;
    kv_head *h = head_at(seq, layer, head);
    const int32_t bt = pool->block_tokens, d = pool->head_dim;
    if (h->n_tokens == h->n_blocks * bt) {
        if (pool->n_free == 0)
            return ekv_error_set(err, EKV_ENOMEM, "kv pool exhausted (%lld blocks)",
                                 (long long)pool->n_blocks);
        if (h->n_blocks == h->cap && !head_grow(h))
            return ekv_error_set(err, EKV_ENOMEM, "kv seq: out of memory for block table");
        memset(block_base(pool, head_take_block(pool, h)), 0, pool->block_bytes);
    } else if (pool->refs[h->ids[h->n_blocks - 1]] > 1) { /* shared: copy before writing */
        if (pool->n_free == 0)
            return ekv_error_set(err, EKV_ENOMEM, "kv pool exhausted (%lld blocks)",
                                 (long long)pool->n_blocks);
        kv_block_own(pool, h, h->n_blocks - 1);
    }
    const int32_t b = h->ids[h->n_tokens / bt], r = h->n_tokens % bt;
    ekv_f16 *kd = block_k(pool, b) + r; /* column r of [head_dim][block_tokens] */
    ekv_f16 *vd = block_v(pool, b) + (size_t)r * d;
    ekv_f32_to_f16_n(v, vd, (size_t)d);
    ekv_f16 kh[64]; /* K is a column: converted in runs, then spread */
    for (int32_t j0 = 0; j0 < d; j0 += 64) {
        const int32_t nj = d - j0 < 64 ? d - j0 : 64;
        ekv_f32_to_f16_n(k + j0, kh, (size_t)nj);
        for (int32_t j = 0; j < nj; j++)
            kd[(size_t)(j0 + j) * bt] = kh[j];
    }
    block_pos(pool, b)[r] = pos;
    h->n_tokens++;
    if (pos >= seq->next_pos)
        seq->next_pos = pos + 1;
    return EKV_OK;
}

int32_t kv_seq_len(const kv_seq *seq, int32_t layer, int32_t head)
{
    const kv_head *h = head_at(seq, layer, head);
    return h->packed.n + h->n_tokens;
}

int32_t kv_seq_n_layers(const kv_seq *seq) { return seq->n_layers; }
int32_t kv_seq_n_kv_heads(const kv_seq *seq) { return seq->n_kv_heads; }

int32_t kv_seq_next_pos(const kv_seq *seq)
{
    return seq->next_pos;
}

int32_t kv_seq_max_len(const kv_seq *seq)
{
    int32_t n = 0;
    for (int32_t i = 0; i < seq->n_layers * seq->n_kv_heads; i++)
        if (seq->heads[i].packed.n + seq->heads[i].n_tokens > n)
            n = seq->heads[i].packed.n + seq->heads[i].n_tokens;
    return n;
}

kv_pool *kv_seq_pool(const kv_seq *seq)
{
    return seq->pool;
}

int64_t kv_seq_blocks(const kv_seq *seq)
{
    int64_t n = 0;
    for (int32_t i = 0; i < seq->n_layers * seq->n_kv_heads; i++)
        n += seq->heads[i].n_blocks;
    return n;
}

int64_t kv_seq_packed_bytes(const kv_seq *seq)
{
    const size_t d = (size_t)seq->pool->head_dim;
    int64_t b = 0;
    for (int32_t i = 0; i < seq->n_layers * seq->n_kv_heads; i++) {
        const kv_head *h = &seq->heads[i];
        if (h->packed.n)
            b += (int64_t)(h->packed.n * (h->packed.row_bytes + d * sizeof(ekv_f16) +
                                          sizeof(int32_t)) +
                           (h->p_inv_sqrt_c ? d * sizeof(float) : 0));
    }
    return b;
}

int64_t kv_seq_bytes(const kv_seq *seq)
{
    return kv_seq_blocks(seq) * (int64_t)seq->pool->block_bytes + kv_seq_packed_bytes(seq);
}

/* The view of the blocks alone (what eviction hooks and block code see). */
static void blocks_view(const kv_seq *seq, const kv_head *h, kern_kv_view *view)
{
    view->n_tokens = h->n_tokens;
    view->block_tokens = seq->pool->block_tokens;
    view->head_dim = seq->pool->head_dim;
    view->k_blocks = h->k;
    view->v_blocks = h->v;
    view->pos_blocks = h->pos;
    view->packed = NULL;
}

void kv_seq_view(const kv_seq *seq, int32_t layer, int32_t head, kern_kv_view *view)
{
    const kv_head *h = head_at(seq, layer, head);
    blocks_view(seq, h, view);
    if (h->packed.n) {
        view->n_tokens += h->packed.n;
        view->packed = &h->packed;
    }
}

ekv_status kv_seq_pack(kv_seq *seq, int32_t layer, int32_t head, int32_t n_keep,
                       const uint8_t *masks, const float *m, const float *inv_sqrt_c,
                       ekv_error *err)
{
    kv_pool *pool = seq->pool;
    kv_head *h = head_at(seq, layer, head);
    const int32_t bt = pool->block_tokens, d = pool->head_dim, n = h->n_tokens;
    const size_t mb = ((size_t)d + 7) / 8;
    if (h->packed.n)
        return ekv_error_set(err, EKV_EINVAL, "kv pack: head %d/%d is packed already", layer,
                             head);
    if (n_keep < 0 || n_keep > d || d > 512)
        return ekv_error_set(err, EKV_EINVAL, "kv pack: %d of %d channels", n_keep, d);
    for (int32_t t = 0; t < n; t++) {
        int32_t kept = 0;
        for (int32_t j = 0; j < d; j++)
            kept += masks[(size_t)t * mb + (size_t)j / 8] >> (j % 8) & 1;
        if (kept != n_keep || !isfinite(m[t]) || m[t] < 0)
            return ekv_error_set(err, EKV_EINVAL, "kv pack: token %d keeps %d channels, m %g", t,
                                 kept, (double)m[t]);
    }
    if (n == 0)
        return EKV_OK;
    const size_t rb = kern_packed_row_bytes(d, n_keep);
    uint8_t *rows = malloc((size_t)n * rb);
    ekv_f16 *v = malloc((size_t)n * d * sizeof *v);
    int32_t *pos = malloc((size_t)n * sizeof *pos);
    float *isc = inv_sqrt_c ? malloc((size_t)d * sizeof *isc) : NULL;
    float k[512];
    if (!rows || !v || !pos || (inv_sqrt_c && !isc)) {
        free(rows);
        free(v);
        free(pos);
        free(isc);
        return ekv_error_set(err, EKV_ENOMEM, "kv pack: out of memory");
    }
    for (int32_t t = 0; t < n; t++) {
        const int32_t b = h->ids[t / bt], r = t % bt;
        const ekv_f16 *kb = block_k(pool, b) + r;
        for (int32_t j = 0; j < d; j++)
            k[j] = ekv_f16_to_f32(kb[(size_t)j * bt]);
        kern_packed_encode(rows + (size_t)t * rb, k, masks + (size_t)t * mb, m[t], d, n_keep);
        memcpy(v + (size_t)t * d, block_v(pool, b) + (size_t)r * d, (size_t)d * sizeof *v);
        pos[t] = block_pos(pool, b)[r];
    }
    if (isc)
        memcpy(isc, inv_sqrt_c, (size_t)d * sizeof *isc);
    for (int32_t b = 0; b < h->n_blocks; b++)
        block_unref(pool, h->ids[b]);
    h->n_blocks = 0;
    h->n_tokens = 0;
    h->p_rows = rows;
    h->p_v = v;
    h->p_pos = pos;
    h->p_inv_sqrt_c = isc;
    h->packed = (kern_kv_packed){.n = n, .n_keep = n_keep, .row_bytes = rb, .rows = rows,
                                 .v = v, .pos = pos, .inv_sqrt_c = isc};
    return EKV_OK;
}

/* Row src of head h to row dst (both within its blocks). */
static void row_move(kv_pool *pool, const kv_head *h, int32_t src, int32_t dst)
{
    const int32_t bt = pool->block_tokens, d = pool->head_dim;
    const int32_t sb = h->ids[src / bt], sr = src % bt, db = h->ids[dst / bt], dr = dst % bt;
    const ekv_f16 *ks = block_k(pool, sb) + sr;
    ekv_f16 *kd = block_k(pool, db) + dr;
    for (int32_t j = 0; j < d; j++) /* K is transposed: move a column */
        kd[(size_t)j * bt] = ks[(size_t)j * bt];
    memcpy(block_v(pool, db) + (size_t)dr * d, block_v(pool, sb) + (size_t)sr * d,
           (size_t)d * sizeof(ekv_f16));
    block_pos(pool, db)[dr] = block_pos(pool, sb)[sr];
}

static int32_t row_pos(const kv_pool *pool, const kv_head *h, int32_t row)
{
    return block_pos(pool, h->ids[row / pool->block_tokens])[row % pool->block_tokens];
}

int32_t kv_block_token(const kv_pool *pool, const void *block, int32_t row, ekv_f16 *k,
                       ekv_f16 *v)
{
    const int32_t bt = pool->block_tokens, d = pool->head_dim;
    const ekv_f16 *kb = block;
    const ekv_f16 *vb = kb + (size_t)bt * d;
    for (int32_t c = 0; c < d; c++)
        k[c] = kb[(size_t)c * bt + row];
    memcpy(v, vb + (size_t)row * d, (size_t)d * sizeof *v);
    int32_t pos;
    memcpy(&pos, (const uint8_t *)(vb + (size_t)bt * d) + (size_t)row * sizeof pos, sizeof pos);
    return pos;
}

int32_t kv_seq_positions(const kv_seq *seq, int32_t layer, int32_t head, int32_t *out)
{
    const kv_head *h = head_at(seq, layer, head);
    for (int32_t t = 0; t < h->packed.n; t++)
        out[t] = h->packed.pos[t];
    for (int32_t t = 0; t < h->n_tokens; t++)
        out[h->packed.n + t] = row_pos(seq->pool, h, t);
    return h->packed.n + h->n_tokens;
}

ekv_status kv_seq_insert(kv_seq *seq, int32_t layer, int32_t head, const ekv_f16 *k,
                         const ekv_f16 *v, const int32_t *pos, int32_t n, ekv_error *err)
{
    kv_pool *pool = seq->pool;
    kv_head *h = head_at(seq, layer, head);
    const int32_t bt = pool->block_tokens, d = pool->head_dim;
    if (n <= 0)
        return n == 0 ? EKV_OK : ekv_error_set(err, EKV_EINVAL, "kv insert: %d tokens", n);
    if (h->packed.n)
        return ekv_error_set(err, EKV_EUNSUPPORTED,
                             "kv insert: head %d/%d holds packed (SparK) keys", layer, head);
    if (seq->recall) { /* a promotion puts old positions among newer ones */
        kv_recall_stats st;
        kv_recall_get_stats(seq->recall, &st);
        if (st.promotions)
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "kv insert: recall promoted blocks, positions are not in order");
    }
    if (n > INT32_MAX - h->n_tokens)
        return ekv_error_set(err, EKV_EINVAL, "kv insert: too many tokens");
    /* positions increasing, and none the head already holds (both lists are sorted) */
    for (int32_t j = 0, i = 0; j < n; j++) {
        if (pos[j] < 0 || (j > 0 && pos[j] <= pos[j - 1]))
            return ekv_error_set(err, EKV_EINVAL, "kv insert: positions must be increasing");
        while (i < h->n_tokens && row_pos(pool, h, i) < pos[j])
            i++;
        if (i < h->n_tokens && row_pos(pool, h, i) == pos[j])
            return ekv_error_set(err, EKV_EINVAL, "kv insert: position %d is already held", pos[j]);
    }
    const int32_t m = h->n_tokens + n, blocks = (m + bt - 1) / bt;
    const int64_t cow = head_shared_in(pool, h, 0, h->n_blocks); /* the merge may move any row */
    if (blocks - h->n_blocks + cow > pool->n_free)
        return ekv_error_set(err, EKV_ENOMEM, "kv insert: needs %lld blocks, %lld free",
                             (long long)(blocks - h->n_blocks + cow), (long long)pool->n_free);
    while (h->cap < blocks)
        if (!head_grow(h))
            return ekv_error_set(err, EKV_ENOMEM, "kv seq: out of memory for block table");
    for (int32_t b = 0; b < h->n_blocks; b++)
        kv_block_own(pool, h, b);
    while (h->n_blocks < blocks)
        memset(block_base(pool, head_take_block(pool, h)), 0, pool->block_bytes);
    /* merge from the back: row w is always at or past every row still to be read */
    int32_t i = h->n_tokens - 1, j = n - 1;
    for (int32_t w = m - 1; j >= 0; w--) {
        if (i >= 0 && row_pos(pool, h, i) > pos[j]) {
            row_move(pool, h, i--, w);
            continue;
        }
        const int32_t b = h->ids[w / bt], r = w % bt;
        ekv_f16 *kd = block_k(pool, b) + r;
        for (int32_t c = 0; c < d; c++)
            kd[(size_t)c * bt] = k[(size_t)j * d + c];
        memcpy(block_v(pool, b) + (size_t)r * d, v + (size_t)j * d, (size_t)d * sizeof(ekv_f16));
        block_pos(pool, b)[r] = pos[j];
        if (pos[j] >= seq->next_pos)
            seq->next_pos = pos[j] + 1;
        j--;
    }
    h->n_tokens = m;
    return EKV_OK;
}

/* The slots of h that keep[] (ascending) leaves out: what the recall store
 * and the eviction hook are given. */
static ekv_status dropped_slots(const kv_head *h, const int32_t *keep, int32_t n_keep,
                                int32_t **out, int32_t *n_out, ekv_error *err)
{
    int32_t *dropped = malloc((size_t)(h->n_tokens - n_keep) * sizeof *dropped);
    if (!dropped)
        return ekv_error_set(err, EKV_ENOMEM, "kv keep: out of memory");
    int32_t n_dropped = 0;
    for (int32_t t = 0, i = 0; t < h->n_tokens; t++) {
        if (i < n_keep && keep[i] == t)
            i++;
        else
            dropped[n_dropped++] = t;
    }
    *out = dropped;
    *n_out = n_dropped;
    return EKV_OK;
}

ekv_status kv_seq_keep(kv_seq *seq, int32_t layer, int32_t head, const int32_t *keep,
                       int32_t n_keep, ekv_error *err)
{
    kv_pool *pool = seq->pool;
    kv_head *h = head_at(seq, layer, head);
    const int32_t bt = pool->block_tokens, np = h->packed.n;
    if (n_keep < 0 || n_keep > np + h->n_tokens)
        return ekv_error_set(err, EKV_EINVAL, "kv keep: %d of %d tokens", n_keep,
                             np + h->n_tokens);
    for (int32_t i = 0; i < n_keep; i++)
        if (keep[i] < 0 || keep[i] >= np + h->n_tokens || (i > 0 && keep[i] <= keep[i - 1]))
            return ekv_error_set(err, EKV_EINVAL,
                                 "kv keep: indices must be increasing and in [0, %d)",
                                 np + h->n_tokens);
    if (np) { /* packed tokens stay; the rest are indices into the blocks */
        if (n_keep < np || keep[np - 1] != np - 1)
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "kv keep: head %d/%d cannot drop packed (SparK) tokens", layer,
                                 head);
        keep += np;
        n_keep -= np;
        int32_t *rel = malloc(((size_t)n_keep + 1) * sizeof *rel);
        if (!rel)
            return ekv_error_set(err, EKV_ENOMEM, "kv keep: out of memory");
        for (int32_t i = 0; i < n_keep; i++)
            rel[i] = keep[i] - np;
        h->packed.n = 0; /* the blocks alone, then the prefix back */
        const ekv_status rc = kv_seq_keep(seq, layer, head, rel, n_keep, err);
        h->packed.n = np;
        free(rel);
        return rc;
    }
    /* compaction writes from the first moved row on: those blocks must be
     * this head's own (checked before anything changes) */
    int32_t first_move = n_keep;
    for (int32_t i = 0; i < n_keep; i++)
        if (keep[i] != i) {
            first_move = i;
            break;
        }
    const int32_t blocks_kept = (n_keep + bt - 1) / bt;
    const int64_t cow = head_shared_in(pool, h, first_move / bt, blocks_kept);
    if (cow > pool->n_free)
        return ekv_error_set(err, EKV_ENOMEM, "kv keep: copy-on-write needs %lld blocks, %lld free",
                             (long long)cow, (long long)pool->n_free);
    if ((seq->recall || pool->evict) && n_keep < h->n_tokens) {
        /* before anything moves: the recall copy may fail, nothing changed yet */
        int32_t *dropped = NULL, n_dropped = 0;
        ekv_status rc = dropped_slots(h, keep, n_keep, &dropped, &n_dropped, err);
        if (rc)
            return rc;
        kern_kv_view view;
        blocks_view(seq, h, &view);
        if (seq->recall)
            rc = kv_recall_add(seq->recall, layer, head, &view, dropped, n_dropped, err);
        if (!rc && pool->evict)
            pool->evict(pool->evict_ctx, seq, layer, head, &view, dropped, n_dropped);
        free(dropped);
        if (rc)
            return rc;
    }
    for (int32_t b = first_move / bt; b < blocks_kept; b++)
        kv_block_own(pool, h, b);
    /* keep[i] >= i, so compacting front to back never overwrites a row still to be read */
    for (int32_t i = 0; i < n_keep; i++)
        if (keep[i] != i)
            row_move(pool, h, keep[i], i);
    for (int32_t b = blocks_kept; b < h->n_blocks; b++)
        block_unref(pool, h->ids[b]);
    h->n_blocks = blocks_kept;
    h->n_tokens = n_keep;
    return EKV_OK;
}

/* A copy of src: its own blocks, or (share) src's blocks, shared. */
static kv_seq *seq_copy(const kv_seq *src, bool share, ekv_error *err)
{
    kv_pool *pool = src->pool;
    if (!share && kv_seq_blocks(src) > pool->n_free) {
        ekv_error_set(err, EKV_ENOMEM, "kv clone: needs %lld blocks, %lld free",
                      (long long)kv_seq_blocks(src), (long long)pool->n_free);
        return NULL;
    }
    kv_seq *dst = kv_seq_create(pool, src->n_layers, src->n_kv_heads, err);
    if (!dst)
        return NULL;
    for (int32_t i = 0; i < src->n_layers * src->n_kv_heads; i++) {
        const kv_head *s = &src->heads[i];
        kv_head *d = &dst->heads[i];
        while (d->cap < s->n_blocks)
            if (!head_grow(d)) {
                kv_seq_free(dst);
                ekv_error_set(err, EKV_ENOMEM, "kv clone: out of memory");
                return NULL;
            }
        for (int32_t b = 0; b < s->n_blocks; b++) {
            const int32_t id = share ? s->ids[b] : block_pop(pool);
            if (share)
                block_ref(pool, id);
            else
                memcpy(block_base(pool, id), block_base(pool, s->ids[b]), pool->block_bytes);
            head_set_block(pool, d, b, id);
        }
        d->n_blocks = s->n_blocks;
        d->n_tokens = s->n_tokens;
        if (s->packed.n) {
            const size_t n = (size_t)s->packed.n, dim = (size_t)pool->head_dim;
            d->p_rows = malloc(n * s->packed.row_bytes);
            d->p_v = malloc(n * dim * sizeof *d->p_v);
            d->p_pos = malloc(n * sizeof *d->p_pos);
            d->p_inv_sqrt_c = s->p_inv_sqrt_c ? malloc(dim * sizeof(float)) : NULL;
            if (!d->p_rows || !d->p_v || !d->p_pos || (s->p_inv_sqrt_c && !d->p_inv_sqrt_c)) {
                kv_seq_free(dst);
                ekv_error_set(err, EKV_ENOMEM, "kv clone: out of memory");
                return NULL;
            }
            memcpy(d->p_rows, s->p_rows, n * s->packed.row_bytes);
            memcpy(d->p_v, s->p_v, n * dim * sizeof *d->p_v);
            memcpy(d->p_pos, s->p_pos, n * sizeof *d->p_pos);
            if (s->p_inv_sqrt_c)
                memcpy(d->p_inv_sqrt_c, s->p_inv_sqrt_c, dim * sizeof(float));
            d->packed = s->packed;
            d->packed.rows = d->p_rows;
            d->packed.v = d->p_v;
            d->packed.pos = d->p_pos;
            d->packed.inv_sqrt_c = d->p_inv_sqrt_c;
        }
    }
    dst->next_pos = src->next_pos;
    if (src->recall && !(dst->recall = kv_recall_clone(src->recall, err))) {
        kv_seq_free(dst);
        return NULL;
    }
    return dst;
}

kv_seq *kv_seq_clone(const kv_seq *src, ekv_error *err) { return seq_copy(src, false, err); }
kv_seq *kv_seq_fork(const kv_seq *src, ekv_error *err) { return seq_copy(src, true, err); }

int32_t kv_seq_take_block(kv_seq *seq, int32_t layer, int32_t head)
{
    kv_pool *pool = seq->pool;
    kv_head *h = head_at(seq, layer, head);
    if (pool->n_free == 0 || h->packed.n || h->n_tokens != h->n_blocks * pool->block_tokens ||
        (h->n_blocks == h->cap && !head_grow(h)))
        return -1;
    const int32_t id = head_take_block(pool, h);
    h->n_tokens += pool->block_tokens;
    if (h->n_tokens > seq->next_pos)
        seq->next_pos = h->n_tokens;
    return id;
}

int32_t kv_seq_whole_block(const kv_seq *seq, int32_t layer, int32_t head, int32_t b)
{
    const kv_head *h = head_at(seq, layer, head);
    if (b < 0 || b >= h->n_blocks || h->packed.n ||
        h->n_tokens < (b + 1) * seq->pool->block_tokens)
        return -1;
    return h->ids[b];
}

int32_t kv_seq_block_export(const kv_seq *seq, int32_t layer, int32_t head, int32_t block,
                            void *out)
{
    const kv_head *h = head_at(seq, layer, head);
    const kv_pool *pool = seq->pool;
    if (block < 0 || block >= h->n_blocks)
        return 0;
    memcpy(out, block_base(pool, h->ids[block]), pool->block_bytes);
    const int32_t rest = h->n_tokens - block * pool->block_tokens;
    return rest < pool->block_tokens ? rest : pool->block_tokens;
}

ekv_status kv_seq_block_import(kv_seq *seq, int32_t layer, int32_t head, const void *in,
                               int32_t n, ekv_error *err)
{
    kv_pool *pool = seq->pool;
    kv_head *h = head_at(seq, layer, head);
    const int32_t bt = pool->block_tokens;
    if (n <= 0 || n > bt || h->n_tokens != h->n_blocks * bt)
        return ekv_error_set(err, EKV_EINVAL, "kv import: %d tokens onto a head of %d", n,
                             h->n_tokens);
    if (pool->n_free == 0)
        return ekv_error_set(err, EKV_ENOMEM, "kv pool exhausted (%lld blocks)",
                             (long long)pool->n_blocks);
    if (h->n_blocks == h->cap && !head_grow(h))
        return ekv_error_set(err, EKV_ENOMEM, "kv seq: out of memory for block table");
    const int32_t id = head_take_block(pool, h);
    memcpy(block_base(pool, id), in, pool->block_bytes);
    h->n_tokens += n;
    const int32_t *pos = block_pos(pool, id);
    for (int32_t r = 0; r < n; r++)
        if (pos[r] >= seq->next_pos)
            seq->next_pos = pos[r] + 1;
    return EKV_OK;
}
