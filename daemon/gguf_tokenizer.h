// The tokenizer of a GGUF (tokenizer.ggml.* metadata) as the Hugging Face files the store keeps:
// tokenizer.json, which HF `tokenizers` loads and which encodes as the model's original did, and
// tokenizer_config.json (special tokens, add_bos_token, chat_template).
//
// Byte-level BPE (tokenizer.ggml.model "gpt2") is converted; the pre-tokenizer is the one llama.cpp
// runs for the file's tokenizer.ggml.pre, written as HF's own pre-tokenizer objects:
//   llama-bpe, llama3   Llama 3's Split regex + ByteLevel (no regex), ignore_merges
//   smollm              Digits (individual) + ByteLevel (GPT-2 regex), as SmolLM2's tokenizer.json
//   gpt-2, gpt2         ByteLevel (GPT-2 regex)
//   default             llama.cpp's default split regexes in sequence + ByteLevel (no regex)
// Any other pre kind, and SentencePiece ("llama") vocabularies, are refused with one line.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/gguf.h"
#include "common/model_config.h"

namespace ringllama {

// The pre-tokenizer names converted (tokenizer.ggml.pre).
const std::vector<std::string>& gguf_pre_tokenizer_names();

// {name, contents} of tokenizer.json and tokenizer_config.json; nothing when the GGUF has no
// tokenizer.ggml.model at all. Throws StoreError for a vocabulary that cannot be converted.
std::optional<std::vector<std::pair<std::string, std::string>>> gguf_tokenizer_files(const GgufFile& f,
                                                                                     const ModelConfig& m);

}  // namespace ringllama
