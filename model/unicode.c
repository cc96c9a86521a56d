/*
 * unicode.c - codepoint classes, lenient UTF-8 decoding and the BPE
 * pre-tokenizers (see unicode.h for why these mirror llama.cpp).
 *
 * A pre-tokenizer is a list of "regex" stages. Each stage takes the current
 * pieces and may cut each of them further, never merging across a piece
 * boundary (llama.cpp's unicode_regex_split feeds each stage the previous
 * stage's offsets). Stages here:
 *   - the hand-written GPT-2 and Llama-3 splitters, transcribed from
 *     llama.cpp's unicode_regex_split_custom_gpt2 / _llama3, including their
 *     quirks (e.g. "\s+(?!\S)" only backs off one space when the whitespace
 *     run does not end the piece);
 *   - the simple class regexes llama.cpp runs through std::regex: "\p{N}"
 *     (each match its own piece), "\p{N}+" / "[\p{P}$+<=>^~|]+" (maximal runs)
 *     and "[0-9][0-9][0-9]". Unmatched gaps between matches become pieces too.
 */
#include "unicode.h"

#include <stdbool.h>
#include <stdlib.h>

#define CPT_OUT_OF_RANGE 0xFFFFFFFFu

uint16_t ucd_flags(uint32_t cpt)
{
    if (cpt >= 0x110000)
        return 0;
    size_t lo = 0, hi = ucd_n_ranges; /* invariant: ranges[lo].first <= cpt */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (ucd_ranges[mid].first <= cpt)
            lo = mid;
        else
            hi = mid;
    }
    return ucd_ranges[lo].flags;
}

size_t utf8_decode_lenient(const uint8_t *s, size_t n, uint32_t *out)
{
    size_t i = 0, k = 0;
    while (i < n) {
        uint32_t b = s[i], cpt;
        size_t len;
        if (b < 0x80) {
            out[k++] = b;
            i++;
            continue;
        }
        if (!(b & 0x40)) {
            len = 0; /* continuation byte in lead position */
        } else if (!(b & 0x20)) {
            len = 2;
            cpt = b & 0x1f;
        } else if (!(b & 0x10)) {
            len = 3;
            cpt = b & 0x0f;
        } else if (!(b & 0x08)) {
            len = 4;
            cpt = b & 0x07;
        } else {
            len = 0;
        }
        bool ok = len > 0 && i + len <= n;
        for (size_t j = 1; ok && j < len; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                ok = false;
            else
                cpt = (cpt << 6) | (s[i + j] & 0x3f);
        }
        if (ok && cpt > 0x10ffff)
            ok = false;
        if (!ok) {
            out[k++] = 0xfffd;
            i++;
            continue;
        }
        out[k++] = cpt;
        i += len;
    }
    return k;
}

size_t utf8_encode(uint32_t cpt, uint8_t out[4])
{
    if (cpt <= 0x7f) {
        out[0] = (uint8_t)cpt;
        return 1;
    }
    if (cpt <= 0x7ff) {
        out[0] = (uint8_t)(0xc0 | (cpt >> 6));
        out[1] = (uint8_t)(0x80 | (cpt & 0x3f));
        return 2;
    }
    if (cpt <= 0xffff) {
        out[0] = (uint8_t)(0xe0 | (cpt >> 12));
        out[1] = (uint8_t)(0x80 | ((cpt >> 6) & 0x3f));
        out[2] = (uint8_t)(0x80 | (cpt & 0x3f));
        return 3;
    }
    out[0] = (uint8_t)(0xf0 | ((cpt >> 18) & 0x07));
    out[1] = (uint8_t)(0x80 | ((cpt >> 12) & 0x3f));
    out[2] = (uint8_t)(0x80 | ((cpt >> 6) & 0x3f));
    out[3] = (uint8_t)(0x80 | (cpt & 0x3f));
    return 4;
}

static bool lens_push(pretok_lens *l, size_t len)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        uint32_t *v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return false;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = (uint32_t)len;
    return true;
}

/* One piece [ini, end) of the text being split, with the bounded accessors
 * llama.cpp's splitters use: outside the piece a codepoint reads as
 * CPT_OUT_OF_RANGE and its flags as 0. */
typedef struct span {
    const uint32_t *cpts;
    size_t ini, end;
    size_t prev_end; /* end of the last emitted sub-piece */
    pretok_lens *out;
    bool oom;
} span;

static uint32_t sp_cpt(const span *s, size_t pos)
{
    return pos >= s->ini && pos < s->end ? s->cpts[pos] : CPT_OUT_OF_RANGE;
}

static uint16_t sp_flags(const span *s, size_t pos)
{
    return pos >= s->ini && pos < s->end ? ucd_flags(s->cpts[pos]) : 0;
}

/* Emits the sub-piece ending at end (nothing if empty). */
static void sp_emit(span *s, size_t end)
{
    if (end > s->prev_end && !lens_push(s->out, end - s->prev_end))
        s->oom = true;
    s->prev_end = end;
}

static bool is_contraction(const span *s, size_t pos, bool fold_case, size_t *len)
{
    if (s->cpts[pos] != '\'' || pos + 1 >= s->end)
        return false;
    /* llama.cpp lowercases with its Unicode table; only ASCII letters can
     * lowercase to the ASCII letters compared here, so ASCII folding agrees. */
    uint32_t a = s->cpts[pos + 1];
    if (fold_case && a >= 'A' && a <= 'Z')
        a += 'a' - 'A';
    if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        *len = 2;
        return true;
    }
    if (pos + 2 >= s->end)
        return false;
    uint32_t b = s->cpts[pos + 2];
    if (fold_case && b >= 'A' && b <= 'Z')
        b += 'a' - 'A';
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        *len = 3;
        return true;
    }
    return false;
}

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S) */
static void split_gpt2(span *s)
{
    const uint16_t WLN = UCD_WHITESPACE | UCD_LETTER | UCD_NUMBER;
    for (size_t pos = s->ini; pos < s->end && !s->oom;) {
        const uint32_t cpt = s->cpts[pos];
        size_t clen;
        if (is_contraction(s, pos, false, &clen)) {
            pos += clen;
            sp_emit(s, pos);
            continue;
        }
        uint16_t f2 = cpt == ' ' ? sp_flags(s, pos + 1) : sp_flags(s, pos);
        if (f2 & UCD_LETTER) {
            pos += cpt == ' ';
            while (f2 & UCD_LETTER)
                f2 = sp_flags(s, ++pos);
            sp_emit(s, pos);
            continue;
        }
        if (f2 & UCD_NUMBER) {
            pos += cpt == ' ';
            while (f2 & UCD_NUMBER)
                f2 = sp_flags(s, ++pos);
            sp_emit(s, pos);
            continue;
        }
        if (!(f2 & WLN) && f2) {
            pos += cpt == ' ';
            while (!(f2 & WLN) && f2)
                f2 = sp_flags(s, ++pos);
            sp_emit(s, pos);
            continue;
        }
        size_t nws = 0;
        while (sp_flags(s, pos + nws) & UCD_WHITESPACE)
            nws++;
        if (nws > 1 && pos + nws < s->end) { /* \s+(?!\S): leave the last one */
            pos += nws - 1;
            sp_emit(s, pos);
            continue;
        }
        if (nws > 0) {
            pos += nws;
            sp_emit(s, pos);
            continue;
        }
        sp_emit(s, ++pos);
    }
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
static void split_llama3(span *s)
{
    const uint16_t WLN = UCD_WHITESPACE | UCD_LETTER | UCD_NUMBER;
    for (size_t pos = s->ini; pos < s->end && !s->oom;) {
        const uint32_t cpt = s->cpts[pos];
        const uint16_t flags = sp_flags(s, pos);
        size_t clen;
        if (is_contraction(s, pos, true, &clen)) {
            pos += clen;
            sp_emit(s, pos);
            continue;
        }
        if (!(cpt == '\r' || cpt == '\n' || (flags & UCD_NUMBER)) &&
            ((flags & UCD_LETTER) || (sp_flags(s, pos + 1) & UCD_LETTER))) {
            pos++;
            while (sp_flags(s, pos) & UCD_LETTER)
                pos++;
            sp_emit(s, pos);
            continue;
        }
        if (flags & UCD_NUMBER) {
            size_t ini = pos;
            while (sp_flags(s, pos) & UCD_NUMBER) {
                if (++pos - ini >= 3) {
                    sp_emit(s, pos);
                    ini = pos;
                }
            }
            sp_emit(s, pos);
            continue;
        }
        uint16_t f2 = cpt == ' ' ? sp_flags(s, pos + 1) : flags;
        if (!(f2 & WLN) && flags) { /* llama.cpp tests flags, not f2, here */
            pos += cpt == ' ';
            while (!(f2 & WLN) && f2)
                f2 = sp_flags(s, ++pos);
            uint32_t c2 = sp_cpt(s, pos);
            while (c2 == '\r' || c2 == '\n')
                c2 = sp_cpt(s, ++pos);
            sp_emit(s, pos);
            continue;
        }
        size_t nws = 0, last_rn = 0;
        while (sp_flags(s, pos + nws) & UCD_WHITESPACE) {
            uint32_t c2 = sp_cpt(s, pos + nws);
            if (c2 == '\r' || c2 == '\n')
                last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) {
            pos = last_rn;
            sp_emit(s, pos);
            continue;
        }
        if (nws > 1 && pos + nws < s->end) {
            pos += nws - 1;
            sp_emit(s, pos);
            continue;
        }
        if (nws > 0) {
            pos += nws;
            sp_emit(s, pos);
            continue;
        }
        sp_emit(s, ++pos);
    }
}

typedef enum cls {
    CLS_NUMBER,        /* \p{N} */
    CLS_DEFAULT_PUNCT, /* [\p{P}\$\+<=>\^~\|] */
} cls;

static bool cls_match(cls c, uint32_t cpt)
{
    uint16_t f = ucd_flags(cpt);
    if (c == CLS_NUMBER)
        return f & UCD_NUMBER;
    if (f & UCD_PUNCTUATION)
        return true;
    return cpt == '$' || cpt == '+' || cpt == '<' || cpt == '=' || cpt == '>' || cpt == '^' ||
           cpt == '~' || cpt == '|';
}

/* "C" (each match alone) or "C+" (maximal runs) for a class C. */
static void split_class(span *s, cls c, bool runs)
{
    for (size_t pos = s->ini; pos < s->end && !s->oom;) {
        if (!cls_match(c, s->cpts[pos])) {
            pos++;
            continue;
        }
        sp_emit(s, pos); /* the gap before the match */
        pos++;
        while (runs && pos < s->end && cls_match(c, s->cpts[pos]))
            pos++;
        sp_emit(s, pos);
    }
    sp_emit(s, s->end);
}

/* "[0-9][0-9][0-9]": leftmost non-overlapping triples of ASCII digits. */
static void split_digit3(span *s)
{
#define ASCII_DIGIT(p) (s->cpts[p] >= '0' && s->cpts[p] <= '9')
    for (size_t pos = s->ini; pos < s->end && !s->oom;) {
        if (pos + 3 <= s->end && ASCII_DIGIT(pos) && ASCII_DIGIT(pos + 1) && ASCII_DIGIT(pos + 2)) {
            sp_emit(s, pos);
            pos += 3;
            sp_emit(s, pos);
        } else {
            pos++;
        }
    }
    sp_emit(s, s->end);
#undef ASCII_DIGIT
}

typedef enum stage {
    ST_GPT2,
    ST_LLAMA3,
    ST_NUMBER_EACH,  /* \p{N} */
    ST_NUMBER_RUNS,  /* \p{N}+ */
    ST_PUNCT_RUNS,   /* [\p{P}\$\+<=>\^~\|]+ */
    ST_DIGIT3,       /* [0-9][0-9][0-9] */
} stage;

static ekv_status run_stage(stage st, const uint32_t *cpts, const pretok_lens *in,
                            pretok_lens *out)
{
    out->n = 0;
    size_t start = 0;
    for (size_t i = 0; i < in->n; i++) {
        span s = {.cpts = cpts, .ini = start, .end = start + in->v[i], .prev_end = start,
                  .out = out};
        start = s.end;
        switch (st) {
        case ST_GPT2: split_gpt2(&s); break;
        case ST_LLAMA3: split_llama3(&s); break;
        case ST_NUMBER_EACH: split_class(&s, CLS_NUMBER, false); break;
        case ST_NUMBER_RUNS: split_class(&s, CLS_NUMBER, true); break;
        case ST_PUNCT_RUNS: split_class(&s, CLS_DEFAULT_PUNCT, true); break;
        case ST_DIGIT3: split_digit3(&s); break;
        }
        if (s.oom)
            return EKV_ENOMEM;
    }
    return EKV_OK;
}

ekv_status pretok_split(pretok_type type, const uint32_t *cpts, size_t n, pretok_lens *out,
                        pretok_lens *tmp)
{
    static const stage st_default[] = {ST_PUNCT_RUNS, ST_GPT2, ST_NUMBER_RUNS, ST_DIGIT3};
    static const stage st_gpt2[] = {ST_GPT2};
    static const stage st_smollm[] = {ST_NUMBER_EACH, ST_GPT2};
    static const stage st_llama3[] = {ST_LLAMA3};
    const stage *stages = st_default;
    size_t n_stages = 4;
    switch (type) {
    case PRETOK_DEFAULT: break;
    case PRETOK_GPT2: stages = st_gpt2; n_stages = 1; break;
    case PRETOK_SMOLLM: stages = st_smollm; n_stages = 2; break;
    case PRETOK_LLAMA3: stages = st_llama3; n_stages = 1; break;
    }

    /* Ping-pong between the two vectors; the result must end up in out. */
    pretok_lens *a = (n_stages % 2) ? tmp : out, *b = (n_stages % 2) ? out : tmp;
    a->n = 0;
    if (n == 0) {
        out->n = 0;
        return EKV_OK;
    }
    if (!lens_push(a, n))
        return EKV_ENOMEM;
    for (size_t i = 0; i < n_stages; i++) {
        ekv_status st = run_stage(stages[i], cpts, a, b);
        if (st != EKV_OK)
            return st;
        pretok_lens *t = a;
        a = b;
        b = t;
    }
    return EKV_OK;
}
