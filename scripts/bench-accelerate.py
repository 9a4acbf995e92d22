#!/usr/bin/env python3
"""The baseline ringllama is measured against: Hugging Face transformers with accelerate offload.

  scripts/bench-accelerate.py make CKPT [--layers N]
      writes a random-weight Llama-3.1-8B checkpoint (LlamaForCausalLM from a LlamaConfig of the
      published shape, bf16, save_pretrained) to CKPT; ringllama-pack --hf CKPT packs the same
      weights, so both engines run the same model.
  scripts/bench-accelerate.py time CKPT [--gpu-gib 4] [--batch 1] [--prompt 16] [--tokens 8]
      loads CKPT with device_map="auto" and max_memory {GPU: gpu-gib GiB, cpu: the rest} (the layers
      that do not fit stay in host memory and are moved to the GPU as each runs), decodes greedily and
      prints one line: "accelerate: decode X tokens/s at batch B, prefill Y tokens/s".

Needs torch, transformers and accelerate; touches no model hub.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def llama31_8b_config(layers):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})


def make(args):
    import torch
    from transformers import LlamaForCausalLM
    cfg = llama31_8b_config(args.layers)
    t0 = time.time()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Scales that keep activations finite and varied through every layer (as the packer's
            # random shapes): norms near 1, projections ~ 1/sqrt(fan-in), outputs of a block smaller.
            if p.dim() == 1:
                v = 1 + 0.05 * torch.randn(p.shape, generator=gen, device=dev)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=gen, device=dev)
            else:
                scale = (0.5 if ("o_proj" in name or "down_proj" in name) else 1.0) / p.shape[1] ** 0.5
                v = scale * torch.randn(p.shape, generator=gen, device=dev)
            p.copy_(v.to(torch.bfloat16).cpu())
    model.save_pretrained(args.ckpt, safe_serialization=True, max_shard_size="5GB")
    size = sum(os.path.getsize(os.path.join(args.ckpt, f)) for f in os.listdir(args.ckpt))
    print(f"wrote {args.ckpt}: {args.layers} layers, {size / 1e9:.2f} GB in {time.time() - t0:.1f} s")


def time_offload(args):
    import torch
    from transformers import LlamaForCausalLM
    t0 = time.time()
    model = LlamaForCausalLM.from_pretrained(
        args.ckpt, dtype=torch.bfloat16, device_map="auto",
        max_memory={0: f"{args.gpu_gib}GiB", "cpu": "200GiB"})
    model.eval()
    print(f"loaded in {time.time() - t0:.1f} s; device map: "
          f"{sum(1 for d in model.hf_device_map.values() if str(d) in ('0', 'cuda:0'))} modules on the GPU, "
          f"{sum(1 for d in model.hf_device_map.values() if str(d) == 'cpu')} offloaded", flush=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128000, (args.batch, args.prompt), generator=gen).to("cuda:0")
    with torch.no_grad():
        torch.cuda.synchronize()
        t = time.time()
        out = model(input_ids=ids, use_cache=True)
        torch.cuda.synchronize()
        prefill_s = time.time() - t
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.time()
        for _ in range(args.tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        decode_s = time.time() - t
    print(f"accelerate: decode {args.batch * args.tokens / decode_s:.3f} tokens/s at batch {args.batch}, "
          f"prefill {args.batch * args.prompt / prefill_s:.1f} tokens/s "
          f"({args.tokens} steps in {decode_s:.1f} s, GPU capped at {args.gpu_gib} GiB)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("ckpt")
    m.add_argument("--layers", type=int, default=32)
    t = sub.add_parser("time")
    t.add_argument("ckpt")
    t.add_argument("--gpu-gib", type=float, default=4)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--prompt", type=int, default=16)
    t.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    make(args) if args.cmd == "make" else time_offload(args)


if __name__ == "__main__":
    sys.exit(main())
