/*
 * tokenizer.h - byte-level BPE tokenizer built from a GGUF's tokenizer.*
 * metadata, producing the same token ids as llama.cpp for the same file.
 *
 * Supported: tokenizer.ggml.model = "gpt2" (byte-level BPE) with the
 * pre-tokenizers "smollm" (and the others llama.cpp treats the same way:
 * starcoder, refact, command-r, codeshell, exaone, minerva-7b), the GPT-2
 * family ("gpt-2", "olmo", "mpt", ...), the Llama-3 family ("llama-bpe",
 * "llama3", "dbrx", "smaug-bpe", ...) and llama.cpp's "default" set, which
 * llama.cpp also uses for missing or unrecognised pre-tokenizer names.
 * Pre-tokenizers llama.cpp knows but this file does not implement (qwen2,
 * deepseek-*, ...) fail tok_load with EKV_EUNSUPPORTED rather than
 * tokenizing differently. SentencePiece ("llama"), WordPiece etc. likewise.
 * Not reproduced from llama.cpp: the lstrip/rstrip attributes it sets for
 * phi-3 and jina models by name, and appending EOS (add_eos_token).
 *
 * Ownership: tok_load copies everything it needs out of the gguf_file, which
 * may be closed afterwards. An ekv_tokenizer is immutable after load, so any
 * number of threads may use one concurrently; tok_free releases it. Strings
 * returned by tok_piece live as long as the tokenizer. Buffers returned
 * through out-parameters (tok_encode's ids, tok_apply_chat's text) are
 * malloc'd and owned by the caller.
 */
#ifndef ENTROKV_TOKENIZER_H
#define ENTROKV_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/gguf.h"
#include "entrokv/status.h"

typedef struct ekv_tokenizer ekv_tokenizer;

/* Builds the tokenizer from f's tokenizer.* keys. NULL on error: EKV_EFORMAT
 * for missing or malformed metadata, EKV_EUNSUPPORTED for tokenizer models or
 * pre-tokenizers this file does not implement, EKV_ENOMEM. */
ekv_tokenizer *tok_load(const gguf_file *f, ekv_error *err);
void tok_free(ekv_tokenizer *t);

int32_t tok_vocab_size(const ekv_tokenizer *t);
/* bos/eos ids from tokenizer.ggml.{bos,eos}_token_id; without the key,
 * llama.cpp's BPE default 11 (-1 if the vocab is smaller). */
int32_t tok_bos(const ekv_tokenizer *t);
int32_t tok_eos(const ekv_tokenizer *t);
/* Whether prompts should start with BOS (tokenizer.ggml.add_bos_token, or
 * llama.cpp's per-pre-tokenizer default when the key is absent). */
bool tok_add_bos(const ekv_tokenizer *t);

/* End-of-generation: llama.cpp's EOG set, i.e. eos, eot/eom, the FIM
 * pad/repo/file-sep tokens, and any of <|endoftext|>, <|im_end|>,
 * <|eot_id|>, <|end_of_text|>, <|end|>, <end_of_turn>, <|eom_id|>, ...
 * present in the vocab. (For SmolLM2: 0 <|endoftext|>, 2 <|im_end|> and
 * 4 <reponame>, exactly as llama.cpp.) */
bool tok_is_eog(const ekv_tokenizer *t, int32_t id);
/* Control tokens (type CONTROL or UNKNOWN, plus the ones llama.cpp forces to
 * CONTROL by name): the ones a detokenizer hides unless asked to render
 * special tokens. False for out-of-range ids. */
bool tok_is_control(const ekv_tokenizer *t, int32_t id);
/* The id whose vocab text is exactly text[0..len), or -1. */
int32_t tok_find(const ekv_tokenizer *t, const char *text, size_t len);

/* Tokenizes text[0..len) (any bytes: NULs and invalid UTF-8 are fine; invalid
 * bytes are handled as llama.cpp does, each becoming U+FFFD; 4-byte sequences
 * above U+10FFFF, on which llama.cpp aborts, are invalid bytes here). With
 * parse_special, control-token texts in the input become those tokens;
 * user-defined tokens are always matched. add_bos prepends tok_bos() when
 * the model has one. On success *out (malloc'd, caller frees, non-NULL even
 * when *n_out is 0) holds *n_out ids. EKV_ERANGE for len >= 2^31. */
ekv_status tok_encode(const ekv_tokenizer *t, const char *text, size_t len, bool add_bos,
                      bool parse_special, int32_t **out, size_t *n_out, ekv_error *err);

/* The bytes token id stands for: normal tokens with the GPT-2 byte mapping
 * undone (may be part of a UTF-8 character), control/user-defined tokens
 * their text, unused tokens "". NUL-terminated for convenience. NULL (and
 * *len = 0) for an out-of-range id. len may be NULL. */
const char *tok_piece(const ekv_tokenizer *t, int32_t id, size_t *len);
/* Longest tok_piece over the vocab, in bytes. */
size_t tok_max_piece_len(const ekv_tokenizer *t);

/*
 * Streaming detokenizer: feed generated ids one at a time and get back only
 * complete, valid UTF-8 characters; a character split across tokens is held
 * until its last byte arrives. Invalid byte sequences come out as U+FFFD.
 * Control and unknown tokens render as nothing unless render_special.
 * The state is a plain value: no allocation, nothing to free.
 */
typedef struct tok_stream {
    bool render_special;
    uint8_t n_pending;
    uint8_t pending[4]; /* an incomplete UTF-8 sequence (at most 3 bytes) */
} tok_stream;

void tok_stream_init(tok_stream *s, bool render_special);
/* Bytes that one push can write at most: 3 * (tok_max_piece_len + 4)
 * (every byte invalid -> a 3-byte U+FFFD). With a smaller cap the output is
 * cut at a character boundary and the rest of that token is lost. */
size_t tok_stream_min_cap(const ekv_tokenizer *t);
/* Appends token id; writes at most cap bytes to out and returns how many.
 * Out-of-range ids render as nothing. */
size_t tok_stream_push(tok_stream *s, const ekv_tokenizer *t, int32_t id, char *out, size_t cap);
/* At end of stream: writes an incomplete trailing sequence as U+FFFD (needs
 * cap >= 3) and resets the state. Returns the bytes written. */
size_t tok_stream_flush(tok_stream *s, char *out, size_t cap);

/*
 * Chat templates: the prompt text the model's tokenizer.chat_template would
 * render, for the two template families recognised from the template text:
 *  - ChatML ("<|im_start|>"): "<|im_start|>ROLE\nCONTENT<|im_end|>\n" per
 *    message; when the template carries a literal default system block
 *    ('<|im_start|>system\n...<|im_end|>\n', as SmolLM2's and Qwen's do) it
 *    is emitted first if messages[0] is not a system message.
 *  - Llama 3 ("<|start_header_id|>"): "<|start_header_id|>ROLE<|end_header_id|>
 *    \n\nCONTENT<|eot_id|>" with content trimmed, as the Llama 3.0 template.
 *    The BOS text is not included (encode with add_bos = tok_add_bos()).
 *    Llama 3.1+ templates (date/tool preamble) are EKV_EUNSUPPORTED.
 * add_generation_prompt appends the assistant header. *out is malloc'd and
 * NUL-terminated; the caller frees it. Tokenize it with parse_special.
 * EKV_EUNSUPPORTED when the model has no template or another family;
 * EKV_EINVAL for NULL roles or contents.
 */
typedef struct tok_message {
    const char *role;
    const char *content;
} tok_message;

/* The model's tokenizer.chat_template (NUL-terminated), or NULL. */
const char *tok_chat_template(const ekv_tokenizer *t);

ekv_status tok_apply_chat(const ekv_tokenizer *t, const tok_message *msgs, size_t n,
                          bool add_generation_prompt, char **out, ekv_error *err);

#endif
