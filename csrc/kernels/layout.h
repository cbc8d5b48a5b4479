// Dispatch layout: from topk_idx, how many tokens go to each rank, each node
// and each expert, and which ranks each token goes to. Notify and dispatch
// build on these counts; deepcomm/layout.py has the same computation in torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace deepcomm {

struct DispatchLayoutArgs {
  const int64_t* topk_idx;  // [num_tokens, num_topk], -1 = no expert
  int num_tokens;
  int num_topk;
  int num_experts;          // divisible by num_ranks; expert e lives on rank e / (num_experts / num_ranks)
  int num_ranks;
  int ranks_per_node;       // divides num_ranks; rank r lives on node r / ranks_per_node
  int32_t* num_tokens_per_rank;    // [num_ranks]: tokens with >= 1 expert on the rank
  int32_t* num_tokens_per_node;    // [num_ranks / ranks_per_node]: tokens with >= 1 expert on the node
  int32_t* num_tokens_per_expert;  // [num_experts]: (token, k) entries naming the expert
  bool* is_token_in_rank;          // [num_tokens, num_ranks]
  int32_t* num_invalid;            // optional [1]: entries outside [-1, num_experts), counted, not routed
  int32_t* send_pos;               // optional [num_tokens, num_ranks]: the token's index among this rank's
                                   // tokens for that rank (exclusive prefix count down each column)
};

// Shared memory the kernel needs for its block-local counters.
size_t dispatch_layout_shared_bytes(int num_experts, int num_ranks, int ranks_per_node);

// Zeroes the count outputs and launches on `stream`; fully overwrites
// is_token_in_rank. Asynchronous.
void launch_dispatch_layout(const DispatchLayoutArgs& args, int num_blocks, cudaStream_t stream);

}  // namespace deepcomm
