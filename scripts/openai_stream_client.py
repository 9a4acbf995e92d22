#!/usr/bin/env python3
"""Streaming /v1/completions requests to any OpenAI-compatible server (ringllama-worker's
http_listen, llama-server, vLLM), with the interface bench_client.py drives ringllama_client.Client
through: generate() starts a request, poll() hands back the ones that ended, cancel(), stats().

Each request runs on a thread of its own over a kept-alive http.client connection: the thread
blocks in the socket read and stamps a chunk the moment its line arrives, so the time to the
first token is the server's, not a queue's. A chunk costs the client about 70 us of CPU (read,
JSON, bookkeeping): against a fake server pacing every one of 64 streams at 5 ms per token, it
measured 5.25 ms per token at the median with under half a core busy (bench_client.py records
its own CPU time per level as client_cpu_s: near wall_s, the client is the bottleneck).

Output tokens: usage.completion_tokens of the last chunk (stream_options.include_usage) where the
server sends it, else one per chunk that carries text (one token each on the servers above).
With a ringllama server, stats() reads the link figures (H2D bytes and seconds, steps) from its
/metrics; other servers give none.
"""
import http.client
import json
import queue
import socket
import threading
import time
import urllib.parse


class RequestError(Exception):
    """A request that failed: code is the server's error type (or http_<status>, connection)."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Stream:
    """One request: times (time.monotonic) and the tokens as they arrive."""

    def __init__(self, n):
        self.n = n
        self.sent_time = time.monotonic()
        self.first_token_time = None
        self.last_token_time = None
        self.tokens = []          # one entry per output token (the chunk's text, or None)
        self.text = ""
        self.usage = None
        self.finish_reason = None
        self.error = None
        self.cancelled = False
        self.conn = None


def _error_code(status, body):
    """OpenAI's error object's type or code where the body has one; HTTP status words otherwise."""
    try:
        err = json.loads(body)["error"]
        code = err.get("code") or err.get("type")
        if code:
            return str(code), str(err.get("message", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    words = {400: "bad_request", 401: "unauthorized", 404: "not_found", 429: "overloaded", 503: "unavailable"}
    text = body[:200].decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    return words.get(status, f"http_{status}"), text


class OpenAIClient:
    def __init__(self, base_url, api_key=None, model=None, timeout=600.0, extensions=True):
        u = urllib.parse.urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"--openai {base_url}: give the API's base URL, e.g. http://127.0.0.1:8080/v1")
        self.base_url = base_url.rstrip("/")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path  # "/v1"
        self.timeout = timeout
        self.extensions = extensions
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.endpoints = [self.base_url]
        self._pool = []                  # idle kept-alive connections
        self._pool_lock = threading.Lock()
        self._ended = queue.Queue()
        self._seq = 0
        self.model = model or self._first_model()
        self.ringllama = self._metrics_text() is not None

    # ---- plain requests ----

    def _connection(self):
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _release(self, conn):
        with self._pool_lock:
            self._pool.append(conn)

    def _get(self, path):
        conn = self._connection()
        try:
            conn.request("GET", path, headers={k: v for k, v in self.headers.items() if k != "Content-Type"})
            r = conn.getresponse()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise RequestError("connection", f"GET {path}: {e}") from e
        self._release(conn)
        return r.status, body

    def _first_model(self):
        status, body = self._get(self.prefix + "/models")
        if status != 200:
            code, msg = _error_code(status, body)
            raise SystemExit(f"GET {self.base_url}/models: {status} {code} {msg}")
        data = json.loads(body).get("data") or []
        if not data:
            raise SystemExit(f"GET {self.base_url}/models: no model listed; give --model")
        return data[0]["id"]

    def _metrics_text(self):
        """/metrics at the server's root when it is a ringllama worker's, else None."""
        try:
            status, body = self._get("/metrics")
        except RequestError:
            return None
        text = body.decode("utf-8", "replace")
        return text if status == 200 and "ringllama_build_info" in text else None

    def health(self):
        status, _ = self._get("/health")
        return {"status": "ok" if status == 200 else f"http_{status}", "detail": {"model": self.model}}

    def stats(self):
        """steps and, where the server streams layers, stream bytes and copy seconds (ringllama
        only; empty for other servers)."""
        text = self._metrics_text() if self.ringllama else None
        if text is None:
            return {}
        v = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                v[name] = float(value)
        s = {"steps": int(v.get("ringllama_steps_total", 0))}
        if v.get("ringllama_h2d_bytes_total", 0) > 0:
            s["stream"] = {"bytes": v["ringllama_h2d_bytes_total"],
                           "copy_seconds": v.get("ringllama_h2d_seconds_total", 0.0)}
        return s

    # ---- streaming completions ----

    def generate(self, prompt, max_tokens, temperature=0.0, seed=None, ignore_eos=True):
        """Starts one streaming request (prompt: a list of token ids or a text); returns its Stream."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed
        if ignore_eos and self.extensions:
            # vLLM's and llama.cpp's extension (ringllama accepts it too); min_tokens is vLLM's way
            # to the same end.
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        s = Stream(self._seq)
        self._seq += 1
        threading.Thread(target=self._run, args=(s, json.dumps(body).encode()), daemon=True).start()
        return s

    def _run(self, s, body):
        conn = self._connection()
        s.conn = conn
        reusable = False
        try:
            s.sent_time = time.monotonic()
            conn.request("POST", self.prefix + "/completions", body=body, headers=self.headers)
            r = conn.getresponse()
            if r.status != 200:
                s.error = RequestError(*_error_code(r.status, r.read()))
                reusable = not r.will_close
            else:
                reusable = self._read_events(s, r)
        except (OSError, http.client.HTTPException, ValueError) as e:
            if not s.cancelled:
                s.error = RequestError("connection", str(e))
        finally:
            s.conn = None
            if reusable and not s.cancelled:
                self._release(conn)
            else:
                conn.close()
            self._ended.put(s)

    def _read_events(self, s, r):
        """Reads the server-sent events to [DONE]; True when the connection can be used again."""
        while True:
            line = r.readline()
            if not line:
                if s.error is None and not s.cancelled:
                    s.error = RequestError("connection", "the stream ended before [DONE]")
                return False
            now = time.monotonic()
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                r.read()  # the chunked body's end, so the connection can be kept
                break
            chunk = json.loads(data)
            if "error" in chunk:
                err = chunk["error"]
                s.error = RequestError(str(err.get("code") or err.get("type") or "error"), str(err.get("message", "")))
                continue
            for choice in chunk.get("choices") or []:
                text = choice.get("text")
                if text is None:
                    text = (choice.get("delta") or {}).get("content")
                if text is not None:
                    if s.first_token_time is None:
                        s.first_token_time = now
                    s.last_token_time = now
                    s.tokens.append(text)
                    s.text += text
                if choice.get("finish_reason"):
                    s.finish_reason = choice["finish_reason"]
            if chunk.get("usage"):
                s.usage = chunk["usage"]
        if s.usage and s.usage.get("completion_tokens") is not None:
            n = int(s.usage["completion_tokens"])
            # A chunk may carry several tokens (text held back until a character is whole).
            s.tokens = (s.tokens + [None] * n)[:n]
        return True

    def poll(self, timeout):
        """The requests that ended since the last call, waiting at most `timeout` s for the first."""
        out = []
        try:
            out.append(self._ended.get(timeout=timeout))
            while True:
                out.append(self._ended.get_nowait())
        except queue.Empty:
            pass
        return out

    def cancel(self, s):
        """Closes the request's connection (the server frees its sequence)."""
        s.cancelled = True
        conn = s.conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        with self._pool_lock:
            for c in self._pool:
                c.close()
            self._pool.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
