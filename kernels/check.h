// Checks that cannot vanish: every CUDA and cuBLAS call, every launch, every launcher argument.
// The throwing functions live in check.cpp so that .cu files need not see fmt.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <string>

namespace ringllama {

// Throws ringllama::Error naming the failed statement, its file and line and the current device.
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* stmt, const char* file, int line);
[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* stmt, const char* file, int line);
// Throws ringllama::Error: "<op>: <what>". For launcher arguments that break a kernel's contract.
[[noreturn]] void throw_arg_error(const char* op, const std::string& what);

}  // namespace ringllama

#define CUDA_CHECK(stmt)                                                        \
  do {                                                                          \
    cudaError_t rl_err_ = (stmt);                                               \
    if (rl_err_ != cudaSuccess)                                                 \
      ::ringllama::throw_cuda_error(rl_err_, #stmt, __FILE__, __LINE__);        \
  } while (0)

#define CUBLAS_CHECK(stmt)                                                      \
  do {                                                                          \
    cublasStatus_t rl_st_ = (stmt);                                             \
    if (rl_st_ != CUBLAS_STATUS_SUCCESS)                                        \
      ::ringllama::throw_cublas_error(rl_st_, #stmt, __FILE__, __LINE__);       \
  } while (0)

// After every kernel launch: a bad configuration shows up here, not at the next unrelated call.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

// Launcher argument check; `what` is only built when the check fails.
#define KERNEL_REQUIRE(cond, op, what)                                          \
  do {                                                                          \
    if (!(cond)) ::ringllama::throw_arg_error(op, what);                        \
  } while (0)
