/*
 * sampler.c - next-token sampling (see sampler.h).
 *
 * Each call copies the logits into scratch (NaN -> -inf), applies the mask
 * hook, logit_bias and the penalties there, then either takes the argmax or
 * builds the
 * candidate list. The vocabulary is never fully sorted: top-k is a heap
 * selection of k ids, O(n log k); top-p without top-k is a radix select on
 * probability that sorts only the few ids where the nucleus ends; min-p is a
 * threshold and needs no order at all. Candidates are drawn in the order
 * they were collected, which is fixed, so draws stay reproducible.
 *
 * Reproducibility: the random stream is xoshiro256** seeded by splitmix64,
 * and probabilities use det_exp() below instead of libm's exp(), whose last
 * bit differs between libcs. Everything else is IEEE +, -, *, / in a fixed
 * order, so a seed gives the same tokens everywhere, provided a * b + c is
 * not fused into one FMA (which rounds once, not twice): the pragma below
 * stops clang, whose default fuses on FMA hardware such as every arm64; GCC
 * fuses only in GNU modes, and the build uses -std=c11. x87 excess precision
 * (32-bit x86) is not covered.
 */
#include "entrokv/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ---- deterministic randomness and exp ---- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

/* xoshiro256** (Blackman & Vigna 2018). */
static uint64_t xoshiro_next(uint64_t st[4])
{
    uint64_t result = rotl64(st[1] * 5, 7) * 9;
    uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl64(st[3], 45);
    return result;
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t st[4])
{
    return (double)(xoshiro_next(st) >> 11) * 0x1.0p-53;
}

/* e^x for x <= 0, to about 1e-15 relative, with the same bits on every
 * platform: x = k ln2 + r with |r| <= ln2/2 (ln2 split in two as in fdlibm so
 * k*LN2_HI is exact), Taylor series of e^r to degree 11, times 2^k built from
 * its bits (exact, and no libm call in the sampler's hottest loop). Results
 * below e^-700 are returned as 0; they vanish next to the top token's 1. */
static double det_exp(double x)
{
    static const double LOG2E = 1.44269504088896338700e+00;
    static const double LN2_HI = 6.93147180369123816490e-01;
    static const double LN2_LO = 1.90821492927058770002e-10;
    if (!(x >= -700.0))
        return 0.0;
    double t = x * LOG2E + 0.5;
    int k = (int)t; /* truncates toward 0; t <= 0.5, so step down to floor */
    if ((double)k > t)
        k--;
    double r = (x - k * LN2_HI) - k * LN2_LO;
    double p = 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uint64_t bits = (uint64_t)(k + 1023) << 52; /* k in [-1010, 0]: a normal 2^k */
    double two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

/* ---- parameters ---- */

void sampler_params_default(ekv_sampler_params *p)
{
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repeat_penalty = 1.0f;
    p->repeat_last_n = 64;
    p->seed = 0;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->logit_bias = NULL;
    p->n_logit_bias = 0;
    p->mask = NULL;
}

ekv_status sampler_params_check(const ekv_sampler_params *p, ekv_error *err)
{
    if (!p)
        return ekv_error_set(err, EKV_EINVAL, "sampler parameters missing");
    if (!isfinite(p->temperature) || p->temperature < 0.0f)
        return ekv_error_set(err, EKV_EINVAL,
                             "temperature must be a finite number >= 0 (0 is greedy), got %g",
                             (double)p->temperature);
    if (!isfinite(p->top_p) || p->top_p <= 0.0f || p->top_p > 1.0f)
        return ekv_error_set(err, EKV_EINVAL, "top_p must be in (0, 1] (1 is off), got %g",
                             (double)p->top_p);
    if (!isfinite(p->min_p) || p->min_p < 0.0f || p->min_p > 1.0f)
        return ekv_error_set(err, EKV_EINVAL, "min_p must be in [0, 1] (0 is off), got %g",
                             (double)p->min_p);
    if (!isfinite(p->repeat_penalty) || p->repeat_penalty <= 0.0f)
        return ekv_error_set(err, EKV_EINVAL,
                             "repeat_penalty must be a finite number > 0 (1 is off), got %g",
                             (double)p->repeat_penalty);
    if (p->repeat_last_n < 0)
        return ekv_error_set(err, EKV_EINVAL, "repeat_last_n must be >= 0, got %d",
                             (int)p->repeat_last_n);
    if (!isfinite(p->presence_penalty) || fabsf(p->presence_penalty) > 2.0f)
        return ekv_error_set(err, EKV_EINVAL, "presence_penalty must be in [-2, 2], got %g",
                             (double)p->presence_penalty);
    if (!isfinite(p->frequency_penalty) || fabsf(p->frequency_penalty) > 2.0f)
        return ekv_error_set(err, EKV_EINVAL, "frequency_penalty must be in [-2, 2], got %g",
                             (double)p->frequency_penalty);
    if (p->n_logit_bias > EKV_MAX_LOGIT_BIAS || (p->n_logit_bias && !p->logit_bias))
        return ekv_error_set(err, EKV_EINVAL, "logit_bias holds at most %d entries, got %zu",
                             EKV_MAX_LOGIT_BIAS, p->n_logit_bias);
    for (size_t i = 0; i < p->n_logit_bias; i++) {
        const ekv_logit_bias *b = &p->logit_bias[i];
        if (b->token < 0)
            return ekv_error_set(err, EKV_EINVAL, "logit_bias: token %d is negative",
                                 (int)b->token);
        if (!isfinite(b->bias) || fabsf(b->bias) > 100.0f)
            return ekv_error_set(err, EKV_EINVAL,
                                 "logit_bias: the bias of token %d must be in [-100, 100], got %g",
                                 (int)b->token, (double)b->bias);
    }
    return EKV_OK;
}

/* ---- sampler ---- */

struct ekv_sampler {
    ekv_sampler_params p;
    int32_t n_vocab;
    uint64_t rng[4];
    float *work;     /* n_vocab: the processed logits (mask, bias, penalties) */
    float *wts;      /* n_vocab: draw weights of the candidates, by position */
    int32_t *idx;    /* n_vocab: candidate ids of the current call */
    uint8_t *seen;   /* n_vocab bits: penalized already in this call */
    int32_t *counts; /* n_vocab: generated-token counts during a call (all 0 between) */
    ekv_logit_bias *bias; /* the request's logit_bias, copied */
};

ekv_sampler *sampler_create(const ekv_sampler_params *p, int32_t n_vocab, ekv_error *err)
{
    if (sampler_params_check(p, err) != EKV_OK)
        return NULL;
    if (n_vocab <= 0) {
        ekv_error_set(err, EKV_EINVAL, "sampler needs a vocabulary, got n_vocab %d",
                      (int)n_vocab);
        return NULL;
    }
    ekv_sampler *s = calloc(1, sizeof *s);
    if (!s)
        goto nomem;
    s->p = *p;
    s->n_vocab = n_vocab;
    for (size_t i = 0; i < p->n_logit_bias; i++)
        if (p->logit_bias[i].token >= n_vocab) {
            ekv_error_set(err, EKV_EINVAL, "logit_bias: token %d is outside the vocabulary [0, %d)",
                          (int)p->logit_bias[i].token, (int)n_vocab);
            free(s);
            return NULL;
        }
    s->work = calloc((size_t)n_vocab, sizeof *s->work);
    s->wts = calloc((size_t)n_vocab, sizeof *s->wts);
    s->idx = calloc((size_t)n_vocab, sizeof *s->idx);
    s->seen = calloc((size_t)n_vocab / 8 + 1, 1);
    s->counts = calloc((size_t)n_vocab, sizeof *s->counts);
    if (!s->work || !s->wts || !s->idx || !s->seen || !s->counts)
        goto nomem;
    if (p->n_logit_bias) {
        if (!(s->bias = malloc(p->n_logit_bias * sizeof *s->bias)))
            goto nomem;
        memcpy(s->bias, p->logit_bias, p->n_logit_bias * sizeof *s->bias);
    }
    s->p.logit_bias = s->bias;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64(&x);
    return s;
nomem:
    sampler_free(s);
    ekv_error_set(err, EKV_ENOMEM, "no memory for a sampler over %d tokens", (int)n_vocab);
    return NULL;
}

void sampler_free(ekv_sampler *s)
{
    if (!s)
        return;
    free(s->work);
    free(s->wts);
    free(s->idx);
    free(s->seen);
    free(s->counts);
    free(s->bias);
    free(s);
}

static bool seen_test_set(uint8_t *bits, int32_t t)
{
    uint8_t mask = (uint8_t)(1u << (t & 7));
    bool was = bits[t >> 3] & mask;
    bits[t >> 3] |= mask;
    return was;
}

static void penalize_repeats(ekv_sampler *s, const int32_t *history, size_t n_history);

/* OpenAI's presence and frequency penalties over the generated tokens:
 * logit[t] -= count[t] * frequency + (count[t] > 0) * presence. */
static void penalize_generated(ekv_sampler *s, const int32_t *gen, size_t n_gen)
{
    const float fp = s->p.frequency_penalty, pp = s->p.presence_penalty;
    if ((fp == 0.0f && pp == 0.0f) || n_gen == 0 || !gen)
        return;
    const int32_t n = s->n_vocab;
    for (size_t i = 0; i < n_gen; i++)
        if (gen[i] >= 0 && gen[i] < n)
            s->counts[gen[i]]++;
    for (size_t i = 0; i < n_gen; i++) {
        const int32_t t = gen[i];
        if (t < 0 || t >= n || s->counts[t] == 0)
            continue; /* out of range, or this token is done already */
        s->work[t] -= (float)s->counts[t] * fp + pp;
        s->counts[t] = 0; /* also marks it done; the array is all zero again at the end */
    }
}

/* Copies logits into s->work with NaN turned into -inf, runs the mask hook
 * and adds logit_bias there, then divides positive (multiplies
 * non-positive) logits of each distinct token among the last repeat_last_n
 * of history by the penalty, once, as llama.cpp does, and last applies the
 * presence/frequency penalties to the tokens after the prompt. */
static void load_penalized(ekv_sampler *s, const float *logits, const int32_t *history,
                           size_t n_history, size_t n_prompt)
{
    int32_t n = s->n_vocab;
    for (int32_t i = 0; i < n; i++)
        s->work[i] = isnan(logits[i]) ? -INFINITY : logits[i];
    if (n_prompt > n_history)
        n_prompt = n_history;
    const int32_t *gen = history ? history + n_prompt : NULL;
    if (s->p.mask && s->p.mask->apply)
        s->p.mask->apply(s->p.mask->ctx, s->work, n, gen, n_history - n_prompt);
    for (size_t i = 0; i < s->p.n_logit_bias; i++)
        s->work[s->bias[i].token] += s->bias[i].bias;
    penalize_repeats(s, history, n_history);
    penalize_generated(s, gen, n_history - n_prompt);
}

/* llama.cpp's repetition penalty. */
static void penalize_repeats(ekv_sampler *s, const int32_t *history, size_t n_history)
{
    int32_t n = s->n_vocab;
    float pen = s->p.repeat_penalty;
    size_t w = (size_t)s->p.repeat_last_n;
    if (pen == 1.0f || w == 0 || n_history == 0 || !history)
        return;
    if (w > n_history)
        w = n_history;
    const int32_t *win = history + (n_history - w);
    for (size_t i = 0; i < w; i++) {
        int32_t t = win[i];
        if (t < 0 || t >= n || seen_test_set(s->seen, t))
            continue;
        float x = s->work[t];
        s->work[t] = x > 0.0f ? x / pen : x * pen;
    }
    /* Clear only the bits this call set: cheaper than zeroing the bitmap. */
    for (size_t i = 0; i < w; i++)
        if (win[i] >= 0 && win[i] < n)
            s->seen[win[i] >> 3] = 0;
}

static int32_t argmax_lowest(const float *v, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

/* The total order every selection uses: higher logit first, then lower id.
 * Being total, it makes the selected set and its order unique. */
static bool ranks_before(const float *v, int32_t a, int32_t b)
{
    return v[a] > v[b] || (v[a] == v[b] && a < b);
}

/* Heap whose root is the worst kept id, so a better id replaces the root. */
static void sift_down(const float *v, int32_t *h, size_t n, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, w = i;
        if (l < n && ranks_before(v, h[w], h[l]))
            w = l;
        if (l + 1 < n && ranks_before(v, h[w], h[l + 1]))
            w = l + 1;
        if (w == i)
            return;
        int32_t tmp = h[i];
        h[i] = h[w];
        h[w] = tmp;
        i = w;
    }
}

static void heapify(const float *v, int32_t *h, size_t k)
{
    for (size_t i = k / 2 + 1; i-- > 0;)
        sift_down(v, h, k, i);
}

/* Heap sort: the worst goes to the end each round, leaving best first. */
static void heap_to_sorted(const float *v, int32_t *h, size_t k)
{
    for (size_t end = k; end-- > 1;) {
        int32_t tmp = h[0];
        h[0] = h[end];
        h[end] = tmp;
        sift_down(v, h, end, 0);
    }
}

/* Writes the k best ids of v[0..n), best first, to out[0..k). O(n log k). */
static void select_top(const float *v, int32_t n, int32_t k, int32_t *out)
{
    for (int32_t i = 0; i < k; i++)
        out[i] = i;
    heapify(v, out, (size_t)k);
    for (int32_t i = k; i < n; i++) {
        if (ranks_before(v, i, out[0])) {
            out[0] = i;
            sift_down(v, out, (size_t)k, 0);
        }
    }
    heap_to_sorted(v, out, (size_t)k);
}

/* log of p/p_max at temperature 1; 0 for the top token even when it is inf. */
static double log_ratio(float l, float lmax)
{
    return l == lmax ? 0.0 : (double)l - (double)lmax;
}

/* How many of the best-first ids[0..k) top-p keeps: the shortest prefix
 * whose mass, added to the mass cum already kept, reaches need. */
static int32_t top_p_prefix(const ekv_sampler *s, const int32_t *ids, int32_t k, float lmax,
                            double cum, double need)
{
    for (int32_t i = 0; i < k; i++) {
        cum += det_exp(log_ratio(s->work[ids[i]], lmax));
        if (cum >= need)
            return i + 1;
    }
    return k;
}

/* top-k, then top-p within it: fills s->idx, returns the count. */
static int32_t candidates_top_k(ekv_sampler *s, float lmax)
{
    int32_t k = s->p.top_k;
    select_top(s->work, s->n_vocab, k, s->idx);
    if (s->p.top_p >= 1.0f)
        return k;
    double z = 0.0;
    for (int32_t i = 0; i < k; i++)
        z += det_exp(log_ratio(s->work[s->idx[i]], lmax));
    return top_p_prefix(s, s->idx, k, lmax, 0.0, (double)s->p.top_p * z);
}

/* top-p over the whole vocabulary without sorting it: a radix select on
 * log(p_max/p). Level 0 buckets are 1/8 nat wide (the last one also takes
 * everything past 32 nats, p/p_max < 1e-14); each further level splits the
 * bucket where the running mass reaches top_p into 256 again. Refining stops
 * once that bucket is small, and only it is sorted. */
#define NUCLEUS_BUCKETS 256
#define NUCLEUS_LEVELS 3
#define NUCLEUS_SORT_MAX 64

/* Bucket of a token at one level, inside bucket `parent` of the level above
 * (parent is the path of buckets taken so far, in base 256). Clamped, so it
 * is monotone in off even where rounding strays across a parent's edge:
 * a better token never lands in a later bucket. */
static int nucleus_bucket(double off, int level, int64_t parent)
{
    double x = off * 8.0;
    for (int lv = 0; lv < level; lv++)
        x *= NUCLEUS_BUCKETS;
    x -= (double)parent * NUCLEUS_BUCKETS;
    if (x < 0.0)
        return 0;
    return x < NUCLEUS_BUCKETS - 1 ? (int)x : NUCLEUS_BUCKETS - 1;
}

/* Compares a token with the cut buckets cut[0..depth): -1 if it ranks before
 * the cut (surely in the nucleus), +1 after (surely out), 0 if it sits in the
 * cut bucket at every level; then *next is its bucket at level depth. */
static int nucleus_classify(double off, const int *cut, int depth, int *next)
{
    int64_t parent = 0;
    for (int lv = 0; lv < depth; lv++) {
        int b = nucleus_bucket(off, lv, parent);
        if (b != cut[lv])
            return b < cut[lv] ? -1 : 1;
        parent = parent * NUCLEUS_BUCKETS + b;
    }
    if (next)
        *next = nucleus_bucket(off, depth, parent);
    return 0;
}

static bool ids_sorted(const float *v, const int32_t *ids, int32_t m)
{
    for (int32_t i = 1; i < m; i++)
        if (!ranks_before(v, ids[i - 1], ids[i]))
            return false;
    return true;
}

/* Fills s->idx with the nucleus (the surely-in ids in id order, then the
 * sorted head of the cut bucket) and returns its size. */
static int32_t candidates_top_p(ekv_sampler *s, float lmax)
{
    int32_t n = s->n_vocab, before = 0, at_cut = 0;
    int cut[NUCLEUS_LEVELS], depth = 0;
    double cum = 0.0, need = 0.0;
    while (depth < NUCLEUS_LEVELS) {
        double mass[NUCLEUS_BUCKETS] = {0};
        int32_t count[NUCLEUS_BUCKETS] = {0};
        for (int32_t i = 0; i < n; i++) {
            double lr = log_ratio(s->work[i], lmax);
            int b;
            if (nucleus_classify(-lr, cut, depth, &b) != 0)
                continue;
            mass[b] += det_exp(lr);
            count[b]++;
        }
        if (depth == 0) {
            double z = 0.0;
            for (int b = 0; b < NUCLEUS_BUCKETS; b++)
                z += mass[b];
            need = (double)s->p.top_p * z;
        }
        int c = 0;
        for (; c < NUCLEUS_BUCKETS - 1 && cum + mass[c] < need; c++) {
            cum += mass[c];
            before += count[c];
        }
        cut[depth++] = c;
        at_cut = count[c];
        if (at_cut <= NUCLEUS_SORT_MAX)
            break;
    }
    int32_t a = 0, k = before;
    for (int32_t i = 0; i < n; i++) {
        int side = nucleus_classify(-log_ratio(s->work[i], lmax), cut, depth, NULL);
        if (side < 0)
            s->idx[a++] = i;
        else if (side == 0)
            s->idx[k++] = i;
    }
    /* Collected in id order, so a bucket of exact ties is already sorted. */
    int32_t *head = s->idx + before;
    if (!ids_sorted(s->work, head, at_cut)) {
        heapify(s->work, head, (size_t)at_cut);
        heap_to_sorted(s->work, head, (size_t)at_cut);
    }
    return before + top_p_prefix(s, head, at_cut, lmax, cum, need);
}

/* min-p keeps p >= min_p * p_max; a threshold, so order does not matter.
 * The top token (ratio 1) always stays. */
static int32_t filter_min_p(ekv_sampler *s, int32_t *ids, int32_t m, float lmax)
{
    if (s->p.min_p <= 0.0f)
        return m;
    int32_t kept = 0;
    for (int32_t i = 0; i < m; i++)
        if (det_exp(log_ratio(s->work[ids[i]], lmax)) >= (double)s->p.min_p)
            ids[kept++] = ids[i];
    return kept;
}

/* Draws one of ids[0..m) with weight (p/p_max)^(1/T), the weights in
 * s->wts (s->work keeps the processed logits for the log-probabilities). */
static int32_t draw(ekv_sampler *s, const int32_t *ids, int32_t m, float lmax)
{
    double inv_t = 1.0 / (double)s->p.temperature, total = 0.0;
    for (int32_t i = 0; i < m; i++) {
        float w = (float)det_exp(log_ratio(s->work[ids[i]], lmax) * inv_t);
        s->wts[i] = w;
        total += w;
    }
    double target = rng_uniform(s->rng) * total, cum = 0.0;
    int32_t last = ids[0];
    for (int32_t i = 0; i < m; i++) {
        float w = s->wts[i];
        if (w <= 0.0f)
            continue;
        cum += w;
        last = ids[i];
        if (target < cum)
            return ids[i];
    }
    return last; /* rounding left target at the very top of the range */
}

/* log-softmax of v / T (inv_t = 1/T) in double: token's value and the
 * n_top best, in ranks_before order (dividing by T > 0 keeps the order). */
static void fill_logprobs(const float *v, int32_t n, double inv_t, int32_t token, int32_t n_top,
                          ekv_logprob *out)
{
    if (n_top < 0)
        n_top = 0;
    if (n_top > EKV_MAX_TOP_LOGPROBS)
        n_top = EKV_MAX_TOP_LOGPROBS;
    if (n_top > n)
        n_top = n;
    double mx = -INFINITY;
    for (int32_t i = 0; i < n; i++)
        if ((double)v[i] * inv_t > mx)
            mx = (double)v[i] * inv_t;
    double lse = mx;
    if (isfinite(mx)) {
        double sum = 0.0;
        for (int32_t i = 0; i < n; i++)
            sum += exp((double)v[i] * inv_t - mx);
        lse = mx + log(sum);
    }
    out->token = token;
    out->logprob = token >= 0 && token < n ? (float)((double)v[token] * inv_t - lse) : -INFINITY;
    out->n_top = n_top;
    if (n_top > 0) {
        select_top(v, n, n_top, out->top_ids);
        for (int32_t i = 0; i < n_top; i++)
            out->top_logprobs[i] = (float)((double)v[out->top_ids[i]] * inv_t - lse);
    }
}

void sampler_logprobs(const float *logits, int32_t n_vocab, int32_t token, int32_t n_top,
                      ekv_logprob *out)
{
    fill_logprobs(logits, n_vocab, 1.0, token, n_top, out);
}

int32_t sampler_sample(ekv_sampler *s, const float *logits, const int32_t *history,
                       size_t n_history)
{
    return sampler_next(s, logits, history, n_history, 0, 0, NULL);
}

/* The draw on s->work as processed by load_penalized. */
static int32_t choose(ekv_sampler *s)
{
    int32_t best = argmax_lowest(s->work, s->n_vocab);
    if (s->p.temperature == 0.0f)
        return best;
    float lmax = s->work[best];
    int32_t m;
    if (s->p.top_k > 0 && s->p.top_k < s->n_vocab) {
        m = candidates_top_k(s, lmax);
    } else if (s->p.top_p < 1.0f) {
        m = candidates_top_p(s, lmax);
    } else {
        m = s->n_vocab;
        for (int32_t i = 0; i < m; i++)
            s->idx[i] = i;
    }
    m = filter_min_p(s, s->idx, m, lmax);
    return draw(s, s->idx, m, lmax);
}

int32_t sampler_next(ekv_sampler *s, const float *logits, const int32_t *history,
                     size_t n_history, size_t n_prompt, int32_t n_top, ekv_logprob *lp)
{
    load_penalized(s, logits, history, n_history, n_prompt);
    const int32_t id = choose(s);
    if (lp) {
        const double t = (double)s->p.temperature;
        fill_logprobs(s->work, s->n_vocab, t > 0.0 ? 1.0 / t : 1.0, id, n_top, lp);
    }
    return id;
}
