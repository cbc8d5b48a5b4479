// A plain device-to-device copy on a fixed number of blocks: the measured
// floor that dispatch and combine are compared with in the benchmark.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deepcomm {

void launch_copy(void* dst, const void* src, int64_t bytes, int num_blocks, cudaStream_t stream);

// The same bytes by bulk (TMA) copies through shared memory: an 8 KiB piece per warp at a time.
void launch_bulk_copy(void* dst, const void* src, int64_t bytes, int num_blocks, cudaStream_t stream);

}  // namespace deepcomm
