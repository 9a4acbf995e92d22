#!/usr/bin/env python3
"""Small random-weight Llama checkpoints and their golden greedy outputs from Hugging Face transformers.

Usage: scripts/make-fixtures.py OUTDIR [--only NAME ...] [--cpu-threads N]
       scripts/make-fixtures.py --check DIR    (numpy only: recompute every golden row of DIR/*/ in float64)

Needs torch, transformers (5.x) and safetensors. For every fixture it writes

  OUTDIR/<name>/hf/                 the checkpoint as transformers saves it (bf16 safetensors, one file or
                                    shards + model.safetensors.index.json), config.json, generation_config.json
  OUTDIR/<name>/golden.json         {"prompt_ids", "tokens", "vocab_size", "rows", "transformers", "torch",
                                     "description", ...}
  OUTDIR/<name>/golden_logits.bin   float32 little-endian, rows x vocab_size

The golden run loads the saved bf16 checkpoint as float32 (an exact widening of every bf16 weight), eager
attention, on the CPU with TF32 off, and decodes greedily without stopping at eos: row 0 holds the logits at the
last prompt position (tokens[0] is its argmax), row i the logits after tokens[0..i-1] were appended. Each
row's gap between its largest and second largest logit is at least GAP_MIN x max|logit| of that row, so a
backend that computes in bf16 still picks the same tokens for the first steps; a weight seed or prompt that
misses this is replaced by the next seed.

Weights: every matrix ~ N(0, initializer_range^2), every RMSNorm weight ~ U(0.6, 1.4), all rounded to bf16,
drawn from a torch.Generator seeded per fixture, so the same transformers/torch versions rebuild the same files.
"""

import argparse
import array
import json
import math
import os
import shutil
import sys
import time

# Everything is local: never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GAP_MIN = 2e-3           # top-1 minus top-2 logit, relative to max|logit| of the row
MAX_ATTEMPTS = 400       # seeds tried per fixture before giving up
MIN_DISTINCT_TOKENS = 12  # a greedy run stuck on a few tokens says little

# config_form: how config.json is written.
#   "native"  - as transformers 5 save_pretrained writes it (rope_parameters, dtype)
#   "llama31" - the form of published Llama 3.1 checkpoints: top-level rope_theta, rope_scaling
#               {"rope_type": "llama3", ...}, torch_dtype
#   "llama2"  - the form of published Llama 2 checkpoints: top-level rope_theta, "rope_scaling": null, torch_dtype
FIXTURES = [
    {
        "name": "llama31_gqa_untied",
        "description": "Llama 3.1 style: config.json in the published Llama 3.1 form (top-level rope_theta, "
                       "rope_scaling llama3 with factor 8 and original_max_position_embeddings 32, torch_dtype), "
                       "GQA 4 query heads / 2 kv heads, untied lm_head, sizes that are not powers of two, "
                       "a 120-token prompt (longer than original_max_position_embeddings).",
        "config_form": "llama31",
        "config": dict(vocab_size=389, hidden_size=96, intermediate_size=248, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                       max_position_embeddings=256, tie_word_embeddings=False,
                       bos_token_id=386, eos_token_id=[387, 388, 385]),
        "rope": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        "initializer_range": 0.12,
        "prompt_len": 120,
        "new_tokens": 24,
        "seed": 1000,
        "shard_bytes": None,
    },
    {
        "name": "tf5_tied_hd128",
        "description": "transformers 5 native config.json (rope_parameters holding rope_theta and llama3 "
                       "scaling, dtype), tied embeddings, head_dim 128 with hidden size 64 "
                       "(2 query heads, 1 kv head: head_dim is not hidden_size / heads).",
        "config_form": "native",
        "config": dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-5,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=2),
        "rope": {"rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "initializer_range": 0.1,
        "prompt_len": 48,
        "new_tokens": 24,
        "seed": 2000,
        "shard_bytes": None,
    },
    {
        "name": "llama2_sharded_mha",
        "description": "Llama 2 style: config.json in the published Llama 2 form (top-level rope_theta 10000, "
                       "rope_scaling null, torch_dtype), no rope scaling, multi-head attention (kv heads == "
                       "heads), untied lm_head, weights split over several safetensors shards with "
                       "model.safetensors.index.json.",
        "config_form": "llama2",
        "config": dict(vocab_size=500, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-5,
                       max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
        "rope": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": 0.1,
        "prompt_len": 20,
        "new_tokens": 24,
        "seed": 3000,
        "shard_bytes": 300 * 1000,
    },
    {
        "name": "odd_dims_tied",
        "description": "Nothing a power of two: hidden 72, 3 query heads, 1 kv head, head_dim 24, ffn 200, "
                       "vocab 301, 3 layers, rms_norm_eps 1e-6, rope_theta 500000 with llama3 scaling "
                       "(factor 16, low_freq_factor 2, high_freq_factor 8, original_max_position_embeddings 64), "
                       "tied embeddings, transformers 5 native config.json, a 70-token prompt.",
        "config_form": "native",
        "config": dict(vocab_size=301, hidden_size=72, intermediate_size=200, num_hidden_layers=3,
                       num_attention_heads=3, num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-6,
                       max_position_embeddings=1024, tie_word_embeddings=True,
                       bos_token_id=299, eos_token_id=300),
        "rope": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 2.0,
                 "high_freq_factor": 8.0, "original_max_position_embeddings": 64},
        "initializer_range": 0.15,
        "prompt_len": 70,
        "new_tokens": 24,
        "seed": 4000,
        "shard_bytes": None,
    },
]

# Keys a published Llama config.json spells out; the rewritten forms carry all of them.
LEGACY_KEYS = [
    "architectures", "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
    "mlp_bias", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "pretraining_tp", "rms_norm_eps", "tie_word_embeddings", "use_cache", "vocab_size",
]


def log(msg):
    print(msg, flush=True)


def make_config(fx):
    from transformers import LlamaConfig
    kw = dict(fx["config"])
    kw.update(hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=fx["initializer_range"],
              rope_parameters=dict(fx["rope"]), use_cache=True)
    return LlamaConfig(**kw)


def expected_inv_freq(fx):
    """RoPE inverse frequencies in double precision, as the llama3 recipe defines them."""
    c, r = fx["config"], fx["rope"]
    d = c["head_dim"]
    inv = [1.0 / (r["rope_theta"] ** (i / d)) for i in range(0, d, 2)]
    if r["rope_type"] == "default":
        return inv
    assert r["rope_type"] == "llama3"
    old, lo, hi, f = r["original_max_position_embeddings"], r["low_freq_factor"], r["high_freq_factor"], r["factor"]
    out = []
    for x in inv:
        wl = 2 * math.pi / x
        if wl < old / hi:
            out.append(x)
        elif wl > old / lo:
            out.append(x / f)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1 - s) * x / f + s * x)
    return out


def rewrite_config(path, fx, loaded_config):
    """Rewrites config.json into a published legacy form, keeping every value."""
    form = fx["config_form"]
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        # already legacy: rebuild from top-level keys
        rp = dict(cfg.pop("rope_scaling", None) or {})
        rp.setdefault("rope_type", "default")
        rp["rope_theta"] = cfg.pop("rope_theta")
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if form == "llama31":
        assert rope_type == "llama3", rp
        keys = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_type"]
        left = set(rp) - set(keys)
        assert not left, "rope parameters the llama31 form cannot carry: %s" % left
        cfg["rope_scaling"] = {k: rp[k] for k in keys}
    elif form == "llama2":
        assert rope_type == "default" and set(rp) <= {"rope_type"}, rp
        cfg["rope_scaling"] = None
    else:
        raise ValueError(form)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.setdefault("torch_dtype", "bfloat16")
    for k in LEGACY_KEYS:
        if k not in cfg:
            v = getattr(loaded_config, k)
            cfg[k] = list(v) if isinstance(v, tuple) else v
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


def check_config_json(path, fx):
    """The written config.json must state what the fixture intends, in the intended form."""
    with open(path) as f:
        cfg = json.load(f)
    form = fx["config_form"]
    r = fx["rope"]
    notes = []
    if form == "native":
        rp = cfg.get("rope_parameters")
        if rp is None:
            raise RuntimeError("config.json has no rope_parameters: %s" % sorted(cfg))
        for k, v in r.items():
            if rp.get(k) != v:
                raise RuntimeError("rope_parameters[%s] = %r, want %r" % (k, rp.get(k), v))
        if "rope_theta" in cfg or "rope_scaling" in cfg:
            notes.append("native config.json also has top-level rope keys")
        if "dtype" not in cfg:
            notes.append("native config.json has no dtype key (keys: %s)" % sorted(cfg))
    else:
        if cfg.get("rope_theta") != r["rope_theta"] or "rope_parameters" in cfg or "dtype" in cfg:
            raise RuntimeError("legacy config.json is not in the legacy form")
        want = None if form == "llama2" else {k: v for k, v in r.items() if k != "rope_theta"}
        if cfg.get("rope_scaling", "missing") != want:
            raise RuntimeError("rope_scaling = %r, want %r" % (cfg.get("rope_scaling"), want))
    c = fx["config"]
    tied = cfg.get("tie_word_embeddings")
    if tied is not None and tied != c["tie_word_embeddings"]:
        raise RuntimeError("tie_word_embeddings = %r" % tied)
    if tied is None:
        notes.append("config.json leaves tie_word_embeddings out")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps"):
        if cfg.get(k) != c[k]:
            raise RuntimeError("config.json %s = %r, want %r" % (k, cfg.get(k), c[k]))
    if cfg.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) != c["head_dim"]:
        raise RuntimeError("config.json head_dim = %r" % cfg.get("head_dim"))
    return notes


def fill_weights(model, seed, init_range):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                w = 0.6 + 0.8 * torch.rand(p.shape, generator=g, dtype=torch.float32)
            else:
                w = torch.randn(p.shape, generator=g, dtype=torch.float32) * init_range
            p.copy_(w.to(torch.bfloat16).to(torch.float32))
        if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight = model.model.embed_tokens.weight


def make_prompt(fx, seed):
    import torch
    g = torch.Generator().manual_seed(seed * 7 + 1)
    ids = torch.randint(0, fx["config"]["vocab_size"], (fx["prompt_len"],), generator=g).tolist()
    ids[0] = fx["config"]["bos_token_id"]
    return ids


def greedy(model, prompt, n, screen=False):
    """Greedy decode without a KV cache: every step recomputes the whole sequence in fp32.
    screen: stop early at the first row whose top-2 gap is under GAP_MIN (returns fewer rows)."""
    import torch
    ids = list(prompt)
    tokens, rows = [], []
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
            row = out.logits[0, -1].to(torch.float32).clone()
            t = int(torch.argmax(row))
            rows.append(row)
            tokens.append(t)
            ids.append(t)
            if screen and gap_ratios(row[None])[0] < GAP_MIN:
                break
    return tokens, torch.stack(rows)


def gap_ratios(rows):
    import torch
    top2 = torch.topk(rows, 2, dim=1).values
    return ((top2[:, 0] - top2[:, 1]) / rows.abs().max(dim=1).values).tolist()


def cross_check_generate(model, prompt, tokens, rows, fx):
    """transformers' own generate (KV cache) must agree with the plain loop."""
    import torch
    from transformers import GenerationConfig
    n = len(tokens)
    try:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                              bos_token_id=fx["config"]["bos_token_id"], eos_token_id=fx["config"]["eos_token_id"],
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        gen = out.sequences[0, len(prompt):].tolist()
        glog = torch.stack([x[0].to(torch.float32) for x in out.logits])
        diff = ((glog - rows).abs().max(dim=1).values / rows.abs().max(dim=1).values).max().item()
        eos = eos_set(fx["config"]["eos_token_id"])
        same = gen == tokens
        log("  generate(): tokens %s, worst row max|diff|/max|logit| %.3g%s" % (
            "agree" if same else "DIFFER", diff,
            "" if same or not (set(tokens) & eos) else " (the plain loop emitted an eos id, which generate "
                                                        "suppresses through min_new_tokens)"))
        cc = {"tokens_agree": same, "worst_row_ratio": diff}
        if not same and set(tokens) & eos:
            cc["note"] = ("the greedy tokens include an eos id; generate() with min_new_tokens suppresses eos and "
                          "continues differently from there, so rows after it are not comparable")
        return cc
    except Exception as e:  # the cross-check is informative only
        log("  generate() cross-check skipped: %s: %s" % (type(e).__name__, e))
        return None


def save_checkpoint(model, hf_dir, fx):
    import torch
    model.to(torch.bfloat16)
    kw = {}
    if fx["shard_bytes"]:
        kw["max_shard_size"] = fx["shard_bytes"]
    try:
        model.save_pretrained(hf_dir, safe_serialization=True, **kw)
    except TypeError:
        model.save_pretrained(hf_dir, **kw)
    files = sorted(os.listdir(hf_dir))
    shards = [f for f in files if f.endswith(".safetensors")]
    if fx["shard_bytes"]:
        if "model.safetensors.index.json" not in files or len(shards) < 2:
            raise RuntimeError("expected a sharded checkpoint, got %s" % files)
    elif shards != ["model.safetensors"]:
        raise RuntimeError("expected one model.safetensors, got %s" % files)
    return files


def check_loaded(model, ref, fx):
    import torch
    sd = model.state_dict()
    for k, v in ref.items():
        if k not in sd:
            raise RuntimeError("loaded model lacks %s" % k)
        if sd[k].dtype != torch.float32 or not torch.equal(sd[k], v):
            raise RuntimeError("loaded %s differs from the weights saved" % k)
    if fx["config"]["tie_word_embeddings"]:
        if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
            raise RuntimeError("tied model: lm_head differs from embed_tokens")
    rp = model.config.rope_parameters
    for k, v in fx["rope"].items():
        if rp.get(k) != v:
            raise RuntimeError("loaded rope_parameters[%s] = %r, want %r" % (k, rp.get(k), v))
    inv = model.model.rotary_emb.inv_freq.to(torch.float64).tolist()
    want = expected_inv_freq(fx)
    worst = max(abs(a - b) / b for a, b in zip(inv, want))
    if len(inv) != len(want) or worst > 1e-5:
        raise RuntimeError("rotary inv_freq off the llama3 recipe (rel %.3g)" % worst)
    if model.model.rotary_emb.attention_scaling != 1.0:
        raise RuntimeError("rotary attention_scaling %r" % model.model.rotary_emb.attention_scaling)
    return worst


def eos_set(eos):
    return set(eos if isinstance(eos, list) else [eos])


def write_logits(path, rows):
    import torch
    a = array.array("f", rows.to(torch.float32).reshape(-1).tolist())
    if sys.byteorder != "little":
        a.byteswap()
    with open(path, "wb") as f:
        a.tofile(f)


def write_golden(path, golden):
    """One key per line, lists kept on their line."""
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(" %s: %s" % (json.dumps(k), json.dumps(v)) for k, v in golden.items()) + "\n}\n")


def make_fixture(fx, outdir):
    import torch
    import transformers
    from transformers import LlamaForCausalLM
    name = fx["name"]
    fdir = os.path.join(outdir, name)
    hf_dir = os.path.join(fdir, "hf")
    n = fx["new_tokens"]
    for attempt in range(MAX_ATTEMPTS):
        seed = fx["seed"] + attempt
        torch.manual_seed(seed)
        model = LlamaForCausalLM(make_config(fx)).to(torch.float32).eval()
        fill_weights(model, seed, fx["initializer_range"])
        prompt = make_prompt(fx, seed)
        tokens, rows = greedy(model, prompt, n, screen=True)
        gmin = min(gap_ratios(rows))
        distinct = len(set(tokens))
        if gmin < GAP_MIN or distinct < MIN_DISTINCT_TOKENS:
            log("  %s seed %d: min top-2 gap %.3g x max|logit|, %d distinct tokens: next seed" % (
                name, seed, gmin, distinct))
            continue
        ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if os.path.exists(fdir):
            shutil.rmtree(fdir)
        os.makedirs(fdir)
        files = save_checkpoint(model, hf_dir, fx)
        del model
        cfg_path = os.path.join(hf_dir, "config.json")
        loaded = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
        if fx["config_form"] != "native":
            rewrite_config(cfg_path, fx, loaded.config)
            loaded = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
        notes = check_config_json(cfg_path, fx)
        for note in notes:
            log("  note: " + note)
        inv_err = check_loaded(loaded, ref, fx)
        tokens2, rows2 = greedy(loaded, prompt, n)
        gaps = gap_ratios(rows2)
        gmin2 = min(gaps)
        if tokens2 != tokens:
            log("  %s seed %d: the saved checkpoint decodes differently (%s vs %s): next seed" % (
                name, seed, tokens2, tokens))
            continue
        if gmin2 < GAP_MIN:
            log("  %s seed %d: saved checkpoint min gap %.3g: next seed" % (name, seed, gmin2))
            continue
        cc = cross_check_generate(loaded, prompt, tokens2, rows2, fx)
        V = fx["config"]["vocab_size"]
        assert rows2.shape == (n, V), rows2.shape
        write_logits(os.path.join(fdir, "golden_logits.bin"), rows2)
        c = fx["config"]
        golden = {
            "prompt_ids": prompt,
            "tokens": tokens2,
            "vocab_size": V,
            "rows": n,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "description": fx["description"],
            "config_form": fx["config_form"],
            "shape": {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"],
                      "n_heads": c["num_attention_heads"], "n_kv_heads": c["num_key_value_heads"],
                      "head_dim": c["head_dim"], "ffn_dim": c["intermediate_size"], "vocab": V,
                      "tied": c["tie_word_embeddings"], "norm_eps": c["rms_norm_eps"]},
            "rope": fx["rope"],
            "eos_token_id": c["eos_token_id"],
            "eos_positions": [i for i, t in enumerate(tokens2) if t in eos_set(c["eos_token_id"])],
            "seed": seed,
            "initializer_range": fx["initializer_range"],
            "min_top2_gap_ratio": gmin2,
            "top2_gap_ratios": gaps,
            "max_abs_logit": rows2.abs().max().item(),
            "logits": "golden_logits.bin: float32 little-endian, rows x vocab_size; row 0 at the last prompt "
                      "position, row i after tokens[0..i-1]; tokens[i] = argmax of row i; eos ignored",
            "computed_with": "float32 on the CPU from the bf16 checkpoint, eager attention, no KV cache",
        }
        if cc is not None:
            golden["generate_cross_check"] = cc
        write_golden(os.path.join(fdir, "golden.json"), golden)
        size = sum(os.path.getsize(os.path.join(dp, x)) for dp, _, fs in os.walk(fdir) for x in fs)
        log("%s: seed %d, prompt %d tokens, %d rows x %d, min top-2 gap %.4g x max|logit|, max|logit| %.3g, "
            "%d distinct tokens, rope inv_freq rel err %.2g, files %s, %d bytes" % (
                name, seed, len(prompt), n, V, gmin2, rows2.abs().max().item(), len(set(tokens2)), inv_err,
                files, size))
        log("  tokens %s" % tokens2)
        return {"name": name, "seed": seed, "min_gap": gmin2, "bytes": size}
    raise RuntimeError("%s: no seed in %d met the top-2 gap rule" % (name, MAX_ATTEMPTS))


def read_safetensors_bf16(hf_dir):
    """Every tensor of every *.safetensors file in hf_dir, bf16 widened to float64 (numpy)."""
    import struct
    import numpy as np
    out = {}
    for fn in sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
        with open(os.path.join(hf_dir, fn), "rb") as f:
            data = f.read()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if v["dtype"] != "BF16":
                raise RuntimeError("%s: %s is %s" % (fn, k, v["dtype"]))
            b, e = v["data_offsets"]
            u = np.frombuffer(data[8 + n + b:8 + n + e], dtype="<u2").astype(np.uint32) << 16
            out[k] = u.view(np.float32).reshape(v["shape"]).astype(np.float64)
    return out


def reference_logits(W, cfg, ids):
    """The Llama forward written out in numpy float64; logits of the last position."""
    import numpy as np
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eps = cfg["rms_norm_eps"]
    rp = cfg.get("rope_parameters")
    if rp is None:
        rp = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        rp["rope_theta"] = cfg["rope_theta"]
    inv = np.array(expected_inv_freq({"config": {"head_dim": hd}, "rope": rp}))
    T = len(ids)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, 1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, 1)[:, None, :]

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(q):  # rotate_half layout: pairs (i, i + hd/2)
        return q * cos + np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = W["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % layer
        h = rms(x, W[p + "input_layernorm.weight"])
        q = rope((h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, n_heads, hd))
        k = rope((h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, n_kv, hd))
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, n_kv, hd)
        o = np.zeros((T, n_heads, hd))
        for head in range(n_heads):
            kv = head // (n_heads // n_kv)
            s = q[:, head] @ k[:, kv].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(1, keepdims=True))
            o[:, head] = (s / s.sum(1, keepdims=True)) @ v[:, kv]
        x = x + o.reshape(T, n_heads * hd) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "mlp.down_proj.weight"].T
    x = rms(x[-1], W["model.norm.weight"])
    return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T


def check_dir(root):
    """Recomputes every golden row of root/*/ with the numpy forward; returns the number of failures."""
    import numpy as np
    bad = 0
    for name in sorted(os.listdir(root)):
        fdir = os.path.join(root, name)
        if not os.path.exists(os.path.join(fdir, "golden.json")):
            continue
        with open(os.path.join(fdir, "golden.json")) as f:
            g = json.load(f)
        with open(os.path.join(fdir, "hf", "config.json")) as f:
            cfg = json.load(f)
        W = read_safetensors_bf16(os.path.join(fdir, "hf"))
        rows = np.fromfile(os.path.join(fdir, "golden_logits.bin"), dtype="<f4")
        rows = rows.reshape(g["rows"], g["vocab_size"]).astype(np.float64)
        ids, worst, same = list(g["prompt_ids"]), 0.0, True
        for i in range(g["rows"]):
            lg = reference_logits(W, cfg, ids)
            worst = max(worst, float(np.abs(lg - rows[i]).max() / np.abs(rows[i]).max()))
            same &= int(np.argmax(lg)) == g["tokens"][i] == int(np.argmax(rows[i]))
            ids.append(g["tokens"][i])
        ok = same and worst < 1e-4
        bad += not ok
        log("%-22s %s, worst row max|diff|/max|golden| %.3g" % (name, "ok" if ok else "MISMATCH", worst))
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--only", nargs="*", default=None, help="fixture names to make (default: all)")
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--check", metavar="DIR", help="only check the fixtures under DIR with numpy")
    args = ap.parse_args()
    if args.check:
        sys.exit(1 if check_dir(args.check) else 0)
    if not args.outdir:
        ap.error("OUTDIR is needed")

    import torch
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    log("torch %s, transformers %s, python %s" % (torch.__version__, transformers.__version__,
                                                  sys.version.split()[0]))
    os.makedirs(args.outdir, exist_ok=True)
    t0 = time.time()
    results, failed = [], []
    for fx in FIXTURES:
        if args.only and fx["name"] not in args.only:
            continue
        try:
            results.append(make_fixture(fx, args.outdir))
        except Exception as e:
            import traceback
            traceback.print_exc()
            failed.append(fx["name"])
            log("%s FAILED: %s: %s" % (fx["name"], type(e).__name__, e))
    total = sum(r["bytes"] for r in results)
    log("made %d fixtures, %d bytes in all, %.1f s" % (len(results), total, time.time() - t0))
    for r in results:
        log("  %-22s seed %-5d min top-2 gap %.4g" % (r["name"], r["seed"], r["min_gap"]))
    if failed:
        log("failed: %s" % ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
