#include "common/segment.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#include <cctype>
#include <cstring>

#include "common/errors.h"
#include "common/log.h"
#include "common/runtime_dir.h"
#include "common/store.h"

namespace ringllama {

namespace {

std::string gib(uint64_t bytes) {
  if (bytes >= (1ull << 30)) return fmt::format("{:.2f} GiB", double(bytes) / double(1ull << 30));
  return fmt::format("{:.1f} MiB", double(bytes) / double(1ull << 20));
}

std::string limit_text(rlim_t v) { return v == RLIM_INFINITY ? std::string("unlimited") : std::to_string(v) + " bytes"; }

// The lock file names the daemon holding it; its pid is written into it.
int64_t read_pid(int fd) {
  char buf[32] = {};
  ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return -1;
  return std::strtoll(buf, nullptr, 10);
}

// Takes the instance's lock file: LOCK_EX|LOCK_NB, on the file the path names now (a daemon that
// exits unlinks it while still holding it, so the inode is checked after locking). The directory is
// private (runtime_dir.h); the file is opened without following a symlink, never blocks on a FIFO,
// and must be a regular file of this user that nobody else may write: anything else was not made
// by a daemon and is refused rather than trusted or truncated.
int take_lock(const std::string& path, const std::string& name) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
    if (fd < 0) {
      const int err = errno;
      if (err == ELOOP) fail("{}: the lock file of {} is a symbolic link: refused (remove it)", path, name);
      fail("{}: cannot open the lock file of {}: {}", path, name, errno_text(err));
    }
    struct stat a {};
    if (::fstat(fd, &a) != 0) {
      const int err = errno;
      ::close(fd);
      fail("{}: cannot stat the lock file: {}", path, errno_text(err));
    }
    if (!S_ISREG(a.st_mode) || a.st_uid != ::geteuid() || (a.st_mode & (S_IWGRP | S_IWOTH))) {
      ::close(fd);
      fail("{}: the lock file of {} is {} (uid {}, mode {:04o}): not made by ringllama-loaderd, refused; remove it",
           path, name, !S_ISREG(a.st_mode) ? "not a regular file" : a.st_uid != ::geteuid() ? "another user's"
                                                                                             : "writable by others",
           a.st_uid, a.st_mode & 07777);
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      int err = errno;
      int64_t pid = read_pid(fd);
      ::close(fd);
      if (err == EWOULDBLOCK)
        fail("another loaderd (pid {}) owns the shared memory segment {} (lock {} is held)",
             pid > 0 ? std::to_string(pid) : std::string("unknown"), name, path);
      fail("{}: cannot lock: {}", path, errno_text(err));
    }
    struct stat b {};
    if (::lstat(path.c_str(), &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
      std::string pid = std::to_string(::getpid()) + "\n";
      if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size()))
        spdlog::warn("{}: cannot write the pid: {}", path, errno_text(errno));
      return fd;
    }
    ::close(fd);  // unlinked under us by an exiting daemon: take the new one
  }
  fail("{}: the lock file keeps being replaced", path);
}

// True when `path` still names the file open as `fd`: what this process made is removed, never a
// file that replaced it (another daemon's, after a restart or a second daemon on one name).
bool same_file(int fd, const std::string& path) {
  struct stat a {}, b {};
  return fd >= 0 && ::fstat(fd, &a) == 0 && ::lstat(path.c_str(), &b) == 0 && a.st_ino == b.st_ino &&
         a.st_dev == b.st_dev;
}

void check_layout_matches(const SegmentHeader& h, const SegmentLayout& l, const std::string& name) {
  if (h.slot_bytes != l.slot_bytes || h.slot_table_offset != l.slot_table_offset ||
      h.worker_table_offset != l.worker_table_offset || h.globals_offset != l.globals_offset ||
      h.globals_bytes != l.globals_bytes || h.slots_offset != l.slots_offset || h.total_bytes != l.total_bytes ||
      h.max_workers != kMaxWorkers)
    fail("shared memory segment {}: its offsets disagree with its sizes (corrupt, or written by another build)",
         name);
}

}  // namespace

const char* slot_state_name(SlotState s) {
  switch (s) {
    case SlotState::Empty: return "empty";
    case SlotState::Loading: return "loading";
    case SlotState::Ready: return "ready";
    case SlotState::Error: return "error";
  }
  return "?";
}

void SlotEntry::begin_load(int64_t new_layer) {
  state.store(static_cast<uint32_t>(SlotState::Loading));
  generation.fetch_add(1);
  layer.store(new_layer);
}

void SlotEntry::finish_load(bool ok) { state.store(static_cast<uint32_t>(ok ? SlotState::Ready : SlotState::Error)); }

SlotSnapshot SlotEntry::snapshot() const {
  // A seqlock read: the generation again after state and layer, so that the three belong to one
  // load. Without it, a load that starts between the reads pairs the old generation with the new
  // layer and Ready state, and the copy taken under it is wrongly reported as changed (or, with the
  // layers equal, wrongly trusted). Loads take milliseconds, so a retry is rare and short.
  SlotSnapshot s;
  for (;;) {
    s.generation = generation.load();
    s.state = static_cast<SlotState>(state.load());
    s.layer = layer.load();
    if (generation.load() == s.generation) return s;
  }
}

bool SlotEntry::unchanged(const SlotSnapshot& s) const {
  return s.state == SlotState::Ready && generation.load() == s.generation;
}

SegmentLayout SegmentLayout::compute(int64_t n_layers, int64_t n_slots, uint64_t max_layer_bytes,
                                     uint64_t globals_bytes) {
  RL_REQUIRE(n_layers >= 1, "segment: n_layers {} must be >= 1", n_layers);
  RL_REQUIRE(n_slots >= 1 && n_slots <= (1 << 20), "segment: {} slots is outside [1, 2^20]", n_slots);
  RL_REQUIRE(max_layer_bytes >= 1, "segment: a layer of 0 bytes");
  SegmentLayout l;
  l.n_layers = n_layers;
  l.n_slots = n_slots;
  l.slot_payload = max_layer_bytes;
  l.slot_bytes = align_up(max_layer_bytes, kSlotAlign);
  l.globals_bytes = align_up(globals_bytes, kSlotAlign);
  l.slot_table_offset = align_up(sizeof(SegmentHeader), 64);
  l.worker_table_offset = align_up(l.slot_table_offset + sizeof(SlotEntry) * static_cast<uint64_t>(n_slots), 64);
  const uint64_t tables_end = l.worker_table_offset + sizeof(WorkerEntry) * kMaxWorkers;
  l.globals_offset = align_up(tables_end, kSlotAlign);
  // The slots start on a huge-page boundary: at most 2 MiB of padding, and DMA from the slots
  // (cudaHostRegister'ed) never straddles a huge page it does not need.
  l.slots_offset = align_up(l.globals_offset + l.globals_bytes, kSlotRegionAlign);
  RL_REQUIRE(l.slot_bytes <= (UINT64_MAX - l.slots_offset) / static_cast<uint64_t>(n_slots),
             "segment: {} slots of {} bytes overflow", n_slots, l.slot_bytes);
  l.total_bytes = l.slots_offset + l.slot_bytes * static_cast<uint64_t>(n_slots);
  return l;
}

SegmentLayout SegmentLayout::for_manifest(const Manifest& m, int64_t n_slots) {
  return compute(m.model.n_layers, n_slots, m.max_layer_size(), m.globals().size);
}

bool SegmentLayout::operator==(const SegmentLayout& o) const {
  return n_layers == o.n_layers && n_slots == o.n_slots && slot_payload == o.slot_payload &&
         slot_bytes == o.slot_bytes && globals_bytes == o.globals_bytes &&
         slot_table_offset == o.slot_table_offset && worker_table_offset == o.worker_table_offset &&
         globals_offset == o.globals_offset && slots_offset == o.slots_offset && total_bytes == o.total_bytes;
}

uint64_t store_identity(const std::string& manifest_text, uint64_t weights_size) {
  return XXH3_64bits_withSeed(manifest_text.data(), manifest_text.size(), weights_size);
}

uint64_t store_identity(const Store& store) {
  const std::string path = store.dir() + "/" + kManifestFile;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path, errno_text(errno));
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      fail("{}: read error: {}", path, errno_text(err));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return store_identity(text, store.manifest().weights_size);
}

std::string Segment::shm_name(const std::string& instance_id) {
  RL_REQUIRE(!instance_id.empty() && instance_id.size() <= kInstanceIdMax,
             "instance id '{}' must be 1 to {} characters", instance_id, kInstanceIdMax);
  for (char c : instance_id)
    RL_REQUIRE(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-',
               "instance id '{}' may hold only letters, digits, '.', '_' and '-'", instance_id);
  RL_REQUIRE(instance_id[0] != '.', "instance id '{}' must not start with '.'", instance_id);
  return "/ringllama-" + instance_id;
}

Segment Segment::create(const std::string& instance_id, uint64_t identity, const SegmentLayout& layout,
                        const SegmentOptions& opt) {
  Segment s;
  s.name_ = shm_name(instance_id);
  s.layout_ = layout;
  const std::string lock_dir = opt.lock_dir.empty() ? default_runtime_dir() : opt.lock_dir;
  // The default directory is the daemon's own and made here; one given explicitly must exist.
  ensure_private_dir(lock_dir, opt.lock_dir.empty(), opt.access, "lock");
  s.lock_path_ = lock_dir + s.name_ + ".lock";
  s.lock_fd_ = take_lock(s.lock_path_, s.name_);
  // The name is ours from here; `s` removes what it made if anything below throws.
  s.owner_ = true;

  // We hold the lock: a segment of this name is left over from a daemon that died.
  if (::shm_unlink(s.name_.c_str()) == 0)
    spdlog::warn("shared memory segment {} was left by a daemon that is gone: replaced", s.name_);

  // O_EXCL: never a file someone else planted under the name (shm_open adds O_NOFOLLOW).
  s.shm_fd_ = ::shm_open(s.name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (s.shm_fd_ < 0) {
    const int err = errno;
    struct stat st {};
    if (err == EEXIST && ::lstat(("/dev/shm" + s.name_).c_str(), &st) == 0)
      fail("cannot create shared memory segment {}: /dev/shm{} exists and belongs to uid {} (mode {:04o}), which "
           "this daemon cannot remove: remove it, or pick another --instance",
           s.name_, s.name_, st.st_uid, st.st_mode & 07777);
    fail("cannot create shared memory segment {}: {}", s.name_, errno_text(err));
  }
  // The mode is set explicitly: shm_open's passes through the umask. Workers of the access group
  // read it; nobody else does.
  if (opt.access.group && ::fchown(s.shm_fd_, static_cast<uid_t>(-1), opt.access.gid) != 0)
    fail("shared memory segment {}: cannot give it to group {}: {}", s.name_, opt.access.group_name,
         errno_text(errno));
  if (::fchmod(s.shm_fd_, opt.access.segment_mode()) != 0)
    fail("shared memory segment {}: cannot set its mode: {}", s.name_, errno_text(errno));
  const uint64_t bytes = layout.total_bytes;
  if (::ftruncate(s.shm_fd_, static_cast<off_t>(bytes)) != 0)
    fail("cannot size shared memory segment {} to {} bytes ({}): {}", s.name_, bytes, gib(bytes),
         errno_text(errno));
  // Reserve every page now: a sparse tmpfs file fails later with SIGBUS, in whichever process
  // touches the missing page first.
  if (int err = ::posix_fallocate(s.shm_fd_, 0, static_cast<off_t>(bytes)); err != 0) {
    struct statvfs vfs {};
    std::string room = "its size is unknown";
    if (::statvfs("/dev/shm", &vfs) == 0)
      room = fmt::format("/dev/shm has {} bytes ({}) free of {} ({})", uint64_t(vfs.f_bavail) * vfs.f_frsize,
                         gib(uint64_t(vfs.f_bavail) * vfs.f_frsize), uint64_t(vfs.f_blocks) * vfs.f_frsize,
                         gib(uint64_t(vfs.f_blocks) * vfs.f_frsize));
    fail("cannot reserve {} bytes ({}) for shared memory segment {}: {}; {}. Lower cpu_cap_layers or enlarge "
         "/dev/shm (mount -o remount,size=...)",
         bytes, gib(bytes), s.name_, errno_text(err), room);
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, s.shm_fd_, 0);
  if (p == MAP_FAILED) fail("cannot map shared memory segment {} ({} bytes): {}", s.name_, bytes, errno_text(errno));
  s.base_ = static_cast<uint8_t*>(p);

  if (opt.mlock != MlockMode::Off) {
    if (::mlock(s.base_, bytes) == 0) {
      s.mlocked_ = true;
    } else {
      int err = errno;
      struct rlimit rl {};
      ::getrlimit(RLIMIT_MEMLOCK, &rl);
      std::string msg = fmt::format(
          "cannot lock shared memory segment {} in memory ({} bytes, {}): {}; RLIMIT_MEMLOCK is {} (hard {}). "
          "Raise it (LimitMEMLOCK=infinity in the systemd unit, or ulimit -l) or lower cpu_cap_layers",
          s.name_, bytes, gib(bytes), errno_text(err), limit_text(rl.rlim_cur), limit_text(rl.rlim_max));
      if (opt.mlock == MlockMode::Require) fail("{}", msg);
      spdlog::warn("{}; going on unlocked", msg);
    }
  }

  // The pages are zero (fresh tmpfs pages): fill in what is not.
  auto* h = reinterpret_cast<SegmentHeader*>(s.base_);
  h->layout_version = kSegmentLayoutVersion;
  h->header_bytes = sizeof(SegmentHeader);
  std::memset(h->instance_id, 0, sizeof h->instance_id);
  std::memcpy(h->instance_id, instance_id.data(), instance_id.size());
  h->store_identity = identity;
  h->daemon_pid = ::getpid();
  h->n_layers = layout.n_layers;
  h->n_slots = layout.n_slots;
  h->slot_payload = layout.slot_payload;
  h->slot_bytes = layout.slot_bytes;
  h->slot_table_offset = layout.slot_table_offset;
  h->worker_table_offset = layout.worker_table_offset;
  h->max_workers = kMaxWorkers;
  h->globals_offset = layout.globals_offset;
  h->globals_bytes = layout.globals_bytes;
  h->slots_offset = layout.slots_offset;
  h->total_bytes = layout.total_bytes;
  h->globals.state.store(static_cast<uint32_t>(SlotState::Empty));
  h->globals.generation.store(0);
  h->globals.layer.store(-1);
  for (int64_t i = 0; i < layout.n_slots; ++i) {
    SlotEntry& e = s.slot_rw(i);
    e.state.store(static_cast<uint32_t>(SlotState::Empty));
    e.generation.store(0);
    e.layer.store(-1);
  }
  for (int64_t i = 0; i < kMaxWorkers; ++i) {
    s.worker_entry_rw(i).pid.store(0);
    s.worker_entry_rw(i).position.store(-1);
    s.worker_entry_rw(i).held.store(-1);
  }
  h->magic.store(kSegmentMagic, std::memory_order_release);
  spdlog::info("shared memory segment {}: {} bytes ({}), {} slots of {} bytes, globals {} bytes{}", s.name_, bytes,
               gib(bytes), layout.n_slots, layout.slot_bytes, layout.globals_bytes,
               s.mlocked_ ? ", locked in memory" : ", NOT locked in memory");
  return s;
}

Segment Segment::open(const std::string& name, std::optional<uint64_t> expect_identity,
                      std::optional<uid_t> expect_owner) {
  Segment s;
  s.name_ = name;
  s.shm_fd_ = ::shm_open(name.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (s.shm_fd_ < 0) {
    if (errno == ENOENT) fail("no shared memory segment {}: is ringllama-loaderd running?", name);
    fail("cannot open shared memory segment {}: {}", name, errno_text(errno));
  }
  struct stat st {};
  if (::fstat(s.shm_fd_, &st) != 0) fail("cannot stat shared memory segment {}: {}", name, errno_text(errno));
  // The weights a worker computes with come from this file: only the daemon may have written them.
  if (expect_owner && st.st_uid != *expect_owner)
    fail("shared memory segment {} belongs to uid {}, but the loader daemon runs as uid {}: not the daemon's "
         "segment, refused",
         name, st.st_uid, *expect_owner);
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    fail("shared memory segment {} is writable by others (mode {:04o}): refused, its weights could be changed by "
         "anyone",
         name, st.st_mode & 07777);
  const uint64_t bytes = static_cast<uint64_t>(st.st_size);
  if (bytes < sizeof(SegmentHeader))
    fail("shared memory segment {} has {} bytes, less than its header: not set up yet, or not ours", name, bytes);
  void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, s.shm_fd_, 0);
  if (p == MAP_FAILED) fail("cannot map shared memory segment {}: {}", name, errno_text(errno));
  s.base_ = static_cast<uint8_t*>(p);
  s.layout_.total_bytes = bytes;  // so that release() unmaps all of it whatever happens below

  const SegmentHeader& h = s.header();
  const uint64_t magic = h.magic.load(std::memory_order_acquire);
  if (magic == 0) fail("shared memory segment {} is still being set up by its daemon", name);
  if (magic != kSegmentMagic) fail("shared memory segment {} is not a ringllama window (magic {:#x})", name, magic);
  if (h.layout_version != kSegmentLayoutVersion)
    fail("shared memory segment {} has layout version {}, this build reads {}: run the daemon and the workers "
         "from the same build",
         name, h.layout_version, kSegmentLayoutVersion);
  if (h.total_bytes != bytes)
    fail("shared memory segment {} has {} bytes, its header says {}", name, bytes, h.total_bytes);
  SegmentLayout l = SegmentLayout::compute(h.n_layers, h.n_slots, h.slot_payload, h.globals_bytes);
  check_layout_matches(h, l, name);
  s.layout_ = l;
  if (expect_identity && h.store_identity != *expect_identity)
    fail("shared memory segment {} serves store {:016x}, this worker expects {:016x}: the daemon runs another "
         "store or manifest",
         name, h.store_identity, *expect_identity);
  return s;
}

Segment::Segment(Segment&& o) noexcept { *this = std::move(o); }

Segment& Segment::operator=(Segment&& o) noexcept {
  if (this != &o) {
    release();
    name_ = std::move(o.name_);
    lock_path_ = std::move(o.lock_path_);
    base_ = o.base_;
    layout_ = o.layout_;
    shm_fd_ = o.shm_fd_;
    lock_fd_ = o.lock_fd_;
    owner_ = o.owner_;
    mlocked_ = o.mlocked_;
    o.base_ = nullptr;
    o.shm_fd_ = -1;
    o.lock_fd_ = -1;
    o.owner_ = false;
  }
  return *this;
}

Segment::~Segment() { release(); }

void Segment::release() {
  if (base_) ::munmap(base_, layout_.total_bytes);
  base_ = nullptr;
  if (owner_) {
    // Only what this daemon made: a segment or lock that replaced ours (a daemon started on the same
    // name after the lock was lost) is the other daemon's.
    if (same_file(shm_fd_, "/dev/shm" + name_)) ::shm_unlink(name_.c_str());
    // Unlinked while still locked: a daemon that opened the old file sees it is stale by inode.
    if (same_file(lock_fd_, lock_path_)) ::unlink(lock_path_.c_str());
  }
  if (shm_fd_ >= 0) ::close(shm_fd_);
  shm_fd_ = -1;
  if (lock_fd_ >= 0) ::close(lock_fd_);
  lock_fd_ = -1;
  owner_ = false;
}

void Segment::require_owner(const char* what) const {
  RL_REQUIRE(owner_, "shared memory segment {}: {} needs the daemon's read-write mapping", name_, what);
}

const SlotEntry& Segment::slot(int64_t i) const {
  RL_REQUIRE(i >= 0 && i < layout_.n_slots, "slot {} is outside [0, {})", i, layout_.n_slots);
  return reinterpret_cast<const SlotEntry*>(base_ + layout_.slot_table_offset)[i];
}

const WorkerEntry& Segment::worker_entry(int64_t i) const {
  RL_REQUIRE(i >= 0 && i < kMaxWorkers, "worker entry {} is outside [0, {})", i, kMaxWorkers);
  return reinterpret_cast<const WorkerEntry*>(base_ + layout_.worker_table_offset)[i];
}

const uint8_t* Segment::slot_data(int64_t i) const {
  RL_REQUIRE(i >= 0 && i < layout_.n_slots, "slot {} is outside [0, {})", i, layout_.n_slots);
  return base_ + layout_.slot_offset(i);
}

SlotEntry& Segment::slot_rw(int64_t i) {
  require_owner("writing a slot entry");
  return const_cast<SlotEntry&>(slot(i));
}

SlotEntry& Segment::globals_entry_rw() {
  require_owner("writing the globals entry");
  return reinterpret_cast<SegmentHeader*>(base_)->globals;
}

WorkerEntry& Segment::worker_entry_rw(int64_t i) {
  require_owner("writing a worker entry");
  return const_cast<WorkerEntry&>(worker_entry(i));
}

uint8_t* Segment::slot_data_rw(int64_t i) {
  require_owner("writing a slot");
  return const_cast<uint8_t*>(slot_data(i));
}

uint8_t* Segment::globals_data_rw() {
  require_owner("writing the globals");
  return base_ + layout_.globals_offset;
}

}  // namespace ringllama
