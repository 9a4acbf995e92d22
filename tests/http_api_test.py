#!/usr/bin/env python3
"""The worker's OpenAI-compatible HTTP API against real workers on the CPU backend, with the official
`openai` client: a random tiny store given a test tokenizer (tests/make_test_tokenizer.py), one
worker serving it over ZeroMQ and HTTP, a second one with an API key and a queue of one.

Checked: completions and chat, streamed and not; the greedy tokens equal the ZeroMQ path's;
stop strings (never in the output, held back while streaming); seed repeatability; log-probs equal
a numpy log-softmax of ringllama-generate's logits rows; every error status (400 malformed JSON,
wrong types, n=2; 401; 404 model and path; 405; 413 for a 10 MB body; 429 with the queue full; 503
while draining); a client gone mid-stream frees its sequence; 64 concurrent streams, none lost; a
SIGTERM drain finishes the streams in flight and exits 0.

    http_api_test.py BIN_DIR SOURCE_DIR
Exits 77 (skipped) when the openai package is missing.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

try:
    import numpy as np
    import openai
except ImportError as e:
    print(f"skipped: {e} (scripts/install-deps.sh installs it)")
    sys.exit(77)

bin_dir, src = sys.argv[1:3]
sys.path.insert(0, os.path.join(src, "scripts"))
from ringllama_client import Client  # noqa: E402

sys.path.insert(0, os.path.join(src, "tests"))
from http_worker import HttpWorker  # noqa: E402

KEY = "sk-test-0123456789"
PROMPT = "Hello! How are you today?"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is the station?"}]


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, timeout=300, **kw)
    assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r


class Worker(HttpWorker):
    """A worker on `store` (CPU backend) with its HTTP API; raw requests and openai clients to it."""

    def __init__(self, work, name, store, extra=(), env=None):
        super().__init__(bin_dir, work, name, ["--backend", "cpu", "--store", store, *extra], env)

    def client(self, key="unused"):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """(status, parsed JSON or text, headers) of one raw request."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        c.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        data = r.read().decode()
        c.close()
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return r.status, data, dict(r.getheaders())

    def stop(self):
        super().stop(drain=False)


def expect_status(got, status, param=None, code=None, where=""):
    st, body, _ = got
    assert st == status, (where, st, body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], (where, body)
    if param is not None:
        assert err["param"] == param, (where, body)
    if code is not None:
        assert err["code"] == code, (where, body)


def stream_text(stream):
    """The streamed text, finish_reason, chunks."""
    chunks = list(stream)
    text, finish = "", None
    for c in chunks:
        for ch in c.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            text += piece or ""
            finish = ch.finish_reason or finish
    return text, finish, chunks


def main(work):
    store = os.path.join(work, "store")
    run([os.path.join(bin_dir, "ringllama-pack"), "--random", "tiny", "--layers", "24", "--out", store, "--quiet"])
    run([sys.executable, os.path.join(src, "tests", "make_test_tokenizer.py"), store, "512",
         os.path.join(src, "tests", "data", "chat_templates", "llama32.json")])
    w = Worker(work, "main", store, ["--batch-size", "16"])
    try:
        check_main(work, store, w)
    finally:
        w.stop()
    k = Worker(work, "keyed", store, ["--batch-size", "1", "--queue-max", "1"], env={"RINGLLAMA_API_KEY": KEY})
    try:
        check_keyed(k)
    finally:
        k.stop()


def check_main(work, store, w):
    c = w.client()
    assert w.model == "store", w.model
    models = c.models.list()
    assert [m.id for m in models.data] == ["store"] and models.data[0].owned_by == "ringllama", models

    # Completions, not streamed: greedy text equals the ZeroMQ path's for the same prompt.
    r = c.completions.create(model=w.model, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-") and r.object == "text_completion", r
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 24, r
    with Client([w.zmq], timeout=60) as z:
        g = z.generate(PROMPT, 24, ignore_eos=True)
        z_tokens = g.result()
        assert ch.text == g.done["text"], (ch.text, g.done)
        assert r.usage.prompt_tokens == g.done["usage"]["prompt_tokens"], (r.usage, g.done)
    greedy = ch.text
    # The same as ids: the tokens of the ZeroMQ path, one by one (logprobs name them).
    ids = run([sys.executable, "-c", "import sys; from tokenizers import Tokenizer; "
               "print(','.join(map(str, Tokenizer.from_file(sys.argv[1]).encode(sys.argv[2]).ids)))",
               os.path.join(store, "tokenizer.json"), PROMPT]).stdout.decode().strip()
    prompt_ids = [int(x) for x in ids.split(",")]
    r = c.completions.create(model=w.model, prompt=prompt_ids, max_tokens=24, temperature=0, logprobs=5,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy and r.usage.prompt_tokens == len(prompt_ids), r

    # Log-probs: each token's equals a numpy log-softmax of ringllama-generate's logits row.
    lp = r.choices[0].logprobs
    rows_file, toks_file = os.path.join(work, "rows.f32"), os.path.join(work, "tokens.txt")
    run([os.path.join(bin_dir, "ringllama-generate"), "--store", store, "--backend", "cpu", "--prompt-ids", ids,
         "--max-tokens", "24", "--ignore-eos", "--logits-out", rows_file, "--tokens-out", toks_file])
    ref_tokens = [int(x) for x in open(toks_file).read().split()]
    assert ref_tokens == z_tokens, (ref_tokens, z_tokens)
    rows = np.fromfile(rows_file, dtype="<f4").reshape(len(ref_tokens), -1).astype(np.float64)
    logsm = rows - rows.max(axis=1, keepdims=True)
    logsm -= np.log(np.exp(logsm).sum(axis=1, keepdims=True))
    assert len(lp.token_logprobs) == 24
    for i, t in enumerate(ref_tokens):
        assert abs(lp.token_logprobs[i] - logsm[i, t]) < 1e-4, (i, lp.token_logprobs[i], logsm[i, t])
        # Keyed by token text: byte tokens that are no whole character share one key.
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        want = np.sort(logsm[i])[::-1][:5]
        assert 1 <= len(top) <= 5 and all(np.abs(want - v).min() < 1e-4 for v in top), (i, top, want)
        assert abs(top[0] - want[0]) < 1e-4, (i, top, want)
    # Chat log-probs: the sampled token and top_logprobs entries.
    r = c.chat.completions.create(model=w.model, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(x.top_logprobs) == 3 for x in content), r
    assert all(x.logprob <= 0 and x.top_logprobs[0].logprob >= x.logprob - 1e-9 for x in content), content

    # Streamed completions: the same text, then usage with include_usage.
    text, finish, chunks = stream_text(c.completions.create(model=w.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                                            stream=True, stream_options={"include_usage": True},
                                                            extra_body={"ignore_eos": True}))
    assert text == greedy and finish == "length", (text, greedy, finish)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24, chunks[-1]

    # Chat, not streamed and streamed: role first, the same content.
    r = c.chat.completions.create(model=w.model, messages=MESSAGES, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-"), r
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.choices[0].finish_reason == "length", r
    with Client([w.zmq], timeout=60) as z:
        assert msg.content == z.generate(messages=MESSAGES, max_tokens=16, ignore_eos=True).result_text()
    text, finish, chunks = stream_text(c.chat.completions.create(model=w.model, messages=MESSAGES, max_tokens=16,
                                                                 temperature=0, stream=True,
                                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and text == msg.content and finish == "length", (text, chunks)
    # A list of text parts is the same message.
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Where is "},
                                                       {"type": "text", "text": "the station?"}]}]
    r = c.chat.completions.create(model=w.model, messages=parts, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == msg.content

    # Stop strings: the text up to the first match, finish_reason stop, the stop string not in it.
    stop = next(greedy[i:i + 3] for i in range(3, len(greedy) - 3) if greedy[i:i + 3].strip())
    cut = greedy[:greedy.find(stop)]
    r = c.completions.create(model=w.model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "\u2603never"],
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text, (
        r, stop, cut)
    text, finish, _ = stream_text(c.completions.create(model=w.model, prompt=PROMPT, max_tokens=24, temperature=0,
                                                       stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert text == cut and finish == "stop", (text, cut, finish)

    # Seeds: the same seed the same text, another seed another text.
    def sampled(seed):
        return c.completions.create(model=w.model, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text
    a, b = sampled(7), sampled(7)
    assert a == b, (a, b)
    assert any(sampled(s) != a for s in (8, 9, 10)), a

    # Errors, each with OpenAI's error object.
    expect_status(w.request("POST", "/v1/completions", "{not json"), 400, where="malformed JSON")
    expect_status(w.request("POST", "/v1/completions", {"model": w.model, "prompt": PROMPT, "max_tokens": "5"}), 400,
                  "max_tokens", where="a wrong type")
    expect_status(w.request("POST", "/v1/chat/completions", {"model": w.model, "messages": "hi"}), 400, "messages")
    expect_status(w.request("POST", "/v1/completions", {"model": w.model, "prompt": PROMPT, "n": 2}), 400, "n")
    expect_status(w.request("POST", "/v1/completions", {"model": w.model, "prompt": ["a", "b"]}), 400, "prompt")
    expect_status(w.request("POST", "/v1/completions", {"model": w.model, "prompt": PROMPT, "max_tokens": 5000}), 400)
    try:
        c.completions.create(model=w.model, prompt=PROMPT, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert "only n = 1" in str(e), e
    try:
        c.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    # user and unknown fields are ignored.
    st, body, _ = w.request("POST", "/v1/completions", {"model": w.model, "prompt": PROMPT, "max_tokens": 3, "user": "u",
                                                        "frobnicate": {"x": [1]}})
    assert st == 200 and body["usage"]["completion_tokens"] <= 3, (st, body)
    expect_status(w.request("GET", "/v1/nowhere"), 404, where="an unknown path")
    expect_status(w.request("GET", "/v1/models/gpt-4"), 404, code="model_not_found")
    assert w.request("GET", f"/v1/models/{w.model}")[1]["id"] == w.model
    st, _, hdr = w.request("GET", "/v1/completions")
    assert st == 405 and hdr.get("Allow") == "POST", (st, hdr)
    # 10 MB: refused from its Content-Length, before the body is read (the client is still sending).
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10485760\r\n\r\n")
        def send_body():
            try:
                s.sendall(b"x" * (10 << 20))
            except OSError:  # the worker answered and closed, or the test closed the socket
                pass
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        got, deadline = "", time.monotonic() + 10
        while "max_request_bytes" not in got and time.monotonic() < deadline:
            more = s.recv(65536)
            if not more:
                break
            got += more.decode(errors="replace")
        assert got.startswith("HTTP/1.1 413") and "max_request_bytes" in got, got
    health = w.request("GET", "/health")
    assert health[0] == 200 and health[1] == {"status": "ok"}, health
    metrics = w.request("GET", "/metrics")
    assert metrics[0] == 200 and metrics[2]["Content-Type"].startswith("text/plain; version=0.0.4"), metrics

    # A client gone mid-stream: its sequence is dropped at once, not run to its 1500 tokens.
    with Client([w.zmq], timeout=30) as z:
        before = z.stats()
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        body = json.dumps({"model": w.model, "prompt": PROMPT, "max_tokens": 1500, "stream": True, "ignore_eos": True})
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
    with Client([w.zmq], timeout=30) as z:
        deadline = time.monotonic() + 10
        while True:
            st = z.stats()
            if st["requests"]["abandoned"] > before["requests"]["abandoned"] and st["requests"]["running"] == 0:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        generated = st["tokens"]["generated"] - before["tokens"]["generated"]
        assert st["kv_blocks"]["free"] == st["kv_blocks"]["total"] and generated < 1000, (generated, st)
        assert st["server"]["in_flight"] == 0, st

    # 64 concurrent streams, each with its own client: none lost, each the greedy text.
    results, errors = {}, []

    def one(i):
        try:
            cl = w.client()
            text, finish, _ = stream_text(cl.completions.create(model=w.model, prompt=PROMPT, max_tokens=24,
                                                                temperature=0, stream=True,
                                                                extra_body={"ignore_eos": True}))
            results[i] = (text, finish)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 64, (errors[:3], len(results))
    assert all(v == (greedy, "length") for v in results.values()), [v for v in results.values() if v != (greedy, "length")][:2]
    print(f"64 concurrent streams in {time.monotonic() - t0:.2f} s")


def check_keyed(k):
    # Without the key, or with a wrong one: 401; /health needs none.
    expect_status(k.request("GET", "/v1/models"), 401, code="invalid_api_key")
    expect_status(k.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
    expect_status(k.request("POST", "/v1/completions", {"prompt": "x"}, headers={"Authorization": KEY}), 401)
    try:
        k.client("wrong").models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    assert k.request("GET", "/health")[0] == 200
    c = k.client(KEY)
    assert c.models.list().data[0].id == k.model

    # batch_size 1 + queue_max 1: two long streams fill it, a third gets 429.
    streams, firsts = [], []
    for _ in range(2):
        s = c.completions.create(model=k.model, prompt=PROMPT, max_tokens=600, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
        streams.append(s)
    it = [iter(s) for s in streams]
    firsts = [next(it[0])]  # the first is running (the second waits for it)
    try:
        c.completions.create(model=k.model, prompt=PROMPT, max_tokens=2)
        raise AssertionError("a request past batch_size + queue_max was accepted")
    except openai.RateLimitError as e:
        assert e.status_code == 429 and "queue_max" in str(e), e

    # SIGTERM: /health and new requests 503, the streams in flight run to their end, exit 0.
    k.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while k.request("GET", "/health")[0] != 503:
        assert time.monotonic() < deadline, k.text()
        time.sleep(0.02)
    assert k.request("GET", "/health")[1] == {"status": "draining"}
    expect_status(k.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                            headers={"Authorization": f"Bearer {KEY}"}), 503)
    done = []
    for i, s in enumerate(it):
        chunks = firsts + list(s) if i == 0 else list(s)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        done.append(finish)
    assert done == [["length"], ["length"]], done
    assert k.proc.wait(30) == 0, k.text()
    assert "stopped:" in k.text(), k.text()


if __name__ == "__main__":
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rl-http-") as work:
        main(work)
    print(f"ok ({time.monotonic() - t0:.1f} s)")
