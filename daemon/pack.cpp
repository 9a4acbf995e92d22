#include "daemon/pack.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "common/errors.h"
#include "common/store.h"
#include "common/gguf.h"
#include "daemon/gguf_model.h"
#include "daemon/gguf_tokenizer.h"
#include "daemon/hf_config.h"
#include "daemon/random_model.h"

namespace fs = std::filesystem;

namespace ringllama {

namespace {

std::string shape_text(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

std::string human_bytes(uint64_t n) {
  if (n >= 1000000000ull) return fmt::format("{:.1f} GB", n / 1e9);
  if (n >= 1000000ull) return fmt::format("{:.1f} MB", n / 1e6);
  return fmt::format("{} bytes", n);
}

size_t store_index(const GroupEntry& g) {
  if (g.kind == GroupKind::Globals) return 0;
  return 1 + 2 * static_cast<size_t>(g.layer) + (g.kind == GroupKind::Ffn ? 1 : 0);
}

// weight_map of model.safetensors.index.json: tensor name -> shard file name.
std::map<std::string, std::string> read_index(const std::string& path) {
  // A regular file of at most 64 MiB (a 405B model's index is ~2 MiB): a FIFO or /dev/zero
  // there is refused instead of blocking or filling memory.
  const std::string text = read_regular_file(path, uint64_t{64} << 20);
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw StoreError(fmt::format("{}: not valid JSON", path));
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw StoreError(fmt::format("{}: no object 'weight_map'", path));
  std::map<std::string, std::string> map;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      throw StoreError(fmt::format("{}: weight_map['{}'] is not a file name", path, it.key()));
    const std::string file = it.value().get<std::string>();
    // Shards lie beside the index; a path elsewhere is refused rather than followed.
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos)
      throw StoreError(fmt::format("{}: weight_map['{}'] names '{}', which is not a file beside the index", path,
                                   it.key(), file));
    map[it.key()] = file;
  }
  return map;
}

}  // namespace

const std::vector<std::string>& tokenizer_file_names() {
  static const std::vector<std::string> names = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                 "special_tokens_map.json", "generation_config.json"};
  return names;
}

// q_proj and k_proj are copied as they are, not permuted into the interleaved layout that
// llama.cpp uses: the store keeps Hugging Face's layout and every backend applies rotate_half RoPE.
std::string hf_tensor_name(const GroupEntry& g, const std::string& n) {
  if (g.kind == GroupKind::Globals) {
    if (n == "tok_embeddings") return "model.embed_tokens.weight";
    if (n == "norm") return "model.norm.weight";
    if (n == "output") return "lm_head.weight";
  } else {
    static const std::map<std::string, std::string> layer_names = {
        {"attn_norm", "input_layernorm"},  {"wq", "self_attn.q_proj"},
        {"wk", "self_attn.k_proj"},        {"wv", "self_attn.v_proj"},
        {"wo", "self_attn.o_proj"},        {"ffn_norm", "post_attention_layernorm"},
        {"w1", "mlp.gate_proj"},           {"w3", "mlp.up_proj"},
        {"w2", "mlp.down_proj"}};
    auto it = layer_names.find(n);
    if (it != layer_names.end()) return fmt::format("model.layers.{}.{}.weight", g.layer, it->second);
  }
  throw Error(fmt::format("no Hugging Face name for store tensor '{}' of {}", n, g.label()));
}

const SafetensorsFile& HfSource::shard(const std::string& dir, const std::string& name) {
  auto it = files_.find(name);
  if (it == files_.end()) it = files_.emplace(name, SafetensorsFile::open(dir + "/" + name)).first;
  return *it->second;
}

HfSource::HfSource(const std::string& dir, const Manifest& plan) {
  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  std::error_code ec;
  const bool sharded = !fs::exists(single, ec) && fs::exists(index, ec);
  if (!sharded && !fs::exists(single, ec))
    throw StoreError(fmt::format("{}: no model.safetensors or model.safetensors.index.json", dir));
  std::map<std::string, std::string> weight_map;
  if (sharded) weight_map = read_index(index);
  std::set<std::string> used;

  for (const GroupEntry& g : plan.groups) {
    if (store_index(g) != refs_.size()) throw Error("hf source: groups are not in store order");
    refs_.emplace_back();
    for (const TensorEntry& t : g.tensors) {
      const std::string hf = hf_tensor_name(g, t.name);
      auto missing = [&] {
        if (t.name == "output")
          return StoreError(fmt::format("{}: tensor '{}' is missing and config.json has tie_word_embeddings false",
                                        dir, hf));
        return StoreError(fmt::format("{}: tensor '{}' is missing", dir, hf));
      };
      const SafetensorsFile* file = nullptr;
      if (sharded) {
        auto it = weight_map.find(hf);
        if (it == weight_map.end()) throw missing();
        file = &shard(dir, it->second);
      } else {
        file = &shard(dir, "model.safetensors");
      }
      const StTensor* st = file->find(hf);
      if (!st && sharded)
        throw StoreError(fmt::format("{}: tensor '{}' is missing, though {} places it there", file->path(), hf,
                                     index));
      if (!st) throw missing();
      if (st->shape != t.shape)
        throw StoreError(fmt::format("{}: tensor '{}' has shape {}, config.json expects {}", file->path(), hf,
                                     shape_text(st->shape), shape_text(t.shape)));
      if (!st_dtype_convertible(st->dtype))
        throw StoreError(fmt::format("{}: tensor '{}' has dtype {}; only BF16, F16 and F32 can be packed",
                                     file->path(), hf, st_dtype_name(st->dtype)));
      refs_.back().push_back({file, st});
      used.insert(hf);
    }
  }
  // Checkpoints can carry what the store has no use for (rotary inv_freq buffers, a tied lm_head,
  // layers beyond num_hidden_layers): say so, since a wrong config.json also looks like this.
  std::vector<std::string> unused;
  if (sharded) {
    for (const auto& [name, file] : weight_map)
      if (!used.count(name)) unused.push_back(name);
  } else {
    for (const auto& [name, t] : files_.begin()->second->header().tensors)
      if (!used.count(name)) unused.push_back(name);
  }
  if (!unused.empty())
    spdlog::warn("{}: {} tensor(s) not packed, e.g. '{}'", dir, unused.size(), unused.front());
}

void HfSource::fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const {
  const Ref& r = refs_.at(store_index(g)).at(ti);
  r.file->read_bf16(*r.tensor, first, count, out);
}

TensorFormat choose_format(const PackOptions& opts, const TensorSpec& t, int64_t native_group,
                           std::set<std::string>* kept_bf16) {
  if (opts.weights == DType::BF16 || !tensor_packable(t.name) || t.shape.size() != 2) return {};
  if (opts.weights == DType::FP8_E4M3) return {DType::FP8_E4M3, 0};
  const int64_t g = opts.group_size > 0 ? opts.group_size : native_group > 0 ? native_group : kInt4GroupDefault;
  if (!int4_group_allowed(g)) throw Error(fmt::format("--group-size {}: int4 groups are 32 or 128", g));
  if (t.shape[1] % g != 0) {
    if (kept_bf16) kept_bf16->insert(fmt::format("{} ({} inputs)", t.name, t.shape[1]));
    return {};
  }
  return {DType::INT4, g};
}

namespace {

// Plans the store for `opts.weights`, saying which tensors could not take it.
Manifest plan_for(const ModelConfig& m, const std::string& source, const PackOptions& opts,
                  const std::function<int64_t(const GroupEntry&, const TensorSpec&)>& native_group = nullptr) {
  std::set<std::string> kept;
  Manifest plan = Manifest::plan(m, source, [&](const GroupEntry& g, const TensorSpec& t) {
    return choose_format(opts, t, native_group ? native_group(g, t) : 0, &kept);
  });
  if (!kept.empty())
    spdlog::warn("kept as bf16 (inputs not a multiple of the int4 group size {}): {}",
                 opts.group_size > 0 ? opts.group_size : kInt4GroupDefault, fmt::join(kept, ", "));
  return plan;
}

}  // namespace

// The writer's options for a pack into opts.out.
static WriteOptions write_options(const PackOptions& opts) {
  WriteOptions w;
  w.out = opts.out;
  w.force = opts.force;
  w.threads = opts.threads;
  w.progress = opts.progress;
  w.cancel = opts.cancel;
  w.scales = opts.scales;
  return w;
}

WriteResult pack_hf(const std::string& hf_dir, const PackOptions& opts) {
  check_output(opts.out, opts.force);
  ModelConfig m = load_hf_config(hf_dir);
  Manifest plan = plan_for(m, "hf:" + fs::absolute(hf_dir).lexically_normal().string(), opts);
  HfSource src(hf_dir, plan);

  WriteOptions w = write_options(opts);
  std::error_code ec;
  for (const std::string& name : tokenizer_file_names())
    if (fs::is_regular_file(hf_dir + "/" + name, ec)) w.copy_files.push_back(hf_dir + "/" + name);
  spdlog::info("packing {} ({} layers, {}) into {}", hf_dir, m.n_layers, human_bytes(plan.weights_size), opts.out);
  return write_store(std::move(plan), src, w);
}

WriteResult pack_gguf(const std::string& gguf_path, const PackOptions& opts) {
  check_output(opts.out, opts.force);
  const GgufFile f = GgufFile::open(gguf_path);
  ModelConfig m = gguf_model_config(f);
  // Q4_0 and Q4_1 blocks are int4 groups of 32 already: taken over as they are unless another
  // group size is asked for.
  auto native = [&](const GroupEntry& g, const TensorSpec& t) -> int64_t {
    if (opts.weights != DType::INT4 || !tensor_packable(t.name)) return 0;
    const GgmlType type = GgufSource::tensor_type(f, g, t.name);
    return type == GgmlType::Q4_0 || type == GgmlType::Q4_1 ? 32 : 0;
  };
  Manifest plan = plan_for(m, "gguf:" + fs::absolute(gguf_path).lexically_normal().string(), opts, native);
  GgufSource src(f, plan);

  WriteOptions w = write_options(opts);
  if (auto files = gguf_tokenizer_files(f, m))
    w.write_files = std::move(*files);
  else
    spdlog::warn("{}: no tokenizer in the file (tokenizer.ggml.model): the store takes token ids only", gguf_path);
  spdlog::info("packing {} ({} layers, {}) into {}", gguf_path, m.n_layers, human_bytes(plan.weights_size), opts.out);
  return write_store(std::move(plan), src, w);
}

WriteResult pack_random(const std::string& shape, uint64_t seed, int64_t layers, const PackOptions& opts) {
  check_output(opts.out, opts.force);
  ModelConfig m = random_shape(shape);
  if (layers > 0) m.n_layers = layers;
  Manifest plan = plan_for(m, fmt::format("random:{} seed={}", shape, seed), opts);
  RandomSource src(plan, seed);

  WriteOptions w = write_options(opts);
  w.copy_files = opts.tokenizer_files;
  spdlog::info("packing random {} ({} layers, {}, seed {}) into {}", shape, m.n_layers,
               human_bytes(plan.weights_size), seed, opts.out);
  return write_store(std::move(plan), src, w);
}

// "bf16", or the packed formats of the linear weights ("int4 g32 x 210, bf16 x 0").
static std::string weight_formats(const Manifest& m) {
  std::map<std::string, int> count;
  for (const GroupEntry& g : m.groups)
    for (const TensorEntry& t : g.tensors)
      if (tensor_packable(t.name))
        ++count[t.dtype == DType::INT4 ? fmt::format("int4 g{}", t.group_size) : dtype_name(t.dtype)];
  std::vector<std::string> parts;
  for (const auto& [name, n] : count) parts.push_back(fmt::format("{} x {}", name, n));
  return fmt::format("{}", fmt::join(parts, ", "));
}

std::string pack_summary(const WriteResult& r, const std::string& out) {
  const ModelConfig& m = r.manifest.model;
  const double mbs = r.seconds > 0 ? r.bytes / r.seconds / 1e6 : 0;
  return fmt::format(
      "{}: llama dim {}, {} layers, {} heads ({} kv) x {}, ffn {}, vocab {}, {} embeddings, rope {}\n"
      "  {} groups, {} in {:.2f} s ({:.0f} MB/s), weights {}{}\n",
      out, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size,
      m.tie_word_embeddings ? "tied" : "untied", m.rope_scaling.type, r.manifest.groups.size(),
      human_bytes(r.bytes), r.seconds, mbs, weight_formats(r.manifest),
      r.manifest.tokenizer_files.empty() ? ""
                                         : fmt::format(", tokenizer files: {}", fmt::join(r.manifest.tokenizer_files, " ")));
}

size_t verify_store(const std::string& dir, std::ostream& out, std::ostream& err) {
  Store s = Store::open(dir);
  const Manifest& m = s.manifest();
  size_t bad = s.verify([&](const std::string& line) { err << line << "\n"; });
  if (bad == 0)
    out << fmt::format("{}: {} groups, {}, all checksums match\n", dir, m.groups.size(), human_bytes(m.weights_size));
  else
    err << fmt::format("{}: {} of {} groups fail their checksums\n", dir, bad, m.groups.size());
  return bad;
}

}  // namespace ringllama
