// Low-latency dispatch and combine (decode-size calls): no host wait, every
// flag an epoch kept on the device, so a call can be captured in a CUDA graph.
//
// Dispatch, send (num_blocks persistent blocks). Each block builds, in shared
// memory, one bit mask over this rank's tokens per expert (bit t: token t names
// the expert). A pair's place among this rank's rows for its expert is the
// number of earlier tokens in that mask, so places follow token order no matter
// which warp gets there first. Block 0 sends the popcounts (this rank's count
// per expert) to every rank. One warp per (token, chunk of the hidden size)
// reads the chunk once (quantising to fp8 on the way when asked) and writes it
// once to each rank the token names, into that rank's staging row for (this
// rank, token), with a tag: the epoch, and per k the expert and place. The last
// block raises "rows_done" in every rank. The send waits for no other rank's
// data: only, before writing, for every rank to have read (placed) the rows
// staged there on this area last time ("staging_free", normally long set).
//
// Dispatch, receive: wait for every rank's rows_done; the lower ranks' counts
// per expert give where each source's rows start, so each staged row is copied
// to its final rows (packed by source rank, then token: the same in every run);
// finish this rank's pair rows and the received counts; raise staging_free in
// every rank. A synchronous call runs both in one launch; with a receive hook
// the receive is a launch of its own, queued when the caller asks.
//
// Combine: the experts' bf16 outputs sit in the receive area, over their
// inputs. Send raises "outputs_ready" in every rank; receive waits for every
// rank's, then one warp per (token, chunk) pulls the token's rows from their
// owners and sums weight * row over k in ascending order in float32, each
// product and sum rounded on its own, a missing pair adding +0.0
// (deepcomm/pair_sum.py's order, so the reference path agrees bit for bit).
// Nobody waits for the pulls to end: a rank overwrites its rows only in its
// next receive on the area, after every rank's rows_done for it, which each
// raises only after its combine on the area is done (stream order).
//
// Combine of a dispatch that carried the weights (staged beside each row's tag;
// the receive turned each staged row into a reduce entry of this rank's own):
// with no flag first, one warp per (entry, chunk) sums the token's rows held
// here, weighted, k ascending, and writes the bf16 partial into the token's
// rank ([owner][token]); the last block raises partials_done in every rank;
// each rank waits for all of them and adds its tokens' partials in owner order.
// The entries are overwritten only by this rank's receive two calls later (after
// this combine, by stream order). An owner writes a rank's partials on the area
// again only in its combine two calls later, after its receive there, which
// waits for that rank's rows_done, raised by a send after this rank's combine.
#include <cuda_runtime.h>

#include "kernels/common/launch.cuh"
#include "kernels/common/peer_wait.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/rows.cuh"
#include "kernels/low_latency.h"
#include "runtime/error.h"

namespace deepcomm::low_latency {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kTargetGroup = 8;      // destinations a warp writes per pass over a chunk (copy_row keeps them in registers)
constexpr int kCombineUnroll = 2;    // 16-byte units per source and lane in flight: 8 sources x 2
// The owner sums and the adding after them: sources (packed to the first lanes) taken kSumGroup at a time,
// kSumUnroll 16-byte units of each per lane in flight, about what 512 threads' registers hold without
// spilling. A decode chunk of the owner sums (160 units) then takes one round of loads per two sources (a
// token has 4 of its 8 pairs on each of 2 owners on average), the adding's (304 units, a source per owner) two.
constexpr int kSumGroup = 2;
constexpr int kSumUnroll = 5;
// The send's copy: a decode chunk of bf16 (a third of a 7168 row, 304 units) in one round of loads, where
// rows.cuh's 8 units a lane took two (256, then 48). An fp8 chunk (152 units) takes one at 8, which spills less.
constexpr int kSendUnroll = 10;
constexpr int kMinChunkBlocks = 4;   // 128-channel blocks per chunk at least (1 KiB of bf16)
constexpr int kPlaceItemsPerWarp = 4;  // the receive's (staged row, chunk) items per warp it aims for (bf16 rows)
constexpr int kDefaultSharedBytes = 48 * 1024;

// The hidden size in chunks of whole 128-channel blocks, so that a decode-size call (few tokens)
// still gives every warp work: num_rows rows make about items_wanted (row, chunk) items, chunks of at
// least kMinChunkBlocks blocks. A chunk never splits an fp8 scale block.
struct Chunking {
  int count;
  int channels;
};

Chunking chunking_of(int hidden, int num_rows, int64_t items_wanted) {
  if (hidden % 128 != 0 || num_rows == 0) return {1, hidden};
  const int blocks = hidden / 128;
  int64_t wanted = (items_wanted + num_rows - 1) / num_rows;
  const int max_chunks = blocks / kMinChunkBlocks > 0 ? blocks / kMinChunkBlocks : 1;
  wanted = wanted < 1 ? 1 : (wanted > max_chunks ? max_chunks : wanted);
  const int per_chunk = static_cast<int>((blocks + wanted - 1) / wanted);
  return {(blocks + per_chunk - 1) / per_chunk, per_chunk * 128};
}

__device__ __forceinline__ SignalRegion* signals_of(const Context& ctx, int rank) {
  return reinterpret_cast<SignalRegion*>(ctx.regions[rank]);
}

__device__ __forceinline__ AreaLayout layout_of(const Context& ctx) {
  return area_layout(ctx.num_experts / ctx.num_ranks, ctx.num_ranks, ctx.max_tokens, ctx.hidden);
}

__device__ __forceinline__ uint8_t* area_of(const Context& ctx, int rank, int area, const AreaLayout& layout) {
  return ctx.regions[rank] + kDataOffset + static_cast<int64_t>(area) * layout.total_bytes;
}

__device__ __forceinline__ uint64_t epoch_of(const SignalRegion* own, int area) {
  return *reinterpret_cast<const volatile uint64_t*>(&own->epoch[area]);
}

// Thread 0's stamps of its block's phases, in shared memory until the call's epoch (its slot) is known.
// kCompiled = false compiles them out: the combine's pull loop is short of registers, and the check of
// the clock alone cost it spills, so it has a launch with the clock and one without.
template <bool kCompiled = true>
struct PhaseStamps {
  uint64_t ns[kNumPhases];

  __device__ __forceinline__ void stamp(const Context& ctx, Phase phase) {
    if (kCompiled && ctx.phase_clock != nullptr && threadIdx.x == 0) ns[phase] = ptx::global_timer_ns();
  }

  // Phases [first, last] of the call on (area, epoch); a launch writes only the phases it ran, and zero for
  // those among them that its kind of call never reaches (bits of `unreached`: the other combine's).
  __device__ __forceinline__ void flush(const Context& ctx, int area, uint64_t epoch, Phase first, Phase last,
                                        uint32_t unreached = 0) const {
    if (!kCompiled || ctx.phase_clock == nullptr || threadIdx.x != 0 || blockIdx.x >= kPhaseBlocks) return;
    const int64_t slot = static_cast<int64_t>((epoch * kNumAreas + area) % ctx.phase_slots);
    uint64_t* out = ctx.phase_clock + (slot * kPhaseBlocks + blockIdx.x) * kNumPhases;
    for (int phase = first; phase <= last; ++phase) out[phase] = (unreached >> phase) & 1u ? 0 : ns[phase];
  }
};

// ------------------------------------------------------------ dispatch

// Every lane's copy of the row and scale targets that lanes [group, group + kTargetGroup) hold
// (copy_row and quantize_row keep all of a warp's targets in registers).
__device__ __forceinline__ void targets_of_lanes(uint8_t* x_target, float* scale_target, int group,
                                                 uint8_t* (&x_targets)[kTargetGroup],
                                                 float* (&scale_targets)[kTargetGroup]) {
#pragma unroll
  for (int j = 0; j < kTargetGroup; ++j) {
    x_targets[j] = reinterpret_cast<uint8_t*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(x_target), group + j));
    scale_targets[j] = reinterpret_cast<float*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(scale_target), group + j));
  }
}

// Counts the arrival of one block of this rank at the end of a phase; true for the last of the grid (which
// resets the count for the next call). kWritesSeen: every block's writes are fenced before it counts, so the
// last block's flag publishes them to other GPUs. Without it the count says only that the blocks' reads are
// over, and no block waits for its writes to drain; the next kernel on the stream sees them anyway. That
// rests on the hardware rather than on the PTX memory model, which does not order plain reads before a
// relaxed count: every value the caller loaded was used (stored, kept in shared memory or compared) before
// the barrier ahead of the count, so those loads had completed and a peer's later write cannot reach them.
template <bool kWritesSeen>
__device__ __forceinline__ bool last_block_done(uint32_t* blocks_done) {
  if constexpr (kWritesSeen) __threadfence_system();
  if (atomicAdd(blocks_done, 1u) + 1u != gridDim.x) return false;
  *blocks_done = 0;
  if constexpr (kWritesSeen) __threadfence_system();
  return true;
}

// Send: route, publish this rank's counts, write each token once to each rank it goes to (staging
// row + tag), raise rows_done. Returns the call's epoch (in every thread).
template <Payload kPayload>
__device__ uint64_t send_rows(const Context& ctx, const DispatchArgs& args, Chunking chunking, uint32_t* masks,
                              PhaseStamps<>& stamps) {
  constexpr bool kQuantize = kPayload == Payload::kBf16ToFp8 || kPayload == Payload::kBf16ToFp8Pow2;
  constexpr bool kHasScales = kPayload != Payload::kBf16;
  constexpr int kSourceBytesPerChannel = kPayload == Payload::kBf16 || kQuantize ? 2 : 1;
  constexpr int kRecvBytesPerChannel = kPayload == Payload::kBf16 ? 2 : 1;
  __shared__ uint64_t epoch;
  __shared__ int invalid_ids;
  __shared__ bool staging_free;

  const int num_experts = ctx.num_experts, num_ranks = ctx.num_ranks, rank = ctx.rank;
  const int local_experts = num_experts / num_ranks;
  const int num_tokens = args.num_tokens, num_topk = args.num_topk, area = args.area;
  const int words = (num_tokens + 31) / 32;  // masks: [E][words], bit t: token t names the expert
  SignalRegion* own = signals_of(ctx, rank);
  const AreaLayout layout = layout_of(ctx);

  for (int i = threadIdx.x; i < num_experts * words; i += blockDim.x) masks[i] = 0;
  if (threadIdx.x == 0) {
    epoch = epoch_of(own, area) + 1;
    invalid_ids = 0;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < num_tokens * num_topk; p += blockDim.x) {
    const int64_t expert = args.topk_idx[p];
    const int token = p / num_topk;
    if (expert >= 0 && expert < num_experts) atomicOr(&masks[expert * words + token / 32], 1u << (token % 32));
    else if (expert != -1) invalid_ids = 1;
  }
  stamps.stamp(ctx, kPhaseRouted);
  // Before anything is written: every rank must have read the rows (and the counts) this rank staged
  // there in the last call on this area (almost always long done: a local read, its latency under the routing's).
  if (threadIdx.x == 0)
    staging_free = wait_for_peers(own->staging_free[area], num_ranks, epoch - 1, ctx.timeout_ns,
                                  &ctx.mailbox->header, kStageLowLatencyStaging);
  __syncthreads();
  stamps.stamp(ctx, kPhaseStagingFree);

  if (blockIdx.x == 0 && staging_free) {
    // An invalid id is skipped (it names no owner) and reported; the host raises at its next check.
    if (threadIdx.x == 0 && invalid_ids)
      report_error(&ctx.mailbox->header, kErrorInvalidIds, kStageLowLatencyRows, rank);
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int32_t count = 0;
      for (int w = 0; w < words; ++w) count += __popc(masks[e * words + w]);
      for (int dst = 0; dst < num_ranks; ++dst) signals_of(ctx, dst)->counts[area][rank][e] = count;
    }
    for (int dst = threadIdx.x; dst < num_ranks; dst += blockDim.x)
      signals_of(ctx, dst)->tokens[area][rank] =
          num_tokens | (kRecvBytesPerChannel == 1 ? kFp8RowsBit : 0) | (args.with_weights ? kWeightsBit : 0);
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int hidden = ctx.hidden;
  const int scale_cols = kHasScales ? hidden / 128 : 0;
  const int num_items = staging_free ? num_tokens * chunking.count : 0;
  for (int item = blockIdx.x * kWarps + warp; item < num_items; item += gridDim.x * kWarps) {
    const int token = item / chunking.count, chunk = item % chunking.count;
    const int first_channel = chunk * chunking.channels;
    const int channels = min(chunking.channels, hidden - first_channel);

    // Lane k: pair (token, k) and its place among this rank's rows for the expert. The chunk goes to each
    // rank the token names once, from the lowest lane bound there; a repeated expert has the same place
    // (the receive places it once).
    const int64_t expert = lane < num_topk ? args.topk_idx[static_cast<int64_t>(token) * num_topk + lane] : -1;
    const bool valid = expert >= 0 && expert < num_experts;
    const int dst = valid ? static_cast<int>(expert / local_experts) : -1;
    const uint32_t lower = (1u << lane) - 1u;
    const bool first_of_rank = (__match_any_sync(0xffffffffu, valid ? dst : num_ranks + lane) & lower) == 0;
    int32_t place = -1;
    uint8_t* x_target = nullptr;
    float* scale_target = nullptr;
    const int64_t staged_row = static_cast<int64_t>(rank) * ctx.max_tokens + token;
    if (valid) {
      const uint32_t* mask = masks + expert * words;
      place = __popc(mask[token / 32] & ((1u << (token % 32)) - 1u));
      for (int w = 0; w < token / 32; ++w) place += __popc(mask[w]);
      if (first_of_rank) {
        uint8_t* owner_area = area_of(ctx, dst, area, layout);
        x_target = owner_area + layout.staged + (staged_row * hidden + first_channel) * kRecvBytesPerChannel;
        if constexpr (kHasScales)
          scale_target = reinterpret_cast<float*>(owner_area + layout.staged_scales) + staged_row * scale_cols + first_channel / 128;
      }
    }
    if (chunk == 0) {
      // The pair's row without the lower ranks' counts; the receive adds them.
      if (lane < num_topk)
        args.pair_rows[static_cast<int64_t>(token) * num_topk + lane] =
            valid ? static_cast<int32_t>(expert * (static_cast<int64_t>(num_ranks) * ctx.max_tokens) + place) : -1;
      uint32_t ranks = __ballot_sync(0xffffffffu, valid && first_of_rank);
      while (ranks) {
        const int to = __shfl_sync(0xffffffffu, dst, __ffs(ranks) - 1);
        ranks &= ranks - 1;
        uint8_t* to_area = area_of(ctx, to, area, layout);
        int32_t* tag = reinterpret_cast<int32_t*>(to_area + layout.staging_tags) + staged_row * kTagInts;
        // Every pair bound there, a repeated expert too (its weight counts again in the owner's sum).
        if (lane < kMaxTopk)
          tag[1 + lane] = dst == to ? static_cast<int32_t>((expert % local_experts) * ctx.max_tokens + place) : -1;
        if (lane == 0) tag[0] = static_cast<int32_t>(epoch);
        if (args.with_weights && lane < num_topk)
          reinterpret_cast<float*>(to_area + layout.staged_weights)[staged_row * kMaxTopk + lane] =
              args.topk_weights[static_cast<int64_t>(token) * num_topk + lane];
      }
    }

    const int4* source = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(args.x) +
                                                       (static_cast<int64_t>(token) * hidden + first_channel) * kSourceBytesPerChannel);
    for (int group = 0; group < num_topk; group += kTargetGroup) {
      if (__ballot_sync(0xffffffffu, x_target != nullptr && lane >= group && lane < group + kTargetGroup) == 0) continue;
      uint8_t* x_targets[kTargetGroup];
      float* scale_targets[kTargetGroup];
      targets_of_lanes(x_target, scale_target, group, x_targets, scale_targets);
      if constexpr (kQuantize) {
        rows::quantize_row<kPayload == Payload::kBf16ToFp8Pow2>(source, channels, x_targets, scale_targets, lane);
      } else {
        rows::PendingScales<> scales;
        if constexpr (kPayload == Payload::kFp8)
          scales.load(args.x_scales + static_cast<int64_t>(token) * scale_cols + first_channel / 128, channels / 128, lane);
        constexpr int kUnroll = kPayload == Payload::kBf16 ? kSendUnroll : rows::kCopyUnroll;  // fp8: one round at 8
        rows::copy_row<kTargetGroup, false, kUnroll>(source, channels * kSourceBytesPerChannel / 16, x_targets, lane);
        if constexpr (kPayload == Payload::kFp8) scales.store(scale_targets, lane);
      }
    }
  }

  __syncthreads();
  stamps.stamp(ctx, kPhaseRowsSent);
  if (threadIdx.x == 0 && last_block_done<true>(&own->send_blocks_done[area])) {
    own->epoch[area] = epoch;  // every block has read the old one
    // After a timeout nothing was sent: the ranks' receives then time out too, and every rank raises.
    for (int to = 0; to < num_ranks && staging_free; ++to)
      ptx::store_release_sys(&signals_of(ctx, to)->rows_done[area][rank], epoch);
  }
  stamps.stamp(ctx, kPhaseRowsSignalled);
  return epoch;
}

// Where the pair of a staged row with tag code `code` (local expert * max_tokens + place; -1 or out of range: none)
// lands in this rank's receive area, for the row of source `src`; base: [source][local expert], the lower
// sources' rows for the expert.
__device__ __forceinline__ int64_t placed_row(const Context& ctx, const AreaLayout& layout, const int32_t* base, int src,
                                              int32_t code) {
  const int local_experts = ctx.num_experts / ctx.num_ranks;
  if (code < 0 || code >= local_experts * ctx.max_tokens) return -1;
  const int expert = code / ctx.max_tokens;
  return expert * layout.rows_per_expert + base[src * local_experts + expert] + code % ctx.max_tokens;
}

// With weights, a staged row's reduce entry for the combine, written by the warp that places the row's first
// chunk: lane k gives the row its pair k took here (a repeated expert's too: its weight counts again in the
// owner's sum; -1: none) and the pair's weight, staged beside the tag.
__device__ __forceinline__ void write_reduce_entry(int32_t* entry, int64_t row, float weight, uint64_t epoch, int lane) {
  if (lane < kMaxTopk) {
    entry[1 + lane] = static_cast<int32_t>(row);
    entry[1 + kMaxTopk + lane] = __float_as_int(weight);
  }
  if (lane == 0) entry[0] = static_cast<int32_t>(epoch);
}

// Receive: wait for every rank's rows; finish this rank's pair rows (add the lower ranks' counts) and the
// received counts; copy each staged row to its places (lower ranks' rows for the expert first, then by
// token: rows land in their final order), and with weights write its reduce entry for the combine; tell
// every rank its staging rows here are free again.
template <bool kFp8, bool kWeights>
__device__ void place_rows(const Context& ctx, const DispatchArgs& args, Chunking chunking, uint64_t epoch,
                           PhaseStamps<>& stamps) {
  __shared__ bool arrived;
  __shared__ int first_item[kMaxRanks + 1];  // items of each source's staged rows, back to back
  __shared__ int32_t base[kMaxExperts];      // [source][local expert]: rows of lower sources before its own
  const int num_ranks = ctx.num_ranks, rank = ctx.rank, area = args.area;
  const int local_experts = ctx.num_experts / num_ranks;
  SignalRegion* own = signals_of(ctx, rank);
  if (threadIdx.x == 0) {
    arrived = wait_for_peers(own->rows_done[area], num_ranks, epoch, ctx.timeout_ns, &ctx.mailbox->header,
                             kStageLowLatencyRows);
    first_item[0] = 0;
    const bool weights = args.with_weights;
    for (int src = 0; src < num_ranks; ++src) {
      const int32_t word = *reinterpret_cast<volatile int32_t*>(&own->tokens[area][src]);
      // A source that sent the other row format (bf16 / fp8), or weights where this rank sent none or the
      // reverse, in this call: nothing of it is placed.
      const bool same_rows = ((word & kFp8RowsBit) != 0) == kFp8 && ((word & kWeightsBit) != 0) == weights;
      if (arrived && !same_rows && blockIdx.x == 0) report_error(&ctx.mailbox->header, kErrorModeMismatch, kStageLowLatencyRows, src);
      const int tokens = same_rows ? (word & kTokensMask) : 0;
      first_item[src + 1] = first_item[src] + tokens * chunking.count;
      // The combine reads these only after this kernel (stream order); each block writes the same values.
      if (blockIdx.x == 0) own->reduce_tokens[area][src] = arrived && weights ? tokens : 0;
    }
  }
  __syncthreads();
  stamps.stamp(ctx, kPhaseRowsArrived);
  ptx::allow_next_kernel();  // past the last wait on a peer (kernels/common/launch.cuh says why only now)
  const AreaLayout layout = layout_of(ctx);
  if (arrived) {
    auto count = [&](int src, int64_t expert) {
      return *reinterpret_cast<const volatile int32_t*>(&own->counts[area][src][expert]);
    };
    for (int i = threadIdx.x; i < num_ranks * local_experts; i += blockDim.x) {
      const int src = i / local_experts, expert = rank * local_experts + i % local_experts;
      int32_t before = 0;
      for (int r = 0; r < src; ++r) before += count(r, expert);
      base[i] = before;
      if (blockIdx.x == 0 && src == num_ranks - 1) args.recv_counts[i % local_experts] = before + count(src, expert);
    }
    const int64_t rows_per_expert = layout.rows_per_expert;
    for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < args.num_tokens * args.num_topk;
         p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int32_t pair_row = args.pair_rows[p];
      if (pair_row < 0) continue;
      int32_t before = 0;
      for (int r = 0; r < rank; ++r) before += count(r, pair_row / rows_per_expert);
      args.pair_rows[p] = pair_row + before;
    }
  }
  __syncthreads();
  stamps.stamp(ctx, kPhasePlacesAdded);

  constexpr int kBytesPerChannel = kFp8 ? 1 : 2;
  uint8_t* own_area = area_of(ctx, rank, area, layout);
  const int hidden = ctx.hidden, scale_cols = kFp8 ? hidden / 128 : 0;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int num_items = arrived ? first_item[num_ranks] : 0;
  // An item's staged row; lanes 0..kMaxTopk load its tag (the epoch, then a code per k) in one go.
  auto staged_row_of = [&](int item, int& src, int& token, int& chunk) {
    src = 0;
    while (item >= first_item[src + 1]) ++src;
    token = (item - first_item[src]) / chunking.count;
    chunk = (item - first_item[src]) % chunking.count;
    return static_cast<int64_t>(src) * ctx.max_tokens + token;
  };
  auto tag_word_of = [&](int item) -> int32_t {
    if (item >= num_items || lane >= kTagInts) return -1;
    int src, token, chunk;
    const int64_t staged_row = staged_row_of(item, src, token, chunk);
    return reinterpret_cast<const volatile int32_t*>(own_area + layout.staging_tags)[staged_row * kTagInts + lane];
  };
  const int stride = gridDim.x * kWarps;
  int32_t tag_word = tag_word_of(blockIdx.x * kWarps + warp);
  for (int item = blockIdx.x * kWarps + warp; item < num_items; item += stride) {
    // The next item's tag is in flight while this item's row moves: one memory latency an item, not three.
    const int32_t next_tag_word = tag_word_of(item + stride);
    const int32_t word = tag_word;
    tag_word = next_tag_word;
    int src, token, chunk;
    const int64_t staged_row = staged_row_of(item, src, token, chunk);
    // A tag of another epoch: the source staged this row in an earlier call (this time the token went elsewhere).
    if (__shfl_sync(0xffffffffu, word, 0) != static_cast<int32_t>(epoch)) continue;
    const int32_t next_lane_word = __shfl_down_sync(0xffffffffu, word, 1);
    const int32_t code = lane < kMaxTopk ? next_lane_word : -1;  // lane k: tag word 1 + k
    const int64_t pair_row = placed_row(ctx, layout, base, src, code);
    // The weights load while the row moves. They are read before staging_free lets the source stage over them.
    const bool writes_entry = kWeights && chunk == 0;
    const float weight = writes_entry && lane < kMaxTopk
                             ? reinterpret_cast<const volatile float*>(own_area + layout.staged_weights)[staged_row * kMaxTopk + lane]
                             : 0.0f;
    // A repeated expert's pairs share its row: the lowest lane copies it.
    const uint32_t lower = (1u << lane) - 1u;
    const int64_t row =
        (__match_any_sync(0xffffffffu, pair_row >= 0 ? pair_row : -1 - lane) & lower) != 0 ? -1 : pair_row;
    const int first_channel = chunk * chunking.channels;
    const int channels = min(chunking.channels, hidden - first_channel);
    uint8_t* x_target = row >= 0 ? own_area + (row * hidden + first_channel) * kBytesPerChannel : nullptr;
    float* scale_target = nullptr;
    if (kFp8 && row >= 0)
      scale_target = reinterpret_cast<float*>(own_area + layout.scales) + row * scale_cols + first_channel / 128;
    const int4* source = reinterpret_cast<const int4*>(own_area + layout.staged + (staged_row * hidden + first_channel) * kBytesPerChannel);
    for (int group = 0; group < kMaxTopk; group += kTargetGroup) {
      if (__ballot_sync(0xffffffffu, row >= 0 && lane >= group && lane < group + kTargetGroup) == 0) continue;
      uint8_t* x_targets[kTargetGroup];
      float* scale_targets[kTargetGroup];
      targets_of_lanes(x_target, scale_target, group, x_targets, scale_targets);
      rows::PendingScales<true> scales;
      if constexpr (kFp8)
        scales.load(reinterpret_cast<const float*>(own_area + layout.staged_scales) + staged_row * scale_cols + first_channel / 128,
                    channels / 128, lane);
      rows::copy_row<kTargetGroup, true>(source, channels * kBytesPerChannel / 16, x_targets, lane);
      if constexpr (kFp8) scales.store(scale_targets, lane);
    }
    if (writes_entry)
      write_reduce_entry(reinterpret_cast<int32_t*>(own_area + layout.reduce_entries) + staged_row * kReduceInts, pair_row,
                         weight, epoch, lane);
  }

  __syncthreads();
  stamps.stamp(ctx, kPhaseRowsPlaced);
  // Every block counts, so the count stays whole after a timeout; staging is freed only after a good receive.
  // Freeing says only that the staged rows were read: no block waits for its placed rows to drain (2.5-3 µs
  // of fences on two H200s). Later kernels on this stream see them; peers read them (as combine's outputs) only
  // after the combine's fence and outputs_ready flag.
  if (threadIdx.x == 0 && last_block_done<false>(&own->place_blocks_done[area]) && arrived)
    for (int src = 0; src < num_ranks; ++src)
      ptx::store_relaxed_sys(&signals_of(ctx, src)->staging_free[area][rank], epoch);
  stamps.stamp(ctx, kPhaseEnd);
}

// kSend and kReceive: the whole call in one launch (synchronous calls); one of them: a send now and the
// receive later (receive hooks), so that no SM waits in between. kWeights: the receive writes reduce entries.
template <Payload kPayload, bool kSend, bool kReceive, bool kWeights = false>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(Context ctx, DispatchArgs args, Chunking send_chunks,
                                                               Chunking place_chunks) {
  extern __shared__ uint32_t masks[];
  __shared__ PhaseStamps<> stamps;
  ptx::wait_for_previous_kernel();
  stamps.stamp(ctx, kPhaseStart);
  uint64_t epoch = 0;
  if constexpr (kSend) epoch = send_rows<kPayload>(ctx, args, send_chunks, masks, stamps);
  else epoch = epoch_of(signals_of(ctx, ctx.rank), args.area);  // the send kernel, earlier on this stream, advanced it
  if constexpr (kReceive) place_rows<kPayload != Payload::kBf16, kWeights>(ctx, args, place_chunks, epoch, stamps);
  // A receive launch (hook) keeps the send's stamps; its own start is not kept.
  stamps.flush(ctx, args.area, epoch, kSend ? kPhaseStart : kPhaseRowsArrived, kReceive ? kPhaseEnd : kPhaseRowsSignalled);
}

// -------------------------------------------------------------- combine

__device__ __forceinline__ void publish_outputs(const Context& ctx, int area) {
  const uint64_t epoch = epoch_of(signals_of(ctx, ctx.rank), area);
  __threadfence_system();  // the experts' outputs (earlier kernels) before the flag, for every GPU
  for (int dst = 0; dst < ctx.num_ranks; ++dst)
    ptx::store_release_sys(&signals_of(ctx, dst)->outputs_ready[area][ctx.rank], epoch);
}

__global__ void combine_send_kernel(Context ctx, int area) {
  ptx::wait_for_previous_kernel();
  publish_outputs(ctx, area);
}

// Expert outputs computed elsewhere, copied into this rank's receive area where peers can pull them:
// only each local expert's received rows, [0, count), one warp per row.
__global__ void __launch_bounds__(kThreads, 1) stage_outputs_kernel(Context ctx, int area, const int4* outputs,
                                                                    const int32_t* recv_counts) {
  ptx::wait_for_previous_kernel();
  const AreaLayout layout = layout_of(ctx);
  const int64_t row_units = layout.row_stride / 16;
  const int64_t num_rows = static_cast<int64_t>(ctx.num_experts / ctx.num_ranks) * layout.rows_per_expert;
  int4* rows = reinterpret_cast<int4*>(area_of(ctx, ctx.rank, area, layout));
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * kWarps + threadIdx.x / 32; row < num_rows; row += gridDim.x * kWarps) {
    if (row % layout.rows_per_expert >= recv_counts[row / layout.rows_per_expert]) continue;
    uint8_t* const target[1] = {reinterpret_cast<uint8_t*>(rows + row * row_units)};
    rows::copy_row(outputs + row * row_units, static_cast<int>(row_units), target, lane);
  }
}

// out[u] = bf16 of a float32 sum of terms (weight *) source[u], for each 16-byte unit u < units, each product
// and sum rounded on its own, starting from the first term, with kGroup sources at a time and kUnroll units of
// each per lane in flight. kPacked: the lanes with a source give the terms, in lane order, packed to the first
// lanes so that every group of loads is full (an owner holds a few of a token's K pairs, anywhere in k); none
// at all gives +0.0. Otherwise lanes [0, num_terms) give them, +0.0 for a lane with no source (a pair of -1
// adds +0.0 in its place: deepcomm/pair_sum.py's order). The whole warp calls it, with the same units in every
// lane (the shuffles need every lane).
template <int kGroup, int kUnroll, bool kWeighted, bool kPacked>
__device__ __forceinline__ void sum_rows(const int4* lane_source, float lane_weight, int num_terms, int units, int4* out,
                                         int lane) {
  int terms = num_terms;
  if constexpr (kPacked) {
    const uint32_t present = __ballot_sync(0xffffffffu, lane_source != nullptr);
    terms = __popc(present);
    uint32_t later = present;
    for (int i = 0; i < lane && later != 0; ++i) later &= later - 1;  // drop the first `lane` present lanes
    const int from = later != 0 ? __ffs(later) - 1 : lane;
    lane_source = reinterpret_cast<const int4*>(
        __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_source), from));
    if constexpr (kWeighted) lane_weight = __shfl_sync(0xffffffffu, lane_weight, from);
  }

  for (int first = 0; first < units; first += 32 * kUnroll) {
    const int base = first + lane;
    float acc[kUnroll][8] = {};
#pragma unroll 1
    for (int group = 0; group < terms; group += kGroup) {
      const int4* sources[kGroup];
      float weights[kGroup];
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        sources[j] = reinterpret_cast<const int4*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_source), group + j));
        if (group + j >= terms) sources[j] = nullptr;
        weights[j] = kWeighted ? __shfl_sync(0xffffffffu, lane_weight, group + j) : 1.0f;
      }
      // Every source's units are loaded before any is summed: the loads in flight set the rate.
      int4 loaded[kGroup][kUnroll];
#pragma unroll
      for (int j = 0; j < kGroup; ++j)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (sources[j] != nullptr && base + u * 32 < units) loaded[j][u] = ptx::load_cg(sources[j] + base + u * 32);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        // Packed, the sources end at `terms` (null past it); otherwise a lane without one adds +0.0.
        if constexpr (kPacked) {
          if (sources[j] == nullptr) continue;
        } else if (group + j >= terms) {
          break;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const bool in_row = base + u * 32 < units;
          if (kPacked && !in_row) continue;  // a unit past the row's end, never stored
          // The same operations either way; the product is taken where each kernel compiles best: with the
          // pull's placement (and a second null test) the owner kernels grew by a tenth in PTX and their
          // round trip by 2 µs (docs/benchmarks.md, eleventh session).
          constexpr bool kWeightWhileAdding = kWeighted && kPacked;
          float term[8];
          if (kPacked || (sources[j] != nullptr && in_row)) {
            rows::unpack_bf16x8(loaded[j][u], term);
            if constexpr (kWeighted && !kWeightWhileAdding) {
#pragma unroll
              for (int i = 0; i < 8; ++i) term[i] = __fmul_rn(term[i], weights[j]);
            }
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) term[i] = 0.0f;  // unweighted: a missing pair's weight may be anything
          }
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if constexpr (kWeightWhileAdding) term[i] = __fmul_rn(term[i], weights[j]);
            acc[u][i] = group + j == 0 ? term[i] : __fadd_rn(acc[u][i], term[i]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * 32 < units) out[base + u * 32] = rows::pack_bf16x8(acc[u]);
  }
}

// kPublish: the send's flag first (a synchronous call's one launch). kClocked: stamps the phase clock.
template <bool kPublish, bool kClocked>
__global__ void __launch_bounds__(kThreads, 1) combine_recv_kernel(Context ctx, CombineArgs args, Chunking chunking) {
  __shared__ bool ready;
  __shared__ PhaseStamps<kClocked> stamps;
  ptx::wait_for_previous_kernel();
  stamps.stamp(ctx, kPhaseCombineStart);
  SignalRegion* own = signals_of(ctx, ctx.rank);
  if (kPublish && blockIdx.x == 0 && threadIdx.x == 0) publish_outputs(ctx, args.area);
  if (threadIdx.x == 0)
    ready = wait_for_peers(own->outputs_ready[args.area], ctx.num_ranks, epoch_of(own, args.area), ctx.timeout_ns,
                           &ctx.mailbox->header, kStageLowLatencyOutputs);
  __syncthreads();
  stamps.stamp(ctx, kPhaseOutputsReady);
  ptx::allow_next_kernel();  // past the last wait on a peer (kernels/common/launch.cuh says why only now)
  if (!ready) {  // y stays unwritten; the host raises at its next check
    stamps.flush(ctx, args.area, epoch_of(own, args.area), kPhaseCombineStart, kPhaseOutputsReady);
    return;
  }

  const AreaLayout layout = layout_of(ctx);
  const int64_t owner_rows = static_cast<int64_t>(ctx.num_experts / ctx.num_ranks) * layout.rows_per_expert;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int num_topk = args.num_topk;
  const int64_t row_units = ctx.hidden / 8;  // 16-byte units of a bf16 row
  const int num_items = args.num_tokens * chunking.count;
  for (int item = blockIdx.x * kWarps + warp; item < num_items; item += gridDim.x * kWarps) {
    const int token = item / chunking.count, chunk = item % chunking.count;
    const int first_unit = chunk * chunking.channels / 8;
    const int units = min(chunking.channels, ctx.hidden - chunk * chunking.channels) / 8;

    const int64_t pair = static_cast<int64_t>(token) * num_topk + lane;
    const int32_t pair_row = lane < num_topk ? args.pair_rows[pair] : -1;
    const float weight = lane < num_topk ? args.topk_weights[pair] : 0.0f;
    const int4* lane_source = nullptr;
    if (pair_row >= 0 && pair_row < owner_rows * ctx.num_ranks) {  // a failed dispatch may have left any value
      const uint8_t* owner_area = area_of(ctx, static_cast<int>(pair_row / owner_rows), args.area, layout);
      lane_source = reinterpret_cast<const int4*>(owner_area + (pair_row % owner_rows) * layout.row_stride) + first_unit;
    }
    int4* out = reinterpret_cast<int4*>(args.y) + token * row_units + first_unit;

    sum_rows<kTargetGroup, kCombineUnroll, true, false>(lane_source, weight, num_topk, units, out, lane);
  }
  __syncthreads();
  stamps.stamp(ctx, kPhaseSummed);
  // The epoch read again rather than kept: a register less through the loop above (a combine never changes it).
  stamps.flush(ctx, args.area, epoch_of(signals_of(ctx, ctx.rank), args.area), kPhaseCombineStart, kPhaseSummed,
               1u << kPhasePartialsSent | 1u << kPhasePartialsArrived);
}

// ------------------------------------------- combine, sums at the owners (weights sent with the dispatch)

// [owner][token] bf16 partial rows in `rank`'s area: owner's weighted sum of the token's rows it holds.
__device__ __forceinline__ int4* partial_of(const Context& ctx, int rank, int area, const AreaLayout& layout, int owner,
                                           int token) {
  return reinterpret_cast<int4*>(area_of(ctx, rank, area, layout) + layout.partials) +
         (static_cast<int64_t>(owner) * ctx.max_tokens + token) * (ctx.hidden / 8);
}

// Send: per (reduce entry, chunk), the weighted sum of the token's rows held here, written as a bf16 partial
// into the token's rank; the last block raises partials_done there. Needs no flag first: the entries are
// this rank's (its receive wrote them) and so are the outputs (earlier kernels on this stream).
template <bool kClocked>
__device__ void send_partials(const Context& ctx, const CombineArgs& args, Chunking chunking, const AreaLayout& layout,
                              uint64_t epoch, PhaseStamps<kClocked>& stamps) {
  __shared__ int first_item[kMaxRanks + 1];  // items of each source's entries, back to back
  const int num_ranks = ctx.num_ranks, area = args.area;
  SignalRegion* own = signals_of(ctx, ctx.rank);
  if (threadIdx.x == 0) {
    first_item[0] = 0;
    for (int src = 0; src < num_ranks; ++src) {
      const int32_t tokens = own->reduce_tokens[area][src];
      first_item[src + 1] = first_item[src] + min(max(tokens, 0), ctx.max_tokens) * chunking.count;
    }
  }
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t owner_rows = static_cast<int64_t>(ctx.num_experts / num_ranks) * layout.rows_per_expert;
  const int64_t row_units = ctx.hidden / 8;
  const int num_items = first_item[num_ranks];
  const int32_t* entries = reinterpret_cast<const int32_t*>(area_of(ctx, ctx.rank, area, layout) + layout.reduce_entries);
  for (int item = blockIdx.x * kWarps + warp; item < num_items; item += gridDim.x * kWarps) {
    int src = 0;
    while (item >= first_item[src + 1]) ++src;
    const int token = (item - first_item[src]) / chunking.count, chunk = (item - first_item[src]) % chunking.count;
    // Lane l: word 1 + l of the entry (a row, then a weight); lane 0 also its epoch.
    const int32_t* entry = entries + (static_cast<int64_t>(src) * ctx.max_tokens + token) * kReduceInts;
    const int32_t word = entry[1 + lane];
    const int32_t tag = lane == 0 ? entry[0] : 0;
    // An entry of another epoch: none of the token's experts is here this time.
    if (__shfl_sync(0xffffffffu, tag, 0) != static_cast<int32_t>(epoch)) continue;
    const float weight = __int_as_float(__shfl_down_sync(0xffffffffu, word, kMaxTopk));  // lane k < kMaxTopk
    const int32_t row = lane < kMaxTopk ? word : -1;
    const int first_unit = chunk * chunking.channels / 8;
    const int units = min(chunking.channels, ctx.hidden - chunk * chunking.channels) / 8;
    const int4* lane_source =
        row >= 0 && row < owner_rows ? static_cast<const int4*>(args.outputs) + row * row_units + first_unit : nullptr;
    sum_rows<kSumGroup, kSumUnroll, true, true>(lane_source, weight, 0, units,
                                                partial_of(ctx, src, area, layout, ctx.rank, token) + first_unit, lane);
  }

  __syncthreads();
  stamps.stamp(ctx, kPhasePartialsSent);
  if (threadIdx.x == 0 && last_block_done<true>(&own->reduce_blocks_done[area]))
    for (int to = 0; to < num_ranks; ++to) ptx::store_release_sys(&signals_of(ctx, to)->partials_done[area][ctx.rank], epoch);
}

// Receive: wait for every owner's partials of this rank's tokens; per (token, chunk) add them in ascending
// owner order (only the owners of the token's experts) into y.
template <bool kClocked>
__device__ void add_partials(const Context& ctx, const CombineArgs& args, Chunking chunking, const AreaLayout& layout,
                             uint64_t epoch, PhaseStamps<kClocked>& stamps) {
  __shared__ bool arrived;
  const int num_ranks = ctx.num_ranks, num_topk = args.num_topk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t owner_rows = static_cast<int64_t>(ctx.num_experts / num_ranks) * layout.rows_per_expert;
  // The owners of a token's pairs (a bit per rank), from this rank's pair rows: the dispatch wrote them.
  auto owners_of = [&](int token) {
    const int32_t pair_row = lane < num_topk ? args.pair_rows[static_cast<int64_t>(token) * num_topk + lane] : -1;
    const bool valid = pair_row >= 0 && pair_row < owner_rows * num_ranks;  // a failed dispatch may have left any value
    return __reduce_or_sync(0xffffffffu, valid ? 1u << (pair_row / owner_rows) : 0u);
  };
  // A warp's first item's owners are read before the flag's wait, which hides that load (at decode sizes a warp
  // has one item).
  const int first_item = blockIdx.x * kWarps + warp, all_items = args.num_tokens * chunking.count;
  uint32_t owners = first_item < all_items ? owners_of(first_item / chunking.count) : 0u;
  if (threadIdx.x == 0)
    arrived = wait_for_peers(signals_of(ctx, ctx.rank)->partials_done[args.area], num_ranks, epoch, ctx.timeout_ns,
                             &ctx.mailbox->header, kStageLowLatencyPartials);
  __syncthreads();
  stamps.stamp(ctx, kPhasePartialsArrived);
  ptx::allow_next_kernel();  // past the last wait on a peer (kernels/common/launch.cuh says why only now)

  // After a timeout y stays unwritten (the host raises at its next check).
  const int num_items = arrived ? all_items : 0;
  for (int item = first_item; item < num_items; item += gridDim.x * kWarps) {
    const int token = item / chunking.count, chunk = item % chunking.count;
    const int first_unit = chunk * chunking.channels / 8;
    const int units = min(chunking.channels, ctx.hidden - chunk * chunking.channels) / 8;
    if (item != first_item) owners = owners_of(token);
    const int4* lane_source =
        lane < num_ranks && ((owners >> lane) & 1u) ? partial_of(ctx, ctx.rank, args.area, layout, lane, token) + first_unit
                                                    : nullptr;
    sum_rows<kSumGroup, kSumUnroll, false, true>(lane_source, 1.0f, 0, units,
                    reinterpret_cast<int4*>(args.y) + static_cast<int64_t>(token) * (ctx.hidden / 8) + first_unit, lane);
  }
  __syncthreads();
  stamps.stamp(ctx, kPhaseSummed);
}

// kSend and kReceive: the whole combine in one launch (synchronous calls); one of them: the owner sums now,
// the adding when the caller's hook asks. kClocked: stamps the phase clock.
template <bool kSend, bool kReceive, bool kClocked>
__global__ void __launch_bounds__(kThreads, 1) combine_owner_kernel(Context ctx, CombineArgs args, Chunking reduce_chunks,
                                                                    Chunking sum_chunks) {
  __shared__ PhaseStamps<kClocked> stamps;
  ptx::wait_for_previous_kernel();
  const AreaLayout layout = layout_of(ctx);
  const uint64_t epoch = epoch_of(signals_of(ctx, ctx.rank), args.area);
  if constexpr (kSend) {
    stamps.stamp(ctx, kPhaseCombineStart);
    send_partials(ctx, args, reduce_chunks, layout, epoch, stamps);
  }
  if constexpr (kReceive) add_partials(ctx, args, sum_chunks, layout, epoch, stamps);
  stamps.flush(ctx, args.area, epoch, kSend ? kPhaseCombineStart : kPhasePartialsArrived,
               kReceive ? kPhaseSummed : kPhasePartialsSent, 1u << kPhaseOutputsReady);
}

void check_context(const Context& ctx) {
  DC_CHECK_ARG(ctx.num_ranks >= 1 && ctx.num_ranks <= kMaxRanks,
               "num_ranks: the low-latency path supports 1 to " + std::to_string(kMaxRanks) + " ranks");
  DC_CHECK_ARG(ctx.rank >= 0 && ctx.rank < ctx.num_ranks, "rank: out of range");
  for (int r = 0; r < ctx.num_ranks; ++r) DC_CHECK_ARG(ctx.regions[r] != nullptr, "regions: a peer buffer is missing");
  DC_CHECK_ARG(ctx.mailbox != nullptr, "mailbox: null");
  DC_CHECK_ARG(ctx.num_experts > 0 && ctx.num_experts <= kMaxExperts && ctx.num_experts % ctx.num_ranks == 0,
               "num_experts: the low-latency path supports up to " + std::to_string(kMaxExperts) +
                   " experts, a multiple of the rank count");
  DC_CHECK_ARG(ctx.max_tokens > 0, "max_tokens: must be > 0");
  DC_CHECK_ARG(ctx.hidden > 0 && ctx.hidden % 8 == 0, "hidden: must be a positive multiple of 8");
  DC_CHECK_ARG(ctx.phase_clock == nullptr || ctx.phase_slots > 0, "phase_slots: must be > 0");
}

void check_area(int area) { DC_CHECK_ARG(area >= 0 && area < kNumAreas, "area: 0 or 1"); }

Launch launch_of(const Context& ctx) { return ctx.early_launch ? Launch::kEarly : Launch::kPlain; }

}  // namespace

bool can_launch_early(int device) {
  // The code this device runs (SASS built for it, or PTX compiled for it at load) waits for the kernel before
  // only if it was built for sm_90 or later: ptx.cuh's waits compile to nothing below.
  int current = 0;
  DC_CUDA_CHECK(cudaGetDevice(&current));
  if (cudaSetDevice(device) != cudaSuccess) {  // not early; the calls on that device say what is wrong
    (void)cudaGetLastError();
    return false;
  }
  cudaFuncAttributes attributes{};
  const cudaError_t status = cudaFuncGetAttributes(&attributes, combine_send_kernel);
  // No code for this device at all: not early; the first launch says why it cannot run.
  if (status != cudaSuccess) (void)cudaGetLastError();
  DC_CUDA_CHECK(cudaSetDevice(current));
  return status == cudaSuccess && attributes.ptxVersion >= 90;
}

int64_t dispatch_shared_bytes(int num_experts, int max_tokens) {
  return static_cast<int64_t>(num_experts) * ((max_tokens + 31) / 32) * 4;
}

namespace {

template <Payload kPayload>
void launch_dispatch_phases(const Context& ctx, const DispatchArgs& args, Phases phases, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(args.num_blocks) * kWarps;
  const Chunking send_chunks = chunking_of(ctx.hidden, args.num_tokens, warps);
  // Sized for what this rank sends (the peers' token counts are known only on the GPU), kPlaceItemsPerWarp
  // bf16 items a warp: a staged row has 0 to K targets here, and smaller items even out the warps' shares.
  // An fp8 row is half the bytes: half as many items, so that each still moves as much per memory latency.
  const int64_t place_items = warps * kPlaceItemsPerWarp / (kPayload == Payload::kBf16 ? 1 : 2);
  const Chunking place_chunks = chunking_of(ctx.hidden, args.num_tokens * ctx.num_ranks, place_items);
  const int64_t shared_bytes = phases == Phases::kReceive ? 0 : dispatch_shared_bytes(ctx.num_experts, args.num_tokens);
  auto launch = [&](auto kernel) {
    // Past 48 KiB of shared memory in all (the kernel's static arrays count too) a launch needs the opt-in.
    if (shared_bytes > kDefaultSharedBytes - kStaticSharedBound) {
      cudaFuncAttributes attributes{};
      DC_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
      if (shared_bytes + static_cast<int64_t>(attributes.sharedSizeBytes) > kDefaultSharedBytes)
        DC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
    }
    launch_kernel(launch_of(ctx), kernel, args.num_blocks, kThreads, shared_bytes, stream, ctx, args, send_chunks, place_chunks);
  };
  switch (phases) {
    case Phases::kSend: launch(dispatch_kernel<kPayload, true, false>); break;
    case Phases::kReceive:
      args.with_weights ? launch(dispatch_kernel<kPayload, false, true, true>) : launch(dispatch_kernel<kPayload, false, true>);
      break;
    case Phases::kBoth:
      args.with_weights ? launch(dispatch_kernel<kPayload, true, true, true>) : launch(dispatch_kernel<kPayload, true, true>);
      break;
  }
}

}  // namespace

void launch_dispatch(const Context& ctx, const DispatchArgs& args, Phases phases, cudaStream_t stream) {
  check_context(ctx);
  check_area(args.area);
  DC_CHECK_ARG(args.num_blocks > 0, "num_sms: must be > 0");
  DC_CHECK_ARG(args.num_tokens >= 0 && args.num_tokens <= ctx.max_tokens,
               "x: more tokens than the low-latency buffer's max_tokens_per_rank");
  DC_CHECK_ARG(args.num_topk > 0 && args.num_topk <= kMaxTopk,
               "topk_idx: the low-latency path supports 1 to " + std::to_string(kMaxTopk) + " experts per token");
  DC_CHECK_ARG(args.payload == Payload::kBf16 || ctx.hidden % 128 == 0, "x: fp8 needs a hidden size that is a multiple of 128");
  DC_CHECK_ARG(!args.with_weights || args.num_tokens == 0 || args.topk_weights != nullptr, "topk_weights: null");
  switch (args.payload) {
    case Payload::kBf16: launch_dispatch_phases<Payload::kBf16>(ctx, args, phases, stream); break;
    case Payload::kFp8: launch_dispatch_phases<Payload::kFp8>(ctx, args, phases, stream); break;
    case Payload::kBf16ToFp8: launch_dispatch_phases<Payload::kBf16ToFp8>(ctx, args, phases, stream); break;
    case Payload::kBf16ToFp8Pow2: launch_dispatch_phases<Payload::kBf16ToFp8Pow2>(ctx, args, phases, stream); break;
  }
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_stage_outputs(const Context& ctx, int area, const void* outputs, const int32_t* recv_counts,
                          int num_blocks, cudaStream_t stream) {
  check_context(ctx);
  check_area(area);
  DC_CHECK_ARG(num_blocks > 0, "num_sms: must be > 0");
  launch_kernel(launch_of(ctx), stage_outputs_kernel, num_blocks, kThreads, 0, stream, ctx, area,
                static_cast<const int4*>(outputs), recv_counts);
  DC_CUDA_CHECK(cudaGetLastError());
}

namespace {

// Combine of a dispatch that carried the weights: sums at the owners, then the partials added.
void launch_owner_combine(const Context& ctx, const CombineArgs& args, Phases phases, cudaStream_t stream) {
  DC_CHECK_ARG(phases == Phases::kReceive || args.outputs != nullptr, "expert_out: null");
  const int64_t warps = static_cast<int64_t>(args.num_blocks) * kWarps;
  // The owner's entries are the peers' tokens (their count is known only on the GPU): sized as if each
  // sent as many as this rank, kPlaceItemsPerWarp items a warp as in the placing: an entry holds 0 to K of
  // the token's rows, and about one item a warp left the last block summing 3.5x as long as the first.
  const Chunking reduce_chunks =
      chunking_of(ctx.hidden, (args.num_tokens > 0 ? args.num_tokens : 1) * ctx.num_ranks, warps * kPlaceItemsPerWarp);
  const Chunking sum_chunks = chunking_of(ctx.hidden, args.num_tokens, warps);
  auto launch = [&](auto clocked_kernel, auto plain_kernel) {
    auto kernel = ctx.phase_clock != nullptr ? clocked_kernel : plain_kernel;
    launch_kernel(launch_of(ctx), kernel, args.num_blocks, kThreads, 0, stream, ctx, args, reduce_chunks, sum_chunks);
  };
  switch (phases) {
    case Phases::kSend: launch(combine_owner_kernel<true, false, true>, combine_owner_kernel<true, false, false>); break;
    case Phases::kReceive: launch(combine_owner_kernel<false, true, true>, combine_owner_kernel<false, true, false>); break;
    case Phases::kBoth: launch(combine_owner_kernel<true, true, true>, combine_owner_kernel<true, true, false>); break;
  }
}

}  // namespace

void launch_combine(const Context& ctx, const CombineArgs& args, Phases phases, cudaStream_t stream) {
  check_context(ctx);
  check_area(args.area);
  // Every launch takes blocks but the pull's send (one thread raising its flag).
  DC_CHECK_ARG(args.num_blocks > 0 || (phases == Phases::kSend && !args.owner_sums), "num_sms: must be > 0");
  DC_CHECK_ARG(args.num_tokens >= 0 && args.num_tokens <= ctx.max_tokens, "handle: token count out of range");
  DC_CHECK_ARG(args.num_topk > 0 && args.num_topk <= kMaxTopk, "handle: 1 to 16 experts per token");
  DC_CHECK_ARG(phases == Phases::kSend || args.num_tokens == 0 || args.y != nullptr, "y: null");
  DC_CHECK_ARG(args.owner_sums || args.num_tokens == 0 || args.topk_weights != nullptr, "topk_weights: null");
  if (args.owner_sums) {
    launch_owner_combine(ctx, args, phases, stream);
  } else if (phases == Phases::kSend) {
    launch_kernel(launch_of(ctx), combine_send_kernel, 1, 1, 0, stream, ctx, args.area);
  } else {
    const Chunking chunking = chunking_of(ctx.hidden, args.num_tokens, static_cast<int64_t>(args.num_blocks) * kWarps);
    const bool publish = phases == Phases::kBoth, clocked = ctx.phase_clock != nullptr;
    auto kernel = publish ? (clocked ? combine_recv_kernel<true, true> : combine_recv_kernel<true, false>)
                          : (clocked ? combine_recv_kernel<false, true> : combine_recv_kernel<false, false>);
    launch_kernel(launch_of(ctx), kernel, args.num_blocks, kThreads, 0, stream, ctx, args, chunking);
  }
  DC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepcomm::low_latency
