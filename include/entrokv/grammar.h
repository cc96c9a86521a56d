/*
 * grammar.h - structured output: a JSON Schema (or "any JSON object")
 * compiled into a byte-level pushdown automaton, and the token mask that
 * keeps sampling inside it (grammar-constrained decoding).
 *
 * Three objects:
 *  - ekv_grammar: a compiled schema. Immutable once compiled and shared by
 *    reference count (grammar_retain / grammar_release), so any number of
 *    requests and threads use one. grammar_get compiles an OpenAI
 *    response_format once and keeps it in a small process-wide cache keyed
 *    by the text's SHA-256.
 *  - ekv_grammar_vocab: the tokenizer's token bytes arranged for masking (a
 *    byte trie of every token, and the tokens that can sit inside a JSON
 *    string). One per tokenizer, immutable, built in tens of milliseconds.
 *  - grammar_state: one request's position in the automaton, advanced byte
 *    by byte as tokens are accepted. Not thread-safe; owned by its request.
 *
 * What a schema may say (anything else is EKV_EUNSUPPORTED naming the
 * keyword and where it sits, never silently ignored):
 *   type (a name or an array of names): object, array, string, integer,
 *   number, boolean, null; properties, required, additionalProperties
 *   (true/false; a schema only beside properties, where it has no effect:
 *   only declared properties are generated); items, minItems, maxItems;
 *   minLength, maxLength; enum, const (any JSON values); anyOf / oneOf whose
 *   alternatives can be told apart by their first byte (different JSON
 *   types); $ref to "#/$defs/..." or "#/definitions/..." (no cycles); the
 *   annotations title, description, default, examples, $schema, $id,
 *   $comment. A schema with no type and no constraint is any JSON value.
 *
 * What the automaton generates (always valid against the schema, a subset
 * of what the schema allows): properties in the schema's order, each
 * optional one present or not, no undeclared property; enum and const
 * values in their compact JSON spelling; numbers with at most
 * GRAMMAR_MAX_DIGITS digits per part (so a number cannot grow forever);
 * strings as valid UTF-8 with JSON escapes. Whitespace between tokens of
 * JSON is allowed where JSON allows it, but at most GRAMMAR_MAX_WS bytes in
 * a row, so a model cannot loop on blanks; none after the top-level value.
 * Nesting is bounded by GRAMMAR_MAX_DEPTH (a deeper schema is refused;
 * "any JSON" stops opening containers there).
 */
#ifndef ENTROKV_GRAMMAR_H
#define ENTROKV_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"
#include "entrokv/tokenizer.h"

#define GRAMMAR_MAX_DEPTH 32      /* frames: containers nested plus the innermost value */
#define GRAMMAR_MAX_WS 16         /* whitespace bytes in a row between JSON tokens */
#define GRAMMAR_MAX_DIGITS 15     /* digits in a number's integer or fraction part */
#define GRAMMAR_MAX_EXP_DIGITS 3  /* digits in its exponent */
#define GRAMMAR_MAX_CHOICES 64    /* enum values; properties of one object */
#define GRAMMAR_MAX_NODES 4096    /* compiled schema nodes ($refs expanded) */
#define GRAMMAR_MAX_SCHEMA 262144 /* bytes of schema / response_format text */

typedef struct ekv_grammar ekv_grammar;
typedef struct ekv_grammar_vocab ekv_grammar_vocab;
typedef struct grammar_state grammar_state;

/* Compiles a JSON Schema text (NUL-terminated), or with NULL "any JSON
 * object" (OpenAI's JSON mode). One reference, released with
 * grammar_release. NULL and err: EKV_EINVAL for text that is not JSON or
 * a schema that contradicts itself (minItems > maxItems, a required
 * property that is not declared), EKV_EUNSUPPORTED for a keyword or
 * construct listed as unsupported above (the message names it). */
ekv_grammar *grammar_compile_json(const char *schema_json, ekv_error *err);

/* An OpenAI response_format object's text: {"type": "text"} (then *out is
 * NULL: no constraint), {"type": "json_object"} or {"type": "json_schema",
 * "json_schema": {"name": ..., "schema": {...}, "strict": ...}} (a missing
 * schema is any object). Compiles through the cache: the same text compiles
 * once per process. On success *out holds a new reference (or NULL). */
ekv_status grammar_get(const char *response_format, size_t len, ekv_grammar **out,
                       ekv_error *err);

void grammar_retain(ekv_grammar *g);
void grammar_release(ekv_grammar *g); /* NULL is fine */
/* The response_format text the grammar came from (grammar_get), or "" for
 * one compiled from a bare schema: what a remote worker is sent. */
const char *grammar_source(const ekv_grammar *g);

/* The token bytes of t for masking. NULL and err on no memory. */
ekv_grammar_vocab *grammar_vocab_create(const ekv_tokenizer *t, ekv_error *err);
void grammar_vocab_free(ekv_grammar_vocab *v);

/* A fresh state at the start of the value; holds a reference to g. Scratch
 * for masking is sized for v's longest token. NULL on no memory. */
grammar_state *grammar_state_new(ekv_grammar *g, const ekv_grammar_vocab *v, ekv_error *err);
void grammar_state_free(grammar_state *s);

/* Sets logits[id] = -INFINITY for every token whose bytes cannot all be
 * consumed from s (control tokens always; end-of-generation tokens unless
 * the value is complete). n_vocab must be v's vocab size. Returns the
 * number of tokens left allowed (0: a dead end, which a correct automaton
 * never reaches). s is not changed. */
int32_t grammar_mask_logits(grammar_state *s, float *logits, int32_t n_vocab);
/* Whether token id may come next (the same rule as the mask, one token). */
bool grammar_token_allowed(const grammar_state *s, int32_t id);

/* Advances s over bytes[0..len). EKV_EINVAL (s unchanged) when some byte
 * is not allowed. */
ekv_status grammar_accept_bytes(grammar_state *s, const char *bytes, size_t len,
                                ekv_error *err);
/* Advances s over token id's bytes; an end-of-generation token is allowed
 * only when complete and changes nothing. */
ekv_status grammar_accept_token(grammar_state *s, int32_t id, ekv_error *err);
/* The value is complete: end-of-generation may come now. */
bool grammar_accepting(const grammar_state *s);
/* The value is complete and nothing can follow it (so only EOS is left). */
bool grammar_done(const grammar_state *s);

/* Whether the whole of text[0..len) is a complete value of g (a test and
 * debugging aid: runs a fresh state over it). */
bool grammar_matches(ekv_grammar *g, const char *text, size_t len);

#endif
