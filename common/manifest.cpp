#include "common/manifest.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <fstream>
#include <set>

#include "common/errors.h"
#include "common/store.h"
#include "common/yaml_doc.h"

namespace ringllama {

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bf16";
    case DType::FP8_E4M3: return "fp8_e4m3";
    case DType::INT4: return "int4";
  }
  return "?";
}

DType parse_dtype(const std::string& s) {
  if (s == "bf16") return DType::BF16;
  if (s == "fp8_e4m3") return DType::FP8_E4M3;
  if (s == "int4") return DType::INT4;
  throw StoreError(fmt::format("unsupported tensor dtype '{}' (this build reads bf16, fp8_e4m3 and int4)", s));
}

bool dtype_packed(DType t) { return t != DType::BF16; }

bool int4_group_allowed(int64_t g) { return g == 32 || g == 128; }

bool tensor_packable(const std::string& name) {
  static const std::set<std::string> names = {"wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"};
  return names.count(name) > 0;
}

void check_tensor_format(const std::string& name, const std::vector<int64_t>& shape, const TensorFormat& f) {
  if (f.dtype != DType::INT4 && f.group_size != 0)
    throw StoreError(fmt::format("tensor '{}': group_size {} given for dtype {} (only int4 has groups)", name,
                                 f.group_size, dtype_name(f.dtype)));
  if (!dtype_packed(f.dtype)) return;
  if (!tensor_packable(name) || shape.size() != 2)
    throw StoreError(fmt::format("tensor '{}' is stored as bf16 only, not {} (only the linear weights are packed)",
                                 name, dtype_name(f.dtype)));
  if (f.dtype == DType::INT4) {
    if (!int4_group_allowed(f.group_size))
      throw StoreError(fmt::format("tensor '{}': int4 group_size {} is not supported (32 or 128)", name,
                                   f.group_size));
    if (shape[1] % f.group_size != 0)
      throw StoreError(fmt::format("tensor '{}': {} inputs do not split into int4 groups of {}", name, shape[1],
                                   f.group_size));
  }
}

namespace {

uint64_t checked_numel(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n))
      throw StoreError(fmt::format("shape {} overflows", fmt::join(shape, "x")));
  return n;
}

uint64_t checked_mul(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) throw StoreError(fmt::format("{} x {} bytes overflow", a, b));
  return r;
}

}  // namespace

uint64_t tensor_data_bytes(const std::vector<int64_t>& shape, const TensorFormat& f) {
  const uint64_t n = checked_numel(shape);
  switch (f.dtype) {
    case DType::BF16: return checked_mul(n, 2);
    case DType::FP8_E4M3: return n;
    case DType::INT4: return (n + 1) / 2;
  }
  return 0;
}

uint64_t tensor_scales_bytes(const std::vector<int64_t>& shape, const TensorFormat& f) {
  if (!dtype_packed(f.dtype) || shape.size() != 2) return 0;
  const uint64_t rows = static_cast<uint64_t>(std::max<int64_t>(shape[0], 0));
  if (f.dtype == DType::FP8_E4M3) return checked_mul(rows, 4);  // one float32 per row
  if (f.group_size <= 0) return 0;
  // One (scale, min) pair of halves per row and group.
  return checked_mul(checked_mul(rows, static_cast<uint64_t>(std::max<int64_t>(shape[1], 0) / f.group_size)), 4);
}

const char* group_kind_name(GroupKind k) {
  switch (k) {
    case GroupKind::Globals: return "globals";
    case GroupKind::Attn: return "attn";
    case GroupKind::Ffn: return "ffn";
  }
  return "?";
}

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    if (d < 0 || __builtin_mul_overflow(n, d, &n))
      throw StoreError(fmt::format("tensor '{}': shape {} overflows", name, fmt::join(shape, "x")));
  return n;
}

const TensorEntry* GroupEntry::find(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

const TensorEntry& GroupEntry::tensor(const std::string& name) const {
  const TensorEntry* t = find(name);
  if (!t) throw StoreError(fmt::format("{}: no tensor '{}'", label(), name));
  return *t;
}

std::string GroupEntry::label() const {
  if (kind == GroupKind::Globals) return "globals";
  return fmt::format("layer {} {}", layer, group_kind_name(kind));
}

std::vector<TensorSpec> group_layout(const ModelConfig& m, GroupKind kind) {
  switch (kind) {
    case GroupKind::Globals: {
      std::vector<TensorSpec> v = {{"tok_embeddings", {m.vocab_size, m.dim}}, {"norm", {m.dim}}};
      if (!m.tie_word_embeddings) v.push_back({"output", {m.vocab_size, m.dim}});
      return v;
    }
    case GroupKind::Attn:
      return {{"attn_norm", {m.dim}},
              {"wq", {m.q_dim(), m.dim}},
              {"wk", {m.kv_dim(), m.dim}},
              {"wv", {m.kv_dim(), m.dim}},
              {"wo", {m.dim, m.q_dim()}}};
    case GroupKind::Ffn:
      return {{"ffn_norm", {m.dim}},
              {"w1", {m.ffn_dim, m.dim}},
              {"w3", {m.ffn_dim, m.dim}},
              {"w2", {m.dim, m.ffn_dim}}};
  }
  return {};
}

// A packed tensor's scales follow its values in the same group, so a layer stays one read and a
// kernel finds both from the group's base.
static GroupEntry plan_group(const ModelConfig& m, GroupKind kind, int64_t layer, uint64_t offset,
                             const FormatChooser& choose) {
  GroupEntry g;
  g.kind = kind;
  g.layer = layer;
  g.offset = offset;
  uint64_t at = 0;
  for (const TensorSpec& spec : group_layout(m, kind)) {
    TensorEntry t;
    t.name = spec.name;
    t.shape = spec.shape;
    const TensorFormat f = choose ? choose(g, spec) : TensorFormat{};
    try {
      check_tensor_format(spec.name, spec.shape, f);
      t.dtype = f.dtype;
      t.group_size = f.group_size;
      t.offset = align_up(at, kTensorAlign);
      t.size = tensor_data_bytes(t.shape, f);
      if (__builtin_add_overflow(t.offset, t.size, &at)) throw StoreError("the layout overflows 64 bits");
      if (dtype_packed(t.dtype)) {
        t.scales_offset = align_up(at, kTensorAlign);
        t.scales_size = tensor_scales_bytes(t.shape, f);
        if (__builtin_add_overflow(t.scales_offset, t.scales_size, &at))
          throw StoreError("the layout overflows 64 bits");
      }
    } catch (const StoreError& e) {
      throw StoreError(fmt::format("{}: {}", g.label(), e.what()));
    }
    g.tensors.push_back(std::move(t));
  }
  g.size = align_up(at, kGroupAlign);
  return g;
}

Manifest Manifest::plan(const ModelConfig& m, const std::string& source, const FormatChooser& choose) {
  m.validate();
  Manifest man;
  man.model = m;
  man.source = source;
  uint64_t at = 0;
  man.groups.reserve(1 + 2 * static_cast<size_t>(m.n_layers));
  man.groups.push_back(plan_group(m, GroupKind::Globals, -1, at, choose));
  at += man.groups.back().size;
  for (int64_t l = 0; l < m.n_layers; ++l) {
    for (GroupKind k : {GroupKind::Attn, GroupKind::Ffn}) {
      man.groups.push_back(plan_group(m, k, l, at, choose));
      if (__builtin_add_overflow(at, man.groups.back().size, &at))
        throw StoreError("model config: the layout overflows 64 bits");
    }
  }
  man.weights_size = at;
  return man;
}

uint64_t Manifest::max_layer_size() const {
  uint64_t mx = 0;
  for (int64_t l = 0; l < model.n_layers; ++l) mx = std::max(mx, layer_size(l));
  return mx;
}

void Manifest::validate() const {
  if (format != kManifestFormat)
    throw StoreError(fmt::format("manifest format {} is not supported (this build reads {})", format, kManifestFormat));
  model.validate();
  // Counts before the layout: building the expected layout for a lying n_layers would cost its memory first.
  const uint64_t need_groups = 1 + 2 * static_cast<uint64_t>(model.n_layers);
  if (groups.size() != need_groups)
    throw StoreError(fmt::format("manifest has {} groups, n_layers {} needs {}", groups.size(), model.n_layers,
                                 need_groups));
  // Each tensor's own record first, so that a wrong one is named for what is wrong with it.
  for (const GroupEntry& g : groups) {
    for (const TensorEntry& t : g.tensors) {
      try {
        check_tensor_format(t.name, t.shape, t.format());
        if (t.size != tensor_data_bytes(t.shape, t.format()))
          throw StoreError(fmt::format("tensor '{}': size {} does not match shape {} as {} ({} bytes)", t.name,
                                       t.size, fmt::join(t.shape, "x"), dtype_name(t.dtype),
                                       tensor_data_bytes(t.shape, t.format())));
        const uint64_t want_scales = tensor_scales_bytes(t.shape, t.format());
        if (t.scales_size != want_scales)
          throw StoreError(fmt::format("tensor '{}': scales_size {} does not match shape {} as {} ({} bytes)", t.name,
                                       t.scales_size, fmt::join(t.shape, "x"), dtype_name(t.dtype), want_scales));
        uint64_t end = 0;
        if (__builtin_add_overflow(t.offset, t.size, &end) || end > g.size)
          throw StoreError(fmt::format("tensor '{}': bytes [{}, +{}) run outside the group ({} bytes)", t.name,
                                       t.offset, t.size, g.size));
        if (dtype_packed(t.dtype)) {
          if (__builtin_add_overflow(t.scales_offset, t.scales_size, &end) || end > g.size ||
              t.scales_offset < t.offset + t.size)
            throw StoreError(fmt::format("tensor '{}': scales [{}, +{}) run outside the group ({} bytes) or into "
                                         "the values",
                                         t.name, t.scales_offset, t.scales_size, g.size));
        } else if (t.scales_offset != 0) {
          throw StoreError(fmt::format("tensor '{}': a bf16 tensor has no scales (scales_offset {})", t.name,
                                       t.scales_offset));
        }
      } catch (const StoreError& e) {
        throw StoreError(fmt::format("{}: {}", g.label(), e.what()));
      }
    }
  }
  // The layout is a pure function of the model config and the formats recorded: anything else
  // was edited or corrupted.
  auto recorded = [this](const GroupEntry& g, const TensorSpec& spec) {
    const size_t i = g.kind == GroupKind::Globals ? 0 : 1 + 2 * static_cast<size_t>(g.layer) + (g.kind == GroupKind::Ffn);
    const TensorEntry* t = i < groups.size() ? groups[i].find(spec.name) : nullptr;
    return t ? t->format() : TensorFormat{};
  };
  Manifest expect = plan(model, source, recorded);
  for (size_t i = 0; i < groups.size(); ++i) {
    const GroupEntry& g = groups[i];
    const GroupEntry& e = expect.groups[i];
    if (g.kind != e.kind || g.layer != e.layer)
      throw StoreError(fmt::format("manifest group {} is '{}', expected '{}'", i, g.label(), e.label()));
    if (g.offset != e.offset || g.size != e.size)
      throw StoreError(fmt::format("{}: offset {} size {} disagree with the layout (offset {} size {})", g.label(),
                                   g.offset, g.size, e.offset, e.size));
    if (g.tensors.size() != e.tensors.size())
      throw StoreError(fmt::format("{}: {} tensors, expected {}", g.label(), g.tensors.size(), e.tensors.size()));
    for (size_t j = 0; j < g.tensors.size(); ++j) {
      const TensorEntry& t = g.tensors[j];
      const TensorEntry& te = e.tensors[j];
      if (t.name != te.name || t.shape != te.shape || t.offset != te.offset || t.size != te.size ||
          !(t.format() == te.format()) || t.scales_offset != te.scales_offset || t.scales_size != te.scales_size)
        throw StoreError(fmt::format("{}: tensor '{}' disagrees with the model config (expected '{}' {} at {})",
                                     g.label(), t.name, te.name, fmt::join(te.shape, "x"), te.offset));
    }
  }
  if (weights_size != expect.weights_size)
    throw StoreError(fmt::format("manifest weights_size {} disagrees with the layout ({})", weights_size,
                                 expect.weights_size));
}

// ---- YAML ----

namespace {

std::string where_of(const YAML::Node& n, const std::string& what) {
  return fmt::format("{} (line {})", what, n.Mark().line + 1);
}

template <typename T>
T get(const YAML::Node& parent, const char* key, const std::string& what) {
  YAML::Node n = parent[key];
  if (!n) throw StoreError(fmt::format("{}: missing key '{}'", where_of(parent, what), key));
  try {
    return n.as<T>();
  } catch (const YAML::Exception&) {
    throw StoreError(fmt::format("{}: key '{}' has the wrong type", where_of(n, what), key));
  }
}

// yaml-cpp keeps both entries of a repeated key and lookups see only the first: refuse them, at
// every depth, so that what the reader sees is what an editor of the file sees.
void check_unique_keys(const YAML::Node& n, const std::string& what) {
  if (n.IsSequence()) {
    for (const YAML::Node& c : n) check_unique_keys(c, what);
  } else if (n.IsMap()) {
    std::set<std::string> seen;
    for (const auto& kv : n) {
      const std::string key = kv.first.IsScalar() ? kv.first.Scalar() : std::string("?");
      if (!seen.insert(key).second)
        throw StoreError(fmt::format("{}: key '{}' appears twice in one mapping (line {}); keys must be unique", what,
                                     key, kv.first.Mark().line + 1));
      check_unique_keys(kv.second, what);
    }
  }
}

}  // namespace

std::string Manifest::to_yaml() const {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "format" << YAML::Value << format;
  out << YAML::Key << "source" << YAML::Value << source;
  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "architecture" << YAML::Value << model.architecture;
  out << YAML::Key << "dim" << YAML::Value << model.dim;
  out << YAML::Key << "n_layers" << YAML::Value << model.n_layers;
  out << YAML::Key << "n_heads" << YAML::Value << model.n_heads;
  out << YAML::Key << "n_kv_heads" << YAML::Value << model.n_kv_heads;
  out << YAML::Key << "head_dim" << YAML::Value << model.head_dim;
  out << YAML::Key << "ffn_dim" << YAML::Value << model.ffn_dim;
  out << YAML::Key << "vocab_size" << YAML::Value << model.vocab_size;
  out << YAML::Key << "max_position_embeddings" << YAML::Value << model.max_position_embeddings;
  out << YAML::Key << "norm_eps" << YAML::Value << YAML::Precision(17) << model.norm_eps;
  out << YAML::Key << "rope_theta" << YAML::Value << YAML::Precision(17) << model.rope_theta;
  out << YAML::Key << "rope_scaling" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "type" << YAML::Value << model.rope_scaling.type;
  out << YAML::Key << "factor" << YAML::Value << YAML::Precision(17) << model.rope_scaling.factor;
  out << YAML::Key << "low_freq_factor" << YAML::Value << YAML::Precision(17) << model.rope_scaling.low_freq_factor;
  out << YAML::Key << "high_freq_factor" << YAML::Value << YAML::Precision(17) << model.rope_scaling.high_freq_factor;
  out << YAML::Key << "original_max_position_embeddings" << YAML::Value
      << model.rope_scaling.original_max_position_embeddings;
  out << YAML::EndMap;
  out << YAML::Key << "tie_word_embeddings" << YAML::Value << model.tie_word_embeddings;
  out << YAML::Key << "bos_id" << YAML::Value << model.bos_id;
  out << YAML::Key << "eos_ids" << YAML::Value << YAML::Flow << model.eos_ids;
  out << YAML::EndMap;
  out << YAML::Key << "weights_size" << YAML::Value << weights_size;
  out << YAML::Key << "tokenizer_files" << YAML::Value << YAML::Flow << tokenizer_files;
  out << YAML::Key << "groups" << YAML::Value << YAML::BeginSeq;
  for (const GroupEntry& g : groups) {
    out << YAML::BeginMap;
    out << YAML::Key << "kind" << YAML::Value << group_kind_name(g.kind);
    out << YAML::Key << "layer" << YAML::Value << g.layer;
    out << YAML::Key << "offset" << YAML::Value << g.offset;
    out << YAML::Key << "size" << YAML::Value << g.size;
    out << YAML::Key << "xxh3" << YAML::Value << fmt::format("{:016x}", g.xxh3);
    out << YAML::Key << "tensors" << YAML::Value << YAML::BeginSeq;
    for (const TensorEntry& t : g.tensors) {
      out << YAML::Flow << YAML::BeginMap;
      out << YAML::Key << "name" << YAML::Value << t.name;
      out << YAML::Key << "dtype" << YAML::Value << dtype_name(t.dtype);
      out << YAML::Key << "shape" << YAML::Value << YAML::Flow << t.shape;
      out << YAML::Key << "offset" << YAML::Value << t.offset;
      out << YAML::Key << "size" << YAML::Value << t.size;
      // Only packed tensors carry these keys: a bf16 store reads as before this field existed.
      if (t.dtype == DType::INT4) out << YAML::Key << "group_size" << YAML::Value << t.group_size;
      if (dtype_packed(t.dtype)) {
        out << YAML::Key << "scales_offset" << YAML::Value << t.scales_offset;
        out << YAML::Key << "scales_size" << YAML::Value << t.scales_size;
      }
      out << YAML::EndMap;
    }
    out << YAML::EndSeq;
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

Manifest Manifest::from_yaml(const std::string& text, const std::string& what) {
  YAML::Node root;
  try {
    size_t docs = 0;
    root = load_yaml_document(text, &docs);
    if (docs > 1) throw StoreError(fmt::format("{}: holds {} YAML documents; a manifest is one", what, docs));
  } catch (const YAML::Exception& e) {
    throw StoreError(fmt::format("{}: not valid YAML: {}", what, e.what()));
  }
  if (!root.IsMap()) throw StoreError(fmt::format("{}: expected a mapping at the top", what));
  check_unique_keys(root, what);
  Manifest man;
  man.format = get<int>(root, "format", what);
  if (man.format != kManifestFormat)
    throw StoreError(fmt::format("{}: format {} is not supported (this build reads {})", what, man.format,
                                 kManifestFormat));
  man.source = get<std::string>(root, "source", what);
  YAML::Node m = root["model"];
  if (!m || !m.IsMap()) throw StoreError(fmt::format("{}: missing mapping 'model'", what));
  ModelConfig& mc = man.model;
  mc.architecture = get<std::string>(m, "architecture", what);
  mc.dim = get<int64_t>(m, "dim", what);
  mc.n_layers = get<int64_t>(m, "n_layers", what);
  mc.n_heads = get<int64_t>(m, "n_heads", what);
  mc.n_kv_heads = get<int64_t>(m, "n_kv_heads", what);
  mc.head_dim = get<int64_t>(m, "head_dim", what);
  mc.ffn_dim = get<int64_t>(m, "ffn_dim", what);
  mc.vocab_size = get<int64_t>(m, "vocab_size", what);
  mc.max_position_embeddings = get<int64_t>(m, "max_position_embeddings", what);
  mc.norm_eps = get<double>(m, "norm_eps", what);
  mc.rope_theta = get<double>(m, "rope_theta", what);
  YAML::Node rs = m["rope_scaling"];
  if (!rs || !rs.IsMap()) throw StoreError(fmt::format("{}: missing mapping 'model.rope_scaling'", what));
  mc.rope_scaling.type = get<std::string>(rs, "type", what);
  mc.rope_scaling.factor = get<double>(rs, "factor", what);
  mc.rope_scaling.low_freq_factor = get<double>(rs, "low_freq_factor", what);
  mc.rope_scaling.high_freq_factor = get<double>(rs, "high_freq_factor", what);
  mc.rope_scaling.original_max_position_embeddings = get<int64_t>(rs, "original_max_position_embeddings", what);
  mc.tie_word_embeddings = get<bool>(m, "tie_word_embeddings", what);
  mc.bos_id = get<int64_t>(m, "bos_id", what);
  mc.eos_ids = get<std::vector<int64_t>>(m, "eos_ids", what);
  man.weights_size = get<uint64_t>(root, "weights_size", what);
  man.tokenizer_files = get<std::vector<std::string>>(root, "tokenizer_files", what);
  YAML::Node gs = root["groups"];
  if (!gs || !gs.IsSequence()) throw StoreError(fmt::format("{}: missing sequence 'groups'", what));
  for (const YAML::Node& gn : gs) {
    if (!gn.IsMap()) throw StoreError(fmt::format("{}: a group is not a mapping", where_of(gn, what)));
    GroupEntry g;
    std::string kind = get<std::string>(gn, "kind", what);
    if (kind == "globals") g.kind = GroupKind::Globals;
    else if (kind == "attn") g.kind = GroupKind::Attn;
    else if (kind == "ffn") g.kind = GroupKind::Ffn;
    else throw StoreError(fmt::format("{}: unknown group kind '{}'", where_of(gn, what), kind));
    g.layer = get<int64_t>(gn, "layer", what);
    g.offset = get<uint64_t>(gn, "offset", what);
    g.size = get<uint64_t>(gn, "size", what);
    std::string h = get<std::string>(gn, "xxh3", what);
    size_t used = 0;
    try {
      g.xxh3 = std::stoull(h, &used, 16);
    } catch (const std::exception&) {
      used = 0;
    }
    if (h.size() != 16 || used != h.size())
      throw StoreError(fmt::format("{}: xxh3 '{}' is not 16 hex digits", where_of(gn, what), h));
    YAML::Node ts = gn["tensors"];
    if (!ts || !ts.IsSequence()) throw StoreError(fmt::format("{}: missing sequence 'tensors'", where_of(gn, what)));
    for (const YAML::Node& tn : ts) {
      if (!tn.IsMap()) throw StoreError(fmt::format("{}: a tensor is not a mapping", where_of(tn, what)));
      TensorEntry t;
      t.name = get<std::string>(tn, "name", what);
      t.dtype = parse_dtype(get<std::string>(tn, "dtype", what));
      t.shape = get<std::vector<int64_t>>(tn, "shape", what);
      t.offset = get<uint64_t>(tn, "offset", what);
      t.size = get<uint64_t>(tn, "size", what);
      // Each key where its dtype has it, and nowhere else.
      const bool packed = dtype_packed(t.dtype), int4 = t.dtype == DType::INT4;
      for (const auto& [key, wanted] : {std::pair<const char*, bool>{"group_size", int4}, {"scales_offset", packed},
                                        {"scales_size", packed}})
        if (!wanted && tn[key])
          throw StoreError(fmt::format("{}: tensor '{}' is {} and has no '{}'", where_of(tn, what), t.name,
                                       dtype_name(t.dtype), key));
      if (int4) t.group_size = get<int64_t>(tn, "group_size", what);
      if (packed) {
        t.scales_offset = get<uint64_t>(tn, "scales_offset", what);
        t.scales_size = get<uint64_t>(tn, "scales_size", what);
      }
      g.tensors.push_back(std::move(t));
    }
    man.groups.push_back(std::move(g));
  }
  try {
    man.validate();
  } catch (const StoreError& e) {
    throw StoreError(fmt::format("{}: {}", what, e.what()));
  }
  return man;
}

Manifest Manifest::load(const std::string& path) {
  return from_yaml(read_regular_file(path, kMaxManifestBytes), path);
}

void Manifest::save(const std::string& path) const {
  std::ofstream out(path, std::ios::trunc);
  if (!out) throw StoreError(fmt::format("{}: cannot create: {}", path, errno_text(errno)));
  out << to_yaml();
  out.flush();
  if (!out) throw StoreError(fmt::format("{}: write failed: {}", path, errno_text(errno)));
}

}  // namespace ringllama
