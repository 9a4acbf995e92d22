#!/usr/bin/env python3
"""The worker's /metrics (worker/metrics.h) against a real CPU worker with http_listen, and
scripts/bench_client.py --openai against the same worker.

Every scrape must parse with prometheus_client's parser, histograms must be cumulative with
+Inf = _count, counters must never go down. The figures must move exactly as the requests run:
completion tokens by the tokens generated, requests by outcome and front door (finished, cancelled,
rejected_bad; zmq and http), prompt tokens, the TTFT histogram's count. After 64 concurrent
streaming HTTP clients every one has its tokens, and the KV blocks used and the running sequences
are back to 0. Then the bench's JSON report (4 clients, 8 requests) has its requests, tokens and
sane latencies, and its step count agrees with the worker's. Last, a worker fed by a loader daemon
whose window is half the model shows the window's pass, position and waits.

    metrics_test.py BIN_DIR SOURCE_DIR
Exits 77 (skipped) when prometheus_client is missing.
"""
import http.client
import json
import math
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
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    print(f"skipped: {e} (scripts/install-deps.sh installs it)")
    sys.exit(77)

bin_dir, src = sys.argv[1:3]
sys.path.insert(0, os.path.join(src, "scripts"))
from ringllama_client import Client, WorkerError  # noqa: E402

sys.path.insert(0, os.path.join(src, "tests"))
from http_worker import HttpWorker  # noqa: E402

N_STREAMS = 64


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r


class Worker(HttpWorker):
    def __init__(self, work, store, name="worker", weights=None):
        # batch_size 8 + queue_max 64: the 64 streams all fit in, most of them waiting at first.
        super().__init__(bin_dir, work, name, ["--backend", "cpu", *(weights or ["--store", store]), "--batch-size", "8",
                                               "--queue-max", "64", "--heartbeat-ms", "100"])


class Scraper:
    """Scrapes /metrics; checks what must hold in every scrape, and that counters never go down."""

    def __init__(self, port):
        self.port = port
        self.last_counters = {}

    def scrape(self):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("GET", "/metrics")
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        assert r.status == 200, (r.status, text)
        assert r.getheader("Content-Type", "").startswith("text/plain"), r.getheader("Content-Type")
        assert "version=0.0.4" in r.getheader("Content-Type"), r.getheader("Content-Type")
        families = list(text_string_to_metric_families(text))  # raises on anything malformed
        samples = {}
        for fam in families:
            assert fam.documentation, f"{fam.name}: no HELP"
            assert fam.name.startswith("ringllama_"), fam.name
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                assert key not in samples, f"sample {key} twice"
                samples[key] = s.value
            if fam.type == "counter":
                # The parser drops _total from a counter family's name; the samples keep it.
                assert all(s.name == fam.name + "_total" for s in fam.samples if not s.name.endswith("_created")), fam
            if fam.type == "histogram":
                self.check_histogram(fam)
        for key, v in samples.items():
            if key[0].endswith("_total"):
                assert v >= self.last_counters.get(key, 0), f"counter {key} went down: {self.last_counters[key]} -> {v}"
                self.last_counters[key] = v
        return samples

    @staticmethod
    def check_histogram(fam):
        series = {}
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            series.setdefault(tuple(sorted(labels.items())), []).append(s)
        for key, ss in series.items():
            buckets = [(float(s.labels["le"]), s.value) for s in ss if s.name.endswith("_bucket")]
            count = [s.value for s in ss if s.name.endswith("_count")]
            assert buckets and count, (fam.name, key)
            assert buckets[-1][0] == math.inf and buckets[-1][1] == count[0], (fam.name, buckets, count)
            for (b0, c0), (b1, c1) in zip(buckets, buckets[1:]):
                assert b1 > b0 and c1 >= c0, (fam.name, "buckets not cumulative", buckets)


def get(samples, metric, **labels):
    return samples[(metric, tuple(sorted(labels.items())))]


def delta(before, after, metric, **labels):
    return get(after, metric, **labels) - get(before, metric, **labels)


def stream_completion(port, model, prompt, max_tokens, out, i):
    """One streaming /v1/completions request over plain http.client: (chunks with text, usage)."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}, "temperature": 0}
        c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, (r.status, r.read())
        chunks, usage, done = 0, None, False
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            j = json.loads(data)
            chunks += sum(1 for ch in j.get("choices", []) if ch.get("text") is not None)
            usage = j.get("usage") or usage
        c.close()
        out[i] = (done, chunks, usage)
    except Exception as e:  # reported by the main thread
        out[i] = e


def check_zmq(w, scr):
    prompt, n, k = [1, 5, 9, 13, 17], 5, 12
    before = scr.scrape()
    assert get(before, "ringllama_build_info", model=w.model, backend="cpu", name=get_name(before),
               weights="store") == 1
    with Client([w.zmq], timeout=60) as c:
        gens = [c.generate(prompt, k, ignore_eos=True, seed=i) for i in range(n)]
        tokens = [len(g.result()) for g in gens]
        assert tokens == [k] * n, tokens
        after = scr.scrape()
        assert delta(before, after, "ringllama_completion_tokens_total") == n * k
        assert delta(before, after, "ringllama_prompt_tokens_total") == n * len(prompt)
        assert delta(before, after, "ringllama_requests_total", outcome="finished", api="zmq") == n
        assert delta(before, after, "ringllama_requests_total", outcome="finished", api="http") == 0
        assert delta(before, after, "ringllama_time_to_first_token_seconds_count") == n
        assert delta(before, after, "ringllama_request_duration_seconds_count") == n
        assert delta(before, after, "ringllama_time_per_output_token_seconds_count") == n
        steps = delta(before, after, "ringllama_steps_total")
        assert steps >= k, steps  # one token per sequence per step at most
        assert delta(before, after, "ringllama_step_duration_seconds_count") == steps
        assert delta(before, after, "ringllama_step_tokens_count") == steps
        # Every prompt token and every generated token but the last ran in some step.
        assert delta(before, after, "ringllama_step_tokens_sum") == n * (len(prompt) + k - 1)
        assert get(after, "ringllama_kv_blocks_used") == 0 and get(after, "ringllama_kv_blocks_capacity") > 0

        # A cancel and a refusal, each under its outcome.
        g = c.generate(prompt, 2000, ignore_eos=True)
        next(iter(g))
        c.cancel(g)
        try:
            g.result()
        except WorkerError:
            pass
        try:
            c.generate([1, 10 ** 6], 4).result()
            raise AssertionError("an id outside the vocabulary was accepted")
        except WorkerError as e:
            assert e.code == "bad_request", e
    end = scr.scrape()
    assert delta(after, end, "ringllama_requests_total", outcome="cancelled", api="zmq") == 1
    assert delta(after, end, "ringllama_requests_total", outcome="rejected_bad", api="zmq") == 1
    print(f"zmq: {n} requests x {k} tokens in {steps:.0f} steps; cancel and refusal counted")


def get_name(samples):
    return next(dict(k[1])["name"] for k in samples if k[0] == "ringllama_build_info")


def check_http_streams(w, scr):
    k = 16
    before = scr.scrape()
    out = [None] * N_STREAMS
    threads = [threading.Thread(target=stream_completion, args=(w.port, w.model, [1, 2 + i % 50, 3], k, out, i))
               for i in range(N_STREAMS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    # Mid-run scrapes: the gauges show the load (the counters' monotony is checked by every scrape).
    peak_running = peak_used = 0
    while any(t.is_alive() for t in threads):
        s = scr.scrape()
        peak_running = max(peak_running, get(s, "ringllama_running_sequences"))
        peak_used = max(peak_used, get(s, "ringllama_kv_blocks_used"))
        time.sleep(0.05)
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    errors = [o for o in out if not isinstance(o, tuple)]
    assert not errors, errors[:3]
    lost = [i for i, (done, chunks, usage) in enumerate(out) if not done or usage is None or
            usage["completion_tokens"] != k]
    assert not lost, [out[i] for i in lost[:3]]
    after = scr.scrape()
    assert delta(before, after, "ringllama_requests_total", outcome="finished", api="http") == N_STREAMS
    assert delta(before, after, "ringllama_requests_total", outcome="finished", api="zmq") == 0
    assert delta(before, after, "ringllama_completion_tokens_total") == N_STREAMS * k
    assert delta(before, after, "ringllama_prompt_tokens_total") == N_STREAMS * 3
    assert delta(before, after, "ringllama_time_to_first_token_seconds_count") == N_STREAMS
    for o in ("cancelled", "dropped", "failed"):
        assert delta(before, after, "ringllama_requests_total", outcome=o, api="http") == 0, o
    assert get(after, "ringllama_kv_blocks_used") == 0, after
    assert get(after, "ringllama_running_sequences") == 0 and get(after, "ringllama_waiting_requests") == 0
    assert peak_running <= 8, peak_running
    print(f"http: {N_STREAMS} streams x {k} tokens in {wall:.2f} s, none lost; peak running {peak_running:.0f}, "
          f"peak KV blocks used {peak_used:.0f}; after: 0 blocks used")

    # A client that goes away mid-stream: its request is dropped, its blocks freed.
    c = http.client.HTTPConnection("127.0.0.1", w.port, timeout=30)
    c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
              body=json.dumps({"model": w.model, "prompt": [1, 2, 3], "max_tokens": 2000, "stream": True,
                               "ignore_eos": True}))
    r = c.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data:")
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    # The counter moves when the scheduler ends the request; the gauges are the scheduler's snapshot,
    # published at the end of that loop turn, so a scrape in between sees the one before the other.
    deadline = time.monotonic() + 20
    while True:
        s = scr.scrape()
        dropped = delta(after, s, "ringllama_requests_total", outcome="dropped", api="http")
        assert dropped <= 1, dropped
        if (dropped == 1 and get(s, "ringllama_kv_blocks_used") == 0
                and get(s, "ringllama_running_sequences") == 0):
            break
        assert time.monotonic() < deadline, f"the request of a client gone was not dropped and freed: {s}"
        time.sleep(0.05)
    print("http: a client gone mid-stream counted as dropped, its blocks freed")

    # Refused generations count as the ZeroMQ side's do: an id outside the vocabulary and n=2 are
    # bad requests.
    before = scr.scrape()
    for body in ({"model": w.model, "prompt": [1, 10 ** 6], "max_tokens": 4},
                 {"model": w.model, "prompt": [1, 2], "max_tokens": 4, "n": 2}):
        c = http.client.HTTPConnection("127.0.0.1", w.port, timeout=30)
        c.request("POST", "/v1/completions", headers={"Content-Type": "application/json"}, body=json.dumps(body))
        r = c.getresponse()
        assert r.status == 400, (r.status, r.read())
        r.read()
        c.close()
    after = scr.scrape()
    assert delta(before, after, "ringllama_requests_total", outcome="rejected_bad", api="http") == 2
    assert delta(before, after, "ringllama_requests_total", outcome="rejected_bad", api="zmq") == 0
    print("http: two refused requests counted as rejected_bad")


def check_bench(w, scr, work):
    before = scr.scrape()
    out = os.path.join(work, "bench")
    r = subprocess.run([sys.executable, os.path.join(src, "scripts", "bench_client.py"), "--openai",
                        f"http://127.0.0.1:{w.port}/v1", "--concurrency", "4", "--requests", "8", "--prompt-len", "6",
                        "--output-len", "10", "--vocab", "500", "--no-plot", "--out", out],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    with open(out + ".json") as f:
        rep = json.load(f)
    after = scr.scrape()
    assert rep["model"] == w.model and rep["ringllama"] is True, rep
    (lv,) = rep["levels"]
    assert lv["requests"] == 8 and lv["errors"] == {}, lv
    assert lv["tokens"] == 80 and lv["prompt_tokens"] == 48, lv
    assert 0 < lv["ttft_ms_p50"] <= lv["ttft_ms_p99"] < 10000, lv
    assert 0 < lv["tpot_ms_p50"] <= lv["tpot_ms_p99"] < 10000, lv
    assert lv["tokens_per_s"] > 0 and lv["wall_s"] > 0, lv
    # The steps the bench read from /metrics are the worker's own count.
    assert lv["steps"] == delta(before, after, "ringllama_steps_total") > 0, (lv, before, after)
    assert delta(before, after, "ringllama_requests_total", outcome="finished", api="http") == 8
    assert delta(before, after, "ringllama_completion_tokens_total") == 80
    print(f"bench --openai: {lv['requests']} requests, {lv['tokens']} tokens, TTFT p50 {lv['ttft_ms_p50']:.1f} ms, "
          f"TPOT p50 {lv['tpot_ms_p50']:.2f} ms, {lv['steps']} steps")


def check_daemon_window(work, store):
    """A worker fed by a loader daemon whose window is smaller than the model: the window's figures."""
    control = "ipc://" + os.path.join(work, "loaderd.sock")
    dlog = open(os.path.join(work, "loaderd.log"), "w")
    d = subprocess.Popen([os.path.join(bin_dir, "ringllama-loaderd"), "--store", store, "--control", control,
                          "--cpu-cap-layers", "4", "--mlock", "warn", "--heartbeat-ms", "100"],
                         stdout=dlog, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(control[len("ipc://"):]) and " info: ready" in open(dlog.name).read()):
            assert d.poll() is None and time.monotonic() < deadline, open(dlog.name).read()
            time.sleep(0.05)
        w = Worker(work, store, "daemon-fed", ["--daemon", control])
        try:
            scr = Scraper(w.port)
            before = scr.scrape()
            assert get(before, "ringllama_build_info", model=w.model, backend="cpu", name=get_name(before),
                       weights="daemon") == 1
            with Client([w.zmq], timeout=60) as c:
                assert len(c.generate([1, 2, 3], 6, ignore_eos=True).result()) == 6
                stats = c.stats()
            after = scr.scrape()
            steps = delta(before, after, "ringllama_steps_total")
            assert stats["weights"]["pass"] == get(after, "ringllama_window_pass"), (stats, after)
            # One pass through the window per step, numbered from 0; each pass starts at or after the
            # end of the one before (positions are pass * 8 layers + layer, the daemon's), and an idle
            # worker holds none once the daemon has ended its pass (-1).
            assert steps == 6 and get(after, "ringllama_window_pass") == steps - 1, after
            position = get(after, "ringllama_window_position")
            assert position == -1 or position >= 8 * (steps - 1), position
            waits = get(after, "ringllama_window_waits_total")
            assert waits == stats["weights"]["waits"] and waits >= 1, (waits, stats)
            assert get(after, "ringllama_window_wait_seconds_total") > 0
            print(f"daemon window: {steps:.0f} passes, {waits:.0f} waits on the daemon, "
                  f"{get(after, 'ringllama_window_wait_seconds_total') * 1e3:.1f} ms")
        except BaseException:
            print(w.text()[-3000:], file=sys.stderr)
            raise
        finally:
            w.stop()
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(30)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()
        dlog.close()


def main(work):
    store = os.path.join(work, "store")
    run([os.path.join(bin_dir, "ringllama-pack"), "--random", "tiny", "--layers", "8", "--out", store, "--quiet"])
    run([sys.executable, os.path.join(src, "tests", "make_test_tokenizer.py"), store, "512",
         os.path.join(src, "tests", "data", "chat_templates", "llama32.json")])
    w = Worker(work, store)
    try:
        scr = Scraper(w.port)
        check_zmq(w, scr)
        check_http_streams(w, scr)
        check_bench(w, scr, work)
    except BaseException:
        print(w.text()[-4000:], file=sys.stderr)
        raise
    finally:
        w.stop()
    assert w.proc.returncode == 0, w.proc.returncode
    check_daemon_window(work, store)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        main(d)
    print("metrics_test: ok")
