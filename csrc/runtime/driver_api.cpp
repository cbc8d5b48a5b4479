#include "runtime/driver_api.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <string>

#include "runtime/error.h"

namespace deepcomm::driver {

namespace {

using MemGetAddressRangeFn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
using StreamWriteValue32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

template <typename Fn>
Fn resolve(const char* symbol, int cuda_version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  DC_CUDA_CHECK(cudaGetDriverEntryPointByVersion(symbol, &fn, cuda_version, cudaEnableDefault, &found));
  if (found != cudaDriverEntryPointSuccess || fn == nullptr) {
    throw CudaError(std::string("driver entry point ") + symbol + " not found (driver too old?)");
  }
  return reinterpret_cast<Fn>(fn);
}

}  // namespace

void allocation_range(uintptr_t ptr, uintptr_t* base, size_t* size) {
  static std::once_flag once;
  static MemGetAddressRangeFn mem_get_address_range = nullptr;
  std::call_once(once, [] { mem_get_address_range = resolve<MemGetAddressRangeFn>("cuMemGetAddressRange", 3020); });
  CUdeviceptr base_ptr = 0;
  size_t bytes = 0;
  CUresult status = mem_get_address_range(&base_ptr, &bytes, static_cast<CUdeviceptr>(ptr));
  if (status != CUDA_SUCCESS) {
    throw CudaError("cuMemGetAddressRange failed with CUresult " + std::to_string(static_cast<int>(status)) +
                    ": pointer is not device memory");
  }
  *base = static_cast<uintptr_t>(base_ptr);
  *size = bytes;
}

namespace {

StreamWriteValue32Fn stream_write_value32_fn() {
  static std::once_flag once;
  static StreamWriteValue32Fn write_value = nullptr;
  // Version 12000: the _v2 entry point, which CUDA 12 made the default (stream memory operations on by default).
  // A failed resolve throws and leaves the flag unset, so a later call tries (and throws) again.
  std::call_once(once, [] { write_value = resolve<StreamWriteValue32Fn>("cuStreamWriteValue32", 12000); });
  return write_value;
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
