// Reading Hugging Face safetensors files: an 8-byte little-endian header length, a JSON header
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
// Everything in the header is outside input and is checked before a byte of data is trusted.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/bf16.h"

namespace ringllama {

// The element types the safetensors format names. Only BF16, F16 and F32 can be packed; the
// others are parsed (a file may hold them) and refused when a weight has one.
enum class StDType { BOOL, U8, I8, F8_E4M3, F8_E5M2, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

const char* st_dtype_name(StDType t);
uint64_t st_dtype_bytes(StDType t);
bool st_dtype_convertible(StDType t);  // BF16, F16, F32

struct StTensor {
  std::string name;
  StDType dtype = StDType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // bytes from the start of the data area
  uint64_t end = 0;
  uint64_t numel() const;
};

struct StHeader {
  uint64_t header_len = 0;                   // bytes of JSON after the 8-byte length
  std::map<std::string, StTensor> tensors;
  std::map<std::string, std::string> metadata;  // "__metadata__", string values only
  uint64_t data_start() const { return 8 + header_len; }
};

// The largest header accepted; the format's own reader refuses more than 100 MB as well.
inline constexpr uint64_t kMaxStHeaderBytes = 100ull << 20;
// Bounds on a tensor's shape: no weight has more dimensions or a longer one (2^40 elements is
// 2 TiB of bf16), and within them every element count and byte size is checked for overflow.
inline constexpr size_t kMaxStRank = 8;
inline constexpr uint64_t kMaxStDim = 1ull << 40;

// Parses and checks a header. `prefix` holds the file's first bytes (at least the 8-byte length and
// the JSON when the file is that long), `file_size` the whole file's size, `path` names the file in
// messages. Throws StoreError naming the file (and the tensor) for anything wrong.
StHeader parse_st_header(const std::string& prefix, uint64_t file_size, const std::string& path);

// One open safetensors file. Reads are pread calls of only the bytes asked for; the object may be
// shared by threads.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);  // throws StoreError
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const StHeader& header() const { return header_; }
  const StTensor* find(const std::string& name) const;

  // Elements [first, first + count) of tensor t, converted to bf16 (round to nearest even).
  // Throws StoreError on a read error, a short read or a dtype that cannot be converted.
  void read_bf16(const StTensor& t, uint64_t first, uint64_t count, bf16_t* out) const;

  // Raw bytes [offset, offset + n) of the data area.
  void read_raw(uint64_t offset, uint64_t n, void* out, const std::string& what) const;

 private:
  SafetensorsFile() = default;
  void read_at(uint64_t offset, uint64_t n, void* out, const std::string& what) const;  // file offsets
  std::string path_;
  int fd_ = -1;
  StHeader header_;
};

}  // namespace ringllama
