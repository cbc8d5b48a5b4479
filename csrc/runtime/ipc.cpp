#include "runtime/ipc.h"

#include <cuda_runtime_api.h>

#include <cstring>

#include "runtime/driver_api.h"
#include "runtime/error.h"

namespace deepcomm {

IpcExport ipc_export(uintptr_t ptr) {
  DC_CHECK_ARG(ptr != 0, "ptr: null pointer cannot be exported");
  uintptr_t base = 0;
  size_t bytes = 0;
  driver::allocation_range(ptr, &base, &bytes);
  cudaIpcMemHandle_t handle;
  DC_CUDA_CHECK(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base)));
  return IpcExport{std::string(reinterpret_cast<const char*>(&handle), sizeof(handle)), ptr - base, bytes};
}

uintptr_t ipc_open(const std::string& handle, size_t offset) {
  DC_CHECK_ARG(handle.size() == sizeof(cudaIpcMemHandle_t),
               "handle: expected " + std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes, got " +
                   std::to_string(handle.size()));
  cudaIpcMemHandle_t raw;
  std::memcpy(&raw, handle.data(), sizeof(raw));
  void* base = nullptr;
  DC_CUDA_CHECK(cudaIpcOpenMemHandle(&base, raw, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<uintptr_t>(base) + offset;
}

void ipc_close(uintptr_t ptr, size_t offset) {
  DC_CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr - offset)));
}

}  // namespace deepcomm
