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
  // Off when null: [phase_slots][kPhaseBlocks][kNumPhases] %globaltimer ns, written by thread 0 of each
  // block (block < kPhaseBlocks) of a call at slot (epoch * kNumAreas + area) % phase_slots.
  uint64_t* phase_clock;
  int phase_slots;
  // Launch each call's kernels early (kernels/common/launch.cuh); set only where can_launch_early.
  bool early_launch;
};

// Where a call is when its blocks stamp the phase clock (tools/profile_low_latency.py --phases).
enum Phase : int {
  kPhaseStart,           // a dispatch kernel's block begins (past its wait for the kernel before, if launched early)
  kPhaseRouted,          // send: thread 0's share of the routing masks is built
  kPhaseStagingFree,     // send: every rank placed what this rank staged there last time on the area (masks built)
  kPhaseRowsSent,        // send: this block's rows are written
  kPhaseRowsSignalled,   // send: fenced and counted (the last block raised rows_done)
  kPhaseRowsArrived,     // receive: every rank's rows_done
  kPhasePlacesAdded,     // receive: bases, counts and pair rows final
  kPhaseRowsPlaced,      // receive: this block's rows copied to their places
  kPhaseEnd,             // receive: counted (the last block freed the staging rows)
  kPhaseCombineStart,    // a combine kernel's block begins (past its wait for the kernel before, if launched early)
  kPhaseOutputsReady,    // pull: every rank's outputs_ready
  kPhasePartialsSent,    // owner sums: this block's partial sums written to the tokens' ranks
  kPhasePartialsArrived, // owner sums: every owner's partials of this rank's tokens (partials_done)
  kPhaseSummed,          // this block's tokens reduced
  kNumPhases
};
constexpr int kPhaseBlocks = 256;  // every block of a call: they all run at once, so no GPU has more

struct DispatchArgs {
  int area;
  Payload payload;
  const void* x;            // [T, H] bf16 or fp8
  const float* x_scales;    // [T, H/128] for kFp8, else null
  const int64_t* topk_idx;  // [T, K], -1 = none
  const float* topk_weights;  // [T, K] when with_weights (null with no tokens)
  bool with_weights;          // the weights travel with the rows: the combine sums at the owners
  int num_tokens;
  int num_topk;
  int32_t* pair_rows;       // out [T, K]: expert * rows_per_expert + row of the pair, -1 for none (final after the receive)
  int32_t* recv_counts;     // out [local experts]: rows each local expert receives (written by the receive)
  int num_blocks;
};

struct CombineArgs {
  int area;
  const void* outputs;          // owner sums: [local experts, rows per expert, H] bf16 expert outputs (any memory)
  const int32_t* pair_rows;     // [T, K] from the dispatch
  const float* topk_weights;    // pull: [T, K] (null with no tokens)
  bool owner_sums;              // the dispatch carried the weights: sums at the owners over outputs
  int num_tokens;
  int num_topk;
  void* y;                      // out [T, H] bf16
  int num_blocks;
};

// Dynamic shared memory of the send (routing bit masks), for config checks; the kernels' static shared
// arrays (the receive's bases, the phase stamps, a few words) stay below kStaticSharedBound beside it.
int64_t dispatch_shared_bytes(int num_experts, int max_tokens);

// Whether the kernels as this device runs them wait for the kernel before (built for sm_90 or later), so that
// they may be launched early.
bool can_launch_early(int device);
constexpr int kStaticSharedBound = 8 * 1024;

// Which part of a call a launch runs: both (a synchronous call, one launch), or the send now and the
// receive later (a receive hook: no SM waits in between).
enum class Phases : int { kSend = 1, kReceive = 2, kBoth = 3 };

// Dispatch. Send: publish this rank's per-expert counts to every rank and write each token once to each
// rank it names (a staging row tagged with the epoch and the token's place for each of its experts there);
// never waits for another rank's data. Receive: wait for every rank's rows, add the lower ranks' counts to
// the places, copy each staged row to its final rows, fill recv_counts and finish pair_rows.
void launch_dispatch(const Context& ctx, const DispatchArgs& args, Phases phases, cudaStream_t stream);
// Copy expert outputs from `outputs` ([local experts, rows per expert, H] bf16) into this rank's
// receive area, only each expert's received rows (recv_counts from the dispatch).
void launch_stage_outputs(const Context& ctx, int area, const void* outputs, const int32_t* recv_counts,
                          int num_blocks, cudaStream_t stream);
// Combine, pull (weights given here). Send: tell every rank that this rank's expert outputs are in place.
// Receive: wait for every rank's, then pull each token's rows and reduce them, weighted.
// Combine, owner sums (the dispatch carried the weights). Send: per reduce entry, sum the token's rows held
// here in k order, weighted, and write the bf16 partial into the token's rank. Receive: wait for every
// owner's partials and add them per token in ascending owner order.
void launch_combine(const Context& ctx, const CombineArgs& args, Phases phases, cudaStream_t stream);

}  // namespace deepcomm::low_latency
