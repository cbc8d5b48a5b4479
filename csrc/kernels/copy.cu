// Grid-stride 16-byte copy with several loads in flight per thread, the same
// access pattern the dispatch kernel uses, so the comparison measures the
// algorithm and not the copy loop.
#include "kernels/common/ptx.cuh"
#include "kernels/copy.h"
#include "runtime/error.h"

namespace deepcomm {

namespace {

constexpr int kCopyThreads = 512;  // as the dispatch kernel
constexpr int kCopyUnroll = 4;

__global__ void __launch_bounds__(kCopyThreads) copy_kernel(int4* dst, const int4* src, int64_t units) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; base < units;
       base += stride * kCopyUnroll) {
    int4 values[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * stride < units) values[u] = ptx::load_nc(src + base + u * stride);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * stride < units) dst[base + u * stride] = values[u];
  }
}

}  // namespace

void launch_copy(void* dst, const void* src, int64_t bytes, int num_blocks, cudaStream_t stream) {
  DC_CHECK_ARG(bytes % 16 == 0, "bytes: must be a multiple of 16");
  DC_CHECK_ARG(num_blocks > 0, "num_blocks: must be > 0");
  if (bytes == 0) return;
  copy_kernel<<<num_blocks, kCopyThreads, 0, stream>>>(static_cast<int4*>(dst), static_cast<const int4*>(src),
                                                       bytes / 16);
  DC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepcomm
