// Memory shared by the ranks for the low-latency kernels (decode: no host wait,
// capturable in a CUDA graph); included by host and device code and mirrored to
// Python through the bindings.
//
// Each rank owns one registered buffer, mapped into every peer by CUDA IPC:
//
//   [ SignalRegion | pad to 4 KiB | receive area 0 | receive area 1 ]
//
// A dispatch uses area (its call number % 2), so two results can be alive at
// once (two micro-batches). A receive area holds, for every local expert, room
// for world_size * max_tokens rows, packed: the rows of expert e from rank 0
// first, then those from rank 1, ..., each source's in token order, so the
// layout is deterministic and an expert's rows are [0, count). The rows part
// is sized for bf16 whatever was dispatched (bf16 or fp8 rows, packed), so the
// experts can write their bf16 outputs over their inputs (combine_input), where
// the owners of the tokens pull them from.
//
// A token bound for several experts of one rank crosses to it once: into the
// rank's staging row [source][token], tagged with the epoch (so a row of an
// earlier call is never taken for this one's) and, per k, the expert and the
// token's place among the source's rows for that expert. The receive kernel
// adds the lower ranks' counts (sent with the rows) and copies each staged row
// to its final places. So the send never waits for another rank's counts.
//
// A dispatch given the routing weights stages them beside the tag, and the
// receive turns each staged row into a reduce entry (the epoch, per k the row
// the pair took here or -1, per k the weight). The combine of such a dispatch
// reduces where the experts ran: the owner sums each token's rows it holds,
// weighted, and writes one bf16 partial per (token, owner) into the token's
// rank ([owner][token] partials), which adds them in owner order. One row per
// (token, rank) crosses between GPUs, not one per (token, expert).
//
//   receive area = [ rows: local_experts * world * max_tokens * 2 * hidden bytes |
//                    fp8 scales: same rows * hidden / 128 float32 |
//                    staged rows: world * max_tokens * 2 * hidden bytes |
//                    staged scales: world * max_tokens * hidden / 128 float32 |
//                    partials: world * max_tokens * 2 * hidden bytes |
//                    staging tags: world * max_tokens * (1 + kMaxTopk) int32 |
//                    staged weights: world * max_tokens * kMaxTopk float32 |
//                    reduce entries: world * max_tokens * (1 + 2 * kMaxTopk) int32 ]
//
// Flags hold epochs, not call numbers: a rank's epoch for an area lives on the
// device and the send kernel advances it, so a captured graph replays correctly.
#pragma once

#include <cstdint>

#include "runtime/mailbox_layout.h"

namespace deepcomm::low_latency {

constexpr int kMaxRanks = 8;        // every rank is reached by CUDA IPC (one host)
constexpr int kMaxExperts = 1024;
constexpr int kMaxTopk = 16;
constexpr int kNumAreas = 2;

struct SignalRegion {
  // Written by peer s into this rank's region, per receive area:
  uint64_t rows_done[kNumAreas][kMaxRanks];      // epoch at which s's rows (and counts) for this rank are written
  uint64_t staging_free[kNumAreas][kMaxRanks];   // epoch at which s finished reading the rows staged there
  uint64_t outputs_ready[kNumAreas][kMaxRanks];  // epoch at which s's expert outputs are in place (combine)
  uint64_t partials_done[kNumAreas][kMaxRanks];  // epoch at which s's partial sums of this rank's tokens are written
  int32_t counts[kNumAreas][kMaxRanks][kMaxExperts];  // (token, expert) pairs s sends to each expert
  int32_t tokens[kNumAreas][kMaxRanks];                // tokens s dispatches (its staging rows), | kFp8RowsBit
  // This rank's own:
  uint64_t epoch[kNumAreas];              // of the last dispatch on each area (the send kernel advances it)
  uint32_t send_blocks_done[kNumAreas];   // blocks past the send; the last one signals and resets it
  uint32_t place_blocks_done[kNumAreas];  // blocks past the placing; the last one signals and resets it
  uint32_t reduce_blocks_done[kNumAreas];  // combine blocks past their partial sums; the last one signals
  int32_t reduce_tokens[kNumAreas][kMaxRanks];  // staged rows of each source with reduce entries (the receive's)
};

constexpr int32_t kFp8RowsBit = 1 << 30;     // in SignalRegion::tokens: the source sent fp8 rows
constexpr int32_t kWeightsBit = 1 << 29;     // in SignalRegion::tokens: the source sent its routing weights
constexpr int32_t kTokensMask = kWeightsBit - 1;

constexpr int64_t kDataOffset = (sizeof(SignalRegion) + 4095) / 4096 * 4096;

// Byte offsets in one receive area; rows per local expert = num_ranks * max_tokens.
struct AreaLayout {
  int64_t rows_per_expert, row_stride, scales;  // row_stride: of the bf16 rows
  int64_t staged, staged_scales, partials, staging_tags, staged_weights, reduce_entries, total_bytes;
};

// A staged row's tag: its epoch (low 32 bits), then for each k local_expert * max_tokens + place (-1: none).
constexpr int64_t kTagInts = 1 + kMaxTopk;
// A reduce entry: its epoch (low 32 bits), per k the row the pair took here (-1: elsewhere), per k the weight's bits.
constexpr int64_t kReduceInts = 1 + 2 * kMaxTopk;

#ifdef __CUDACC__
#define DC_LL_HOST_DEVICE __host__ __device__
#else
#define DC_LL_HOST_DEVICE
#endif

DC_LL_HOST_DEVICE inline int64_t align_to(int64_t bytes, int64_t to) { return (bytes + to - 1) / to * to; }

DC_LL_HOST_DEVICE inline AreaLayout area_layout(int64_t local_experts, int64_t num_ranks, int64_t max_tokens, int64_t hidden) {
  AreaLayout layout;
  layout.rows_per_expert = num_ranks * max_tokens;
  layout.row_stride = 2 * hidden;
  const int64_t rows = local_experts * layout.rows_per_expert, staged_rows = num_ranks * max_tokens;
  layout.scales = align_to(rows * layout.row_stride, 256);
  layout.staged = align_to(layout.scales + rows * (hidden / 128) * 4, 256);
  layout.staged_scales = align_to(layout.staged + staged_rows * layout.row_stride, 256);
  layout.partials = align_to(layout.staged_scales + staged_rows * (hidden / 128) * 4, 256);
  layout.staging_tags = align_to(layout.partials + staged_rows * layout.row_stride, 256);
  layout.staged_weights = align_to(layout.staging_tags + staged_rows * kTagInts * 4, 256);
  layout.reduce_entries = align_to(layout.staged_weights + staged_rows * kMaxTopk * 4, 256);
  layout.total_bytes = align_to(layout.reduce_entries + staged_rows * kReduceInts * 4, 4096);
  return layout;
}

// The host mailbox: the shared header only (errors; the low-latency path never reports counts to the host).
struct HostMailbox {
  MailboxHeader header;
};

}  // namespace deepcomm::low_latency
