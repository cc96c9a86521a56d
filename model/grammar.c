/*
 * grammar.c - the JSON automaton of a compiled schema (see grammar.h): a
 * stack of frames, one per value being written, advanced one byte at a
 * time. Everything here is a pure function of (grammar, state, byte), so the
 * token mask (grammar_mask.c) can copy a state and try bytes on the copy.
 *
 * Frames: F_VALUE waits for the first byte of a value of its node and turns
 * into the frame of the value that byte starts (F_OBJ, F_ARR, F_STR, F_NUM,
 * F_LIT). A finished value pops and tells its parent (value_done). Numbers
 * and bare literals (true, 12) have no closing byte: they end at the first
 * byte that cannot continue them, which then goes to the parent.
 */
#include <stdlib.h>
#include <string.h>

#include "grammar_internal.h"

enum { O_OPEN, O_KEY, O_KEYMATCH, O_COLON, O_VALUE, O_AFTER };      /* F_OBJ */
enum { A_OPEN, A_ITEM, A_AFTER };                                   /* F_ARR */
enum { S_NORM, S_ESC, S_HEX, S_UTF8 };                              /* F_STR sub */
enum { N_START, N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP }; /* F_NUM */

static bool is_ws(uint8_t b)
{
    return b == ' ' || b == '\n' || b == '\t' || b == '\r';
}

static bool is_digit(uint8_t b)
{
    return b >= '0' && b <= '9';
}

static bool is_hex(uint8_t b)
{
    return is_digit(b) || (b >= 'a' && b <= 'f') || (b >= 'A' && b <= 'F');
}

/* Structural whitespace, bounded so a model cannot loop on blanks. */
static bool take_ws(gstate *s)
{
    if (s->ws >= GRAMMAR_MAX_WS)
        return false;
    s->ws++;
    return true;
}

static const glit *lit_of(const ekv_grammar *g, const gframe *f, int i)
{
    const gnode *nd = &g->nodes[f->node];
    return f->key ? &g->lits[g->props[nd->a0 + i].lit] : &g->lits[nd->a0 + i];
}

/* The candidate of a literal frame that is complete (bytes matched == its
 * length), or -1. */
static int lit_complete(const ekv_grammar *g, const gframe *f)
{
    for (uint64_t m = f->mask; m; m &= m - 1) {
        const int i = __builtin_ctzll(m);
        if (lit_of(g, f, i)->len == f->n)
            return i;
    }
    return -1;
}

static bool num_accepting(const gframe *f)
{
    return f->phase == N_ZERO || f->phase == N_INT || f->phase == N_FRAC || f->phase == N_EXP;
}

/* A schema object's properties that may come next: from f->n up to and
 * including the first required one. */
static uint64_t key_window(const ekv_grammar *g, const gframe *f)
{
    const gnode *nd = &g->nodes[f->node];
    uint64_t w = 0;
    for (int32_t i = (int32_t)f->n; i < nd->n; i++) {
        w |= 1ull << i;
        if (g->props[nd->a0 + i].required)
            break;
    }
    return w;
}

static bool obj_can_close(const ekv_grammar *g, const gframe *f)
{
    const gnode *nd = &g->nodes[f->node];
    if (nd->type == G_ANY)
        return true;
    for (int32_t i = (int32_t)f->n; i < nd->n; i++)
        if (g->props[nd->a0 + i].required)
            return false;
    return true;
}

static bool push(gstate *s, gframe f)
{
    if (s->sp >= GRAMMAR_MAX_DEPTH)
        return false;
    s->f[s->sp++] = f;
    return true;
}

static gframe value_frame(int32_t node)
{
    return (gframe){.kind = F_VALUE, .node = (uint16_t)node};
}

static gframe string_frame(const ekv_grammar *g, int32_t node, bool key)
{
    const gnode *nd = &g->nodes[node];
    return (gframe){.kind = F_STR,
                    .node = (uint16_t)node,
                    .key = key,
                    .mask = (uint64_t)nd->max << 32 | nd->min};
}

/* The top frame's value is complete: pop it and move its parent on. */
static void value_done(const ekv_grammar *g, gstate *s)
{
    const gframe done = s->f[--s->sp];
    if (s->sp == 0)
        return;
    gframe *p = &s->f[s->sp - 1];
    if (p->kind == F_ARR) {
        p->n++;
        p->phase = A_AFTER;
    } else if (p->phase == O_KEYMATCH) {
        if (done.kind == F_LIT) { /* a schema object's key: which property */
            const int i = lit_complete(g, &done);
            p->m = (uint32_t)i;
            p->n = (uint32_t)i + 1;
        }
        p->phase = O_COLON;
    } else {
        p->phase = O_AFTER;
    }
}

/* f (an F_VALUE at the top) starts a value of its node with byte b. */
static bool start_value(const ekv_grammar *g, gstate *s, gframe *f, uint8_t b)
{
    int32_t node = f->node;
    const gnode *nd = &g->nodes[node];
    if (!gbit(nd->first, b))
        return false;
    while (nd->type == G_ANYOF) { /* first bytes are disjoint: b picks one */
        int32_t k = 0;
        while (k < nd->n && !gbit(g->nodes[g->alts[nd->a0 + k]].first, b))
            k++;
        if (k == nd->n)
            return false;
        node = g->alts[nd->a0 + k];
        nd = &g->nodes[node];
    }
    if (nd->type == G_ANY) {
        if (b == '{' || b == '[') {
            if (s->sp >= GRAMMAR_MAX_DEPTH)
                return false; /* no room for a member: stays flat */
            *f = (gframe){.kind = b == '{' ? F_OBJ : F_ARR, .node = (uint16_t)node};
            return true;
        }
        if (b == '"') {
            *f = string_frame(g, g->str_any, false);
            return true;
        }
        node = b == '-' || is_digit(b) ? g->num_any : g->lit_tfn;
        nd = &g->nodes[node];
    }
    switch (nd->type) {
    case G_OBJECT:
        *f = (gframe){.kind = F_OBJ, .node = (uint16_t)node};
        return true;
    case G_ARRAY:
        *f = (gframe){.kind = F_ARR, .node = (uint16_t)node};
        return true;
    case G_STRING:
        *f = string_frame(g, node, false);
        return true;
    case G_INTEGER:
    case G_NUMBER:
        *f = (gframe){.kind = F_NUM, .node = (uint16_t)node, .phase = N_START};
        return gstate_step(g, s, b);
    case G_LITERALS:
        *f = (gframe){.kind = F_LIT,
                      .node = (uint16_t)node,
                      .mask = nd->n >= 64 ? ~0ull : (1ull << nd->n) - 1};
        return gstate_step(g, s, b);
    default:
        return false;
    }
}

/* Returns 1: consumed, 0: rejected, 2: the number ended before b (popped;
 * b goes to the parent). */
static int num_step(const ekv_grammar *g, gframe *f, uint8_t b)
{
    const bool integer = g->nodes[f->node].type == G_INTEGER;
    const bool digit = is_digit(b);
    switch (f->phase) {
    case N_START:
        if (b == '-') {
            f->phase = N_MINUS;
            return 1;
        }
        /* fall through */
    case N_MINUS:
        if (!digit)
            return 0;
        f->phase = b == '0' ? N_ZERO : N_INT;
        f->n = 1;
        return 1;
    case N_INT:
        if (digit) {
            if (f->n >= GRAMMAR_MAX_DIGITS)
                return 0;
            f->n++;
            return 1;
        }
        /* fall through */
    case N_ZERO:
        if (!integer && b == '.') {
            f->phase = N_DOT;
            return 1;
        }
        if (!integer && (b == 'e' || b == 'E')) {
            f->phase = N_E;
            return 1;
        }
        return 2;
    case N_DOT:
        if (!digit)
            return 0;
        f->phase = N_FRAC;
        f->n = 1;
        return 1;
    case N_FRAC:
        if (digit) {
            if (f->n >= GRAMMAR_MAX_DIGITS)
                return 0;
            f->n++;
            return 1;
        }
        if (b == 'e' || b == 'E') {
            f->phase = N_E;
            return 1;
        }
        return 2;
    case N_E:
        if (b == '+' || b == '-') {
            f->phase = N_ESIGN;
            return 1;
        }
        /* fall through */
    case N_ESIGN:
        if (!digit)
            return 0;
        f->phase = N_EXP;
        f->n = 1;
        return 1;
    case N_EXP:
        if (digit) {
            if (f->n >= GRAMMAR_MAX_EXP_DIGITS)
                return 0;
            f->n++;
            return 1;
        }
        return 2;
    }
    return 0;
}

/* One byte of a string's body; the string's character bounds live in the
 * frame (mask: max << 32 | min) so the mask can relax them. */
static bool str_step(const ekv_grammar *g, gstate *s, gframe *f, uint8_t b)
{
    const uint32_t min = (uint32_t)f->mask, max = (uint32_t)(f->mask >> 32);
    switch (f->sub) {
    case S_ESC:
        if (b == 'u') {
            f->sub = S_HEX;
            f->m = 4;
            return true;
        }
        if (!strchr("\"\\/bfnrt", b) || b == 0)
            return false;
        f->sub = S_NORM;
        return true;
    case S_HEX:
        if (!is_hex(b))
            return false;
        if (--f->m == 0)
            f->sub = S_NORM;
        return true;
    case S_UTF8:
        if (b < f->lo || b > f->hi)
            return false;
        f->lo = 0x80, f->hi = 0xBF;
        if (--f->m == 0)
            f->sub = S_NORM;
        return true;
    }
    if (b == '"') {
        if (f->n < min)
            return false;
        value_done(g, s);
        return true;
    }
    if (b < 0x20 || (b >= 0x80 && b < 0xC2) || b > 0xF4)
        return false; /* control characters, stray continuation bytes, overlongs */
    if (f->n >= max)
        return false;
    f->n++;
    if (b == '\\') {
        f->sub = S_ESC;
    } else if (b >= 0xC2) { /* RFC 3629's table of well-formed sequences */
        f->sub = S_UTF8;
        f->m = b < 0xE0 ? 1 : b < 0xF0 ? 2 : 3;
        f->lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80;
        f->hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
    }
    return true;
}

void gstate_init(const ekv_grammar *g, gstate *s)
{
    s->sp = 0;
    s->ws = 0;
    push(s, value_frame(g->root));
}

bool gstate_step(const ekv_grammar *g, gstate *s, uint8_t b)
{
    if (!is_ws(b))
        s->ws = 0;
    for (;;) {
        if (s->sp == 0)
            return false; /* nothing after the value */
        gframe *f = &s->f[s->sp - 1];
        switch (f->kind) {
        case F_VALUE:
            return is_ws(b) ? take_ws(s) : start_value(g, s, f, b);
        case F_STR:
            return str_step(g, s, f, b);
        case F_NUM: {
            const int r = num_step(g, f, b);
            if (r != 2)
                return r == 1;
            value_done(g, s);
            continue;
        }
        case F_LIT: {
            uint64_t keep = 0;
            for (uint64_t m = f->mask; m; m &= m - 1) {
                const int i = __builtin_ctzll(m);
                const glit *l = lit_of(g, f, i);
                if (l->len > f->n && (uint8_t)g->text[l->off + f->n] == b)
                    keep |= 1ull << i;
            }
            if (!keep) { /* a bare literal may end here; b is its parent's */
                if (lit_complete(g, f) < 0)
                    return false;
                value_done(g, s);
                continue;
            }
            f->mask = keep;
            f->n++;
            const int done = lit_complete(g, f);
            if (done >= 0 && b && strchr("\"]}", b)) /* closed: nothing can extend it */
                value_done(g, s);
            return true;
        }
        case F_OBJ: {
            const bool free_keys = g->nodes[f->node].type == G_ANY;
            if (is_ws(b))
                return take_ws(s);
            switch (f->phase) {
            case O_OPEN:
            case O_AFTER:
                if (b == '}') {
                    if (!obj_can_close(g, f))
                        return false;
                    value_done(g, s);
                    return true;
                }
                if (f->phase == O_AFTER) {
                    if (b != ',' || (!free_keys && key_window(g, f) == 0))
                        return false;
                    f->phase = O_KEY;
                    return true;
                }
                /* O_OPEN takes a key: */
                /* fall through */
            case O_KEY: {
                if (b != '"')
                    return false;
                if (free_keys) {
                    f->phase = O_KEYMATCH;
                    return push(s, string_frame(g, g->str_any, true));
                }
                const uint64_t w = key_window(g, f);
                if (!w)
                    return false;
                f->phase = O_KEYMATCH;
                return push(s, (gframe){.kind = F_LIT, .node = f->node, .key = 1, .n = 1, .mask = w});
            }
            case O_COLON:
                if (b != ':')
                    return false;
                f->phase = O_VALUE;
                return push(s, value_frame(free_keys ? g->any
                                                     : g->props[g->nodes[f->node].a0 + f->m].node));
            default:
                return false;
            }
        }
        case F_ARR: {
            const gnode *nd = &g->nodes[f->node];
            const bool any = nd->type == G_ANY;
            const uint32_t min = any ? 0 : nd->min, max = any ? GRAMMAR_UNBOUNDED : nd->max;
            const int32_t items = any ? g->any : nd->items;
            if (is_ws(b))
                return take_ws(s);
            if (b == ']') {
                if ((f->phase == A_OPEN ? 0 : f->n) < min)
                    return false;
                value_done(g, s);
                return true;
            }
            if (f->phase == A_AFTER) {
                if (b != ',' || f->n >= max)
                    return false;
                f->phase = A_ITEM;
                return push(s, value_frame(items));
            }
            if (f->phase != A_OPEN || max == 0)
                return false;
            f->phase = A_ITEM; /* b starts the first item */
            if (!push(s, value_frame(items)))
                return false;
            continue;
        }
        }
        return false;
    }
}

bool gstate_accepting(const ekv_grammar *g, const gstate *s)
{
    if (s->sp == 0)
        return true;
    if (s->sp > 1)
        return false;
    const gframe *f = &s->f[0]; /* a bare top-level number or literal */
    return (f->kind == F_NUM && num_accepting(f)) || (f->kind == F_LIT && lit_complete(g, f) >= 0);
}

bool gstate_in_plain_string(const gstate *s)
{
    return s->sp > 0 && s->f[s->sp - 1].kind == F_STR && s->f[s->sp - 1].sub == S_NORM;
}

bool gstate_in_string_escape(const gstate *s)
{
    return s->sp > 0 && s->f[s->sp - 1].kind == F_STR && s->f[s->sp - 1].sub == S_ESC;
}

/* ---- the public state ---- */

grammar_state *grammar_state_new(ekv_grammar *g, const ekv_grammar_vocab *v, ekv_error *err)
{
    grammar_state *s = calloc(1, sizeof *s);
    if (!s)
        goto oom;
    s->g = g;
    s->v = v;
    gstate_init(g, &s->cur);
    if (v) {
        s->walk = malloc(((size_t)v->trie.max_depth + 2) * sizeof *s->walk);
        s->allowed = malloc((size_t)v->n_words * sizeof *s->allowed);
        if (!s->walk || !s->allowed) {
            free(s->walk);
            free(s->allowed);
            free(s);
            goto oom;
        }
    }
    grammar_retain(g);
    return s;
oom:
    ekv_error_set(err, EKV_ENOMEM, "grammar: out of memory for a state");
    return NULL;
}

void grammar_state_free(grammar_state *s)
{
    if (!s)
        return;
    grammar_release(s->g);
    free(s->walk);
    free(s->allowed);
    free(s);
}

ekv_status grammar_accept_bytes(grammar_state *s, const char *bytes, size_t len, ekv_error *err)
{
    gstate next;
    gstate_copy(&next, &s->cur);
    for (size_t i = 0; i < len; i++)
        if (!gstate_step(s->g, &next, (uint8_t)bytes[i]))
            return ekv_error_set(err, EKV_EINVAL,
                                 "grammar: byte %zu (0x%02x) of the output breaks the schema", i,
                                 (unsigned)(uint8_t)bytes[i]);
    gstate_copy(&s->cur, &next);
    return EKV_OK;
}

bool grammar_accepting(const grammar_state *s)
{
    return gstate_accepting(s->g, &s->cur);
}

bool grammar_done(const grammar_state *s)
{
    return s->cur.sp == 0;
}

bool grammar_matches(ekv_grammar *g, const char *text, size_t len)
{
    grammar_state *s = grammar_state_new(g, NULL, NULL);
    if (!s)
        return false;
    const bool ok = grammar_accept_bytes(s, text, len, NULL) == EKV_OK && grammar_accepting(s);
    grammar_state_free(s);
    return ok;
}
