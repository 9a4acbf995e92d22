#include "kernels/device_info.h"

#include <cuda_runtime_api.h>

#include "common/errors.h"
#include "kernels/check.h"

namespace ringllama {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so that later calls do not report it
    return 0;
  }
  return n;
}

int cuda_sm_count(int device) {
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

void* device_alloc(size_t bytes, const char* what) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    int dev = -1;
    cudaGetDevice(&dev);
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    throw Error(fmt::format("cannot allocate {:.1f} MiB of GPU memory for {} on device {} ({} free of {} MiB): {}",
                            bytes / 1048576.0, what, dev, free_b >> 20, total_b >> 20, cudaGetErrorString(err)));
  }
  return p;
}

void device_free(void* p) noexcept {
  if (p) cudaFree(p);  // errors at teardown cannot be acted on; the context may already be gone
}

}  // namespace ringllama
