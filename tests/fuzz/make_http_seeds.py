#!/usr/bin/env python3
"""make_http_seeds.py - writes the seed corpus for fuzz_http.c.

Each seed is one whole HTTP/1.1 exchange as raw bytes: the requests the
official clients send (chat and completions, streaming or not, GET of the
small endpoints), pipelined requests, and the framing and body cases the
server must refuse with one 400 (two Content-Length headers, a malformed
one, Content-Length with Transfer-Encoding, an unknown Transfer-Encoding,
data after the JSON, raw control and NUL bytes, repeated keys, an unknown
role, a kv budget above the prompt). Usage:
    python3 tests/fuzz/make_http_seeds.py tests/fuzz/corpus/http
"""
import json, os, sys
out = sys.argv[1]
chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 2})
comp = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 2})


def post(body, path="/v1/chat/completions", extra=b"", length=True):
    body = body.encode() if isinstance(body, str) else body
    h = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if length:
        h += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    return h + extra + b"\r\n" + body


def chunked(body):
    body = body.encode()
    return hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"


n = str(len(chat)).encode()
seeds = {
    "chat": post(chat),
    "chat_stream": post(chat[:-1] + ', "stream": true, "stream_options": {"include_usage": true}}'),
    "completion": post(comp, "/v1/completions"),
    "completion_stream": post(comp[:-1] + ', "stream": true}', "/v1/completions"),
    "chunked": post(b"", extra=b"Transfer-Encoding: chunked\r\n", length=False) + chunked(chat),
    "get_models": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "get_health": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "get_metrics": b"GET /metrics HTTP/1.0\r\n\r\n",
    "pipelined": post(chat) + b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n" + post(comp, "/v1/completions"),
    "no_route": b"DELETE /v2/x HTTP/1.1\r\nHost: x\r\n\r\n",
    "two_lengths": post(chat, extra=b"Content-Length: 5\r\n"),
    "same_length_twice": post(chat, extra=b"Content-Length: " + n + b"\r\n"),
    "bad_length": post(b"", length=False, extra=b"Content-Length: 1x\r\n") + chat.encode(),
    "length_and_chunked": post(b"", length=False, extra=b"Content-Length: " + n
                               + b"\r\nTransfer-Encoding: chunked\r\n") + chunked(chat),
    "gzip_encoding": post(b"", length=False, extra=b"Transfer-Encoding: gzip\r\n") + chunked(chat),
    "trailing_data": post(chat + "x"),
    "raw_control": post(chat.replace("Hi", "H\x01i")),
    "nul_byte": post(chat.replace("Hi", "H\x00i")),
    "repeated_key": post(chat[:-1] + ', "max_tokens": 3}'),
    "unknown_role": post(chat.replace('"user"', '"wizard"')),
    "budget_above_prompt": post(chat[:-1] + ', "kv_method": "snapkv", "kv_budget": 4096}'),
    "bad_utf8": post(chat.encode().replace(b"Hi", b"H\xc0\xafi")),
    "truncated": post(chat)[:-10],
}
os.makedirs(out, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(out, name + ".http"), "wb") as f:
        f.write(data)
