#include "runtime/device.h"

#include <cuda_runtime_api.h>

#include "runtime/error.h"

namespace deepcomm {

int device_count() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  DC_CUDA_CHECK(status);
  return count;
}

DeviceInfo device_info(int device) {
  const int count = device_count();
  DC_CHECK_ARG(device >= 0 && device < count,
               "device: index " + std::to_string(device) + " out of range, " + std::to_string(count) + " visible");
  cudaDeviceProp prop{};
  DC_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceInfo info;
  info.index = device;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.num_sms = prop.multiProcessorCount;
  info.total_memory_bytes = prop.totalGlobalMem;
  info.max_shared_memory_per_block_optin = static_cast<int>(prop.sharedMemPerBlockOptin);
  info.can_map_host_memory = prop.canMapHostMemory != 0;
  return info;
}

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;
}

int runtime_version() {
  int version = 0;
  DC_CUDA_CHECK(cudaRuntimeGetVersion(&version));
  return version;
}

}  // namespace deepcomm
