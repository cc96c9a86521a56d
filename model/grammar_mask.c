/*
 * grammar_mask.c - which tokens may come next (see grammar.h).
 *
 * The exact rule: a token is allowed when every one of its bytes can be
 * consumed from the current state. Checking 49k tokens byte by byte each
 * step would cost milliseconds, so the vocab is arranged once per tokenizer:
 *
 *  - a byte trie of every token in preorder, walked once from the state:
 *    each node's state is its parent's stepped by one byte, and the first
 *    rejected byte skips the node's whole subtree. At structural positions
 *    (after '{', ',' or ':', inside a number or an enum) only a few hundred
 *    nodes survive.
 *  - inside a JSON string almost every token survives, so the walk would
 *    visit the whole trie. There the answer is known in advance for the
 *    tokens made only of plain string characters (no '"', '\', control
 *    byte or broken UTF-8, starting on a character boundary): allowed,
 *    unless a maxLength leaves fewer characters than they start. The other
 *    tokens that can be allowed at all continue their plain prefix with '"'
 *    or '\' on a character boundary; after the prefix the state is the same
 *    string with more characters, so only their suffixes (from the '"' or
 *    '\') matter: a second trie of those suffixes is walked once with the
 *    string's length bounds lifted, and where the string has bounds, each
 *    surviving token is checked byte by byte.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

typedef struct entry {
    const uint8_t *p;
    uint32_t len;
    int32_t id;
} entry;

static int entry_cmp(const void *a, const void *b)
{
    const entry *x = a, *y = b;
    const uint32_t n = x->len < y->len ? x->len : y->len;
    const int c = memcmp(x->p, y->p, n);
    if (c)
        return c;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static void trie_free(gtrie *t)
{
    free(t->byte);
    free(t->depth);
    free(t->end);
    free(t->tok);
}

/* Builds t from es (sorted here); next[id] chains tokens with equal bytes. */
static bool trie_build(gtrie *t, entry *es, int32_t n, int32_t *next)
{
    qsort(es, (size_t)n, sizeof *es, entry_cmp);
    size_t cap = 1, max_len = 1;
    for (int32_t i = 0; i < n; i++) {
        cap += es[i].len;
        if (es[i].len > max_len)
            max_len = es[i].len;
    }
    if (max_len > 65535)
        return false;
    t->byte = malloc(cap);
    t->depth = malloc(cap * sizeof *t->depth);
    t->end = malloc(cap * sizeof *t->end);
    t->tok = malloc(cap * sizeof *t->tok);
    int32_t *path = malloc((max_len + 1) * sizeof *path);
    if (!t->byte || !t->depth || !t->end || !t->tok || !path) {
        free(path);
        return false;
    }
    int32_t nn = 0;
    uint32_t open = 0; /* depth of the current path */
    const entry *prev = NULL;
    for (int32_t i = 0; i < n; i++) {
        const entry *e = &es[i];
        uint32_t common = 0;
        if (prev)
            while (common < prev->len && common < e->len && prev->p[common] == e->p[common])
                common++;
        for (; open > common; open--)
            t->end[path[open]] = nn;
        for (uint32_t d = common + 1; d <= e->len; d++) {
            t->byte[nn] = e->p[d - 1];
            t->depth[nn] = (uint16_t)d;
            t->tok[nn] = -1;
            path[d] = nn++;
        }
        open = e->len;
        const int32_t leaf = path[e->len];
        next[e->id] = t->tok[leaf];
        t->tok[leaf] = e->id;
        prev = e;
    }
    for (; open > 0; open--)
        t->end[path[open]] = nn;
    free(path);
    t->n_nodes = nn;
    t->max_depth = (int32_t)max_len;
    return true;
}

/* How far bytes p[0..len) go as plain string body from a character
 * boundary; *chars: characters started, *boundary: whether the stop is on
 * a character boundary. */
static uint32_t plain_prefix(const uint8_t *p, uint32_t len, uint32_t *chars, bool *boundary)
{
    uint32_t i = 0, pending = 0, c = 0;
    uint8_t lo = 0x80, hi = 0xBF;
    for (; i < len; i++) {
        const uint8_t b = p[i];
        if (pending) {
            if (b < lo || b > hi)
                break;
            pending--;
            lo = 0x80, hi = 0xBF;
            continue;
        }
        if (b == '"' || b == '\\' || b < 0x20 || (b >= 0x80 && b < 0xC2) || b > 0xF4)
            break;
        c++;
        if (b >= 0xC2) {
            pending = b < 0xE0 ? 1 : b < 0xF0 ? 2 : 3;
            lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
            hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
        }
    }
    *chars = c;
    *boundary = pending == 0;
    return i;
}

static void set_bit64(uint64_t *bits, int32_t i)
{
    bits[i >> 6] |= 1ull << (i & 63);
}

static bool get_bit64(const uint64_t *bits, int32_t i)
{
    return (bits[i >> 6] >> (i & 63)) & 1;
}

void grammar_vocab_free(ekv_grammar_vocab *v)
{
    if (!v)
        return;
    free(v->eog);
    trie_free(&v->trie);
    free(v->next_same);
    free(v->plain);
    free(v->plain_chars);
    free(v->plain_len);
    free(v->by_first);
    free(v->tail_plain);
    free(v->tail_chars);
    trie_free(&v->sfx);
    free(v->sfx_next);
    free(v);
}

ekv_grammar_vocab *grammar_vocab_create(const ekv_tokenizer *t, ekv_error *err)
{
    ekv_grammar_vocab *v = calloc(1, sizeof *v);
    entry *all = NULL, *sfx = NULL;
    if (!v)
        goto oom;
    const int32_t n = tok_vocab_size(t);
    v->t = t;
    v->n_vocab = n;
    v->n_words = (n + 63) / 64;
    v->eog = calloc((size_t)v->n_words, sizeof *v->eog);
    v->plain = calloc((size_t)v->n_words, sizeof *v->plain);
    v->plain_chars = calloc((size_t)n, sizeof *v->plain_chars);
    v->plain_len = calloc((size_t)n, sizeof *v->plain_len);
    v->by_first = malloc((size_t)n * sizeof *v->by_first);
    v->tail_plain = calloc((size_t)v->n_words, sizeof *v->tail_plain);
    v->tail_chars = calloc((size_t)n, sizeof *v->tail_chars);
    v->next_same = malloc((size_t)n * sizeof *v->next_same);
    v->sfx_next = malloc((size_t)n * sizeof *v->sfx_next);
    all = malloc((size_t)n * sizeof *all);
    sfx = malloc((size_t)n * sizeof *sfx);
    if (!v->eog || !v->plain || !v->plain_chars || !v->next_same ||
        !v->sfx_next || !v->plain_len || !v->by_first || !v->tail_plain || !v->tail_chars ||
        !all || !sfx)
        goto oom;
    int32_t n_all = 0, n_sfx = 0;
    for (int32_t id = 0; id < n; id++) {
        if (tok_is_eog(t, id)) {
            set_bit64(v->eog, id);
            continue;
        }
        size_t len = 0;
        const uint8_t *p = (const uint8_t *)tok_piece(t, id, &len);
        if (tok_is_control(t, id) || !p || len == 0 || len > 65535)
            continue; /* never allowed: they are not text */
        all[n_all++] = (entry){p, (uint32_t)len, id};
        uint32_t chars = 0;
        bool boundary = false;
        const uint32_t k = plain_prefix(p, (uint32_t)len, &chars, &boundary);
        v->plain_chars[id] = (uint16_t)(chars > 65535 ? 65535 : chars);
        v->plain_len[id] = (uint16_t)k;
        if (k == len) {
            set_bit64(v->plain, id);
        } else if (boundary && (p[k] == '"' || p[k] == '\\')) {
            sfx[n_sfx++] = (entry){p + k, (uint32_t)(len - k), id};
        }
        if (plain_prefix(p + 1, (uint32_t)len - 1, &chars, &boundary) == len - 1) {
            set_bit64(v->tail_plain, id);
            v->tail_chars[id] = (uint16_t)(chars > 65535 ? 65535 : chars);
        }
        v->first_off[p[0] + 1]++;
    }
    for (int c = 0; c < 256; c++) /* counting sort by first byte */
        v->first_off[c + 1] += v->first_off[c];
    int32_t fill[256];
    memcpy(fill, v->first_off, sizeof fill);
    for (int32_t i = 0; i < n_all; i++)
        v->by_first[fill[all[i].p[0]]++] = all[i].id;
    if (!trie_build(&v->trie, all, n_all, v->next_same) ||
        !trie_build(&v->sfx, sfx, n_sfx, v->sfx_next))
        goto oom;
    free(all);
    free(sfx);
    return v;
oom:
    free(all);
    free(sfx);
    grammar_vocab_free(v);
    ekv_error_set(err, EKV_ENOMEM, "grammar: out of memory for the vocab trie");
    return NULL;
}

/* ---- one token, byte by byte ---- */

static bool bytes_ok(const ekv_grammar *g, const gstate *from, const uint8_t *p, size_t len)
{
    gstate st;
    gstate_copy(&st, from);
    for (size_t i = 0; i < len; i++)
        if (!gstate_step(g, &st, p[i]))
            return false;
    return true;
}

static bool token_ok(const grammar_state *s, int32_t id)
{
    const ekv_tokenizer *t = s->v->t;
    if (id < 0 || id >= s->v->n_vocab)
        return false;
    if (get_bit64(s->v->eog, id))
        return gstate_accepting(s->g, &s->cur);
    size_t len = 0;
    const char *p = tok_piece(t, id, &len);
    if (tok_is_control(t, id) || !p || len == 0)
        return false;
    return bytes_ok(s->g, &s->cur, (const uint8_t *)p, len);
}

bool grammar_token_allowed(const grammar_state *s, int32_t id)
{
    return s->v && token_ok(s, id);
}

ekv_status grammar_accept_token(grammar_state *s, int32_t id, ekv_error *err)
{
    if (!s->v || id < 0 || id >= s->v->n_vocab)
        return ekv_error_set(err, EKV_EINVAL, "grammar: token %d is outside the vocabulary", id);
    if (get_bit64(s->v->eog, id))
        return grammar_accepting(s) ? EKV_OK
                                    : ekv_error_set(err, EKV_EINVAL,
                                                    "grammar: end of generation before the "
                                                    "JSON value is complete");
    size_t len = 0;
    const char *p = tok_piece(s->v->t, id, &len);
    if (tok_is_control(s->v->t, id) || len == 0)
        return ekv_error_set(err, EKV_EINVAL, "grammar: token %d is not text", id);
    return grammar_accept_bytes(s, p, len, err);
}

/* ---- the mask ---- */

/* Token id, whose suffix the relaxed walk from the current string accepted:
 * does it fit the string's real bounds? A suffix that closes the string
 * only needs the characters of its plain prefix to fit; one that starts an
 * escape is checked byte by byte. */
static bool exact_ok(const grammar_state *s, int32_t id)
{
    const gframe *top = &s->cur.f[s->cur.sp - 1];
    const uint64_t min = (uint32_t)top->mask, max = (uint32_t)(top->mask >> 32);
    const char *p = tok_piece(s->v->t, id, NULL);
    if (p[s->v->plain_len[id]] != '"')
        return token_ok(s, id);
    const uint64_t n = (uint64_t)top->n + s->v->plain_chars[id];
    return n >= min && n <= max;
}

/* Right after a '\' in a string: the escape's letter, then (for all but
 * \u) the plain string again, so a token whose rest is plain string body is
 * allowed when its characters fit; the others are checked byte by byte. */
static void escape_allowed(grammar_state *s)
{
    const ekv_grammar_vocab *v = s->v;
    const gframe *top = &s->cur.f[s->cur.sp - 1];
    const uint32_t max = (uint32_t)(top->mask >> 32);
    const uint32_t room = max == GRAMMAR_UNBOUNDED ? GRAMMAR_UNBOUNDED : max - top->n;
    for (const char *c = "\"\\/bfnrtu"; *c; c++) {
        const uint8_t b = (uint8_t)*c;
        for (int32_t i = v->first_off[b]; i < v->first_off[b + 1]; i++) {
            const int32_t id = v->by_first[i];
            if (b != 'u' && get_bit64(v->tail_plain, id) ? v->tail_chars[id] <= room
                                                         : token_ok(s, id))
                set_bit64(s->allowed, id);
        }
    }
}

/* Walks trie tr from start; every token at a node whose bytes all step
 * goes into s->allowed (after a byte-by-byte check from s->cur when
 * exact). */
static void walk(grammar_state *s, const gtrie *tr, const int32_t *next, const gstate *start,
                 bool exact)
{
    const ekv_grammar *g = s->g;
    gstate *st = s->walk;
    gstate_copy(&st[0], start);
    for (int32_t i = 0; i < tr->n_nodes;) {
        const int32_t d = tr->depth[i];
        gstate_copy(&st[d], &st[d - 1]);
        if (!gstate_step(g, &st[d], tr->byte[i])) {
            i = tr->end[i];
            continue;
        }
        for (int32_t id = tr->tok[i]; id >= 0; id = next[id])
            if (!exact || exact_ok(s, id))
                set_bit64(s->allowed, id);
        i++;
    }
}

static void compute_allowed(grammar_state *s)
{
    const ekv_grammar_vocab *v = s->v;
    memset(s->allowed, 0, (size_t)v->n_words * sizeof *s->allowed);
    if (gstate_accepting(s->g, &s->cur))
        for (int32_t w = 0; w < v->n_words; w++)
            s->allowed[w] |= v->eog[w];
    if (gstate_in_string_escape(&s->cur)) {
        escape_allowed(s);
        return;
    }
    if (!gstate_in_plain_string(&s->cur)) {
        walk(s, &v->trie, v->next_same, &s->cur, false);
        return;
    }
    const gframe *top = &s->cur.f[s->cur.sp - 1];
    const uint32_t min = (uint32_t)top->mask, max = (uint32_t)(top->mask >> 32);
    if (max == GRAMMAR_UNBOUNDED) {
        for (int32_t w = 0; w < v->n_words; w++)
            s->allowed[w] |= v->plain[w];
    } else {
        const uint32_t room = max - top->n;
        for (int32_t w = 0; w < v->n_words; w++) { /* in id order, branch-free */
            const int32_t base = w * 64, n = v->n_vocab - base < 64 ? v->n_vocab - base : 64;
            uint64_t fits = 0;
            for (int32_t j = 0; j < n; j++)
                fits |= (uint64_t)(v->plain_chars[base + j] <= room) << j;
            s->allowed[w] |= fits & v->plain[w];
        }
    }
    gstate relaxed;
    gstate_copy(&relaxed, &s->cur);
    relaxed.f[relaxed.sp - 1].mask = (uint64_t)GRAMMAR_UNBOUNDED << 32;
    walk(s, &v->sfx, v->sfx_next, &relaxed, min > 0 || max != GRAMMAR_UNBOUNDED);
}

int32_t grammar_mask_logits(grammar_state *s, float *logits, int32_t n_vocab)
{
    if (!s->v || n_vocab != s->v->n_vocab)
        return 0;
    compute_allowed(s);
    int32_t n_allowed = 0;
    for (int32_t w = 0; w < s->v->n_words; w++) {
        const uint64_t bits = s->allowed[w];
        n_allowed += __builtin_popcountll(bits);
        if (bits == ~0ull)
            continue;
        const int32_t base = w * 64;
        const int32_t top = base + 64 < n_vocab ? base + 64 : n_vocab;
        /* branch-free: inside a maxLength string about half the tokens of
         * a word pass, in no pattern a branch predictor could learn */
        for (int32_t id = base; id < top; id++) { /* on the float's bits */
            const uint32_t keep = 0u - (uint32_t)((bits >> (id - base)) & 1);
            uint32_t u;
            memcpy(&u, &logits[id], sizeof u);
            u = (u & keep) | (0xFF800000u & ~keep); /* 0xFF800000: -inf */
            memcpy(&logits[id], &u, sizeof u);
        }
    }
    return n_allowed;
}
