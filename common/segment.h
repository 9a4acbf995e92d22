// The shared-memory segment of the ring window (DESIGN.md "The ring window").
//
//   [0]                 SegmentHeader: identity, sizes, offsets, the globals' slot entry
//   slot_table_offset   SlotEntry[n_slots]: state, generation, layer of each slot
//   worker_table_offset WorkerEntry[kMaxWorkers]: attached workers (pid, position), for inspection
//   globals_offset      the globals group (4 KiB aligned)
//   slots_offset        n_slots slots of slot_bytes each (2 MiB aligned start, 4 KiB aligned
//                       stride), one layer per slot
//
// Single writer: only the daemon stores to the segment; workers map it read-only. The atomics are
// lock-free, so they work across processes. A slot changes like this:
//
//   daemon: state = Loading; generation += 1; layer = L; (read the bytes); state = Ready | Error
//   worker: g = generation; s = state; l = layer; use only if s == Ready and l is the layer it
//           wants; after its copy completed: generation == g, else the copy is redone.
//
// Loading is stored before the generation moves, so a worker that sees the new generation also
// sees Loading; a worker that saw the old one sees a different one after the copy.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "common/manifest.h"
#include "common/runtime_dir.h"

namespace ringllama {

class Store;

inline constexpr uint64_t kSegmentMagic = 0x31474553474c4c52ull;  // "RLLGSEG1"
inline constexpr uint32_t kSegmentLayoutVersion = 2;
inline constexpr uint64_t kSlotAlign = 4096;                 // slot stride and globals alignment
inline constexpr uint64_t kSlotRegionAlign = 2ull << 20;     // start of the slots: a huge page
inline constexpr int64_t kMaxWorkers = 64;
inline constexpr size_t kInstanceIdMax = 48;

enum class SlotState : uint32_t { Empty = 0, Loading = 1, Ready = 2, Error = 3 };
const char* slot_state_name(SlotState s);

struct SlotSnapshot {
  SlotState state = SlotState::Empty;
  uint64_t generation = 0;
  int64_t layer = -1;
};

struct SlotEntry {
  std::atomic<uint32_t> state;       // SlotState
  uint32_t reserved;
  std::atomic<uint64_t> generation;  // +1 at the start of every load
  std::atomic<int64_t> layer;        // -1: none (and for the globals)

  // Daemon side.
  void begin_load(int64_t new_layer);
  void finish_load(bool ok);
  // Worker side.
  SlotSnapshot snapshot() const;
  bool unchanged(const SlotSnapshot& s) const;  // true: a copy taken since `s` is good
};

struct WorkerEntry {
  std::atomic<int32_t> pid;          // 0: free
  uint32_t reserved;
  std::atomic<int64_t> position;     // lowest position not yet copied; -1 idle
  std::atomic<int64_t> held;         // positions [position, held) are protected for the worker's reads
};

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<int64_t>::is_always_lock_free && std::atomic<int32_t>::is_always_lock_free,
              "cross-process atomics must be lock-free");

struct SegmentHeader {
  std::atomic<uint64_t> magic;       // written last: a segment being set up has none
  uint32_t layout_version;
  uint32_t header_bytes;             // sizeof(SegmentHeader) of the writer
  char instance_id[64];
  uint64_t store_identity;           // store_identity() of the store being served
  int64_t daemon_pid;
  int64_t n_layers;
  int64_t n_slots;                   // cpu_cap_layers
  uint64_t slot_payload;             // bytes of the largest layer
  uint64_t slot_bytes;               // slot stride
  uint64_t slot_table_offset;
  uint64_t worker_table_offset;
  int64_t max_workers;
  uint64_t globals_offset;
  uint64_t globals_bytes;
  uint64_t slots_offset;
  uint64_t total_bytes;
  SlotEntry globals;                 // the globals region's state, layer -1
};

// Where everything goes, from the sizes alone.
struct SegmentLayout {
  int64_t n_layers = 0;
  int64_t n_slots = 0;
  uint64_t slot_payload = 0;         // largest layer, bytes
  uint64_t slot_bytes = 0;           // stride: slot_payload rounded up to kSlotAlign
  uint64_t globals_bytes = 0;        // rounded up to kSlotAlign
  uint64_t slot_table_offset = 0;
  uint64_t worker_table_offset = 0;
  uint64_t globals_offset = 0;
  uint64_t slots_offset = 0;
  uint64_t total_bytes = 0;

  static SegmentLayout compute(int64_t n_layers, int64_t n_slots, uint64_t max_layer_bytes, uint64_t globals_bytes);
  static SegmentLayout for_manifest(const Manifest& m, int64_t n_slots);
  uint64_t slot_offset(int64_t slot) const { return slots_offset + static_cast<uint64_t>(slot) * slot_bytes; }
  bool operator==(const SegmentLayout& o) const;
};

// Identity of a store as the segment records it: XXH3 of the manifest text, seeded with the size
// of weights.bin. A worker checks it against the store it was told to serve.
uint64_t store_identity(const std::string& manifest_text, uint64_t weights_size);
uint64_t store_identity(const Store& store);

enum class MlockMode {
  Require,  // failure to lock is an error (the default: DESIGN.md wants the window pinned)
  Warn,     // log a warning and go on unlocked
  Off,      // do not try
};

struct SegmentOptions {
  MlockMode mlock = MlockMode::Require;
  // Where <name>.lock lives: "" = default_runtime_dir() (made when missing); a directory given must
  // exist. Either must be this user's and writable by nobody else (runtime_dir.h).
  std::string lock_dir;
  FileAccess access;                  // the segment is 0600, or 0640 with the access group
};

class Segment {
 public:
  // "/ringllama-<instance_id>"; the id is 1-48 of [A-Za-z0-9._-]. Throws Error otherwise.
  static std::string shm_name(const std::string& instance_id);

  // Daemon: takes the lock file, replaces a stale segment of the same name, creates, sizes
  // (fallocate), maps read-write, locks in memory, writes the header and empty slots. Throws Error
  // "another loaderd (pid N) owns ..." when a live daemon holds the lock.
  static Segment create(const std::string& instance_id, uint64_t identity, const SegmentLayout& layout,
                        const SegmentOptions& opt = {});

  // Worker: maps an existing segment read-only and checks magic, layout version, sizes, that nobody
  // but its owner may write it and (when given) the store identity. `name` as shm_name() returns it.
  // With `expect_owner`, the file must belong to that uid (the daemon's, from the connection).
  static Segment open(const std::string& name, std::optional<uint64_t> expect_identity = std::nullopt,
                      std::optional<uid_t> expect_owner = std::nullopt);

  Segment(Segment&& o) noexcept;
  Segment& operator=(Segment&& o) noexcept;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  // The creator unlinks the segment and its lock file: a clean exit leaves nothing behind.
  ~Segment();

  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }
  bool mlocked() const { return mlocked_; }
  const SegmentHeader& header() const { return *reinterpret_cast<const SegmentHeader*>(base_); }
  const SegmentLayout& layout() const { return layout_; }
  uint64_t size() const { return layout_.total_bytes; }
  const uint8_t* base() const { return base_; }

  const SlotEntry& slot(int64_t i) const;
  const SlotEntry& globals_entry() const { return header().globals; }
  const WorkerEntry& worker_entry(int64_t i) const;
  const uint8_t* slot_data(int64_t i) const;
  const uint8_t* globals_data() const { return base_ + layout_.globals_offset; }

  // The creator's write access (throws Error on a read-only mapping).
  SlotEntry& slot_rw(int64_t i);
  SlotEntry& globals_entry_rw();
  WorkerEntry& worker_entry_rw(int64_t i);
  uint8_t* slot_data_rw(int64_t i);
  uint8_t* globals_data_rw();

 private:
  Segment() = default;
  void release();
  void require_owner(const char* what) const;

  std::string name_;
  std::string lock_path_;
  uint8_t* base_ = nullptr;
  SegmentLayout layout_;
  int shm_fd_ = -1;
  int lock_fd_ = -1;
  bool owner_ = false;
  bool mlocked_ = false;
};

}  // namespace ringllama
