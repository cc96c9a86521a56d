/*
 * tokenizer_internal.h - private to model/tokenizer.c (loading) and
 * model/tok_encode.c (encoding): the ekv_tokenizer layout and the two hash
 * tables both sides read.
 *
 * Every string the BPE can produce (vocab tokens, merge operands, merge
 * results) is interned once at load time in struct strtab, so encoding works
 * on integer string ids; a merge is a lookup of the pair (left id, right id)
 * in the pairent table. Both tables are immutable after tok_load.
 */
#ifndef ENTROKV_MODEL_TOKENIZER_INTERNAL_H
#define ENTROKV_MODEL_TOKENIZER_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "entrokv/tokenizer.h"
#include "unicode.h"

/* Token attributes, from tokenizer.ggml.token_type (llama.cpp's llama_token_attr). */
enum {
    ATTR_NORMAL = 1 << 0,
    ATTR_UNKNOWN = 1 << 1,
    ATTR_CONTROL = 1 << 2,
    ATTR_USER_DEFINED = 1 << 3,
    ATTR_UNUSED = 1 << 4,
    ATTR_BYTE = 1 << 5,
};

#define MAX_VOCAB (1 << 24)

typedef struct strent {
    uint32_t off, len; /* into strtab.buf */
    int32_t token;     /* vocab id with exactly this text, or -1 */
} strent;

/* Interned strings, open addressing (slot = entry index + 1, 0 = empty). The
 * entry count is bounded at load time, so the table never rehashes. */
typedef struct strtab {
    char *buf;
    size_t n_buf, cap_buf;
    strent *ent;
    uint32_t n_ent, cap_ent;
    uint32_t *slots;
    size_t mask;
} strtab;

typedef struct pairent {
    uint64_t key; /* left id << 32 | right id */
    int32_t rank; /* -1: empty slot */
    uint32_t merged;
} pairent;

struct ekv_tokenizer {
    int32_t n_vocab;
    pretok_type pre;
    bool ignore_merges; /* Llama-3: a word that is a token skips BPE */
    bool add_bos;
    int32_t bos, eos;
    uint8_t *attr;  /* per token */
    uint8_t *eog;   /* per token: 1 = end of generation */
    uint32_t *sid;  /* per token: its strtab entry */
    strtab st;
    pairent *pairs;
    size_t pair_mask;
    uint32_t byte_sid[256]; /* the one-character symbol of each byte */
    /* tok_piece cache: NUL-terminated pieces, like llama.cpp's token-to-piece cache */
    char *pbuf;
    uint32_t *poff, *plen;
    size_t max_piece;
    int32_t *specials; /* CONTROL/USER_DEFINED/UNKNOWN ids, longest text first */
    size_t n_specials;
    char *chat_template; /* NUL-terminated copy, or NULL */
};

static inline uint64_t hash_bytes(const char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 0x100000001b3ull;
    }
    return h ^ (h >> 29);
}

static inline const char *strtab_text(const strtab *s, uint32_t id)
{
    return s->buf + s->ent[id].off;
}

/* Index of the entry with text p[0..n), or -1. */
static inline int64_t strtab_find(const strtab *s, const char *p, size_t n)
{
    for (size_t i = hash_bytes(p, n) & s->mask;; i = (i + 1) & s->mask) {
        uint32_t slot = s->slots[i];
        if (!slot)
            return -1;
        const strent *e = &s->ent[slot - 1];
        if (e->len == n && memcmp(s->buf + e->off, p, n) == 0)
            return slot - 1;
    }
}

static inline size_t pair_hash(uint64_t k)
{
    k ^= k >> 33; /* murmur3 finalizer */
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    return (size_t)(k ^ (k >> 33));
}

static inline const pairent *pair_find(const ekv_tokenizer *t, uint32_t l, uint32_t r)
{
    uint64_t key = (uint64_t)l << 32 | r;
    for (size_t i = pair_hash(key) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
        const pairent *p = &t->pairs[i];
        if (p->rank < 0)
            return NULL;
        if (p->key == key)
            return p;
    }
}

#endif
