// ringllama-generate: runs one prompt through the model and prints what it generates.
//
//   ringllama-generate --store DIR --prompt-ids 1,2,3 --max-tokens 16 [--temperature T --top-k K
//                      --top-p P --seed S] [--stop-ids 5,6] [--ignore-eos] [--tokens-out FILE]
//                      [--logits-out FILE] [--backend cpu]
//   ringllama-generate --store DIR --prompt TEXT ...      text through the store's tokenizer (with bos)
//   ringllama-generate --store DIR --chat MESSAGE [--system TEXT] [--chat-template NAME] ...
//                      one user turn (after a system turn) through the model's chat template;
//                      generation stops at the template's end of turn as well as at eos
//   ringllama-generate --store DIR --batch-prompts FILE ...   one prompt per line, run together
//   ringllama-generate --daemon ENDPOINT --prompt-ids ...   weights from a running ringllama-loaderd
//   ringllama-generate --store DIR --plan-only [--device-memory GB]
//
// --plan-only prints the device memory plan (worker/planner.h) and exits 0 if it fits, 1 if not;
// it reads only the manifest, so a manifest without its weights.bin is enough.
// --batch-prompts runs every line's prompt (ids separated by commas or blanks) on one backend, up to
// batch_size sequences per step; later lines join as earlier ones finish. Line N (0-based) writes
// --tokens-out FILE.N and --logits-out FILE.N.
// stdout: the generated ids, one line per sequence (in prompt order); with --prompt or --chat the
// generated text instead, written as each token completes it (special tokens left out), then a
// newline. stderr: one timing line.
// Errors: one line, exit 1.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <tuple>

#include "common/chat_template.h"
#include "common/config.h"
#include "common/errors.h"
#include "common/host_plan.h"
#include "common/log.h"
#include "common/store.h"
#include "common/tokenizer.h"
#include "worker/backend.h"
#include "worker/backend_choice.h"
#include "worker/daemon_weights.h"
#include "worker/generation.h"
#ifdef RINGLLAMA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/check.h"
#include "worker/cuda_backend.h"
#include "worker/cuda_memory.h"
#endif
#include "worker/planner.h"
#include "worker/sampler.h"
#include "worker/window_weights.h"

namespace ringllama {
namespace {

struct Options {
  std::string backend;  // "" = cuda where a GPU is visible, else cpu
  std::string prompt_ids;
  std::string prompt;         // --prompt: text
  std::string chat, system;   // --chat: the user's message; --system: a system turn before it
  std::string chat_template;  // a family by name instead of the store's template
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::string stop_ids;
  bool ignore_eos = false;
  std::string tokens_out;
  std::string logits_out;
  std::string batch_prompts;  // a file of prompts, one per line; "" = the one --prompt-ids
  std::string daemon;  // the loader daemon's control endpoint; "" = read the store directly
  bool plan_only = false;
  double device_memory_gb = 0;  // --plan-only: the card's memory, GiB; 0 = the GPU's own
  HostOverrides host;           // --host-memory, --disk-gbps
};

// "1,2, 3" -> ids; each must be a decimal integer in [0, vocab).
std::vector<int32_t> parse_ids(const std::string& text, const char* flag, int64_t vocab) {
  std::vector<int32_t> ids;
  size_t at = 0;
  while (at <= text.size()) {
    size_t comma = text.find(',', at);
    if (comma == std::string::npos) comma = text.size();
    std::string item = text.substr(at, comma - at);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (item.empty()) fail("{}: empty id in '{}'", flag, text);
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(item.c_str(), &end, 10);
    if (*end != '\0' || errno == ERANGE) fail("{}: '{}' is not a token id", flag, item);
    if (v < 0 || v >= vocab) fail("{}: token id {} is outside the vocabulary [0, {})", flag, v, vocab);
    ids.push_back(static_cast<int32_t>(v));
    at = comma + 1;
  }
  return ids;
}

// --device-memory plans for a card that need not be there and never touches CUDA; without it the
// GPU's own memory is asked for.
PlanInputs plan_inputs(const Options& o, const Config& config) {
  if (o.device_memory_gb > 0) return estimated_inputs(static_cast<uint64_t>(o.device_memory_gb * kGiB));
#ifdef RINGLLAMA_HAVE_CUDA
  if (cuda_device_count() > config.gpu) {
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(static_cast<int>(config.gpu)) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess)
      fail("--plan-only: cannot read the memory of GPU {}; pass --device-memory GB", config.gpu);
    PlanInputs in = estimated_inputs(total_b);
    in.device_free_bytes = free_b + in.context_bytes;  // free was read with this process's context made
    return in;
  }
#endif
  (void)config;
  fail("--plan-only: no GPU to plan for; pass --device-memory GB (the card's memory, e.g. 16)");
}

int plan_only(ConfigLoader& loader, Config& config, const Options& o) {
  if (o.device_memory_gb < 0 || o.device_memory_gb > 1 << 20)
    fail("--device-memory must be a size in GiB above 0 (got {})", o.device_memory_gb);
  const Manifest manifest = Manifest::load(config.store + "/" + kManifestFile);
  loader.adapt_to_model(config, manifest.model);
  const MemoryPlan plan = plan_memory(manifest, config, plan_inputs(o, config));
  std::fputs(plan.table().c_str(), stdout);
  std::fputs(plan.refusal().c_str(), stdout);
  std::string h2d_source;
  const double h2d = o.device_memory_gb > 0 ? 0 : h2d_for_plan(config, &h2d_source);
  if (o.device_memory_gb > 0) h2d_source = "not measured for another card";
  const HostPlan host = host_plan_at_start(manifest, config, o.host, false, h2d, h2d_source, plan.resident_layers, true);
  std::fputs(("\n" + host.table()).c_str(), stdout);
  return plan.fits ? 0 : 1;
}

std::string join_ids(const std::vector<int32_t>& ids) { return fmt::format("{}", fmt::join(ids, " ")); }

int run(int argc, char** argv) {
  CLI::App app{"Generate tokens from a packed store", "ringllama-generate"};
  ConfigLoader loader(kGenerate);
  loader.add_flags(app);
  Options o;
  app.add_option("--backend", o.backend, "compute backend: cpu or cuda (default: cuda where a GPU is visible, else cpu)");
  app.add_option("--prompt-ids", o.prompt_ids, "prompt token ids, comma separated, used exactly as given");
  app.add_option("--prompt", o.prompt, "prompt text, tokenized by the store's tokenizer; the output is text");
  app.add_option("--chat", o.chat, "a user message, rendered with the model's chat template; the output is the reply");
  app.add_option("--system", o.system, "with --chat: a system message before it");
  app.add_option("--chat-template", o.chat_template,
                 fmt::format("with --chat: the template family ({}) instead of the store's", chat_template_names()));
  app.add_option("--max-tokens", o.max_tokens, "most tokens to generate")->capture_default_str();
  app.add_option("--temperature", o.sampling.temperature, "0 = greedy")->capture_default_str();
  app.add_option("--top-k", o.sampling.top_k, "keep the k most likely tokens; 0 = off")->capture_default_str();
  app.add_option("--top-p", o.sampling.top_p, "nucleus mass; 1 = off")->capture_default_str();
  app.add_option("--seed", o.sampling.seed, "sampling seed (0 to 2^64 - 1)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--stop-ids", o.stop_ids, "stop after any of these ids (comma separated; kept in the output)");
  app.add_flag("--ignore-eos", o.ignore_eos, "do not stop at the model's eos ids");
  app.add_option("--tokens-out", o.tokens_out, "write the generated ids to this file (one line)");
  app.add_option("--logits-out", o.logits_out,
                 "write each generated token's logits row (float32, little-endian, vocab_size per token)");
  app.add_option("--batch-prompts", o.batch_prompts,
                 "a file with one prompt per line (ids separated by commas or blanks), run together; "
                 "--tokens-out/--logits-out get a .N suffix per line");
  app.add_option("--daemon", o.daemon,
                 "read the weights from the loader daemon at this control endpoint (the store is the one it serves)");
  app.add_flag("--plan-only", o.plan_only, "print the device memory plan and exit: 0 if it fits, 1 if not");
  app.add_option("--device-memory", o.device_memory_gb, "with --plan-only: plan for a card of this many GiB");
  o.host.add_flags(app);
  if (const std::optional<int> done = parse_command_line(app, argc, argv)) return *done;

  Config config = loader.load();
  init_logging("ringllama-generate", config.verbose);
  // With --daemon the store's directory comes from the daemon's welcome.
  std::unique_ptr<WeightSource> daemon_weights;
  if (!o.daemon.empty()) daemon_weights = open_daemon_weights(o.daemon, config, &config.store);
  if (config.store.empty()) {
    if (loader.print_requested()) {
      std::fputs(loader.describe(config).c_str(), stdout);
      return 0;
    }
    fail("no store: pass --store DIR (or set store in the config file or RINGLLAMA_STORE)");
  }
  if (o.device_memory_gb != 0 && !o.plan_only) fail("--device-memory goes with --plan-only");
  if (o.plan_only && !loader.print_requested()) return plan_only(loader, config, o);
  const Store store = Store::open(config.store);
  loader.adapt_to_model(config, store.model());
  if (loader.print_requested()) {
    std::fputs(loader.describe(config).c_str(), stdout);
    return 0;
  }

  const ModelConfig& m = store.model();
  const int n_forms = (app.count("--prompt-ids") ? 1 : 0) + (app.count("--prompt") ? 1 : 0) +
                      (app.count("--chat") ? 1 : 0) + (o.batch_prompts.empty() ? 0 : 1);
  if (n_forms > 1) fail("--prompt-ids, --prompt, --chat and --batch-prompts exclude each other");
  if (app.count("--system") && !app.count("--chat")) fail("--system goes with --chat");
  if (app.count("--chat-template") && !app.count("--chat")) fail("--chat-template goes with --chat");
  const bool text_out = app.count("--prompt") || app.count("--chat");
  std::unique_ptr<Tokenizer> tokenizer;
  std::set<int32_t> end_of_turn;  // --chat: the template's end of turn
  // The prompts: --prompt-ids, --prompt and --chat are a list of one.
  std::vector<std::vector<int32_t>> prompts;
  if (text_out) {
    const char* flag = app.count("--prompt") ? "--prompt" : "--chat";
    tokenizer = Tokenizer::from_store(config.store);
    if (!tokenizer)
      fail("{} needs the model's tokenizer, and store {} has none (no tokenizer.json or tokenizer.model): give "
           "--prompt-ids",
           flag, config.store);
    std::string text = o.prompt;
    bool add_special = true;  // a plain text gets the bos its tokenizer adds
    if (app.count("--chat")) {
      const ChatTemplate t = load_chat_template(config.store, o.chat_template);
      std::vector<ChatMessage> messages;
      if (app.count("--system")) messages.push_back({"system", o.system});
      messages.push_back({"user", o.chat});
      text = t.render(messages, true);
      add_special = false;  // the template wrote bos itself
      if (const std::optional<int32_t> eot = tokenizer->token_id(t.end_of_turn())) end_of_turn.insert(*eot);
      spdlog::debug("chat template {} ({}): {} bytes of prompt", t.name(), t.source, text.size());
    }
    prompts.push_back(tokenizer->encode(text, add_special));
    if (prompts[0].empty()) fail("{}: the text gives no tokens", flag);
  } else if (!o.batch_prompts.empty()) {
    std::ifstream in(o.batch_prompts);
    if (!in) fail("--batch-prompts {}: cannot open: {}", o.batch_prompts, errno_text(errno));
    std::string text;
    for (int64_t n = 0; std::getline(in, text); ++n)
      prompts.push_back(parse_id_line(text, fmt::format("--batch-prompts {} line {}", o.batch_prompts, n + 1),
                                      m.vocab_size));
    if (prompts.empty()) fail("--batch-prompts {}: no prompts", o.batch_prompts);
  } else {
    if (app.count("--prompt-ids") == 0)
      fail("a prompt is required: --prompt-ids (comma separated token ids), --prompt TEXT or --chat MESSAGE");
    if (o.prompt_ids.find_first_not_of(" \t") == std::string::npos)
      fail("--prompt-ids is empty: give at least one token id");
    prompts.push_back(parse_ids(o.prompt_ids, "--prompt-ids", m.vocab_size));
  }
  const bool batch = !o.batch_prompts.empty();
  std::set<int32_t> stop;
  if (!o.stop_ids.empty())
    for (int32_t id : parse_ids(o.stop_ids, "--stop-ids", m.vocab_size)) stop.insert(id);
  if (!o.ignore_eos) {
    for (int64_t id : m.eos_ids) stop.insert(static_cast<int32_t>(id));
    stop.insert(end_of_turn.begin(), end_of_turn.end());
  }
  if (o.max_tokens < 1) fail("--max-tokens must be >= 1 (got {})", o.max_tokens);
  std::vector<GenRequest> requests;
  for (size_t i = 0; i < prompts.size(); ++i) {
    // Compared without the sum, which a huge --max-tokens would overflow.
    const int64_t prompt_len = static_cast<int64_t>(prompts[i].size());
    if (prompt_len > config.max_context || o.max_tokens > config.max_context - prompt_len)
      fail("{}the prompt ({} tokens) plus --max-tokens ({}) is over max_context ({})",
           batch ? fmt::format("line {}: ", i + 1) : "", prompt_len, o.max_tokens, config.max_context);
    requests.push_back(GenRequest{prompts[i], o.max_tokens, o.sampling, stop});
  }
  o.sampling.validate();
  if (o.backend.empty()) o.backend = default_backend();
  require_backend(o.backend);

  // Open the outputs before the long part, so that a bad path fails at once.
  auto out_name = [&](const std::string& base, size_t i) { return batch ? fmt::format("{}.{}", base, i) : base; };
  std::vector<std::ofstream> logits_files(prompts.size()), tokens_files(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (!o.logits_out.empty()) {
      logits_files[i].open(out_name(o.logits_out, i), std::ios::binary | std::ios::trunc);
      if (!logits_files[i]) fail("--logits-out {}: cannot open: {}", out_name(o.logits_out, i), errno_text(errno));
    }
    if (!o.tokens_out.empty()) {
      tokens_files[i].open(out_name(o.tokens_out, i), std::ios::trunc);
      if (!tokens_files[i]) fail("--tokens-out {}: cannot open: {}", out_name(o.tokens_out, i), errno_text(errno));
    }
  }

  auto tl = std::chrono::steady_clock::now();
  // Host weights: the daemon's segment with --daemon; else, when the CUDA backend will stream some
  // layers, this process's own pinned ring window (cpu_cap_layers slots); else the whole store.
  // The host plan comes first, before anything is allocated: the window it sizes (or the whole store
  // where nothing streams) and the bound each link sets.
  std::unique_ptr<WeightSource> weights = std::move(daemon_weights);
  if (!weights) {
    weights = open_local_weights(store, o.backend, config, o.host);
  } else if (o.host.any()) {
    fail("--host-memory and --disk-gbps plan the host part of this process's own window: not with --daemon");
  }
  std::unique_ptr<Backend> backend = make_backend(o.backend, *weights, config);
  spdlog::debug("{}: {} bytes read and checked in {:.0f} ms; backend {}, max_context {}", config.store,
                store.manifest().weights_size,
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - tl).count(),
                backend->name(), config.max_context);

  // Rows are written as they come; the host is little-endian (x86-64, aarch64), so the floats go
  // out as they are.
  static_assert(sizeof(float) == 4, "float32 rows");
  // Every write is checked (a full disk or /dev/full must not end in exit 0 with nothing written).
  auto checked = [&](std::ofstream& f, const std::string& flag, const std::string& name) {
    if (f.is_open() && !f.good()) fail("{} {}: write failed: {}", flag, name, errno_text(errno));
  };
  // Text goes out as each token completes it; a held-back partial character waits for the next.
  std::optional<Tokenizer::Stream> stream;
  if (tokenizer) stream.emplace(tokenizer->stream(true));
  auto write_text = [&](const std::string& piece) {
    if (piece.empty()) return;
    if (std::fwrite(piece.data(), 1, piece.size(), stdout) != piece.size() || std::fflush(stdout) != 0)
      fail("stdout: write failed: {}", errno_text(errno));
  };
  auto sink = [&](size_t i, int32_t token, const std::vector<float>& row) {
    if (stream) {
      std::string piece;
      try {
        piece = stream->push(token);
      } catch (const Error& e) {
        spdlog::debug("token {} has no text: {}", token, e.what());  // past the tokenizer's vocabulary
      }
      write_text(piece);
    }
    if (!logits_files[i].is_open()) return;
    logits_files[i].write(reinterpret_cast<const char*>(row.data()),
                          static_cast<std::streamsize>(row.size() * sizeof(float)));
    checked(logits_files[i], "--logits-out", out_name(o.logits_out, i));
  };
  GenStats st;
  const std::vector<GenResult> results = generate_all(*backend, requests, !o.logits_out.empty(), sink, &st);

  if (stream) write_text(stream->flush() + "\n");
  for (size_t i = 0; i < results.size(); ++i) {
    const std::string line = join_ids(results[i].tokens);
    if (!stream) std::printf("%s\n", line.c_str());
    spdlog::debug("sequence {}: prompt {} tokens, generated {} ({})", i, prompts[i].size(), results[i].tokens.size(),
                  results[i].reason);
    if (tokens_files[i].is_open()) tokens_files[i] << line << "\n";
    for (auto [f, flag, name] : {std::tuple{&logits_files[i], "--logits-out", out_name(o.logits_out, i)},
                                 std::tuple{&tokens_files[i], "--tokens-out", out_name(o.tokens_out, i)}}) {
      if (!f->is_open()) continue;
      f->flush();
      checked(*f, flag, name);
      f->close();
      if (f->fail()) fail("{} {}: close failed: {}", flag, name, errno_text(errno));
    }
  }
  // The ids on stdout are the output too: a full or closed stdout is an error, not exit 0.
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) fail("stdout: write failed: {}", errno_text(errno));

  const std::string stop_text = batch ? fmt::format("{} sequences in {} steps", results.size(), st.steps)
                                      : fmt::format("stop: {}", results[0].reason);
  fmt::print(stderr, "{}: prefill {} tokens in {:.1f} ms ({:.1f} tokens/s); decode {} tokens in {:.1f} ms ({:.1f} tokens/s); {}\n",
             backend->name(), st.prefill_tokens, st.prefill_s * 1e3, st.prefill_tokens / std::max(st.prefill_s, 1e-9),
             st.decode_tokens, st.decode_s * 1e3, st.decode_tokens > 0 ? st.decode_tokens / std::max(st.decode_s, 1e-9) : 0.0,
             stop_text);
#ifdef RINGLLAMA_HAVE_CUDA
  CudaStreamReport sr;
  if (config.verbose && cuda_stream_report(*backend, &sr)) {
    fmt::print(stderr,
               "weights: {} of {} layers resident, {} attn + {} ffn pool buffers, {} passes; streamed {} bytes "
               "({:.2f} GB) in {:.1f} ms of copy time ({:.2f} GB/s); stalls {} ({:.1f} ms waiting for host layers), "
               "{} host waits for copies\n",
               sr.resident_layers, sr.n_layers, sr.attn_buffers, sr.ffn_buffers, sr.passes, sr.bytes, sr.bytes * 1e-9,
               sr.copy_seconds * 1e3, sr.gb_per_s(), sr.source_stalls, sr.source_wait_seconds * 1e3, sr.event_syncs);
    if (sr.hybrid)
      fmt::print(stderr, "hybrid: the CPU ({}, {} threads) multiplied {} bytes ({:.2f} GB) of streamed rows in {:.1f} ms "
                 "({:.2f} GB/s); last GPU share f {:.3f}\n",
                 sr.cpu_isa, sr.cpu_threads, sr.cpu_bytes, sr.cpu_bytes * 1e-9, sr.cpu_seconds * 1e3,
                 sr.cpu_seconds > 0 ? sr.cpu_bytes / sr.cpu_seconds * 1e-9 : 0.0, sr.gpu_fraction);
  }
#endif
  if (std::fclose(stdout) != 0) fail("stdout: close failed: {}", errno_text(errno));
  return 0;
}

}  // namespace
}  // namespace ringllama

int main(int argc, char** argv) { return ringllama::run_main("ringllama-generate", ringllama::run, argc, argv); }
