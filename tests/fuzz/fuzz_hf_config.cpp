// A Hugging Face config.json (daemon/hf_config.h) as ringllama-pack reads it: parse_hf_config on
// the file's text, StoreError for anything this engine cannot run. A config that parses is a
// valid ModelConfig, and the packer goes on to lay out the store from it (Manifest::plan) and the
// backends compute RoPE frequencies from it: both must work for every accepted config.
#include <cmath>
#include <cstdint>
#include <string>

#include "common/errors.h"
#include "common/manifest.h"
#include "daemon/hf_config.h"
#include "tests/fuzz/fuzz_util.h"

using namespace ringllama;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::run_expecting<StoreError>("hf_config", [&] {
    const ModelConfig m = parse_hf_config(text, "config.json");
    try {
      m.validate();
    } catch (const StoreError& e) {
      fuzz::finding(std::string("hf_config: accepted a config that does not validate: ") + e.what());
    }
    for (double f : rope_inv_freq(m)) fuzz::expect(std::isfinite(f) && f > 0, "hf_config: RoPE frequency not finite");
    // The layout of a model the parser accepts must be computable (its bounds keep products in 63 bits).
    const Manifest plan = Manifest::plan(m, "hf:fuzz");
    fuzz::expect(plan.groups.size() == 1 + 2 * static_cast<size_t>(m.n_layers), "hf_config: planned group count");
  });
  return 0;
}
