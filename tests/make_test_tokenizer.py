#!/usr/bin/env python3
"""Gives a packed test store a small tokenizer: a byte-level BPE tokenizer.json trained here with
Hugging Face tokenizers in Llama 3's shape (its split regex, then ByteLevel; <|begin_of_text|> added
by the post-processor) and a tokenizer_config.json carrying a chat template, so that the text paths
of the worker and of ringllama-generate run on the tiny random models of the tests.

    make_test_tokenizer.py STORE_DIR VOCAB_SIZE CHAT_TEMPLATE_JSON

VOCAB_SIZE is the model's (the tokenizer's ids stay below it). The special tokens take ids 0-5:
<|pad|>, <|begin_of_text|> (1, the tiny model's bos), <|end_of_text|> (2, its eos), <|eot_id|>,
<|start_header_id|>, <|end_header_id|>; then the 256 byte tokens, then merges. The chat template and
its bos/eos strings come from CHAT_TEMPLATE_JSON (one of tests/data/chat_templates).
"""
import json
import os
import sys

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>"]
# Llama 3's pre-tokenizer split.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Once upon a time there was a small model that streamed its layers from a disk.",
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "Réponds en français, s'il te plaît : où est la gare ? Ça va très bien, merci.",
    "日本語のテキストと絵文字 🙂🚀 も少しだけ。Καλημέρα κόσμε. Привет, мир!",
    "def main():\n    return 42  # numbers 1234567890 and symbols {}[]()<>=+-*/",
]


def main():
    store, vocab, template_json = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", 1)])
    assert tok.get_vocab_size() <= vocab, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    tok.save(os.path.join(store, "tokenizer.json"))
    with open(template_json, encoding="utf-8") as f:
        template = json.load(f)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "chat_template": template["chat_template"]}
    with open(os.path.join(store, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
