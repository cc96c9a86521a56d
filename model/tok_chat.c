/*
 * tok_chat.c - the text side of the tokenizer: the streaming detokenizer
 * (ids -> complete UTF-8 characters) and chat-template rendering.
 *
 * Streaming: a byte-level BPE token can end in the middle of a UTF-8
 * character (an emoji is often 2-4 tokens), so the stream keeps the bytes of
 * an unfinished character (at most 3) until the rest arrives. Output is
 * always valid UTF-8: ill-formed bytes become U+FFFD, one per maximal
 * ill-formed subpart (the Unicode / WHATWG convention), so what a client sees
 * does not depend on how the bytes were split into tokens.
 *
 * Chat templates: rather than a Jinja interpreter, the two template families
 * in use by the supported models are recognised from the template text and
 * rendered by hand (see tokenizer.h for the exact formats). The one piece of
 * model-specific content, ChatML's default system prompt, is read out of the
 * template's own string literal so it is never hardcoded here.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ---- streaming detokenizer ---- */

void tok_stream_init(tok_stream *s, bool render_special)
{
    memset(s, 0, sizeof *s);
    s->render_special = render_special;
}

size_t tok_stream_min_cap(const ekv_tokenizer *t)
{
    return 3 * (t->max_piece + 4);
}

/* The bytes pending[0..np) followed by piece[0..n), read as one string. */
typedef struct joined {
    const uint8_t *pending, *piece;
    size_t np, n;
} joined;

static uint8_t jat(const joined *j, size_t k)
{
    return k < j->np ? j->pending[k] : j->piece[k - j->np];
}

/* At position k: > 0, the length of a complete valid character; 0, a valid
 * but unfinished prefix running to the end; < 0, an ill-formed sequence
 * whose maximal subpart is -r bytes (to be replaced by one U+FFFD). */
static int utf8_check(const joined *j, size_t k)
{
    size_t total = j->np + j->n;
    uint8_t b = jat(j, k), lo = 0x80, hi = 0xbf;
    int len;
    if (b < 0x80)
        return 1;
    if (b >= 0xc2 && b <= 0xdf)
        len = 2;
    else if (b == 0xe0)
        len = 3, lo = 0xa0; /* no overlongs */
    else if ((b >= 0xe1 && b <= 0xec) || b == 0xee || b == 0xef)
        len = 3;
    else if (b == 0xed)
        len = 3, hi = 0x9f; /* no surrogates */
    else if (b == 0xf0)
        len = 4, lo = 0x90;
    else if (b >= 0xf1 && b <= 0xf3)
        len = 4;
    else if (b == 0xf4)
        len = 4, hi = 0x8f; /* <= U+10FFFF */
    else
        return -1;
    for (int i = 1; i < len; i++) {
        if (k + (size_t)i >= total)
            return 0;
        uint8_t c = jat(j, k + (size_t)i);
        if (c < (i == 1 ? lo : 0x80) || c > (i == 1 ? hi : 0xbf))
            return -i;
    }
    return len;
}

static const char REPLACEMENT[3] = {(char)0xef, (char)0xbf, (char)0xbd};

size_t tok_stream_push(tok_stream *s, const ekv_tokenizer *t, int32_t id, char *out, size_t cap)
{
    if (id < 0 || id >= t->n_vocab)
        return 0;
    if (!s->render_special && (t->attr[id] & (ATTR_CONTROL | ATTR_UNKNOWN)))
        return 0;
    size_t len;
    const char *piece = tok_piece(t, id, &len);
    uint8_t pend[4];
    memcpy(pend, s->pending, sizeof pend);
    joined j = {.pending = pend, .np = s->n_pending, .piece = (const uint8_t *)piece, .n = len};
    size_t total = j.np + j.n, w = 0, k = 0;
    s->n_pending = 0;
    while (k < total) {
        int r = utf8_check(&j, k);
        if (r == 0) { /* unfinished character: keep it for the next token */
            while (k < total)
                s->pending[s->n_pending++] = jat(&j, k++);
            break;
        }
        size_t need = r > 0 ? (size_t)r : sizeof REPLACEMENT;
        if (w + need > cap)
            break; /* documented: the rest of this token is lost */
        if (r > 0) {
            for (int i = 0; i < r; i++)
                out[w++] = (char)jat(&j, k++);
        } else {
            memcpy(out + w, REPLACEMENT, sizeof REPLACEMENT);
            w += sizeof REPLACEMENT;
            k += (size_t)-r;
        }
    }
    return w;
}

size_t tok_stream_flush(tok_stream *s, char *out, size_t cap)
{
    size_t w = 0;
    if (s->n_pending && cap >= sizeof REPLACEMENT) {
        memcpy(out, REPLACEMENT, sizeof REPLACEMENT);
        w = sizeof REPLACEMENT;
    }
    s->n_pending = 0;
    return w;
}

/* ---- chat templates ---- */

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_add(sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_str(sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

/* Reads the Jinja string literal whose opening quote is at q, undoing its
 * escapes, into b. False if it is not terminated. */
static bool read_literal(const char *q, sbuf *b)
{
    char quote = *q;
    for (const char *p = q + 1; *p; p++) {
        if (*p == quote)
            return true;
        if (*p != '\\') {
            sb_add(b, p, 1);
            continue;
        }
        char c = *++p;
        if (!c)
            return false;
        const char *esc = c == 'n' ? "\n" : c == 't' ? "\t" : c == 'r' ? "\r" : NULL;
        if (esc)
            sb_str(b, esc);
        else
            sb_add(b, &c, 1); /* \\ \' \" and anything else: the character */
    }
    return false;
}

/* The default system prompt a ChatML template emits when messages[0] is not
 * a system message: the body of a literal '<|im_start|>system\n...<|im_end|>\n'
 * in the template. NULL when there is none, or on allocation failure (*oom). */
static char *chatml_default_system(const char *tmpl, bool *oom)
{
    static const char head[] = "<|im_start|>system\n", tail[] = "<|im_end|>\n";
    const char *at = tmpl;
    while ((at = strstr(at, "<|im_start|>system")) != NULL) {
        const char *q = at > tmpl ? at - 1 : NULL;
        at++;
        if (!q || (*q != '\'' && *q != '"'))
            continue; /* not at the start of a string literal */
        sbuf lit = {0};
        bool ok = read_literal(q, &lit);
        if (lit.oom) {
            free(lit.p);
            *oom = true;
            return NULL;
        }
        if (ok && lit.n >= sizeof head - 1 + sizeof tail - 1 &&
            memcmp(lit.p, head, sizeof head - 1) == 0 &&
            memcmp(lit.p + lit.n - (sizeof tail - 1), tail, sizeof tail - 1) == 0) {
            size_t body = lit.n - (sizeof head - 1) - (sizeof tail - 1);
            memmove(lit.p, lit.p + sizeof head - 1, body);
            lit.p[body] = '\0';
            if (!strstr(lit.p, "<|im_end|>"))
                return lit.p;
        }
        free(lit.p);
    }
    return NULL;
}

static bool is_trim_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static void render_chatml(const ekv_tokenizer *t, const tok_message *msgs, size_t n, bool gen,
                          sbuf *b)
{
    if (n > 0 && strcmp(msgs[0].role, "system") != 0) {
        char *sys = chatml_default_system(t->chat_template, &b->oom);
        if (sys) {
            sb_str(b, "<|im_start|>system\n");
            sb_str(b, sys);
            sb_str(b, "<|im_end|>\n");
            free(sys);
        }
    }
    for (size_t i = 0; i < n; i++) {
        sb_str(b, "<|im_start|>");
        sb_str(b, msgs[i].role);
        sb_str(b, "\n");
        sb_str(b, msgs[i].content);
        sb_str(b, "<|im_end|>\n");
    }
    if (gen)
        sb_str(b, "<|im_start|>assistant\n");
}

static void render_llama3(const tok_message *msgs, size_t n, bool gen, sbuf *b)
{
    for (size_t i = 0; i < n; i++) {
        const char *c = msgs[i].content, *end = c + strlen(c);
        while (c < end && is_trim_space(*c))
            c++;
        while (end > c && is_trim_space(end[-1]))
            end--;
        sb_str(b, "<|start_header_id|>");
        sb_str(b, msgs[i].role);
        sb_str(b, "<|end_header_id|>\n\n");
        sb_add(b, c, (size_t)(end - c));
        sb_str(b, "<|eot_id|>");
    }
    if (gen)
        sb_str(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

ekv_status tok_apply_chat(const ekv_tokenizer *t, const tok_message *msgs, size_t n,
                          bool add_generation_prompt, char **out, ekv_error *err)
{
    if (!t || !out || (n && !msgs))
        return ekv_error_set(err, EKV_EINVAL, "chat template: NULL argument");
    *out = NULL;
    for (size_t i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content)
            return ekv_error_set(err, EKV_EINVAL, "chat template: message %zu has no %s", i,
                                 msgs[i].role ? "content" : "role");
    const char *tmpl = t->chat_template;
    if (!tmpl)
        return ekv_error_set(err, EKV_EUNSUPPORTED, "chat template: the model has no tokenizer.chat_template");

    sbuf b = {0};
    sb_add(&b, "", 0); /* an empty prompt is still a string */
    if (strstr(tmpl, "<|im_start|>")) {
        render_chatml(t, msgs, n, add_generation_prompt, &b);
    } else if (strstr(tmpl, "<|start_header_id|>")) {
        if (strstr(tmpl, "Cutting Knowledge Date")) {
            free(b.p);
            return ekv_error_set(err, EKV_EUNSUPPORTED, "chat template: Llama 3.1+ templates "
                                 "(date/tool preamble) are not supported");
        }
        render_llama3(msgs, n, add_generation_prompt, &b);
    } else {
        free(b.p);
        return ekv_error_set(err, EKV_EUNSUPPORTED, "chat template: unrecognised template "
                             "(neither ChatML nor Llama 3)");
    }
    if (b.oom) {
        free(b.p);
        return ekv_error_set(err, EKV_ENOMEM, "chat template: out of memory");
    }
    *out = b.p;
    return EKV_OK;
}
