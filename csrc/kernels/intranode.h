// Intranode dispatch/combine among the ranks of one node (NVLink, or ranks
// sharing one GPU under MPS): launch-side declarations.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/intranode_layout.h"

namespace deepcomm::intranode {

// What every kernel needs to reach the node's buffers and report errors.
struct Context {
  uint8_t* regions[kMaxRanks];  // each rank's registered buffer as mapped here (own included)
  int rank;
  int num_ranks;
  int num_slots;
  int64_t slot_bytes;
  HostMailbox* mailbox;         // pinned, mapped
  int64_t timeout_ns;           // bounded wait on any peer
};

// With reused_routing (a dispatch given the handle of an earlier one) notify publishes no counts:
// it only meets every peer, so that nobody writes into a slot its owner may still read, and checks
// that every rank reuses the routing of the same call. The count pointers and outputs are then unused.
struct NotifyArgs {
  uint64_t call;                      // 1, 2, ... the same on every rank
  uint64_t reused_routing;            // the call whose routing (the handle's) this dispatch reuses; 0: none
  // What every rank's rows must share for the slots to be read as written (hidden size, K, row format,
  // experts, blocks), packed by the host (deepcomm/kernel_common.py call_shape); compared, never decoded.
  uint64_t call_shape;
  const int32_t* tokens_per_rank;     // [num_ranks] from the layout
  const int32_t* tokens_per_expert;   // [num_experts] from the layout
  const int32_t* num_invalid;         // [1] invalid expert ids in this rank's topk_idx (layout kernel)
  int num_experts;
  int32_t* send_base;                 // out [num_ranks]: first row of this rank's tokens in each rank's slot
  int32_t* recv_totals;               // out [num_ranks]: rows each rank receives
  int32_t* recv_tokens_per_expert;    // out [num_experts / num_ranks]
  int32_t* abort_dispatch;            // out [1]: kAbortInvalidIds or kAbortFailedMeeting (nobody dispatches)
};

enum class Payload : int { kBf16 = 0, kFp8 = 1, kBf16ToFp8 = 2, kBf16ToFp8Pow2 = 3 };

struct DispatchArgs {
  uint64_t call;
  int slot;
  Payload payload;
  const void* x;                 // [T, H] bf16 or fp8
  const float* x_scales;         // [T, H/128] for kFp8, else null
  int hidden;
  const int64_t* topk_idx;       // [T, K]
  const float* topk_weights;     // [T, K]
  int num_tokens;
  int num_topk;
  int experts_per_rank;
  const bool* is_token_in_rank;  // [T, num_ranks]
  const int32_t* send_pos;       // [T, num_ranks]: token's row among this rank's rows for each rank
  const int32_t* send_base;      // [num_ranks] from notify
  const int32_t* recv_totals;    // [num_ranks] from notify
  const int32_t* abort_dispatch; // [1] from notify
  int64_t expected_recv;         // rows the caller said this rank receives (host skipped its wait), or -1
  uint64_t arrivals_expected;    // cumulative dispatch blocks expected from each peer after this call
  int num_blocks;
};

// A combine either pulls every token's rows from the ranks that hold them (SMs load them over NVLink), or
// has them pushed: every rank's copy engines write its rows for each owner into the owner's landing area,
// chunk by chunk, each chunk signalled by a stream memory operation (push_rows), and the owner's SMs add up
// each token once its chunks have landed. Every rank must do the same (combine_ready checks).
struct Landing {
  int64_t offset;                     // the landing area's byte offset in every rank's region
  int64_t first_row[kMaxRanks];       // where each peer's rows for this rank start in it
  int32_t chunk_rows[kMaxRanks];      // rows per pushed chunk from each peer (>= 1; deepcomm/landing.py)
  uint32_t chunks_before[kMaxRanks];  // chunks_landed[peer] before this call
};

struct CombineArgs {
  uint64_t call;
  int64_t source_offset;         // pull: byte offset of this rank's [R, H] bf16 rows in its own region
  const uint8_t* own_rows;       // push: this rank's [R, H] bf16 rows (anywhere on this GPU); null: pull
  Landing landing;               // push
  void* y;                       // out [T, H] bf16
  int hidden;
  int num_tokens;
  const bool* is_token_in_rank;  // from the dispatch
  const int32_t* send_pos;
  const int32_t* send_base;
  uint64_t done_expected;        // cumulative combine blocks expected from each peer after this call
  int num_blocks;
};

// What a pushing rank sends each owner o: its rows for o (rows [first_row[o], first_row[o] + num_rows[o])
// of its CombineArgs::own_rows, in the order o's tokens came) to landing row landing_row[o] of o's
// landing area (at CombineArgs::landing.offset in every region).
struct PushArgs {
  int64_t first_row[kMaxRanks];
  int64_t num_rows[kMaxRanks];
  int64_t landing_row[kMaxRanks];
  int32_t chunk_rows[kMaxRanks];       // as the owner's Landing::chunk_rows[this rank]
  uint32_t chunks_before[kMaxRanks];   // o's chunks_landed[this rank] before this call
};

void launch_notify(const Context& ctx, const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch(const Context& ctx, const DispatchArgs& args, cudaStream_t stream);
// Pull (args.own_rows null): the meeting, then the sums.
void launch_combine(const Context& ctx, const CombineArgs& args, cudaStream_t stream);
// Push (intranode_push.cpp): the meeting on `stream`; then, on copy_streams[o] for each owner o, this
// rank's rows for o; then the sums on `stream`, which afterwards also waits for the copies.
void launch_pushed_combine(const Context& ctx, const CombineArgs& args, const PushArgs& push, cudaStream_t stream,
                           const cudaStream_t (&copy_streams)[kMaxRanks]);
// The halves of a combine (kernels/intranode.cu): the meeting (combine_ready) and the sums.
void launch_combine_ready(const Context& ctx, const CombineArgs& args, cudaStream_t stream);
void launch_combine_sums(const Context& ctx, const CombineArgs& args, cudaStream_t stream);

}  // namespace deepcomm::intranode
