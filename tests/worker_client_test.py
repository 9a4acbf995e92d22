#!/usr/bin/env python3
"""The Python client and bench_client against two running workers (started by test_worker's
PythonClientAndBench): tokens as the reference gives them, requests spread over both endpoints,
cancel, stats, health, errors raised; then a short bench_client sweep writing its JSON and PNG.

    worker_client_test.py SCRIPTS_DIR OUT_DIR ENDPOINT_A ENDPOINT_B PROMPT_IDS REFERENCE_IDS
"""
import json
import os
import subprocess
import sys

scripts, out_dir, ep_a, ep_b, prompt_text, ref_text = sys.argv[1:7]
sys.path.insert(0, scripts)
from ringllama_client import Client, WorkerError  # noqa: E402

prompt = [int(x) for x in prompt_text.split(",")]
ref = [int(x) for x in ref_text.split(",")]

with Client([ep_a, ep_b], timeout=30) as c:
    # Tokens as an iterator, the done reply after it.
    g = c.generate(prompt, len(ref), ignore_eos=True)
    assert list(g) == ref, (g.tokens, ref)
    assert g.done["reason"] == "length" and g.done["usage"]["completion_tokens"] == len(ref), g.done

    # Several in flight at once from one thread, spread over both workers.
    gens = [c.generate(prompt, len(ref), ignore_eos=True) for _ in range(6)]
    assert {x.endpoint for x in gens} == {ep_a, ep_b}, [x.endpoint for x in gens]
    for x in reversed(gens):
        assert x.result() == ref
    assert c.in_flight() == 0

    # Cancel: the done reply says so.
    g = c.generate(prompt, 1500, ignore_eos=True)
    next(g)
    g.cancel()
    rest = list(g)
    assert g.done["reason"] == "cancelled", g.done
    assert len(g.tokens) < 1500

    # Errors are raised with their code.
    try:
        list(c.generate([100000], 4))
        raise AssertionError("an id outside the vocabulary was accepted")
    except WorkerError as e:
        assert e.code == "bad_request" and "vocabulary" in e.message, e

    stats = c.stats()
    assert set(stats) == {ep_a, ep_b}
    total = sum(s["requests"]["finished"] for s in stats.values())
    assert total == 7, stats
    assert all(s["kv_blocks"]["free"] == s["kv_blocks"]["total"] for s in stats.values()), stats
    health = c.health(ep_a)
    assert health["status"] == "ok" and health["detail"]["backend"] == "cpu", health

# A short sweep: closed loop at two levels, then Poisson arrivals.
out = os.path.join(out_dir, "bench")
for extra in (["--concurrency", "1,4"], ["--rate", "50", "--requests", "12"]):
    r = subprocess.run([sys.executable, os.path.join(scripts, "bench_client.py"), "--endpoint", ep_a, "--endpoint", ep_b,
                        "--requests", "8", "--prompt-len", "uniform:4:16", "--output-len", "exp:8", "--out", out] + extra,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TTFT p50" in r.stdout, r.stdout
    with open(out + ".json") as f:
        rec = json.load(f)
    assert all(lv["requests"] > 0 and lv["tokens_per_s"] > 0 and not lv["errors"] for lv in rec["levels"]), rec
    assert os.path.getsize(out + ".png") > 1000
print("ok")
