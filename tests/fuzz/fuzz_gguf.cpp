// A GGUF file (common/gguf.h) as ringllama-pack reads one: GgufFile::parse on the bytes, then what
// the packer derives from it: the model config (daemon/gguf_model.h), the tokenizer files
// (daemon/gguf_tokenizer.h), and the tensors' data dequantized block by block. StoreError is the
// documented outcome of a bad file.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/errors.h"
#include "common/gguf.h"
#include "daemon/gguf_model.h"
#include "daemon/gguf_tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {
// Enough blocks to reach every dequantizer's inner loop without making a run slow.
constexpr uint64_t kMaxBlocks = 64;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::run_expecting<StoreError>("gguf", [&] {
    const GgufFile f = GgufFile::parse(data, size, "fuzz.gguf");
    for (const GgufKv& kv : f.kvs()) (void)kv.value.type_text();
    for (const GgufTensorInfo& t : f.tensors()) {
      uint64_t end = 0;
      fuzz::expect(!__builtin_add_overflow(f.data_offset(), t.offset, &end) &&
                       !__builtin_add_overflow(end, t.bytes, &end) && end <= size,
                   "gguf: tensor '" + t.name + "' lies outside the file");
      (void)t.shape();
      uint64_t block_elems = 0, block_bytes = 0;
      if (!gguf_type_packable(t.type) || !ggml_type_layout(static_cast<uint32_t>(t.type), &block_elems, &block_bytes))
        continue;
      const uint64_t blocks = std::min(kMaxBlocks, t.bytes / block_bytes);
      std::vector<unsigned char> raw(blocks * block_bytes);
      f.read(t, 0, raw.size(), raw.data());
      std::vector<float> out(blocks * block_elems);
      dequantize_blocks(t.type, raw.data(), blocks, out.data());
    }
    const ModelConfig m = gguf_model_config(f);
    (void)gguf_tokenizer_files(f, m);
  });
  return 0;
}
