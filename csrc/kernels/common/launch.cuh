// Kernel launches that may start early: with `early`, a programmatic dependent launch (sm_90 on), whose
// blocks may be placed on free SMs while the kernel before it on the stream still runs, so that the launch's
// latency (the grid's end, the next grid's start, its blocks' placing: about 4 us between the low-latency
// dispatch and combine on two H200s) overlaps that kernel. Every kernel launched this way calls
// ptx::wait_for_previous_kernel() before it touches memory; the kernel before it decides, with
// ptx::allow_next_kernel(), how early (by default only when its blocks end).
#pragma once

#include <cuda_runtime.h>

#include "runtime/error.h"

namespace deepcomm {

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int blocks, int threads, size_t shared_bytes, cudaStream_t stream,
                   bool early, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = early ? 1 : 0;
  DC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace deepcomm
