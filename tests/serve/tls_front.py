"""tls_front.py - HTTPS through the framing front (issue 21; docs/serving.md,
"Security"): the front terminates TLS itself (coordinator/http_tls.c), so
every framing case strict_input.py sends as plain bytes gets, over TLS,
exactly one well-formed 400 (431 for a head too large), in order after
earlier pipelined requests; and the connection caps and timeouts hold for
TLS clients, the handshake included.

The cases and the response parsers are strict_input.py's (written from RFC
9112, not from our code); only the transport differs: python's ssl module
over a raw socket, with a CA and server certificate made by the openssl CLI
(security.py's helpers).
"""
import json
import os
import select
import socket
import ssl
import threading
import time

import openai
import pytest

import strict_input as si
from conftest import SLOW, Server
from security import make_ca, make_cert

KEY = "ekv-tls-front-key-42"
T = 3 if SLOW else 1
TIMEOUT_S = 2
PER_CLIENT = 16
AUTH = b"Authorization: Bearer " + KEY.encode() + b"\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    make_ca(d, "ca")
    make_ca(d, "evil")
    make_cert(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    return d


@pytest.fixture(scope="module")
def tls(pki):
    s = Server("--ctx", "512", "--max-running", "4", "--kvstore-mb", "0",
               "--tls-cert", f"{pki}/server.pem", "--tls-key", f"{pki}/server.key",
               "--api-key", KEY, "--http-timeout", str(TIMEOUT_S),
               "--http-max-per-client", str(PER_CLIENT))
    s.ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.pem"))
    yield s
    rc = s.stop()
    assert rc == 0, f"serve exited {rc}:\n{s.stderr()[-4000:]}"


def tls_conn(s, src="127.0.0.1"):
    raw = socket.socket()
    raw.bind((src, 0))
    raw.settimeout(20 * T)
    raw.connect(("127.0.0.1", s.http_port))
    return s.ctx.wrap_socket(raw, server_hostname="localhost")


def read_all(c, timeout):
    """What the server sends until it closes, or goes quiet after a whole head."""
    out = b""
    end = time.time() + timeout
    c.settimeout(0.5 * T)
    while time.time() < end:
        try:
            b = c.recv(65536)
        except socket.timeout:
            if out and b"\r\n\r\n" in out:
                break
            continue
        except (ConnectionResetError, ssl.SSLError):
            break
        if not b:
            break
        out += b
    return out


def tls_raw(s, data, pieces=None):
    """si.raw over TLS; pieces: send data in records of that many bytes."""
    with tls_conn(s) as c:
        if pieces:
            for i in range(0, len(data), pieces):
                c.sendall(data[i:i + pieces])
        else:
            c.sendall(data)
        return read_all(c, 20 * T if SLOW else 5 * T)


def keyed(data):
    """data with the API key after its request line."""
    line, sep, rest = data.partition(b"\r\n")
    return line + sep + AUTH + rest


def framing_cases():
    body = si.GOOD.encode()
    n = str(len(body)).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n")
    return si.malformed_lengths() + si.bad_framings() + [
        head + b"Content-Length: " + n + b"\r\nContent-Length: " + n + b"\r\n\r\n" + body,
        head + b"Content-Length: " + n + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
        head + b"Transfer-Encoding: gzip\r\n\r\n" + body,
        head + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
        head + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]


def openai_client(s):
    return openai.OpenAI(base_url=f"https://127.0.0.1:{s.http_port}/v1", api_key=KEY,
                         max_retries=0, timeout=60 * T,
                         http_client=openai.DefaultHttpxClient(verify=s.ctx))


def livez(s):
    with tls_conn(s) as c:
        c.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return si.parse_one(read_all(c, 10 * T))[0]


def still_serving(s):
    """A probe and a 2-token completion over fresh TLS connections (the
    openai client, whole and streamed: test_tls_concurrent_streams and
    security.py)."""
    assert livez(s) == 200
    assert si.parse_one(tls_raw(s, keyed(si.post(si.GOOD))))[0] == 200


def test_tls_every_framing_case_is_one_400(tls):
    """Without the key and with it: the framing is refused before the key is
    asked for, and the answer is the same either way."""
    for data in framing_cases():
        for d in (data, keyed(data)):
            status, headers, body = si.parse_one(tls_raw(tls, d))
            assert status == 400, (d, status, body)
            assert headers.get("connection") == "close", (d, headers)
            assert json.loads(body)["error"]["type"] == "invalid_request_error", body
    # no refused request reached the coordinator
    assert " accepted " not in tls.stderr()
    still_serving(tls)


def test_tls_malformed_length_in_one_byte_records(tls):
    """The head split over many TLS records (several of them decrypted in
    one read: the relay must not wait on the socket for bytes GnuTLS holds)."""
    for data in si.malformed_lengths()[:3]:
        status, _, _ = si.parse_one(tls_raw(tls, data, pieces=1))
        assert status == 400
    status, _, _ = si.parse_one(tls_raw(tls, keyed(si.post(si.GOOD)), pieces=3))
    assert status == 200


def test_tls_keepalive_then_bad_in_order(tls):
    for i, bad in enumerate(si.bad_framings()):
        # a completion with a body before some, a bodiless probe before the
        # rest (a completion each takes minutes under the sanitizers)
        good = keyed(si.KEEP) if i % 4 == 0 else b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"
        got = si.responses(tls_raw(tls, good + bad))
        assert [st for st, _, _ in got] == [200, 400], (bad, got)
        assert got[1][1].get("connection") == "close"


def test_tls_chunked_bodies(tls):
    body = si.GOOD.encode()
    parts = [body[:10], body[10:]]
    ok = [hex(len(p))[2:].encode() + b"\r\n" + p + b"\r\n" for p in parts]
    status, _, _ = si.parse_one(tls_raw(tls, keyed(si.chunked(ok, b"0\r\n\r\n"))))
    assert status == 200
    for bad in ([b"zz\r\n" + body + b"\r\n"],
                [hex(len(body) - 5)[2:].encode() + b"\r\n" + body + b"\r\n"]):
        status, _, rbody = si.parse_one(tls_raw(tls, keyed(si.chunked(bad, b"0\r\n\r\n"))))
        assert status == 400 and "chunked" in json.loads(rbody)["error"]["message"]


def test_tls_head_too_large_is_431(tls):
    big = si.post(si.GOOD, extra=b"X-Pad: " + b"a" * (40 << 10) + b"\r\n")
    status, headers, _ = si.parse_one(tls_raw(tls, big))
    assert status == 431 and headers.get("connection") == "close"


def test_tls_untrusted_client_and_plaintext_get_no_http(tls, pki):
    evil = ssl.create_default_context(cafile=os.path.join(pki, "evil.pem"))
    with socket.create_connection(("127.0.0.1", tls.http_port), timeout=10 * T) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            evil.wrap_socket(raw, server_hostname="localhost")
    for junk in (b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        with socket.create_connection(("127.0.0.1", tls.http_port), timeout=10 * T) as s:
            s.sendall(junk)
            try:
                out = s.recv(4096)
            except ConnectionResetError:
                out = b""
            assert not out.startswith(b"HTTP/"), out
    still_serving(tls)


HELLO_CTX = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # (made once: loading CAs takes time)


def half_handshake(i, port):
    """A TLS client from 127.0.0.2 that stops mid-handshake: nothing at all,
    or half its ClientHello."""
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.settimeout(30 * T)
    s.connect(("127.0.0.1", port))
    if i % 2:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = HELLO_CTX.wrap_bio(inc, out, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = out.read()
        s.sendall(hello[:len(hello) // 2])
    return s


def closed(s):
    try:
        return s.recv(16) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def test_tls_caps_and_timeouts_hold_for_handshakes_and_heads(tls):
    n = 2 * PER_CLIENT + 8
    t_open = time.time()
    socks = [half_handshake(i, tls.http_port) for i in range(n)]
    # and two that finish the handshake, then send half a head / half a body
    slow = [tls_conn(tls, "127.0.0.3"), tls_conn(tls, "127.0.0.3")]
    slow[0].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    slow[1].sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                    + b"Content-Length: 60\r\n\r\n{\"prompt\": \"Hel")
    t0 = time.time()  # (the last connection is in)
    print(f"opened in {t0 - t_open:.2f} s")
    try:
        # others are served meanwhile
        assert livez(tls) == 200
        # the per-client cap: past PER_CLIENT from one address closed at once
        time.sleep(0.3)
        r, _, _ = select.select(socks, [], [], 0)
        capped = [s for s in r if closed(s)]
        assert len(capped) >= n - PER_CLIENT - 2, len(capped)
        held = [s for s in socks if s not in capped]
        if time.time() - t_open < TIMEOUT_S - 0.5:  # (a loaded machine may be past it)
            assert len(held) >= PER_CLIENT - 2, len(held)
        # the rest, and the two slow ones, closed once idle for the timeout
        end = t0 + TIMEOUT_S + 5 * T
        held += slow
        while held and time.time() < end:
            r, _, _ = select.select(held, [], [], 0.2)
            for s in r:
                assert closed(s), "the server sent something to a stalled client"
                held.remove(s)
        took = time.time() - t0
        assert not held, (len(held), took)
        still_serving(tls)
    finally:
        for s in socks + slow:
            s.close()


def test_tls_concurrent_streams(tls):
    """The openai client over HTTPS, whole and streamed, from several threads
    at once (one relay and one TLS session per connection)."""
    errs = []

    def one(stream):
        try:
            c = openai_client(tls)
            if stream:
                chunks = list(c.chat.completions.create(**si.CHAT, stream=True))
                assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
            else:
                r = c.chat.completions.create(**si.CHAT)
                assert r.choices[0].finish_reason in ("stop", "length")
        except Exception as e:  # noqa: BLE001 (reported below)
            errs.append(e)

    ts = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(2 if SLOW else 4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs, errs
