// CUDA IPC: share device memory between the processes of one host (and,
// under MPS, between ranks on one GPU). A pointer inside a larger allocation
// (e.g. from torch's caching allocator) is exported as the allocation's handle
// plus the offset of the pointer within it; opening applies the offset.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

namespace deepcomm {

struct IpcExport {
  std::string handle;  // the raw cudaIpcMemHandle_t bytes
  size_t offset;       // ptr - allocation base
  size_t allocation_bytes;
};

constexpr size_t kIpcHandleBytes = sizeof(cudaIpcMemHandle_t);

IpcExport ipc_export(uintptr_t ptr);
// Returns the peer pointer that corresponds to the exported one (base + offset).
uintptr_t ipc_open(const std::string& handle, size_t offset);
// Takes the pointer ipc_open returned.
void ipc_close(uintptr_t ptr, size_t offset);

}  // namespace deepcomm
