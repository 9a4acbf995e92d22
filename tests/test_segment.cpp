// The shared-memory segment: layout arithmetic, creation and read-only views, the lock file that
// tells a live daemon from a stale segment, identity checks, clear errors when memory is short.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "common/errors.h"
#include "common/segment.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

std::string unique_id(const char* what) {
  static int n = 0;
  return fmt::format("test-{}-{}-{}", what, ::getpid(), n++);
}

bool shm_exists(const std::string& name) { return std::filesystem::exists("/dev/shm" + name); }

SegmentLayout small_layout() { return SegmentLayout::compute(6, 3, 10000, 5000); }

SegmentOptions opts(const test::TempDir& dir) {
  SegmentOptions o;
  o.lock_dir = dir.path();
  return o;
}

TEST(SegmentLayout, Arithmetic) {
  SegmentLayout l = SegmentLayout::compute(80, 12, 1000001, 5000);
  EXPECT_EQ(l.slot_bytes, 1003520u);  // 245 pages
  EXPECT_EQ(l.globals_bytes, 8192u);
  EXPECT_EQ(l.slot_table_offset % 64, 0u);
  EXPECT_GE(l.slot_table_offset, sizeof(SegmentHeader));
  EXPECT_GE(l.worker_table_offset, l.slot_table_offset + 12 * sizeof(SlotEntry));
  EXPECT_GE(l.globals_offset, l.worker_table_offset + kMaxWorkers * sizeof(WorkerEntry));
  EXPECT_EQ(l.globals_offset % kSlotAlign, 0u);
  EXPECT_EQ(l.slots_offset % kSlotRegionAlign, 0u);
  EXPECT_GE(l.slots_offset, l.globals_offset + l.globals_bytes);
  EXPECT_LT(l.slots_offset, l.globals_offset + l.globals_bytes + kSlotRegionAlign);
  EXPECT_EQ(l.total_bytes, l.slots_offset + 12 * l.slot_bytes);
  EXPECT_EQ(l.slot_offset(3), l.slots_offset + 3 * l.slot_bytes);

  // Llama 3 70B in bf16: 80 layers of 1.71 GiB (8192 dim, 28672 ffn, 8 kv heads), 12 slots.
  const uint64_t layer = 2ull * (8192ull * 8192 * 2 + 8192ull * 1024 * 2 + 3ull * 8192 * 28672 + 2 * 8192);
  const uint64_t globals = 2ull * (2ull * 128256 * 8192 + 8192);
  SegmentLayout big = SegmentLayout::compute(80, 12, layer, globals);
  EXPECT_EQ(big.total_bytes, big.slots_offset + 12 * align_up(layer, 4096));
  EXPECT_LT(big.total_bytes - 12 * layer - globals, 3ull << 20);  // padding stays under 3 MiB

  // From a manifest: the largest layer and the globals group.
  ModelConfig m;
  m.dim = 64;
  m.n_layers = 3;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 16;
  m.ffn_dim = 160;
  m.vocab_size = 300;
  m.max_position_embeddings = 128;
  Manifest man = Manifest::plan(m, "random:seg");
  SegmentLayout fm = SegmentLayout::for_manifest(man, 2);
  EXPECT_EQ(fm.slot_payload, man.max_layer_size());
  EXPECT_EQ(fm.globals_bytes, man.globals().size);
  EXPECT_EQ(fm.n_layers, 3);

  EXPECT_THROW(SegmentLayout::compute(0, 3, 100, 100), Error);
  EXPECT_THROW(SegmentLayout::compute(3, 0, 100, 100), Error);
  EXPECT_THROW(SegmentLayout::compute(3, 3, 0, 100), Error);
  EXPECT_THROW(SegmentLayout::compute(3, 1 << 20, UINT64_MAX / 2, 100), Error);
}

TEST(Segment, InstanceIds) {
  EXPECT_EQ(Segment::shm_name("main"), "/ringllama-main");
  EXPECT_EQ(Segment::shm_name("a.b_c-9"), "/ringllama-a.b_c-9");
  EXPECT_THROW(Segment::shm_name(""), Error);
  EXPECT_THROW(Segment::shm_name("a/b"), Error);
  EXPECT_THROW(Segment::shm_name(".."), Error);
  EXPECT_THROW(Segment::shm_name(std::string(49, 'a')), Error);
}

TEST(Segment, StoreIdentityFollowsTextAndSize) {
  EXPECT_EQ(store_identity("abc", 10), store_identity("abc", 10));
  EXPECT_NE(store_identity("abc", 10), store_identity("abd", 10));
  EXPECT_NE(store_identity("abc", 10), store_identity("abc", 11));
}

TEST(Segment, ReadOnlyViewSeesTheDaemonsWrites) {
  test::TempDir dir;
  const std::string id = unique_id("view");
  Segment d = Segment::create(id, 0x1234, small_layout(), opts(dir));
  EXPECT_TRUE(d.owner());
  EXPECT_TRUE(d.mlocked());
  EXPECT_TRUE(shm_exists(d.name()));

  Segment w = Segment::open(d.name(), 0x1234);
  EXPECT_FALSE(w.owner());
  const SegmentHeader& h = w.header();
  EXPECT_EQ(h.layout_version, kSegmentLayoutVersion);
  EXPECT_EQ(std::string(h.instance_id), id);
  EXPECT_EQ(h.store_identity, 0x1234u);
  EXPECT_EQ(h.daemon_pid, ::getpid());
  EXPECT_EQ(h.n_layers, 6);
  EXPECT_EQ(h.n_slots, 3);
  EXPECT_TRUE(w.layout() == small_layout());
  for (int64_t i = 0; i < 3; ++i) {
    SlotSnapshot s = w.slot(i).snapshot();
    EXPECT_EQ(s.state, SlotState::Empty);
    EXPECT_EQ(s.layer, -1);
    EXPECT_EQ(s.generation, 0u);
  }

  // A load as the daemon does it, seen by the worker at each stage.
  d.slot_rw(1).begin_load(4);
  SlotSnapshot s = w.slot(1).snapshot();
  EXPECT_EQ(s.state, SlotState::Loading);
  EXPECT_EQ(s.layer, 4);
  EXPECT_EQ(s.generation, 1u);
  std::memset(d.slot_data_rw(1), 0x5A, 10000);
  d.slot_rw(1).finish_load(true);
  s = w.slot(1).snapshot();
  EXPECT_EQ(s.state, SlotState::Ready);
  EXPECT_EQ(w.slot_data(1)[0], 0x5A);
  EXPECT_EQ(w.slot_data(1)[9999], 0x5A);
  EXPECT_EQ(w.slot_data(2)[0], 0);  // the next slot is untouched
  EXPECT_TRUE(w.slot(1).unchanged(s));
  // The slot is reloaded while the worker copies: its copy is stale.
  d.slot_rw(1).begin_load(5);
  EXPECT_FALSE(w.slot(1).unchanged(s));
  d.slot_rw(1).finish_load(false);
  EXPECT_EQ(w.slot(1).snapshot().state, SlotState::Error);
  EXPECT_FALSE(w.slot(1).unchanged(s));

  d.globals_entry_rw().begin_load(-1);
  std::memset(d.globals_data_rw(), 0x33, 5000);
  d.globals_entry_rw().finish_load(true);
  EXPECT_EQ(w.globals_entry().snapshot().state, SlotState::Ready);
  EXPECT_EQ(w.globals_data()[4999], 0x33);

  d.worker_entry_rw(0).pid.store(4321);
  d.worker_entry_rw(0).position.store(17);
  EXPECT_EQ(w.worker_entry(0).pid.load(), 4321);
  EXPECT_EQ(w.worker_entry(0).position.load(), 17);

  // The worker's view is read-only: the API refuses, the mapping too.
  EXPECT_THROW(w.slot_rw(0), Error);
  EXPECT_THROW(w.slot(3), Error);
  EXPECT_DEATH(const_cast<uint8_t*>(w.slot_data(0))[0] = 1, "");
}

TEST(Segment, CleanExitRemovesSegmentAndLock) {
  test::TempDir dir;
  const std::string id = unique_id("clean");
  std::string name;
  {
    Segment d = Segment::create(id, 1, small_layout(), opts(dir));
    name = d.name();
    EXPECT_TRUE(std::filesystem::exists(dir.path() + name + ".lock"));
  }
  EXPECT_FALSE(shm_exists(name));
  EXPECT_FALSE(std::filesystem::exists(dir.path() + name + ".lock"));
  try {
    Segment::open(name);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is ringllama-loaderd running"), std::string::npos) << e.what();
  }
}

TEST(Segment, StaleSegmentIsReplaced) {
  test::TempDir dir;
  const std::string id = unique_id("stale");
  const std::string name = Segment::shm_name(id);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // A daemon that dies: its segment and lock file stay, its lock goes with the process.
    try {
      Segment d = Segment::create(id, 7, small_layout(), opts(dir));
      std::memset(d.slot_data_rw(0), 0x77, 100);
      ::_exit(0);
    } catch (...) {
      ::_exit(1);
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ASSERT_TRUE(shm_exists(name));
  EXPECT_EQ(Segment::open(name).header().daemon_pid, pid);

  Segment d = Segment::create(id, 8, small_layout(), opts(dir));
  Segment w = Segment::open(name, 8);
  EXPECT_EQ(w.header().daemon_pid, ::getpid());
  EXPECT_EQ(w.slot_data(0)[0], 0);  // a new segment, not the old one
}

TEST(Segment, SecondCreatorWhileTheFirstLivesIsRefused) {
  test::TempDir dir;
  const std::string id = unique_id("live");
  Segment d = Segment::create(id, 1, small_layout(), opts(dir));
  std::memset(d.slot_data_rw(2), 0x42, 10);
  try {
    Segment::create(id, 1, small_layout(), opts(dir));
    FAIL() << "second create succeeded";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(fmt::format("another loaderd (pid {}) owns", ::getpid())), std::string::npos) << msg;
    EXPECT_NE(msg.find(d.name()), std::string::npos) << msg;
  }
  // The live segment is untouched.
  Segment w = Segment::open(d.name(), 1);
  EXPECT_EQ(w.slot_data(2)[0], 0x42);
}

TEST(Segment, MismatchesAreDetected) {
  test::TempDir dir;
  Segment d = Segment::create(unique_id("id"), 0xAAAA, small_layout(), opts(dir));
  try {
    Segment::open(d.name(), 0xBBBB);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expects 000000000000bbbb"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(Segment::open(d.name()));  // no identity asked: fine

  auto& h = const_cast<SegmentHeader&>(d.header());
  h.layout_version = 99;
  try {
    Segment::open(d.name());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layout version 99"), std::string::npos) << e.what();
  }
  h.layout_version = kSegmentLayoutVersion;
  h.slots_offset += 4096;
  EXPECT_THROW(Segment::open(d.name()), Error);
  h.slots_offset -= 4096;
  h.magic.store(0);
  try {
    Segment::open(d.name());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("being set up"), std::string::npos) << e.what();
  }
  h.magic.store(12345);
  EXPECT_THROW(Segment::open(d.name()), Error);
  h.magic.store(kSegmentMagic);
  EXPECT_NO_THROW(Segment::open(d.name()));
}

TEST(Segment, NoRoomInDevShmNamesTheBytesAndTheLimit) {
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs("/dev/shm", &vfs), 0);
  const uint64_t free_bytes = uint64_t(vfs.f_bavail) * vfs.f_frsize;
  // tmpfs refuses a reservation larger than its free space before allocating anything.
  const uint64_t slot = free_bytes + (64ull << 30);
  test::TempDir dir;
  const std::string id = unique_id("room");
  SegmentLayout l = SegmentLayout::compute(4, 1, slot, 4096);
  try {
    Segment::create(id, 1, l, opts(dir));
    FAIL() << "a segment larger than /dev/shm was created";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(std::to_string(l.total_bytes) + " bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("/dev/shm has"), std::string::npos) << msg;
  }
  // Nothing left behind: the name and its lock are free again.
  EXPECT_FALSE(shm_exists(Segment::shm_name(id)));
  EXPECT_NO_THROW(Segment::create(id, 1, small_layout(), opts(dir)));
}

// mlock beyond RLIMIT_MEMLOCK: an error naming the limit by default, a warning when asked. Runs in
// a child that drops CAP_IPC_LOCK (root ignores the limit otherwise).
TEST(Segment, MlockFailureNamesTheLimit) {
  test::TempDir dir;
  const std::string id = unique_id("mlock");
  int pipefd[2];
  ASSERT_EQ(::pipe(pipefd), 0);
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(pipefd[0]);
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct caps[2]{};
    if (::syscall(SYS_capget, &hdr, caps) != 0) ::_exit(10);
    caps[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
    if (::syscall(SYS_capset, &hdr, caps) != 0) ::_exit(10);
    struct rlimit rl {65536, 65536};
    if (::setrlimit(RLIMIT_MEMLOCK, &rl) != 0) ::_exit(10);
    std::string msg;
    try {
      Segment::create(id, 1, SegmentLayout::compute(4, 2, 1 << 20, 4096), opts(dir));
      ::_exit(11);  // locked 4 MiB under a 64 KiB limit?
    } catch (const Error& e) {
      msg = e.what();
    }
    if (::write(pipefd[1], msg.data(), msg.size()) != static_cast<ssize_t>(msg.size())) ::_exit(12);
    SegmentOptions warn = opts(dir);
    warn.mlock = MlockMode::Warn;
    try {
      bool locked;
      {
        Segment s = Segment::create(id, 1, SegmentLayout::compute(4, 2, 1 << 20, 4096), warn);
        locked = s.mlocked();
      }
      ::_exit(locked ? 13 : 0);
    } catch (...) {
      ::_exit(14);
    }
  }
  ::close(pipefd[1]);
  std::string msg;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<size_t>(n));
  ::close(pipefd[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 10) GTEST_SKIP() << "cannot drop CAP_IPC_LOCK or set RLIMIT_MEMLOCK here";
  EXPECT_EQ(WEXITSTATUS(status), 0) << msg;
  EXPECT_NE(msg.find("RLIMIT_MEMLOCK is 65536 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::to_string(SegmentLayout::compute(4, 2, 1 << 20, 4096).total_bytes) + " bytes"),
            std::string::npos)
      << msg;
  EXPECT_FALSE(shm_exists(Segment::shm_name(id)));
}

}  // namespace
}  // namespace ringllama
