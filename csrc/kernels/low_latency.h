// Low-latency dispatch/combine (decode): fixed capacity per (expert, source rank),
// no host wait, every flag an epoch kept on the device. Launch-side declarations.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/intranode.h"  // Payload
#include "runtime/low_latency_layout.h"

namespace deepcomm::low_latency {

using intranode::Payload;

struct Context {
  uint8_t* regions[kMaxRanks];  // each rank's registered buffer as mapped here (own included)
  int rank;
  int num_ranks;
  int num_experts;
  int max_tokens;   // per rank and call: the capacity of each (expert, source rank)
  int hidden;
  HostMailbox* mailbox;  // pinned, mapped
  int64_t timeout_ns;
};

struct DispatchArgs {
  int area;
  Payload payload;
  const void* x;            // [T, H] bf16 or fp8
  const float* x_scales;    // [T, H/128] for kFp8, else null
  const int64_t* topk_idx;  // [T, K], -1 = none
  int num_tokens;
  int num_topk;
  int32_t* pair_rows;       // out [T, K]: expert * rows_per_expert + row of the pair, -1 for none
  int32_t* recv_counts;     // out [local experts]: rows each local expert receives
  int num_blocks;
};

struct CombineArgs {
  int area;
  const int32_t* pair_rows;     // [T, K] from the dispatch
  const float* topk_weights;    // [T, K]
  int num_tokens;
  int num_topk;
  void* y;                      // out [T, H] bf16
  int num_blocks;
};

// Dynamic shared memory of the send kernel (routing bit masks and row bases), for config checks.
int64_t dispatch_shared_bytes(int num_experts, int max_tokens);

// Send: exchange per-expert counts with every rank, then write every (token, expert) row to its
// packed place in the expert owner's receive area; ends without waiting for incoming rows.
void launch_dispatch_send(const Context& ctx, const DispatchArgs& args, cudaStream_t stream);
// Receive: wait until every rank's rows for this rank are written, then copy the rows peers staged
// here to their places (num_tokens: this rank's, to size the work; payload: bf16 or fp8 rows).
void launch_dispatch_recv(const Context& ctx, int area, Payload payload, int num_tokens, int num_blocks,
                          cudaStream_t stream);
// Send: tell every rank that this rank's expert outputs of `area` are in place (one thread, no wait).
void launch_combine_send(const Context& ctx, int area, cudaStream_t stream);
// Copy expert outputs from `outputs` ([local experts, rows per expert, H] bf16) into this rank's
// receive area, only each expert's received rows (recv_counts from the dispatch).
void launch_stage_outputs(const Context& ctx, int area, const void* outputs, const int32_t* recv_counts,
                          int num_blocks, cudaStream_t stream);
// Receive: wait for every rank's outputs, then pull each token's rows and reduce them, weighted.
void launch_combine_recv(const Context& ctx, const CombineArgs& args, cudaStream_t stream);

}  // namespace deepcomm::low_latency
