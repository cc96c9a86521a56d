/*
 * grammar_internal.h - the compiled schema, the automaton's state and the
 * token trie, shared by model/grammar*.c only (see entrokv/grammar.h).
 *
 *   grammar_schema.c  JSON Schema -> nodes; response_format; the cache
 *   grammar.c         the pushdown automaton: one byte at a time
 *   grammar_mask.c    the vocab trie and the token mask
 */
#ifndef ENTROKV_GRAMMAR_INTERNAL_H
#define ENTROKV_GRAMMAR_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "entrokv/grammar.h"

#define GRAMMAR_UNBOUNDED UINT32_MAX

typedef enum gtype {
    G_ANY,      /* any JSON value whose first byte is in `first` */
    G_OBJECT,   /* declared properties, in order */
    G_ARRAY,
    G_STRING,
    G_INTEGER,
    G_NUMBER,
    G_LITERALS, /* one of a set of compact JSON texts (enum, const, true/false/null) */
    G_ANYOF,    /* alternatives with disjoint first bytes */
} gtype;

typedef struct gnode {
    uint8_t type;
    uint8_t first[32];  /* bytes a value of this node can start with (bitmap) */
    int32_t a0, n;      /* object: props[a0, a0+n); literals: lits[...]; anyof: alts[...] */
    int32_t items;      /* array: the items' node */
    uint32_t min, max;  /* array: items; string: characters; max GRAMMAR_UNBOUNDED: none */
} gnode;

typedef struct gprop {
    int32_t lit;        /* the key as a literal: "\"name\"" */
    int32_t node;
    bool required;
} gprop;

typedef struct glit {
    uint32_t off, len;  /* into the grammar's text */
} glit;

struct ekv_grammar {
    atomic_int refs;
    gnode *nodes;
    int32_t n_nodes;
    gprop *props;
    int32_t n_props;
    glit *lits;
    int32_t n_lits;
    int32_t *alts;
    int32_t n_alts;
    char *text;
    uint32_t n_text;
    int32_t root;
    int32_t any;        /* any JSON value (members of free objects, free items) */
    int32_t str_any;    /* a string without bounds (keys of free objects) */
    int32_t num_any;    /* a number */
    int32_t lit_tfn;    /* true / false / null */
    char *source;       /* response_format text, "" if none */
};

static inline bool gbit(const uint8_t *set, uint8_t b)
{
    return (set[b >> 3] >> (b & 7)) & 1;
}

/* ---- the automaton's state ---- */

typedef enum gkind { F_VALUE, F_OBJ, F_ARR, F_STR, F_NUM, F_LIT } gkind;

typedef struct gframe {
    uint8_t kind;       /* gkind */
    uint8_t phase;      /* per kind (grammar.c) */
    uint8_t sub;        /* string: escape / \u / UTF-8 sub-state */
    uint8_t lo, hi;     /* string: range of the next UTF-8 continuation byte */
    uint8_t key;        /* string or literal: an object's key */
    uint16_t node;
    uint32_t n;         /* object: next property; array: items; string: chars;
                         * number: digits in this part; literal: bytes matched */
    uint32_t m;         /* object: current property; string: bytes pending */
    uint64_t mask;      /* literal: candidates; string: max << 32 | min */
} gframe;

typedef struct gstate {
    int32_t sp;         /* frames in use; 0: the value is complete */
    uint32_t ws;        /* whitespace bytes in a row */
    gframe f[GRAMMAR_MAX_DEPTH];
} gstate;

static inline void gstate_copy(gstate *dst, const gstate *src)
{
    __builtin_memcpy(dst, src, __builtin_offsetof(gstate, f) + (size_t)src->sp * sizeof(gframe));
}

/* grammar.c */
void gstate_init(const ekv_grammar *g, gstate *s);
bool gstate_step(const ekv_grammar *g, gstate *s, uint8_t b);
bool gstate_accepting(const ekv_grammar *g, const gstate *s);
/* The top frame is a string's plain body (no escape or UTF-8 pending). */
bool gstate_in_plain_string(const gstate *s);
/* The top frame is a string right after its '\'. */
bool gstate_in_string_escape(const gstate *s);

/* ---- the vocab trie (grammar_mask.c) ---- */

/* Tokens' byte strings in a trie laid out in preorder: node i's subtree is
 * [i, end[i]); its byte sits at depth[i] (1 = a token's first byte). */
typedef struct gtrie {
    int32_t n_nodes;
    uint8_t *byte;
    uint16_t *depth;
    int32_t *end;
    int32_t *tok;       /* first token ending here, or -1 */
    int32_t max_depth;
} gtrie;

struct ekv_grammar_vocab {
    const ekv_tokenizer *t;
    int32_t n_vocab;
    int32_t n_words;       /* 64-bit words of a token bitmap */
    uint64_t *eog;         /* end-of-generation tokens */
    gtrie trie;            /* every non-control token */
    int32_t *next_same;    /* next token with the same bytes (trie), or -1 */
    /* string fast path: tokens that are all plain string body from a
     * character boundary, and the rest that continue with '"' or '\' */
    uint64_t *plain;
    uint16_t *plain_chars; /* characters such a token starts (for the
                            * others: its plain prefix starts) */
    uint16_t *plain_len;   /* bytes of that plain prefix */
    gtrie sfx;             /* those other tokens' bytes from the '"' or '\' on */
    int32_t *sfx_next;     /* next token with the same suffix, or -1 */
    /* right after a '\' in a string: tokens by first byte, and whether the
     * rest of each is plain string body (with its characters) */
    int32_t first_off[257];
    int32_t *by_first;
    uint64_t *tail_plain;
    uint16_t *tail_chars;
};

struct grammar_state {
    ekv_grammar *g;
    const ekv_grammar_vocab *v;
    gstate cur;
    gstate *walk;          /* v->trie.max_depth + 1 states for the trie walk */
    uint64_t *allowed;     /* n_words */
};

#endif
