#!/usr/bin/env python3
"""A small client of ringllama-worker (the ZeroMQ protocol of docs/DESIGN.md "Wire protocol").

    from ringllama_client import Client
    with Client(["ipc:///run/ringllama/worker-0.sock"]) as c:
        for token in c.generate([128000, 791, 6864], max_tokens=16):
            print(token)
        for piece in c.generate("The capital of France is", max_tokens=16).text_pieces():
            print(piece, end="", flush=True)
        g = c.generate(messages=[{"role": "user", "content": "Hello!"}], max_tokens=64)
        print(g.result_text())
        print(c.stats())

A prompt is token ids (a list of ints, used as they are), text (a str: the worker tokenizes it with
the model's tokenizer) or messages (a chat the worker renders with the model's chat template; the
reply stops at the template's end of turn). Where the model has a tokenizer every token comes with
the text it completes (never half a UTF-8 character); without one, text and messages get
bad_request.

One DEALER socket per worker endpoint; each new request goes to the endpoint with the fewest
requests in flight. Many generations may be in flight at once on one Client (replies are kept
apart by id), all from one thread: a Client is not thread-safe, use one per thread.

Run as a script: python3 ringllama_client.py --endpoint ipc://... --prompt-ids 1,2,3 --max-tokens 8
                 python3 ringllama_client.py --endpoint ipc://... --prompt "Once upon a time"
                 python3 ringllama_client.py --endpoint ipc://... --chat "Hello!" [--system "Be brief."]
"""
import argparse
import collections
import itertools
import json
import os
import sys
import time

import zmq

START = time.monotonic()


class WorkerError(Exception):
    """An `error` reply: code is bad_request, overloaded, unavailable or internal."""

    def __init__(self, code, message, request_id=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = request_id


class Generation:
    """The tokens of one request as they arrive: iterate it for the ids, or text_pieces() for their
    text. After the last one, `done` holds the done reply (reason, usage, timing, and text where the
    model has a tokenizer). An error reply raises WorkerError."""

    def __init__(self, client, endpoint, request_id):
        self.client = client
        self.endpoint = endpoint
        self.id = request_id
        self.tokens = []          # every token received so far
        self.pieces = []          # their text pieces (None for a token that came without text)
        self.done = None          # the done reply
        self.error = None         # the WorkerError, when the request failed
        self.first_token_time = None
        self.last_token_time = None
        self.sent_time = time.monotonic()
        self._pending = collections.deque()

    @property
    def finished(self):
        return self.done is not None or self.error is not None

    def _on_reply(self, reply):
        now = time.monotonic()
        if reply["type"] == "token":
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
            self.tokens.append(reply["token"])
            self.pieces.append(reply.get("text"))
            self._pending.append((reply["token"], reply.get("text")))
        elif reply["type"] == "done":
            self.done = reply
        else:
            self.error = WorkerError(reply.get("code"), reply.get("message"), reply.get("id"))

    def __iter__(self):
        return self

    def __next__(self):
        return self._next_reply()[0]

    def _next_reply(self):
        deadline = time.monotonic() + self.client.timeout
        while not self._pending:
            if self.finished:
                if self.error is not None:
                    raise self.error
                raise StopIteration
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {self.id}: nothing from {self.endpoint} in {self.client.timeout} s")
            self.client.poll(left)
        return self._pending.popleft()

    def result(self):
        """All the tokens, once the request has ended."""
        for _ in self:
            pass
        return self.tokens

    def text_pieces(self):
        """Yields the text of the tokens as they arrive (pieces of a UTF-8 character held back
        until it is whole; special tokens give ""). ValueError where the worker sends no text."""
        while True:
            try:
                _, text = self._next_reply()
            except StopIteration:
                return
            if text is None:
                raise ValueError(f"request {self.id}: the worker sent no text (its model has no tokenizer)")
            yield text

    def result_text(self):
        """The whole text, once the request has ended."""
        for _ in self:
            pass
        if None in self.pieces:
            raise ValueError(f"request {self.id}: the worker sent no text (its model has no tokenizer)")
        return self.text

    @property
    def text(self):
        """The text so far: the done reply's once it has come."""
        if self.done is not None and "text" in self.done:
            return self.done["text"]
        return "".join(p for p in self.pieces if p is not None)

    def cancel(self):
        self.client.cancel(self)


class Client:
    def __init__(self, endpoints, timeout=60.0, context=None):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("at least one worker endpoint")
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._socks = {}
        self._poller = zmq.Poller()
        for e in endpoints:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 10)  # ms: a worker that restarts is found at once
            s.connect(e)
            self._socks[e] = s
            self._poller.register(s, zmq.POLLIN)
        self._by_sock = {s: e for e, s in self._socks.items()}
        self._live = {e: {} for e in endpoints}       # endpoint -> id -> Generation
        self._answers = {e: collections.deque() for e in endpoints}  # stats / health replies
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}-"

    @property
    def endpoints(self):
        return list(self._socks)

    def close(self):
        for s in self._socks.values():
            s.close(0)
        self._socks = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def in_flight(self, endpoint=None):
        if endpoint is not None:
            return len(self._live[endpoint])
        return sum(len(v) for v in self._live.values())

    def generate(self, prompt=None, max_tokens=16, *, messages=None, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop_ids=None, ignore_eos=False, request_id=None, endpoint=None):
        """Sends a generate request; returns its Generation (iterate it for the tokens). prompt: token
        ids, or a str of text; or messages: a chat, [{"role": "system"|"user"|"assistant", "content": str}]."""
        if (prompt is None) == (messages is None):
            raise ValueError("give a prompt (token ids or text) or messages, not both")
        if endpoint is None:
            endpoint = min(self._socks, key=lambda e: len(self._live[e]))
        rid = request_id or f"{self._prefix}{next(self._ids)}"
        msg = {"op": "generate", "id": rid, "max_tokens": int(max_tokens),
               "temperature": float(temperature), "top_k": int(top_k), "top_p": float(top_p), "seed": int(seed),
               "stop_ids": [int(t) for t in (stop_ids or [])], "ignore_eos": bool(ignore_eos)}
        if messages is not None:
            msg["messages"] = list(messages)  # as given: the worker checks them and says what is wrong
        elif isinstance(prompt, str):
            msg["prompt"] = prompt
        else:
            msg["prompt_ids"] = [int(t) for t in prompt]
        g = Generation(self, endpoint, rid)
        self._live[endpoint][rid] = g
        self._socks[endpoint].send(json.dumps(msg).encode())
        return g

    def cancel(self, generation):
        """Asks the worker to stop the request at its next step; its done reply says cancelled."""
        self._socks[generation.endpoint].send(json.dumps({"op": "cancel", "id": generation.id}).encode())

    def _ask(self, op, endpoint):
        self._socks[endpoint].send(json.dumps({"op": op}).encode())
        deadline = time.monotonic() + self.timeout
        while not self._answers[endpoint]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{op}: no answer from {endpoint} in {self.timeout} s")
            self.poll(left)
        return self._answers[endpoint].popleft()

    def stats(self, endpoint=None):
        """The worker's stats (a dict); with several endpoints and none named, a dict per endpoint."""
        if endpoint is None and len(self._socks) > 1:
            return {e: self._ask("stats", e)["stats"] for e in self._socks}
        return self._ask("stats", endpoint or self.endpoints[0])["stats"]

    def health(self, endpoint=None):
        """{"status": "ok" | "unavailable", "detail": {...}}; several endpoints: a dict per endpoint."""
        if endpoint is None and len(self._socks) > 1:
            return {e: self._ask("health", e) for e in self._socks}
        return self._ask("health", endpoint or self.endpoints[0])

    def poll(self, timeout):
        """Reads the replies that arrive within `timeout` seconds (returns after the first batch) and
        hands them to their requests. Returns the Generations that ended."""
        ended = []
        for sock, _ in self._poller.poll(max(0, int(timeout * 1000))):
            endpoint = self._by_sock[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                reply = json.loads(frame)
                kind = reply.get("type")
                if kind in ("stats", "health"):
                    self._answers[endpoint].append(reply)
                    continue
                g = self._live[endpoint].get(reply.get("id"))
                if g is None:
                    continue
                g._on_reply(reply)
                if g.finished:
                    del self._live[endpoint][g.id]
                    ended.append(g)
        return ended


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", action="append", required=True, help="a worker's listen endpoint (repeatable)")
    ap.add_argument("--prompt-ids", help="comma-separated token ids (prints the ids)")
    ap.add_argument("--prompt", help="prompt text (prints the text as it comes)")
    ap.add_argument("--chat", help="a user message through the model's chat template (prints the reply)")
    ap.add_argument("--system", help="with --chat: a system message before it")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--stats", action="store_true", help="print the stats and exit")
    ap.add_argument("--health", action="store_true", help="print the health and exit")
    ap.add_argument("--timing", action="store_true",
                    help="print on stderr when the first token came, counted from this script's start: started "
                         "while a worker restarts, the request waits in the socket until the worker listens, so "
                         "this is the restart-to-first-token time")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each reply")
    a = ap.parse_args()
    with Client(a.endpoint, timeout=a.timeout) as c:
        if a.stats or a.health:
            print(json.dumps(c.stats() if a.stats else c.health(), indent=2))
            return 0
        forms = [x for x in (a.prompt_ids, a.prompt, a.chat) if x is not None]
        if len(forms) != 1:
            ap.error("give one of --prompt-ids, --prompt or --chat")
        if a.system is not None and a.chat is None:
            ap.error("--system goes with --chat")
        opts = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, ignore_eos=a.ignore_eos)
        if a.prompt_ids is not None:
            g = c.generate([int(x) for x in a.prompt_ids.split(",")], a.max_tokens, **opts)
        elif a.prompt is not None:
            g = c.generate(a.prompt, a.max_tokens, **opts)
        else:
            messages = ([{"role": "system", "content": a.system}] if a.system is not None else []) + \
                [{"role": "user", "content": a.chat}]
            g = c.generate(None, a.max_tokens, messages=messages, **opts)
        try:
            if a.prompt_ids is not None:
                for tok in g:
                    print(tok, end=" ", flush=True)
            else:
                for piece in g.text_pieces():
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except (WorkerError, ValueError) as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        print()
        print(json.dumps(g.done), file=sys.stderr)
        if a.timing:
            # Wall-clock too, to subtract the time a restart began (date +%s.%N before the SIGTERM).
            wall = time.time() - (time.monotonic() - g.first_token_time)
            print(f"first token at {wall:.3f} (unix time), {(g.first_token_time - START) * 1e3:.1f} ms after start; "
                  f"last {(g.last_token_time - START) * 1e3:.1f} ms after start", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
