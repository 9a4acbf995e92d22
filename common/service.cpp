#include "common/service.h"

#include <signal.h>
#include <sys/signalfd.h>

#include <cerrno>
#ifdef RINGLLAMA_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "common/errors.h"

namespace ringllama {

void service_notify(const char* state) {
#ifdef RINGLLAMA_HAVE_SYSTEMD
  ::sd_notify(0, state);
#else
  (void)state;
#endif
}

uint64_t service_watchdog_usec() {
#ifdef RINGLLAMA_HAVE_SYSTEMD
  uint64_t usec = 0;
  if (::sd_watchdog_enabled(0, &usec) > 0) return usec;
#endif
  return 0;
}

int stop_signal_fd() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  if (::pthread_sigmask(SIG_BLOCK, &set, nullptr) != 0) fail("cannot block SIGTERM/SIGINT");
  const int fd = ::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd < 0) fail("signalfd: {}", errno_text(errno));
  return fd;
}

}  // namespace ringllama
