#include "daemon/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstring>

#include "common/errors.h"

namespace ringllama {

namespace {

struct DTypeInfo {
  StDType type;
  const char* name;
  uint64_t bytes;
};

constexpr DTypeInfo kDTypes[] = {
    {StDType::BOOL, "BOOL", 1},       {StDType::U8, "U8", 1},   {StDType::I8, "I8", 1},
    {StDType::F8_E4M3, "F8_E4M3", 1}, {StDType::F8_E5M2, "F8_E5M2", 1},
    {StDType::I16, "I16", 2},         {StDType::U16, "U16", 2}, {StDType::F16, "F16", 2},
    {StDType::BF16, "BF16", 2},       {StDType::I32, "I32", 4}, {StDType::U32, "U32", 4},
    {StDType::F32, "F32", 4},         {StDType::I64, "I64", 8}, {StDType::U64, "U64", 8},
    {StDType::F64, "F64", 8},
};

const DTypeInfo& info(StDType t) {
  for (const auto& d : kDTypes)
    if (d.type == t) return d;
  return kDTypes[0];
}

bool parse_st_dtype(const std::string& s, StDType* out) {
  for (const auto& d : kDTypes)
    if (s == d.name) {
      *out = d.type;
      return true;
    }
  return false;
}

std::string shape_text(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// A non-negative JSON integer, or false.
bool as_u64(const nlohmann::json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

StTensor parse_entry(const std::string& name, const nlohmann::json& e, uint64_t data_size, const std::string& path) {
  auto bad = [&](const std::string& why) {
    return StoreError(fmt::format("{}: tensor '{}': {}", path, name, why));
  };
  if (!e.is_object()) throw bad("header entry is not an object");
  StTensor t;
  t.name = name;

  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) throw bad("missing string 'dtype'");
  if (!parse_st_dtype(dt->get<std::string>(), &t.dtype))
    throw bad(fmt::format("unknown dtype '{}'", dt->get<std::string>()));

  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) throw bad("missing array 'shape'");
  if (sh->size() > kMaxStRank) throw bad(fmt::format("shape has {} dimensions, at most {} are read", sh->size(), kMaxStRank));
  uint64_t numel = 1;
  for (const auto& d : *sh) {
    uint64_t v = 0;
    if (!as_u64(d, &v)) throw bad("shape holds something other than a non-negative integer");
    if (v > kMaxStDim) throw bad(fmt::format("shape dimension {} is over the {} limit", v, kMaxStDim));
    t.shape.push_back(static_cast<int64_t>(v));
    if (__builtin_mul_overflow(numel, v, &numel)) throw bad(fmt::format("shape {} overflows", shape_text(t.shape)));
  }

  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !as_u64((*off)[0], &t.begin) ||
      !as_u64((*off)[1], &t.end))
    throw bad("'data_offsets' must be two non-negative integers");
  if (t.end < t.begin) throw bad(fmt::format("data_offsets [{}, {}] end before they begin", t.begin, t.end));

  uint64_t need = 0;
  if (__builtin_mul_overflow(numel, info(t.dtype).bytes, &need))
    throw bad(fmt::format("shape {} overflows", shape_text(t.shape)));
  if (t.end - t.begin != need)
    throw bad(fmt::format("data_offsets [{}, {}] hold {} bytes, but {} {} needs {}", t.begin, t.end, t.end - t.begin,
                          info(t.dtype).name, shape_text(t.shape), need));
  if (t.end > data_size)
    throw bad(fmt::format("data_offsets [{}, {}] run beyond the end of the file (its data area holds {} bytes): "
                          "truncated file?",
                          t.begin, t.end, data_size));
  return t;
}

}  // namespace

const char* st_dtype_name(StDType t) { return info(t).name; }
uint64_t st_dtype_bytes(StDType t) { return info(t).bytes; }
bool st_dtype_convertible(StDType t) { return t == StDType::BF16 || t == StDType::F16 || t == StDType::F32; }

uint64_t StTensor::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

StHeader parse_st_header(const std::string& prefix, uint64_t file_size, const std::string& path) {
  if (file_size < 8 || prefix.size() < 8)
    throw StoreError(fmt::format("{}: {} bytes, too short for a safetensors file", path, file_size));
  StHeader h;
  for (int i = 7; i >= 0; --i) h.header_len = (h.header_len << 8) | static_cast<unsigned char>(prefix[i]);
  if (h.header_len > file_size - 8)
    throw StoreError(fmt::format("{}: header length {} runs beyond the end of the file ({} bytes): truncated or "
                                 "not a safetensors file",
                                 path, h.header_len, file_size));
  if (h.header_len > kMaxStHeaderBytes)
    throw StoreError(fmt::format("{}: header length {} is over the {} byte limit", path, h.header_len,
                                 kMaxStHeaderBytes));
  if (prefix.size() < 8 + h.header_len)
    throw StoreError(fmt::format("{}: header cut short ({} of {} bytes)", path, prefix.size() - 8, h.header_len));

  const char* text = prefix.data() + 8;
  nlohmann::json j = nlohmann::json::parse(text, text + h.header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw StoreError(fmt::format("{}: header is not valid JSON", path));
  if (!j.is_object()) throw StoreError(fmt::format("{}: header is not a JSON object", path));

  const uint64_t data_size = file_size - 8 - h.header_len;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) throw StoreError(fmt::format("{}: '__metadata__' is not an object", path));
      for (auto m = it.value().begin(); m != it.value().end(); ++m)
        if (m.value().is_string()) h.metadata[m.key()] = m.value().get<std::string>();
      continue;
    }
    h.tensors.emplace(it.key(), parse_entry(it.key(), it.value(), data_size, path));
  }
  return h;
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f->fd_ < 0) throw StoreError(fmt::format("{}: cannot open: {}", path, errno_text(errno)));
  struct stat st {};
  if (::fstat(f->fd_, &st) != 0) throw StoreError(fmt::format("{}: cannot stat: {}", path, errno_text(errno)));
  if (!S_ISREG(st.st_mode)) throw StoreError(fmt::format("{}: not a regular file", path));
  const uint64_t size = static_cast<uint64_t>(st.st_size);

  std::string prefix(std::min<uint64_t>(size, 8), '\0');
  f->read_at(0, prefix.size(), prefix.data(), "the header length");
  if (size >= 8) {
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(prefix[i]);
    // Read the JSON only once its length is known to be sane; parse_st_header words the error.
    if (len <= size - 8 && len <= kMaxStHeaderBytes) {
      prefix.resize(8 + len);
      f->read_at(8, len, prefix.data() + 8, "the header");
    }
  }
  f->header_ = parse_st_header(prefix, size, path);
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

const StTensor* SafetensorsFile::find(const std::string& name) const {
  auto it = header_.tensors.find(name);
  return it == header_.tensors.end() ? nullptr : &it->second;
}

void SafetensorsFile::read_at(uint64_t offset, uint64_t n, void* out, const std::string& what) const {
  auto* dst = static_cast<char*>(out);
  uint64_t done = 0;
  while (done < n) {
    ssize_t got = ::pread(fd_, dst + done, n - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0)
      throw StoreError(fmt::format("{}: read error in {} at offset {}: {}", path_, what, offset + done,
                                   errno_text(errno)));
    if (got == 0)
      throw StoreError(fmt::format("{}: unexpected end of file in {} at offset {} (file changed while packing?)",
                                   path_, what, offset + done));
    done += static_cast<uint64_t>(got);
  }
}

void SafetensorsFile::read_raw(uint64_t offset, uint64_t n, void* out, const std::string& what) const {
  read_at(header_.data_start() + offset, n, out, what);
}

void SafetensorsFile::read_bf16(const StTensor& t, uint64_t first, uint64_t count, bf16_t* out) const {
  if (!st_dtype_convertible(t.dtype))
    throw StoreError(fmt::format("{}: tensor '{}' has dtype {}; only BF16, F16 and F32 can be packed", path_, t.name,
                                 st_dtype_name(t.dtype)));
  if (first > t.numel() || count > t.numel() - first)
    throw StoreError(fmt::format("{}: tensor '{}': elements [{}, {}) asked for, it has {}", path_, t.name, first,
                                 first + count, t.numel()));
  const uint64_t esize = st_dtype_bytes(t.dtype);
  const uint64_t base = t.begin + first * esize;
  const std::string what = fmt::format("tensor '{}'", t.name);
  if (t.dtype == StDType::BF16) {
    read_raw(base, count * 2, out, what);
    return;
  }
  // Convert through a small staging buffer so a 64 MiB chunk never needs 128 MiB of F32 beside it.
  constexpr uint64_t kStage = 1u << 20;  // elements
  std::vector<unsigned char> stage(std::min(count, kStage) * esize);
  for (uint64_t at = 0; at < count; at += kStage) {
    const uint64_t n = std::min(kStage, count - at);
    read_raw(base + at * esize, n * esize, stage.data(), what);
    const unsigned char* src = stage.data();
    if (t.dtype == StDType::F32) {
      for (uint64_t i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, src + 4 * i, 4);
        out[at + i] = f32_to_bf16(v);
      }
    } else {
      for (uint64_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, src + 2 * i, 2);
        out[at + i] = f32_to_bf16(f16_to_f32(v));
      }
    }
  }
}

}  // namespace ringllama
