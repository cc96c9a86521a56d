"""strict_input.py - input the server must refuse (issue 21, part 6):
bodies that are not RFC 8259 JSON, fields of the wrong type or range, and
HTTP framing that two parsers could read two ways. Each is sent as raw bytes
and must get exactly one well-formed 400 (one status line, an OpenAI error
JSON body), and the server must go on serving. The same for the official
openai client where it can send the case, and over gRPC where it applies.
"""
import json
import socket
import time

import grpc
import openai
import pytest

from conftest import SLOW

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def raw(port, data, timeout=None):
    """Sends data and reads until the server closes or goes quiet."""
    timeout = timeout or (20 if SLOW else 5)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        end = time.time() + timeout
        s.settimeout(0.5 if not SLOW else 2)
        while time.time() < end:
            try:
                b = s.recv(65536)
            except socket.timeout:
                if out and b"\r\n\r\n" in out:
                    break
                continue
            except ConnectionResetError:
                break
            if not b:
                break
            out += b
    return out


def parse_one(resp):
    """The single HTTP response in resp: (status, headers, body). Fails if
    there is more than one status line or the framing is off."""
    assert resp.count(b"HTTP/1.") == 1, f"not exactly one status line: {resp!r}"
    head, sep, body = resp.partition(b"\r\n\r\n")
    assert sep, f"no end of headers: {resp!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        key = k.strip().lower().decode()
        assert key not in headers, f"header {key} twice: {resp!r}"
        headers[key] = v.strip().decode()
    if "content-length" in headers:
        assert len(body) == int(headers["content-length"]), f"body length off: {resp!r}"
    return status, headers, body


def expect_400(port, data, needle=None):
    status, headers, body = parse_one(raw(port, data))
    assert status == 400, (data, status, body)
    if body:
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error", body
        if needle:
            assert needle.lower() in err["message"].lower(), (needle, err["message"])
    return body


def post(body, path="/v1/chat/completions", extra=b""):
    if isinstance(body, str):
        body = body.encode()
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def still_serving(server):
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(**CHAT)
    assert r.choices[0].finish_reason in ("stop", "length")
    status, _, _ = parse_one(raw(server.http_port, post(json.dumps(CHAT))))
    assert status == 200


GOOD = json.dumps(CHAT)
BAD_BODIES = [
    (GOOD + "x", "after"),
    (GOOD + " {}", "after"),
    (GOOD.replace('"Hi"', '"H\x01i"'), "control"),
    (GOOD.replace('"Hi"', '"H\ni"'), "control"),
    (GOOD.replace('"Hi"', '"H\x00i"'), "NUL"),
    (GOOD + "\x00", "NUL"),
    (GOOD[:-1] + ', "max_tokens": 3}', "max_tokens"),
    (GOOD.replace('"role": "user"', '"role": "user", "role": "system"'), "role"),
    (GOOD.replace('"user"', '"wizard"'), "role"),
    (GOOD[:-1] + ', "stream": true, "stream_options": 1}', "stream_options"),
    (GOOD[:-1] + ', "stream": true, "stream_options": "x"}', "stream_options"),
    (GOOD[:-1] + ', "kv_method": "snapkv", "kv_budget": 4096}', "exceeds the prompt"),
    (GOOD[:-1] + ', "stream": true, "kv_method": "snapkv", "kv_budget": 4096}',
     "exceeds the prompt"),
]


@pytest.mark.parametrize("body,needle", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_strict_rejects_malformed_json_and_fields(server, body, needle):
    expect_400(server.http_port, post(body), needle)


def test_strict_rejects_invalid_utf8(server):
    body = GOOD.encode().replace(b'"Hi"', b'"H\xc0\xafi"')
    expect_400(server.http_port, post(body), "UTF-8")
    still_serving(server)


def test_strict_rejects_malformed_framing(server):
    port = server.http_port
    body = GOOD.encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n")
    n = str(len(body)).encode()
    cases = [
        # two conflicting Content-Length headers (request smuggling)
        head + b"Content-Length: " + n + b"\r\nContent-Length: 5\r\n\r\n" + body,
        head + b"Content-Length: 5\r\nContent-Length: " + n + b"\r\n\r\n" + body,
        # the same length twice is still two headers
        head + b"Content-Length: " + n + b"\r\nContent-Length: " + n + b"\r\n\r\n" + body,
        # Content-Length together with Transfer-Encoding
        head + b"Content-Length: " + n + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
        # an unknown Transfer-Encoding
        head + b"Transfer-Encoding: gzip\r\n\r\n" + body,
        head + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
    ]
    for data in cases:
        status, _, _ = parse_one(raw(port, data))
        assert status == 400, (data, status)
    still_serving(server)


def malformed_lengths():
    body = GOOD.encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n")
    n = str(len(body)).encode()
    return [head + b"Content-Length: " + v + b"\r\n\r\n" + body
            for v in (b"abc", b"1x", b"-1", b"+" + n, n + b", " + n, b"")]


def test_strict_rejects_malformed_content_length(server):
    """The front (coordinator/http_front.c) refuses these before
    libmicrohttpd reads them: the answer is a 400 and no request reaches
    the coordinator."""
    accepted = server.stderr().count(" accepted ")
    for data in malformed_lengths():
        resp = raw(server.http_port, data)
        assert resp.startswith(b"HTTP/1.1 400 "), (data, resp)
    assert server.stderr().count(" accepted ") == accepted
    still_serving(server)


def test_strict_malformed_content_length_one_response(server):
    """(libmicrohttpd 0.9.75 alone sends its status line and headers twice.)"""
    for data in malformed_lengths():
        status, _, _ = parse_one(raw(server.http_port, data))
        assert status == 400


def responses(data):
    """The HTTP responses one after another in data, each framed by its
    Content-Length: [(status, headers, body)]; fails on anything else."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep and head.startswith(b"HTTP/1.1 "), f"not a response: {data!r}"
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            assert k.strip().lower().decode() not in headers, f"header twice: {head!r}"
            headers[k.strip().lower().decode()] = v.strip().decode()
        n = int(headers["content-length"])
        assert len(rest) >= n, f"short body: {data!r}"
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return out


KEEP = post(GOOD).replace(b"Connection: close\r\n", b"")  # keep-alive


def bad_framings():
    body = GOOD.encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    n = str(len(body)).encode()
    return malformed_lengths() + [
        head + b"Content-Length: " + n + b"\r\nContent-Length: 5\r\n\r\n" + body,
        head + b"Content-Length: abc\r\nContent-Length: " + n + b"\r\n\r\n" + body,
        head + b"Content-Length: " + n + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
        # obs-fold, whitespace before the colon, bare LF line ends
        head + b"Content-Length: " + n + b"\r\nX-A: 1\r\n 2\r\n\r\n" + body,
        head + b"Content-Length : " + n + b"\r\n\r\n" + body,
        head.replace(b"\r\n", b"\n") + b"Content-Length: " + n + b"\n\n" + body,
    ]


def test_strict_framing_checked_on_every_keepalive_request(server):
    """A good request, then a bad one on the same connection, pipelined in
    one write and one after the other: the first is answered 200, the
    second with exactly one 400, in order, and the connection closes."""
    for i, bad in enumerate(bad_framings()):
        # a completion with a body before some, a bodiless probe before the
        # rest (a completion each would take minutes under the sanitizers)
        good = KEEP if i % 4 == 0 else b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
        got = responses(raw(server.http_port, good + bad))
        assert [s for s, _, _ in got] == [200, 400], (bad, got)
        assert got[1][1].get("connection") == "close", got
        assert json.loads(got[1][2])["error"]["type"] == "invalid_request_error"
    timeout = 20 if SLOW else 5
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout) as s:
        s.sendall(KEEP)
        first = b""
        while not first.endswith(b"}"):  # the whole JSON answer
            first += s.recv(65536)
        assert responses(first)[0][0] == 200
        s.sendall(malformed_lengths()[0])
        rest = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            rest += b
        assert [st for st, _, _ in responses(rest)] == [400], rest
    still_serving(server)


def chunked(chunks, trailer=b""):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(chunks) + trailer)


def test_strict_chunked_bodies(server):
    body = GOOD.encode()
    parts = [body[:10], body[10:50], body[50:]]
    ok = [hex(len(p))[2:].encode() + b"\r\n" + p + b"\r\n" for p in parts]
    ok[1] = hex(len(parts[1]))[2:].upper().encode() + b";ext=1\r\n" + parts[1] + b"\r\n"
    status, _, _ = parse_one(raw(server.http_port, chunked(ok, b"0\r\nX-T: 1\r\n\r\n")))
    assert status == 200
    # a chunk whose size is not hex, data longer than its size, no CRLF after it
    for bad in ([b"zz\r\n" + body + b"\r\n"],
                [hex(len(body) - 5)[2:].encode() + b"\r\n" + body + b"\r\n"],
                [hex(len(body))[2:].encode() + b"\r\n" + body + b"XY"]):
        status, _, rbody = parse_one(raw(server.http_port, chunked(bad, b"0\r\n\r\n")))
        assert status == 400, (bad, status)
        assert "chunked" in json.loads(rbody)["error"]["message"]
    still_serving(server)


def test_strict_head_too_large_is_431(server):
    big = post(GOOD, extra=b"X-Pad: " + b"a" * (40 << 10) + b"\r\n")
    status, headers, _ = parse_one(raw(server.http_port, big))
    assert status == 431 and headers.get("connection") == "close"
    still_serving(server)


def test_strict_trickled_request_is_served(server):
    """The front holds a head until it is whole: pieces of a few bytes
    still make one request."""
    data = post(GOOD)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        for i in range(0, len(data), 7):
            s.sendall(data[i:i + 7])
            time.sleep(0.002)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    assert parse_one(out)[0] == 200


def test_strict_refuse_path_is_not_guessable(server):
    """Clients cannot reach the requests the front puts in place of refused
    heads: a guess is an ordinary 404."""
    req = (b"GET /.entrokv-refused-000000000000000000000000 HTTP/1.1\r\nHost: x\r\n"
           b"X-Entrokv-Refused: 9\r\nConnection: close\r\n\r\n")
    assert parse_one(raw(server.http_port, req))[0] == 404


def test_strict_keeps_serving_after_rejects(server):
    for body, _ in BAD_BODIES[:4]:
        expect_400(server.http_port, post(body))
    still_serving(server)


def test_strict_openai_client_sees_400(server):
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="m", max_tokens=2,
                                       messages=[{"role": "wizard", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="exceeds the prompt"):
        client.chat.completions.create(**CHAT, stream=True,
                                       extra_body={"kv_method": "snapkv", "kv_budget": 4096})
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(**CHAT, stream=True, extra_body={"stream_options": 1})


def test_strict_rejects_grpc_budget_above_prompt(server, pb):
    stub = pb["entrokv_pb2_grpc"].GenerationStub(server.channel)
    accepted = server.stderr().count(" accepted ")
    req = pb["entrokv_pb2"].GenerateRequest(prompt="Hi", max_tokens=2, kv_method="snapkv",
                                            kv_budget=4096)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "exceeds the prompt" in e.value.details()
    # refused before prefill: no request was accepted into a group
    assert server.stderr().count(" accepted ") == accepted
    still_serving(server)


def test_strict_rejects_grpc_unknown_role(server, pb):
    stub = pb["entrokv_pb2_grpc"].GenerationStub(server.channel)
    m = pb["entrokv_pb2"]
    req = m.GenerateRequest(messages=[m.Message(role="wizard", content="Hi")], max_tokens=2)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "role" in e.value.details()
    ok = m.GenerateRequest(messages=[m.Message(role="system", content="Be brief."),
                                     m.Message(role="user", content="Hi")], max_tokens=2)
    assert len(list(stub.Generate(ok, timeout=60))) >= 1


def test_strict_rejects_grpc_nul_and_invalid_utf8(server, pb):
    """protobuf-c gives strings back NUL-terminated: a NUL inside one would
    cut the prompt silently; the server refuses it (and invalid UTF-8,
    which proto3 forbids) with the field's name, as HTTP answers 400."""
    m = pb["entrokv_pb2"]
    stub = pb["entrokv_pb2_grpc"].GenerationStub(server.channel)
    cases = [
        (stub.Generate, m.GenerateRequest(prompt="Hi\x00 there", max_tokens=2), "'prompt'"),
        (stub.Generate, m.GenerateRequest(messages=[m.Message(role="user", content="H\x00i")],
                                          max_tokens=2), "'content'"),
        (stub.Generate, m.GenerateRequest(prompt="Hi", stop=["a\x00"], max_tokens=2), "'stop'"),
        (stub.Tokenize, m.TokenizeRequest(text="a\x00b"), "'text'"),
    ]
    for call, req, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            r = call(req, timeout=60)
            list(r) if hasattr(r, "__iter__") else r
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert field in e.value.details() and "NUL" in e.value.details(), e.value.details()
    # invalid UTF-8 cannot come from grpcio's str fields: send the bytes as they are
    raw_gen = server.channel.unary_stream("/entrokv.v1.Generation/Generate")
    bad = b"\x0a\x03H\xc0\xaf" + b"\x18\x02"  # prompt = 'H' + an overlong '/', max_tokens 2
    with pytest.raises(grpc.RpcError) as e:
        list(raw_gen(bad, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "'prompt' is not valid UTF-8" in e.value.details(), e.value.details()
    good = b"\x0a\x02Hi" + b"\x18\x02"
    assert len(list(raw_gen(good, timeout=60))) >= 1
    still_serving(server)
