// Background processes for the loader daemon's end-to-end suites: a daemon and its clients run at
// the same time, are signalled and killed, and leave nothing behind (a Proc still running when it
// goes out of scope gets SIGTERM, so that a daemon removes its segment, then SIGKILL).
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tests/test_util.h"

extern char** environ;

namespace ringllama::test {

class Proc {
 public:
  // Starts build/bin/<binary> with stdout and stderr into `log_path`. `env` entries are added to
  // this process's environment without its RINGLLAMA_* variables (the binaries take those for
  // config keys); the value "self" of WATCHDOG_PID becomes the child's own pid.
  Proc(const std::string& binary, const std::vector<std::string>& args, std::string log_path,
       const std::vector<std::string>& env = {})
      : log_(std::move(log_path)) {
    const std::string path = bin_dir() + "/" + binary;
    std::vector<std::string> envs;
    for (char** e = environ; *e; ++e)
      if (std::strncmp(*e, "RINGLLAMA_", 10) != 0) envs.push_back(*e);
    for (const auto& e : env) envs.push_back(e);
    int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw std::runtime_error("cannot open " + log_);
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      static char self[64];
      std::snprintf(self, sizeof self, "WATCHDOG_PID=%d", static_cast<int>(::getpid()));
      std::vector<char*> argv{const_cast<char*>(path.c_str())};
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      std::vector<char*> envp;
      for (auto& e : envs) envp.push_back(e == "WATCHDOG_PID=self" ? self : const_cast<char*>(e.c_str()));
      envp.push_back(nullptr);
      ::execve(path.c_str(), argv.data(), envp.data());
      _exit(127);
    }
    ::close(fd);
  }
  ~Proc() {
    if (!running()) return;
    ::kill(pid_, SIGTERM);
    if (wait(5000) < 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  Proc(const Proc&) = delete;
  Proc& operator=(const Proc&) = delete;

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_; }
  std::string log() const { return read_file(log_); }
  void signal(int sig) const {
    if (status_ < 0) ::kill(pid_, sig);
  }

  bool running() {
    if (status_ >= 0) return false;
    int st = 0;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      return false;
    }
    return true;
  }
  // The exit status (128 + signal when killed), or -1 when still running after timeout_ms.
  int wait(int timeout_ms) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (running()) {
      if (std::chrono::steady_clock::now() > end) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return status_;
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
  int status_ = -1;
};

// Polls `cond` every 10 ms for at most timeout_ms.
template <typename Cond>
bool eventually(Cond cond, int timeout_ms) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// ipc://PATH -> PATH
inline std::string ipc_file(const std::string& endpoint) { return endpoint.substr(6); }

// A daemon is serving once it logged "ready" (after the first window loaded and the sockets were
// bound; a socket file alone may be left by a daemon that was killed).
inline bool wait_daemon_ready(Proc& d, const std::string& endpoint, int timeout_ms = 20000) {
  return eventually(
             [&] {
               return !d.running() ||
                      (std::filesystem::exists(ipc_file(endpoint)) && d.log().find(" info: ready") != std::string::npos);
             },
             timeout_ms) &&
         d.running();
}

// The daemon's stats (ringllama-loaderd --stats); a null json when it does not answer.
inline nlohmann::json daemon_stats(const std::string& endpoint) {
  RunResult r = run_bin("ringllama-loaderd", {"--stats", "--control", endpoint}, 10);
  if (r.status != 0) return nullptr;
  return nlohmann::json::parse(r.out, nullptr, false);
}

}  // namespace ringllama::test
