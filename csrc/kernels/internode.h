// Internode (hierarchical) dispatch/combine: launch-side declarations. Host
// code only; the device side is templated on the transport (transport.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/intranode.h"
#include "runtime/internode_layout.h"

namespace deepcomm::internode {

using intranode::Payload;

enum class TransportKind : int { kIpc = 0, kNvshmem = 1 };

// Bytes moved per leg, accumulated by the kernels (one atomic per block).
enum TrafficCounter : int {
  kDispatchBoundary = 0,  // rows crossing the node boundary (one per token and destination node)
  kDispatchDirect = 1,    // rows written over NVLink by their sender (destination on the sender's node)
  kDispatchForward = 2,   // rows written over NVLink by the forwarder on the destination node
  kCombineBoundary = 3,   // partial sums crossing the node boundary (one per token and node)
  kCombineNvlink = 4,     // expert-output rows read over NVLink (by gateways and home ranks)
  kNumTrafficCounters = 5,
};

struct ContextDesc {
  TransportKind transport;
  uint8_t* transport_regions[kMaxRanks];  // every rank's region mapped here; nvshmem: null where only puts reach it
  bool staged;                            // write local staging and deliver it by put (a NIC's pattern) to every peer
  uint8_t* node_regions[kMaxLocalRanks];  // NVLink regions of this node's ranks, by local index
  int rank;
  int num_ranks;
  int ranks_per_node;
  int num_slots;
  int64_t slot_bytes;
  int64_t max_tokens;
  int hidden;
  int num_topk;
  int32_t* forward_rows;    // [num_slots][num_nodes][area_rows][ranks_per_node]
  int32_t* forward_counts;  // [num_slots][num_nodes][kMaxChannels]
  int64_t* traffic;         // [kNumTrafficCounters]
  HostMailbox* mailbox;     // pinned, mapped
  int64_t timeout_ns;
};

struct NotifyArgs {
  uint64_t call;
  uint64_t call_shape;               // intranode::NotifyArgs::call_shape: compared with every peer's
  const int32_t* tokens_per_rank;    // [W]
  const int32_t* tokens_per_node;    // [N]
  const int32_t* tokens_per_expert;  // [E]
  const int32_t* num_invalid;        // [1]
  int num_experts;
  int32_t* send_base;                // out [W]: first row of this rank's tokens in each rank's slot
  int32_t* recv_totals;              // out [W]
  int32_t* recv_tokens_per_expert;   // out [E / W]
  int32_t* abort_dispatch;           // out [1]
};

struct DispatchArgs {
  uint64_t call;
  int slot;
  Payload payload;
  const void* x;
  const float* x_scales;
  int hidden;
  const int64_t* topk_idx;
  const float* topk_weights;
  int num_tokens;
  int num_topk;
  int experts_per_rank;
  const bool* is_token_in_rank;  // [T, W]
  const int32_t* send_pos;       // [T, W]
  const int32_t* send_base;      // [W]
  const int32_t* recv_totals;    // [W]
  const int32_t* abort_dispatch;
  int64_t expected_recv;
  uint64_t arrivals_expected;    // cumulative blocks of each node peer after this call
  int num_blocks;                // ceil(num_blocks / 2) send (channels), the rest forward
  int32_t* node_rows;            // out [T, N]: the token's row in each node's area (-1: not sent there)
};

struct CombineArgs {
  uint64_t call;
  int slot;                      // the dispatch's slot (its forward map)
  int dispatch_channels;         // the dispatch's channel count
  int64_t source_offset;         // this rank's [R, H] bf16 rows in its NVLink region
  void* y;
  int hidden;
  int num_tokens;
  const bool* is_token_in_rank;
  const int32_t* send_pos;
  const int32_t* send_base;
  const int32_t* node_rows;
  uint64_t credit_expected;      // combines each home partner finished reading before this call (call - 1)
  uint64_t done_expected;        // cumulative blocks of each node peer after this call
  int num_blocks;                // ceil(num_blocks / 2) reduce at home, the rest are gateways
};

DC_HOST_DEVICE inline int num_channels(int num_blocks) { return (num_blocks + 1) / 2; }

void launch_notify(const ContextDesc& ctx, const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch(const ContextDesc& ctx, const DispatchArgs& args, cudaStream_t stream);
void launch_combine(const ContextDesc& ctx, const CombineArgs& args, cudaStream_t stream);

}  // namespace deepcomm::internode
