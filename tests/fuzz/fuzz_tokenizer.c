/*
 * fuzz_tokenizer.c - libFuzzer target for the tokenizer on untrusted text
 * (HTTP prompts and chat messages reach tok_encode and tok_apply_chat).
 *
 * The tokenizer is the demo model's (EKV_MODEL, else the path compiled in
 * from tests/CMakeLists.txt), so the real vocab, merges and special tokens
 * are exercised. Every input is encoded four ways (with and without BOS and
 * special-token parsing), and:
 *  - every id is inside the vocab, and BOS leads exactly when asked for;
 *  - the tokenizer is byte-level BPE, so for valid UTF-8 made of bytes
 *    the vocab has a token for, the pieces of the ids concatenate back to
 *    the input, special tokens included (their piece is their text);
 *  - the streaming detokenizer gives the same bytes for valid UTF-8 (with
 *    render_special), and valid UTF-8 for anything;
 *  - the input cut at 0x1E bytes into role/content pairs goes through the
 *    chat template, whose text must hold every role and content in order
 *    (ChatML) and encode.
 *
 * Run with scripts/fuzz.sh; seeds live in tests/fuzz/corpus/tokenizer/.
 */
#include "entrokv/tokenizer.h"
#include "fuzz_model.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static ekv_tokenizer *tok;
static int32_t vocab;
/* Bytes whose one-byte GPT-2 symbol is not in the vocab. SmolLM2 lacks a
 * few control bytes (0x04, ...); BPE has no token to give them and drops
 * them, as llama.cpp does, so the round trip holds only without them. */
static bool no_token[256];

/* GPT-2's bytes_to_unicode, from its definition: printable Latin-1 bytes
 * stand for themselves, the others for U+0100 + n in byte order. */
static void gpt2_byte_text(int b, char out[3], size_t *len)
{
    int n = 0, cp = -1;
    for (int x = 0; x < 256; x++) {
        bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
        if (x == b)
            cp = printable ? x : 256 + n;
        if (!printable)
            n++;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        *len = 1;
    } else {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        *len = 2;
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    tok = fuzz_load_tokenizer("fuzz_tokenizer");
    vocab = tok_vocab_size(tok);
    for (int b = 0; b < 256; b++) {
        char text[3];
        size_t len;
        gpt2_byte_text(b, text, &len);
        no_token[b] = tok_find(tok, text, len) < 0;
    }
    return 0;
}

/* Strict UTF-8 (no overlongs, surrogates, or values above U+10FFFF),
 * written here from RFC 3629 rather than taken from the code under test. */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            len = 2, cp = c & 0x1F, min = 0x80;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3, cp = c & 0x0F, min = 0x800;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return 0;
        }
        if (n - i < len)
            return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += len;
    }
    return 1;
}

/* The ids' pieces, concatenated; checks every id is in the vocab. */
static uint8_t *join_pieces(const int32_t *ids, size_t n, size_t *out_len)
{
    size_t cap = 64, len = 0;
    uint8_t *buf = malloc(cap);
    if (!buf)
        abort();
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab)
            abort();
        size_t pl;
        const char *p = tok_piece(tok, ids[i], &pl);
        if (!p)
            abort();
        if (len + pl > cap) {
            while (len + pl > cap)
                cap *= 2;
            buf = realloc(buf, cap);
            if (!buf)
                abort();
        }
        memcpy(buf + len, p, pl);
        len += pl;
    }
    *out_len = len;
    return buf;
}

static size_t drop_no_token(uint8_t *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (!no_token[s[i]])
            s[k++] = s[i];
    return k;
}

/* valid: 0 invalid UTF-8, 1 valid, 2 valid but with bytes the vocab lacks */
static void check_encode(const uint8_t *data, size_t size, int valid, bool bos, bool special)
{
    int32_t *ids = NULL;
    size_t n = 0;
    ekv_error err = {0};
    if (tok_encode(tok, (const char *)data, size, bos, special, &ids, &n, &err) != EKV_OK) {
        fprintf(stderr, "tok_encode failed on %zu bytes: %s\n", size, err.msg);
        abort(); /* below 2^31 bytes every input must encode */
    }
    if (!ids)
        abort();
    size_t skip = 0;
    if (bos && tok_bos(tok) >= 0) { /* asked for, whatever the model prefers */
        if (n == 0 || ids[0] != tok_bos(tok))
            abort();
        skip = 1;
    }
    if (size > 0 && n == skip && valid != 2)
        abort(); /* text never encodes to nothing (but bytes without a token do) */
    size_t len;
    uint8_t *back = join_pieces(ids + skip, n - skip, &len);
    if (valid == 2) { /* compare with the bytes no token stands for taken out of both */
        len = drop_no_token(back, len);
        uint8_t *in = malloc(size ? size : 1);
        if (!in)
            abort();
        memcpy(in, data, size);
        size_t in_len = drop_no_token(in, size);
        if (len != in_len || memcmp(back, in, len) != 0)
            abort();
        free(in);
    } else if (valid && (len != size || memcmp(back, data, size) != 0)) {
        fprintf(stderr, "decode(encode(x)) != x (bos %d, special %d): %zu bytes in, %zu out\n",
                bos, special, size, len);
        abort();
    }
    free(back);

    /* the streaming detokenizer: same bytes for valid UTF-8, and always
     * valid UTF-8 out */
    if (!bos) {
        tok_stream st;
        tok_stream_init(&st, true);
        size_t cap = tok_stream_min_cap(tok), out_cap = 3 * size + cap + 8, out_len = 0;
        char *out = malloc(out_cap);
        if (!out)
            abort();
        for (size_t i = 0; i < n; i++) {
            if (out_len + cap > out_cap)
                abort(); /* 3 bytes per input byte bounds the stream */
            out_len += tok_stream_push(&st, tok, ids[i], out + out_len, cap);
        }
        out_len += tok_stream_flush(&st, out + out_len, 3);
        if (!utf8_valid((const uint8_t *)out, out_len))
            abort();
        if (valid == 1 && (out_len != size || memcmp(out, data, size) != 0))
            abort();
        free(out);
    }
    free(ids);
}

#define MAX_MSGS 8

/* The input cut at 0x1E into role, content, role, content... */
static void check_chat(const uint8_t *data, size_t size)
{
    char *copy = malloc(size + 1);
    if (!copy)
        abort();
    memcpy(copy, data, size);
    copy[size] = 0;
    if (strlen(copy) != size) { /* NULs end C strings: not a chat input */
        free(copy);
        return;
    }
    const char *field[2 * MAX_MSGS];
    size_t n_field = 0;
    char *p = copy;
    for (;;) {
        field[n_field++] = p;
        char *sep = strchr(p, 0x1E);
        if (!sep || n_field == 2 * MAX_MSGS)
            break;
        *sep = 0;
        p = sep + 1;
    }
    if (n_field % 2)
        field[n_field++] = ""; /* a trailing role with empty content */
    tok_message msgs[MAX_MSGS];
    size_t n = n_field / 2;
    for (size_t i = 0; i < n; i++) {
        msgs[i].role = field[2 * i];
        msgs[i].content = field[2 * i + 1];
    }
    char *text = NULL;
    ekv_error err = {0};
    ekv_status rc = tok_apply_chat(tok, msgs, n, true, &text, &err);
    if (rc != EKV_OK) {
        if (!err.msg[0])
            abort();
        free(copy);
        return;
    }
    /* ChatML (the demo model's) keeps roles and contents verbatim, in
     * order; Llama 3 trims contents, so it gets only the encode check */
    const char *tmpl = tok_chat_template(tok);
    const char *at = text;
    for (size_t i = 0; tmpl && strstr(tmpl, "<|im_start|>") && i < n; i++) {
        const char *r = strstr(at, msgs[i].role);
        if (!r)
            abort();
        at = r + strlen(msgs[i].role);
        const char *c = strstr(at, msgs[i].content);
        if (!c)
            abort();
        at = c + strlen(msgs[i].content);
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    if (tok_encode(tok, text, strlen(text), tok_add_bos(tok), true, &ids, &n_ids, &err) !=
            EKV_OK ||
        n_ids == 0)
        abort();
    for (size_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            abort();
    free(ids);
    free(text);
    free(copy);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096)
        return 0; /* long inputs only slow the search (BPE's cost grows with a word's length) */
    int valid = utf8_valid(data, size);
    for (size_t i = 0; i < size && valid; i++)
        if (no_token[data[i]])
            valid = 2; /* a byte no token stands for is dropped: round trip without them */
    check_encode(data, size, valid, false, false);
    check_encode(data, size, valid, false, true);
    check_encode(data, size, valid, true, false);
    check_encode(data, size, valid, true, true);
    check_chat(data, size);
    return 0;
}
