#include "kernels/check.h"

#include "common/errors.h"

namespace ringllama {

namespace {
int current_device() {
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
  return dev;
}
}  // namespace

void throw_cuda_error(cudaError_t err, const char* stmt, const char* file, int line) {
  throw Error(fmt::format("CUDA error {} ({}) in `{}` at {}:{} (device {})", cudaGetErrorName(err),
                          cudaGetErrorString(err), stmt, file, line, current_device()));
}

void throw_cublas_error(cublasStatus_t st, const char* stmt, const char* file, int line) {
  throw Error(fmt::format("cuBLAS error {} ({}) in `{}` at {}:{} (device {})", cublasGetStatusName(st),
                          cublasGetStatusString(st), stmt, file, line, current_device()));
}

void throw_arg_error(const char* op, const std::string& what) { throw Error(std::string(op) + ": " + what); }

}  // namespace ringllama
