"""A deterministic corpus of texts that stress a tokenizer, for tests/tokenizer_corpus_test.py and
scripts/bench-tokenizer.py: English and other scripts (CJK, Arabic, Devanagari, ...), emoji and
ZWJ sequences, runs of spaces, tabs and newlines, digits of every length, code, contractions in
every case, special-token strings, unusual Unicode (controls, combining marks, noncharacters,
private use, every kind of space) and empty strings.

    python3 scripts/tokenizer_corpus.py [--seed N] [--count N]   # one JSON string per line
"""
import argparse
import json
import random

WORDS = ("the quick brown fox jumps over lazy dog tokenizer model layer window weights stream "
         "request batch hello world Python CamelCase snake_case URL http https www example com "
         "naïve café résumé façade Straße ÆØÅ œuvre").split()
SCRIPTS = [
    "中文分词测试，这是一个句子。", "日本語のテキストです。カタカナとひらがな", "한국어 문장입니다 안녕하세요",
    "العربية نص تجريبي، مرحبا بالعالم", "हिन्दी पाठ नमस्ते दुनिया क्षत्रिय", "Русский текст, привет мир",
    "Ελληνικά κείμενο γειά σου", "ภาษาไทยสวัสดีครับ", "עברית שלום עולם", "Tiếng Việt có dấu",
    "ꦗꦮ ᠮᠣᠩᠭᠣᠯ ትግርኛ ᏣᎳᎩ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛", "Ⅻ ½ ² ³ ¼ ٣ ४ 三",
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇯🇵", "1️⃣", "❤️", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🤖", "🫠", "☺︎", "🏴󠁧󠁢󠁳󠁣󠁴󠁿"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\n \n", "\u00a0", "\u2003", "\u3000",
          "\u180e", "\u200b", "\ufeff", "\u0085", "\u2028", "\u2029", "\u001c", "\u000b", "\u000c", " \t\n"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>", "<|begin_of", "<|eot_id",
            "<|reserved_special_token_5|>", "<|python_tag|>", "[INST]", "<|fim_prefix|>"]
CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b"}}',
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "x = [i for i in range(10) if i % 2 == 0]",
    "    if (a && b || !c) { return -1; }\n\n",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "$ ls -la | grep '^d' && echo \"done\"",
    "fn main() { let v: Vec<u8> = vec![0xFF; 3]; }",
]
ODD = ["\u0000", "\u0001\u0002", "\u007f", "\u0080\u009f", "e\u0301\u0302\u0303", "Z\u0351\u0352\u0353\u0354",
       "\u200d", "\u200c", "\u200e\u200f", "\ue000\uf8ff", "\ufffe\uffff", "\U0010ffff", "\ufffd", "\U000e0041",
       "\u00ad", "\u2060", "\U0001f3fb", "\u0300", "a\u0308", "\u0345", "ſt", "\u212a", "ﬁ", "Ꭰ", "İ", "ǅ"]


def _digits(rng):
    n = rng.randint(1, 40)
    return "".join(rng.choice("0123456789") for _ in range(n))


def _contraction(rng):
    c = rng.choice(CONTRACTIONS)
    c = "".join(ch.upper() if rng.random() < 0.5 else ch for ch in c)
    return rng.choice(WORDS) + c


def _fragment(rng):
    kind = rng.randrange(12)
    if kind == 0:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
    if kind == 1:
        s = rng.choice(SCRIPTS)
        a = rng.randrange(len(s))
        return s[a:a + rng.randint(1, len(s))]
    if kind == 2:
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4)))
    if kind == 3:
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 5)))
    if kind == 4:
        return _digits(rng)
    if kind == 5:
        return rng.choice(CODE)
    if kind == 6:
        return _contraction(rng)
    if kind == 7:
        return rng.choice(SPECIALS)
    if kind == 8:
        return rng.choice(ODD)
    if kind == 9:
        return rng.choice("!?.,;:-_=+*/\\|@#$%^&~`()[]{}<>\"'") * rng.randint(1, 12)
    if kind == 10:
        return rng.choice(WORDS).upper() + rng.choice(["", ".", "!", "?", ","])
    return chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0x2fff), rng.randint(0x3000, 0xd7ff),
                           rng.randint(0xe000, 0xffff), rng.randint(0x10000, 0x10ffff)]))


def corpus(seed=1234, count=2400):
    """count texts (at least 2000 by default), the same for the same seed."""
    rng = random.Random(seed)
    out = ["", "", " ", "\n", "a", "Hello, world!", "I'm sure it's fine, they'LL say; we'RE 'S 'T 'Ve 'M 'D"]
    out += [d * n for d in "0123456789" for n in (1, 2, 3, 4, 7)]
    out += ["".join(str((i * 7 + k) % 10) for k in range(n)) for i, n in enumerate(range(1, 41))]
    out += [" " * n for n in (2, 5, 17, 64)] + ["\t" * 9, "\n" * 12, " \n" * 6, "x" + " " * 30 + "y"]
    out += SPECIALS + [s + "text" for s in SPECIALS] + ["a" + s + " b" for s in SPECIALS]
    while len(out) < count:
        parts = [_fragment(rng) for _ in range(rng.randint(1, 12))]
        sep = rng.choice(["", " ", "", "\n", rng.choice(SPACES)])
        out.append(sep.join(parts))
    return out[:count]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--count", type=int, default=2400)
    a = ap.parse_args()
    for s in corpus(a.seed, a.count):
        print(json.dumps(s))


if __name__ == "__main__":
    main()
