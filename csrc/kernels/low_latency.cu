// Low-latency dispatch and combine (decode-size calls): no host wait, every
// flag an epoch kept on the device, so a call can be captured in a CUDA graph.
//
// Dispatch, send (num_blocks persistent blocks). Each block builds, in shared
// memory, one bit mask over this rank's tokens per expert (bit t: token t chose
// the expert). A pair's place among this rank's rows for its expert is the
// number of earlier tokens in that mask, so places follow token order no matter
// which warp gets there first. Block 0 publishes the popcounts (this rank's
// count per expert) in every rank's region and raises "counts_ready"; every
// block waits for every rank's counts and adds up the lower ranks' counts per
// expert: where this rank's rows for that expert start in the owner's packed
// rows. Then one warp per (token, chunk of the hidden size) reads the chunk
// once (quantising to fp8 on the way when asked) and writes it to the place of
// each of the token's experts in their owners' receive areas (a token that
// names one expert twice sends one row). The last block to finish raises
// "rows_done" in every rank and advances this rank's epoch for the area.
// The count exchange is the only wait: in return every row is written once, at
// its final place, and the received layout is the same in every run.
//
// Dispatch, receive (one thread): wait until every rank's rows_done carries the
// epoch. With a receive hook this runs when the caller asks, so no SM is held
// while the rows travel.
//
// Combine: the experts' bf16 outputs sit in the receive area, over their
// inputs. Send (one thread) raises "outputs_ready" in every rank; receive
// waits for every rank's, then one warp per (token, chunk) pulls the token's
// rows from their owners and sums weight * row over k in ascending order in
// float32, each product and sum rounded on its own, a missing pair adding
// +0.0 (deepcomm/pair_sum.py's order, so the reference path agrees bit for bit).
// Nobody waits for the pulls to end: a rank writes into an area again only in
// its next dispatch on that area, after every rank has published counts for
// it, which each does only after its combine on the area is done.
#include <cuda_runtime.h>

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
constexpr int kMinChunkBlocks = 4;   // 128-channel blocks per chunk at least (1 KiB of bf16)
constexpr int kDefaultSharedBytes = 48 * 1024;

// The hidden size in chunks of whole 128-channel blocks, so that a decode-size call (few tokens)
// still gives every warp work; a chunk never splits an fp8 scale block.
struct Chunking {
  int count;
  int channels;
};

Chunking chunking_of(int hidden, int num_tokens, int num_blocks) {
  if (hidden % 128 != 0 || num_tokens == 0) return {1, hidden};
  const int blocks = hidden / 128;
  const int64_t warps = static_cast<int64_t>(num_blocks) * kWarps;
  int64_t wanted = (warps + num_tokens - 1) / num_tokens;
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

// ------------------------------------------------------------ dispatch

template <Payload kPayload>
__global__ void __launch_bounds__(kThreads, 1) dispatch_send_kernel(Context ctx, DispatchArgs args, Chunking chunking) {
  constexpr bool kQuantize = kPayload == Payload::kBf16ToFp8 || kPayload == Payload::kBf16ToFp8Pow2;
  constexpr bool kHasScales = kPayload != Payload::kBf16;
  constexpr int kSourceBytesPerChannel = kPayload == Payload::kBf16 || kQuantize ? 2 : 1;
  constexpr int kRecvBytesPerChannel = kPayload == Payload::kBf16 ? 2 : 1;
  extern __shared__ uint32_t shared[];
  __shared__ uint64_t epoch;
  __shared__ int invalid_ids;
  __shared__ bool counts_here;

  const int num_experts = ctx.num_experts, num_ranks = ctx.num_ranks, rank = ctx.rank;
  const int local_experts = num_experts / num_ranks;
  const int num_tokens = args.num_tokens, num_topk = args.num_topk, area = args.area;
  const int words = (num_tokens + 31) / 32;
  uint32_t* masks = shared;                                                  // [E][words]
  int32_t* row_base = reinterpret_cast<int32_t*>(masks + num_experts * words);  // [E]
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
  __syncthreads();

  if (blockIdx.x == 0) {
    // An invalid id is skipped (it names no owner) and reported; the host raises at its next check.
    if (threadIdx.x == 0 && invalid_ids)
      report_error(&ctx.mailbox->header, kErrorInvalidIds, kStageLowLatencyCounts, rank);
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      int32_t count = 0;
      for (int w = 0; w < words; ++w) count += __popc(masks[e * words + w]);
      for (int dst = 0; dst < num_ranks; ++dst) signals_of(ctx, dst)->counts[area][rank][e] = count;
    }
    for (int dst = threadIdx.x; dst < num_ranks; dst += blockDim.x) signals_of(ctx, dst)->tokens[area][rank] = num_tokens;
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence_system();
      for (int dst = 0; dst < num_ranks; ++dst)
        ptx::store_release_sys(&signals_of(ctx, dst)->counts_ready[area][rank], epoch);
    }
  }
  if (threadIdx.x == 0)
    counts_here = wait_for_peers(own->counts_ready[area], num_ranks, epoch, ctx.timeout_ns, &ctx.mailbox->header,
                                 kStageLowLatencyCounts);
  __syncthreads();

  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    int32_t base = 0;
    for (int src = 0; src < rank; ++src) base += *reinterpret_cast<volatile int32_t*>(&own->counts[area][src][e]);
    row_base[e] = base;
  }
  if (blockIdx.x == 0) {
    for (int e = threadIdx.x; e < local_experts; e += blockDim.x) {
      int32_t total = 0;
      for (int src = 0; src < num_ranks; ++src)
        total += *reinterpret_cast<volatile int32_t*>(&own->counts[area][src][rank * local_experts + e]);
      args.recv_counts[e] = counts_here ? total : 0;
    }
  }
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int hidden = ctx.hidden;
  const int scale_cols = kHasScales ? hidden / 128 : 0;
  const int64_t rows_per_expert = layout.rows_per_expert;
  const int num_items = counts_here ? num_tokens * chunking.count : 0;
  for (int item = blockIdx.x * kWarps + warp; item < num_items; item += gridDim.x * kWarps) {
    const int token = item / chunking.count, chunk = item % chunking.count;
    const int first_channel = chunk * chunking.channels;
    const int channels = min(chunking.channels, hidden - first_channel);

    // Lane k: pair (token, k) and its place. Its chunk goes straight there when the expert is this rank's
    // (once per expert: a lower lane naming the same expert writes it); a peer's experts get the chunk once per
    // peer, in its staging row, from the lowest lane bound there.
    const int64_t expert = lane < num_topk ? args.topk_idx[static_cast<int64_t>(token) * num_topk + lane] : -1;
    const bool valid = expert >= 0 && expert < num_experts;
    const int dst = valid ? static_cast<int>(expert / local_experts) : -1;
    const uint32_t lower = (1u << lane) - 1u;
    const bool first_of_expert =
        (__match_any_sync(0xffffffffu, valid ? static_cast<unsigned long long>(expert) : num_experts + lane) & lower) == 0;
    const bool first_of_rank = (__match_any_sync(0xffffffffu, valid ? dst : num_ranks + lane) & lower) == 0;
    uint8_t* x_target = nullptr;
    float* scale_target = nullptr;
    int32_t row = -1;
    int64_t local_row = -1;
    if (valid) {
      const uint32_t* mask = masks + expert * words;
      int32_t earlier = __popc(mask[token / 32] & ((1u << (token % 32)) - 1u));
      for (int w = 0; w < token / 32; ++w) earlier += __popc(mask[w]);
      row = row_base[expert] + earlier;
      local_row = (expert % local_experts) * rows_per_expert + row;
      uint8_t* owner_area = area_of(ctx, dst, area, layout);
      if (dst == rank && first_of_expert) {
        x_target = owner_area + (local_row * hidden + first_channel) * kRecvBytesPerChannel;
        if constexpr (kHasScales)
          scale_target = reinterpret_cast<float*>(owner_area + layout.scales) + local_row * scale_cols + first_channel / 128;
      } else if (dst != rank && first_of_rank) {
        const int64_t staged_row = static_cast<int64_t>(rank) * ctx.max_tokens + token;
        x_target = owner_area + layout.staged + (staged_row * hidden + first_channel) * kRecvBytesPerChannel;
        if constexpr (kHasScales)
          scale_target = reinterpret_cast<float*>(owner_area + layout.staged_scales) + staged_row * scale_cols + first_channel / 128;
      }
    }
    if (chunk == 0) {
      if (lane < num_topk)
        args.pair_rows[static_cast<int64_t>(token) * num_topk + lane] = valid ? static_cast<int32_t>(expert * rows_per_expert + row) : -1;
      // Each peer bound for gets the token's staging tag: this call's epoch, then where each k goes (-1: elsewhere).
      uint32_t peers = __ballot_sync(0xffffffffu, valid && dst != rank && first_of_rank);
      while (peers) {
        const int peer = __shfl_sync(0xffffffffu, dst, __ffs(peers) - 1);
        peers &= peers - 1;
        int32_t* tag = reinterpret_cast<int32_t*>(area_of(ctx, peer, area, layout) + layout.staging_tags) +
                       (static_cast<int64_t>(rank) * ctx.max_tokens + token) * kTagInts;
        if (lane < kMaxTopk) tag[1 + lane] = dst == peer && first_of_expert ? static_cast<int32_t>(local_row) : -1;
        if (lane == 0) tag[0] = static_cast<int32_t>(epoch);
      }
    }

    const int4* source = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(args.x) +
                                                       (static_cast<int64_t>(token) * hidden + first_channel) * kSourceBytesPerChannel);
    for (int group = 0; group < num_topk; group += kTargetGroup) {
      uint8_t* x_targets[kTargetGroup];
      float* scale_targets[kTargetGroup];
#pragma unroll
      for (int j = 0; j < kTargetGroup; ++j) {
        x_targets[j] = reinterpret_cast<uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(x_target), group + j));
        scale_targets[j] = reinterpret_cast<float*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(scale_target), group + j));
      }
      if constexpr (kQuantize) {
        rows::quantize_row<kPayload == Payload::kBf16ToFp8Pow2>(source, channels, x_targets, scale_targets, lane);
      } else {
        rows::PendingScales<> scales;
        if constexpr (kPayload == Payload::kFp8)
          scales.load(args.x_scales + static_cast<int64_t>(token) * scale_cols + first_channel / 128, channels / 128, lane);
        rows::copy_row(source, channels * kSourceBytesPerChannel / 16, x_targets, lane);
        if constexpr (kPayload == Payload::kFp8) scales.store(scale_targets, lane);
      }
    }
  }

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (atomicAdd(&own->blocks_done[area], 1u) + 1u == gridDim.x) {
      // Every block has read the old epoch and written its rows.
      own->blocks_done[area] = 0;
      own->epoch[area] = epoch;
      __threadfence_system();
      for (int dst = 0; dst < num_ranks; ++dst) ptx::store_release_sys(&signals_of(ctx, dst)->rows_done[area][rank], epoch);
    }
  }
}

// Waits for every rank's rows, then copies each row a peer staged here to its places (local copies:
// the row crossed once, however many of this rank's experts it goes to). kFp8: rows of hidden bytes
// plus scales, else bf16 rows.
template <bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) dispatch_recv_kernel(Context ctx, int area, Chunking chunking) {
  __shared__ bool arrived;
  __shared__ int first_item[kMaxRanks + 1];  // items of the staged rows of each peer, back to back
  SignalRegion* own = signals_of(ctx, ctx.rank);
  const uint64_t epoch = epoch_of(own, area);
  if (threadIdx.x == 0) {
    arrived = wait_for_peers(own->rows_done[area], ctx.num_ranks, epoch, ctx.timeout_ns, &ctx.mailbox->header,
                             kStageLowLatencyRows);
    first_item[0] = 0;
    for (int src = 0; src < ctx.num_ranks; ++src) {
      const int tokens = src == ctx.rank ? 0 : *reinterpret_cast<volatile int32_t*>(&own->tokens[area][src]);
      first_item[src + 1] = first_item[src] + tokens * chunking.count;
    }
  }
  __syncthreads();
  if (!arrived) return;

  constexpr int kBytesPerChannel = kFp8 ? 1 : 2;
  const AreaLayout layout = layout_of(ctx);
  uint8_t* own_area = area_of(ctx, ctx.rank, area, layout);
  const int hidden = ctx.hidden, scale_cols = kFp8 ? hidden / 128 : 0;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int item = blockIdx.x * kWarps + warp; item < first_item[ctx.num_ranks]; item += gridDim.x * kWarps) {
    int src = 0;
    while (item >= first_item[src + 1]) ++src;
    const int token = (item - first_item[src]) / chunking.count, chunk = (item - first_item[src]) % chunking.count;
    const int64_t staged_row = static_cast<int64_t>(src) * ctx.max_tokens + token;
    const int32_t* tag = reinterpret_cast<const int32_t*>(own_area + layout.staging_tags) + staged_row * kTagInts;
    // A tag of another epoch: the row was staged by an earlier call (this one sent the token elsewhere).
    if (__shfl_sync(0xffffffffu, lane == 0 ? *reinterpret_cast<const volatile int32_t*>(tag) : 0, 0) !=
        static_cast<int32_t>(epoch))
      continue;
    const int32_t place = lane < kMaxTopk ? *reinterpret_cast<const volatile int32_t*>(tag + 1 + lane) : -1;
    const int first_channel = chunk * chunking.channels;
    const int channels = min(chunking.channels, hidden - first_channel);
    uint8_t* x_target = place >= 0 ? own_area + (static_cast<int64_t>(place) * hidden + first_channel) * kBytesPerChannel : nullptr;
    float* scale_target = nullptr;
    if (kFp8 && place >= 0)
      scale_target = reinterpret_cast<float*>(own_area + layout.scales) + static_cast<int64_t>(place) * scale_cols + first_channel / 128;
    const int4* source = reinterpret_cast<const int4*>(own_area + layout.staged + (staged_row * hidden + first_channel) * kBytesPerChannel);
    for (int group = 0; group < kMaxTopk; group += kTargetGroup) {
      uint8_t* x_targets[kTargetGroup];
      float* scale_targets[kTargetGroup];
#pragma unroll
      for (int j = 0; j < kTargetGroup; ++j) {
        x_targets[j] = reinterpret_cast<uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(x_target), group + j));
        scale_targets[j] = reinterpret_cast<float*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(scale_target), group + j));
      }
      if (__ballot_sync(0xffffffffu, place >= 0 && lane >= group && lane < group + kTargetGroup) == 0) continue;
      rows::PendingScales<true> scales;
      if constexpr (kFp8)
        scales.load(reinterpret_cast<const float*>(own_area + layout.staged_scales) + staged_row * scale_cols + first_channel / 128,
                    channels / 128, lane);
      rows::copy_row<kTargetGroup, true>(source, channels * kBytesPerChannel / 16, x_targets, lane);
      if constexpr (kFp8) scales.store(scale_targets, lane);
    }
  }
}

// -------------------------------------------------------------- combine

__global__ void combine_send_kernel(Context ctx, int area) {
  const uint64_t epoch = epoch_of(signals_of(ctx, ctx.rank), area);
  __threadfence_system();  // the experts' outputs (earlier kernels) before the flag, for every GPU
  for (int dst = 0; dst < ctx.num_ranks; ++dst)
    ptx::store_release_sys(&signals_of(ctx, dst)->outputs_ready[area][ctx.rank], epoch);
}

// Expert outputs computed elsewhere, copied into this rank's receive area where peers can pull them:
// only each local expert's received rows, [0, count), one warp per row.
__global__ void __launch_bounds__(kThreads, 1) stage_outputs_kernel(Context ctx, int area, const int4* outputs,
                                                                    const int32_t* recv_counts) {
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

__global__ void __launch_bounds__(kThreads, 1) combine_recv_kernel(Context ctx, CombineArgs args, Chunking chunking) {
  __shared__ bool ready;
  SignalRegion* own = signals_of(ctx, ctx.rank);
  if (threadIdx.x == 0)
    ready = wait_for_peers(own->outputs_ready[args.area], ctx.num_ranks, epoch_of(own, args.area), ctx.timeout_ns,
                           &ctx.mailbox->header, kStageLowLatencyOutputs);
  __syncthreads();
  if (!ready) return;  // y stays unwritten; the host raises at its next check

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

    for (int base = lane; base < units; base += 32 * kCombineUnroll) {
      float acc[kCombineUnroll][8];
      for (int group = 0; group < num_topk; group += kTargetGroup) {
        const int4* sources[kTargetGroup];
        float weights[kTargetGroup];
#pragma unroll
        for (int j = 0; j < kTargetGroup; ++j) {
          sources[j] = reinterpret_cast<const int4*>(
              __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_source), group + j));
          weights[j] = __shfl_sync(0xffffffffu, weight, group + j);
        }
        // Every source's units are loaded before any is summed: the loads in flight set the rate.
        int4 loaded[kTargetGroup][kCombineUnroll];
#pragma unroll
        for (int j = 0; j < kTargetGroup; ++j)
#pragma unroll
          for (int u = 0; u < kCombineUnroll; ++u)
            if (sources[j] != nullptr && base + u * 32 < units) loaded[j][u] = ptx::load_cg(sources[j] + base + u * 32);
#pragma unroll
        for (int j = 0; j < kTargetGroup; ++j) {
          if (group + j >= num_topk) break;
#pragma unroll
          for (int u = 0; u < kCombineUnroll; ++u) {
            float term[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (sources[j] != nullptr && base + u * 32 < units) {
              rows::unpack_bf16x8(loaded[j][u], term);
#pragma unroll
              for (int i = 0; i < 8; ++i) term[i] = __fmul_rn(term[i], weights[j]);
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[u][i] = group + j == 0 ? term[i] : __fadd_rn(acc[u][i], term[i]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u)
        if (base + u * 32 < units) out[base + u * 32] = rows::pack_bf16x8(acc[u]);
    }
  }
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
}

void check_area(int area) { DC_CHECK_ARG(area >= 0 && area < kNumAreas, "area: 0 or 1"); }

}  // namespace

int64_t dispatch_shared_bytes(int num_experts, int max_tokens) {
  return static_cast<int64_t>(num_experts) * ((max_tokens + 31) / 32) * 4 + static_cast<int64_t>(num_experts) * 4;
}

void launch_dispatch_send(const Context& ctx, const DispatchArgs& args, cudaStream_t stream) {
  check_context(ctx);
  check_area(args.area);
  DC_CHECK_ARG(args.num_blocks > 0, "num_sms: must be > 0");
  DC_CHECK_ARG(args.num_tokens >= 0 && args.num_tokens <= ctx.max_tokens,
               "x: more tokens than the low-latency buffer's max_tokens_per_rank");
  DC_CHECK_ARG(args.num_topk > 0 && args.num_topk <= kMaxTopk,
               "topk_idx: the low-latency path supports 1 to " + std::to_string(kMaxTopk) + " experts per token");
  DC_CHECK_ARG(args.payload == Payload::kBf16 || ctx.hidden % 128 == 0, "x: fp8 needs a hidden size that is a multiple of 128");
  const Chunking chunking = chunking_of(ctx.hidden, args.num_tokens, args.num_blocks);
  const int64_t shared_bytes = dispatch_shared_bytes(ctx.num_experts, args.num_tokens);
  auto launch = [&](auto kernel) {
    if (shared_bytes > kDefaultSharedBytes)
      DC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
    kernel<<<args.num_blocks, kThreads, shared_bytes, stream>>>(ctx, args, chunking);
  };
  switch (args.payload) {
    case Payload::kBf16: launch(dispatch_send_kernel<Payload::kBf16>); break;
    case Payload::kFp8: launch(dispatch_send_kernel<Payload::kFp8>); break;
    case Payload::kBf16ToFp8: launch(dispatch_send_kernel<Payload::kBf16ToFp8>); break;
    case Payload::kBf16ToFp8Pow2: launch(dispatch_send_kernel<Payload::kBf16ToFp8Pow2>); break;
  }
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_dispatch_recv(const Context& ctx, int area, Payload payload, int num_tokens, int num_blocks,
                          cudaStream_t stream) {
  check_context(ctx);
  check_area(area);
  DC_CHECK_ARG(num_blocks > 0, "num_sms: must be > 0");
  // Sized for what this rank sends (the peers' token counts are known only on the GPU).
  const Chunking chunking = chunking_of(ctx.hidden, num_tokens * (ctx.num_ranks - 1), num_blocks);
  if (payload == Payload::kBf16) dispatch_recv_kernel<false><<<num_blocks, kThreads, 0, stream>>>(ctx, area, chunking);
  else dispatch_recv_kernel<true><<<num_blocks, kThreads, 0, stream>>>(ctx, area, chunking);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_combine_send(const Context& ctx, int area, cudaStream_t stream) {
  check_context(ctx);
  check_area(area);
  combine_send_kernel<<<1, 1, 0, stream>>>(ctx, area);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_stage_outputs(const Context& ctx, int area, const void* outputs, const int32_t* recv_counts,
                          int num_blocks, cudaStream_t stream) {
  check_context(ctx);
  check_area(area);
  DC_CHECK_ARG(num_blocks > 0, "num_sms: must be > 0");
  stage_outputs_kernel<<<num_blocks, kThreads, 0, stream>>>(ctx, area, static_cast<const int4*>(outputs), recv_counts);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_combine_recv(const Context& ctx, const CombineArgs& args, cudaStream_t stream) {
  check_context(ctx);
  check_area(args.area);
  DC_CHECK_ARG(args.num_blocks > 0, "num_sms: must be > 0");
  DC_CHECK_ARG(args.num_tokens >= 0 && args.num_tokens <= ctx.max_tokens, "handle: token count out of range");
  DC_CHECK_ARG(args.num_topk > 0 && args.num_topk <= kMaxTopk, "topk_weights: 1 to 16 experts per token");
  combine_recv_kernel<<<args.num_blocks, kThreads, 0, stream>>>(ctx, args, chunking_of(ctx.hidden, args.num_tokens, args.num_blocks));
  DC_CUDA_CHECK(cudaGetLastError());
}

}  // namespace deepcomm::low_latency
