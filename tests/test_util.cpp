#include "tests/test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;

namespace ringllama::test {

namespace {

// RINGLLAMA_SOURCE_DIR and RINGLLAMA_BIN_DIR come from tests/CMakeLists.txt.
#ifndef RINGLLAMA_SOURCE_DIR
#define RINGLLAMA_SOURCE_DIR ""
#endif
#ifndef RINGLLAMA_BIN_DIR
#define RINGLLAMA_BIN_DIR ""
#endif

bool is_dir(const std::string& path) {
  std::error_code ec;
  return !path.empty() && fs::is_directory(path, ec);
}

// <source>/sub; when the compiled-in source tree is gone, the one around a build folder that
// sits directly inside it (build/bin/../..).
std::string source_path(const std::string& sub) {
  const std::string compiled = std::string(RINGLLAMA_SOURCE_DIR) + "/" + sub;
  if (is_dir(compiled)) return compiled;
  return (fs::path(bin_dir()) / ".." / ".." / sub).lexically_normal().string();
}

}  // namespace

std::string bin_dir() {
  if (const char* d = std::getenv("RINGLLAMA_TEST_BIN_DIR")) return d;
  if (is_dir(RINGLLAMA_BIN_DIR)) return RINGLLAMA_BIN_DIR;
  return fs::canonical("/proc/self/exe").parent_path().string();
}

std::string data_dir() {
  if (const char* d = std::getenv("RINGLLAMA_TEST_DATA")) return d;
  return source_path("tests/data");
}

TempDir::TempDir() {
  std::string tmpl = (fs::temp_directory_path() / "ringllama-test-XXXXXX").string();
  if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

RunResult run_bin(const std::string& binary, const std::vector<std::string>& args, int timeout_s) {
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe failed");
  std::string path = binary.find('/') == std::string::npos ? bin_dir() + "/" + binary : binary;
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(path.c_str()));
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(path.c_str(), argv.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  RunResult r;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  int open_fds = 2;
  bool killed = false;
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      kill(pid, SIGKILL);
      killed = true;
      break;
    }
    int n = poll(fds, 2, static_cast<int>(std::min<long>(left.count(), 1000)));
    if (n <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      ssize_t got = read(fds[i].fd, buf, sizeof buf);
      if (got > 0) {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(got));
      } else {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds)
    if (f.fd >= 0) close(f.fd);
  int status = 0;
  waitpid(pid, &status, 0);
  if (killed) r.err += "\n[test harness: killed after timeout]\n";
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path);
}

int bind_notify_socket(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{0, 100000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return fd;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::string s = text;
  std::replace(s.begin(), s.end(), ',', ' ');
  std::istringstream in(s);
  int64_t x;
  while (in >> x) ids.push_back(x);
  return ids;
}

std::string fetch_smollm2(const std::string& log, std::string* why) {
  auto trim = [](std::string t) {
    while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
    return t;
  };
  const std::string build = fs::path(bin_dir()).parent_path().string();
  const std::string src = fs::path(data_dir()).parent_path().parent_path().string();
  const std::string cmd = "BUILD_DIR='" + build + "' bash '" + src + "/scripts/fetch-smollm2.sh' > '" + log + "' 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    *why = "SmolLM2 could not be fetched: " + trim(read_file(log));
    return "";
  }
  // The script's last line is the file's path (the caller checks that it is one).
  const std::string out = trim(read_file(log));
  return out.substr(out.rfind('\n') + 1);
}

}  // namespace ringllama::test
