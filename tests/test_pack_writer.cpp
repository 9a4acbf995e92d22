// The store writer: a full disk gives one clear message, any failure removes the temporary
// directory and leaves an existing store alone, and the streamed checksums are checksum()'s.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <filesystem>

#include "common/errors.h"
#include "common/store.h"
#include "daemon/pack.h"
#include "daemon/pack_writer.h"
#include "daemon/random_model.h"
#include "tests/test_util.h"

namespace fs = std::filesystem;

namespace ringllama {
namespace {

using test::TempDir;

Manifest tiny_plan() { return Manifest::plan(random_shape("tiny"), "random:tiny"); }

WriteOptions quiet(const std::string& out) {
  WriteOptions w;
  w.out = out;
  w.progress = false;
  return w;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

void expect_only(const std::string& dir, std::vector<std::string> names) {
  std::vector<std::string> got;
  for (const auto& e : fs::directory_iterator(dir)) got.push_back(e.path().filename().string());
  std::sort(got.begin(), got.end());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(got, names);
}

TEST(PackWriter, WriteAllOnAFullDeviceSaysNoSpace) {
  int fd = ::open("/dev/full", O_WRONLY | O_CLOEXEC);
  if (fd < 0) GTEST_SKIP() << "no /dev/full here";
  std::vector<char> buf(1 << 16, 'x');
  std::string msg = message_of([&] { write_all(fd, buf.data(), buf.size(), "/store/weights.bin"); });
  ::close(fd);
  EXPECT_EQ(msg, "/store/weights.bin: no space left on device");
}

// A small tmpfs, where mounting is allowed (root in a VM or container with CAP_SYS_ADMIN).
class SmallDisk {
 public:
  SmallDisk(const std::string& dir, uint64_t bytes) : dir_(dir) {
    fs::create_directory(dir);
    const std::string opts = "size=" + std::to_string(bytes);
    mounted_ = ::mount("tmpfs", dir.c_str(), "tmpfs", 0, opts.c_str()) == 0;
  }
  ~SmallDisk() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  bool mounted() const { return mounted_; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

TEST(PackWriter, FullDiskIsOneLineAndLeavesNothing) {
  TempDir d;
  SmallDisk disk(d / "small", 128 * 1024);
  if (!disk.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here";
  test::RunResult r = test::run_bin("ringllama-pack", {"--random", "tiny", "--out", d / "small/store"});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("ringllama-pack: error: " + (d / "small/store.tmp-")), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("/weights.bin: no space left on device\n"), std::string::npos) << r.err;
  expect_only(d / "small", {});
}

TEST(PackWriter, FullDiskWhenTheManifestIsWritten) {
  // Room for weights.bin to the byte (tmpfs counts whole pages), none for the manifest: the failure
  // comes from a write, after the space for the weights was reserved.
  TempDir d;
  const Manifest plan = tiny_plan();
  SmallDisk disk(d / "small", plan.weights_size);
  if (!disk.mounted()) GTEST_SKIP() << "cannot mount a tmpfs here";
  RandomSource src(plan, 1);
  std::string msg = message_of([&] { write_store(plan, src, quiet(d / "small/store")); });
  EXPECT_NE(msg.find("/manifest.yaml: no space left on device"), std::string::npos) << msg;
  expect_only(d / "small", {});
}

// Fails when it reaches a given group.
class FailingSource : public PackSource {
 public:
  FailingSource(const Manifest& plan, int64_t fail_layer) : inner_(plan, 1), fail_layer_(fail_layer) {}
  void fill(const GroupEntry& g, size_t ti, uint64_t first, uint64_t count, bf16_t* out) const override {
    if (g.layer == fail_layer_) throw StoreError("model.safetensors: read error (test)");
    inner_.fill(g, ti, first, count, out);
  }

 private:
  RandomSource inner_;
  int64_t fail_layer_;
};

TEST(PackWriter, SourceFailureRemovesTheTemporaryDirectory) {
  TempDir d;
  const Manifest plan = tiny_plan();
  FailingSource src(plan, 1);
  EXPECT_EQ(message_of([&] { write_store(plan, src, quiet(d / "store")); }), "model.safetensors: read error (test)");
  expect_only(d.path(), {});

  // With --force over an existing store, the old one survives a failed replacement.
  RandomSource good(plan, 7);
  write_store(plan, good, quiet(d / "store"));
  const std::string before = test::read_file(d / "store/weights.bin");
  WriteOptions w = quiet(d / "store");
  w.force = true;
  EXPECT_NE(message_of([&] { write_store(plan, src, w); }).find("read error"), std::string::npos);
  EXPECT_EQ(test::read_file(d / "store/weights.bin"), before);
  expect_only(d.path(), {"store"});
}

TEST(PackWriter, InterruptRemovesTheTemporaryDirectory) {
  TempDir d;
  const Manifest plan = tiny_plan();
  RandomSource src(plan, 1);
  std::atomic<bool> cancel{true};
  WriteOptions w = quiet(d / "store");
  w.cancel = &cancel;
  EXPECT_EQ(message_of([&] { write_store(plan, src, w); }), "interrupted");
  expect_only(d.path(), {});
}

TEST(PackWriter, SinkFailureStopsTheStream) {
  Manifest plan = tiny_plan();
  RandomSource src(plan, 1);
  WriteOptions w = quiet("");
  w.chunk_bytes = 4096;
  int calls = 0;
  std::string msg = message_of([&] {
    stream_groups(plan, src, w, [&](const char*, uint64_t) {
      if (++calls == 3) throw StoreError("sink: no space left on device");
    });
  });
  EXPECT_EQ(msg, "sink: no space left on device");
  EXPECT_EQ(calls, 3);
}

TEST(PackWriter, StreamedChecksumsAreChecksumOfEachGroup) {
  // Small chunks, odd thread counts: the bytes and checksums must not depend on either.
  std::string reference;
  for (auto [chunk, threads] : {std::pair<uint64_t, int>{64 << 20, 1}, {4096, 3}, {12288, 2}, {8192, 5}}) {
    Manifest plan = tiny_plan();
    RandomSource src(plan, 11);
    WriteOptions w = quiet("");
    w.chunk_bytes = chunk;
    w.threads = threads;
    std::string bytes;
    stream_groups(plan, src, w, [&](const char* p, uint64_t n) { bytes.append(p, n); });
    ASSERT_EQ(bytes.size(), plan.weights_size);
    for (const GroupEntry& g : plan.groups)
      EXPECT_EQ(g.xxh3, checksum(bytes.data() + g.offset, g.size)) << g.label() << " chunk " << chunk;
    if (reference.empty()) reference = bytes;
    EXPECT_TRUE(bytes == reference) << "chunk " << chunk << " threads " << threads;
  }
}

TEST(PackWriter, ForceReplacesAndCleansUp) {
  TempDir d;
  const Manifest plan = tiny_plan();
  RandomSource a(plan, 1), b(plan, 2);
  write_store(plan, a, quiet(d / "store"));
  const std::string first = test::read_file(d / "store/weights.bin");
  EXPECT_NE(message_of([&] { write_store(plan, b, quiet(d / "store")); }).find("already exists"), std::string::npos);
  WriteOptions w = quiet(d / "store");
  w.force = true;
  WriteResult r = write_store(plan, b, w);
  EXPECT_NE(test::read_file(d / "store/weights.bin"), first);
  expect_only(d.path(), {"store"});
  expect_only(d / "store", {"manifest.yaml", "weights.bin"});
  Store s = Store::open(d / "store");
  EXPECT_EQ(s.verify([](const std::string& line) { ADD_FAILURE() << line; }), 0u);
  EXPECT_EQ(r.bytes, plan.weights_size);
}

}  // namespace
}  // namespace ringllama
