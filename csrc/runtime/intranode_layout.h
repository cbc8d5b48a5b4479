// Memory shared by the ranks of one node for the intranode kernels; included
// by host and device code (and mirrored to Python through the bindings).
//
// Each rank owns one registered buffer, mapped into every peer by CUDA IPC:
//
//   [ SignalRegion | pad to 4 KiB | recv slot 0 | ... | recv slot S-1 | combine slot | landing area ]
//
// SignalRegion holds flags that *peers* write (arrived/ready/done, indexed by
// the writing rank) and values that *this* rank publishes for peers to read
// (counts, combine source offset), double-buffered by call parity: a rank can
// be at most one call ahead of any peer, because every call ends in a barrier.
//
// A recv slot receives one dispatch: R rows laid out by recv_layout(). Rows
// are written once, by their senders, at their final positions; DispatchResult
// views them in place. Slots rotate per dispatch. The combine slot takes
// expert outputs that do not already live in this buffer (a pulling combine
// reads them there). The landing area, when configured, takes the rows peers'
// copy engines push back to this rank in a pushing combine, peer after peer.
#pragma once

#include <cstdint>

#include "runtime/mailbox_layout.h"

#ifdef __CUDACC__
#define DC_HOST_DEVICE __host__ __device__
#else
#define DC_HOST_DEVICE
#endif

namespace deepcomm::intranode {

constexpr int kMaxRanks = 8;       // one NVLink domain; more ranks take the internode path
constexpr int kMaxExperts = 2048;  // experts in the whole model

// Written by the kernels to pinned, mapped host memory; read by the host.
struct HostMailbox {
  MailboxHeader header;
  int64_t tokens_matrix[kMaxRanks][kMaxRanks];  // [src][dst] tokens of the last notify
  int64_t invalid_ids[kMaxRanks];               // [src] invalid expert ids rank src passed to the last notify
  int64_t recv_tokens_per_expert[kMaxExperts];  // [local expert] (token, k) entries this rank receives
};

struct SignalRegion {
  // Written by peer s into this rank's region:
  uint64_t notify_arrived[kMaxRanks];    // last call at which s published its counts
  uint64_t dispatch_arrived[kMaxRanks];  // blocks of s that finished writing rows here (cumulative)
  uint64_t combine_ready[kMaxRanks];     // last call at which s's combine rows were ready
  uint64_t combine_done[kMaxRanks];      // blocks of s that finished reading all peers (cumulative)
  uint32_t chunks_landed[kMaxRanks];     // chunks of rows s's copy engines pushed into the landing area
                                         // (cumulative; a stream memory operation of s writes it)
  // Published by this rank, read by peers, by call parity:
  int64_t combine_source_offset[2];               // byte offset of this rank's combine rows in its buffer
  int32_t combine_pushes[2];                      // 1: this rank's combine pushes its rows; 0: peers pull them
  int32_t invalid_ids[2];                         // invalid expert ids in this rank's input
  uint64_t reused_routing[2];                     // the call whose routing this call reuses; 0: counts published
  uint64_t call_shape[2];                         // NotifyArgs::call_shape of this rank's call
  int32_t tokens_to_rank[2][kMaxRanks];           // tokens this rank sends to each rank
  int32_t tokens_to_expert[2][kMaxExperts];       // (token, k) entries this rank sends to each expert
  // Written and read by this rank only: what the combine rendezvous learnt, for the combine copy.
  int64_t combine_peer_offset[kMaxRanks];         // each peer's combine_source_offset of the current call
  int32_t combine_peers_ready;                    // 0 when a peer did not arrive in time (copy nothing)
};

constexpr int64_t kDataOffset = (sizeof(SignalRegion) + 4095) / 4096 * 4096;

DC_HOST_DEVICE inline int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Where each field of R received rows lives inside a recv slot.
struct RecvLayout {
  int64_t x, scales, topk_idx, topk_weights, src_idx, total_bytes;
};

DC_HOST_DEVICE inline RecvLayout recv_layout(int64_t rows, int64_t x_row_bytes, int64_t scale_cols,
                                                  int64_t num_topk) {
  RecvLayout layout;
  layout.x = 0;
  layout.scales = align_up(rows * x_row_bytes, 256);
  layout.topk_idx = align_up(layout.scales + rows * scale_cols * 4, 256);
  layout.topk_weights = align_up(layout.topk_idx + rows * num_topk * 8, 256);
  layout.src_idx = align_up(layout.topk_weights + rows * num_topk * 4, 256);
  layout.total_bytes = align_up(layout.src_idx + rows * 8, 256);
  return layout;
}

}  // namespace deepcomm::intranode
