// Kernel launches that may start early: Launch::kEarly is a programmatic dependent launch (sm_90 on), whose
// blocks may be placed on free SMs while the kernel before it on the stream still runs, so that the launch's
// latency (the grid's end, the next grid's start, its blocks' placing: 3.8-4.3 us between the low-latency
// dispatch and combine on two H200s) overlaps that kernel.
//
// Rules for the kernels launched this way and the kernels before them:
// - the early kernel calls ptx::wait_for_previous_kernel() before it touches global memory (it returns once
//   the kernel before has ended and its writes are visible; a plain launch passes it at once);
// - a kernel lets the one behind it be placed (ptx::allow_next_kernel()) only once it waits on nothing that
//   needs an SM: past its last wait on a peer. A low-latency block fills an SM, and the ranks' blocks together
//   may fill the GPU; blocks placed early that hold SMs a peer's blocks still need would leave that peer, and
//   this rank waiting on it, to time out. Without the call they are placed when its blocks end.
// - the device code must have the waits (sm_90 on): the caller checks that before it asks for kEarly.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "runtime/error.h"

namespace deepcomm {

enum class Launch { kPlain, kEarly };

template <typename... Params, typename... Args>
void launch_kernel(Launch launch, void (*kernel)(Params...), int blocks, int threads, size_t shared_bytes,
                   cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = launch == Launch::kEarly ? 1 : 0;
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();  // not left pending for a later check to blame on another call
    DC_CUDA_CHECK(status);
  }
}

}  // namespace deepcomm
