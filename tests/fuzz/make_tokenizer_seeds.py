#!/usr/bin/env python3
"""make_tokenizer_seeds.py - writes the seed corpus for fuzz_tokenizer.c.

Each seed is text as a prompt or chat message carries it: English, code,
digits (the pre-tokenizer splits numbers), contractions, every script the
Unicode tables cover, emoji with joiners, the model's special-token texts
(whole, nested and cut), invalid UTF-8 (truncated, overlong, surrogates,
above U+10FFFF), NULs, long runs of one character, and chat inputs (0x1E
between role and content). Usage:
    python3 tests/fuzz/make_tokenizer_seeds.py tests/fuzz/corpus/tokenizer
"""
import os, sys
out = sys.argv[1]
RS = '\x1e'
seeds = {
  'english': "Hello world! It's a test, isn't it? I'll see; we've done.",
  'code': "def f(x):\n    return x**2  # square\n\tif (a&&b) { c->d[3] = 0x1F; }\n",
  'digits': "1234567890 3.14159 1,000,000 2024-12-07 12:30",
  'spaces': "  leading and trailing   \n\n\r\n\t \u00a0\u3000 ",
  'scripts': "Ελληνικά Русский עברית العربية हिन्दी 中文 日本語 한국어 ไทย",
  'emoji': "🙂👍🏽👨‍👩‍👧‍👦🏳️‍🌈 ❤️ 1️⃣",
  'combining': "e\u0301 a\u0308 \u1e9b\u0323 Zalgo: Z\u0351\u0352\u0353a\u0354",
  'special': "<|endoftext|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
  'special_cut': "<|im_start <|im_end|<|endoftext <|im_st<|im_start|>art|>",
  'special_nested': "<|<|im_end|>im_start|><reponame><filename><gh_stars>",
  'special_edges': "x<|im_end|>\n",
  'special_only': "<|im_end|>",
  'nul': "a\x00b\x00\x00c",
  'long_run': "a" * 600 + " " + "=" * 400,
  'long_word': "".join(chr(0x4e00 + i) for i in range(300)),
  'chat': "system" + RS + "You are kind." + RS + "user" + RS + "Hi!" + RS + "assistant" + RS + "Hello.",
  'chat_odd': "user" + RS + "a" + RS + "user",
  'chat_empty_role': RS + "content",
}
for name, text in seeds.items():
    with open(os.path.join(out, name), 'wb') as f:
        f.write(text.encode('utf-8'))
raw = {
  'invalid_truncated': b'abc\xe6\x97',
  'invalid_overlong': b'\xc0\xaf\xe0\x80\xaf\xf0\x80\x80\xaf',
  'invalid_surrogate': b'\xed\xa0\x80\xed\xbf\xbf',
  'invalid_above_max': b'\xf4\x90\x80\x80\xf7\xbf\xbf\xbf',
  'invalid_continuations': b'\x80\x81\xbf x \xfe\xff',
  'mixed': b'ok \xff <|im_end|> \xe2\x82 \xe2\x82\xac',
}
for name, body in raw.items():
    with open(os.path.join(out, name), 'wb') as f:
        f.write(body)
