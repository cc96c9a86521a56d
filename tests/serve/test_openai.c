/*
 * test_openai.c - the OpenAI request bodies of /v1/completions and
 * /v1/chat/completions (coordinator/openai.c) through oai_parse and then
 * coord_submit into a fake worker group, as http.c drives them: what is
 * accepted reaches the group with the values the body gave, and what is
 * refused is EKV_EINVAL with a message naming the field. The C side of
 * what tests/serve/test_serve.py checks with real clients, cheap enough to
 * run under every sanitizer. Usage: test_openai MODEL.gguf.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ekv_test.h"
#include "entrokv/coordinator.h"
#include "entrokv/gguf.h"
#include "openai.h"

static int n_submits;
static engine_request last;
static void *last_ctxs[COORD_MAX_N]; /* last.choice_ctx's pointers (n > 1), copied */

static ekv_status fake_submit(void *impl, const engine_request *r, uint64_t *id, ekv_error *err)
{
    (void)impl, (void)err;
    last = *r;
    last.prompt = NULL; /* the caller's only during submit */
    for (int32_t i = 0; r->n > 1 && i < r->n && i < COORD_MAX_N; i++)
        last_ctxs[i] = r->choice_ctx[i];
    last.choice_ctx = NULL;
    *id = (uint64_t)++n_submits;
    return EKV_OK;
}

static void fake_cancel(void *impl, uint64_t id)
{
    (void)impl, (void)id;
}

static void fake_stats(void *impl, engine_stats *s)
{
    (void)impl;
    memset(s, 0, sizeof *s);
}

static const coord_group_ops fake_ops = {fake_submit, fake_cancel, fake_stats, NULL};

static ekv_coordinator *coord;

/* Parses body as kind and submits it; returns the status of whichever step
 * refused it (EKV_OK: the group has it in `last`). */
static ekv_status submit(oai_kind kind, const char *body, ekv_error *err)
{
    oai_request r;
    memset(err, 0, sizeof *err);
    ekv_status rc = oai_parse(coord, kind, body, strlen(body), &r, err);
    if (rc == EKV_OK) {
        coord_stream *s = NULL;
        rc = coord_submit(coord, &r.r, &s, err);
        if (s) {
            engine_usage u = {0};
            for (int32_t i = 0; i < (last.n > 1 ? last.n : 1); i++)
                last.on_done(last.n > 1 ? last_ctxs[i] : last.ctx, GEN_FINISH_LENGTH, &u,
                             EKV_OK, NULL);
            coord_stream_release(s);
        }
    }
    oai_request_free(&r);
    return rc;
}

static void expect_ok(oai_kind kind, const char *body)
{
    ekv_error err;
    int before = n_submits;
    ekv_status rc = submit(kind, body, &err);
    if (rc != EKV_OK || n_submits != before + 1) {
        fprintf(stderr, "refused (%d: %s): %s\n", rc, err.msg, body);
        ekv_test_failures++;
    }
}

static void expect_invalid(oai_kind kind, const char *body, const char *needle)
{
    ekv_error err;
    int before = n_submits;
    ekv_status rc = submit(kind, body, &err);
    CHECK_EQ_INT(n_submits, before);
    if (rc != EKV_EINVAL || err.code != EKV_EINVAL || !strstr(err.msg, needle)) {
        fprintf(stderr, "%s: want EINVAL mentioning '%s', got %d '%s'\n", body, needle, rc,
                err.msg);
        ekv_test_failures++;
    }
}

static void test_chat_messages_reach_the_group(void)
{
    expect_ok(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}");
    CHECK_EQ_INT(last.params.max_tokens, 16); /* the coordinator's default */
    expect_ok(OAI_CHAT, "{\"messages\": [{\"role\": \"system\", \"content\": null},"
                        "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": "
                        "\"a\"}, {\"type\": \"text\", \"text\": \"b\"}]}], \"max_tokens\": 7}");
    CHECK_EQ_INT(last.params.max_tokens, 7);
    /* the content parts are joined into one string */
    oai_request r;
    ekv_error err = {0};
    const char *body = "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", "
                       "\"text\": \"Hello, \"}, {\"type\": \"text\", \"text\": \"world\"}]}]}";
    CHECK_EQ_INT(oai_parse(coord, OAI_CHAT, body, strlen(body), &r, &err), EKV_OK);
    CHECK_EQ_INT(r.r.n_messages, 1);
    if (r.r.n_messages == 1) {
        CHECK_STR(r.r.messages[0].role, "user");
        CHECK_STR(r.r.messages[0].content, "Hello, world");
    }
    oai_request_free(&r);
    /* max_completion_tokens wins over max_tokens in chat */
    expect_ok(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
                        "\"max_completion_tokens\": 5, \"max_tokens\": 9}");
    CHECK_EQ_INT(last.params.max_tokens, 5);
}

static void test_chat_bad_messages_are_refused(void)
{
    expect_invalid(OAI_CHAT, "{\"messages\": []}", "messages");
    expect_invalid(OAI_CHAT, "{\"messages\": \"hi\"}", "messages");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"content\": \"x\"}]}", "role");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": 3, \"content\": \"x\"}]}", "role");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}",
                   "messages[0].content");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": true}]}",
                   "messages[0].content");
    expect_invalid(OAI_CHAT,
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"ok\"}, {\"role\": "
                   "\"user\", \"content\": {\"text\": \"x\"}}]}",
                   "messages[1].content");
    expect_invalid(OAI_CHAT,
                   "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": "
                   "\"image_url\", \"text\": \"x\"}]}]}",
                   "type");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"\", \"content\": \"x\"}]}", "role");
}

static void test_completion_prompt_forms(void)
{
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"Once upon a time\", \"max_tokens\": 3}");
    CHECK_EQ_INT(last.params.max_tokens, 3);
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": [\"The quick brown fox\"]}");
    expect_invalid(OAI_COMPLETIONS, "{\"max_tokens\": 3}", "prompt");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": 5}", "prompt");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": [\"a\", \"b\"]}", "prompt");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"\"}", "prompt");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"\xff\xfe\"}", "UTF-8");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"\\udc00\"}", "JSON"); /* lone surrogate */
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\"", "JSON");
    expect_invalid(OAI_COMPLETIONS, "[\"prompt\"]", "object");
}

static void test_max_tokens_bounds(void)
{
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 1}");
    CHECK_EQ_INT(last.params.max_tokens, 1);
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 64}");
    CHECK_EQ_INT(last.params.max_tokens, 64);
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 2e1}");
    CHECK_EQ_INT(last.params.max_tokens, 20);
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 0}", "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": -1}", "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": -2147483648}",
                   "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 65}", "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 1e10}", "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 1.5}", "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": \"8\"}", "max_tokens");
    expect_invalid(OAI_CHAT,
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
                   "\"max_completion_tokens\": -3}",
                   "max_tokens");
}

static void test_options_and_stops(void)
{
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": \"END\", \"temperature\": 0, "
                               "\"seed\": 7, \"top_k\": 5, \"n\": 1, \"stream\": true}");
    CHECK_EQ_INT(last.params.n_stops, 1);
    CHECK_EQ_INT(last.params.sampling.seed, 7);
    CHECK_EQ_INT(last.params.sampling.top_k, 5);
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": [\"a\", \"b\", \"c\"]}");
    CHECK_EQ_INT(last.params.n_stops, 3);
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": [\"a\", 3]}", "stop");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": [\"\"]}", "stop");
    expect_invalid(OAI_COMPLETIONS,
                   "{\"prompt\": \"x\", \"stop\": [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\","
                   "\"8\",\"9\",\"10\",\"11\",\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
                   "stop");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"stream\": \"yes\"}", "stream");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"temperature\": \"hot\"}",
                   "temperature");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"seed\": 0.5}", "seed");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"kv_method\": 3}", "kv_method");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"kv_method\": \"nope\"}", "nope");
}

/* Issue 23: nothing silently ignored, and the fields that are now honoured. */
#define CHAT_X "\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]"

static void test_allow_list(void)
{
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"foo\": 1}", "'foo'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"functions\": []}", "'functions'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"store\": false}", "'store'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"echo\": true}", "'echo'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"top_logprobs\": 2}", "'top_logprobs'");
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"response_format\": {\"type\": \"json_object\"}}");
    CHECK(last.params.grammar != NULL); /* compiled by the coordinator */
    expect_invalid(OAI_CHAT,
                   "{" CHAT_X ", \"response_format\": {\"type\": \"json_schema\", \"json_schema\": "
                   "{\"schema\": {\"type\": \"string\", \"pattern\": \"a\"}}}}",
                   "'pattern'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"response_format\": {\"type\": \"xml\"}}",
                   "response_format.type");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"response_format\": \"json\"}", "response_format");
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"response_format\": {\"type\": \"text\"}}");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"tools\": [{\"type\": \"function\"}]}", "'tools'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"tool_choice\": \"auto\"}", "'tool_choice'");
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"tool_choice\": \"none\", \"tools\": null}");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"suffix\": \"y\"}", "'suffix'");
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"best_of\": 1, \"user\": \"u-1\"}");
    expect_invalid(OAI_CHAT,
                   "{\"messages\": [{\"role\": \"user\", \"content\": \"x\", \"name\": \"a\"}]}",
                   "messages[0].name");
    expect_invalid(OAI_COMPLETIONS,
                   "{\"prompt\": \"x\", \"stream\": true, \"stream_options\": {\"foo\": true}}",
                   "'foo'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"user\": 5}", "user");
}

/* n and best_of: n reaches the engine with a ctx per choice; the values
 * OpenAI refuses, and what the fork cannot do, are 400s naming the field. */
static void test_choices(void)
{
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 3, \"seed\": 7}");
    CHECK_EQ_INT(last.n, 3);
    CHECK(last_ctxs[0] && last_ctxs[1] != last_ctxs[2]);
    CHECK(last.params.sampling.seed == 7); /* the engine adds i for choice i */
    CHECK(!last.params.logprobs);
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"n\": 16}");
    CHECK_EQ_INT(last.n, 16);
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"n\": 1}");
    CHECK(last.n <= 1);
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"n\": 0}", "'n'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"n\": 17}", "'n'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": -1}", "'n'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 1.5}", "'n'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": \"2\"}", "'n'");
    /* best_of: generated best_of, ranked by their logprobs */
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 2, \"best_of\": 3}");
    CHECK_EQ_INT(last.n, 3);
    CHECK(last.params.logprobs);
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 2, \"best_of\": 1}",
                   "'best_of'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"best_of\": 17}", "'best_of'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"best_of\": 0}", "'best_of'");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"best_of\": 2, \"stream\": true}",
                   "'stream'");
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 2, \"stream\": true}");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"best_of\": 2}", "'best_of'");
    /* what the fork cannot do */
    expect_invalid(OAI_COMPLETIONS,
                   "{\"prompt\": \"x\", \"n\": 2, \"echo\": true, \"logprobs\": 1}", "n > 1");
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 2, \"echo\": true}");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"n\": 2, \"decode_method\": \"scope-slide\"}",
                   "decode_method");
}

static void test_penalties_bias_logprobs(void)
{
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"presence_penalty\": 0.5, "
                               "\"frequency_penalty\": -1.25}");
    CHECK(last.params.sampling.presence_penalty == 0.5f);
    CHECK(last.params.sampling.frequency_penalty == -1.25f);
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"presence_penalty\": 2.5}",
                   "presence_penalty");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"frequency_penalty\": -3}", "frequency_penalty");
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"logit_bias\": {\"5\": -100, \"7\": 2.5}}");
    CHECK_EQ_INT(last.params.sampling.n_logit_bias, 2);
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"logit_bias\": {\"x\": 1}}", "logit_bias");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"logit_bias\": {\"5\": 101}}", "logit_bias");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"logit_bias\": {\"99999999\": 1}}", "vocabulary");
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"logprobs\": 3}");
    CHECK(last.params.logprobs && last.params.top_logprobs == 3 && !last.params.prompt_logprobs);
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"x\", \"logprobs\": 6}", "logprobs");
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"logprobs\": true, \"top_logprobs\": 20}");
    CHECK(last.params.logprobs && last.params.top_logprobs == 20);
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"logprobs\": true, \"top_logprobs\": 21}",
                   "top_logprobs");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"top_logprobs\": 2}", "top_logprobs");
    /* echo with max_tokens 0 scores the prompt only */
    expect_ok(OAI_COMPLETIONS,
              "{\"prompt\": \"x y\", \"echo\": true, \"logprobs\": 1, \"max_tokens\": 0}");
    CHECK(last.params.prompt_logprobs && last.params.max_tokens == 0);
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": [[1, 2, 3]], \"echo\": true, \"max_tokens\": 0}");
    CHECK(last.params.prompt_logprobs && last.n_prompt == 3);
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": [4, 5], \"max_tokens\": 2}");
    CHECK_EQ_INT(last.n_prompt, 2);
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": [1, \"a\"]}", "prompt");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": [1, 99999999]}", "vocabulary");
    /* max_completion_tokens: null is not set (it used to hide max_tokens) */
    expect_ok(OAI_CHAT, "{" CHAT_X ", \"max_completion_tokens\": null, \"max_tokens\": 9}");
    CHECK_EQ_INT(last.params.max_tokens, 9);
}

/* RFC 8259 strictness (coordinator/json_strict.c): bodies cJSON alone would
 * accept, each refused with a message naming the problem, the body given
 * with its length so NUL bytes travel. */
static void expect_invalid_n(oai_kind kind, const char *body, size_t len, const char *needle)
{
    oai_request r;
    ekv_error err = {0};
    ekv_status rc = oai_parse(coord, kind, body, len, &r, &err);
    if (rc != EKV_EINVAL || !strstr(err.msg, needle)) {
        fprintf(stderr, "%.*s: want EINVAL mentioning '%s', got %d '%s'\n", (int)len, body, needle,
                rc, err.msg);
        ekv_test_failures++;
    }
    oai_request_free(&r);
}

#define PROMPT_X "\"prompt\": \"hi\""

static void test_strict_json(void)
{
    expect_ok(OAI_COMPLETIONS, " \r\n\t{" PROMPT_X "} \r\n\t");
    expect_ok(OAI_COMPLETIONS, "{" PROMPT_X ", \"stop\": [\"a\\u0001\\n\"]}");
    expect_ok(OAI_COMPLETIONS, "{" PROMPT_X ", \"logit_bias\": {\"1\": 1, \"2\": 1}}");
    /* data after the value */
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X "}x", "after");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X "}{}", "after");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X "} 1", "after");
    /* raw control characters inside strings and as whitespace */
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"a\x01 b\"}", "control");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"a\nb\"}", "control");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"a\tb\"}", "control");
    expect_invalid(OAI_COMPLETIONS, "{\"pro\x1fmpt\": \"ab\"}", "control");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ",\x0b\"max_tokens\": 2}", "control");
    expect_invalid(OAI_COMPLETIONS, "\x0c{" PROMPT_X "}", "control");
    /* NUL bytes anywhere */
    static const char nul1[] = "{\"prompt\": \"a\0b\"}";
    expect_invalid_n(OAI_COMPLETIONS, nul1, sizeof nul1 - 1, "NUL");
    static const char nul2[] = "{\"prompt\": \"ab\"}\0";
    expect_invalid_n(OAI_COMPLETIONS, nul2, sizeof nul2 - 1, "NUL");
    /* invalid UTF-8: a lone continuation byte, an overlong, a surrogate */
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"a\x80\"}", "UTF-8");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"\xc0\xaf\"}", "UTF-8");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"\xed\xa0\x80\"}", "UTF-8");
    /* repeated keys, at the top and deeper */
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", " PROMPT_X "}", "repeats the key 'prompt'");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"max_tokens\": 1, \"max_tokens\": 9}",
                   "max_tokens");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"stream_options\": {\"include_usage\": true, "
                                    "\"include_usage\": false}}",
                   "include_usage");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"user\", \"role\": \"system\", "
                             "\"content\": \"x\"}]}",
                   "role");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"logit_bias\": {\"1\": 1, \"1\": 2}}",
                   "repeats");
    /* stream_options without streaming (OpenAI refuses it too); null is unset */
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"stream_options\": {\"include_usage\": true}}",
                   "only allowed when 'stream'");
    expect_invalid(OAI_CHAT, "{" CHAT_X ", \"stream\": false, \"stream_options\": {}}",
                   "only allowed when 'stream'");
    expect_ok(OAI_COMPLETIONS, "{" PROMPT_X ", \"stream_options\": null}");
    /* numbers as RFC 8259 section 6 writes them, and what strtod alone takes */
    expect_ok(OAI_COMPLETIONS, "{" PROMPT_X ", \"max_tokens\": 2, \"temperature\": 0.5e0, "
                               "\"top_p\": 1E-0, \"seed\": 0, \"echo\": false, \"user\": \"e1\"}");
    expect_ok(OAI_COMPLETIONS, "{" PROMPT_X ", \"logit_bias\": {\"1\": -0.25, \"2\": 1e+1}}");
    const char *bad_numbers[] = {"01", "1.", "-.5", ".5", "+1", "1.e5", "1e", "1e+", "--1", "-",
                                 "0x1", "1.5.5", "1e5e5", "00"};
    for (size_t i = 0; i < sizeof bad_numbers / sizeof *bad_numbers; i++) {
        char body[96];
        snprintf(body, sizeof body, "{" PROMPT_X ", \"max_tokens\": %s}", bad_numbers[i]);
        /* some (0x1) cJSON refuses itself as "not valid JSON"; the rest name the number */
        expect_invalid(OAI_COMPLETIONS, body, strchr(bad_numbers[i], 'x') ? "JSON" : "number");
    }
    /* not JSON at all */
    expect_invalid_n(OAI_COMPLETIONS, "", 0, "JSON");
    expect_invalid(OAI_COMPLETIONS, "   ", "JSON");
    expect_invalid(OAI_COMPLETIONS, "{\"prompt\": \"ab}", "JSON");
}

/* Every field checked before anything runs: roles from the template's set,
 * stream_options' type, a kv budget against the prompt length. */
static void test_fields_checked_before_running(void)
{
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}",
                   "role");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",
                   "role");
    expect_invalid(OAI_CHAT, "{\"messages\": [{\"role\": \"User\", \"content\": \"x\"}]}",
                   "role");
    expect_ok(OAI_CHAT, "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": "
                        "\"user\", \"content\": \"u\"}, {\"role\": \"assistant\", \"content\": "
                        "\"a\"}, {\"role\": \"user\", \"content\": \"u\"}]}");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"stream\": true, \"stream_options\": 1}",
                   "stream_options");
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"stream\": true, \"stream_options\": []}",
                   "stream_options");
    expect_invalid(OAI_COMPLETIONS,
                   "{" PROMPT_X ", \"stream\": true, \"stream_options\": \"include_usage\"}",
                   "stream_options");
    expect_invalid(OAI_COMPLETIONS,
                   "{" PROMPT_X ", \"stream\": true, \"stream_options\": {\"include_usage\": 1}}",
                   "include_usage");
    /* "hi" is one or two tokens (plus BOS): 40 tokens per head is more than
     * the prompt, refused at submit; a fraction and a small count are not */
    expect_invalid(OAI_COMPLETIONS, "{" PROMPT_X ", \"kv_method\": \"snapkv\", \"kv_budget\": 40}",
                   "exceeds the prompt");
    expect_ok(OAI_COMPLETIONS, "{\"prompt\": \"one two three four five six seven eight nine\", "
                               "\"kv_method\": \"snapkv\", \"kv_budget\": 2}");
    expect_ok(OAI_COMPLETIONS, "{" PROMPT_X ", \"kv_method\": \"snapkv\", \"kv_budget\": 0.5}");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_openai MODEL.gguf\n");
        return 2;
    }
    ekv_error err = {0};
    gguf_file *f = gguf_open(argv[1], &err);
    ekv_tokenizer *tok = f ? tok_load(f, &err) : NULL;
    gguf_close(f);
    if (!tok) {
        fprintf(stderr, "loading the tokenizer of %s: %s\n", argv[1], err.msg);
        return 1;
    }
    coord_config cfg;
    coord_config_default(&cfg);
    cfg.max_ctx = 64;
    cfg.default_max_tokens = 16;
    coord = coord_create(tok, &cfg, NULL, &err);
    CHECK(coord != NULL);
    if (!coord || coord_add_group(coord, "fake", &fake_ops, NULL, &err) != EKV_OK)
        return 1;
    RUN_TEST(test_chat_messages_reach_the_group);
    RUN_TEST(test_chat_bad_messages_are_refused);
    RUN_TEST(test_completion_prompt_forms);
    RUN_TEST(test_max_tokens_bounds);
    RUN_TEST(test_options_and_stops);
    RUN_TEST(test_allow_list);
    RUN_TEST(test_penalties_bias_logprobs);
    RUN_TEST(test_choices);
    RUN_TEST(test_strict_json);
    RUN_TEST(test_fields_checked_before_running);
    coord_free(coord);
    tok_free(tok);
    return TEST_EXIT();
}
