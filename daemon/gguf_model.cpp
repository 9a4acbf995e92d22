#include "daemon/gguf_model.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <set>

#include "common/bf16.h"
#include "common/errors.h"
#include "common/quant.h"

namespace ringllama {

namespace {

uint16_t le16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
float half(const unsigned char* p) { return f16_to_f32(le16(p)); }

// The block layouts of ggml-common.h. Every formula keeps ggml's (and gguf.quants') order of
// float operations, so that both give the same floats.
void dequant_block(GgmlType t, const unsigned char* b, float* y) {
  switch (t) {
    case GgmlType::Q8_0: {  // f16 d, 32 x int8
      const float d = half(b);
      for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
      return;
    }
    case GgmlType::Q4_0: {  // f16 d, 16 bytes: element j in the low nibble of byte j, j + 16 in its high nibble
      const float d = half(b);
      for (int j = 0; j < 16; ++j) {
        y[j] = static_cast<float>((b[2 + j] & 0x0F) - 8) * d;
        y[j + 16] = static_cast<float>((b[2 + j] >> 4) - 8) * d;
      }
      return;
    }
    case GgmlType::Q4_1: {  // f16 d, f16 m, 16 bytes of nibbles as Q4_0
      const float d = half(b), m = half(b + 2);
      for (int j = 0; j < 16; ++j) {
        y[j] = d * static_cast<float>(b[4 + j] & 0x0F) + m;
        y[j + 16] = d * static_cast<float>(b[4 + j] >> 4) + m;
      }
      return;
    }
    case GgmlType::Q5_0:
    case GgmlType::Q5_1: {  // f16 d, (f16 m), u32 fifth bits, 16 bytes of nibbles
      const bool q51 = t == GgmlType::Q5_1;
      const float d = half(b), m = q51 ? half(b + 2) : 0.0f;
      const unsigned char* qhp = b + (q51 ? 4 : 2);
      const uint32_t qh = qhp[0] | (qhp[1] << 8) | (qhp[2] << 16) | (static_cast<uint32_t>(qhp[3]) << 24);
      const unsigned char* qs = qhp + 4;
      for (int j = 0; j < 16; ++j) {
        const int x0 = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
        const int x1 = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        if (q51) {
          y[j] = d * static_cast<float>(x0) + m;
          y[j + 16] = d * static_cast<float>(x1) + m;
        } else {
          y[j] = d * static_cast<float>(x0 - 16);
          y[j + 16] = d * static_cast<float>(x1 - 16);
        }
      }
      return;
    }
    case GgmlType::Q4_K: {  // f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
      const float d = half(b), dmin = half(b + 2);
      const unsigned char* s = b + 4;
      const unsigned char* qs = b + 16;
      for (int j = 0; j < 8; ++j) {  // 8 sub-blocks of 32
        int sc, mn;
        if (j < 4) {
          sc = s[j] & 0x3F;
          mn = s[j + 4] & 0x3F;
        } else {
          sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
          mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
        }
        const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
        const unsigned char* q = qs + (j / 2) * 32;
        const int shift = (j % 2) * 4;
        for (int k = 0; k < 32; ++k) y[j * 32 + k] = dl * static_cast<float>((q[k] >> shift) & 0x0F) - ml;
      }
      return;
    }
    case GgmlType::Q6_K: {  // 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, f16 d
      const unsigned char* ql = b;
      const unsigned char* qh = b + 128;
      const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
      const float d = half(b + 208);
      for (int e = 0; e < 256; ++e) {
        const int p = e / 128, r = e % 128;
        const int lo = (ql[p * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
        const int hi = (qh[p * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
        y[e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>((lo | (hi << 4)) - 32);
      }
      return;
    }
    default:
      throw Error(fmt::format("no dequantization for GGUF type {}", ggml_type_name(t)));
  }
}

std::string shape_text(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

size_t store_index(const GroupEntry& g) {
  if (g.kind == GroupKind::Globals) return 0;
  return 1 + 2 * static_cast<size_t>(g.layer) + (g.kind == GroupKind::Ffn ? 1 : 0);
}

// A positive integer key within [1, hi].
int64_t bounded(const GgufFile& f, const std::string& key, std::optional<int64_t> fallback, int64_t hi) {
  std::optional<int64_t> v = f.opt_int(key);
  if (!v) {
    if (!fallback) throw StoreError(fmt::format("{}: key '{}' is missing", f.what(), key));
    return *fallback;
  }
  if (*v < 1 || *v > hi) throw StoreError(fmt::format("{}: key '{}' is {}; must be between 1 and {}", f.what(), key, *v, hi));
  return *v;
}

// Llama 3 rope scaling reaches a GGUF only as rope_freqs.weight: one factor per frequency pair,
// which divides that frequency (convert_hf_to_gguf.py computes them from factor, low/high
// freq_factor and original_max_position_embeddings). The forward depends on those four only
// through the factors, so any llama3 parameters that give the same factors run the same model:
// this finds such parameters and then checks, frequency by frequency, that they do.
void recover_llama3_scaling(const GgufFile& f, ModelConfig& m) {
  const GgufTensorInfo* t = f.find_tensor("rope_freqs.weight");
  if (!t) return;
  const int64_t half_dim = m.head_dim / 2;
  if (t->type != GgmlType::F32 || t->ne.size() != 1 || t->ne[0] != half_dim)
    throw StoreError(fmt::format("{}: rope_freqs.weight is {} {}; expected F32 [{}]", f.what(), ggml_type_name(t->type),
                                 shape_text(t->shape()), half_dim));
  std::vector<float> fac(half_dim);
  f.read(*t, 0, t->bytes, fac.data());
  double big = 1;
  for (float x : fac) {
    if (!std::isfinite(x) || x < 1.0f - 1e-6f || x > 1024.0f)
      throw StoreError(fmt::format("{}: rope_freqs.weight holds {}, outside the [1, 1024] of llama3 scaling", f.what(), x));
    big = std::max(big, static_cast<double>(x));
  }
  if (big <= 1 + 1e-6) return;  // all ones: no scaling

  ModelConfig base = m;
  base.rope_scaling = RopeScaling{};
  const std::vector<double> inv = rope_inv_freq(base);
  auto reproduces = [&](const ModelConfig& c) {
    const std::vector<double> got = rope_inv_freq(c);
    for (int64_t i = 0; i < half_dim; ++i)
      if (std::fabs(got[i] - inv[i] / fac[i]) > 1e-5 * inv[i] / fac[i]) return false;
    return true;
  };
  // Llama 3.1 and 3.2's own parameters first, so that their manifests read as their config.json.
  std::vector<int64_t> origs = {8192, std::llround(static_cast<double>(m.max_position_embeddings) / big)};
  if (auto o = f.opt_int("llama.rope.scaling.original_context_length")) origs.insert(origs.begin(), *o);
  for (int64_t orig : origs)
    for (auto [lo, hi] : {std::pair<double, double>{1, 4}, {2, 8}}) {
      ModelConfig c = m;
      c.rope_scaling = {"llama3", big, lo, hi, std::clamp<int64_t>(orig, 1, kMaxPositions)};
      if (reproduces(c)) {
        m = c;
        return;
      }
    }
  // y = 1 / wavelength. Frequencies with y < l get the full factor, y > h none, in between
  // smooth = (y - l) / (h - l) (l = low_freq_factor / original, h = high_freq_factor / original).
  double max_full = 0, min_none = std::numeric_limits<double>::infinity();
  std::vector<std::pair<double, double>> mid;  // (y, smooth)
  for (int64_t i = 0; i < half_dim; ++i) {
    const double y = inv[i] / (2 * M_PI), x = fac[i];
    if (std::fabs(x - big) <= 1e-6 * big) {
      max_full = std::max(max_full, y);
    } else if (std::fabs(x - 1) <= 1e-6) {
      min_none = std::min(min_none, y);
    } else {
      mid.push_back({y, (1 / x - 1 / big) / (1 - 1 / big)});
    }
  }
  double l = 0, h = 0;
  if (mid.size() >= 2) {
    const auto& a = mid.front();
    const auto& b = mid.back();
    const double w = (a.first - b.first) / (a.second - b.second);
    l = a.first - a.second * w;
    h = l + w;
  } else if (mid.size() == 1) {
    const double y = mid[0].first, s = mid[0].second;
    // h = l + (y - l) / s must stay at or below min_none: l >= (y / s - min_none) / (1 / s - 1).
    double lo = max_full;
    if (std::isfinite(min_none)) lo = std::max(lo, (y / s - min_none) / (1 / s - 1));
    l = (lo + y) / 2;
    h = l + (y - l) / s;
  } else {
    const double top = std::isfinite(min_none) ? min_none : 2 * max_full;
    l = max_full + (top - max_full) / 3;
    h = max_full + 2 * (top - max_full) / 3;
  }
  if (!(l > 0) || !(h > l))
    throw StoreError(fmt::format("{}: rope_freqs.weight holds factors that no llama3 rope scaling gives", f.what()));
  // Any original length works; one that puts low_freq_factor near 1 keeps the numbers readable.
  const int64_t orig = std::clamp<int64_t>(std::llround(1 / l), 1, kMaxPositions);
  RopeScaling& s = m.rope_scaling;
  s.type = "llama3";
  s.factor = big;
  s.original_max_position_embeddings = orig;
  s.low_freq_factor = l * static_cast<double>(orig);
  s.high_freq_factor = h * static_cast<double>(orig);
  const std::vector<double> got = rope_inv_freq(m);
  for (int64_t i = 0; i < half_dim; ++i) {
    const double want = inv[i] / fac[i];
    if (std::fabs(got[i] - want) > 1e-5 * want)
      throw StoreError(fmt::format("{}: rope_freqs.weight factor {} of pair {} is not what llama3 rope scaling gives "
                                   "(best fit: {})",
                                   f.what(), fac[i], i, inv[i] / got[i]));
  }
}

}  // namespace

bool gguf_type_packable(GgmlType t) {
  switch (t) {
    case GgmlType::F32: case GgmlType::F16: case GgmlType::BF16: case GgmlType::Q8_0: case GgmlType::Q4_0:
    case GgmlType::Q4_1: case GgmlType::Q5_0: case GgmlType::Q5_1: case GgmlType::Q4_K: case GgmlType::Q6_K:
      return true;
    default:
      return false;
  }
}

void dequantize_blocks(GgmlType t, const unsigned char* src, uint64_t n_blocks, float* out) {
  uint64_t be = 0, bb = 0;
  if (!gguf_type_packable(t) || !ggml_type_layout(static_cast<uint32_t>(t), &be, &bb))
    throw Error(fmt::format("no dequantization for GGUF type {}", ggml_type_name(t)));
  for (uint64_t k = 0; k < n_blocks; ++k) {
    const unsigned char* b = src + k * bb;
    float* y = out + k * be;
    switch (t) {
      case GgmlType::F32: std::memcpy(y, b, 4); break;
      case GgmlType::F16: *y = half(b); break;
      case GgmlType::BF16: *y = bf16_to_f32(le16(b)); break;
      default: dequant_block(t, b, y);
    }
  }
}

int64_t gguf_permuted_row(int64_t hf_row, int64_t rows, int64_t n_head) {
  const int64_t hd = rows / n_head, half_hd = hd / 2;
  const int64_t head = hf_row / hd, r = hf_row % hd;
  // HF row r = i * half + j of a head sits at 2 * j + i in the converter's order.
  return head * hd + 2 * (r % half_hd) + r / half_hd;
}

ModelConfig gguf_model_config(const GgufFile& f) {
  const std::string arch = f.get_string("general.architecture");
  if (arch != "llama")
    throw StoreError(fmt::format("{}: general.architecture is '{}'; only llama is supported", f.what(), arch));
  const std::string p = "llama.";
  ModelConfig m;
  m.architecture = "llama";
  m.n_layers = bounded(f, p + "block_count", std::nullopt, kMaxLayers);
  m.dim = bounded(f, p + "embedding_length", std::nullopt, kMaxDim);
  m.ffn_dim = bounded(f, p + "feed_forward_length", std::nullopt, kMaxFfnDim);
  m.n_heads = bounded(f, p + "attention.head_count", std::nullopt, kMaxHeads);
  m.n_kv_heads = bounded(f, p + "attention.head_count_kv", m.n_heads, kMaxHeads);
  m.head_dim = bounded(f, p + "attention.key_length", m.dim / m.n_heads, kMaxHeadDim);
  if (bounded(f, p + "attention.value_length", m.head_dim, kMaxHeadDim) != m.head_dim)
    throw StoreError(fmt::format("{}: {}attention.value_length differs from key_length {}; not supported", f.what(), p,
                                 m.head_dim));
  if (bounded(f, p + "rope.dimension_count", m.head_dim, kMaxHeadDim) != m.head_dim)
    throw StoreError(fmt::format("{}: {}rope.dimension_count is not the head size {}: partial rotary is not supported",
                                 f.what(), p, m.head_dim));
  m.max_position_embeddings = bounded(f, p + "context_length", 2048, kMaxPositions);
  m.rope_theta = f.opt_float(p + "rope.freq_base").value_or(10000.0);
  m.norm_eps = f.get_float(p + "attention.layer_norm_rms_epsilon");
  if (auto st = f.opt_string(p + "rope.scaling.type"); st && *st != "none")
    throw StoreError(fmt::format("{}: {}rope.scaling.type is '{}'; only llama3 scaling (rope_freqs.weight) is supported",
                                 f.what(), p, *st));

  // The vocabulary is the token list; the embedding's rows must agree (checked with the shapes).
  const GgufTensorInfo* emb = f.find_tensor("token_embd.weight");
  if (f.find("tokenizer.ggml.tokens")) {
    m.vocab_size = static_cast<int64_t>(f.get_strings("tokenizer.ggml.tokens").size());
  } else if (emb && emb->ne.size() == 2) {
    m.vocab_size = emb->ne[1];
  } else {
    throw StoreError(fmt::format("{}: no tokenizer.ggml.tokens and no token_embd.weight to tell the vocabulary size",
                                 f.what()));
  }
  if (auto v = f.opt_int(p + "vocab_size"); v && *v != m.vocab_size)
    throw StoreError(fmt::format("{}: {}vocab_size is {} but the token list holds {} tokens", f.what(), p, *v,
                                 m.vocab_size));
  m.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;

  m.bos_id = f.opt_int("tokenizer.ggml.bos_token_id").value_or(-1);
  std::set<int64_t> eos;
  for (const char* k : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (auto id = f.opt_int(k)) {
      if (*id < 0 || *id >= m.vocab_size)
        throw StoreError(fmt::format("{}: {} is {}, outside the vocabulary of {}", f.what(), k, *id, m.vocab_size));
      if (eos.insert(*id).second) m.eos_ids.push_back(*id);
    }
  recover_llama3_scaling(f, m);
  try {
    m.validate();
  } catch (const StoreError& e) {
    throw StoreError(fmt::format("{}: {}", f.what(), e.what()));
  }
  return m;
}

std::string gguf_tensor_name(const GroupEntry& g, const std::string& n) {
  if (g.kind == GroupKind::Globals) {
    if (n == "tok_embeddings") return "token_embd.weight";
    if (n == "norm") return "output_norm.weight";
    if (n == "output") return "output.weight";
  } else {
    static const std::map<std::string, std::string> names = {
        {"attn_norm", "attn_norm"}, {"wq", "attn_q"},        {"wk", "attn_k"},  {"wv", "attn_v"},
        {"wo", "attn_output"},      {"ffn_norm", "ffn_norm"}, {"w1", "ffn_gate"}, {"w3", "ffn_up"},
        {"w2", "ffn_down"}};
    auto it = names.find(n);
    if (it != names.end()) return fmt::format("blk.{}.{}.weight", g.layer, it->second);
  }
  throw Error(fmt::format("no GGUF name for store tensor '{}' of {}", n, g.label()));
}

GgufSource::GgufSource(const GgufFile& f, const Manifest& plan) : file_(f) {
  const ModelConfig& m = plan.model;
  std::set<std::string> used = {"rope_freqs.weight"};  // read into the config
  for (const GroupEntry& g : plan.groups) {
    if (store_index(g) != refs_.size()) throw Error("gguf source: groups are not in store order");
    refs_.emplace_back();
    for (const TensorEntry& t : g.tensors) {
      const std::string name = gguf_tensor_name(g, t.name);
      const GgufTensorInfo* info = f.find_tensor(name);
      if (!info) {
        if (t.name == "wq" && f.find_tensor(fmt::format("blk.{}.attn_qkv.weight", g.layer)))
          throw StoreError(fmt::format("{}: fused attn_qkv tensors are not supported", f.what()));
        throw StoreError(fmt::format("{}: tensor '{}' is missing", f.what(), name));
      }
      if (info->shape() != t.shape)
        throw StoreError(fmt::format("{}: tensor '{}' has shape {}, the metadata says {}", f.what(), name,
                                     shape_text(info->shape()), shape_text(t.shape)));
      if (!gguf_type_packable(info->type))
        throw StoreError(fmt::format("{}: tensor '{}' is {}; the packer converts F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                     "Q5_0, Q5_1, Q4_K and Q6_K",
                                     f.what(), name, ggml_type_name(info->type)));
      Ref r;
      r.tensor = info;
      if (t.name == "wq") r.permute_heads = m.n_heads;
      if (t.name == "wk") r.permute_heads = m.n_kv_heads;
      refs_.back().push_back(r);
      used.insert(name);
    }
  }
  for (const GgufTensorInfo& t : f.tensors()) {
    if (used.count(t.name)) continue;
    // A bias would change the model; anything else unused is reported.
    if (t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".bias") == 0)
      throw StoreError(fmt::format("{}: tensor '{}': biased projections are not supported", f.what(), t.name));
    spdlog::warn("{}: tensor '{}' not packed", f.what(), t.name);
  }
}

void GgufSource::read_row(const Ref& r, int64_t row, std::vector<unsigned char>& raw) const {
  const GgufTensorInfo& t = *r.tensor;
  const uint64_t row_len = static_cast<uint64_t>(t.ne[0]);
  const uint64_t rows = t.numel / row_len;
  uint64_t be = 0, bb = 0;
  ggml_type_layout(static_cast<uint32_t>(t.type), &be, &bb);
  const uint64_t row_bytes = row_len / be * bb;
  const uint64_t src_row =
      r.permute_heads > 0 ? static_cast<uint64_t>(gguf_permuted_row(row, static_cast<int64_t>(rows), r.permute_heads))
                          : static_cast<uint64_t>(row);
  raw.resize(row_bytes);
  file_.read(t, src_row * row_bytes, row_bytes, raw.data());
}

void GgufSource::fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const {
  const Ref& r = refs_.at(store_index(g)).at(ti);
  const GgufTensorInfo& t = *r.tensor;
  const uint64_t row_len = static_cast<uint64_t>(t.ne[0]);
  uint64_t be = 0, bb = 0;
  ggml_type_layout(static_cast<uint32_t>(t.type), &be, &bb);
  std::vector<unsigned char> raw;
  std::vector<float> vals(row_len);
  uint64_t done = 0;
  while (done < count) {
    const uint64_t e = first + done;
    const uint64_t row = e / row_len, col = e % row_len;
    const uint64_t n = std::min(count - done, row_len - col);
    read_row(r, static_cast<int64_t>(row), raw);
    dequantize_blocks(t.type, raw.data(), row_len / be, vals.data());
    for (uint64_t k = 0; k < n; ++k) out[done + k] = f32_to_bf16(vals[col + k]);
    done += n;
  }
}

void GgufSource::fill_rows_f32(const GroupEntry& g, size_t ti, int64_t row0, int64_t rows, float* out) const {
  const Ref& r = refs_.at(store_index(g)).at(ti);
  const GgufTensorInfo& t = *r.tensor;
  const int64_t row_len = t.ne[0];
  uint64_t be = 0, bb = 0;
  ggml_type_layout(static_cast<uint32_t>(t.type), &be, &bb);
  std::vector<unsigned char> raw;
  for (int64_t i = 0; i < rows; ++i) {
    read_row(r, row0 + i, raw);
    dequantize_blocks(t.type, raw.data(), static_cast<uint64_t>(row_len) / be, out + i * row_len);
  }
}

GgmlType GgufSource::tensor_type(const GgufFile& f, const GroupEntry& g, const std::string& name) {
  const GgufTensorInfo* info = f.find_tensor(gguf_tensor_name(g, name));
  if (!info) throw StoreError(fmt::format("{}: tensor '{}' is missing", f.what(), gguf_tensor_name(g, name)));
  return info->type;
}

bool GgufSource::fill_int4(const GroupEntry& g, size_t ti, int64_t row0, int64_t rows, uint8_t* q,
                           uint16_t* sm) const {
  const Ref& r = refs_.at(store_index(g)).at(ti);
  const GgufTensorInfo& t = *r.tensor;
  const TensorEntry& te = g.tensors.at(ti);
  const bool q4_1 = t.type == GgmlType::Q4_1;
  if ((t.type != GgmlType::Q4_0 && !q4_1) || te.group_size != 32) return false;
  const int64_t row_len = t.ne[0], blocks = row_len / 32;
  const size_t block_bytes = q4_1 ? 20 : 18;
  std::vector<unsigned char> raw;
  for (int64_t i = 0; i < rows; ++i) {
    read_row(r, row0 + i, raw);
    uint8_t* qr = q + i * (row_len / 2);
    uint16_t* sr = sm + i * blocks * 2;
    for (int64_t k = 0; k < blocks; ++k) {
      const unsigned char* b = raw.data() + static_cast<size_t>(k) * block_bytes;
      const uint16_t d = le16(b);
      uint16_t min;
      if (q4_1) {
        min = le16(b + 2);
      } else {
        // Q4_0 is (q - 8) * d: min -8d, exact in half (a power-of-two multiple) unless it overflows.
        const float m = -8.0f * f16_to_f32(d);
        min = float_to_half(m);
        if (half_to_float(min) != m)
          throw StoreError(fmt::format("{}: tensor '{}' row {} block {}: -8 x scale {} does not fit a half; pack "
                                       "with --group-size 128 to requantize it",
                                       file_.what(), t.name, row0 + i, k, f16_to_f32(d)));
      }
      sr[2 * k] = d;
      sr[2 * k + 1] = min;
      // GGUF: element j in the low nibble of byte j, j + 16 in its high nibble; the store pairs
      // neighbours (2j low, 2j + 1 high).
      const unsigned char* nib = b + (q4_1 ? 4 : 2);
      uint8_t* out = qr + k * 16;
      for (int j = 0; j < 16; ++j) {
        const int e0 = 2 * j, e1 = 2 * j + 1;
        const int v0 = e0 < 16 ? nib[e0] & 0xF : nib[e0 - 16] >> 4;
        const int v1 = e1 < 16 ? nib[e1] & 0xF : nib[e1 - 16] >> 4;
        out[j] = static_cast<uint8_t>(v0 | (v1 << 4));
      }
    }
  }
  return true;
}

}  // namespace ringllama
