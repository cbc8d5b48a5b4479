// Stable counting sort of places by expert id, in two kernels:
//   1. each block counts the ids of its consecutive run of places ([blocks, experts]);
//   2. each block finds where its pairs of each expert start (all pairs of lower experts,
//      plus this expert's pairs in earlier blocks; block 0 also writes where each expert's
//      pairs end, the grouped GEMM's offsets), then walks its run in order, 256 places
//      at a time: a place's position among equal ids of its warp comes from __match_any_sync,
//      the earlier warps' counts from shared memory. Places keep their order within an
//      expert, as torch's stable argsort keeps it (deepcomm/expert_order.py, the oracle).
#include "kernels/expert_order.h"

#include <string>

#include "runtime/error.h"

namespace deepcomm {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kPlacesPerBlock = 2048;
constexpr int kMaxBlocks = 256;

__device__ __forceinline__ int64_t run_begin(int64_t num_places, int block, int blocks) {
  const int64_t per_block = (num_places + blocks - 1) / blocks;
  const int64_t begin = per_block * block;
  return begin < num_places ? begin : num_places;
}

__global__ void __launch_bounds__(kThreads) count_kernel(ExpertOrderArgs args) {
  extern __shared__ int32_t counts[];
  for (int e = threadIdx.x; e < args.num_experts; e += kThreads) counts[e] = 0;
  __syncthreads();
  const int64_t begin = run_begin(args.num_places, blockIdx.x, gridDim.x);
  const int64_t end = run_begin(args.num_places, blockIdx.x + 1, gridDim.x);
  for (int64_t p = begin + threadIdx.x; p < end; p += kThreads) {
    const int64_t id = args.local_idx[p];
    if (id >= 0 && id < args.num_experts) atomicAdd(&counts[id], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < args.num_experts; e += kThreads)
    args.block_counts[static_cast<int64_t>(blockIdx.x) * args.num_experts + e] = counts[e];
}

__global__ void __launch_bounds__(kThreads) scatter_kernel(ExpertOrderArgs args) {
  // next[e]: where this block's next pair of expert e goes; warp_counts[w][e]: pairs of e in warp w's
  // 32 places of the current round.
  extern __shared__ int32_t shared[];
  int32_t* next = shared;
  int32_t* warp_counts = shared + args.num_experts;
  const int experts = args.num_experts;
  for (int e = threadIdx.x; e < experts; e += kThreads) {
    int32_t before = 0, total = 0;
    for (int b = 0; b < static_cast<int>(gridDim.x); ++b) {
      const int32_t n = args.block_counts[static_cast<int64_t>(b) * experts + e];
      total += n;
      if (b < static_cast<int>(blockIdx.x)) before += n;
    }
    next[e] = total;  // the exclusive scan below turns totals into expert starts
    warp_counts[e] = before;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // at most kMaxSortedExperts: one thread is quick enough next to the launches saved
    int32_t start = 0;
    for (int e = 0; e < experts; ++e) {
      const int32_t total = next[e];
      next[e] = start + warp_counts[e];
      start += total;
      if (blockIdx.x == 0 && args.ends != nullptr) args.ends[e] = start;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kWarps * experts; i += kThreads) warp_counts[i] = 0;
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = run_begin(args.num_places, blockIdx.x, gridDim.x);
  const int64_t end = run_begin(args.num_places, blockIdx.x + 1, gridDim.x);
  for (int64_t round = begin; round < end; round += kThreads) {
    const int64_t place = round + threadIdx.x;
    // Ids outside [0, experts) are other ranks' (-1), or not an expert here: neither is sorted.
    const int64_t raw = place < end ? args.local_idx[place] : -1;
    const int id = raw >= 0 && raw < experts ? static_cast<int>(raw) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, id);
    const int rank_in_warp = __popc(same & lanes_below);
    if (id >= 0 && rank_in_warp == 0) warp_counts[warp * experts + id] = __popc(same);
    __syncthreads();
    if (id >= 0) {
      int32_t position = next[id] + rank_in_warp;
      for (int w = 0; w < warp; ++w) position += warp_counts[w * experts + id];
      if (position < args.num_pairs) {  // a caller's wrong P gives a wrong order, never a stray write
        args.order[position] = place;
        args.rows[position] = place / args.num_topk;
      }
    }
    __syncthreads();
    // Each warp's leader of an id moves that id on by its warp's count (and clears the count).
    if (id >= 0 && rank_in_warp == 0) {
      atomicAdd(&next[id], __popc(same));
      warp_counts[warp * experts + id] = 0;
    }
    __syncthreads();
  }
}

}  // namespace

int expert_order_blocks(int64_t num_places) {
  const int64_t blocks = (num_places + kPlacesPerBlock - 1) / kPlacesPerBlock;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

void launch_expert_order(const ExpertOrderArgs& args, cudaStream_t stream) {
  if (args.num_places == 0) return;
  DC_CHECK_ARG(args.num_experts > 0 && args.num_experts <= kMaxSortedExperts,
               "num_experts: must lie in [1, " + std::to_string(kMaxSortedExperts) + "]");
  DC_CHECK_ARG(args.num_topk > 0, "num_topk: must be > 0");
  DC_CHECK_ARG(args.num_places < (int64_t{1} << 31), "num_places: must lie in [0, 2^31)");
  DC_CHECK_ARG(args.num_pairs >= 0 && args.num_pairs <= args.num_places, "num_pairs: must lie in [0, num_places]");
  const int blocks = expert_order_blocks(args.num_places);
  count_kernel<<<blocks, kThreads, args.num_experts * sizeof(int32_t), stream>>>(args);
  DC_CUDA_CHECK(cudaGetLastError());
  scatter_kernel<<<blocks, kThreads, (1 + kWarps) * args.num_experts * sizeof(int32_t), stream>>>(args);
  DC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepcomm
