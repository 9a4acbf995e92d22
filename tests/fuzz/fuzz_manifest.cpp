// The store's manifest.yaml (common/manifest.h): Manifest::load reads the file and hands its text
// to Manifest::from_yaml, which throws StoreError for anything wrong. A manifest that parses
// must survive its own round trip: to_yaml, then from_yaml, gives the same manifest.
#include <cstdint>
#include <string>

#include "common/errors.h"
#include "common/manifest.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

namespace {

bool same(const Manifest& a, const Manifest& b) {
  if (a.format != b.format || a.source != b.source || a.weights_size != b.weights_size ||
      a.tokenizer_files != b.tokenizer_files || a.groups.size() != b.groups.size())
    return false;
  const ModelConfig& x = a.model;
  const ModelConfig& y = b.model;
  if (x.dim != y.dim || x.n_layers != y.n_layers || x.n_heads != y.n_heads || x.n_kv_heads != y.n_kv_heads ||
      x.head_dim != y.head_dim || x.ffn_dim != y.ffn_dim || x.vocab_size != y.vocab_size ||
      x.max_position_embeddings != y.max_position_embeddings || x.norm_eps != y.norm_eps ||
      x.rope_theta != y.rope_theta || x.rope_scaling.type != y.rope_scaling.type ||
      x.rope_scaling.factor != y.rope_scaling.factor || x.tie_word_embeddings != y.tie_word_embeddings ||
      x.bos_id != y.bos_id || x.eos_ids != y.eos_ids)
    return false;
  for (size_t i = 0; i < a.groups.size(); ++i)
    if (a.groups[i].xxh3 != b.groups[i].xxh3 || a.groups[i].offset != b.groups[i].offset ||
        a.groups[i].size != b.groups[i].size || a.groups[i].tensors.size() != b.groups[i].tensors.size())
      return false;
  for (size_t i = 0; i < a.groups.size(); ++i)
    for (size_t j = 0; j < a.groups[i].tensors.size(); ++j) {
      const TensorEntry& s = a.groups[i].tensors[j];
      const TensorEntry& t = b.groups[i].tensors[j];
      if (!(s.format() == t.format()) || s.offset != t.offset || s.size != t.size || s.scales_offset != t.scales_offset ||
          s.scales_size != t.scales_size)
        return false;
    }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::run_expecting<StoreError>("manifest", [&] {
    const Manifest m = Manifest::from_yaml(text, "manifest.yaml");
    // What the loader accepted, the readers use: sizes and offsets must be consistent.
    fuzz::expect(m.groups.size() == 1 + 2 * static_cast<size_t>(m.model.n_layers), "manifest: group count");
    uint64_t max_layer = m.max_layer_size();
    fuzz::expect(max_layer <= m.weights_size, "manifest: a layer larger than weights.bin");
    // Every tensor, scales included, lies inside its group: the readers index them without checks.
    for (const GroupEntry& g : m.groups)
      for (const TensorEntry& t : g.tensors) fuzz::expect(t.end() <= g.size, "manifest: a tensor outside its group");
    Manifest again;
    try {
      again = Manifest::from_yaml(m.to_yaml(), "round trip");
    } catch (const StoreError& e) {
      fuzz::finding(std::string("manifest: its own to_yaml does not parse: ") + e.what());
    }
    fuzz::expect(same(m, again), "manifest: round trip changed the manifest");
  });
  return 0;
}
