// ringllama-quality: how much packing (fp8, int4) changes a model, measured on a text.
//
//   ringllama-quality --text FILE --reference BF16_STORE STORE... [--tokens N]
//
// Every store reads the text teacher-forced on the CPU backend (the reference store's tokenizer
// encodes it); the table gives each store's perplexity and the share of positions where its most
// likely next token is the reference's.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <set>

#include "common/errors.h"
#include "common/manifest.h"
#include "common/store.h"
#include "common/tokenizer.h"
#include "worker/quality.h"

namespace {

// "bf16", "fp8_e4m3", "int4 g32", or a mix ("int4 g128 + bf16") of the store's linear weights.
std::string weights_of(const std::string& dir) {
  const ringllama::Manifest m = ringllama::Store::open(dir).manifest();
  std::set<std::string> kinds;
  for (const auto& g : m.groups)
    for (const auto& t : g.tensors)
      if (ringllama::tensor_packable(t.name))
        kinds.insert(t.dtype == ringllama::DType::INT4 ? fmt::format("int4 g{}", t.group_size)
                                                       : ringllama::dtype_name(t.dtype));
  return fmt::format("{}", fmt::join(kinds, " + "));
}

int run(int argc, char** argv) {
  CLI::App app{"Perplexity and top-1 agreement of packed stores against a bf16 store, on a text."};
  std::string text_file, reference;
  std::vector<std::string> stores;
  int64_t max_tokens = 0;
  app.add_option("--text", text_file, "UTF-8 text to read")->required()->check(CLI::ExistingFile);
  app.add_option("--reference", reference, "the bf16 store the others are compared with")->required();
  app.add_option("stores", stores, "stores to compare (packed from the same model)");
  app.add_option("--tokens", max_tokens, "read only the first N tokens of the text (default: all)")
      ->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "ringllama-quality: error: %s\n", e.what());
    return 1;
  }
  const auto tok = ringllama::Tokenizer::require_store(reference);
  std::vector<int32_t> ids = tok->encode(ringllama::read_regular_file(text_file, uint64_t{64} << 20));
  if (max_tokens > 0 && static_cast<int64_t>(ids.size()) > max_tokens) ids.resize(static_cast<size_t>(max_tokens));
  RL_REQUIRE(ids.size() >= 2, "{}: fewer than 2 tokens", text_file);

  std::cout << fmt::format("{}: {} tokens\n", text_file, ids.size());
  std::cout << fmt::format("{:<40} {:<18} {:>10} {:>11} {:>9} {:>7}\n", "store", "linear weights", "top-1 agr",
                           "perplexity", "vs ref", "s");
  auto t0 = std::chrono::steady_clock::now();
  const ringllama::TextScore ref = ringllama::score_store(reference, ids);
  auto secs = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  std::cout << fmt::format("{:<40} {:<18} {:>9.2f}% {:>11.4f} {:>8.2f}% {:>7.1f}\n", reference, weights_of(reference),
                           100.0, ref.perplexity(), 0.0, secs())
            << std::flush;
  for (const std::string& s : stores) {
    t0 = std::chrono::steady_clock::now();
    const ringllama::TextScore got = ringllama::score_store(s, ids);
    std::cout << fmt::format("{:<40} {:<18} {:>9.2f}% {:>11.4f} {:>+8.2f}% {:>7.1f}\n", s, weights_of(s),
                             100.0 * ringllama::top1_agreement(got, ref), got.perplexity(),
                             100.0 * (got.perplexity() / ref.perplexity() - 1.0), secs())
              << std::flush;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return ringllama::run_main("ringllama-quality", run, argc, argv); }
