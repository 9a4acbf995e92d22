// Reading GGUF files (llama.cpp's model format), versions 2 and 3:
//
//   "GGUF" u32 version, u64 tensor_count, u64 kv_count,
//   kv_count x (string key, u32 value type, value),  string = u64 length + bytes (no NUL),
//   tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset),
//   padding to general.alignment (default 32), then the data section; offsets are from its start.
//
// Everything in a GGUF is outside input: every count and length is bounded (by the file's size and
// by fixed limits) before anything is allocated from it, every product is checked for overflow,
// every tensor must lie inside the file, and a value type or tensor type this reader does not know
// is refused with one line naming the key or tensor. Little-endian files only (as llama.cpp writes
// them); a big-endian one is refused.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ringllama {

// Metadata value types, numbered as in the format.
enum class GgufValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};
const char* gguf_value_type_name(GgufValueType t);

// Tensor element types, numbered as ggml does. The reader knows the block sizes of these; the
// packer converts some of them (see daemon/gguf_model.h). Others are refused when parsing.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
};
const char* ggml_type_name(GgmlType t);
// Elements per block and bytes per block; false for a number that is no type listed above.
bool ggml_type_layout(uint32_t type, uint64_t* block_elems, uint64_t* block_bytes);

// Limits on what a GGUF may claim. Real files sit far below them (Llama 3: 128256 tokens, 280147
// merges, 291 tensors of 1-2 dimensions); they bound memory and time before the file is trusted.
inline constexpr uint64_t kGgufMaxKv = 1 << 16;
inline constexpr uint64_t kGgufMaxTensors = 1 << 20;
inline constexpr uint64_t kGgufMaxKeyBytes = 1 << 16;
inline constexpr uint64_t kGgufMaxStringBytes = 64ull << 20;   // one string value (a chat template)
inline constexpr uint64_t kGgufMaxArrayLen = 1ull << 24;      // elements of one array
inline constexpr uint32_t kGgufMaxDims = 4;                   // GGML_MAX_DIMS
inline constexpr uint64_t kGgufMaxDim = 1ull << 40;
inline constexpr uint64_t kGgufMaxAlignment = 1 << 16;

// One metadata value. Scalars keep their integer or float value; arrays keep their element type
// and the elements in the vector that fits (integers and bools in ints, floats in floats, strings
// in strings). Arrays of arrays are refused.
struct GgufValue {
  GgufValueType type = GgufValueType::UINT8;
  GgufValueType elem_type = GgufValueType::UINT8;  // arrays only
  uint64_t u = 0;        // unsigned scalars and bool
  int64_t i = 0;         // signed scalars
  double f = 0;          // float scalars
  std::string s;         // string
  std::vector<int64_t> ints;  // integer and bool arrays (uint64 values above INT64_MAX are refused)
  std::vector<double> floats;
  std::vector<std::string> strings;

  bool is_integer() const;  // any integer scalar type
  bool is_float() const;    // FLOAT32 or FLOAT64
  uint64_t array_size() const;
  std::string type_text() const;  // "uint32", "array[string]"
};

struct GgufKv {
  std::string key;
  GgufValue value;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] is the innermost (the row length of a matrix)
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;      // bytes from the start of the data section
  uint64_t bytes = 0;       // bytes of its data
  uint64_t numel = 0;
  // Row-major shape, outermost first: a matrix of ne {in, out} is [out, in], as in PyTorch.
  std::vector<int64_t> shape() const;
};

class GgufFile {
 public:
  // Parses a whole file held in memory (which must outlive the object: read() copies from it).
  // `what` names it in messages. Throws StoreError.
  static GgufFile parse(const void* data, uint64_t size, const std::string& what);
  // Opens and parses a file; tensor data stays on disk and is read with pread. Throws StoreError.
  static GgufFile open(const std::string& path);

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  const std::string& what() const { return what_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // from the start of the file
  uint64_t file_size() const { return file_size_; }
  const std::vector<GgufKv>& kvs() const { return kvs_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  const GgufValue* find(const std::string& key) const;
  const GgufTensorInfo* find_tensor(const std::string& name) const;

  // Typed getters: each throws StoreError "FILE: key 'K' is missing" or "... is a T, expected ...".
  // The opt_ forms return nothing for a missing key and still refuse a wrong type.
  std::string get_string(const std::string& key) const;
  std::optional<std::string> opt_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;               // any integer type that fits int64
  std::optional<int64_t> opt_int(const std::string& key) const;
  double get_float(const std::string& key) const;              // floats, and integers as floats
  std::optional<double> opt_float(const std::string& key) const;
  std::optional<bool> opt_bool(const std::string& key) const;
  const std::vector<std::string>& get_strings(const std::string& key) const;  // array of strings
  const std::vector<int64_t>& get_ints(const std::string& key) const;         // array of integers

  // Bytes [first, first + n) of a tensor's data. Throws StoreError on a short read.
  void read(const GgufTensorInfo& t, uint64_t first, uint64_t n, void* out) const;

 private:
  GgufFile() = default;
  const GgufValue& require(const std::string& key) const;
  [[noreturn]] void wrong_type(const std::string& key, const GgufValue& v, const char* want) const;

  std::string what_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  uint64_t file_size_ = 0;
  std::vector<GgufKv> kvs_;
  std::map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
  int fd_ = -1;                      // open(): the file
  const unsigned char* mem_ = nullptr;  // parse(): the caller's buffer
};

}  // namespace ringllama
