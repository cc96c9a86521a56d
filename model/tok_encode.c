/*
 * tok_encode.c - text to token ids, exactly as llama.cpp's llm_tokenizer_bpe.
 *
 * In llama.cpp's order:
 *   1. special-token partition: special tokens (longest text first) found in
 *      the input cut it into fragments; each match becomes its token;
 *   2. each remaining text fragment is decoded to codepoints (invalid bytes
 *      -> U+FFFD, as llama.cpp) and pre-tokenized into words (unicode.c);
 *   3. each word's UTF-8 bytes are BPE-merged: start from one symbol per
 *      byte (GPT-2's bytes_to_unicode alphabet), repeatedly merge the adjacent
 *      pair with the lowest merge rank (leftmost on ties) until none applies;
 *   4. each final symbol is looked up in the vocab; a symbol that is not a
 *      token falls back, as in llama.cpp, to the one-byte strings of its
 *      mapped text that are tokens.
 * All scratch is per call, so concurrent calls on one tokenizer are safe.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

#define MAX_INPUT 0x7fffffffu

#define SID_DEAD UINT32_MAX

typedef struct frag {
    int32_t token; /* -1: raw text */
    uint32_t off, len;
} frag;

typedef struct frag_list {
    frag *v;
    size_t n, cap;
} frag_list;

typedef struct sym {
    uint32_t sid;
    int32_t prev, next;
} sym;

/* A candidate merge of symbol left with its next. Only (rank, left) is kept:
 * a rank names one (left text, right text) pair, so at pop time the entry is
 * current exactly when left's pair with its next still has this rank. */
typedef struct bigram {
    int32_t rank, left;
} bigram;

/* Per-call scratch; buffers grow to the largest fragment/word seen. */
typedef struct encoder {
    const ekv_tokenizer *t;
    int32_t *out;
    size_t n_out, cap_out;
    frag_list fa, fb; /* the partition, and scratch to rebuild it */
    uint32_t *cpts;
    size_t cap_cpts;
    uint8_t *bytes;
    size_t cap_bytes;
    char *word;
    size_t cap_word;
    sym *syms;
    size_t cap_syms;
    bigram *heap;
    size_t n_heap, cap_heap;
    pretok_lens lens, tmp;
    bool oom;
} encoder;

/* p grown to hold need elements (capacity doubling): the new pointer, or p
 * unchanged with *oom set when realloc fails. */
static void *grow_to(void *p, size_t *cap, size_t need, size_t elem, bool *oom)
{
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    void *q = realloc(p, c * elem);
    if (!q) {
        *oom = true;
        return p;
    }
    *cap = c;
    return q;
}

/* True when arr has room for need elements (growing it if needed). */
#define ENSURE(e, arr, cap, need)                                                          \
    ((need) <= (cap) || ((arr) = grow_to((arr), &(cap), (need), sizeof *(arr), &(e)->oom), \
                         (need) <= (cap)))

static void enc_push(encoder *e, int32_t id)
{
    if (!ENSURE(e, e->out, e->cap_out, e->n_out + 1))
        return;
    e->out[e->n_out++] = id;
}

static void frag_push(encoder *e, frag_list *l, frag f)
{
    if (ENSURE(e, l->v, l->cap, l->n + 1))
        l->v[l->n++] = f;
}

/* Cuts the text into raw fragments and special tokens (llama.cpp's
 * tokenizer_st_partition): each special token in turn, longest first, splits
 * every raw fragment at each of its non-overlapping leftmost occurrences. */
static void partition(encoder *e, const char *text, size_t len, bool parse_special)
{
    const ekv_tokenizer *t = e->t;
    e->fa.n = 0;
    if (len)
        frag_push(e, &e->fa, (frag){-1, 0, (uint32_t)len});
    for (size_t k = 0; k < t->n_specials && !e->oom; k++) {
        int32_t id = t->specials[k];
        if (!parse_special && (t->attr[id] & (ATTR_CONTROL | ATTR_UNKNOWN)))
            continue; /* user-defined tokens are matched even so */
        const strent *se = &t->st.ent[t->sid[id]];
        const char *needle = strtab_text(&t->st, t->sid[id]);
        e->fb.n = 0;
        for (size_t i = 0; i < e->fa.n; i++) {
            frag f = e->fa.v[i];
            if (f.token >= 0) {
                frag_push(e, &e->fb, f);
                continue;
            }
            uint32_t off = f.off, rem = f.len;
            const char *hit;
            while (rem >= se->len && (hit = memmem(text + off, rem, needle, se->len))) {
                uint32_t gap = (uint32_t)(hit - (text + off));
                if (gap)
                    frag_push(e, &e->fb, (frag){-1, off, gap});
                frag_push(e, &e->fb, (frag){id, 0, 0});
                off += gap + se->len;
                rem -= gap + se->len;
            }
            if (rem)
                frag_push(e, &e->fb, (frag){-1, off, rem});
        }
        frag_list tmp = e->fa;
        e->fa = e->fb;
        e->fb = tmp;
    }
}

static bool bigram_less(const bigram *a, const bigram *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->left < b->left);
}

static void heap_push(encoder *e, bigram b)
{
    if (!ENSURE(e, e->heap, e->cap_heap, e->n_heap + 1))
        return;
    size_t i = e->n_heap++;
    while (i > 0 && bigram_less(&b, &e->heap[(i - 1) / 2])) {
        e->heap[i] = e->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    e->heap[i] = b;
}

static bigram heap_pop(encoder *e)
{
    bigram top = e->heap[0], last = e->heap[--e->n_heap];
    size_t i = 0, n = e->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && bigram_less(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!bigram_less(&e->heap[c], &last))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

/* The merge rule for left and its next symbol, or NULL. */
static const pairent *pair_at(const encoder *e, int32_t left)
{
    if (left < 0 || e->syms[left].sid == SID_DEAD || e->syms[left].next < 0)
        return NULL;
    return pair_find(e->t, e->syms[left].sid, e->syms[e->syms[left].next].sid);
}

static void try_pair(encoder *e, int32_t left)
{
    const pairent *p = pair_at(e, left);
    if (p)
        heap_push(e, (bigram){p->rank, left});
}

/* A final BPE symbol -> ids: its token, or else (llama.cpp's fallback) the
 * tokens of the single bytes of its mapped text that are tokens. */
static void emit_symbol(encoder *e, uint32_t sid)
{
    const strtab *st = &e->t->st;
    if (st->ent[sid].token >= 0) {
        enc_push(e, st->ent[sid].token);
        return;
    }
    const char *s = strtab_text(st, sid);
    for (uint32_t i = 0; i < st->ent[sid].len; i++) {
        int64_t b = strtab_find(st, s + i, 1);
        if (b >= 0 && st->ent[b].token >= 0)
            enc_push(e, st->ent[b].token);
    }
}

static void bpe_word(encoder *e, const uint8_t *bytes, size_t m)
{
    const ekv_tokenizer *t = e->t;
    if (t->ignore_merges) {
        size_t wl = 0;
        if (!ENSURE(e, e->word, e->cap_word, 2 * m))
            return;
        for (size_t i = 0; i < m; i++) {
            const strent *be = &t->st.ent[t->byte_sid[bytes[i]]];
            memcpy(e->word + wl, strtab_text(&t->st, t->byte_sid[bytes[i]]), be->len);
            wl += be->len;
        }
        int64_t w = strtab_find(&t->st, e->word, wl);
        if (w >= 0 && t->st.ent[w].token >= 0) {
            enc_push(e, t->st.ent[w].token);
            return;
        }
    }
    if (!ENSURE(e, e->syms, e->cap_syms, m))
        return;
    for (size_t i = 0; i < m; i++)
        e->syms[i] = (sym){t->byte_sid[bytes[i]], (int32_t)i - 1, i + 1 < m ? (int32_t)i + 1 : -1};
    e->n_heap = 0;
    for (size_t i = 0; i + 1 < m; i++)
        try_pair(e, (int32_t)i);
    while (e->n_heap && !e->oom) {
        bigram b = heap_pop(e);
        const pairent *p = pair_at(e, b.left);
        if (!p || p->rank != b.rank)
            continue; /* stale: one side has merged since */
        sym *l = &e->syms[b.left], *r = &e->syms[l->next];
        l->sid = p->merged;
        r->sid = SID_DEAD;
        l->next = r->next;
        if (r->next >= 0)
            e->syms[r->next].prev = b.left;
        try_pair(e, l->prev);
        try_pair(e, b.left);
    }
    for (int32_t i = 0; i >= 0 && !e->oom; i = e->syms[i].next)
        emit_symbol(e, e->syms[i].sid);
}

static void encode_raw(encoder *e, const char *text, size_t len)
{
    if (!ENSURE(e, e->cpts, e->cap_cpts, len))
        return;
    size_t n = utf8_decode_lenient((const uint8_t *)text, len, e->cpts);
    if (pretok_split(e->t->pre, e->cpts, n, &e->lens, &e->tmp) != EKV_OK) {
        e->oom = true;
        return;
    }
    size_t pos = 0;
    for (size_t i = 0; i < e->lens.n && !e->oom; i++) {
        size_t pl = e->lens.v[i], m = 0;
        if (!ENSURE(e, e->bytes, e->cap_bytes, 4 * pl))
            return;
        for (size_t j = 0; j < pl; j++)
            m += utf8_encode(e->cpts[pos + j], e->bytes + m);
        bpe_word(e, e->bytes, m);
        pos += pl;
    }
}

ekv_status tok_encode(const ekv_tokenizer *t, const char *text, size_t len, bool add_bos,
                      bool parse_special, int32_t **out, size_t *n_out, ekv_error *err)
{
    if (!t || (!text && len) || !out || !n_out)
        return ekv_error_set(err, EKV_EINVAL, "tok_encode: NULL argument");
    *out = NULL;
    *n_out = 0;
    if (len > MAX_INPUT)
        return ekv_error_set(err, EKV_ERANGE, "tok_encode: input of %zu bytes is too long", len);
    encoder e = {.t = t};
    if (add_bos && t->bos >= 0)
        enc_push(&e, t->bos);
    partition(&e, text, len, parse_special);
    for (size_t i = 0; i < e.fa.n && !e.oom; i++) {
        if (e.fa.v[i].token >= 0)
            enc_push(&e, e.fa.v[i].token);
        else
            encode_raw(&e, text + e.fa.v[i].off, e.fa.v[i].len);
    }
    if (!e.out && !e.oom)
        e.out = malloc(sizeof *e.out);
    free(e.fa.v);
    free(e.fb.v);
    free(e.cpts);
    free(e.bytes);
    free(e.word);
    free(e.syms);
    free(e.heap);
    free(e.lens.v);
    free(e.tmp.v);
    if (e.oom || !e.out) {
        free(e.out);
        return ekv_error_set(err, EKV_ENOMEM, "tok_encode: out of memory");
    }
    *out = e.out;
    *n_out = e.n_out;
    return EKV_OK;
}
