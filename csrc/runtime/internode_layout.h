// Memory of the internode (hierarchical) path; included by host and device
// code and mirrored to Python through the bindings.
//
// Ranks: rank = node * ranks_per_node + local. Two kinds of memory per rank:
//
// NVLink region (CUDA IPC, mapped by the ranks of the same node only):
//   [ NodeSignals | pad to 4 KiB | recv slot 0 | ... | recv slot S-1 | combine staging ]
// recv slots have the intranode layout (intranode::recv_layout): every row is
// written once, at its final place, by a node peer (directly for tokens of
// this node, by the forwarder for tokens of other nodes).
//
// Transport region (registered with the inter-node transport: NVSHMEM
// symmetric heap, or CUDA IPC standing in for the NIC), same layout on every
// rank (TransportLayout):
//   [ TransportSignals | notify recv [2][W] | notify staging [W] |
//     dispatch recv [N][area_rows] | dispatch staging [N][area_rows] |
//     combine recv [N][area_rows] | combine staging [N][area_rows] ]
// "recv [n]" holds what the partner on node n (same local index) sent; rows
// are grouped by the sender's channel: channel c owns rows
// [c * channel_rows, (c + 1) * channel_rows). Staging mirrors recv for
// transports whose puts read local memory (a NIC); peer-mapped transports
// write the peer's recv area directly and leave staging unused.
#pragma once

#include <cstdint>

#include "runtime/intranode_layout.h"
#include "runtime/mailbox_layout.h"

namespace deepcomm::internode {

constexpr int kMaxLocalRanks = 8;  // one NVLink domain
constexpr int kMaxNodes = 8;
constexpr int kMaxRanks = kMaxLocalRanks * kMaxNodes;
constexpr int kMaxChannels = 64;   // sender blocks per dispatch
constexpr int kMaxExperts = intranode::kMaxExperts;

using intranode::align_up;

struct HostMailbox {
  MailboxHeader header;
  int64_t recv_from_rank[kMaxRanks];  // rows this rank receives from each rank (last notify)
  int64_t recv_totals[kMaxRanks];     // rows each rank receives
  int64_t invalid_ids[kMaxRanks];     // invalid expert ids each rank passed
  int64_t recv_tokens_per_expert[kMaxExperts];  // [local expert] (token, k) entries this rank receives
};

// Written by node peers into this rank's NVLink region.
struct NodeSignals {
  uint64_t dispatch_arrived[kMaxLocalRanks];  // blocks of local rank l that finished writing here (cumulative)
  uint64_t combine_ready[kMaxLocalRanks];     // last call at which l's expert outputs were ready
  uint64_t combine_done[kMaxLocalRanks];      // blocks of l that finished reading this node (cumulative)
  int64_t combine_source_offset[2];           // this rank's expert rows in its region, by call parity
  // Written and read by this rank only: what the combine rendezvous learnt, for the combine kernel.
  int64_t combine_peer_offset[kMaxLocalRanks];  // each node peer's combine_source_offset of the current call
  int32_t combine_peers_ready;                  // 0 when a node peer did not arrive in time (send nothing)
  int32_t home_next[kMaxChannels];              // tokens of each channel taken for the home reduction
  int32_t home_done;                            // tokens reduced; the warp that completes the call signals
};

constexpr int64_t kNodeDataOffset = (sizeof(NodeSignals) + 4095) / 4096 * 4096;

// Written through the transport into this rank's transport region. Tails
// count rows delivered for (sender's node, channel); the consumer resets them
// to 0 once it has used every row. A sender adds (total + 1) << 32 when its
// channel is complete, so the consumer learns the total even if it raced the
// last rows.
struct TransportSignals {
  uint64_t notify[kMaxRanks];                       // call of the counts each rank last sent here
  uint64_t dispatch_tail[kMaxNodes][kMaxChannels];  // rows from the partner on node n, channel c
  uint64_t combine_tail[kMaxNodes][kMaxChannels];   // partial sums from the gateway on node n, channel c
  uint64_t combine_credit[kMaxNodes];               // combines whose partials node n's partner has read (cumulative)
};

constexpr uint64_t kTailCountMask = 0xffffffffull;
DC_HOST_DEVICE inline uint64_t tail_final(int64_t total_rows) { return static_cast<uint64_t>(total_rows + 1) << 32; }

// One dispatched row as it crosses the node boundary:
//   [ x (bf16 or fp8) | fp8 scales | src token | dst rows [ranks_per_node] | expert ids [K] | weights [K] ]
// dst rows: the row this token takes in each rank of the target node's recv
// slot (its final place), or -1. Expert ids stay global.
struct RowFormat {
  int64_t x_bytes, scales, meta, dst_rows, expert_ids, weights, stride;
};

DC_HOST_DEVICE inline RowFormat row_format(int64_t x_bytes, int64_t scale_cols, int ranks_per_node, int num_topk) {
  RowFormat f;
  f.x_bytes = x_bytes;
  f.scales = x_bytes;
  f.meta = align_up(f.scales + scale_cols * 4, 16);
  f.dst_rows = f.meta + 4;
  f.expert_ids = f.dst_rows + 4 * ranks_per_node;
  f.weights = f.expert_ids + 4 * num_topk;
  f.stride = align_up(f.weights + 4 * num_topk, 16);
  return f;
}

// Bytes a received row occupies in a recv slot (what one NVLink write moves).
DC_HOST_DEVICE inline int64_t slot_row_bytes(int64_t x_bytes, int64_t scale_cols, int num_topk) {
  return x_bytes + scale_cols * 4 + num_topk * 12 + 8;
}

struct TransportLayout {
  int num_ranks, num_nodes;
  int64_t area_rows;           // rows per source node in each dispatch/combine area
  int64_t dispatch_stride;     // largest dispatch row (bytes)
  int64_t combine_stride;      // one bf16 row
  int64_t notify_ints;         // int32s per notify message
  int64_t notify_recv, notify_staging, dispatch_recv, dispatch_staging, combine_recv, combine_staging, total_bytes;
};

// A notify message from rank s to rank d: [tokens to each rank (W) | tokens to
// each node (N) | invalid ids | tokens to each of d's experts (E / W)].
DC_HOST_DEVICE inline TransportLayout transport_layout(int num_ranks, int ranks_per_node, int64_t max_tokens,
                                                       int64_t hidden, int num_topk) {
  TransportLayout t;
  t.num_ranks = num_ranks;
  t.num_nodes = num_ranks / ranks_per_node;
  t.area_rows = max_tokens + kMaxChannels;  // each channel may round its share up by one row
  const int64_t scale_cols = (hidden + 127) / 128;
  const int64_t bf16_stride = row_format(2 * hidden, 0, ranks_per_node, num_topk).stride;
  const int64_t fp8_stride = row_format(hidden, scale_cols, ranks_per_node, num_topk).stride;
  t.dispatch_stride = bf16_stride > fp8_stride ? bf16_stride : fp8_stride;
  t.combine_stride = 2 * hidden;
  t.notify_ints = align_up(num_ranks + t.num_nodes + 3 + kMaxExperts / num_ranks, 4);  // + the call shape's 2
  t.notify_recv = align_up(sizeof(TransportSignals), 4096);
  t.notify_staging = t.notify_recv + 2 * num_ranks * t.notify_ints * 4;
  t.dispatch_recv = align_up(t.notify_staging + num_ranks * t.notify_ints * 4, 4096);
  const int64_t dispatch_area = align_up(t.num_nodes * t.area_rows * t.dispatch_stride, 4096);
  const int64_t combine_area = align_up(t.num_nodes * t.area_rows * t.combine_stride, 4096);
  t.dispatch_staging = t.dispatch_recv + dispatch_area;
  t.combine_recv = t.dispatch_staging + dispatch_area;
  t.combine_staging = t.combine_recv + combine_area;
  t.total_bytes = t.combine_staging + combine_area;
  return t;
}

}  // namespace deepcomm::internode
