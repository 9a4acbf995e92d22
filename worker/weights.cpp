#include "worker/weights.h"

#include <cstdlib>

#include "common/errors.h"
#include "common/store.h"

namespace ringllama {

namespace {

const bf16_t* tensor_at(const GroupEntry& g, const std::string& name, const char* base) {
  const TensorEntry& t = g.tensor(name);
  if (t.dtype != DType::BF16)
    throw StoreError(fmt::format("{}: tensor '{}' is {}; it must be bf16", g.label(), name, dtype_name(t.dtype)));
  return reinterpret_cast<const bf16_t*>(base + t.offset);
}

}  // namespace

const bf16_t* MatrixView::bf16() const {
  if (packed())
    throw Error(fmt::format("a {}x{} weight is {}, and this code multiplies bf16 weights only", rows, cols,
                            dtype_name(dtype)));
  return static_cast<const bf16_t*>(data);
}

MatrixView matrix_view(const GroupEntry& g, const std::string& name, const void* group_base) {
  const TensorEntry& t = g.tensor(name);
  const char* b = static_cast<const char*>(group_base);
  MatrixView v;
  v.data = b + t.offset;
  v.dtype = t.dtype;
  v.rows = t.shape.at(0);
  v.cols = t.shape.at(1);
  v.scales = dtype_packed(t.dtype) ? b + t.scales_offset : nullptr;
  v.group = t.group_size;
  return v;
}

bool store_packed(const Manifest& m) {
  for (const GroupEntry& g : m.groups)
    for (const TensorEntry& t : g.tensors)
      if (dtype_packed(t.dtype)) return true;
  return false;
}

GlobalWeights globals_view(const Manifest& m, const void* base) {
  const GroupEntry& g = m.globals();
  const char* b = static_cast<const char*>(base);
  GlobalWeights w;
  w.tok_embeddings = tensor_at(g, "tok_embeddings", b);
  w.norm = tensor_at(g, "norm", b);
  w.output = matrix_view(g, m.model.tie_word_embeddings ? "tok_embeddings" : "output", b);
  return w;
}

LayerWeights layer_view(const Manifest& m, int64_t layer, const void* base) {
  const GroupEntry& attn = m.attn(layer);
  const GroupEntry& ffn = m.ffn(layer);
  const char* a = static_cast<const char*>(base);
  // The ffn group follows the attn group in the file and in the span.
  const char* f = a + (ffn.offset - attn.offset);
  LayerWeights w;
  w.attn_norm = tensor_at(attn, "attn_norm", a);
  w.wq = matrix_view(attn, "wq", a);
  w.wk = matrix_view(attn, "wk", a);
  w.wv = matrix_view(attn, "wv", a);
  w.wo = matrix_view(attn, "wo", a);
  w.ffn_norm = tensor_at(ffn, "ffn_norm", f);
  w.w1 = matrix_view(ffn, "w1", f);
  w.w3 = matrix_view(ffn, "w3", f);
  w.w2 = matrix_view(ffn, "w2", f);
  return w;
}

namespace {

// The whole weights.bin in one buffer laid out as in the file, so that every group sits at its
// file offset and stays 4 KiB-aligned (the same alignment a ring slot gives).
class StoreWeights : public WeightSource {
 public:
  explicit StoreWeights(const std::string& dir) : store_(Store::open(dir)) {
    const Manifest& m = store_.manifest();
    void* p = nullptr;
    const uint64_t bytes = align_up(m.weights_size, kGroupAlign);
    int rc = posix_memalign(&p, kGroupAlign, bytes);
    if (rc != 0)
      throw Error(fmt::format("{}: cannot allocate {} bytes for the weights: {}", dir, bytes, errno_text(rc)));
    buf_.reset(static_cast<char*>(p));
    for (const GroupEntry& g : m.groups) store_.read_group(g, buf_.get() + g.offset);
    globals_ = globals_view(m, buf_.get() + m.globals().offset);
  }

  const Manifest& manifest() const override { return store_.manifest(); }
  GlobalWeights globals() override { return globals_; }
  LayerWeights acquire_layer(int64_t layer) override {
    const Manifest& m = store_.manifest();
    if (layer < 0 || layer >= m.model.n_layers)
      throw Error(fmt::format("layer {} does not exist (the model has {})", layer, m.model.n_layers));
    return layer_view(m, layer, buf_.get() + m.layer_offset(layer));
  }
  void release_layer(int64_t) override {}
  std::vector<HostRange> host_memory() const override {
    return {HostRange{buf_.get(), align_up(store_.manifest().weights_size, kGroupAlign)}};
  }

 private:
  Store store_;
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> buf_;
  GlobalWeights globals_;
};

}  // namespace

std::unique_ptr<WeightSource> open_store_weights(const std::string& store_dir) {
  return std::make_unique<StoreWeights>(store_dir);
}

}  // namespace ringllama
