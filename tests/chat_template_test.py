#!/usr/bin/env python3
"""Chat templates rendered by ringllama-tokenize --chat against jinja2, byte for byte.

    chat_template_test.py TOKENIZE_BINARY TEMPLATES_DIR

Every tokenizer_config.json under TEMPLATES_DIR (tests/data/chat_templates: the templates the
models publish) becomes a store folder; every conversation below is rendered by the binary and by
jinja2 the way transformers' apply_chat_template renders it (trim_blocks, lstrip_blocks,
loopcontrols, raise_exception, tojson, strftime_now, the special tokens as variables, tools=None),
with add_generation_prompt on and off. Where the template raises, the binary must fail too.
date_string is passed as "26 Jul 2024", the date the Llama 3.1/3.2 templates fall back to: without
it Llama 3.2's template would print today's date and no fixed prompt could be compared.
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

binary, templates_dir = sys.argv[1:3]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def jinja_render(config, messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    tokens = {}
    for key in ("bos_token", "eos_token"):
        v = config.get(key)
        if isinstance(v, dict):
            v = v["content"]
        if v is not None:
            tokens[key] = v
    template = env.from_string(config["chat_template"])
    return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                           date_string="26 Jul 2024", **tokens)


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [m("user", "Hello!")],
    [m("system", "You are terse."), m("user", "What is 2+2?")],
    [m("system", "Answer in French."), m("user", "Hi"), m("assistant", "Bonjour !"), m("user", "How are you?")],
    [m("user", "first"), m("assistant", "second"), m("user", "third")],
    [m("user", "question"), m("assistant", "an answer to end on")],
    # Unicode, and whitespace that trim and strip() remove (Python's notion: NBSP, U+3000, NEL, LS)
    # or keep (zero-width space).
    [m("system", " \u00a0Réponds en français 🙂\u3000"), m("user", "\n\t日本語のテキスト\u2028 "),
     m("assistant", "\u0085مرحبا\u200b"), m("user", "ẞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301\u205f")],
    # Empty content.
    [m("system", ""), m("user", "")],
    [m("user", "")],
    [m("user", " "), m("assistant", ""), m("user", "x")],
    # Text that looks like markup must come out as it is.
    [m("user", "{{ not a template }} {% raw %} '<|eot_id|>' \"[INST]\" <<SYS>> \\n")],
    # A system message later on, and roles that do not alternate (llama2 refuses these).
    [m("user", "a"), m("system", "b"), m("user", "c")],
    [m("user", "a"), m("user", "b")],
    [m("system", "s"), m("assistant", "a")],
]


def run(store, messages, add_generation_prompt, extra=()):
    body = json.dumps({"messages": messages, "add_generation_prompt": add_generation_prompt})
    return subprocess.run([binary, "--store", store, "--chat", *extra], input=body.encode(), capture_output=True,
                          timeout=60)


def store_for(config, tmp, name):
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return d


def check(store, config, label, extra=()):
    """Every conversation through the binary and through jinja2; returns (compared, refused)."""
    compared = refused = 0
    for i, conv in enumerate(CONVERSATIONS):
        for agp in (True, False):
            try:
                want = jinja_render(config, conv, agp)
            except jinja2.exceptions.TemplateError as e:
                want = e
            r = run(store, conv, agp, extra)
            where = f"{label}: conversation {i} add_generation_prompt={agp}"
            if isinstance(want, Exception):
                assert r.returncode != 0, f"{where}: the template raises ({want}) but the binary printed {r.stdout!r}"
                assert str(want) in r.stderr.decode(), f"{where}: {r.stderr!r} does not say {want}"
                refused += 1
                continue
            assert r.returncode == 0, f"{where}: exit {r.returncode}: {r.stderr.decode()}"
            got = r.stdout.decode("utf-8")
            assert got == want, f"{where}:\n binary: {got!r}\n jinja2: {want!r}"
            compared += 1
    return compared, refused


def main():
    configs = {}
    for name in sorted(os.listdir(templates_dir)):
        if name.endswith(".json"):
            with open(os.path.join(templates_dir, name), encoding="utf-8") as f:
                configs[name[:-5]] = json.load(f)
    total = refused = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            store = store_for(config, tmp, name)
            if name == "mistral":
                # No known family: refused with a message that names the override.
                r = run(store, CONVERSATIONS[0], True)
                assert r.returncode != 0 and b"--chat-template" in r.stderr, r
                continue
            c, x = check(store, config, name)
            total += c
            refused += x
        # The override renders the named family's template, with the store's own bos/eos strings.
        for override, family in (("llama3", "llama3"), ("llama3.1", "llama31"), ("chatml", "chatml"),
                                 ("llama2", "llama2")):
            target = dict(configs[family])
            target["bos_token"], target["eos_token"] = configs["mistral"]["bos_token"], configs["mistral"]["eos_token"]
            c, x = check(store_for(configs["mistral"], tmp, "mistral"), target, f"--chat-template {override}",
                         ("--chat-template", override))
            total += c
            refused += x
        # A store without a template says so and names the override.
        empty = os.path.join(tmp, "empty")
        os.makedirs(empty)
        r = run(empty, CONVERSATIONS[0], True)
        assert r.returncode != 0 and b"no chat template" in r.stderr and b"--chat-template" in r.stderr, r
    assert total > 200 and refused > 0, (total, refused)
    print(f"chat templates: {len(configs)} templates, {total} renders equal to jinja2, {refused} refusals as jinja2 raises")


if __name__ == "__main__":
    main()
