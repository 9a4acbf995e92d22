#!/usr/bin/env python3
"""Encoding speed of ringllama-tokenize against Hugging Face `tokenizers` on one thread, same text,
same run: both rates (MB/s) and their ratio, for plain English prose (as one text, and line by
line: 20 000 encode calls) and for the corpus of scripts/tokenizer_corpus.py joined into one text,
each a few MB. The ids are checked equal as well.

    scripts/bench-tokenizer.py --bin BUILD/bin/ringllama-tokenize --tokenizer tokenizer.json [--mb 4]

Times are the best of --repeat runs of encode() alone (loading the file is not counted):
ringllama-tokenize reports its own with --time.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_corpus import WORDS, corpus  # noqa: E402


def english(mb, seed):
    rng = random.Random(seed)
    words = [w for w in WORDS if w.isascii()] + "a an of to in is it that for on with as was at by be this".split()
    out, size = [], 0
    while size < mb * 1e6:
        s = " ".join(rng.choice(words) for _ in range(rng.randint(5, 25)))
        s = s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!"]) + rng.choice([" ", " ", "\n", "\n\n"])
        out.append(s)
        size += len(s)
    return "".join(out)


def mixed(mb, seed):
    texts = corpus(seed=seed, count=4000)
    one = "\n".join(texts)
    return (one * (int(mb * 1e6) // len(one.encode()) + 1))[: int(mb * 1e6)]


def bench(binary, path, hf, name, text, repeat, by_line=False):
    """One text encoded whole, or (by_line) each of its lines encoded on its own."""
    lines = text.split("\n") if by_line else None
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines) if by_line else text)
        fname = f.name
    try:
        ours, ids = [], None
        args = [binary, "--tokenizer", path, "--file", fname, "--time"] + (["--lines"] if by_line else [])
        for _ in range(repeat):
            p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
            ours.append(float(re.search(r"tokens, ([0-9.]+) s", p.stderr.decode()).group(1)))
            ids = [int(x) for x in p.stdout.split()]
        theirs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            if by_line:
                want = [i for x in lines for i in hf.encode(x, add_special_tokens=False).ids]
            else:
                want = hf.encode(text, add_special_tokens=False).ids
            theirs.append(time.perf_counter() - t0)
    finally:
        os.unlink(fname)
    mb = len(text.encode()) / 1e6
    same = "ids equal" if ids == want else "IDS DIFFER"
    r_ours, r_theirs = mb / min(ours), mb / min(theirs)
    print(f"{name:8s} {mb:6.2f} MB {len(want):9d} tokens  ringllama {r_ours:7.2f} MB/s  tokenizers {r_theirs:7.2f} MB/s"
          f"  ratio {r_ours / r_theirs:5.2f}  ({same})")
    return ids == want


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="ringllama-tokenize")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
    ap.add_argument("--mb", type=float, default=4, help="megabytes of each text")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    import tokenizers
    hf = tokenizers.Tokenizer.from_file(a.tokenizer)
    print(f"{a.tokenizer}: one thread each (tokenizers {tokenizers.__version__})")
    text = english(a.mb, a.seed)
    ok = bench(a.bin, a.tokenizer, hf, "english", text, a.repeat)
    ok = bench(a.bin, a.tokenizer, hf, "by line", text, a.repeat, by_line=True) and ok
    ok = bench(a.bin, a.tokenizer, hf, "corpus", mixed(a.mb, a.seed), a.repeat) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
