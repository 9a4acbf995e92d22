#include "common/gguf.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>

#include "common/errors.h"

namespace ringllama {

namespace {

struct TypeInfo {
  GgmlType type;
  const char* name;
  uint64_t block_elems;
  uint64_t block_bytes;
};

// ggml's block layouts (ggml-common.h); QK_K = 256.
constexpr TypeInfo kGgmlTypes[] = {
    {GgmlType::F32, "F32", 1, 4},         {GgmlType::F16, "F16", 1, 2},
    {GgmlType::Q4_0, "Q4_0", 32, 18},     {GgmlType::Q4_1, "Q4_1", 32, 20},
    {GgmlType::Q5_0, "Q5_0", 32, 22},     {GgmlType::Q5_1, "Q5_1", 32, 24},
    {GgmlType::Q8_0, "Q8_0", 32, 34},     {GgmlType::Q8_1, "Q8_1", 32, 40},
    {GgmlType::Q2_K, "Q2_K", 256, 84},    {GgmlType::Q3_K, "Q3_K", 256, 110},
    {GgmlType::Q4_K, "Q4_K", 256, 144},   {GgmlType::Q5_K, "Q5_K", 256, 176},
    {GgmlType::Q6_K, "Q6_K", 256, 210},   {GgmlType::Q8_K, "Q8_K", 256, 292},
    {GgmlType::I8, "I8", 1, 1},           {GgmlType::I16, "I16", 1, 2},
    {GgmlType::I32, "I32", 1, 4},         {GgmlType::I64, "I64", 1, 8},
    {GgmlType::F64, "F64", 1, 8},         {GgmlType::BF16, "BF16", 1, 2},
};

const char* kValueTypeNames[] = {"uint8", "int8",   "uint16", "int16",  "uint32", "int32", "float32",
                                 "bool",  "string", "array",  "uint64", "int64",  "float64"};

// Reads the file (or buffer) front to back, refusing to step past its end. A file is read through
// a 1 MiB buffer: the metadata of a large vocabulary is many small fields.
class Cursor {
 public:
  Cursor(const unsigned char* mem, int fd, uint64_t size, const std::string& what)
      : mem_(mem), fd_(fd), size_(size), what_(what) {}

  [[noreturn]] void bad(const std::string& why) const {
    throw StoreError(fmt::format("{}: {} (at byte {})", what_, why, pos_));
  }

  uint64_t pos() const { return pos_; }
  const std::string& what() const { return what_; }
  uint64_t left() const { return size_ - pos_; }

  void take(void* out, uint64_t n, const char* field) {
    if (n > left())
      bad(fmt::format("truncated: {} needs {} bytes, the file has {} left", field, n, left()));
    if (mem_) {
      std::memcpy(out, mem_ + pos_, n);
    } else {
      auto* o = static_cast<unsigned char*>(out);
      uint64_t done = 0;
      while (done < n) {
        const uint64_t at = pos_ + done;
        if (at < buf_start_ || at >= buf_start_ + buf_.size()) fill(at);
        const uint64_t k = std::min<uint64_t>(n - done, buf_start_ + buf_.size() - at);
        std::memcpy(o + done, buf_.data() + (at - buf_start_), k);
        done += k;
      }
    }
    pos_ += n;
  }

  template <typename T>
  T scalar(const char* field) {
    T v;
    take(&v, sizeof v, field);
    return v;  // the format is little-endian, as is every host this builds for
  }

  // A string of at most `max` bytes.
  std::string str(uint64_t max, const char* field) {
    const uint64_t n = scalar<uint64_t>(field);
    if (n > max) bad(fmt::format("{} is {} bytes long, more than the {} allowed", field, n, max));
    if (n > left()) bad(fmt::format("truncated: {} of {} bytes, the file has {} left", field, n, left()));
    std::string s(n, '\0');
    take(s.data(), n, field);
    return s;
  }

  void seek(uint64_t p) { pos_ = p; }

 private:
  void fill(uint64_t at) {
    const uint64_t n = std::min<uint64_t>(kBuf, size_ - at);
    buf_.resize(n);
    uint64_t got = 0;
    while (got < n) {
      ssize_t r = ::pread(fd_, buf_.data() + got, n - got, static_cast<off_t>(at + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw StoreError(fmt::format("{}: read failed: {}", what_, errno_text(errno)));
      if (r == 0) throw StoreError(fmt::format("{}: the file shrank while being read", what_));
      got += static_cast<uint64_t>(r);
    }
    buf_start_ = at;
  }

  static constexpr uint64_t kBuf = 1 << 20;
  const unsigned char* mem_;
  int fd_;
  uint64_t size_;
  const std::string& what_;
  uint64_t pos_ = 0;
  std::vector<unsigned char> buf_;
  uint64_t buf_start_ = 0;
};

// Smallest encoded size of one array element of a type, so that a count can be checked against
// the bytes left before anything is allocated.
uint64_t min_elem_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8: case GgufValueType::INT8: case GgufValueType::BOOL: return 1;
    case GgufValueType::UINT16: case GgufValueType::INT16: return 2;
    case GgufValueType::UINT32: case GgufValueType::INT32: case GgufValueType::FLOAT32: return 4;
    default: return 8;  // 64-bit scalars; a string's length field
  }
}

// A float32 as the shortest decimal that reads back as the same float: 1e-5 stored as float32 is
// 1e-5 again, not 9.99999974737875e-06, as the writer of the file meant it.
double float_as_written(float x) {
  if (!std::isfinite(x)) return x;
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x);
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

bool known_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufValueType::FLOAT64); }

// One scalar (not an array) of type t into v's scalar fields; returns it as int64 for arrays.
void read_scalar(Cursor& c, GgufValueType t, GgufValue& v, const std::string& key) {
  switch (t) {
    case GgufValueType::UINT8: v.u = c.scalar<uint8_t>("a uint8"); v.i = static_cast<int64_t>(v.u); break;
    case GgufValueType::INT8: v.i = c.scalar<int8_t>("an int8"); break;
    case GgufValueType::UINT16: v.u = c.scalar<uint16_t>("a uint16"); v.i = static_cast<int64_t>(v.u); break;
    case GgufValueType::INT16: v.i = c.scalar<int16_t>("an int16"); break;
    case GgufValueType::UINT32: v.u = c.scalar<uint32_t>("a uint32"); v.i = static_cast<int64_t>(v.u); break;
    case GgufValueType::INT32: v.i = c.scalar<int32_t>("an int32"); break;
    case GgufValueType::UINT64:
      v.u = c.scalar<uint64_t>("a uint64");
      v.i = v.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ? -1 : static_cast<int64_t>(v.u);
      break;
    case GgufValueType::INT64: v.i = c.scalar<int64_t>("an int64"); break;
    case GgufValueType::FLOAT32: v.f = float_as_written(c.scalar<float>("a float32")); break;
    case GgufValueType::FLOAT64: v.f = c.scalar<double>("a float64"); break;
    case GgufValueType::BOOL: {
      const uint8_t b = c.scalar<uint8_t>("a bool");
      if (b > 1) c.bad(fmt::format("key '{}': bool value {} is neither 0 nor 1", key, b));
      v.u = b;
      v.i = b;
      break;
    }
    case GgufValueType::STRING: v.s = c.str(kGgufMaxStringBytes, "a string value"); break;
    case GgufValueType::ARRAY: c.bad(fmt::format("key '{}': arrays of arrays are not supported", key));
  }
}

GgufValue read_value(Cursor& c, uint32_t type, const std::string& key) {
  if (!known_value_type(type)) c.bad(fmt::format("key '{}' has unknown value type {}", key, type));
  GgufValue v;
  v.type = static_cast<GgufValueType>(type);
  if (v.type != GgufValueType::ARRAY) {
    read_scalar(c, v.type, v, key);
    return v;
  }
  const uint32_t et = c.scalar<uint32_t>("an array's element type");
  if (!known_value_type(et)) c.bad(fmt::format("key '{}' is an array of unknown value type {}", key, et));
  v.elem_type = static_cast<GgufValueType>(et);
  if (v.elem_type == GgufValueType::ARRAY) c.bad(fmt::format("key '{}': arrays of arrays are not supported", key));
  const uint64_t n = c.scalar<uint64_t>("an array's length");
  if (n > kGgufMaxArrayLen)
    c.bad(fmt::format("key '{}' is an array of {} elements, more than the {} allowed", key, n, kGgufMaxArrayLen));
  if (n > c.left() / min_elem_bytes(v.elem_type))
    c.bad(fmt::format("truncated: key '{}' claims {} elements, more than the {} bytes left can hold", key, n, c.left()));
  if (v.elem_type == GgufValueType::STRING) {
    v.strings.reserve(n);
    for (uint64_t k = 0; k < n; ++k) v.strings.push_back(c.str(kGgufMaxStringBytes, "a string in an array"));
  } else if (v.elem_type == GgufValueType::FLOAT32 || v.elem_type == GgufValueType::FLOAT64) {
    v.floats.reserve(n);
    GgufValue e;
    for (uint64_t k = 0; k < n; ++k) {
      read_scalar(c, v.elem_type, e, key);
      v.floats.push_back(e.f);
    }
  } else {
    v.ints.reserve(n);
    GgufValue e;
    for (uint64_t k = 0; k < n; ++k) {
      read_scalar(c, v.elem_type, e, key);
      if (v.elem_type == GgufValueType::UINT64 && e.i < 0)
        c.bad(fmt::format("key '{}': element {} ({}) does not fit a signed 64-bit integer", key, k, e.u));
      v.ints.push_back(e.i);
    }
  }
  return v;
}

}  // namespace

const char* gguf_value_type_name(GgufValueType t) {
  const auto i = static_cast<uint32_t>(t);
  return i < sizeof kValueTypeNames / sizeof kValueTypeNames[0] ? kValueTypeNames[i] : "unknown";
}

const char* ggml_type_name(GgmlType t) {
  for (const auto& d : kGgmlTypes)
    if (d.type == t) return d.name;
  return "unknown";
}

bool ggml_type_layout(uint32_t type, uint64_t* block_elems, uint64_t* block_bytes) {
  for (const auto& d : kGgmlTypes)
    if (static_cast<uint32_t>(d.type) == type) {
      *block_elems = d.block_elems;
      *block_bytes = d.block_bytes;
      return true;
    }
  return false;
}

bool GgufValue::is_integer() const {
  return type != GgufValueType::FLOAT32 && type != GgufValueType::FLOAT64 && type != GgufValueType::BOOL &&
         type != GgufValueType::STRING && type != GgufValueType::ARRAY;
}
bool GgufValue::is_float() const { return type == GgufValueType::FLOAT32 || type == GgufValueType::FLOAT64; }

uint64_t GgufValue::array_size() const {
  if (type != GgufValueType::ARRAY) return 0;
  return elem_type == GgufValueType::STRING ? strings.size() : !floats.empty() ? floats.size() : ints.size();
}

std::string GgufValue::type_text() const {
  if (type == GgufValueType::ARRAY) return fmt::format("array[{}]", gguf_value_type_name(elem_type));
  return gguf_value_type_name(type);
}

std::vector<int64_t> GgufTensorInfo::shape() const { return std::vector<int64_t>(ne.rbegin(), ne.rend()); }

namespace {

// Header, metadata and tensor infos of a file of `size` bytes.
void parse_into(Cursor& c, uint64_t size, uint32_t& version, uint64_t& alignment, uint64_t& data_offset,
                std::vector<GgufKv>& kvs, std::map<std::string, size_t>& kv_index,
                std::vector<GgufTensorInfo>& tensors, std::map<std::string, size_t>& tensor_index) {
  char magic[4];
  c.take(magic, 4, "the magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) c.bad("not a GGUF file (the magic is not \"GGUF\")");
  version = c.scalar<uint32_t>("the version");
  if (version == 1) c.bad("GGUF version 1 is not supported (only 2 and 3)");
  if (version != 2 && version != 3) {
    if ((version & 0xFFFF) == 0) c.bad(fmt::format("GGUF version {:#x}: a big-endian file, which is not supported", version));
    c.bad(fmt::format("GGUF version {} is not supported (only 2 and 3)", version));
  }
  const uint64_t n_tensors = c.scalar<uint64_t>("the tensor count");
  const uint64_t n_kv = c.scalar<uint64_t>("the metadata count");
  if (n_tensors > kGgufMaxTensors) c.bad(fmt::format("tensor count {} is more than the {} allowed", n_tensors, kGgufMaxTensors));
  if (n_kv > kGgufMaxKv) c.bad(fmt::format("metadata count {} is more than the {} allowed", n_kv, kGgufMaxKv));
  // A key/value takes at least 12 bytes (length, type) and a tensor info at least 24.
  if (n_kv > c.left() / 12 || n_tensors > c.left() / 24)
    c.bad(fmt::format("truncated: {} keys and {} tensors cannot fit in the {} bytes left", n_kv, n_tensors, c.left()));

  kvs.reserve(n_kv);
  for (uint64_t k = 0; k < n_kv; ++k) {
    GgufKv kv;
    kv.key = c.str(kGgufMaxKeyBytes, "a key");
    if (kv.key.empty()) c.bad(fmt::format("metadata entry {} has an empty key", k));
    if (kv_index.count(kv.key)) c.bad(fmt::format("key '{}' appears twice", kv.key));
    const uint32_t type = c.scalar<uint32_t>("a value type");
    kv.value = read_value(c, type, kv.key);
    kv_index[kv.key] = kvs.size();
    kvs.push_back(std::move(kv));
  }

  alignment = 32;
  auto al = kv_index.find("general.alignment");
  if (al != kv_index.end()) {
    const GgufValue& v = kvs[al->second].value;
    if (v.type != GgufValueType::UINT32)
      c.bad(fmt::format("key 'general.alignment' is a {}, expected uint32", v.type_text()));
    if (v.u == 0 || (v.u & (v.u - 1)) != 0 || v.u > kGgufMaxAlignment)
      c.bad(fmt::format("general.alignment {} is not a power of two up to {}", v.u, kGgufMaxAlignment));
    alignment = v.u;
  }

  tensors.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo t;
    t.name = c.str(kGgufMaxKeyBytes, "a tensor name");
    if (t.name.empty()) c.bad(fmt::format("tensor {} has an empty name", k));
    if (tensor_index.count(t.name)) c.bad(fmt::format("tensor '{}' appears twice", t.name));
    const uint32_t n_dims = c.scalar<uint32_t>("a tensor's dimension count");
    if (n_dims == 0 || n_dims > kGgufMaxDims)
      c.bad(fmt::format("tensor '{}' has {} dimensions (1 to {} allowed)", t.name, n_dims, kGgufMaxDims));
    uint64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = c.scalar<uint64_t>("a tensor dimension");
      if (ne == 0 || ne > kGgufMaxDim)
        c.bad(fmt::format("tensor '{}' dimension {} is {} (1 to {} allowed)", t.name, d, ne, kGgufMaxDim));
      if (numel > std::numeric_limits<uint64_t>::max() / ne)
        c.bad(fmt::format("tensor '{}': the element count overflows", t.name));
      numel *= ne;
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    if (numel > kGgufMaxDim) c.bad(fmt::format("tensor '{}' has {} elements, more than {}", t.name, numel, kGgufMaxDim));
    t.numel = numel;
    const uint32_t type = c.scalar<uint32_t>("a tensor type");
    uint64_t be = 0, bb = 0;
    if (!ggml_type_layout(type, &be, &bb)) c.bad(fmt::format("tensor '{}' has unknown type {}", t.name, type));
    t.type = static_cast<GgmlType>(type);
    if (t.ne[0] % be != 0)
      c.bad(fmt::format("tensor '{}': row length {} is not a multiple of the {} block size {}", t.name, t.ne[0],
                        ggml_type_name(t.type), be));
    t.bytes = numel / be * bb;  // numel <= 2^40 and bb < 2^9: no overflow
    t.offset = c.scalar<uint64_t>("a tensor offset");
    if (t.offset % alignment != 0)
      c.bad(fmt::format("tensor '{}' offset {} is not a multiple of the alignment {}", t.name, t.offset, alignment));
    tensor_index[t.name] = tensors.size();
    tensors.push_back(std::move(t));
  }

  const uint64_t end = c.pos();
  data_offset = (end + alignment - 1) / alignment * alignment;
  if (data_offset > size && !tensors.empty())
    c.bad(fmt::format("truncated: the data section would start at {}, past the end of the file ({} bytes)",
                      data_offset, size));
  const uint64_t data_size = data_offset <= size ? size - data_offset : 0;
  for (const GgufTensorInfo& t : tensors)
    if (t.offset > data_size || t.bytes > data_size - t.offset)
      throw StoreError(fmt::format("{}: tensor '{}' ({}, {} bytes at data offset {}) lies past the end of the file "
                                   "(the data section holds {} bytes)",
                                   c.what(), t.name, ggml_type_name(t.type), t.bytes, t.offset, data_size));
}

}  // namespace

GgufFile GgufFile::parse(const void* data, uint64_t size, const std::string& what) {
  GgufFile f;
  f.what_ = what;
  f.file_size_ = size;
  f.mem_ = static_cast<const unsigned char*>(data);
  Cursor c(f.mem_, -1, size, f.what_);
  parse_into(c, size, f.version_, f.alignment_, f.data_offset_, f.kvs_, f.kv_index_, f.tensors_, f.tensor_index_);
  return f;
}

GgufFile GgufFile::open(const std::string& path) {
  GgufFile f;
  f.what_ = path;
  f.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (f.fd_ < 0) throw StoreError(fmt::format("{}: cannot open: {}", path, errno_text(errno)));
  struct stat st {};
  if (::fstat(f.fd_, &st) != 0) throw StoreError(fmt::format("{}: cannot stat: {}", path, errno_text(errno)));
  if (!S_ISREG(st.st_mode)) throw StoreError(fmt::format("{}: not a regular file", path));
  f.file_size_ = static_cast<uint64_t>(st.st_size);
  Cursor c(nullptr, f.fd_, f.file_size_, f.what_);
  parse_into(c, f.file_size_, f.version_, f.alignment_, f.data_offset_, f.kvs_, f.kv_index_, f.tensors_,
             f.tensor_index_);
  return f;
}

GgufFile::GgufFile(GgufFile&& o) noexcept { *this = std::move(o); }

GgufFile& GgufFile::operator=(GgufFile&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    what_ = std::move(o.what_);
    version_ = o.version_;
    alignment_ = o.alignment_;
    data_offset_ = o.data_offset_;
    file_size_ = o.file_size_;
    kvs_ = std::move(o.kvs_);
    kv_index_ = std::move(o.kv_index_);
    tensors_ = std::move(o.tensors_);
    tensor_index_ = std::move(o.tensor_index_);
    fd_ = o.fd_;
    mem_ = o.mem_;
    o.fd_ = -1;
    o.mem_ = nullptr;
  }
  return *this;
}

GgufFile::~GgufFile() {
  if (fd_ >= 0) ::close(fd_);
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue& GgufFile::require(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) throw StoreError(fmt::format("{}: key '{}' is missing", what_, key));
  return *v;
}

void GgufFile::wrong_type(const std::string& key, const GgufValue& v, const char* want) const {
  throw StoreError(fmt::format("{}: key '{}' is a {}, expected {}", what_, key, v.type_text(), want));
}

std::string GgufFile::get_string(const std::string& key) const {
  require(key);
  return *opt_string(key);
}

std::optional<std::string> GgufFile::opt_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufValueType::STRING) wrong_type(key, *v, "a string");
  return v->s;
}

int64_t GgufFile::get_int(const std::string& key) const {
  require(key);
  return *opt_int(key);
}

std::optional<int64_t> GgufFile::opt_int(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (!v->is_integer()) wrong_type(key, *v, "an integer");
  if (v->type == GgufValueType::UINT64 && v->i < 0)
    throw StoreError(fmt::format("{}: key '{}' is {}, too large", what_, key, v->u));
  return v->i;
}

double GgufFile::get_float(const std::string& key) const {
  require(key);
  return *opt_float(key);
}

std::optional<double> GgufFile::opt_float(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_float()) return v->f;
  if (v->is_integer()) return static_cast<double>(*opt_int(key));
  wrong_type(key, *v, "a number");
}

std::optional<bool> GgufFile::opt_bool(const std::string& key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufValueType::BOOL) wrong_type(key, *v, "a bool");
  return v->u != 0;
}

const std::vector<std::string>& GgufFile::get_strings(const std::string& key) const {
  const GgufValue& v = require(key);
  if (v.type != GgufValueType::ARRAY || v.elem_type != GgufValueType::STRING) wrong_type(key, v, "an array of strings");
  return v.strings;
}

const std::vector<int64_t>& GgufFile::get_ints(const std::string& key) const {
  const GgufValue& v = require(key);
  if (v.type != GgufValueType::ARRAY || v.elem_type == GgufValueType::STRING || v.elem_type == GgufValueType::FLOAT32 ||
      v.elem_type == GgufValueType::FLOAT64)
    wrong_type(key, v, "an array of integers");
  return v.ints;
}

void GgufFile::read(const GgufTensorInfo& t, uint64_t first, uint64_t n, void* out) const {
  if (first > t.bytes || n > t.bytes - first)
    throw StoreError(fmt::format("{}: tensor '{}': bytes [{}, +{}) lie outside its {} bytes", what_, t.name, first, n,
                                 t.bytes));
  const uint64_t at = data_offset_ + t.offset + first;
  if (mem_) {
    std::memcpy(out, mem_ + at, n);
    return;
  }
  auto* o = static_cast<char*>(out);
  uint64_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd_, o + got, n - got, static_cast<off_t>(at + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw StoreError(fmt::format("{}: read of tensor '{}' failed: {}", what_, t.name, errno_text(errno)));
    if (r == 0) throw StoreError(fmt::format("{}: tensor '{}': short read (the file shrank?)", what_, t.name));
    got += static_cast<uint64_t>(r);
  }
}

}  // namespace ringllama
