/*
 * tokenizer.c - building the byte-level BPE tokenizer from a GGUF's
 * tokenizer.* metadata, the way llama.cpp's llama_vocab::load does: vocab and
 * token types, merge ranks, special ids (bos/eos, and llama.cpp's detection of
 * eot/eom/FIM tokens by their text), the end-of-generation set, the
 * special-token list the encoder partitions on, and the token-to-piece cache.
 *
 * Layout and hash tables: tokenizer_internal.h. Encoding: tok_encode.c.
 * Streaming detokenizer and chat templates: tok_chat.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ---- interned strings ---- */

static size_t pow2_at_least(size_t n)
{
    size_t p = 16;
    while (p < n)
        p *= 2;
    return p;
}

static bool strtab_init(strtab *s, size_t max_entries)
{
    s->cap_ent = (uint32_t)max_entries;
    s->ent = malloc(max_entries * sizeof *s->ent);
    s->mask = pow2_at_least(max_entries * 2) - 1;
    s->slots = calloc(s->mask + 1, sizeof *s->slots);
    return s->ent && s->slots;
}

static void strtab_free(strtab *s)
{
    free(s->buf);
    free(s->ent);
    free(s->slots);
}

/* Index of p[0..n), adding it if new; -1 on allocation failure or when the
 * load-time bound on entries is exhausted (cannot happen by construction). */
static int64_t strtab_intern(strtab *s, const char *p, size_t n)
{
    size_t i = hash_bytes(p, n) & s->mask;
    for (;; i = (i + 1) & s->mask) {
        uint32_t slot = s->slots[i];
        if (!slot)
            break;
        const strent *e = &s->ent[slot - 1];
        if (e->len == n && memcmp(s->buf + e->off, p, n) == 0)
            return slot - 1;
    }
    if (s->n_ent == s->cap_ent || n > UINT32_MAX - 1 - s->n_buf)
        return -1;
    if (s->n_buf + n + 1 > s->cap_buf) {
        size_t cap = s->cap_buf ? s->cap_buf : 1 << 16;
        while (cap < s->n_buf + n + 1)
            cap *= 2;
        char *b = realloc(s->buf, cap);
        if (!b)
            return -1;
        s->buf = b;
        s->cap_buf = cap;
    }
    memcpy(s->buf + s->n_buf, p, n);
    s->buf[s->n_buf + n] = '\0';
    s->ent[s->n_ent] = (strent){.off = (uint32_t)s->n_buf, .len = (uint32_t)n, .token = -1};
    s->n_buf += n + 1;
    s->slots[i] = ++s->n_ent;
    return s->n_ent - 1;
}

/* ---- merge ranks ---- */

/* Keeps the first rank of a duplicated pair, as llama.cpp's map emplace. */
static void pair_insert(ekv_tokenizer *t, uint32_t l, uint32_t r, int32_t rank, uint32_t merged)
{
    uint64_t key = (uint64_t)l << 32 | r;
    for (size_t i = pair_hash(key) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
        pairent *p = &t->pairs[i];
        if (p->rank < 0) {
            *p = (pairent){.key = key, .rank = rank, .merged = merged};
            return;
        }
        if (p->key == key)
            return;
    }
}

/* ---- GPT-2 bytes_to_unicode ---- */

/* The codepoint GPT-2 uses for byte b: printable Latin-1 stands for itself,
 * the other 68 bytes map to U+0100.. in byte order. */
static uint32_t byte_to_cpt(unsigned b)
{
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff))
        return b;
    unsigned n = 0;
    for (unsigned c = 0; c < b; c++)
        n += !((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || (c >= 0xae && c <= 0xff));
    return 256 + n;
}

#define N_BYTE_CPTS (256 + 68) /* byte_to_cpt's range is [0, 324) */

/* ---- loading ---- */

static ekv_status pre_from_name(ekv_tokenizer *t, const char *name, ekv_error *err)
{
    static const char *const smollm[] = {"smollm", "starcoder", "refact", "command-r",
                                         "codeshell", "exaone", "minerva-7b", NULL};
    static const char *const gpt2[] = {"gpt-2", "phi-2", "jina-es", "jina-de", "gigachat",
                                       "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
                                       "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt",
                                       "olmo", "jais", "exaone4", "trillion",
                                       "granite-docling", NULL};
    static const char *const llama3[] = {"llama3", "llama-v3", "llama-bpe", "falcon3",
                                         "falcon-h1", "pixtral", "midm-2.0", "lfm2", NULL};
    /* the Llama-3 regex, but without llama.cpp's LLAMA3 flags */
    static const char *const llama3_regex[] = {"dbrx", "smaug-bpe", NULL};
    /* Known to llama.cpp with regexes this file does not implement. */
    static const char *const other[] = {
        "deepseek-llm", "deepseek-coder", "deepseek-v3", "falcon", "qwen2", "deepseek-r1-qwen",
        "kormo", "stablelm2", "poro-chat", "glm4", "chatglm-bpe", "viking", "tekken", "bloom",
        "gpt3-finnish", "chameleon", "megrez", "gpt-4o", "llama4", "superbpe", "bailingmoe",
        "bailingmoe2", "llada-moe", "seed-coder", "hunyuan", "hunyuan-dense", "kimi-k2",
        "grok-2", "afmoe", "minimax-m2", NULL};
    t->pre = PRETOK_DEFAULT; /* "default", missing or unknown: as llama.cpp */
    for (int i = 0; smollm[i]; i++)
        if (!strcmp(name, smollm[i]))
            t->pre = PRETOK_SMOLLM;
    for (int i = 0; gpt2[i]; i++)
        if (!strcmp(name, gpt2[i]))
            t->pre = PRETOK_GPT2;
    for (int i = 0; llama3_regex[i]; i++)
        if (!strcmp(name, llama3_regex[i]))
            t->pre = PRETOK_LLAMA3;
    for (int i = 0; llama3[i]; i++) {
        if (!strcmp(name, llama3[i])) {
            t->pre = PRETOK_LLAMA3;
            t->ignore_merges = true;
            t->add_bos = true;
        }
    }
    for (int i = 0; other[i]; i++)
        if (!strcmp(name, other[i]))
            return ekv_error_set(err, EKV_EUNSUPPORTED,
                                 "tokenizer: pre-tokenizer '%s' is not implemented", name);
    return EKV_OK;
}

static int32_t find_token(const ekv_tokenizer *t, const char *text)
{
    int64_t e = strtab_find(&t->st, text, strlen(text));
    return e < 0 ? -1 : t->st.ent[e].token;
}

/* A special id from key, kept only when it is a valid token (else dflt). */
static int32_t special_id(const gguf_file *f, const char *key, int32_t n_vocab, int32_t dflt)
{
    uint32_t v;
    if (gguf_get_u32(f, key, &v) && v < (uint32_t)n_vocab)
        return (int32_t)v;
    return dflt;
}

/* llama.cpp's special-token detection by text: for each role, the key's id or
 * else the first of the names present; that token is forced to CONTROL. */
static int32_t detect_special(ekv_tokenizer *t, const gguf_file *f, const char *key,
                              const char *const *names)
{
    int32_t id = key ? special_id(f, key, t->n_vocab, -1) : -1;
    if (id >= 0)
        return id;
    for (int i = 0; names[i]; i++) {
        id = find_token(t, names[i]);
        if (id >= 0) {
            t->attr[id] = ATTR_CONTROL;
            return id;
        }
    }
    return -1;
}

static void load_eog(ekv_tokenizer *t, const gguf_file *f)
{
    static const char *const eot[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                      "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
                                      "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence"
                                      "\xef\xbd\x9c>",
                                      "<end_of_utterance>", NULL};
    static const char *const eom[] = {"<|eom_id|>", NULL};
    static const char *const fim_pre[] = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
                                          "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", NULL};
    static const char *const fim_suf[] = {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                                          "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", NULL};
    static const char *const fim_mid[] = {"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
                                          "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", NULL};
    static const char *const fim_pad[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", NULL};
    static const char *const fim_rep[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
                                          "<REPO>", "<reponame>", NULL};
    static const char *const fim_sep[] = {"<|file_sep|>", NULL};
    static const char *const eog_names[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>",
                                            "<|call|>", "<end_of_turn>", "<|endoftext|>",
                                            "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
                                            "<end_of_utterance>", NULL};
    static const char *const always_user[] = {"<|channel|>", "<|message|>", "<|start|>",
                                              "<|constrain|>", NULL};

    int32_t ids[6];
    ids[0] = detect_special(t, f, "tokenizer.ggml.eot_token_id", eot);
    ids[1] = detect_special(t, f, "tokenizer.ggml.eom_token_id", eom);
    /* pre/suf/mid are not EOG but llama.cpp forces them to CONTROL too */
    if (special_id(f, "tokenizer.ggml.fim_pre_token_id", t->n_vocab, -1) < 0 &&
        special_id(f, "tokenizer.ggml.prefix_token_id", t->n_vocab, -1) < 0)
        detect_special(t, f, NULL, fim_pre);
    if (special_id(f, "tokenizer.ggml.fim_suf_token_id", t->n_vocab, -1) < 0 &&
        special_id(f, "tokenizer.ggml.suffix_token_id", t->n_vocab, -1) < 0)
        detect_special(t, f, NULL, fim_suf);
    if (special_id(f, "tokenizer.ggml.fim_mid_token_id", t->n_vocab, -1) < 0 &&
        special_id(f, "tokenizer.ggml.middle_token_id", t->n_vocab, -1) < 0)
        detect_special(t, f, NULL, fim_mid);
    ids[2] = detect_special(t, f, "tokenizer.ggml.fim_pad_token_id", fim_pad);
    ids[3] = detect_special(t, f, "tokenizer.ggml.fim_rep_token_id", fim_rep);
    ids[4] = detect_special(t, f, "tokenizer.ggml.fim_sep_token_id", fim_sep);
    ids[5] = t->eos;
    for (int i = 0; i < 6; i++)
        if (ids[i] >= 0)
            t->eog[ids[i]] = 1;
    for (int i = 0; eog_names[i]; i++) {
        int32_t id = find_token(t, eog_names[i]);
        if (id >= 0) {
            t->eog[id] = 1;
            t->attr[id] = ATTR_CONTROL;
        }
    }
    for (int i = 0; always_user[i]; i++) {
        int32_t id = find_token(t, always_user[i]);
        if (id >= 0)
            t->attr[id] = ATTR_USER_DEFINED;
    }
    /* o200k_harmony: with <|return|> and <|call|>, <|end|> is not EOG */
    int32_t ret = find_token(t, "<|return|>"), call = find_token(t, "<|call|>");
    int32_t end = find_token(t, "<|end|>");
    if (ret >= 0 && t->eog[ret] && call >= 0 && t->eog[call] && end >= 0 && t->eog[end]) {
        t->eog[end] = 0;
        t->attr[end] = ATTR_USER_DEFINED;
    }
}

static ekv_status load_vocab(ekv_tokenizer *t, const gguf_file *f, ekv_error *err)
{
    const gguf_kv *toks = gguf_find_kv(f, "tokenizer.ggml.tokens");
    const gguf_kv *types = gguf_find_kv(f, "tokenizer.ggml.token_type");
    const gguf_kv *merges = gguf_find_kv(f, "tokenizer.ggml.merges");
    if (!toks || toks->type != GGUF_TYPE_ARRAY || toks->arr_type != GGUF_TYPE_STRING)
        return ekv_error_set(err, EKV_EFORMAT, "tokenizer: tokenizer.ggml.tokens missing or not a string array");
    if (toks->arr_len == 0 || toks->arr_len > MAX_VOCAB)
        return ekv_error_set(err, EKV_EFORMAT, "tokenizer: vocab size %llu out of range",
                             (unsigned long long)toks->arr_len);
    if (!merges || merges->type != GGUF_TYPE_ARRAY || merges->arr_type != GGUF_TYPE_STRING)
        return ekv_error_set(err, EKV_EFORMAT, "tokenizer: tokenizer.ggml.merges missing or not a string array");
    if (merges->arr_len > MAX_VOCAB)
        return ekv_error_set(err, EKV_EFORMAT, "tokenizer: %llu merges is too many",
                             (unsigned long long)merges->arr_len);
    if (types && (types->type != GGUF_TYPE_ARRAY || types->arr_len != toks->arr_len))
        return ekv_error_set(err, EKV_EFORMAT, "tokenizer: tokenizer.ggml.token_type has the wrong length");

    int32_t n = t->n_vocab = (int32_t)toks->arr_len;
    size_t n_merges = (size_t)merges->arr_len;
    t->attr = calloc((size_t)n, 1);
    t->eog = calloc((size_t)n, 1);
    t->sid = malloc((size_t)n * sizeof *t->sid);
    t->pair_mask = pow2_at_least(n_merges * 2 + 2) - 1;
    t->pairs = malloc((t->pair_mask + 1) * sizeof *t->pairs);
    if (!t->attr || !t->eog || !t->sid || !t->pairs ||
        !strtab_init(&t->st, (size_t)n + 3 * n_merges + 256))
        return ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
    for (size_t i = 0; i <= t->pair_mask; i++)
        t->pairs[i].rank = -1;

    for (int32_t i = 0; i < n; i++) {
        gguf_str s;
        char empty[32];
        if (!gguf_arr_get_str(toks, (uint64_t)i, &s))
            return ekv_error_set(err, EKV_EFORMAT, "tokenizer: token %d unreadable", i);
        if (s.len == 0) { /* llama.cpp renames empty tokens */
            s.len = (uint64_t)snprintf(empty, sizeof empty, "[EMPTY_%d]", i);
            s.ptr = empty;
        }
        int64_t e = strtab_intern(&t->st, s.ptr, (size_t)s.len);
        if (e < 0)
            return ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
        t->st.ent[e].token = i; /* a duplicated text maps to its last id, as llama.cpp */
        t->sid[i] = (uint32_t)e;

        int64_t ty = 1;
        if (types && !gguf_arr_get_i64(types, (uint64_t)i, &ty))
            return ekv_error_set(err, EKV_EFORMAT, "tokenizer: token_type %d unreadable", i);
        switch (ty) {
        case 1: t->attr[i] = ATTR_NORMAL; break;
        case 2: t->attr[i] = ATTR_UNKNOWN; break;
        case 3: t->attr[i] = ATTR_CONTROL; break;
        case 4: t->attr[i] = ATTR_USER_DEFINED; break;
        case 5: t->attr[i] = ATTR_UNUSED; break;
        case 6: t->attr[i] = ATTR_BYTE; break;
        default: t->attr[i] = 0; break;
        }
    }

    for (unsigned b = 0; b < 256; b++) {
        uint8_t u[4];
        size_t ul = utf8_encode(byte_to_cpt(b), u);
        int64_t e = strtab_intern(&t->st, (const char *)u, ul);
        if (e < 0)
            return ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
        t->byte_sid[b] = (uint32_t)e;
    }

    char *cat = NULL;
    size_t cat_cap = 0;
    for (size_t i = 0; i < n_merges; i++) {
        gguf_str m;
        if (!gguf_arr_get_str(merges, i, &m)) {
            free(cat);
            return ekv_error_set(err, EKV_EFORMAT, "tokenizer: merge %zu unreadable", i);
        }
        /* "left right", split at the first space after the first byte */
        const char *sp = m.len > 1 ? memchr(m.ptr + 1, ' ', (size_t)m.len - 1) : NULL;
        if (!sp)
            continue; /* llama.cpp maps these to ("", ""), which never matches */
        size_t ll = (size_t)(sp - m.ptr), rl = (size_t)m.len - ll - 1;
        if (ll + rl > cat_cap) {
            char *c = realloc(cat, ll + rl);
            if (!c) {
                free(cat);
                return ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
            }
            cat = c;
            cat_cap = ll + rl;
        }
        memcpy(cat, m.ptr, ll);
        memcpy(cat + ll, sp + 1, rl);
        int64_t l = strtab_intern(&t->st, m.ptr, ll);
        int64_t r = strtab_intern(&t->st, sp + 1, rl);
        int64_t lr = strtab_intern(&t->st, cat, ll + rl);
        if (l < 0 || r < 0 || lr < 0) {
            free(cat);
            return ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
        }
        pair_insert(t, (uint32_t)l, (uint32_t)r, (int32_t)i, (uint32_t)lr);
    }
    free(cat);
    return EKV_OK;
}

/* llama.cpp's token-to-piece cache: normal tokens have the byte mapping
 * undone; control/unknown/user-defined tokens are their text; others "". */
static ekv_status build_pieces(ekv_tokenizer *t)
{
    int16_t unbyte[N_BYTE_CPTS];
    memset(unbyte, 0xff, sizeof unbyte);
    for (unsigned b = 0; b < 256; b++)
        unbyte[byte_to_cpt(b)] = (int16_t)b;
    size_t max_len = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->st.ent[t->sid[id]].len > max_len)
            max_len = t->st.ent[t->sid[id]].len;

    size_t cap = t->st.n_buf + 64;
    t->pbuf = malloc(cap);
    t->poff = malloc((size_t)t->n_vocab * sizeof *t->poff);
    t->plen = malloc((size_t)t->n_vocab * sizeof *t->plen);
    uint32_t *cpts = malloc((max_len + 1) * sizeof *cpts);
    if (!t->pbuf || !t->poff || !t->plen || !cpts) {
        free(cpts);
        return EKV_ENOMEM;
    }
    size_t n = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const strent *e = &t->st.ent[t->sid[id]];
        const char *text = strtab_text(&t->st, t->sid[id]);
        size_t nc = utf8_decode_lenient((const uint8_t *)text, e->len, cpts);
        /* worst case: every codepoint an "[UNK_BYTE_0x........<text>]" */
        size_t need = n + (t->attr[id] & ATTR_NORMAL ? nc * (22 + e->len) : e->len) + 1;
        if (need > cap) {
            while (cap < need)
                cap *= 2;
            char *b = realloc(t->pbuf, cap);
            if (!b) {
                free(cpts);
                return EKV_ENOMEM;
            }
            t->pbuf = b;
        }
        t->poff[id] = (uint32_t)n;
        if (t->attr[id] & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED)) {
            memcpy(t->pbuf + n, text, e->len);
            n += e->len;
        } else if (t->attr[id] & ATTR_NORMAL) {
            for (size_t i = 0; i < nc; i++) {
                int b = cpts[i] < N_BYTE_CPTS ? unbyte[cpts[i]] : -1;
                if (b >= 0) {
                    t->pbuf[n++] = (char)b;
                    continue;
                }
                uint8_t u[4]; /* llama.cpp's llama_decode_text marker */
                size_t ul = utf8_encode(cpts[i], u);
                n += (size_t)sprintf(t->pbuf + n, "[UNK_BYTE_0x");
                for (size_t j = 0; j < ul; j++)
                    n += (size_t)sprintf(t->pbuf + n, "%02x", u[j]);
                memcpy(t->pbuf + n, text, e->len);
                n += e->len;
                t->pbuf[n++] = ']';
            }
        }
        t->plen[id] = (uint32_t)(n - t->poff[id]);
        t->pbuf[n++] = '\0';
        if (t->plen[id] > t->max_piece)
            t->max_piece = t->plen[id];
        if (n > UINT32_MAX - 1) {
            free(cpts);
            return EKV_ENOMEM;
        }
    }
    free(cpts);
    return EKV_OK;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The tokens the special-token partition looks for, longest text first;
 * llama.cpp's sort is unstable, so ties go by id here to be deterministic. */
static ekv_status build_specials(ekv_tokenizer *t)
{
    const uint8_t special = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN;
    size_t n = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        n += !!(t->attr[i] & special);
    uint64_t *keys = malloc((n ? n : 1) * sizeof *keys);
    t->specials = malloc((n ? n : 1) * sizeof *t->specials);
    if (!keys || !t->specials) {
        free(keys);
        return EKV_ENOMEM;
    }
    for (int32_t i = 0; i < t->n_vocab; i++) {
        if (t->attr[i] & special) {
            uint32_t len = t->st.ent[t->sid[i]].len;
            keys[t->n_specials++] = (uint64_t)(UINT32_MAX - len) << 32 | (uint32_t)i;
        }
    }
    qsort(keys, n, sizeof *keys, cmp_u64);
    for (size_t i = 0; i < n; i++)
        t->specials[i] = (int32_t)(keys[i] & 0xffffffffu);
    free(keys);
    return EKV_OK;
}

ekv_tokenizer *tok_load(const gguf_file *f, ekv_error *err)
{
    gguf_str model, s;
    if (!f) {
        ekv_error_set(err, EKV_EINVAL, "tokenizer: no gguf file");
        return NULL;
    }
    if (!gguf_get_str(f, "tokenizer.ggml.model", &model)) {
        ekv_error_set(err, EKV_EFORMAT, "tokenizer: tokenizer.ggml.model missing");
        return NULL;
    }
    if (!gguf_str_eq(model, "gpt2")) {
        if (gguf_str_eq(model, "llama"))
            ekv_error_set(err, EKV_EUNSUPPORTED, "tokenizer: SentencePiece vocabularies "
                          "(tokenizer.ggml.model = \"llama\") are not supported; only byte-level BPE (\"gpt2\")");
        else
            ekv_error_set(err, EKV_EUNSUPPORTED, "tokenizer: tokenizer.ggml.model \"%.*s\" is not "
                          "supported; only byte-level BPE (\"gpt2\")",
                          (int)(model.len > 64 ? 64 : model.len), model.ptr);
        return NULL;
    }
    ekv_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
        return NULL;
    }
    char pre[64] = "";
    if (gguf_get_str(f, "tokenizer.ggml.pre", &s) && s.len < sizeof pre)
        memcpy(pre, s.ptr, (size_t)s.len);
    if (pre_from_name(t, pre, err) != EKV_OK || load_vocab(t, f, err) != EKV_OK)
        goto fail;

    /* llama.cpp's defaults for "gpt2" vocabularies are bos = eos = 11 */
    t->bos = special_id(f, "tokenizer.ggml.bos_token_id", t->n_vocab, t->n_vocab > 11 ? 11 : -1);
    t->eos = special_id(f, "tokenizer.ggml.eos_token_id", t->n_vocab, t->n_vocab > 11 ? 11 : -1);
    bool b;
    if (gguf_get_bool(f, "tokenizer.ggml.add_bos_token", &b))
        t->add_bos = b;
    load_eog(t, f);
    if (build_specials(t) != EKV_OK || build_pieces(t) != EKV_OK) {
        ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
        goto fail;
    }
    if (gguf_get_str(f, "tokenizer.chat_template", &s)) {
        t->chat_template = malloc((size_t)s.len + 1);
        if (!t->chat_template) {
            ekv_error_set(err, EKV_ENOMEM, "tokenizer: out of memory");
            goto fail;
        }
        memcpy(t->chat_template, s.ptr, (size_t)s.len);
        t->chat_template[s.len] = '\0';
    }
    return t;
fail:
    tok_free(t);
    return NULL;
}

void tok_free(ekv_tokenizer *t)
{
    if (!t)
        return;
    free(t->attr);
    free(t->eog);
    free(t->sid);
    strtab_free(&t->st);
    free(t->pairs);
    free(t->pbuf);
    free(t->poff);
    free(t->plen);
    free(t->specials);
    free(t->chat_template);
    free(t);
}

int32_t tok_vocab_size(const ekv_tokenizer *t) { return t->n_vocab; }
int32_t tok_bos(const ekv_tokenizer *t) { return t->bos; }
int32_t tok_eos(const ekv_tokenizer *t) { return t->eos; }
bool tok_add_bos(const ekv_tokenizer *t) { return t->add_bos; }
size_t tok_max_piece_len(const ekv_tokenizer *t) { return t->max_piece; }
const char *tok_chat_template(const ekv_tokenizer *t) { return t->chat_template; }

bool tok_is_eog(const ekv_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && t->eog[id];
}

bool tok_is_control(const ekv_tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab && (t->attr[id] & (ATTR_CONTROL | ATTR_UNKNOWN));
}

int32_t tok_find(const ekv_tokenizer *t, const char *text, size_t len)
{
    int64_t e = text ? strtab_find(&t->st, text, len) : -1;
    return e < 0 ? -1 : t->st.ent[e].token;
}

const char *tok_piece(const ekv_tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (len)
        *len = t->plen[id];
    return t->pbuf + t->poff[id];
}
