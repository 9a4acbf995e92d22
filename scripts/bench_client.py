#!/usr/bin/env python3
"""Load test for ringllama-worker: throughput and latency against concurrency (or request rate).

    python3 scripts/bench_client.py --endpoint ipc:///run/ringllama/worker-0.sock \\
        --concurrency 1,8,64 --requests 128 --prompt-len 128 --output-len 128 --out bench

For each level: N clients each keeping one request in flight (closed loop), or with --rate R
requests arriving as a Poisson process of R per second (open loop). Prompt and output lengths are
fixed ("128") or drawn per request ("uniform:32:256", "exp:128" capped at 8x the mean,
"normal:128:32"). Prints, per level: TTFT p50/p99, TPOT p50/p99, total tokens/s, and from the
workers' stats the bytes streamed per step and the achieved GB/s next to the H2D rate the worker
measured on its copies (CUDA backend, streamed layers). Writes OUT.json and OUT.png (matplotlib).
Several --endpoint spread the requests over several workers.

    python3 scripts/bench_client.py --openai http://127.0.0.1:8080/v1 --concurrency 1,8,64 ...

drives any OpenAI-compatible server (ringllama-worker's http_listen, llama-server, vLLM) with the
same load shapes: streaming /v1/completions requests (scripts/openai_stream_client.py), the prompt
as token ids drawn from [1, --vocab) or, with --prompt-text-mode, a text of about that many
tokens; max_tokens the output length, ignore_eos (and vLLM's min_tokens) unless
--no-extensions. --model defaults to the first of GET /v1/models, --api-key sends a bearer key.
TTFT is the time to the first chunk with text; output tokens come from the stream's usage (else
one per chunk). The link figures come from /metrics where the server is a ringllama worker.
"""
import argparse
import json
import math
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ringllama_client import Client, WorkerError  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # a plain line instead
    tqdm = None


class Progress:
    def __init__(self, total, desc):
        self.total, self.desc, self.n = total, desc, 0
        self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False) if tqdm else None

    def update(self, k=1):
        self.n += k
        if self.bar:
            self.bar.update(k)
        elif sys.stderr.isatty() or self.n == self.total:
            width = 30
            fill = int(width * self.n / max(1, self.total))
            sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total}")
            sys.stderr.flush()

    def close(self):
        if self.bar:
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 70 + "\r")


def length_sampler(spec, rng):
    """'128' | 'uniform:A:B' | 'exp:MEAN' | 'normal:MEAN:STD' -> a function giving lengths >= 1."""
    parts = str(spec).split(":")
    if len(parts) == 1:
        n = int(parts[0])
        return lambda: n
    kind, args = parts[0], [float(x) for x in parts[1:]]
    if kind == "uniform" and len(args) == 2:
        return lambda: rng.randint(int(args[0]), int(args[1]))
    if kind == "exp" and len(args) == 1:
        return lambda: max(1, min(int(8 * args[0]), int(rng.expovariate(1.0 / args[0]))))
    if kind == "normal" and len(args) == 2:
        return lambda: max(1, int(rng.gauss(args[0], args[1])))
    raise SystemExit(f"length '{spec}': use N, uniform:A:B, exp:MEAN or normal:MEAN:STD")


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stream_totals(stats_by_endpoint):
    """Summed over workers: steps, streamed bytes, copy seconds (None where no worker streams)."""
    steps = sum(s.get("steps", 0) for s in stats_by_endpoint.values())
    streams = [s["stream"] for s in stats_by_endpoint.values() if "stream" in s]
    if not streams:
        return {"steps": steps}
    return {"steps": steps, "bytes": sum(x["bytes"] for x in streams),
            "copy_seconds": sum(x["copy_seconds"] for x in streams)}


def all_stats(client):
    s = client.stats()
    return s if len(client.endpoints) > 1 else {client.endpoints[0]: s}


# Common one-token English words (with their leading space): a text of n of them is about n tokens
# for the usual BPE vocabularies; the server's usage says how many it really was.
WORDS = (" the of and to in is was for on that with as by at from his it an were are which this be has had one"
         " their not but new first also after who two her they she been other its time all would there more year")
WORDS = WORDS.split(" ")[1:]


def make_prompt(args, n, rng, vocab):
    if args.prompt_text_mode:
        return "".join(" " + rng.choice(WORDS) for _ in range(n))
    return [rng.randrange(1, vocab) for _ in range(n)]


def run_level(client, args, level, vocab, rng):
    """One concurrency level (closed loop) or rate (open loop). Returns its record."""
    n_req = args.requests if args.requests else max(2 * level, 16) if not args.rate else 64
    plen, olen = length_sampler(args.prompt_len, rng), length_sampler(args.output_len, rng)
    before = stream_totals(all_stats(client))
    bar = Progress(n_req, f"{'rate' if args.rate else 'concurrency'} {level}")
    done, errors, live = [], [], []
    sent = 0
    t0 = time.monotonic()
    cpu0 = time.process_time()  # the client's own CPU: near the wall time means it is the bottleneck
    next_arrival = t0

    def send():
        nonlocal sent
        prompt = make_prompt(args, plen(), rng, vocab)
        g = client.generate(prompt, olen(), temperature=args.temperature, seed=sent, ignore_eos=True)
        live.append(g)
        sent += 1

    while len(done) + len(errors) < n_req:
        now = time.monotonic()
        if args.rate:
            while sent < n_req and now >= next_arrival:
                send()
                next_arrival += rng.expovariate(level)
            wait = max(0.0, min(0.05, next_arrival - now)) if sent < n_req else 0.05
        else:
            while sent < n_req and len(live) < level:
                send()
            wait = 0.05
        for g in client.poll(wait):
            live.remove(g)
            (errors if g.error else done).append(g)
            bar.update()
        if now - t0 > args.timeout:
            print(f"\nlevel {level}: timed out with {len(live)} requests in flight", file=sys.stderr)
            break
    wall = time.monotonic() - t0
    client_cpu = time.process_time() - cpu0
    bar.close()
    for g in list(live):
        client.cancel(g)
    after_stats = all_stats(client)
    after = stream_totals(after_stats)

    ttft = [(g.first_token_time - g.sent_time) * 1e3 for g in done if g.first_token_time]
    tpot = [(g.last_token_time - g.first_token_time) * 1e3 / (len(g.tokens) - 1) for g in done if len(g.tokens) > 1]
    tokens = sum(len(g.tokens) for g in done)
    rec = {"level": level, "mode": "rate" if args.rate else "concurrency", "requests": len(done),
           "errors": {}, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
           "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
           "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
           "steps": after["steps"] - before["steps"], "client_cpu_s": client_cpu}
    usage = [g.usage for g in done if getattr(g, "usage", None)]
    if usage:  # --openai: what the server counted
        rec["prompt_tokens"] = sum(u.get("prompt_tokens", 0) for u in usage)
    for g in errors:
        rec["errors"][g.error.code] = rec["errors"].get(g.error.code, 0) + 1
    if "bytes" in after:
        # A worker that has not run a step yet reports no stream figures: they start at zero.
        streamed = after["bytes"] - before.get("bytes", 0)
        copy_s = after["copy_seconds"] - before.get("copy_seconds", 0.0)
        rec["bytes_per_step"] = streamed / rec["steps"] if rec["steps"] else 0
        rec["achieved_gb_per_s"] = streamed / wall * 1e-9 if wall > 0 else 0.0
        rec["worker_h2d_gb_per_s"] = streamed / copy_s * 1e-9 if copy_s > 0 else 0.0
    return rec


def fmt(x, spec=".1f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(records):
    head = ["level", "reqs", "err", "tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "MB/step", "GB/s",
            "H2D GB/s"]
    rows = []
    for r in records:
        rows.append([str(r["level"]), str(r["requests"]), str(sum(r["errors"].values())), fmt(r["tokens_per_s"]),
                     fmt(r["ttft_ms_p50"]), fmt(r["ttft_ms_p99"]), fmt(r["tpot_ms_p50"], ".2f"),
                     fmt(r["tpot_ms_p99"], ".2f"),
                     fmt(r["bytes_per_step"] / 1e6 if "bytes_per_step" in r else None),
                     fmt(r.get("achieved_gb_per_s"), ".2f"), fmt(r.get("worker_h2d_gb_per_s"), ".2f")])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("(latencies in ms; GB/s: bytes streamed host-to-device over the wall time; H2D: over the copies' own time)")


def plot(records, path, xlabel):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["level"] for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(x, [r["tokens_per_s"] for r in records], "o-")
    a1.set_xlabel(xlabel)
    a1.set_ylabel("generated tokens/s (all requests)")
    a1.set_title("throughput")
    for key, style in (("ttft_ms_p50", "o-"), ("ttft_ms_p99", "o--"), ("tpot_ms_p50", "s-"), ("tpot_ms_p99", "s--")):
        a2.plot(x, [r[key] for r in records], style, label=key.replace("_ms_", " "))
    a2.set_xlabel(xlabel)
    a2.set_ylabel("ms")
    a2.set_yscale("log")
    a2.set_title("latency")
    a2.legend()
    for a in (a1, a2):
        if len(x) > 1 and min(x) > 0:
            a.set_xscale("log", base=2)
        a.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", action="append", help="a worker's listen endpoint (repeatable)")
    ap.add_argument("--openai", metavar="URL", help="an OpenAI-compatible API's base URL instead, e.g. "
                    "http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="--openai: bearer key "
                    "(default: $OPENAI_API_KEY)")
    ap.add_argument("--model", help="--openai: the model (default: the first of GET /v1/models)")
    ap.add_argument("--prompt-text-mode", action="store_true", help="--openai: text prompts of about the length "
                    "(for servers that take no token ids)")
    ap.add_argument("--vocab", type=int, default=256, help="--openai: prompt ids are drawn from [1, VOCAB)")
    ap.add_argument("--no-extensions", action="store_true", help="--openai: send no ignore_eos / min_tokens")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (closed loop)")
    ap.add_argument("--rate", help="comma-separated request rates per second (Poisson arrivals) instead")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(2N, 16); 64 per rate)")
    ap.add_argument("--prompt-len", default="32", help="N, uniform:A:B, exp:MEAN or normal:MEAN:STD")
    ap.add_argument("--output-len", default="32", help="same forms as --prompt-len")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="seeds the lengths and the prompts")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per level at most")
    ap.add_argument("--out", default="bench_client", help="writes OUT.json and OUT.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    if bool(args.endpoint) == bool(args.openai):
        ap.error("give --endpoint (ZeroMQ) or --openai URL (HTTP), one of them")
    levels_text = args.rate or args.concurrency
    levels = [float(x) if args.rate else int(x) for x in levels_text.split(",")]
    rng = random.Random(args.seed)
    if args.openai:
        from openai_stream_client import OpenAIClient
        client = OpenAIClient(args.openai, api_key=args.api_key, model=args.model, timeout=args.timeout,
                              extensions=not args.no_extensions)
        endpoints = [args.openai]
    else:
        client = Client(args.endpoint, timeout=args.timeout)
        endpoints = args.endpoint
    with client:
        health = client.health()
        healths = health if len(endpoints) > 1 else {endpoints[0]: health}
        for e, h in healths.items():
            if h["status"] != "ok":
                raise SystemExit(f"{e}: {h['status']}")
        detail = next(iter(healths.values()))["detail"]
        vocab = args.vocab if args.openai else int(detail["vocab_size"])
        records = [run_level(client, args, lv, vocab, rng) for lv in levels]
    print_table(records)
    shown = {k: v for k, v in vars(args).items() if k != "api_key"}  # no secret in the report
    out = {"endpoints": endpoints, "workers": healths, "args": shown, "levels": records}
    if args.openai:
        out["model"] = client.model
        out["ringllama"] = client.ringllama
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}.json", end="")
    if not args.no_plot:
        plot(records, args.out + ".png", "requests per second" if args.rate else "concurrent clients")
        print(f" and {args.out}.png", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
