"""The HTTP edge against hostile and careless clients (the audit's cases), on a real `gptx serve` process: header
floods, idle and half-sent connections, a connection cap under a small `ulimit -n`, an empty API key, bodies without
a Content-Type, NaN parameters, unknown fields, and prompts far over the context. Raw sockets where a client library
would not misbehave on purpose. Every wait is bounded; every process is stopped by its fixture."""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
from server_process import ServerProcess
from typer.testing import CliRunner

TIMEOUT = 60
DEADLINE = 1.5          # the edge server's header, body and keep-alive timeouts (seconds)
SLACK = 2.0             # how much later than its deadline a connection may be closed on a busy machine
CAP = 12                # the edge server's --max-connections
MB = 1 << 20


@pytest.fixture(scope="module")
def edge(shakespeare_dir, tmp_path_factory):
    proc = ServerProcess([shakespeare_dir, "--model-name", "bard", "--header-timeout", DEADLINE, "--body-timeout",
                          DEADLINE, "--keep-alive-timeout", DEADLINE, "--max-connections", CAP,
                          "--max-body-bytes", 2 * MB], tmp_path_factory.mktemp("edge") / "serve.log")
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output(), proc.output()


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)


def seconds_until_closed(sock: socket.socket, limit: float = TIMEOUT) -> tuple[float, bytes]:
    """Read until the server closes the connection; (seconds it took, what arrived)."""
    started, received = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - started, received


# ---------------------------------------------------------------------------------------------- timeouts
@pytest.mark.parametrize("sent", [
    b"",                                                                          # connects, sends nothing
    b"GET /health HTTP/1.1\r\nHost: x\r\n",                                       # half its headers
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",  # half its body
], ids=["idle", "half-headers", "half-body"])
def test_a_connection_that_stalls_is_closed_at_its_timeout(edge, sent):
    with connect(edge) as sock:
        sock.sendall(sent)
        took, received = seconds_until_closed(sock)
    assert DEADLINE - 0.2 < took < DEADLINE + SLACK, took
    assert b"200 OK" not in received


def test_a_client_that_trickles_its_headers_is_closed_at_the_header_deadline(edge):
    """Slowloris: a byte every 0.2 s keeps the connection busy, but the deadline runs from the first byte."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    closed_after = None
    with connect(edge) as sock:
        started = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            time.sleep(0.2)
            if time.monotonic() - started > DEADLINE + SLACK + 5:
                break
        if closed_after is None:
            closed_after = time.monotonic() - started + seconds_until_closed(sock, 5)[0]
    assert closed_after < DEADLINE + SLACK + 0.5, closed_after


def test_an_idle_kept_alive_connection_is_closed_at_the_keep_alive_timeout(edge):
    with connect(edge) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        took, received = seconds_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 200") and DEADLINE - 0.2 < took < DEADLINE + SLACK, (took, received[:40])


# ---------------------------------------------------------------------------------------------- headers
def test_a_header_flood_is_refused_early_and_memory_stays_bounded(edge):
    """200 MB of headers on each of 8 connections at once: each is answered 431 after the first 64 KiB and
    closed; the server's RSS (sampled throughout) grows by less than 32 MB."""
    baseline = edge.rss_bytes()
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], edge.rss_bytes())
            time.sleep(0.005)

    answers = []

    def flood():
        with connect(edge) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            chunk, sent = b"a" * MB, 0
            try:
                while sent < 200 * MB:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                answers.append(sock.recv(200))
            except (ConnectionResetError, socket.timeout):
                answers.append(b"")

    sampler = threading.Thread(target=sample)
    sampler.start()
    floods = [threading.Thread(target=flood) for _ in range(8)]
    for t in floods:
        t.start()
    for t in floods:
        t.join(TIMEOUT)
    done.set()
    sampler.join()
    assert peak[0] - baseline < 32 * MB, (peak[0] - baseline) / MB
    assert any(a.startswith(b"HTTP/1.1 431") for a in answers), answers  # others may see the reset first
    assert httpx.get(f"{edge.url}/health", timeout=TIMEOUT).status_code == 200


def test_too_many_headers_get_431_before_authentication(edge):
    headers = {f"x-h{i}": "1" for i in range(150)}
    r = httpx.get(f"{edge.url}/v1/models", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large"
    assert "over this server's limit of 100" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- connections
def test_past_the_connection_cap_new_connections_get_503_and_open_ones_keep_working(edge):
    with httpx.Client(base_url=edge.url, timeout=TIMEOUT) as kept:
        assert kept.get("/health").status_code == 200  # a kept-alive connection, opened before the flood
        idle = [connect(edge) for _ in range(CAP + 4)]
        try:
            answers = []
            for sock in idle[CAP - 1:]:
                sock.settimeout(5)
                try:
                    answers.append(sock.recv(200))
                except (ConnectionResetError, socket.timeout):
                    answers.append(b"reset")
            assert all(a.startswith(b"HTTP/1.1 503") or a == b"reset" for a in answers), answers
            assert any(a.startswith(b"HTTP/1.1 503") for a in answers), answers
            assert kept.get("/health").status_code == 200  # the open connection is still served
        finally:
            for sock in idle:
                sock.close()
    assert httpx.get(f"{edge.url}/health", timeout=TIMEOUT).status_code == 200


@pytest.mark.slow
def test_idle_connections_past_ulimit_do_not_take_the_server_down(shakespeare_dir, tmp_path):
    """The audit's case: `ulimit -n 256` and 300 idle connections. The cap (128) keeps the server's descriptors in
    bounds; once the idle ones pass the header timeout, new requests are served again."""
    proc = ServerProcess([shakespeare_dir, "--max-connections", 128, "--header-timeout", 2], tmp_path / "serve.log",
                         open_files=256)
    try:
        idle = [connect(proc) for _ in range(300)]
        try:
            time.sleep(0.5)
            deadline = time.monotonic() + 2 + SLACK + 5
            while True:  # 503 (or refused) while the idle ones hold the cap, then served
                try:
                    if httpx.get(f"{proc.url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the server did not serve again after the idle connections"
                time.sleep(0.2)
        finally:
            for sock in idle:
                sock.close()
        assert proc.proc.poll() is None
    finally:
        assert proc.stop() == 0, proc.output()
    assert "Too many open files" not in proc.output()


# ---------------------------------------------------------------------------------------------- bodies
def test_bodies_without_or_with_the_wrong_content_type(edge):
    url = f"{edge.url}/v1/completions"
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0}).encode()
    bare = httpx.post(url, content=body, headers={"Content-Type": ""}, timeout=TIMEOUT)  # no Content-Type at all
    assert bare.status_code == 200 and bare.json()["usage"]["completion_tokens"] == 3
    form = httpx.post(url, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"},  # curl -d
                      timeout=TIMEOUT)
    assert form.status_code == 415 and "Content-Type: application/json" in form.json()["error"]["message"]


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", "NaN", "temperature: Input should be a finite number"),
    ("temperature", "Infinity", "temperature: Input should be a finite number"),
    ("top_p", "NaN", "top_p: Input should be a finite number"),
    ("temperature", "2.5", "temperature: Input should be less than or equal to 2"),
    ("max_tokens", '"5"', "max_tokens: Input should be a valid integer"),
])
def test_each_400_names_its_rule(edge, field, value, needle):
    raw = '{"prompt": "x", "%s": %s}' % (field, value)
    r = httpx.post(f"{edge.url}/v1/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["message"] == needle and r.json()["error"]["param"] == field


def test_unknown_fields_are_ignored_and_named_unless_they_would_change_the_output(edge):
    url = f"{edge.url}/v1/completions"
    ignored = httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "metadata": {"a": 1},
                                    "store": False}, timeout=TIMEOUT)
    assert ignored.status_code == 200 and ignored.headers["x-gptx-ignored-fields"] == "metadata, store"
    plain = httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 3, "temperature": 0}, timeout=TIMEOUT)
    assert "x-gptx-ignored-fields" not in plain.headers
    assert ignored.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    both = httpx.post(url, json={"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}, timeout=TIMEOUT)
    assert both.status_code == 400 and both.json()["error"]["param"] == "max_tokens"
    assert "disagree" in both.json()["error"]["message"]
    for field, value in [("response_format", {"type": "json_object"}), ("tools", []), ("min_p", 0.1)]:
        refused = httpx.post(url, json={"prompt": "x", field: value}, timeout=TIMEOUT)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field, refused.text
    assert "ignored unknown fields: metadata, store" in edge.output()


# ---------------------------------------------------------------------------------------------- big prompts
def test_a_prompt_far_over_the_context_is_refused_before_tokenizing(edge):
    """A 1 MB prompt cannot fit 128 tokens whatever it says: refused from its length (no GPT-2 token holds more
    than 128 bytes), with the same code as the exact check."""
    for text in ("x" * MB, "é" * (MB // 2)):
        r = httpx.post(f"{edge.url}/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=TIMEOUT)
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded" and "at least" in error["message"]
    chat = httpx.post(f"{edge.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * MB}]},
                      timeout=TIMEOUT)
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded"
    # just under the cheap bound: tokenized, then refused by the exact count
    near = httpx.post(f"{edge.url}/v1/completions", json={"prompt": "ab " * 2000, "max_tokens": 1}, timeout=TIMEOUT)
    assert near.status_code == 400 and "at least" not in near.json()["error"]["message"]


def test_the_length_bound_never_refuses_what_fits():
    """The bound's premise, on the worst case: text made of GPT-2's longest tokens still takes at least
    ceil(bytes / longest) tokens."""
    from gptx.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    tokens = tokenizer.ranks()
    longest = max(map(len, tokens))
    assert longest == 128
    for token in sorted(tokens, key=len, reverse=True)[:20]:
        text = (token * 40).decode("utf-8", "replace")
        assert len(tokenizer.encode(text)) >= math.ceil(len(text.encode()) / longest)


# ---------------------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("args,env", [(["--api-key", ""], {}), (["--api-key", "  "], {}), ([], {"GPTX_API_KEY": ""})],
                         ids=["flag", "blank", "env"])
def test_an_empty_api_key_is_refused_at_start(shakespeare_dir, args, env):
    from gptx.cli import app

    result = CliRunner().invoke(app, ["serve", str(shakespeare_dir), *args], env=env)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "API key" in lines[0], \
        result.output
