/*
 * select.c - SnapKV's selection rule for one head (Li et al. 2024, as the
 * UNComp repository runs it: specs/uncomp.md section 3 steps 3-4).
 */
#include "compress_internal.h"

#include <stdlib.h>

typedef struct scored {
    float s;
    int32_t i;
} scored;

/* Higher score first; equal scores keep the lower index first. */
static int by_score_desc(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->s != y->s)
        return x->s > y->s ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static int by_int(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

void kvc_select_snap(const kvc_ctx *c, const float *scores, int32_t budget, int32_t *keep,
                     float *scratch)
{
    const int32_t n = c->n_tokens;
    int32_t w = KVC_WINDOW < budget / 2 ? KVC_WINDOW : budget / 2;
    const int32_t prefix = n - w, k = budget - w, half = KVC_POOL_KERNEL / 2;
    scored *cand = (scored *)scratch;
    /* max-pool over the prefix only: the padding counts as -inf */
    for (int32_t j = 0; j < prefix; j++) {
        int32_t lo = j - half < 0 ? 0 : j - half;
        int32_t hi = j + half >= prefix ? prefix - 1 : j + half;
        float m = scores[lo];
        for (int32_t t = lo + 1; t <= hi; t++)
            if (scores[t] > m)
                m = scores[t];
        cand[j].s = m;
        cand[j].i = j;
    }
    qsort(cand, (size_t)prefix, sizeof *cand, by_score_desc);
    for (int32_t i = 0; i < k; i++)
        keep[i] = cand[i].i;
    qsort(keep, (size_t)k, sizeof *keep, by_int);
    for (int32_t i = 0; i < w; i++)
        keep[k + i] = prefix + i;
}
