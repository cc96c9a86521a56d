/*
 * kvrecall.c - the recall store of one sequence: evicted K/V in the host
 * pool, a key min/max digest per recall block, and the per-step ranking
 * that lets the top R blocks of each (layer, KV head) join attention (see
 * kvrecall.h).
 */
#include "entrokv/kvrecall.h"

#include "entrokv/kvrecall_tier.h"
#include "kvrecall_int.h"

#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

kv_recall *kv_recall_create(int32_t n_layers, int32_t n_kv_heads, int32_t head_dim,
                            int32_t block_tokens, int32_t r, ekv_error *err)
{
    if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || block_tokens <= 0 || r <= 0 ||
        n_layers > 4096 || n_kv_heads > 4096 || head_dim > 4096 || block_tokens > 4096 ||
        r > 4096) {
        ekv_error_set(err, EKV_EINVAL, "kv recall: bad shape (%d x %d x %d, %d-token blocks, r %d)",
                      n_layers, n_kv_heads, head_dim, block_tokens, r);
        return NULL;
    }
    kv_recall *rc = calloc(1, sizeof *rc);
    if (rc)
        rc->heads = calloc((size_t)n_layers * n_kv_heads, sizeof *rc->heads);
    if (!rc || !rc->heads) {
        free(rc);
        ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory");
        return NULL;
    }
    rc->n_layers = n_layers;
    rc->n_kv_heads = n_kv_heads;
    rc->d = head_dim;
    rc->bt = block_tokens;
    rc->r = r;
    rc->every = 1;
    rc->exact_channels = KV_RECALL_EXACT_CHANNELS;
    rc->promote = true;
    rc->diag = kvrd_enabled();
    return rc;
}

ekv_status kv_recall_set_channels(kv_recall *rc, int32_t m, ekv_error *err)
{
    if (m < 0 || m > KV_RECALL_CHANNELS_MAX)
        return ekv_error_set(err, EKV_EINVAL, "kv recall: %d exact channels (0..%d)", m,
                             KV_RECALL_CHANNELS_MAX);
    rc->exact_channels = m;
    return EKV_OK;
}

ekv_status kv_recall_set_gather(kv_recall *rc, int32_t k, ekv_error *err)
{
    if (k < 0 || k > KV_RECALL_GATHER_MAX)
        return ekv_error_set(err, EKV_EINVAL, "kv recall: gather from %d x R blocks (0..%d)", k,
                             KV_RECALL_GATHER_MAX);
    rc->gather = k;
    return EKV_OK;
}

void kv_recall_set_rank_scalar(kv_recall *rc, bool on) { rc->rank_scalar = on; }

ekv_status kv_recall_set_mode(kv_recall *rc, int32_t every, bool promote, ekv_error *err)
{
    if (every < 1 || every > KV_RECALL_EVERY_MAX)
        return ekv_error_set(err, EKV_EINVAL, "kv recall: rank every %d steps (1..%d)", every,
                             KV_RECALL_EVERY_MAX);
    rc->every = every;
    rc->promote = promote;
    return EKV_OK;
}

static void head_free(rc_head *h)
{
    for (int32_t b = 0; b < h->n_blocks; b++)
        free(h->blk[b]);
    free(h->blk);
    free(h->kmin);
    free(h->kmax);
    free(h->minpos);
    free(h->mass);
    free(h->res_mass);
    free(h->top);
    memset(h, 0, sizeof *h);
}

void kv_recall_free(kv_recall *rc)
{
    if (!rc)
        return;
    if (rc->diag)
        kvrd_print(rc);
    if (rc->tier) /* before the blocks go: it counts their host bytes */
        kvrt_detach(rc->tier, rc->heads ? kv_recall_host_blocks(rc) : 0);
    for (int32_t i = 0; i < rc->n_layers * rc->n_kv_heads; i++)
        head_free(&rc->heads[i]);
    free(rc->heads);
    free(rc);
}

int32_t kv_recall_r(const kv_recall *rc) { return rc->r; }

/* Grows h to hold cap blocks; false (h unchanged in content) on ENOMEM. */
static bool head_reserve(const kv_recall *rc, rc_head *h, int32_t cap)
{
    if (cap <= h->cap)
        return true;
    if (cap < 2 * h->cap)
        cap = 2 * h->cap;
#define GROW(field, per)                                                                      \
    do {                                                                                      \
        void *p = realloc(h->field, (size_t)cap * (per) * sizeof *h->field);                  \
        if (!p)                                                                               \
            return false;                                                                     \
        h->field = p;                                                                         \
    } while (0)
    GROW(blk, 1);
    GROW(kmin, (size_t)rc->d);
    GROW(kmax, (size_t)rc->d);
    GROW(minpos, 1);
    GROW(mass, 1);
#undef GROW
    h->cap = cap;
    return true;
}

kv_recall *kv_recall_clone(const kv_recall *src, ekv_error *err)
{
    kv_recall *rc = kv_recall_create(src->n_layers, src->n_kv_heads, src->d, src->bt, src->r, err);
    if (!rc)
        return NULL;
    rc->every = src->every;
    rc->exact_channels = src->exact_channels;
    rc->promote = src->promote;
    rc->gather = src->gather;
    rc->rank_scalar = src->rank_scalar;
    const size_t bb = blk_bytes(src);
    int64_t host = 0;
    for (int32_t i = 0; i < src->n_layers * src->n_kv_heads; i++) {
        const rc_head *s = &src->heads[i];
        rc_head *h = &rc->heads[i];
        if (!s->n_blocks)
            continue;
        if (!head_reserve(rc, h, s->n_blocks))
            goto oom;
        for (int32_t b = 0; b < s->n_blocks; b++) {
            h->blk[b] = NULL; /* spilled blocks stay in the tier (kvrt_clone) */
            h->n_blocks = b + 1;
            if (s->blk[b] && !(h->blk[b] = malloc(bb)))
                goto oom;
            if (s->blk[b]) {
                memcpy(h->blk[b], s->blk[b], bb);
                host++;
            }
        }
        const size_t nb = (size_t)s->n_blocks;
        memcpy(h->kmin, s->kmin, nb * src->d * sizeof *h->kmin);
        memcpy(h->kmax, s->kmax, nb * src->d * sizeof *h->kmax);
        memcpy(h->minpos, s->minpos, nb * sizeof *h->minpos);
        memcpy(h->mass, s->mass, nb * sizeof *h->mass);
        h->n_tokens = s->n_tokens;
    }
    if (src->tier && !(rc->tier = kvrt_clone(src->tier, host, err))) {
        kv_recall_free(rc);
        return NULL;
    }
    atomic_store(&rc->promotions, atomic_load(&((kv_recall *)src)->promotions));
    return rc;
oom:
    kv_recall_free(rc);
    ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory");
    return NULL;
}

ekv_status kv_recall_attach_tier(kv_recall *rc, kv_recall_tier *t, ekv_error *err)
{
    if (rc->tier || kv_recall_host_blocks(rc))
        return ekv_error_set(err, EKV_EINVAL, "kv recall: attach a tier to an empty store");
    rc->tier = kvrt_attach(t, rc->n_layers, rc->n_kv_heads, rc->r, blk_bytes(rc), err);
    return rc->tier ? EKV_OK : err ? err->code : EKV_ENOMEM;
}

int64_t kv_recall_host_blocks(const kv_recall *rc)
{
    int64_t n = 0;
    for (int32_t i = 0; i < rc->n_layers * rc->n_kv_heads; i++)
        for (int32_t b = 0; b < rc->heads[i].n_blocks; b++)
            n += rc->heads[i].blk[b] != NULL;
    return n;
}

void kv_recall_count_promotions(kv_recall *rc, int64_t n)
{
    atomic_fetch_add_explicit(&rc->promotions, n, memory_order_relaxed);
    if (rc->tier)
        kv_recall_tier_count_promotions(kvrt_tier(rc->tier), n);
}

ekv_status kv_recall_add(kv_recall *rc, int32_t layer, int32_t head, const kern_kv_view *view,
                         const int32_t *dropped, int32_t n, ekv_error *err)
{
    if (layer < 0 || layer >= rc->n_layers || head < 0 || head >= rc->n_kv_heads ||
        view->head_dim != rc->d || view->packed)
        return ekv_error_set(err, EKV_EINVAL, "kv recall: bad head %d/%d or view", layer, head);
    if (n <= 0)
        return EKV_OK;
    rc_head *h = head_of(rc, layer, head);
    const int32_t bt = rc->bt, d = rc->d, vbt = view->block_tokens;
    if ((int64_t)h->n_tokens + n > INT32_MAX / 2)
        return ekv_error_set(err, EKV_ERANGE, "kv recall: too many evicted tokens");
    const int32_t need = (h->n_tokens + n + bt - 1) / bt;
    if (!head_reserve(rc, h, need))
        return ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory for %d blocks", need);
    const int32_t first_new = h->n_blocks; /* the partial last block, if any, is in host memory */
    for (int32_t b = first_new; b < need; b++)
        if (!(h->blk[b] = malloc(blk_bytes(rc)))) {
            while (b-- > first_new)
                free(h->blk[b]);
            return ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory for %d blocks", need);
        }
    const size_t kv = (size_t)d * bt;
    h->res_n = 0; /* the resident blocks are compacted: their masses start afresh */
    for (int32_t i = 0; i < n; i++) {
        const int32_t t = dropped[i], slot = h->n_tokens % bt, b = h->n_tokens / bt;
        ekv_f16 *kb = blk_k(h->blk[b]), *vb = blk_v(rc, h->blk[b]);
        int32_t *pb = blk_pos(rc, h->blk[b]);
        float *mn = h->kmin + (size_t)b * d, *mx = h->kmax + (size_t)b * d;
        if (slot == 0) { /* a fresh block: empty slots read as zero keys the mask hides */
            memset(kb, 0, kv * sizeof *kb);
            memset(vb, 0, kv * sizeof *vb);
            for (int32_t s = 0; s < bt; s++)
                pb[s] = INT32_MAX;
            for (int32_t c = 0; c < d; c++) {
                mn[c] = INFINITY;
                mx[c] = -INFINITY;
            }
            h->minpos[b] = INT32_MAX;
            h->mass[b] = 0.0f;
            h->n_blocks = b + 1;
        }
        const ekv_f16 *sk = view->k_blocks[t / vbt];
        const int32_t sr = t % vbt;
        for (int32_t c = 0; c < d; c++) {
            const ekv_f16 x = sk[(size_t)c * vbt + sr];
            kb[(size_t)c * bt + slot] = x;
            const float f = ekv_f16_to_f32(x);
            if (f < mn[c])
                mn[c] = f;
            if (f > mx[c])
                mx[c] = f;
        }
        memcpy(vb + (size_t)slot * d, view->v_blocks[t / vbt] + (size_t)sr * d,
               (size_t)d * sizeof *vb);
        pb[slot] = view->pos_blocks[t / vbt][sr];
        if (pb[slot] < h->minpos[b])
            h->minpos[b] = pb[slot];
        h->n_tokens++;
    }
    /* the tier may put complete blocks away (beyond the host cap); its
     * failure to track them costs only the cap, never a block */
    if (rc->tier && !kvrt_added(rc->tier, layer, head, h->blk, h->n_blocks, h->n_tokens / bt,
                                need - first_new))
        return ekv_error_set(err, EKV_ENOMEM, "kv recall: out of memory in the tier");
    return EKV_OK;
}

int32_t kv_recall_blocks(const kv_recall *rc, int32_t layer, int32_t head)
{
    return head_of(rc, layer, head)->n_blocks;
}

int32_t kv_recall_tokens(const kv_recall *rc, int32_t layer, int32_t head)
{
    return head_of(rc, layer, head)->n_tokens;
}

int32_t kv_recall_block(const kv_recall *rc, int32_t layer, int32_t head, int32_t b,
                        const ekv_f16 **k, const ekv_f16 **v, const int32_t **pos,
                        const float **kmin, const float **kmax)
{
    const rc_head *h = head_of(rc, layer, head);
    if (b < 0 || b >= h->n_blocks)
        return 0;
    uint8_t *p = h->blk[b]; /* NULL: spilled to the tier */
    if (k)
        *k = p ? blk_k(p) : NULL;
    if (v)
        *v = p ? blk_v(rc, p) : NULL;
    if (pos)
        *pos = p ? blk_pos(rc, p) : NULL;
    if (kmin)
        *kmin = h->kmin + (size_t)b * rc->d;
    if (kmax)
        *kmax = h->kmax + (size_t)b * rc->d;
    const int32_t rest = h->n_tokens - b * rc->bt;
    return rest < rc->bt ? rest : rc->bt;
}

/* Sixteen running sums, so the compiler vectorises the loop (a float
 * reduction in one sum it may not reorder); every term is the exact
 * bound's. Inlined into one wrapper per ISA (kernels.h's choice), so the
 * same loop is compiled for AVX-512, AVX2 and the baseline. */
static inline __attribute__((always_inline)) float bound16(const float *kmin, const float *kmax,
                                                          const float *q, int32_t d)
{
    float acc[16] = {0};
    int32_t c = 0;
    for (; c + 16 <= d; c += 16)
        for (int j = 0; j < 16; j++) {
            const float a = q[c + j] * kmin[c + j], b = q[c + j] * kmax[c + j];
            acc[j] += a > b ? a : b;
        }
    for (; c < d; c++) {
        const float a = q[c] * kmin[c], b = q[c] * kmax[c];
        acc[0] += a > b ? a : b;
    }
    float s = 0.0f;
    for (int j = 0; j < 16; j++)
        s += acc[j];
    return s;
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) static float bound_avx512(const float *kmin,
                                                             const float *kmax, const float *q,
                                                             int32_t d)
{
    return bound16(kmin, kmax, q, d);
}

__attribute__((target("avx2"))) static float bound_avx2(const float *kmin, const float *kmax,
                                                        const float *q, int32_t d)
{
    return bound16(kmin, kmax, q, d);
}
#endif

float kv_digest_bound(const float *kmin, const float *kmax, const float *q, int32_t d)
{
#if defined(__x86_64__)
    const kern_isa isa = kern_active_isa();
    if (isa >= KERN_ISA_AVX512)
        return bound_avx512(kmin, kmax, q, d);
    if (isa >= KERN_ISA_AVX2)
        return bound_avx2(kmin, kmax, q, d);
#endif
    return bound16(kmin, kmax, q, d);
}

/* How many blocks a ranking keeps: R, or the gather's candidates. */
static int32_t rank_width(const kv_recall *rc) { return rc->gather ? rc->gather * rc->r : rc->r; }

size_t kv_recall_scratch_bytes(const kv_recall *rc, int32_t layer, int32_t head,
                               int32_t n_resident_blocks)
{
    const rc_head *h = head_of(rc, layer, head);
    const size_t nb = (size_t)rc->r + (size_t)n_resident_blocks;
    return 3 * nb * sizeof(void *) + (size_t)h->n_blocks * sizeof(float) +
           ((size_t)rank_width(rc) + 1) * sizeof(int32_t) + 16 +
           (size_t)rc->d * (sizeof(float) + sizeof(int32_t)) + kvrg_scratch_bytes(rc) + 4 +
           (size_t)h->n_blocks * sizeof(float); /* the ranking's prune bounds */
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The r best blocks by bound (ties to the older block), in block order,
 * into top; returns how many (fewer when fewer blocks are eligible). The
 * bounds are overwritten. */
static int32_t top_blocks(const rc_head *h, float *bound, int32_t q_pos, int32_t r,
                          int32_t *top)
{
    int32_t n = 0;
    for (int32_t b = 0; b < h->n_blocks; b++) {
        if (h->minpos[b] > q_pos)
            continue;
        /* insertion into top[0..n) kept sorted by bound, descending */
        int32_t i = n < r ? n : r;
        if (i == r && !(bound[b] > bound[top[r - 1]]))
            continue;
        while (i > 0 && bound[b] > bound[top[i - 1]]) {
            if (i < r)
                top[i] = top[i - 1];
            i--;
        }
        top[i] = b;
        if (n < r)
            n++;
    }
    /* block order, so the view does not depend on the ranking's ties: a
     * mark per block, then one scan (an insertion sort of r = 40 picks
     * cost more than the scan of every block) */
    uint8_t *mark = (uint8_t *)bound; /* bound is read no more */
    for (int32_t b = 0; b < h->n_blocks; b++)
        mark[b] = 0;
    for (int32_t i = 0; i < n; i++)
        mark[top[i]] = 1;
    for (int32_t b = 0, i = 0; i < n; b++)
        if (mark[b])
            top[i++] = b;
    return n;
}

int32_t kv_recall_view(kv_recall *rc, int32_t layer, int32_t head, const float *Q, int n_q,
                       int q_stride, int32_t q_pos, const kern_kv_view *resident,
                       kern_kv_view *out, void *scratch)
{
    return kv_recall_view_at(rc, layer, head, Q, n_q, q_stride, q_pos, 0, resident, out, scratch);
}

int32_t kv_recall_view_at(kv_recall *rc, int32_t layer, int32_t head, const float *Q, int n_q,
                          int q_stride, int32_t q_pos, int flags, const kern_kv_view *resident,
                          kern_kv_view *out, void *scratch)
{
    *out = *resident;
    rc_head *h = head_of(rc, layer, head);
    if (h->n_blocks == 0)
        return 0;
    const int64_t t0 = now_ns();
    const int32_t bt = rc->bt, d = rc->d;
    const int32_t packed_n = resident->packed ? resident->packed->n : 0;
    const int32_t n_res = resident->n_tokens - packed_n;
    const int32_t res_blocks = (n_res + bt - 1) / bt;
    const size_t nb = (size_t)rc->r + (size_t)res_blocks;
    const ekv_f16 **kp = scratch;
    const ekv_f16 **vp = kp + nb;
    const int32_t **pp = (const int32_t **)(vp + nb);
    float *bound = (float *)(pp + nb);
    int32_t *top = (int32_t *)(bound + h->n_blocks);
    /* token-granular recall (kvrecall_gather.c) reads host blocks: not
     * with a tier that spills, which may hold blocks' K elsewhere */
    const bool gather = rc->gather && !(rc->tier && kvrt_spills(rc->tier));
    const bool track = (flags & KV_RECALL_TRACK) &&
                       (h->top || (h->top = malloc(2 * (size_t)rc->r * sizeof *h->top)));
    if (track)
        h->in = h->top + rc->r;
    int32_t n_top;
    if (h->n_blocks <= rc->r) { /* everything fits: no ranking needed */
        n_top = 0;
        for (int32_t b = 0; b < h->n_blocks; b++)
            if (h->minpos[b] <= q_pos)
                top[n_top++] = b;
        if (track)
            h->reusable = false;
    } else if (track && !gather && h->reusable && q_pos >= h->ranked_pos &&
               q_pos - h->ranked_pos < rc->every) {
        /* within `every` steps of the last ranking: its choice stands
         * (blocks evicted since wait for the next ranking) */
        n_top = h->n_top;
        memcpy(top, h->top, (size_t)n_top * sizeof *top);
        atomic_fetch_add_explicit(&rc->reuses, 1, memory_order_relaxed);
    } else {
        /* each block's score: the best over the group's queries of the
         * bound kvrecall_bound.c explains. A spilling tier takes blocks' K
         * out of host memory: the box alone then, so that every block of
         * the head gets the same kind of score (a spilled block's box
         * would outrank kept blocks' tighter scores) */
        const int32_t m = rc->tier && kvrt_spills(rc->tier) ? 0 : rc->exact_channels;
        const int32_t width = gather ? rank_width(rc) : rc->r; /* the blocks it picks */
        float *qm = (float *)(top + rank_width(rc) + 1);
        int32_t *sel = (int32_t *)(qm + d);
        /* past the gather's area (which it uses after the ranking) */
        float *ub = (float *)((uint8_t *)(sel + d) + ((kvrg_scratch_bytes(rc) + 3) & ~(size_t)3));
        int32_t nk = 0; /* blocks whose K the scores read (kvrecall_bound.c) */
        if (rc->rank_scalar)
            nk = kvrb_scores_scalar(rc, h, Q, n_q, q_stride, m, bound, qm, sel);
        else if (m == 0)
            kv_digest_bounds(h->kmin, h->kmax, h->n_blocks, Q, n_q, q_stride, d, bound);
        else if ((nk = kvrb_scores(rc, h, Q, n_q, q_stride, q_pos, m, width, bound, ub, top)) < 0)
            nk = kvrb_scores_scalar(rc, h, Q, n_q, q_stride, m, bound, qm, sel);
        atomic_fetch_add_explicit(&rc->rank_k_blocks, nk, memory_order_relaxed);
        atomic_fetch_add_explicit(&rc->rank_bytes,
                                  (int64_t)h->n_blocks * 2 * d * (int64_t)sizeof(float) +
                                      (int64_t)nk * bt * ((m < d ? m : d) * 2 + 4),
                                  memory_order_relaxed);
        n_top = top_blocks(h, bound, q_pos, width, top);
        atomic_fetch_add_explicit(&rc->selections, 1, memory_order_relaxed);
        if (rc->tier)
            kv_recall_tier_count_rankings(kvrt_tier(rc->tier), 1);
        if (rc->diag)
            kvrd_account(rc, h, Q, n_q, q_stride, q_pos, resident, top, n_top);
        if (track && gather)
            h->reusable = false;
        else if (track) {
            h->ranked_pos = q_pos;
            h->reusable = true;
            memcpy(h->top, top, (size_t)n_top * sizeof *top);
            h->n_top = n_top;
        }
    }
    int32_t n_in = 0; /* blocks that join: a spilled one not fetched in time is skipped */
    if (n_top > 0 && gather && h->n_blocks > rc->r) {
        /* after the ranking's own scratch (top, qm, sel) */
        void *area = (int32_t *)((float *)(top + rank_width(rc) + 1) + d) + d;
        n_in = kvrg_gather(rc, h, Q, n_q, q_stride, q_pos, top, n_top, area, kp, vp, pp);
        if (rc->tier) /* a counting tier: the buffer blocks filled are what was recalled */
            kvrt_count_recalled(rc->tier, n_in);
    } else if (n_top > 0) {
        if (rc->tier)
            kvrt_view_begin(rc->tier, layer, head, h->blk, h->n_blocks);
        for (int32_t i = 0; i < n_top; i++) {
            uint8_t *p = h->blk[top[i]];
            if (!p && rc->tier)
                p = (uint8_t *)kvrt_fetch(rc->tier, layer, head, top[i], top, n_top);
            if (!p)
                continue;
            kp[n_in] = blk_k(p);
            vp[n_in] = blk_v(rc, p);
            pp[n_in] = blk_pos(rc, p);
            if (track)
                h->in[n_in] = top[i];
            n_in++;
        }
        if (rc->tier) /* after the pointers are taken: it may move host copies into slots */
            kvrt_view_end(rc->tier, layer, head, h->blk, top, n_top, n_in);
    }
    if (track) /* gathered blocks belong to no recall block: nothing to observe */
        h->n_in = gather && h->n_blocks > rc->r ? 0 : n_in;
    if (n_in > 0) {
        for (int32_t b = 0; b < res_blocks; b++) {
            kp[n_in + b] = resident->k_blocks[b];
            vp[n_in + b] = resident->v_blocks[b];
            pp[n_in + b] = resident->pos_blocks[b];
        }
        out->k_blocks = kp;
        out->v_blocks = vp;
        out->pos_blocks = pp;
        out->n_tokens = resident->n_tokens + n_in * bt;
    }
    atomic_fetch_add_explicit(&rc->blocks_recalled, n_in, memory_order_relaxed);
    atomic_fetch_add_explicit(&rc->select_ns, now_ns() - t0, memory_order_relaxed);
    return n_in;
}

void kv_recall_get_stats(const kv_recall *rc, kv_recall_stats *st)
{
    memset(st, 0, sizeof *st);
    const size_t kv = (size_t)rc->d * rc->bt;
    const int64_t block_bytes = (int64_t)(2 * kv * sizeof(ekv_f16) + (size_t)rc->bt * 4);
    for (int32_t i = 0; i < rc->n_layers * rc->n_kv_heads; i++) {
        st->evicted_tokens += rc->heads[i].n_tokens;
        st->digest_blocks += rc->heads[i].n_blocks;
    }
    st->spilled_blocks = st->digest_blocks - kv_recall_host_blocks(rc);
    st->host_bytes = (st->digest_blocks - st->spilled_blocks) * block_bytes +
                     st->digest_blocks * (2 * rc->d * (int64_t)sizeof(float) + 4);
    st->deadline_misses = rc->tier ? kvrt_misses(rc->tier) : 0;
    st->promotions = atomic_load(&rc->promotions);
    st->buffer_bytes = (int64_t)rc->r * block_bytes * rc->n_layers * rc->n_kv_heads;
    st->selections = atomic_load(&rc->selections);
    st->reuses = atomic_load(&rc->reuses);
    st->blocks_recalled = atomic_load(&rc->blocks_recalled);
    st->bytes_recalled = st->blocks_recalled * block_bytes;
    st->select_s = (double)atomic_load(&rc->select_ns) * 1e-9;
    st->rank_bytes = atomic_load(&rc->rank_bytes);
    st->rank_k_blocks = atomic_load(&rc->rank_k_blocks);
}
