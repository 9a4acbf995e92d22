// Skips the current test where there is no CUDA GPU, with "no CUDA GPU: skipping <what>".
#pragma once

#include <gtest/gtest.h>

#include "kernels/device_info.h"

#define RL_SKIP_WITHOUT_GPU(what)                                                                   \
  do {                                                                                              \
    if (::ringllama::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU: skipping " << (what); \
  } while (0)
