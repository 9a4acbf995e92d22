#!/usr/bin/env python3
"""Text in and out, against two running workers (started by test_worker's TextAndChat): one on a
store with a tokenizer (tests/make_test_tokenizer.py) and Llama 3.2's chat template, one on the same
weights without them. Hugging Face tokenizers and jinja2 are the reference: a text prompt must
generate what its ids generate, a chat what the ids of its jinja2 rendering generate; the text
pieces must join into tokenizers' decode of the tokens; a chat stops at <|eot_id|>. Then the same
through the client's command line and through ringllama-generate --prompt / --chat.

    worker_text_test.py SCRIPTS_DIR BIN_DIR TEXT_STORE PLAIN_STORE ENDPOINT_TEXT ENDPOINT_PLAIN TEMPLATE_JSON
"""
import json
import os
import subprocess
import sys
import tempfile

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

scripts, bin_dir, text_store, plain_store, ep_text, ep_plain, template_json = sys.argv[1:8]
sys.path.insert(0, scripts)
from ringllama_client import Client, WorkerError  # noqa: E402

EOT, EOS = 3, 2
tok = Tokenizer.from_file(os.path.join(text_store, "tokenizer.json"))
with open(template_json, encoding="utf-8") as f:
    template = json.load(f)["chat_template"]


def render(messages):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(jinja2.exceptions.TemplateError(msg))
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<|begin_of_text|>",
                                            eos_token="<|end_of_text|>", date_string="26 Jul 2024")


def decode(ids):
    return tok.decode(ids, skip_special_tokens=True)


def check_text(g, where):
    """The pieces of a finished generation join into its done text and into tokenizers' decode."""
    assert None not in g.pieces, f"{where}: a token without text"
    joined = "".join(g.pieces)
    assert joined == g.done["text"], f"{where}: pieces {joined!r} != done text {g.done['text']!r}"
    assert joined == decode(g.tokens), f"{where}: {joined!r} != tokenizers' {decode(g.tokens)!r}"


PROMPT = "Hello! How are you? Ça va, 日本 🙂"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Où est la gare ? 🚀"}]
N = 24

with Client([ep_text], timeout=60) as c:
    # A text prompt is its tokenizer ids, bos included.
    ids = tok.encode(PROMPT).ids
    assert ids[0] == 1, ids
    g = c.generate(PROMPT, N, ignore_eos=True)
    pieces = list(g.text_pieces())
    ref = c.generate(ids, N, ignore_eos=True)
    assert g.tokens == ref.result() and len(g.tokens) == N, (g.tokens, ref.tokens)
    assert g.done["usage"]["prompt_tokens"] == len(ids), g.done
    assert pieces == g.pieces
    check_text(g, "text prompt")
    check_text(ref, "ids prompt")  # ids requests get text too where the model has a tokenizer
    prompt_text = g.done["text"]

    # A chat is the ids of its rendering, which the template starts with bos (not added twice).
    chat_ids = tok.encode(render(MESSAGES), add_special_tokens=False).ids
    assert chat_ids.count(1) == 1, chat_ids
    g = c.generate(messages=MESSAGES, max_tokens=N, ignore_eos=True)
    assert g.result() == c.generate(chat_ids, N, ignore_eos=True).result(), g.tokens
    assert g.done["usage"]["prompt_tokens"] == len(chat_ids)
    check_text(g, "chat")
    chat_text = g.done["text"]
    assert g.result_text() == chat_text

    # A chat stops at the template's end of turn: find a sampled reply that draws <|eot_id|> before
    # eos, then ask again without ignore_eos.
    found = None
    gens = {seed: c.generate(messages=MESSAGES, max_tokens=48, temperature=1.5, seed=seed, ignore_eos=True)
            for seed in range(64)}
    for seed, x in gens.items():
        toks = x.result()
        ends = [i for i, t in enumerate(toks) if t in (EOT, EOS)]
        if ends and toks[ends[0]] == EOT and ends[0] < 40:
            found = (seed, toks, ends[0])
            break
    assert found, "no sampled reply drew <|eot_id|>: pick other seeds"
    seed, toks, k = found
    g = c.generate(messages=MESSAGES, max_tokens=48, temperature=1.5, seed=seed)
    assert g.result() == toks[:k + 1] and g.done["reason"] == "eos", (g.tokens, toks, k, g.done)
    check_text(g, "chat to its end of turn")
    assert "<|eot_id|>" not in g.done["text"], g.done  # special tokens have no text
    # The same ids as a plain prompt do not stop there: the end of turn belongs to chats.
    g = c.generate(chat_ids, 48, temperature=1.5, seed=seed)
    assert g.result()[:k + 1] == toks[:k + 1] and len(g.tokens) > k + 1, (g.tokens, toks, k)
    eot_seed, eot_tokens = seed, toks[:k + 1]

    # Bad chats are refused with what is wrong.
    for bad, says in (([{"role": "user"}], "'content' must be a string"), ([], "'messages' is empty"),
                      ([{"role": "tool", "content": "x"}], "role 'tool'")):
        try:
            c.generate(messages=bad, max_tokens=4).result()
            raise AssertionError(f"{bad} was accepted")
        except WorkerError as e:
            assert e.code == "bad_request" and says in e.message, e
    health = c.health()
    assert health["detail"]["chat_template"] == "llama3.1" and health["detail"]["tokenizer"], health

with Client([ep_plain], timeout=60) as c:
    # Without a tokenizer: text and chats are refused, ids still served, without text.
    for kw in ({"prompt": PROMPT}, {"messages": MESSAGES}):
        try:
            c.generate(max_tokens=4, **kw).result()
            raise AssertionError("a text request was served without a tokenizer")
        except WorkerError as e:
            assert e.code == "bad_request" and "this model has no tokenizer: send prompt_ids" in e.message, e
    g = c.generate(ids, 4, ignore_eos=True)
    assert g.result() and g.pieces == [None] * 4 and "text" not in g.done, (g.pieces, g.done)
    try:
        list(c.generate(ids, 2).text_pieces())
        raise AssertionError("text_pieces of a worker without a tokenizer")
    except ValueError:
        pass


def run(cmd):
    return subprocess.run(cmd, capture_output=True, timeout=300)


client = [sys.executable, os.path.join(scripts, "ringllama_client.py"), "--endpoint", ep_text, "--max-tokens", str(N),
          "--ignore-eos"]
r = run(client + ["--prompt", PROMPT])
assert r.returncode == 0 and r.stdout.decode() == prompt_text + "\n", (r.stdout, prompt_text, r.stderr)
r = run(client + ["--chat", MESSAGES[1]["content"], "--system", MESSAGES[0]["content"]])
assert r.returncode == 0 and r.stdout.decode() == chat_text + "\n", (r.stdout, chat_text, r.stderr)

generate = [os.path.join(bin_dir, "ringllama-generate"), "--store", text_store, "--backend", "cpu"]
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "tokens")
    r = run(generate + ["--prompt", PROMPT, "--max-tokens", str(N), "--ignore-eos"])
    assert r.returncode == 0 and r.stdout.decode() == prompt_text + "\n", (r.stdout, prompt_text, r.stderr)
    r = run(generate + ["--chat", MESSAGES[1]["content"], "--system", MESSAGES[0]["content"], "--max-tokens", str(N),
                        "--ignore-eos"])
    assert r.returncode == 0 and r.stdout.decode() == chat_text + "\n", (r.stdout, chat_text, r.stderr)
    r = run(generate + ["--chat", MESSAGES[1]["content"], "--system", MESSAGES[0]["content"], "--max-tokens", "48",
                        "--temperature", "1.5", "--seed", str(eot_seed), "--tokens-out", out])
    with open(out) as f:
        got = [int(x) for x in f.read().split()]
    assert r.returncode == 0 and got == eot_tokens, (got, eot_tokens, r.stderr)
    assert r.stdout.decode() == decode(eot_tokens) + "\n", r.stdout
    # The override names a family; a store without a tokenizer says to give ids.
    r = run(generate + ["--chat", "hi", "--chat-template", "vicuna"])
    assert r.returncode == 1 and b"llama3, llama3.1, chatml, llama2" in r.stderr, r.stderr
    r = run([os.path.join(bin_dir, "ringllama-generate"), "--store", plain_store, "--backend", "cpu", "--prompt", "x"])
    assert r.returncode == 1 and b"no tokenizer" in r.stderr and b"--prompt-ids" in r.stderr, r.stderr
print("ok")
