/*
 * test_tokenizer.c - the BPE tokenizer against llama.cpp.
 *
 * Without the model: a tiny synthetic GGUF vocabulary (built in memory here)
 * checks merge priority, the byte fallback, special-token partition and the
 * load errors; the pre-tokenizers are checked piece by piece.
 * With models/SmolLM2-135M-Instruct.Q4_1.gguf (or argv[1] / $EKV_MODEL):
 * every case of tests/fixtures/tokenize.txt (ids from llama.cpp through
 * llama-cpp-python) must match exactly; plus ids for invalid UTF-8 taken from
 * llama.cpp, detokenization round trips, the streaming detokenizer on
 * characters split across tokens, the ChatML template, hostile inputs, and the
 * encode speed (one JSON line).
 */
#include "entrokv/tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../model/unicode.h"
#include "ekv_test.h"

#define MODEL_NAME "SmolLM2-135M-Instruct.Q4_1.gguf"

static const char *model_path;

/* ---- a GGUF writer for synthetic vocabularies ---- */

typedef struct gw {
    uint8_t *p;
    size_t n, cap;
    uint64_t n_kv;
} gw;

static void gw_bytes(gw *w, const void *b, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 256;
        w->p = realloc(w->p, w->cap);
        if (!w->p)
            abort();
    }
    memcpy(w->p + w->n, b, n);
    w->n += n;
}

static void gw_u32(gw *w, uint32_t v) { gw_bytes(w, &v, 4); } /* little-endian hosts */
static void gw_u64(gw *w, uint64_t v) { gw_bytes(w, &v, 8); }

static void gw_strn(gw *w, const char *s, size_t n)
{
    gw_u64(w, n);
    gw_bytes(w, s, n);
}

static void gw_str(gw *w, const char *s) { gw_strn(w, s, strlen(s)); }

static void kv_str(gw *w, const char *key, const char *val)
{
    gw_str(w, key);
    gw_u32(w, 8);
    gw_str(w, val);
    w->n_kv++;
}

static void kv_u32(gw *w, const char *key, uint32_t v)
{
    gw_str(w, key);
    gw_u32(w, 4);
    gw_u32(w, v);
    w->n_kv++;
}

/* GPT-2's bytes_to_unicode, written independently of the tokenizer's. */
static size_t gpt2_char(unsigned b, char out[2])
{
    unsigned cp = b, n = 0;
    if (!((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae))) {
        for (unsigned c = 0; c < b; c++)
            n += !((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || (c >= 0xae));
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xc0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

/* Tokens 0..255: the byte symbols in byte order (so a byte's id is its
 * value); then bc=256 ab=257 abc=258 <s>=259 (control) <user>=260 (user-defined). */
static const char *const extra_tokens[] = {"bc", "ab", "abc", "<s>", "<user>"};
static const int32_t extra_types[] = {1, 1, 1, 3, 4};

static gguf_file *synth_vocab(const char *model, const char *pre, const char *const *merges,
                              size_t n_merges, bool with_tokens, const char *chat_template,
                              gw *buf)
{
    gw body = {0};
    if (chat_template)
        kv_str(&body, "tokenizer.chat_template", chat_template);
    if (model)
        kv_str(&body, "tokenizer.ggml.model", model);
    if (pre)
        kv_str(&body, "tokenizer.ggml.pre", pre);
    if (with_tokens) {
        gw_str(&body, "tokenizer.ggml.tokens");
        gw_u32(&body, 9);
        gw_u32(&body, 8);
        gw_u64(&body, 261);
        for (unsigned b = 0; b < 256; b++) {
            char c[2];
            gw_strn(&body, c, gpt2_char(b, c));
        }
        for (int i = 0; i < 5; i++)
            gw_str(&body, extra_tokens[i]);
        body.n_kv++;
        gw_str(&body, "tokenizer.ggml.token_type");
        gw_u32(&body, 9);
        gw_u32(&body, 5);
        gw_u64(&body, 261);
        for (int i = 0; i < 261; i++)
            gw_u32(&body, i < 256 ? 1 : (uint32_t)extra_types[i - 256]);
        body.n_kv++;
    }
    if (merges) {
        gw_str(&body, "tokenizer.ggml.merges");
        gw_u32(&body, 9);
        gw_u32(&body, 8);
        gw_u64(&body, n_merges);
        for (size_t i = 0; i < n_merges; i++)
            gw_str(&body, merges[i]);
        body.n_kv++;
    }
    kv_u32(&body, "tokenizer.ggml.eos_token_id", 259);

    *buf = (gw){0};
    gw_bytes(buf, "GGUF", 4);
    gw_u32(buf, 3);
    gw_u64(buf, 0);
    gw_u64(buf, body.n_kv);
    gw_bytes(buf, body.p, body.n);
    while (buf->n % 32)
        gw_bytes(buf, "", 1);
    free(body.p);
    ekv_error err = {0};
    gguf_file *f = gguf_open_buffer(buf->p, buf->n, &err);
    if (!f)
        fprintf(stderr, "synthetic gguf: %s\n", err.msg);
    return f;
}

/* Encodes text and compares with the expected ids. */
static void check_ids(const ekv_tokenizer *t, const char *text, size_t len, bool ps,
                      const int32_t *want, size_t n_want, int line)
{
    int32_t *ids = NULL;
    size_t n = 0;
    ekv_error err = {0};
    ekv_status st = tok_encode(t, text, len, false, ps, &ids, &n, &err);
    bool same = st == EKV_OK && n == n_want && (n == 0 || memcmp(ids, want, n * sizeof *ids) == 0);
    if (!same) {
        fprintf(stderr, "line %d: encode mismatch (status %d, %s): got", line, st, err.msg);
        for (size_t i = 0; i < n; i++)
            fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n");
    }
    CHECK(same);
    free(ids);
}

#define CHECK_IDS(t, s, ps, ...)                                                           \
    do {                                                                                   \
        const int32_t w_[] = {__VA_ARGS__};                                                \
        check_ids(t, s, sizeof(s) - 1, ps, w_, sizeof w_ / sizeof w_[0], __LINE__);        \
    } while (0)

static ekv_tokenizer *synth_load(const char *pre, const char *const *merges, size_t n,
                                 const char *chat_template, gw *buf, gguf_file **fo)
{
    ekv_error err = {0};
    *fo = synth_vocab("gpt2", pre, merges, n, true, chat_template, buf);
    ekv_tokenizer *t = *fo ? tok_load(*fo, &err) : NULL;
    if (!t)
        fprintf(stderr, "synthetic load: %s\n", err.msg);
    return t;
}

static void test_bpe_merges_by_rank_on_synthetic_vocab(void)
{
    static const char *const m[] = {"b c", "a bc", "a b", "x y"};
    gw buf;
    gguf_file *f;
    ekv_tokenizer *t = synth_load("gpt-2", m, 4, NULL, &buf, &f);
    CHECK(t != NULL);
    if (t) {
        gguf_close(f); /* the tokenizer must not depend on the file */
        f = NULL;
        CHECK_IDS(t, "abc", false, 258);        /* b+c (rank 0), then a+bc */
        CHECK_IDS(t, "ab", false, 257);
        CHECK_IDS(t, "abcab", false, 258, 257); /* ties go left to right */
        CHECK_IDS(t, "xy", false, 'x', 'y');    /* "xy" merges but is no token: bytes */
        CHECK_IDS(t, "a<s>b", true, 'a', 259, 'b');
        CHECK_IDS(t, "a<s>b", false, 'a', '<', 's', '>', 'b');
        CHECK_IDS(t, "x<user>y", false, 'x', 260, 'y'); /* user-defined: always */
        CHECK_EQ_INT(tok_eos(t), 259);
        CHECK(tok_is_eog(t, 259));
        CHECK(!tok_is_eog(t, 258));
        CHECK(tok_is_control(t, 259));
        CHECK_EQ_INT(tok_find(t, "abc", 3), 258);
        CHECK_EQ_INT(tok_find(t, "zzz", 3), -1);
        size_t len;
        CHECK_STR(tok_piece(t, ' ', &len), " "); /* Ġ -> space */
        CHECK_STR(tok_piece(t, 259, &len), "<s>");
        CHECK(tok_piece(t, 261, &len) == NULL && len == 0);
        CHECK(tok_piece(t, -1, NULL) == NULL);
    }
    tok_free(t);
    gguf_close(f);
    free(buf.p);

    static const char *const m2[] = {"a b", "b c", "a bc"};
    t = synth_load("gpt-2", m2, 3, NULL, &buf, &f);
    CHECK(t != NULL);
    if (t)
        CHECK_IDS(t, "abc", false, 257, 'c'); /* a+b first: "ab c" is no merge */
    tok_free(t);
    gguf_close(f);
    free(buf.p);
}

static void expect_load_error(const char *model, const char *pre, bool tokens, bool merges,
                              ekv_status want, const char *msg_part)
{
    static const char *const m[] = {"a b"};
    gw buf;
    ekv_error err = {0};
    gguf_file *f = synth_vocab(model, pre, merges ? m : NULL, 1, tokens, NULL, &buf);
    ekv_tokenizer *t = f ? tok_load(f, &err) : NULL;
    if (want == EKV_OK) {
        CHECK(t != NULL);
    } else {
        CHECK(t == NULL);
        CHECK_EQ_INT(err.code, want);
        if (!strstr(err.msg, msg_part))
            fprintf(stderr, "message \"%s\" lacks \"%s\"\n", err.msg, msg_part);
        CHECK(strstr(err.msg, msg_part) != NULL);
    }
    tok_free(t);
    gguf_close(f);
    free(buf.p);
}

static void test_load_errors_are_clear(void)
{
    expect_load_error("llama", "default", true, true, EKV_EUNSUPPORTED, "SentencePiece");
    expect_load_error("bert", NULL, true, true, EKV_EUNSUPPORTED, "bert");
    expect_load_error(NULL, NULL, true, true, EKV_EFORMAT, "tokenizer.ggml.model");
    expect_load_error("gpt2", "smollm", false, true, EKV_EFORMAT, "tokenizer.ggml.tokens");
    expect_load_error("gpt2", "smollm", true, false, EKV_EFORMAT, "tokenizer.ggml.merges");
    expect_load_error("gpt2", "qwen2", true, true, EKV_EUNSUPPORTED, "qwen2");
    /* unknown names fall back to llama.cpp's default pre-tokenizer, silently */
    expect_load_error("gpt2", "brand-new-model", true, true, EKV_OK, NULL);
    expect_load_error("gpt2", NULL, true, true, EKV_OK, NULL);
}

/* Renders msgs with template tmpl on a synthetic vocab; NULL on error. */
static char *render_with(const char *tmpl, const tok_message *msgs, size_t n, bool gen,
                         ekv_status *st)
{
    static const char *const m[] = {"a b"};
    gw buf;
    gguf_file *f;
    char *out = NULL;
    ekv_tokenizer *t = synth_load("gpt-2", m, 1, tmpl, &buf, &f);
    gguf_close(f);
    free(buf.p); /* the tokenizer keeps its own copy of the template */
    *st = t ? tok_apply_chat(t, msgs, n, gen, &out, NULL) : EKV_EINVAL;
    tok_free(t);
    return out;
}

static void test_chat_template_families_on_synthetic_vocab(void)
{
    /* Meta's Llama 3 (3.0) template */
    static const char llama3[] =
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
        "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
        "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
        "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    /* ChatML with the default system prompt in a double-quoted, escaped literal */
    static const char chatml[] =
        "{% if messages[0]['role'] != 'system' %}{{ \"<|im_start|>system\\nYou are \\\"Q\\\".<|im_end|>\\n\" }}"
        "{% endif %}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
    tok_message msgs[] = {{"system", "  Be brief.\n"}, {"user", "Hi"}};
    ekv_status st;
    char *out = render_with(llama3, msgs, 2, true, &st);
    CHECK_EQ_INT(st, EKV_OK);
    if (out)
        CHECK_STR(out, "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n");
    free(out);
    out = render_with(chatml, msgs + 1, 1, false, &st);
    CHECK_EQ_INT(st, EKV_OK);
    if (out)
        CHECK_STR(out, "<|im_start|>system\nYou are \"Q\".<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    free(out);
    out = render_with(NULL, msgs, 2, true, &st);
    CHECK(out == NULL && st == EKV_EUNSUPPORTED);
    out = render_with("{{ messages }}", msgs, 2, true, &st);
    CHECK(out == NULL && st == EKV_EUNSUPPORTED);
    out = render_with("<|start_header_id|>Cutting Knowledge Date: December 2023", msgs, 2, true, &st);
    CHECK(out == NULL && st == EKV_EUNSUPPORTED);
}

/* Splits text with a pre-tokenizer and compares the pieces with want
 * (NULL-terminated list of UTF-8 strings). */
static void check_pieces(pretok_type type, const char *text, const char *const *want, int line)
{
    size_t len = strlen(text), n;
    uint32_t *cpts = malloc((len + 1) * sizeof *cpts);
    n = utf8_decode_lenient((const uint8_t *)text, len, cpts);
    pretok_lens out = {0}, tmp = {0};
    bool ok = pretok_split(type, cpts, n, &out, &tmp) == EKV_OK;
    size_t pos = 0, k = 0;
    for (size_t i = 0; ok && i < out.n; i++, k++) {
        char piece[256];
        size_t pl = 0;
        for (uint32_t j = 0; j < out.v[i]; j++)
            pl += utf8_encode(cpts[pos + j], (uint8_t *)piece + pl);
        piece[pl] = '\0';
        pos += out.v[i];
        if (!want[k] || strcmp(piece, want[k]) != 0) {
            fprintf(stderr, "line %d: piece %zu is \"%s\", want \"%s\"\n", line, i, piece,
                    want[k] ? want[k] : "(end)");
            ok = false;
        }
    }
    CHECK(ok && want[k] == NULL && pos == n);
    free(cpts);
    free(out.v);
    free(tmp.v);
}

#define CHECK_PIECES(type, text, ...)                                                      \
    do {                                                                                   \
        const char *const w_[] = {__VA_ARGS__, NULL};                                      \
        check_pieces(type, text, w_, __LINE__);                                            \
    } while (0)

static void test_pretokenizers_cut_like_llama_cpp(void)
{
    /* digits alone; "\s+(?!\S)" leaves the last space to the next word */
    CHECK_PIECES(PRETOK_SMOLLM, "Hello  world 123", "Hello", " ", " world", " ", "1", "2", "3");
    CHECK_PIECES(PRETOK_SMOLLM, "it's 3.5%!", "it", "'s", " ", "3", ".", "5", "%!");
    CHECK_PIECES(PRETOK_GPT2, "  x\n\ny ", " ", " x", "\n", "\n", "y", " "); /* only a space joins a word */
    CHECK_PIECES(PRETOK_GPT2, "x 42 \xc3\xa9t\xc3\xa9", "x", " 42", " \xc3\xa9t\xc3\xa9");
    CHECK_PIECES(PRETOK_DEFAULT, "a+=b 12345!!", "a", "+=", "b", " ", "123", "45", "!!");
    CHECK_PIECES(PRETOK_LLAMA3, "I'M here\n\n  12345", "I", "'M", " here", "\n\n", " ", " ",
                 "123", "45");
}

/* ---- with the model ---- */

static ekv_tokenizer *load_model(void)
{
    ekv_error err = {0};
    gguf_file *f = gguf_open(model_path, &err);
    if (!f)
        return NULL;
    ekv_tokenizer *t = tok_load(f, &err);
    if (!t)
        fprintf(stderr, "tok_load: %s\n", err.msg);
    gguf_close(f);
    return t;
}

static int hexval(int c)
{
    return c <= '9' ? c - '0' : (c | 32) - 'a' + 10;
}

static void test_fixture_cases_match_llama_cpp(const ekv_tokenizer *t)
{
    FILE *fp = fopen(EKV_FIXTURES "/tokenize.txt", "r");
    if (!fp) {
        fprintf(stderr, "skip: " EKV_FIXTURES "/tokenize.txt not found\n");
        return;
    }
    static char line[1 << 16];
    int cases = 0, matched = 0;
    while (fgets(line, sizeof line, fp)) {
        if (strncmp(line, "case ", 5) != 0)
            continue;
        char *p = line + 5, *hex;
        int ps = (int)strtol(p, &p, 10);
        hex = strtok(p, " \n");
        char *text = malloc(strlen(hex) / 2 + 1);
        size_t len = 0;
        for (char *h = hex; strcmp(hex, "-") != 0 && h[0] && h[1]; h += 2)
            text[len++] = (char)(hexval(h[0]) * 16 + hexval(h[1]));
        long n_want = strtol(strtok(NULL, " \n"), NULL, 10);
        int32_t *want = malloc(((size_t)n_want + 1) * sizeof *want);
        for (long i = 0; i < n_want; i++)
            want[i] = (int32_t)strtol(strtok(NULL, " \n"), NULL, 10);
        int before = ekv_test_failures;
        check_ids(t, text, len, ps, want, (size_t)n_want, cases + 1);
        matched += ekv_test_failures == before;
        cases++;
        free(text);
        free(want);
    }
    fclose(fp);
    fprintf(stderr, "fixture: %d/%d cases identical to llama.cpp\n", matched, cases);
    CHECK(cases > 0);
}

static void test_invalid_utf8_matches_llama_cpp(const ekv_tokenizer *t)
{
    /* expected ids from llama.cpp (llama-cpp-python 0.3.36): each invalid
     * byte is U+FFFD (token 24211 is its three bytes) */
    CHECK_IDS(t, "\xff", false, 24211);
    CHECK_IDS(t, "a\x80" "b", false, 81, 24211, 82);
    CHECK_IDS(t, "\xe4\xb8", false, 24211, 24211);
    CHECK_IDS(t, "x\xc0\x80y", false, 104, 190, 105); /* overlong NUL decodes to NUL */
    CHECK_IDS(t, "\xed\xa0\x80", false, 184, 250, 218);
    CHECK_IDS(t, "a\0b", false, 81, 190, 82);
    CHECK_IDS(t, "<|im_start|>user\nhi<|im_end|>", true, 1, 4093, 198, 6004, 2);
    CHECK_IDS(t, "<|im_start|>user\nhi<|im_end|>", false, 44, 108, 306, 79, 3738, 108, 46,
              4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46);
}

static char *detok(const ekv_tokenizer *t, const int32_t *ids, size_t n, size_t *len)
{
    size_t cap = 64, w = 0;
    for (size_t i = 0; i < n; i++) {
        size_t pl;
        tok_piece(t, ids[i], &pl);
        cap += pl;
    }
    char *s = malloc(cap);
    for (size_t i = 0; i < n; i++) {
        size_t pl;
        const char *p = tok_piece(t, ids[i], &pl);
        memcpy(s + w, p, pl);
        w += pl;
    }
    s[w] = '\0';
    *len = w;
    return s;
}

static const char *const round_trip_texts[] = {
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing   \n\n\ttabs\r\nand CRLF  ",
    "Numbers 3.14159, 1,000,000 and 2024-01-01T12:00:00Z",
    "caf\xc3\xa9 na\xc3\xafve \xc3\234ber \xce\xb1\xce\xb2\xce\xb3 \xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82",
    "\xe4\xb8\xad\xe6\x96\x87\xe5\xad\x97\xe7\xac\xa6 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xed\x95\x9c\xea\xb5\xad\xec\x96\xb4",
    "emoji \xf0\x9f\x98\x80\xf0\x9f\x8e\x89\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd \xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9",
    "def f(x):\n    return x ** 2  # comment\n",
};

static void test_detokenize_round_trips(const ekv_tokenizer *t)
{
    for (size_t i = 0; i < sizeof round_trip_texts / sizeof *round_trip_texts; i++) {
        const char *s = round_trip_texts[i];
        int32_t *ids;
        size_t n, len;
        CHECK(tok_encode(t, s, strlen(s), false, false, &ids, &n, NULL) == EKV_OK);
        char *back = detok(t, ids, n, &len);
        CHECK_STR(back, s);
        free(back);
        free(ids);
    }
}

/* True when s[0..n) is complete, well-formed UTF-8. */
static bool utf8_valid(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        int len = s[i] < 0x80 ? 1 : s[i] >= 0xc2 && s[i] <= 0xdf ? 2 : s[i] >= 0xe0 && s[i] <= 0xef ? 3
                : s[i] >= 0xf0 && s[i] <= 0xf4 ? 4 : 0;
        if (!len || i + (size_t)len > n)
            return false;
        for (int j = 1; j < len; j++)
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
        i += (size_t)len;
    }
    return true;
}

static void test_stream_emits_only_complete_characters(const ekv_tokenizer *t)
{
    const char *s = "Hi \xf0\x9f\x91\x8b \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x8e\x89\xf0\x9f\x8e\x89 "
                    "na\xc3\xafve caf\xc3\xa9 \xf0\x9f\x98\x80\xe4\xb8\xad";
    int32_t *ids;
    size_t n;
    CHECK(tok_encode(t, s, strlen(s), false, false, &ids, &n, NULL) == EKV_OK);
    size_t cap = tok_stream_min_cap(t), total = 0;
    CHECK(cap >= 3 * tok_max_piece_len(t));
    char *chunk = malloc(cap), *all = malloc(strlen(s) + cap + 8);
    tok_stream st;
    tok_stream_init(&st, false);
    int split_tokens = 0;
    for (size_t i = 0; i < n; i++) {
        size_t pl;
        const char *p = tok_piece(t, ids[i], &pl);
        split_tokens += !utf8_valid((const uint8_t *)p, pl);
        size_t w = tok_stream_push(&st, t, ids[i], chunk, cap);
        CHECK(utf8_valid((const uint8_t *)chunk, w));
        memcpy(all + total, chunk, w);
        total += w;
    }
    CHECK(split_tokens > 0); /* the test means something only if characters were split */
    total += tok_stream_flush(&st, all + total, cap);
    all[total] = '\0';
    CHECK_STR(all, s);

    /* control tokens: hidden unless render_special */
    char out[64];
    tok_stream_init(&st, false);
    CHECK_EQ_INT(tok_stream_push(&st, t, 2, out, sizeof out), 0);
    tok_stream_init(&st, true);
    size_t w = tok_stream_push(&st, t, 2, out, sizeof out);
    out[w] = '\0';
    CHECK_STR(out, "<|im_end|>");

    /* an unfinished character at the end becomes U+FFFD; garbage too */
    int32_t *bad;
    size_t nb;
    CHECK(tok_encode(t, "\xe4\xb8\xad", 3, false, false, &bad, &nb, NULL) == EKV_OK);
    tok_stream_init(&st, false);
    w = 0;
    for (size_t i = 0; i + 1 < nb; i++)
        w += tok_stream_push(&st, t, bad[i], out + w, sizeof out - w);
    if (nb == 1) { /* whole character is one token: drive the partial case by hand */
        st.pending[0] = 0xe4;
        st.n_pending = 1;
    }
    w += tok_stream_flush(&st, out + w, sizeof out - w);
    out[w] = '\0';
    CHECK_STR(out, "\xef\xbf\xbd");
    CHECK_EQ_INT(tok_stream_push(&st, t, -5, out, sizeof out), 0);
    free(bad);
    free(chunk);
    free(all);
    free(ids);
}

static void test_chatml_template_renders_like_jinja(const ekv_tokenizer *t)
{
    char *out = NULL;
    tok_message user_only[] = {{"user", "Hello"}};
    CHECK(tok_apply_chat(t, user_only, 1, true, &out, NULL) == EKV_OK);
    CHECK_STR(out, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                   "Hugging Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                   "<|im_start|>assistant\n");
    int32_t *ids;
    size_t n;
    CHECK(tok_encode(t, out, strlen(out), tok_add_bos(t), true, &ids, &n, NULL) == EKV_OK);
    CHECK(n > 10 && ids[0] == 1);
    free(ids);
    free(out);

    tok_message with_sys[] = {{"system", "Be brief."}, {"user", "2+2?"}, {"assistant", "4"}};
    CHECK(tok_apply_chat(t, with_sys, 3, false, &out, NULL) == EKV_OK);
    CHECK_STR(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n4<|im_end|>\n");
    free(out);

    ekv_error err = {0};
    tok_message bad[] = {{"user", NULL}};
    CHECK(tok_apply_chat(t, bad, 1, true, &out, &err) == EKV_EINVAL);
}

static void test_special_ids_match_llama_cpp(const ekv_tokenizer *t)
{
    CHECK_EQ_INT(tok_vocab_size(t), 49152);
    CHECK_EQ_INT(tok_bos(t), 1);
    CHECK_EQ_INT(tok_eos(t), 2);
    CHECK(!tok_add_bos(t));
    /* llama.cpp's EOG set: <|endoftext|>, <|im_end|>, and <reponame> (FIM repo) */
    CHECK(tok_is_eog(t, 0) && tok_is_eog(t, 2) && tok_is_eog(t, 4));
    CHECK(!tok_is_eog(t, 1) && !tok_is_eog(t, 3) && !tok_is_eog(t, 17) && !tok_is_eog(t, -1));
    CHECK(tok_is_control(t, 1) && !tok_is_control(t, 17));
    CHECK_EQ_INT(tok_find(t, "<|im_end|>", 10), 2);
}

static void test_hostile_input_does_not_crash(const ekv_tokenizer *t)
{
    uint8_t junk[4096];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof junk; i++) {
        x = x * 1103515245u + 12345u;
        junk[i] = (uint8_t)(x >> 16);
    }
    int32_t *a, *b;
    size_t na, nb;
    CHECK(tok_encode(t, (const char *)junk, sizeof junk, true, true, &a, &na, NULL) == EKV_OK);
    CHECK(tok_encode(t, (const char *)junk, sizeof junk, true, true, &b, &nb, NULL) == EKV_OK);
    CHECK(na == nb && memcmp(a, b, na * sizeof *a) == 0 && a[0] == 1);
    free(a);
    free(b);
    CHECK(tok_encode(t, "", 0, false, true, &a, &na, NULL) == EKV_OK && na == 0 && a != NULL);
    free(a);
    CHECK(tok_encode(t, NULL, 5, false, true, &a, &na, NULL) == EKV_EINVAL);

    /* 1 MB of one character, three ways; decoding must give it back */
    static const char *const unit[] = {"a", " ", "\xe4\xb8\xad", "7"};
    const size_t mb = 1 << 20;
    char *big = malloc(mb + 1);
    for (size_t u = 0; u < sizeof unit / sizeof *unit; u++) {
        size_t ul = strlen(unit[u]), len = mb / ul * ul;
        for (size_t i = 0; i < len; i += ul)
            memcpy(big + i, unit[u], ul);
        big[len] = '\0';
        CHECK(tok_encode(t, big, len, false, false, &a, &na, NULL) == EKV_OK);
        size_t bl;
        char *back = detok(t, a, na, &bl);
        CHECK(bl == len && memcmp(back, big, len) == 0);
        free(back);
        free(a);
    }
    free(big);
}

static void test_encode_speed(const ekv_tokenizer *t)
{
    static const char *const words[] = {
        "the", "model", "serves", "requests", "with", "a", "paged", "cache,", "and", "every",
        "token", "is", "checked", "against", "llama.cpp.", "Throughput", "matters", "because",
        "prompts", "are", "long;", "latency", "matters", "too.", "In", "2024", "we", "measured",
        "it", "carefully", "(twice)", "before", "shipping", "anything", "to", "users.\n"};
    size_t cap = 1 << 17, len = 0;
    char *text = malloc(cap);
    uint32_t x = 7;
    while (len + 32 < cap - 32 && len < 60000) {
        x = x * 1103515245u + 12345u;
        const char *w = words[(x >> 16) % (sizeof words / sizeof *words)];
        len += (size_t)sprintf(text + len, "%s%s", len ? " " : "", w);
    }
    int32_t *ids;
    size_t n = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    CHECK(tok_encode(t, text, len, false, false, &ids, &n, NULL) == EKV_OK);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    printf("{\"bench\":\"tok_encode\",\"bytes\":%zu,\"tokens\":%zu,\"ms\":%.3f,"
           "\"tokens_per_s\":%.0f,\"reference\":\"none (budget 100 ms per 10k tokens)\"}\n",
           len, n, ms, (double)n / (ms / 1e3));
    fprintf(stderr, "encode: %zu tokens in %.2f ms (%.2f ms per 10k tokens)\n", n, ms,
            ms * 1e4 / (double)n);
    CHECK(n > 10000);
    /* generous: sanitizer builds are several times slower than release */
    CHECK(ms * 1e4 / (double)n < 1000.0);
    free(ids);
    free(text);
}

int main(int argc, char **argv)
{
    RUN_TEST(test_bpe_merges_by_rank_on_synthetic_vocab);
    RUN_TEST(test_load_errors_are_clear);
    RUN_TEST(test_pretokenizers_cut_like_llama_cpp);
    RUN_TEST(test_chat_template_families_on_synthetic_vocab);

    model_path = argc > 1 ? argv[1] : getenv("EKV_MODEL");
    if (!model_path)
        model_path = EKV_FIXTURES "/../../models/" MODEL_NAME;
    ekv_tokenizer *t = load_model();
    if (!t) {
        fprintf(stderr, "skip: model tests need %s\n", model_path);
        return TEST_EXIT();
    }
#define RUN_MODEL_TEST(fn)                                                                 \
    do {                                                                                   \
        int before_ = ekv_test_failures;                                                   \
        fn(t);                                                                             \
        fprintf(stderr, "%s %s\n", ekv_test_failures == before_ ? "ok  " : "FAIL", #fn);   \
    } while (0)
    RUN_MODEL_TEST(test_fixture_cases_match_llama_cpp);
    RUN_MODEL_TEST(test_invalid_utf8_matches_llama_cpp);
    RUN_MODEL_TEST(test_special_ids_match_llama_cpp);
    RUN_MODEL_TEST(test_detokenize_round_trips);
    RUN_MODEL_TEST(test_stream_emits_only_complete_characters);
    RUN_MODEL_TEST(test_chatml_template_renders_like_jinja);
    RUN_MODEL_TEST(test_hostile_input_does_not_crash);
    RUN_MODEL_TEST(test_encode_speed);
    tok_free(t);
    return TEST_EXIT();
}
