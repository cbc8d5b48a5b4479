// The MoE layer's last step on a rank: each received row becomes the weighted
// sum of its local experts' outputs, in k order, in float32, rounded to bf16
// once — written straight into the receive slot, where combine reads it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deepcomm {

struct PairSumArgs {
  void* out;                   // [num_rows, hidden] bf16 (rows hidden apart)
  const void* values;          // [num_pairs, hidden] bf16: the experts' outputs, one row per (row, k) pair
  const int64_t* pair_of;      // [num_rows, num_topk]: the pair holding (row, k), or -1 where it has none
  const float* weights;        // [num_rows, num_topk]
  int64_t num_rows;
  int num_topk;
  int64_t hidden;              // a multiple of 8 (16-byte units)
};

void launch_pair_sum(const PairSumArgs& args, cudaStream_t stream);

}  // namespace deepcomm
