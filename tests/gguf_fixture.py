#!/usr/bin/env python3
"""GGUF files for the packer's tests, written with the `gguf` package as llama.cpp's converter does.

  gguf_fixture.py model HF_DIR OUT.gguf TYPE EXPECTED_DIR [--pre PRE]
      A golden fixture's HF folder (tests/data/<name>/hf) as a GGUF of tensor type TYPE (F32, F16,
      BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; norms stay F32 as the converter keeps them),
      with attn_q/attn_k rows permuted as convert_hf_to_gguf.py's `permute` does, llama3 rope
      scaling as rope_freqs.weight, and a byte-level BPE tokenizer trained for the vocabulary.
      EXPECTED_DIR/<hf tensor name>.f32 gets the float32 values the store must hold (before its
      bf16 rounding) in Hugging Face's layout: gguf.quants.dequantize(gguf.quants.quantize(w)).

  gguf_fixture.py synthetic OUT.gguf TYPE EXPECTED_DIR
      The same for a random tied model whose rows are whole 256-element blocks (dim 256, ffn 512),
      so that the K-quants (Q4_K, Q6_K) are exercised as well.

  gguf_fixture.py tokenizer PACK_BIN TMP_DIR
      For each pre-tokenizer kind (smollm, llama-bpe, gpt2, default): trains a byte-level BPE, writes a tiny
      model GGUF with it, packs it with PACK_BIN --gguf, loads the store's tokenizer.json with HF
      tokenizers and checks that it encodes a corpus as the reference tokenizer does. Prints one
      line per kind; exits 1 on any difference.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

TYPES = {n: getattr(QT, n) for n in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]}


def read_safetensors(path):
    """name -> float32 array of a safetensors file (F32, F16 or BF16)."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        raw = data[8 + n + b : 8 + n + end]
        if e["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif e["dtype"] == "F16":
            a = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
        else:
            a = np.frombuffer(raw, dtype=np.float32)
        out[name] = a.reshape(e["shape"])
    return out


def read_hf(hf_dir):
    tensors = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            tensors.update(read_safetensors(os.path.join(hf_dir, f)))
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f), tensors


def permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def unpermute(weights, n_head, n_head_kv):
    """The inverse of permute: each head's interleaved row pairs back to [first half | second half]."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def random_kquant_blocks(t, shape, rng):
    """Random Q4_K or Q6_K blocks for a [rows, cols] tensor, with small finite f16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[t]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    d = (rng.standard_normal((rows, cols // block_elems)) * 1e-3).astype(np.float16).view(np.uint8)
    d = d.reshape(rows, cols // block_elems, 2)
    if t == QT.Q4_K:  # d, dmin first
        raw[:, :, 0:2] = d
        raw[:, :, 2:4] = np.abs(d.view(np.float16)).view(np.uint8)
    else:  # Q6_K: d last
        raw[:, :, block_bytes - 2 :] = d
    return raw.reshape(rows, cols // block_elems * block_bytes)


def rope_params(cfg):
    """(theta, llama3 rope_scaling dict or None) from either config.json form."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    theta = cfg.get("rope_theta", 10000.0)
    if rp and "rope_theta" in rp:
        theta = rp["rope_theta"]
    if rp and rp.get("rope_type", rp.get("type")) == "llama3":
        return theta, rp
    return theta, None


def llama3_factors(cfg, head_dim):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: rope_freqs.weight."""
    theta, rs = rope_params(cfg)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old = rs.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and 12345 apples cost $67.89!",
    "Hello, world: what's the capital of France? Paris, of course; isn't it?",
    "  leading spaces\tand tabs\nnew lines\r\nwindows lines   trailing   ",
    "Numbers 0 1 22 333 4444 55555 and 3.14159 or 1e-5, 100% sure.",
    "Unicode: café naïve 東京 Привет мир 😀 emoji 👍🏽 and ßtraße.",
    "code: def f(x): return x**2 + 3*x - 1  # comment {braces} [brackets] <tags/>",
    "I'll we've they're she'd you'LL HE'S don't can't won't",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
]

LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
LLAMA_CPP_DEFAULT = ["[\\p{P}\\$\\+<=>\\^~\\|]+",
                     "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
                     "\\p{N}+", "[0-9][0-9][0-9]"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def reference_pre_tokenizer(pre):
    """The HF pre-tokenizer the original tokenizer.json of each kind has."""
    from tokenizers import Regex, pre_tokenizers as pt
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre == "llama-bpe":
        return pt.Sequence([pt.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "default":  # llama-vocab.cpp's regexes for it, each splitting the pieces of the last
        return pt.Sequence([pt.Split(Regex(r), behavior="isolated", invert=False) for r in LLAMA_CPP_DEFAULT]
                           + [pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise SystemExit(f"no reference pre-tokenizer for {pre}")


def train_tokenizer(pre, vocab_size):
    """A byte-level BPE of exactly vocab_size tokens (specials first, trained tokens, then
    user-defined <extra_N> tokens if training stopped short) and the reference tokenizer: its
    vocabulary and merges behind the pre-tokenizer of kind `pre`. Training sees whole lines
    (ByteLevel without its regex), so merges cross every boundary a pre-tokenizer draws: a wrong
    pre-tokenizer then encodes differently. Returns (reference, tokens, types, merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers as pt, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [3 if t in SPECIALS else 1 for t in tokens]
    n = 0
    while len(tokens) < vocab_size:
        tokens.append(f"<extra_{n}>")
        types.append(4)
        n += 1
    tokens, types = tokens[:vocab_size], types[:vocab_size]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    have = set(tokens)
    merges = [m for m in merges if m[0] in have and m[1] in have and m[0] + m[1] in have]
    ref = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=(pre == "llama-bpe")))
    ref.pre_tokenizer = reference_pre_tokenizer(pre)
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    ref.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return ref, tokens, types, [a + " " + b for a, b in merges]


def add_tokenizer(w, pre, vocab_size, bos=None, eos=()):
    _, tokens, types, merges = train_tokenizer(pre, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    if bos is not None:
        w.add_bos_token_id(bos)
    keys = [w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id]
    for k, e in zip(keys, eos):
        k(e)
    w.add_add_bos_token(False)


def write_model(cfg, tensors, out, qtype, expected_dir, pre):
    dim, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or dim // n_head
    vocab = cfg["vocab_size"]
    theta, rs = rope_params(cfg)
    w = gguf.GGUFWriter(out, "llama")
    w.add_block_count(n_layers)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(dim)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_dimension_count(head_dim)
    if cfg.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type(1 if qtype == "F16" else 0)
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    add_tokenizer(w, pre, vocab, cfg.get("bos_token_id"), eos)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for l in range(n_layers):
        for hf, g in parts.items():
            names[f"model.layers.{l}.{hf}.weight"] = f"blk.{l}.{g}.weight"
    os.makedirs(expected_dir, exist_ok=True)
    qt = TYPES[qtype]
    for hf_name, data in tensors.items():
        if hf_name not in names:
            continue
        data = data.astype(np.float32)
        t = QT.F32 if data.ndim == 1 else qt  # the converter keeps norms in F32
        # Blocks run along rows; a row that is no whole number of blocks stays F32 here.
        block = gguf.GGML_QUANT_SIZES[t][0]
        if data.shape[-1] % block:
            t = QT.F32
        if t in (QT.Q4_K, QT.Q6_K):
            # gguf.quants has no quantizer for the K-quants: random blocks with sane f16 scales, and
            # the values gguf.quants.dequantize reads from them, put back in HF row order.
            raw = random_kquant_blocks(t, data.shape, np.random.default_rng(len(hf_name)))
            expect = gguf.quants.dequantize(raw, t)
            if hf_name.endswith("q_proj.weight"):
                expect = unpermute(expect, n_head, n_head)
            elif hf_name.endswith("k_proj.weight"):
                expect = unpermute(expect, n_head, n_kv)
            expect.astype("<f4").tofile(os.path.join(expected_dir, hf_name + ".f32"))
            w.add_tensor(names[hf_name], raw, raw_dtype=t)
            continue
        if t == QT.F32:
            expect = data
        elif t == QT.F16:
            expect = data.astype(np.float16).astype(np.float32)
        elif t == QT.BF16:
            expect = gguf.quants.dequantize(gguf.quants.quantize(data, t), t)
        else:
            expect = gguf.quants.dequantize(gguf.quants.quantize(data, t), t)
        expect.astype("<f4").tofile(os.path.join(expected_dir, hf_name + ".f32"))
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv)
        stored = data if t == QT.F32 else data.astype(np.float16) if t == QT.F16 else gguf.quants.quantize(data, t)
        w.add_tensor(names[hf_name], stored, raw_dtype=None if t in (QT.F32, QT.F16) else t)
    if rs is not None:
        w.add_tensor("rope_freqs.weight", llama3_factors(cfg, head_dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_tensors(rng, dim, n_layers, n_head, n_kv, ffn, vocab):
    hd = dim // n_head
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, dim)), "model.norm.weight": rng.uniform(0.5, 1.5, dim)}
    for l in range(n_layers):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, dim)
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((n_head * hd, dim))
        t[p + "self_attn.k_proj.weight"] = rng.standard_normal((n_kv * hd, dim))
        t[p + "self_attn.v_proj.weight"] = rng.standard_normal((n_kv * hd, dim))
        t[p + "self_attn.o_proj.weight"] = rng.standard_normal((dim, n_head * hd))
        t[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, dim)
        t[p + "mlp.gate_proj.weight"] = rng.standard_normal((ffn, dim))
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((ffn, dim))
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((dim, ffn))
    return {k: (v * 0.05).astype(np.float32) for k, v in t.items()}


def check_tokenizers(pack_bin, tmp):
    from tokenizers import Tokenizer
    failures = 0
    cfg = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}
    encodings = {}
    samples = CORPUS + ["Completely new text 98765 with ÜNÏCÖDÉ and\n\n\nmany   spaces.", "a", "", "42"]
    for pre in ["smollm", "llama-bpe", "gpt2", "default"]:
        ref, tokens, _, merges = train_tokenizer(pre, cfg["vocab_size"])
        gpath = os.path.join(tmp, f"tok-{pre}.gguf")
        store = os.path.join(tmp, f"store-{pre}")
        write_model(cfg, tiny_tensors(np.random.default_rng(7), 32, 1, 2, 1, 64, 400), gpath, "F32",
                    os.path.join(tmp, f"expected-{pre}"), pre)
        r = subprocess.run([pack_bin, "--gguf", gpath, "--out", store, "--quiet"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{pre}: ringllama-pack failed: {r.stderr.strip()}")
            failures += 1
            continue
        got = Tokenizer.from_file(os.path.join(store, "tokenizer.json"))
        # The reference: the trained tokenizer with the vocabulary and merges the GGUF holds.
        diffs = 0
        for s in samples:
            a = got.encode(s).ids
            b = ref.encode(s).ids
            if a != b:
                diffs += 1
                print(f"{pre}: {s!r}\n  converted: {a}\n  reference: {b}")
            if got.decode(a, skip_special_tokens=False) != s:
                diffs += 1
                print(f"{pre}: decoding does not give the text back: {got.decode(a)!r} != {s!r}")
        specials = [got.token_to_id(t) for t in SPECIALS]
        if specials != [tokens.index(t) for t in SPECIALS]:
            diffs += 1
            print(f"{pre}: special token ids {specials}")
        if got.encode("<|im_start|>x").ids[0] != tokens.index("<|im_start|>"):
            diffs += 1
            print(f"{pre}: <|im_start|> is not matched as one special token")
        with open(os.path.join(store, "tokenizer_config.json")) as f:
            tc = json.load(f)
        if tc.get("eos_token") != tokens[2] or "chat_template" not in tc or tc.get("add_bos_token") is not False:
            diffs += 1
            print(f"{pre}: tokenizer_config.json is {tc}")
        n_tokens = sum(len(ref.encode(s).ids) for s in samples)
        print(f"{pre}: {len(samples)} texts, {n_tokens} tokens, {len(merges)} merges: "
              f"{'identical' if diffs == 0 else f'{diffs} differences'}")
        failures += diffs
        encodings[pre] = [ref.encode(s).ids for s in samples]
    # The kinds must tell apart on this corpus, or the check above could not catch a wrong one.
    kinds = list(encodings)
    for i in range(len(kinds)):
        for j in range(i + 1, len(kinds)):
            if encodings[kinds[i]] == encodings[kinds[j]]:
                failures += 1
                print(f"{kinds[i]} and {kinds[j]} encode the corpus alike: the corpus cannot tell them apart")
    return failures


def main(argv):
    if len(argv) >= 5 and argv[0] == "model":
        pre = argv[argv.index("--pre") + 1] if "--pre" in argv else "smollm"
        cfg, tensors = read_hf(argv[1])
        write_model(cfg, tensors, argv[2], argv[3], argv[4], pre)
        return 0
    if len(argv) == 4 and argv[0] == "synthetic":
        cfg = {"hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 512, "vocab_size": 300, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
               "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}
        write_model(cfg, tiny_tensors(np.random.default_rng(3), 256, 1, 4, 2, 512, 300), argv[1], argv[2], argv[3],
                    "smollm")
        return 0
    if len(argv) == 3 and argv[0] == "tokenizer":
        return 1 if check_tokenizers(argv[1], argv[2]) else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
