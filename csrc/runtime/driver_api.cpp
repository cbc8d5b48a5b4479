#include "runtime/driver_api.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <string>

#include "runtime/error.h"

namespace deepcomm::driver {

namespace {

using MemGetAddressRangeFn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
using StreamWriteValue32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

// An entry point looked up once per process. A failed lookup is kept and reported at every use: nothing
// throws inside the one-time initialisation (libstdc++'s call_once may hang after a throw, GCC PR 66146).
struct EntryPoint {
  void* fn = nullptr;
  std::string error;
};

EntryPoint look_up(const char* symbol, int cuda_version) {
  EntryPoint entry;
  cudaDriverEntryPointQueryResult found{};
  const cudaError_t status =
      cudaGetDriverEntryPointByVersion(symbol, &entry.fn, cuda_version, cudaEnableDefault, &found);
  if (status != cudaSuccess || found != cudaDriverEntryPointSuccess || entry.fn == nullptr) {
    entry.fn = nullptr;
    entry.error = std::string("driver entry point ") + symbol + " not found (driver too old?)";
    if (status != cudaSuccess) entry.error += std::string(": ") + cudaGetErrorString(status);
  }
  return entry;
}

template <typename Fn>
Fn usable(const EntryPoint& entry) {
  if (entry.fn == nullptr) throw CudaError(entry.error);
  return reinterpret_cast<Fn>(entry.fn);
}

}  // namespace

void allocation_range(uintptr_t ptr, uintptr_t* base, size_t* size) {
  static const EntryPoint entry = look_up("cuMemGetAddressRange", 3020);
  CUdeviceptr base_ptr = 0;
  size_t bytes = 0;
  CUresult status = usable<MemGetAddressRangeFn>(entry)(&base_ptr, &bytes, static_cast<CUdeviceptr>(ptr));
  if (status != CUDA_SUCCESS) {
    throw CudaError("cuMemGetAddressRange failed with CUresult " + std::to_string(static_cast<int>(status)) +
                    ": pointer is not device memory");
  }
  *base = static_cast<uintptr_t>(base_ptr);
  *size = bytes;
}

namespace {

StreamWriteValue32Fn stream_write_value32_fn() {
  // Version 12000: the _v2 entry point, which CUDA 12 made the default (stream memory operations on by default).
  static const EntryPoint entry = look_up("cuStreamWriteValue32", 12000);
  return usable<StreamWriteValue32Fn>(entry);
}

}  // namespace

void require_stream_write_value32() { stream_write_value32_fn(); }

void stream_write_value32(uintptr_t stream, uintptr_t address, uint32_t value) {
  const CUresult status = stream_write_value32_fn()(reinterpret_cast<CUstream>(stream), static_cast<CUdeviceptr>(address), value,
                                      CU_STREAM_WRITE_VALUE_DEFAULT);
  if (status != CUDA_SUCCESS) {
    throw CudaError("cuStreamWriteValue32 failed with CUresult " + std::to_string(static_cast<int>(status)));
  }
}

}  // namespace deepcomm::driver
