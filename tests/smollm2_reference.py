#!/usr/bin/env python3
"""Greedy decoding of a llama GGUF in plain numpy, the way llama.cpp runs it: weights read and
dequantized by the `gguf` package (gguf.quants), q/k left in the converter's permuted row order and
rotated with llama.cpp's interleaved ("normal") RoPE, tied embeddings, float32 throughout. An
independent reference for what ringllama-pack --gguf + ringllama-generate compute.

    smollm2_reference.py MODEL.gguf PROMPT_IDS(comma separated) MAX_TOKENS

Prints the generated ids on one line (stops after eos).
"""
import sys

import numpy as np

import gguf


def field(r, key):
    return r.fields[key].contents()


def main(path, prompt, max_tokens):
    r = gguf.GGUFReader(path)
    a = "llama."
    n_layers = field(r, a + "block_count")
    n_head = field(r, a + "attention.head_count")
    n_kv = field(r, a + "attention.head_count_kv")
    dim = field(r, a + "embedding_length")
    eps = field(r, a + "attention.layer_norm_rms_epsilon")
    theta = field(r, a + "rope.freq_base")
    eos = field(r, "tokenizer.ggml.eos_token_id")
    hd = dim // n_head
    w = {}
    for t in r.tensors:
        v = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w[t.name] = v.reshape([int(d) for d in reversed(t.shape)]) if v.ndim > 1 or len(t.shape) > 1 else v
    emb = w["token_embd.weight"]
    out = w.get("output.weight", emb)
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)

    def norm(x, g):
        return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * g

    def rope(x, n, pos0):  # x: [T, n * hd]; llama.cpp's normal rope rotates adjacent pairs
        T = x.shape[0]
        ang = np.arange(pos0, pos0 + T)[:, None] * inv[None, :]
        c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x = x.reshape(T, n, hd // 2, 2)
        x0, x1 = x[..., 0], x[..., 1]
        c, s = c[:, None, :], s[:, None, :]
        return np.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(T, n * hd)

    cache_k = [np.zeros((0, n_kv, hd), np.float32) for _ in range(n_layers)]
    cache_v = [np.zeros((0, n_kv, hd), np.float32) for _ in range(n_layers)]

    def forward(new):  # logits after the new tokens, the KV cache extended by them
        pos0, T = cache_k[0].shape[0], len(new)
        x = emb[new]
        mask = np.triu(np.full((T, pos0 + T), -np.inf, dtype=np.float32), pos0 + 1)
        for l in range(n_layers):
            p = f"blk.{l}."
            h = norm(x, w[p + "attn_norm.weight"])
            q = rope(h @ w[p + "attn_q.weight"].T, n_head, pos0).reshape(T, n_head, hd)
            k = rope(h @ w[p + "attn_k.weight"].T, n_kv, pos0).reshape(T, n_kv, hd)
            v = (h @ w[p + "attn_v.weight"].T).reshape(T, n_kv, hd)
            cache_k[l] = np.concatenate([cache_k[l], k])
            cache_v[l] = np.concatenate([cache_v[l], v])
            rep = n_head // n_kv
            k, v = np.repeat(cache_k[l], rep, axis=1), np.repeat(cache_v[l], rep, axis=1)
            s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, v).reshape(T, n_head * hd)
            x = x + o @ w[p + "attn_output.weight"].T
            h = norm(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        return norm(x[-1], w["output_norm.weight"]) @ out.T

    gen = []
    logits = forward(list(prompt))
    for _ in range(max_tokens):
        nxt = int(np.argmax(logits))
        gen.append(nxt)
        if nxt == eos or len(gen) == max_tokens:
            break
        logits = forward([nxt])
    print(" ".join(str(i) for i in gen))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]))
