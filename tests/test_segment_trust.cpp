// What the daemon's files trust (DESIGN.md "Trust"): the lock file is never a symlink or a file
// someone else made, its directory is private, the segment is 0600 (0640 with an access group),
// only files this process made are removed, slot snapshots are never torn, and a worker refuses a
// segment another user owns or anyone may write.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <thread>
#include <zmq.hpp>

#include "common/config.h"
#include "common/errors.h"
#include "common/protocol.h"
#include "common/runtime_dir.h"
#include "common/segment.h"
#include "common/store.h"
#include "daemon/loaderd_sockets.h"
#include "tests/test_util.h"
#include "worker/daemon_weights.h"

namespace ringllama {
namespace {

namespace fs = std::filesystem;

std::string unique_id(const char* what) {
  static int n = 0;
  return fmt::format("trust-{}-{}-{}", what, ::getpid(), n++);
}

SegmentLayout small_layout() { return SegmentLayout::compute(6, 3, 10000, 5000); }

SegmentOptions opts(const std::string& lock_dir) {
  SegmentOptions o;
  o.lock_dir = lock_dir;
  o.mlock = MlockMode::Off;
  return o;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

unsigned mode_of(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 ? (st.st_mode & 07777) : 0xffff;
}

// Restores an environment variable when the test ends.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* v = std::getenv(name)) old_ = v, had_ = true;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had_) ::setenv(name_, old_.c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST(SegmentTrust, SymlinkPlantedAtTheLockIsRefusedAndItsTargetUntouched) {
  test::TempDir dir;
  const std::string id = unique_id("symlink");
  const std::string target = dir / "precious";
  test::write_file(target, "do not truncate me");
  fs::create_symlink(target, dir.path() + Segment::shm_name(id) + ".lock");
  const std::string msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(dir.path())); });
  EXPECT_NE(msg.find("symbolic link"), std::string::npos) << msg;
  EXPECT_EQ(test::read_file(target), "do not truncate me");
  EXPECT_FALSE(fs::exists("/dev/shm" + Segment::shm_name(id)));
}

TEST(SegmentTrust, LockFileOthersMayWriteOrOwnIsRefused) {
  test::TempDir dir;
  const std::string id = unique_id("foreign");
  const std::string lock = dir.path() + Segment::shm_name(id) + ".lock";
  test::write_file(lock, "");
  ASSERT_EQ(::chmod(lock.c_str(), 0666), 0);
  std::string msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(dir.path())); });
  EXPECT_NE(msg.find("writable by others"), std::string::npos) << msg;
  EXPECT_NE(msg.find("0666"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists("/dev/shm" + Segment::shm_name(id)));

  // Another user's lock file (only root can make one here).
  ASSERT_EQ(::chmod(lock.c_str(), 0600), 0);
  if (::geteuid() == 0 && ::chown(lock.c_str(), 65534, 65534) == 0) {
    msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(dir.path())); });
    EXPECT_NE(msg.find("another user's"), std::string::npos) << msg;
    EXPECT_NE(msg.find("uid 65534"), std::string::npos) << msg;
  }
  // A FIFO would block a plain open: refused at once.
  fs::remove(lock);
  ASSERT_EQ(::mkfifo(lock.c_str(), 0600), 0);
  msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(dir.path())); });
  EXPECT_NE(msg.find("not a regular file"), std::string::npos) << msg;
}

TEST(SegmentTrust, LockDirectoryMustBePrivate) {
  test::TempDir dir;
  const std::string id = unique_id("dir");
  // World-writable, as /dev/shm and /tmp are.
  const std::string open_dir = dir / "open";
  fs::create_directory(open_dir);
  ASSERT_EQ(::chmod(open_dir.c_str(), 01777), 0);
  std::string msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(open_dir)); });
  EXPECT_NE(msg.find("writable by every user"), std::string::npos) << msg;
  msg = error_of([&] { Segment::create(id, 1, small_layout(), opts("/dev/shm")); });
  EXPECT_NE(msg.find("writable by every user"), std::string::npos) << msg;
  // A symlink to a private directory: refused, it could point anywhere later.
  fs::create_directory_symlink(dir.path(), dir / "link");
  msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(dir / "link")); });
  EXPECT_NE(msg.find("symbolic link"), std::string::npos) << msg;
  // An explicit directory that does not exist is not made.
  msg = error_of([&] { Segment::create(id, 1, small_layout(), opts(dir / "missing")); });
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "missing"));
  EXPECT_FALSE(fs::exists("/dev/shm" + Segment::shm_name(id)));
}

TEST(SegmentTrust, DefaultLockDirectoryIsMadePrivateAndFilesAre0600) {
  test::TempDir dir;
  const std::string run = dir / "run";
  ScopedEnv env("RUNTIME_DIRECTORY", run);
  EXPECT_EQ(default_runtime_dir(), run);
  const mode_t old = ::umask(0);  // a loose umask must not loosen the files
  const std::string id = unique_id("default");
  {
    Segment s = Segment::create(id, 1, small_layout(), opts(""));
    ::umask(old);
    EXPECT_EQ(mode_of(run), 0700u);
    EXPECT_EQ(mode_of(run + s.name() + ".lock"), 0600u);
    EXPECT_EQ(mode_of("/dev/shm" + s.name()), 0600u);
  }
  EXPECT_FALSE(fs::exists(run + Segment::shm_name(id) + ".lock"));
  ::umask(old);

  // With an access group: the segment 0640 in that group, for workers of other users.
  const gid_t gid = ::getegid();
  const struct group* g = ::getgrgid(gid);
  ASSERT_NE(g, nullptr);
  SegmentOptions o = opts(dir.path());
  o.access = file_access(g->gr_name);
  Segment s = Segment::create(unique_id("group"), 1, small_layout(), o);
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm" + s.name()).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  EXPECT_EQ(st.st_gid, gid);
  EXPECT_NE(error_of([] { file_access("no-such-group-ringllama"); }).find("no such group"), std::string::npos);
}

TEST(SegmentTrust, ExitRemovesOnlyTheFilesItMade) {
  test::TempDir dir;
  const std::string id = unique_id("inode");
  const std::string name = Segment::shm_name(id);
  {
    Segment s = Segment::create(id, 1, small_layout(), opts(dir.path()));
    // Another daemon replaced both files under the same names (it took the name after ours was
    // lost): what is there now is not ours to remove.
    ASSERT_EQ(::shm_unlink(name.c_str()), 0);
    const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ::close(fd);
    fs::remove(dir.path() + name + ".lock");
    test::write_file(dir.path() + name + ".lock", "other\n");
    ASSERT_EQ(::chmod((dir.path() + name + ".lock").c_str(), 0600), 0);
  }
  EXPECT_TRUE(fs::exists("/dev/shm" + name)) << "the other daemon's segment was removed";
  EXPECT_EQ(test::read_file(dir.path() + name + ".lock"), "other\n");
  ::shm_unlink(name.c_str());
}

TEST(SegmentTrust, WorkerRefusesAForeignOrWritableSegment) {
  test::TempDir dir;
  Segment d = Segment::create(unique_id("open"), 1, small_layout(), opts(dir.path()));
  EXPECT_NO_THROW(Segment::open(d.name(), 1, ::geteuid()));
  std::string msg = error_of([&] { Segment::open(d.name(), 1, ::geteuid() + 1); });
  EXPECT_NE(msg.find("not the daemon's segment"), std::string::npos) << msg;
  ASSERT_EQ(::chmod(("/dev/shm" + d.name()).c_str(), 0666), 0);
  msg = error_of([&] { Segment::open(d.name(), 1); });
  EXPECT_NE(msg.find("writable by others"), std::string::npos) << msg;
}

// A seqlock read: state and layer always belong to the generation read, whatever the writer does
// in between. Before, a load that began between the reads paired the old generation with the new
// layer (and the worker's release check then saw a change that was only the torn read).
TEST(SegmentTrust, SlotSnapshotIsNeverTorn) {
  test::TempDir dir;
  Segment d = Segment::create(unique_id("torn"), 1, small_layout(), opts(dir.path()));
  Segment w = Segment::open(d.name(), 1);
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    SlotEntry& e = d.slot_rw(0);
    // Each load's layer is the generation it gets, so a consistent snapshot has layer == generation.
    while (!stop.load(std::memory_order_relaxed)) {
      e.begin_load(static_cast<int64_t>(e.generation.load() + 1));
      e.finish_load(true);
    }
  });
  uint64_t ready = 0, torn = 0;
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(1500);
  while (std::chrono::steady_clock::now() < end && ready < 3000000) {
    const SlotSnapshot s = w.slot(0).snapshot();
    if (s.state != SlotState::Ready) continue;
    ++ready;
    if (s.layer != static_cast<int64_t>(s.generation)) ++torn;
  }
  stop = true;
  writer.join();
  EXPECT_GT(ready, 1000u);
  EXPECT_EQ(torn, 0u) << "of " << ready << " ready snapshots";
}

TEST(RuntimeDir, PeerAddressAndCanonicalEndpoints) {
  PeerCred c = parse_peer_address("localhost:1000:1001:4242");
  EXPECT_TRUE(c.known);
  EXPECT_EQ(c.uid, 1000u);
  EXPECT_EQ(c.gid, 1001u);
  EXPECT_EQ(c.pid, 4242);
  EXPECT_FALSE(parse_peer_address("127.0.0.1").known);
  EXPECT_FALSE(parse_peer_address("").known);
  EXPECT_FALSE(parse_peer_address("x:1:2:y").known);
  EXPECT_FALSE(parse_peer_address("x:1:2:99999999999").known);

  test::TempDir dir;
  fs::create_directory(dir / "a");
  fs::create_directory_symlink(dir / "a", dir / "b");
  const std::string want = "ipc://" + fs::canonical(dir / "a").string() + "/c.sock";
  EXPECT_EQ(canonical_endpoint("ipc://" + (dir / "a/./c.sock")), want);
  EXPECT_EQ(canonical_endpoint("ipc://" + (dir / "a/../a/c.sock")), want);
  EXPECT_EQ(canonical_endpoint("ipc://" + (dir / "b/c.sock")), want);
  EXPECT_EQ(canonical_endpoint("tcp://127.0.0.1:5555"), "tcp://127.0.0.1:5555");
  EXPECT_NE(error_of([&] { canonical_endpoint("ipc://" + (dir / "nope/c.sock")); }).find("does not exist"),
            std::string::npos);
}

// The kernel's word on who connected reaches the daemon with every message.
TEST(RuntimeDir, ZeromqHandsOnTheConnectionsCredentials) {
  test::TempDir dir;
  const std::string ep = "ipc://" + (dir / "c.sock");
  zmq::context_t ctx(1);
  zmq::socket_t r(ctx, zmq::socket_type::router), s(ctx, zmq::socket_type::dealer);
  r.set(zmq::sockopt::linger, 0);
  s.set(zmq::sockopt::linger, 0);
  r.bind(ep);
  s.connect(ep);
  s.send(zmq::str_buffer("hi"), zmq::send_flags::none);
  zmq::message_t id, body;
  ASSERT_TRUE(r.recv(id));
  ASSERT_TRUE(r.recv(body));
  const PeerCred c = peer_credentials(body);
  ASSERT_TRUE(c.known);
  EXPECT_EQ(c.pid, ::getpid());
  EXPECT_EQ(c.uid, ::geteuid());
}

// A socket file is removed at exit only while it is the one bound: never one another process bound
// at the same path since (libzmq unlinks and rebinds).
TEST(RuntimeDir, BoundEndpointRemovesOnlyItsOwnSocketFile) {
  test::TempDir dir;
  const std::string ep = "ipc://" + (dir / "c.sock");
  zmq::context_t ctx(1);
  zmq::socket_t a(ctx, zmq::socket_type::router), b(ctx, zmq::socket_type::router);
  a.set(zmq::sockopt::linger, 0);
  b.set(zmq::sockopt::linger, 0);
  {
    BoundEndpoint ea(a, ep, FileAccess{}, "test");
    EXPECT_EQ(mode_of(dir / "c.sock"), 0600u);
    b.bind(ep);  // replaces the file
  }
  EXPECT_TRUE(fs::exists(dir / "c.sock"));
  {
    zmq::socket_t c(ctx, zmq::socket_type::router);
    c.set(zmq::sockopt::linger, 0);
    fs::remove(dir / "d.sock");
    BoundEndpoint ec(c, "ipc://" + (dir / "d.sock"), FileAccess{}, "test");
  }
  EXPECT_FALSE(fs::exists(dir / "d.sock"));
}

// 8. A worker checks the segment's slot and globals sizes against its manifest before it reads:
// a daemon (here this test, answering hello) whose segment is too small for the model is refused
// with the sizes, instead of reads past the slots.
TEST(SegmentTrust, WorkerRefusesASegmentTooSmallForItsManifest) {
  test::TempDir dir;
  const std::string store_dir = dir / "store";
  ASSERT_EQ(test::run_bin("ringllama-pack", {"--random", "tiny", "--layers", "2", "--out", store_dir, "--quiet"}, 60)
                .status,
            0);
  const Store store = Store::open(store_dir);
  const Manifest& m = store.manifest();
  const uint64_t identity = store_identity(store);
  const std::string ep = "ipc://" + (dir / "ctl.sock");
  for (bool small_slots : {true, false}) {
    const SegmentLayout layout =
        small_slots ? SegmentLayout::compute(2, 2, m.max_layer_size() / 2, m.globals().size)
                    : SegmentLayout::compute(2, 2, m.max_layer_size(), m.globals().size / 3);
    Segment seg = Segment::create(unique_id("small"), identity, layout, opts(dir.path()));
    zmq::context_t ctx(1);
    zmq::socket_t router(ctx, zmq::socket_type::router);
    router.set(zmq::sockopt::linger, 0);
    router.bind(ep);
    std::thread daemon([&] {
      zmq::message_t id, body;
      if (!router.recv(id) || !router.recv(body)) return;
      Welcome w;
      w.segment = seg.name();
      w.layout_version = kSegmentLayoutVersion;
      w.instance_id = "small";
      w.store = store_dir;
      w.store_identity = identity;
      w.n_layers = 2;
      w.n_slots = 2;
      w.heartbeat_ms = 1000;
      w.worker_id = 0;
      router.send(id, zmq::send_flags::sndmore);
      router.send(zmq::buffer(encode(ControlReply{w})), zmq::send_flags::none);
    });
    Config c;
    const std::string msg = error_of([&] { open_daemon_weights(ep, c); });
    daemon.join();
    if (small_slots) {
      EXPECT_NE(msg.find(fmt::format("slots of {} bytes, but the manifest's largest layer has {}",
                                     m.max_layer_size() / 2, m.max_layer_size())),
                std::string::npos)
          << msg;
    } else {
      EXPECT_NE(msg.find("for the globals, the manifest's need"), std::string::npos) << msg;
    }
  }
}

}  // namespace
}  // namespace ringllama
