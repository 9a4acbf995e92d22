// The io_uring reader: every mode, queue depth and block size reads exactly what pread reads;
// short reads continue; errors name the file and offset.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "common/errors.h"
#include "common/io_reader.h"
#include "common/store.h"
#include "tests/test_util.h"

namespace ringllama {
namespace {

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

// A 4096-aligned buffer of n bytes (+ slack so that a misaligned view still fits).
struct AlignedBuf {
  explicit AlignedBuf(size_t n) : size(n + 8192) {
    void* p = nullptr;
    if (posix_memalign(&p, 4096, size) != 0) throw std::bad_alloc();
    data = static_cast<char*>(p);
    std::memset(data, 0xAB, size);
  }
  ~AlignedBuf() { free(data); }
  size_t size;
  char* data;
};

std::string pread_range(const std::string& path, uint64_t off, uint64_t len) {
  std::string out(len, '\0');
  int fd = ::open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  uint64_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, out.data() + done, len - done, static_cast<off_t>(off + done));
    if (n <= 0) break;
    done += static_cast<uint64_t>(n);
  }
  ::close(fd);
  return out;
}

class IoReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ / "data.bin";
    content_ = random_bytes(kSize, 7);
    test::write_file(path_, content_);
  }
  // Reads [off, off+len) into a buffer at `misalign` bytes past a 4 KiB boundary and compares.
  void expect_range(IoReader& io, uint64_t off, uint64_t len, size_t misalign) {
    AlignedBuf buf(len);
    char* dst = buf.data + misalign;
    io.read(off, len, dst);
    const std::string want = pread_range(path_, off, len);
    ASSERT_EQ(0, std::memcmp(dst, want.data(), len)) << "offset " << off << " len " << len;
    EXPECT_EQ(static_cast<unsigned char>(dst[len]), 0xAB) << "wrote past the end";
  }
  static constexpr size_t kSize = 3 * 1024 * 1024 + 12345;  // not a multiple of 4 KiB
  test::TempDir dir_;
  std::string path_;
  std::string content_;
};

TEST_F(IoReaderTest, OddRangesEqualPreadInBothModes) {
  std::mt19937_64 rng(11);
  for (bool direct : {true, false}) {
    IoOptions o;
    o.direct = direct;
    o.block_bytes = 64 * 1024;
    IoReader io(path_, o);
    if (!direct) {
      EXPECT_FALSE(io.direct());
    }
    EXPECT_EQ(io.file_size(), kSize);
    // Aligned ranges, then arbitrary offsets, lengths and buffer alignments.
    expect_range(io, 0, 1 << 20, 0);
    expect_range(io, 4096, 8192, 0);
    expect_range(io, 0, kSize, 0);  // the tail of the file is unaligned
    for (int i = 0; i < 60; ++i) {
      uint64_t off = rng() % kSize;
      uint64_t len = 1 + rng() % std::min<uint64_t>(kSize - off, 700000);
      expect_range(io, off, len, (i % 3 == 0) ? 0 : rng() % 4096);
    }
    IoStats s = io.stats();
    EXPECT_GT(s.bytes, 0u);
    EXPECT_EQ(s.errors, 0u);
    if (direct && io.direct()) {
      EXPECT_GT(s.direct_bytes, 0u);
    }
    if (!direct) {
      EXPECT_EQ(s.direct_bytes, 0u);
    }
  }
}

TEST_F(IoReaderTest, QueueDepthOneAndSixtyFour) {
  for (uint32_t depth : {1u, 64u}) {
    IoOptions o;
    o.queue_depth = depth;
    o.block_bytes = 16 * 1024;
    IoReader io(path_, o);
    expect_range(io, 0, kSize, 0);
    expect_range(io, 4096 * 3, 1 << 20, 0);
    expect_range(io, 17, kSize - 17, 17);
  }
}

TEST_F(IoReaderTest, BlockSizeNotDividingTheLength) {
  IoOptions o;
  o.block_bytes = 12 * 1024;  // 3 MiB + 12345 is no multiple of it, nor is 1 MiB
  IoReader io(path_, o);
  expect_range(io, 0, 1 << 20, 0);
  expect_range(io, 8192, 5 * 12 * 1024 + 4096, 0);
  expect_range(io, 0, kSize, 0);
  // Reads are counted per block: more than one per range.
  EXPECT_GT(io.stats().reads, io.stats().ranges);
}

TEST_F(IoReaderTest, ShortReadsContinueWhereTheyStopped) {
  for (bool direct : {true, false}) {
    for (uint64_t cap : {uint64_t(4096), uint64_t(1000), uint64_t(1)}) {
      IoOptions o;
      o.direct = direct;
      o.block_bytes = 32 * 1024;
      o.queue_depth = 8;
      o.test_short_read_bytes = cap;
      IoReader io(path_, o);
      expect_range(io, 0, 200 * 1024, 0);
      expect_range(io, 4095, 50001, 3);
      EXPECT_GT(io.stats().short_reads, 0u) << "cap " << cap;
    }
  }
}

// A full submission ring, also when a short read's rest is submitted from the completion loop:
// the block waits for a later fill() and every range still completes with the right bytes (before,
// the failure was thrown from the completion loop with the range's in-flight count left wrong).
TEST_F(IoReaderTest, FullRingKeepsBlocksForLater) {
  for (bool direct : {true, false}) {
    IoOptions o;
    o.direct = direct;
    o.block_bytes = 16 * 1024;
    o.queue_depth = 4;
    o.test_short_read_bytes = 4096;
    o.test_full_ring = true;
    IoReader io(path_, o);
    const int n = 6;
    const uint64_t len = 100 * 1024 + 17;
    AlignedBuf buf(n * len);
    for (int i = 0; i < n; ++i) io.submit({uint64_t(i) * 300000, len, buf.data + i * len, uint64_t(i)});
    int done = 0;
    for (int round = 0; io.pending() > 0 && round < 100000; ++round)
      io.poll(
          [&](const ReadCompletion& c) {
            ++done;
            ASSERT_TRUE(c.ok()) << c.error;
            EXPECT_EQ(0, std::memcmp(c.request.dst, content_.data() + c.request.offset, c.request.len));
          },
          true);
    EXPECT_EQ(done, n);
    EXPECT_EQ(io.pending(), 0u);
    EXPECT_GT(io.stats().short_reads, 0u);
    expect_range(io, 12345, 70000, 1);  // and it goes on reading
  }
}

TEST_F(IoReaderTest, ReadingPastTheEndIsAnErrorNamingFileAndOffset) {
  for (bool direct : {true, false}) {
    IoOptions o;
    o.direct = direct;
    IoReader io(path_, o);
    AlignedBuf buf(kSize + 8192);
    try {
      io.read(0, kSize + 8192, buf.data);
      FAIL() << "no error";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(path_), std::string::npos) << msg;
      EXPECT_NE(msg.find("end of file"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(kSize)), std::string::npos) << msg;
    }
    // The reader stays usable after an error.
    expect_range(io, 100, 5000, 0);
    EXPECT_EQ(io.stats().errors, 1u);
  }
}

TEST_F(IoReaderTest, MissingFileIsAnError) {
  try {
    IoReader io(dir_ / "nope.bin", IoOptions{});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nope.bin"), std::string::npos);
  }
}

TEST_F(IoReaderTest, AsyncRangesOverlapAndComeBackWithTheirTags) {
  IoOptions o;
  o.block_bytes = 64 * 1024;
  o.queue_depth = 16;
  IoReader io(path_, o);
  const int n = 12;
  const uint64_t len = 256 * 1024;
  AlignedBuf buf(n * len);
  std::map<uint64_t, bool> seen;
  for (int i = 0; i < n; ++i) io.submit({uint64_t(i) * 200000, len, buf.data + i * len, uint64_t(100 + i)});
  // The tail one runs past the end and fails alone.
  AlignedBuf bad(1 << 20);
  io.submit({kSize - 4096, 1 << 20, bad.data, 999});
  int fd = io.event_fd();
  EXPECT_GE(fd, 0);
  while (io.pending() > 0) {
    io.poll(
        [&](const ReadCompletion& c) {
          EXPECT_FALSE(seen.count(c.request.tag));
          seen[c.request.tag] = c.ok();
          if (c.request.tag == 999) {
            EXPECT_FALSE(c.ok());
            EXPECT_NE(c.error.find("end of file"), std::string::npos) << c.error;
            return;
          }
          ASSERT_TRUE(c.ok()) << c.error;
          const char* dst = static_cast<const char*>(c.request.dst);
          EXPECT_EQ(0, std::memcmp(dst, content_.data() + c.request.offset, c.request.len));
        },
        true);
  }
  EXPECT_EQ(seen.size(), size_t(n + 1));
  // A synchronous read between asynchronous ones leaves their completions to poll().
  io.submit({0, 4096, buf.data, 1});
  expect_range(io, 4096, 4096, 0);
  size_t got = 0;
  while (io.pending() > 0) got += io.poll([](const ReadCompletion& c) { EXPECT_TRUE(c.ok()); }, true);
  EXPECT_EQ(got, 1u);
  EXPECT_GT(io.stats().gib_per_s(), 0.0);
}

// O_DIRECT refused at open: buffered reads through io_uring, same bytes. /dev/shm refuses
// O_DIRECT on kernels before 6.6; on newer ones a private ramfs mount (which always refuses it)
// stands in, where a mount namespace can be had.
bool odirect_refused(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT);
  if (fd >= 0) {
    ::close(fd);
    return false;
  }
  return errno == EINVAL;
}

void check_fallback(const std::string& path, const std::string& content) {
  IoReader io(path, IoOptions{});
  EXPECT_FALSE(io.direct());
  AlignedBuf buf(content.size());
  io.read(0, content.size(), buf.data);
  EXPECT_EQ(0, std::memcmp(buf.data, content.data(), content.size()));
  io.read(4096, 8192, buf.data);
  EXPECT_EQ(0, std::memcmp(buf.data, content.data() + 4096, 8192));
  EXPECT_EQ(io.stats().direct_bytes, 0u);
}

TEST(IoReaderFallback, BufferedWhereODirectIsRefused) {
  const std::string content = random_bytes(1 << 20, 3);
  const std::string shm = "/dev/shm/ringllama-test-io-" + std::to_string(::getpid());
  test::write_file(shm, content);
  const bool shm_refuses = odirect_refused(shm);
  if (shm_refuses) {
    check_fallback(shm, content);
  } else {
    IoReader io(shm, IoOptions{});  // this kernel's tmpfs takes O_DIRECT: the reader uses it
    EXPECT_TRUE(io.direct());
  }
  ::unlink(shm.c_str());
  if (shm_refuses) return;

  test::TempDir dir;
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (::unshare(CLONE_NEWNS) != 0 || ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
        ::mount("none", dir.path().c_str(), "ramfs", 0, nullptr) != 0)
      ::_exit(2);
    const std::string p = dir / "data.bin";
    test::write_file(p, content);
    if (!odirect_refused(p)) ::_exit(3);
    try {
      check_fallback(p, content);
    } catch (...) {
      ::_exit(4);
    }
    ::_exit(::testing::Test::HasFailure() ? 1 : 0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 2 || WEXITSTATUS(status) == 3)
    GTEST_SKIP() << "no file system here refuses O_DIRECT (tmpfs takes it, no mount namespace for ramfs)";
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// A store written by hand: every group of random bytes with its checksum.
TEST(IoReaderStore, GroupsAndLayersAreReadAndChecked) {
  ModelConfig m;
  m.dim = 64;
  m.n_layers = 3;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.head_dim = 16;
  m.ffn_dim = 160;
  m.vocab_size = 300;
  m.max_position_embeddings = 128;
  Manifest man = Manifest::plan(m, "random:io-test");
  std::string weights = random_bytes(man.weights_size, 5);
  for (auto& g : man.groups) g.xxh3 = checksum(weights.data() + g.offset, g.size);
  test::TempDir dir;
  man.save(dir / kManifestFile);
  test::write_file(dir / kWeightsFile, weights);
  Store store = Store::open(dir.path());

  IoOptions o;
  o.block_bytes = 8192;
  IoReader io(store.weights_path(), o);
  AlignedBuf buf(man.max_layer_size() + man.globals().size);
  read_group_checked(store, io, man.globals(), buf.data);
  EXPECT_EQ(0, std::memcmp(buf.data, weights.data(), man.globals().size));
  for (int64_t l = 0; l < m.n_layers; ++l) {
    read_layer_checked(store, io, l, buf.data);
    EXPECT_EQ(0, std::memcmp(buf.data, weights.data() + man.layer_offset(l), man.layer_size(l)));
  }

  // A flipped byte in layer 1's ffn group is a StoreError naming that group.
  weights[man.ffn(1).offset + 100] ^= 1;
  test::write_file(dir / kWeightsFile, weights);
  IoReader io2(store.weights_path(), o);
  read_layer_checked(store, io2, 0, buf.data);
  try {
    read_layer_checked(store, io2, 1, buf.data);
    FAIL();
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1 ffn"), std::string::npos) << e.what();
  }
  try {
    read_group_checked(store, io2, man.ffn(1), buf.data);
    FAIL();
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ringllama
