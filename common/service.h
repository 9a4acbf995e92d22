// What a process under systemd needs (Type=notify): READY/STOPPING/STATUS and watchdog pings
// through sd_notify (nothing where libsystemd is absent or no NOTIFY_SOCKET is set), and SIGTERM /
// SIGINT as a readable fd.
#pragma once

#include <cstdint>

namespace ringllama {

// sd_notify(0, state), e.g. "READY=1\nSTATUS=serving".
void service_notify(const char* state);
// The watchdog period systemd asks for (WatchdogSec), in microseconds; 0 = none.
uint64_t service_watchdog_usec();
// SIGTERM and SIGINT as a non-blocking signalfd, blocked in the calling thread first: call it
// before any other thread starts, so that every thread inherits the mask and none takes the
// signal instead.
int stop_signal_fd();

}  // namespace ringllama
