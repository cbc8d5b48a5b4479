// Grid-stride 16-byte copy with several loads in flight per thread, the same
// access pattern the dispatch kernel uses, so the comparison measures the
// algorithm and not the copy loop. And the same bytes moved by bulk (TMA)
// copies, a piece per warp at a time through shared memory, to see whether
// they move more over NVLink on the same SMs than loads and stores do
// (tools/peer_copy_rates.py).
#include "kernels/common/bulk.cuh"
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

constexpr int kBulkWarps = kCopyThreads / 32;
constexpr int kBulkStagingBytes = kBulkWarps * bulk::kPieceBytes;

// Warp w of block b moves pieces b * kBulkWarps + w, then every gridDim.x * kBulkWarps-th after it.
__global__ void __launch_bounds__(kCopyThreads) bulk_copy_kernel(uint8_t* dst, const uint8_t* src, int64_t bytes) {
  extern __shared__ __align__(128) uint8_t staging[];  // kBulkWarps pieces of bulk::kPieceBytes
  __shared__ uint64_t barriers[kBulkWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  bulk::WarpStage stage;
  stage.init(staging + warp * bulk::kPieceBytes, &barriers[warp], lane);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBulkWarps * bulk::kPieceBytes;
  for (int64_t offset = (static_cast<int64_t>(blockIdx.x) * kBulkWarps + warp) * bulk::kPieceBytes; offset < bytes;
       offset += stride) {
    const int64_t piece = bytes - offset < bulk::kPieceBytes ? bytes - offset : bulk::kPieceBytes;
    stage.move(src + offset, piece, lane == 0 ? dst + offset : nullptr, lane);
  }
  if (lane == 0) bulk::WarpStage::complete_stores();  // the kernel's end is the copy's end
}

}  // namespace

void launch_bulk_copy(void* dst, const void* src, int64_t bytes, int num_blocks, cudaStream_t stream) {
  DC_CHECK_ARG(bytes % 16 == 0, "bytes: must be a multiple of 16");
  DC_CHECK_ARG(num_blocks > 0, "num_blocks: must be > 0");
  DC_CHECK_ARG(reinterpret_cast<uintptr_t>(dst) % 16 == 0, "dst: bulk copies need 16-byte aligned addresses");
  DC_CHECK_ARG(reinterpret_cast<uintptr_t>(src) % 16 == 0, "src: bulk copies need 16-byte aligned addresses");
  if (bytes == 0) return;
  // Below sm_90 the kernel moves the bytes through registers (bulk.cuh) and needs no staging, which such a
  // GPU may not have room for.
  int device = 0, major = 0;
  DC_CUDA_CHECK(cudaGetDevice(&device));
  DC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const int staging = major >= 9 ? kBulkStagingBytes : 0;
  if (staging > 0) bulk::allow_staging<bulk_copy_kernel>(staging);
  bulk_copy_kernel<<<num_blocks, kCopyThreads, staging, stream>>>(static_cast<uint8_t*>(dst),
                                                                  static_cast<const uint8_t*>(src), bytes);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_copy(void* dst, const void* src, int64_t bytes, int num_blocks, cudaStream_t stream) {
  DC_CHECK_ARG(bytes % 16 == 0, "bytes: must be a multiple of 16");
  DC_CHECK_ARG(num_blocks > 0, "num_blocks: must be > 0");
  if (bytes == 0) return;
  copy_kernel<<<num_blocks, kCopyThreads, 0, stream>>>(static_cast<int4*>(dst), static_cast<const int4*>(src),
                                                       bytes / 16);
  DC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepcomm
