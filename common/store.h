// Opening a packed store and reading its groups with their checksums checked.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "common/manifest.h"

namespace ringllama {

inline constexpr const char* kManifestFile = "manifest.yaml";
inline constexpr const char* kWeightsFile = "weights.bin";

uint64_t checksum(const void* data, uint64_t size);  // XXH3-64, the store's group checksum

// The whole of a small file that must be a regular file of at most max_bytes: a FIFO, a device
// or a directory is refused (opened non-blocking, so a FIFO without a writer cannot hang us).
// Throws StoreError naming the path and the rule.
std::string read_regular_file(const std::string& path, uint64_t max_bytes);

class Store {
 public:
  // Reads and validates the manifest and checks weights.bin's size. Throws StoreError.
  static Store open(const std::string& dir);

  const Manifest& manifest() const { return manifest_; }
  const ModelConfig& model() const { return manifest_.model; }
  const std::string& dir() const { return dir_; }
  std::string weights_path() const;

  // Reads one group into dst (at least g.size bytes) with pread and checks its checksum.
  // Throws StoreError naming the group and its offset on a short read or a mismatch.
  void read_group(const GroupEntry& g, void* dst) const;

  // Checks a group already in memory against the manifest's checksum.
  void check_group(const GroupEntry& g, const void* data) const;

  // Reads every group and checks every checksum. `report` gets one line per bad group; returns
  // the number of bad groups.
  size_t verify(const std::function<void(const std::string&)>& report) const;

 private:
  std::string dir_;
  Manifest manifest_;
};

}  // namespace ringllama
