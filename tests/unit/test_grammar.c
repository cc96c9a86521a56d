/*
 * test_grammar.c - structured output (entrokv/grammar.h): the automaton
 * against hand-written valid and invalid JSON for each schema feature, the
 * refusals of what it does not support, and the token mask against a brute
 * force ("can every byte of this token be consumed?") on the demo model's
 * real vocabulary (models/SmolLM2-135M-Instruct.Q4_1.gguf; skipped without).
 *
 * The expectations come from RFC 8259 (JSON) and the JSON Schema
 * validation spec, written here by hand, not from the automaton's output.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ekv_test.h"
#include "entrokv/gguf.h"
#include "entrokv/grammar.h"

#define MODEL_NAME "SmolLM2-135M-Instruct.Q4_1.gguf"

static bool matches(ekv_grammar *g, const char *text)
{
    return grammar_matches(g, text, strlen(text));
}

static ekv_grammar *schema(const char *json)
{
    ekv_error err = {0};
    ekv_grammar *g = grammar_compile_json(json, &err);
    if (!g)
        fprintf(stderr, "compile failed: %s\n  schema: %s\n", err.msg, json);
    return g;
}

#define ACCEPT(g, text) CHECK(matches(g, text))
#define REJECT(g, text) CHECK(!matches(g, text))

static void test_json_mode_is_any_object(void)
{
    ekv_grammar *g = grammar_compile_json(NULL, NULL);
    CHECK(g != NULL);
    ACCEPT(g, "{}");
    ACCEPT(g, "{\"a\":1}");
    ACCEPT(g, " { \"a\" : [1, -2.5e+3, 0, true, false, null, \"x\"] , \"b\":{\"c\":{}}}");
    ACCEPT(g, "{\"esc\":\"q\\\" b\\\\ s\\/ \\b\\f\\n\\r\\t \\u00e9\\uD83D\\uDE00\"}");
    ACCEPT(g, "{\"utf8\":\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"}");
    ACCEPT(g, "{\"a\":-0,\"b\":0.5,\"c\":1E9,\"d\":[],\"e\":[[]]}");
    REJECT(g, "[]");            /* JSON mode is an object */
    REJECT(g, "\"x\"");
    REJECT(g, "{");             /* incomplete */
    REJECT(g, "{\"a\":1,}");    /* trailing comma */
    REJECT(g, "{\"a\" 1}");
    REJECT(g, "{a:1}");
    REJECT(g, "{'a':1}");
    REJECT(g, "{\"a\":01}");    /* leading zero */
    REJECT(g, "{\"a\":1.}");
    REJECT(g, "{\"a\":.5}");
    REJECT(g, "{\"a\":+1}");
    REJECT(g, "{\"a\":1e}");
    REJECT(g, "{\"a\":tru}");
    REJECT(g, "{\"a\":True}");
    REJECT(g, "{\"a\":\"x\ny\"}");       /* raw control character */
    REJECT(g, "{\"a\":\"\\x\"}");         /* unknown escape */
    REJECT(g, "{\"a\":\"\\u12g4\"}");
    REJECT(g, "{\"a\":\"\x80\"}");        /* stray continuation byte */
    REJECT(g, "{\"a\":\"\xc0\x80\"}");    /* overlong */
    REJECT(g, "{\"a\":\"\xed\xa0\x80\"}"); /* UTF-16 surrogate in UTF-8 */
    REJECT(g, "{\"a\":\"\xf4\x90\x80\x80\"}"); /* above U+10FFFF */
    REJECT(g, "{\"a\":\"\xc3\"}");        /* cut character */
    REJECT(g, "{} ");           /* nothing after the value */
    REJECT(g, "{}{}");
    REJECT(g, "{\"a\":1]");
    REJECT(g, "{\"a\":[1}");
    grammar_release(g);
}

static void test_whitespace_runs_are_bounded(void)
{
    ekv_grammar *g = grammar_compile_json(NULL, NULL);
    char buf[128];
    snprintf(buf, sizeof buf, "{%*s\"a\":1}", GRAMMAR_MAX_WS, "");
    ACCEPT(g, buf);
    snprintf(buf, sizeof buf, "{%*s\"a\":1}", GRAMMAR_MAX_WS + 1, "");
    REJECT(g, buf);
    /* the count restarts after any other byte, and spaces inside strings
     * are text, not whitespace */
    snprintf(buf, sizeof buf, "{%*s\"a\"%*s:%*s\"%*s\"}", GRAMMAR_MAX_WS, "", GRAMMAR_MAX_WS, "",
             GRAMMAR_MAX_WS, "", 40, "");
    ACCEPT(g, buf);
    ACCEPT(g, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    grammar_release(g);
}

static void test_numbers_have_bounded_digits(void)
{
    ekv_grammar *g = schema("{\"type\":\"object\",\"properties\":{\"n\":{\"type\":\"number\"},"
                            "\"i\":{\"type\":\"integer\"}},\"required\":[\"n\",\"i\"]}");
    char buf[160];
    snprintf(buf, sizeof buf, "{\"n\":%.*s.%.*se-%.*s,\"i\":-%.*s}", GRAMMAR_MAX_DIGITS,
             "123456789012345678901234567890", GRAMMAR_MAX_DIGITS, "123456789012345678901234567890",
             GRAMMAR_MAX_EXP_DIGITS, "123456789", GRAMMAR_MAX_DIGITS, "923456789012345678901234567890");
    ACCEPT(g, buf);
    snprintf(buf, sizeof buf, "{\"n\":1,\"i\":%.*s}", GRAMMAR_MAX_DIGITS + 1,
             "923456789012345678901234567890");
    REJECT(g, buf);
    ACCEPT(g, "{\"n\":-0.0,\"i\":0}");
    REJECT(g, "{\"n\":1,\"i\":1.5}");   /* integer: no fraction */
    REJECT(g, "{\"n\":1,\"i\":1e3}");   /* ... nor exponent */
    REJECT(g, "{\"n\":1,\"i\":--1}");
    grammar_release(g);
}

static void test_object_properties_required_and_order(void)
{
    ekv_grammar *g =
        schema("{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"},"
               "\"b\":{\"type\":\"string\"},\"c\":{\"type\":\"boolean\"}},"
               "\"required\":[\"b\"],\"additionalProperties\":false}");
    ACCEPT(g, "{\"b\":\"x\"}");
    ACCEPT(g, "{\"a\":1,\"b\":\"x\"}");
    ACCEPT(g, "{\"a\":1,\"b\":\"x\",\"c\":true}");
    ACCEPT(g, "{\"b\":\"\",\"c\":false}");
    REJECT(g, "{}");                         /* b is required */
    REJECT(g, "{\"a\":1}");
    REJECT(g, "{\"a\":1,\"c\":true}");       /* skips the required b */
    REJECT(g, "{\"b\":\"x\",\"d\":1}");      /* not declared */
    REJECT(g, "{\"b\":1}");                  /* wrong type */
    REJECT(g, "{\"a\":\"1\",\"b\":\"x\"}");
    REJECT(g, "{\"b\":\"x\",\"c\":null}");
    REJECT(g, "{\"b\":\"x\",\"b\":\"y\"}");  /* twice */
    REJECT(g, "{\"b\":\"x\",}");
    /* the order is the schema's: one spelling of each object */
    REJECT(g, "{\"b\":\"x\",\"a\":1}");
    /* keys must be spelled exactly: a prefix of a key is not a key */
    REJECT(g, "{\"bb\":\"x\"}");
    REJECT(g, "{\"\":\"x\"}");
    grammar_release(g);

    /* nested objects; {} and "object" without properties */
    g = schema("{\"type\":\"object\",\"properties\":{\"p\":{\"type\":\"object\",\"properties\":"
               "{\"q\":{\"type\":\"object\",\"properties\":{\"r\":{\"type\":\"null\"}},"
               "\"required\":[\"r\"]}},\"required\":[\"q\"]},\"free\":{\"type\":\"object\"},"
               "\"empty\":{\"type\":\"object\",\"additionalProperties\":false},\"anything\":{}},"
               "\"required\":[\"p\",\"free\",\"empty\",\"anything\"]}");
    ACCEPT(g, "{\"p\":{\"q\":{\"r\":null}},\"free\":{\"z\":[1,{}]},\"empty\":{},\"anything\":3}");
    ACCEPT(g, "{\"p\":{\"q\":{\"r\":null}},\"free\":{},\"empty\":{},\"anything\":[\"a\"]}");
    REJECT(g, "{\"p\":{\"q\":{}},\"free\":{},\"empty\":{},\"anything\":1}");
    REJECT(g, "{\"p\":{\"q\":{\"r\":null}},\"free\":[],\"empty\":{},\"anything\":1}");
    REJECT(g, "{\"p\":{\"q\":{\"r\":null}},\"free\":{},\"empty\":{\"x\":1},\"anything\":1}");
    grammar_release(g);

    /* keys with escapes and non-ASCII are written in cJSON's compact spelling */
    g = schema("{\"properties\":{\"a\\\"b\":{\"const\":1},\"\xc3\xa9\":{\"const\":2}},"
               "\"required\":[\"a\\\"b\",\"\xc3\xa9\"]}");
    ACCEPT(g, "{\"a\\\"b\":1,\"\xc3\xa9\":2}");
    REJECT(g, "{\"a\\\"b\":1,\"\\u00e9\":2}");
    grammar_release(g);
}

static void test_arrays_items_and_counts(void)
{
    ekv_grammar *g = schema("{\"type\":\"array\",\"items\":{\"type\":\"integer\"},"
                            "\"minItems\":2,\"maxItems\":3}");
    REJECT(g, "[]");
    REJECT(g, "[1]");
    ACCEPT(g, "[1,2]");
    ACCEPT(g, "[ 1 , 2 , 3 ]");
    REJECT(g, "[1,2,3,4]");
    REJECT(g, "[1,\"2\"]");
    REJECT(g, "[1,2,]");
    REJECT(g, "[,1,2]");
    grammar_release(g);

    g = schema("{\"type\":\"array\",\"maxItems\":0}");
    ACCEPT(g, "[]");
    REJECT(g, "[1]");
    grammar_release(g);

    g = schema("{\"type\":\"array\"}"); /* items: anything */
    ACCEPT(g, "[1,\"a\",{\"b\":[null]},[]]");
    grammar_release(g);

    g = schema("{\"type\":\"array\",\"items\":{\"type\":\"array\",\"items\":{\"enum\":[\"x\",\"y\"]},"
               "\"minItems\":1}}");
    ACCEPT(g, "[[\"x\"],[\"y\",\"x\"]]");
    ACCEPT(g, "[]");
    REJECT(g, "[[]]");
    REJECT(g, "[[\"z\"]]");
    grammar_release(g);
}

static void test_enum_const_and_literals(void)
{
    ekv_grammar *g = schema("{\"enum\":[\"red\",\"green\",\"re\",1,12,-3.5,true,null,"
                            "{\"k\":[1,2]},[\"a\"]]}");
    ACCEPT(g, "\"red\"");
    ACCEPT(g, "\"re\"");
    ACCEPT(g, "\"green\"");
    ACCEPT(g, "1");
    ACCEPT(g, "12");
    ACCEPT(g, "-3.5");
    ACCEPT(g, "true");
    ACCEPT(g, "null");
    ACCEPT(g, "{\"k\":[1,2]}");
    ACCEPT(g, "[\"a\"]");
    REJECT(g, "\"r\"");
    REJECT(g, "\"reds\"");
    REJECT(g, "2");
    REJECT(g, "123");
    REJECT(g, "false");
    REJECT(g, "\"blue\"");
    grammar_release(g);

    g = schema("{\"const\":\"only\"}");
    ACCEPT(g, "\"only\"");
    REJECT(g, "\"Only\"");
    grammar_release(g);

    /* type filters enum values */
    g = schema("{\"type\":\"string\",\"enum\":[\"a\",1]}");
    ACCEPT(g, "\"a\"");
    REJECT(g, "1");
    grammar_release(g);

    g = schema("{\"type\":\"boolean\"}");
    ACCEPT(g, "true");
    ACCEPT(g, "false");
    REJECT(g, "null");
    REJECT(g, "1");
    grammar_release(g);
}

static void test_string_lengths_count_characters(void)
{
    ekv_grammar *g = schema("{\"type\":\"string\",\"minLength\":2,\"maxLength\":3}");
    REJECT(g, "\"a\"");
    ACCEPT(g, "\"ab\"");
    ACCEPT(g, "\"abc\"");
    REJECT(g, "\"abcd\"");
    ACCEPT(g, "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"");   /* 3 characters, 9 bytes */
    REJECT(g, "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80!\"");
    ACCEPT(g, "\"\\n\\u0041\"");                            /* an escape is one character */
    REJECT(g, "\"\\n\\u0041\\t\\\\\"");
    grammar_release(g);
}

static void test_any_of_type_lists_and_refs(void)
{
    ekv_grammar *g = schema("{\"anyOf\":[{\"type\":\"string\",\"maxLength\":2},{\"type\":\"null\"},"
                            "{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"number\"}},"
                            "\"required\":[\"x\"]}]}");
    ACCEPT(g, "\"ab\"");
    ACCEPT(g, "null");
    ACCEPT(g, "{\"x\":1.5}");
    REJECT(g, "\"abc\"");
    REJECT(g, "1");
    REJECT(g, "{}");
    grammar_release(g);

    g = schema("{\"type\":[\"integer\",\"null\"]}");
    ACCEPT(g, "7");
    ACCEPT(g, "null");
    REJECT(g, "\"7\"");
    grammar_release(g);

    g = schema("{\"$defs\":{\"pt\":{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"integer\"}},"
               "\"required\":[\"x\"],\"additionalProperties\":false}},\"type\":\"object\","
               "\"properties\":{\"a\":{\"$ref\":\"#/$defs/pt\"},\"b\":{\"type\":\"array\","
               "\"items\":{\"$ref\":\"#/$defs/pt\"}}},\"required\":[\"a\",\"b\"]}");
    ACCEPT(g, "{\"a\":{\"x\":1},\"b\":[{\"x\":2},{\"x\":3}]}");
    REJECT(g, "{\"a\":{\"y\":1},\"b\":[]}");
    grammar_release(g);

    g = schema("{\"title\":\"T\",\"description\":\"d\",\"$schema\":\"x\",\"type\":\"integer\","
               "\"default\":1,\"examples\":[1]}");
    ACCEPT(g, "5");
    grammar_release(g);
}

static void check_refused(const char *json, ekv_status code, const char *needle)
{
    ekv_error err = {0};
    ekv_grammar *g = grammar_compile_json(json, &err);
    CHECK(g == NULL);
    grammar_release(g);
    CHECK_EQ_INT(err.code, code);
    if (!strstr(err.msg, needle)) {
        fprintf(stderr, "  message \"%s\" does not name \"%s\"\n", err.msg, needle);
        CHECK(false);
    }
}

static void test_unsupported_keywords_are_refused_by_name(void)
{
    check_refused("{\"type\":\"string\",\"pattern\":\"^a\"}", EKV_EUNSUPPORTED, "'pattern'");
    check_refused("{\"type\":\"object\",\"properties\":{\"n\":{\"type\":\"integer\",\"minimum\":0}}}",
                  EKV_EUNSUPPORTED, "'minimum'");
    check_refused("{\"type\":\"object\",\"properties\":{\"n\":{\"type\":\"integer\",\"minimum\":0}}}",
                  EKV_EUNSUPPORTED, "#/properties/n");
    check_refused("{\"type\":\"string\",\"format\":\"date\"}", EKV_EUNSUPPORTED, "'format'");
    check_refused("{\"$defs\":{\"n\":{\"type\":\"object\",\"properties\":{\"c\":{\"$ref\":\"#/$defs/n\"}}}},"
                  "\"$ref\":\"#/$defs/n\"}",
                  EKV_EUNSUPPORTED, "'$ref' cycle");
    check_refused("{\"$ref\":\"http://example.com/s.json\"}", EKV_EUNSUPPORTED, "'$ref'");
    check_refused("{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"number\"}]}", EKV_EUNSUPPORTED,
                  "anyOf");
    check_refused("{\"anyOf\":[{\"type\":\"object\"},{\"type\":\"object\",\"properties\":{}}]}",
                  EKV_EUNSUPPORTED, "'{'");
    check_refused("{\"type\":\"array\",\"items\":[{\"type\":\"integer\"}]}", EKV_EUNSUPPORTED,
                  "'items'");
    check_refused("{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}",
                  EKV_EUNSUPPORTED, "additionalProperties");
    check_refused("{\"allOf\":[{}]}", EKV_EUNSUPPORTED, "'allOf'");
    check_refused("{\"type\":\"object\",\"properties\":{\"a\":{}},\"required\":[\"b\"]}", EKV_EINVAL,
                  "'b'");
    check_refused("{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}", EKV_EINVAL, "minItems");
    check_refused("{\"type\":\"strin\"}", EKV_EINVAL, "'strin'");
    check_refused("{\"type\":\"string\"", EKV_EINVAL, "not valid JSON");
    check_refused("false", EKV_EINVAL, "false");
    check_refused("{\"enum\":[]}", EKV_EINVAL, "'enum'");
    check_refused("{\"type\":\"string\",\"maxLength\":-1}", EKV_EINVAL, "'maxLength'");
    /* nesting past the automaton's depth */
    char deep[2048] = "";
    for (int i = 0; i < GRAMMAR_MAX_DEPTH + 1; i++)
        strcat(deep, "{\"type\":\"array\",\"items\":");
    strcat(deep, "{\"type\":\"null\"}");
    for (int i = 0; i < GRAMMAR_MAX_DEPTH + 1; i++)
        strcat(deep, "}");
    check_refused(deep, EKV_EUNSUPPORTED, "nested deeper");
}

static void test_response_format_and_cache(void)
{
    ekv_grammar *g = NULL, *g2 = NULL;
    ekv_error err = {0};
    const char *text = "{\"type\":\"text\"}";
    CHECK_EQ_INT(grammar_get(text, strlen(text), &g, &err), EKV_OK);
    CHECK(g == NULL);
    const char *json = "{\"type\":\"json_object\"}";
    CHECK_EQ_INT(grammar_get(json, strlen(json), &g, &err), EKV_OK);
    CHECK(g && matches(g, "{\"a\":1}") && !matches(g, "[1]"));
    CHECK_STR(grammar_source(g), json);
    CHECK_EQ_INT(grammar_get(json, strlen(json), &g2, &err), EKV_OK);
    CHECK(g2 == g); /* compiled once */
    grammar_release(g);
    grammar_release(g2);
    const char *js = "{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"n\",\"strict\":true,"
                     "\"schema\":{\"type\":\"object\",\"properties\":{\"k\":{\"enum\":[\"v\"]}},"
                     "\"required\":[\"k\"]}}}";
    CHECK_EQ_INT(grammar_get(js, strlen(js), &g, &err), EKV_OK);
    CHECK(g && matches(g, "{\"k\":\"v\"}") && !matches(g, "{}"));
    grammar_release(g);
    const struct {
        const char *rf, *needle;
    } bad[] = {
        {"{\"type\":\"json\"}", "response_format.type"},
        {"{\"type\":\"json_schema\"}", "response_format.json_schema"},
        {"{\"type\":\"json_object\",\"extra\":1}", "response_format.extra"},
        {"{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{},\"x\":1}}", "json_schema.x"},
        {"{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{\"pattern\":\"a\"}}}", "'pattern'"},
        {"{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{\"pattern\":\"a\"}}}",
         "response_format: json schema at #"},
        {"[1]", "response_format"},
        {"{", "response_format"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        g = (ekv_grammar *)1;
        memset(&err, 0, sizeof err);
        CHECK(grammar_get(bad[i].rf, strlen(bad[i].rf), &g, &err) != EKV_OK);
        CHECK(g == NULL);
        g = (ekv_grammar *)1; /* and without an error to fill */
        CHECK(grammar_get(bad[i].rf, strlen(bad[i].rf), &g, NULL) != EKV_OK && g == NULL);
        if (!strstr(err.msg, bad[i].needle)) {
            fprintf(stderr, "  \"%s\": message \"%s\" lacks \"%s\"\n", bad[i].rf, err.msg,
                    bad[i].needle);
            CHECK(false);
        }
    }
}

/* ---- the mask on the real vocabulary ---- */

static ekv_tokenizer *load_tokenizer(const char *path)
{
    gguf_file *f = gguf_open(path, NULL);
    if (!f)
        return NULL;
    ekv_tokenizer *t = tok_load(f, NULL);
    gguf_close(f);
    return t;
}

/* The brute force, from the tokenizer and the automaton's byte interface
 * only: a fresh state over prefix + the token's bytes. */
static bool brute_allowed(ekv_grammar *g, const ekv_tokenizer *t, const char *prefix, int32_t id)
{
    grammar_state *s = grammar_state_new(g, NULL, NULL);
    bool ok = grammar_accept_bytes(s, prefix, strlen(prefix), NULL) == EKV_OK;
    if (tok_is_eog(t, id)) {
        ok = ok && grammar_accepting(s);
    } else {
        size_t len = 0;
        const char *p = tok_piece(t, id, &len);
        ok = ok && !tok_is_control(t, id) && len > 0 &&
             grammar_accept_bytes(s, p, len, NULL) == EKV_OK;
    }
    grammar_state_free(s);
    return ok;
}

static void check_mask_at(ekv_grammar *g, const ekv_grammar_vocab *v, const ekv_tokenizer *t,
                          const char *prefix, double *worst_us)
{
    const int32_t n = tok_vocab_size(t);
    grammar_state *s = grammar_state_new(g, v, NULL);
    if (grammar_accept_bytes(s, prefix, strlen(prefix), NULL) != EKV_OK) {
        fprintf(stderr, "  bad test prefix \"%s\"\n", prefix);
        CHECK(false);
        grammar_state_free(s);
        return;
    }
    float *logits = malloc((size_t)n * sizeof *logits);
    for (int32_t i = 0; i < n; i++)
        logits[i] = 0.0f;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const int32_t n_allowed = grammar_mask_logits(s, logits, n);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double us = (double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3;
    if (us > *worst_us)
        *worst_us = us;
    if (getenv("GRAMMAR_VERBOSE"))
        fprintf(stderr, "  %7.0f us  %6d allowed  after \"%s\"\n", us, n_allowed, prefix);
    int32_t n_brute = 0, wrong = 0;
    for (int32_t id = 0; id < n; id++) {
        const bool want = brute_allowed(g, t, prefix, id);
        const bool got = logits[id] == 0.0f;
        n_brute += want;
        if (want != got || got != grammar_token_allowed(s, id)) {
            if (wrong++ < 5)
                fprintf(stderr, "  after \"%s\": token %d \"%s\" brute %d mask %d\n", prefix, id,
                        tok_piece(t, id, NULL), want, got);
        }
    }
    CHECK_EQ_INT(wrong, 0);
    CHECK_EQ_INT(n_allowed, n_brute);
    CHECK(n_allowed > 0);
    free(logits);
    grammar_state_free(s);
}

static void test_mask_equals_brute_force(const ekv_tokenizer *t)
{
    ekv_error err = {0};
    ekv_grammar_vocab *v = grammar_vocab_create(t, &err);
    CHECK(v != NULL);
    ekv_grammar *g = schema(
        "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":6},"
        "\"bio\":{\"type\":\"string\",\"minLength\":3},\"age\":{\"type\":\"integer\"},"
        "\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"red\",\"green\",\"re\"]},\"maxItems\":2},"
        "\"score\":{\"type\":\"number\"},\"ok\":{\"type\":\"boolean\"},\"free\":{\"type\":\"string\"},"
        "\"n\":{\"type\":[\"null\",\"object\"],\"properties\":{\"x\":{\"type\":\"null\"}}}},"
        "\"required\":[\"name\",\"age\",\"n\"]}");
    ekv_grammar *any = grammar_compile_json(NULL, NULL);
    const char *prefixes[] = {
        "",                                  /* before the object */
        "{",                                 /* a key: name, bio or age */
        "{ ",
        "{\"na",                             /* inside a key */
        "{\"name\"",
        "{\"name\":",                        /* before a value */
        "{\"name\":\"",                      /* string, maxLength 6 */
        "{\"name\":\"abcd",                  /* two characters left */
        "{\"name\":\"abc\xc3",               /* inside a UTF-8 character */
        "{\"name\":\"\xe2\x82",
        "{\"name\":\"ab\\",                  /* inside an escape */
        "{\"name\":\"ab\\u00",
        "{\"name\":\"abcdef",                /* full: only the closing quote */
        "{\"name\":\"x\",\"bio\":\"a",       /* minLength 3 */
        "{\"name\":\"x\",\"bio\":\"abc",
        "{\"name\":\"x\",\"age\":",
        "{\"name\":\"x\",\"age\":-",
        "{\"name\":\"x\",\"age\":12",        /* number: digits, or the end */
        "{\"name\":\"x\",\"age\":12,\"tags\":[",
        "{\"name\":\"x\",\"age\":12,\"tags\":[\"re",   /* re or red */
        "{\"name\":\"x\",\"age\":12,\"tags\":[\"red\",",
        "{\"name\":\"x\",\"age\":12,\"tags\":[],\"score\":1.",
        "{\"name\":\"x\",\"age\":12,\"score\":1e",
        "{\"name\":\"x\",\"age\":1,\"ok\":t",
        "{\"name\":\"x\",\"age\":1,\"free\":\"",  /* the unbounded string fast path */
        "{\"name\":\"x\",\"age\":1,\"free\":\"hello world",
        "{\"name\":\"x\",\"age\":1,\"n\":",
        "{\"name\":\"x\",\"age\":1,\"n\":{",
        "{\"name\":\"x\",\"age\":1,\"n\":null", /* complete: EOS only */
    };
    double worst = 0;
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        check_mask_at(g, v, t, prefixes[i], &worst);
    const char *any_prefixes[] = {"", "{", "{\"", "{\"k\":", "{\"k\":\"v", "{\"k\":[1,", "{\"k\":{}",
                                  "{\"k\":1}"};
    for (size_t i = 0; i < sizeof any_prefixes / sizeof *any_prefixes; i++)
        check_mask_at(any, v, t, any_prefixes[i], &worst);
    fprintf(stderr, "  slowest mask over %zu positions: %.0f us\n",
            sizeof prefixes / sizeof *prefixes + sizeof any_prefixes / sizeof *any_prefixes, worst);
    grammar_release(g);
    grammar_release(any);
    grammar_vocab_free(v);
}

/* Typical mask cost in the two kinds of position: inside a free string
 * (the fast path) and between values (the trie walk). Printed, not
 * asserted: CI machines vary; the serving docs quote a Release run. */
static void test_mask_speed(const ekv_tokenizer *t)
{
    ekv_grammar_vocab *v = grammar_vocab_create(t, NULL);
    ekv_grammar *any = grammar_compile_json(NULL, NULL);
    const char *at[] = {"{\"k\":\"some text", "{\"k\":", "{\"k\":1", "{"};
    const int32_t n = tok_vocab_size(t);
    float *logits = calloc((size_t)n, sizeof *logits);
    for (size_t i = 0; i < sizeof at / sizeof *at; i++) {
        grammar_state *s = grammar_state_new(any, v, NULL);
        CHECK(grammar_accept_bytes(s, at[i], strlen(at[i]), NULL) == EKV_OK);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        const int reps = 200;
        for (int r = 0; r < reps; r++)
            grammar_mask_logits(s, logits, n);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        const double us = ((double)(t1.tv_sec - t0.tv_sec) * 1e6 +
                           (double)(t1.tv_nsec - t0.tv_nsec) / 1e3) / reps;
        fprintf(stderr, "  mask after '%s': %.1f us\n", at[i], us);
        grammar_state_free(s);
    }
    free(logits);
    grammar_release(any);
    grammar_vocab_free(v);
}

int main(int argc, char **argv)
{
    RUN_TEST(test_json_mode_is_any_object);
    RUN_TEST(test_whitespace_runs_are_bounded);
    RUN_TEST(test_numbers_have_bounded_digits);
    RUN_TEST(test_object_properties_required_and_order);
    RUN_TEST(test_arrays_items_and_counts);
    RUN_TEST(test_enum_const_and_literals);
    RUN_TEST(test_string_lengths_count_characters);
    RUN_TEST(test_any_of_type_lists_and_refs);
    RUN_TEST(test_unsupported_keywords_are_refused_by_name);
    RUN_TEST(test_response_format_and_cache);

    const char *path = argc > 1 ? argv[1] : getenv("EKV_MODEL");
    if (!path)
        path = EKV_FIXTURES "/../../models/" MODEL_NAME;
    ekv_tokenizer *t = load_tokenizer(path);
    if (!t) {
        fprintf(stderr, "skip: the mask tests need %s\n", path);
        return TEST_EXIT();
    }
    int before = ekv_test_failures;
    test_mask_equals_brute_force(t);
    fprintf(stderr, "%s test_mask_equals_brute_force\n", ekv_test_failures == before ? "ok  " : "FAIL");
    test_mask_speed(t);
    tok_free(t);
    return TEST_EXIT();
}
