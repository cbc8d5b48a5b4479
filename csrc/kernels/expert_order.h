// The MoE layer's first step on a rank: the received (row, k) pairs in the
// order the grouped GEMM runs them — by local expert, then by place — as a
// stable counting sort in two launches where torch's argsort takes about
// seven small ones (cast, radix passes, divide), which on a GPU shared with
// communication kernels run with gaps between them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deepcomm {

constexpr int kMaxSortedExperts = 1024;  // local experts a rank may hold for this sort

struct ExpertOrderArgs {
  const int64_t* local_idx;  // [num_places] = [R, K] flattened: a local expert id, or -1 (another rank's)
  int64_t num_places;
  int num_topk;              // K: a place p is row p / K
  int num_experts;           // local experts, at most kMaxSortedExperts
  int32_t* block_counts;     // [num_blocks, num_experts] scratch
  int64_t num_pairs;         // P, the places with an id in [0, num_experts): what order and rows hold
  int64_t* order;            // [P]: the places of the pairs (ids >= 0), by expert, then by place
  int64_t* rows;             // [P]: order / K
  int32_t* ends;             // [num_experts] or null: where each expert's pairs end in order (the
                             // grouped GEMM's offsets), a running sum of the per-expert counts
};

// The number of blocks (and rows of block_counts) the launch uses for num_places places.
int expert_order_blocks(int64_t num_places);

void launch_expert_order(const ExpertOrderArgs& args, cudaStream_t stream);

}  // namespace deepcomm
