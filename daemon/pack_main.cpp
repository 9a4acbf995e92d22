// ringllama-pack: Hugging Face Llama folder, GGUF file or built-in random shape -> packed store; --verify.
//
//   ringllama-pack --hf DIR --out STORE [--force]
//   ringllama-pack --gguf FILE --out STORE [--force]
//   ringllama-pack --random SHAPE --out STORE [--seed N] [--layers N] [--tokenizer FILE] [--force]
//   ringllama-pack --verify STORE
//   any pack: [--weights bf16|fp8|int4] [--group-size 32|128] [--scales auto|search|minmax]
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "common/config.h"
#include "common/errors.h"
#include "common/log.h"
#include "common/tokenizer.h"
#include "daemon/pack.h"
#include "daemon/random_model.h"

namespace {

// The one thing a signal handler may touch: the write loop polls it and fails cleanly, which
// removes the temporary directory.
std::atomic<bool> g_interrupted{false};

// A second signal (say, Ctrl-C while a long fsync runs) ends the process at once.
void on_signal(int sig) {
  g_interrupted.store(true);
  std::signal(sig, SIG_DFL);
}

int run(int argc, char** argv) {
  CLI::App app{"Packs a Llama model into a ringllama store, or checks one."};
  std::string hf, gguf, shape, verify, out, tokenizer;
  uint64_t seed = 0;
  int64_t layers = 0;
  int threads = 0;
  int64_t group_size = 0;
  std::string weights = "bf16";
  std::string scales = "auto";
  bool force = false, quiet = false;
  ringllama::ConfigLoader config_loader(ringllama::kPack);

  auto* o_hf = app.add_option("--hf", hf, "Hugging Face Llama folder (config.json, *.safetensors)");
  auto* o_gguf = app.add_option("--gguf", gguf, "llama.cpp GGUF file of a Llama model (F32, F16, BF16, Q8_0, Q4_x, "
                                                "Q5_x, Q4_K, Q6_K tensors)");
  auto* o_random = app.add_option("--random", shape, fmt::format("built-in shape with random weights: {}",
                                                                 fmt::join(ringllama::random_shape_names(), ", ")));
  auto* o_verify = app.add_option("--verify", verify, "check every group checksum of STORE");
  auto* o_out = app.add_option("--out", out, "store directory to create");
  auto* o_seed = app.add_option("--seed", seed, "random seed (--random)");
  auto* o_tokenizer = app.add_option("--tokenizer", tokenizer,
                                     "a tokenizer.json copied into the store (--random): random weights with a real "
                                     "vocabulary, e.g. Llama 3's for llama-3.1-8b, so that text and the HTTP API work")
                          ->check(CLI::ExistingFile);
  auto* o_layers = app.add_option("--layers", layers, "layer count overriding the shape's (--random)")
                       ->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "threads filling chunks (default: one per core)")
      ->check(CLI::NonNegativeNumber);
  auto* o_weights = app.add_option("--weights", weights,
                                   "format of the linear weights: bf16 (default), fp8 (e4m3, a scale per row) or "
                                   "int4 (a scale and min per group of inputs); norms and embeddings stay bf16")
                        ->check(CLI::IsMember({"bf16", "fp8", "int4"}));
  auto* o_group = app.add_option("--group-size", group_size,
                                 "int4 inputs per scale: 32 or 128 (default 128; GGUF Q4_0/Q4_1 tensors keep 32 "
                                 "exactly unless this is given)")
                      ->check(CLI::IsMember({32, 128}));
  auto* o_scales = app.add_option("--scales", scales,
                                  "how scales are chosen: search (the least squared error), minmax (fp8 max|w|/448, int4 "
                                  "the group's min and (max - min)/15) or auto (default: search for int4, minmax for "
                                  "fp8, the rules that measured best)")
                       ->check(CLI::IsMember({"auto", "search", "minmax"}));
  app.add_flag("--force", force, "replace an existing STORE");
  app.add_flag("--quiet", quiet, "no progress on stderr");
  config_loader.add_flags(app);  // --config, --print-config, --verbose
  o_hf->excludes(o_random)->excludes(o_verify)->excludes(o_gguf);
  o_gguf->excludes(o_random)->excludes(o_verify);
  o_random->excludes(o_verify);
  o_verify->excludes(o_out);
  o_seed->needs(o_random);
  o_layers->needs(o_random);
  o_tokenizer->needs(o_random);
  o_weights->excludes(o_verify);
  o_group->excludes(o_verify);
  o_scales->excludes(o_verify);

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "ringllama-pack: error: %s\n", e.what());
    return 1;
  }
  const ringllama::Config config = config_loader.load();
  if (config_loader.print_requested()) {
    std::cout << config_loader.describe(config);
    return 0;
  }
  ringllama::init_logging("ringllama-pack", config.verbose);

  if (!verify.empty()) {
    size_t bad = ringllama::verify_store(verify, std::cout, std::cerr);
    return bad == 0 ? 0 : 1;
  }
  if (hf.empty() && gguf.empty() && shape.empty())
    RL_REQUIRE(false, "give one of --hf DIR, --gguf FILE, --random SHAPE or --verify STORE");
  RL_REQUIRE(!out.empty(), "--out STORE is required with --hf, --gguf and --random");

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  ringllama::PackOptions opts;
  opts.out = out;
  opts.force = force;
  opts.threads = threads;
  opts.progress = !quiet;
  opts.cancel = &g_interrupted;
  opts.weights = weights == "fp8" ? ringllama::DType::FP8_E4M3
                 : weights == "int4" ? ringllama::DType::INT4
                                     : ringllama::DType::BF16;
  RL_REQUIRE(group_size == 0 || opts.weights == ringllama::DType::INT4, "--group-size goes with --weights int4");
  opts.group_size = group_size;
  if (scales != "auto") {
    const auto rule = scales == "minmax" ? ringllama::ScaleRule::kMinMax : ringllama::ScaleRule::kSearch;
    opts.scales = {rule, rule};
  }
  if (!tokenizer.empty()) {
    // Loaded first: a file that is no tokenizer, or whose vocabulary is another model's, fails
    // now. A few added ids past the embedding pass with a warning (Llama 3.2's tokenizer.json has
    // <|image|> at 128256 for a 128256-row model): requests that hold them are refused.
    const int64_t vocab = ringllama::random_shape(shape).vocab_size;
    const auto t = ringllama::Tokenizer::from_file(tokenizer);
    RL_REQUIRE(t->vocab_size() <= vocab + 1024, "--tokenizer {}: {} ids, far more than the {} of {}", tokenizer,
               t->vocab_size(), vocab, shape);
    if (t->vocab_size() > vocab)
      spdlog::warn("--tokenizer {}: ids {}..{} are past the {} rows of {}'s embedding: requests holding them are refused",
                   tokenizer, vocab, t->vocab_size() - 1, vocab, shape);
    RL_REQUIRE(std::filesystem::path(tokenizer).filename() == "tokenizer.json",
               "--tokenizer {}: the file must be named tokenizer.json (the store keeps the name)", tokenizer);
    opts.tokenizer_files.push_back(tokenizer);
  }
  ringllama::WriteResult r = !hf.empty()     ? ringllama::pack_hf(hf, opts)
                              : !gguf.empty() ? ringllama::pack_gguf(gguf, opts)
                                              : ringllama::pack_random(shape, seed, layers, opts);
  std::cout << ringllama::pack_summary(r, out) << std::flush;
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return ringllama::run_main("ringllama-pack", run, argc, argv); }
