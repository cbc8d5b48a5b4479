// Intranode dispatch and combine (normal mode) among the ranks of one node.
//
// Notify (one block): each rank publishes, in its own SignalRegion, how many
// tokens it sends to every rank and expert, raises its "arrived" flag in every
// peer, waits for all peers' flags, then reads the full [src][dst] token
// matrix. From it: send_base[dst] = rows that lower ranks send to dst (where
// this rank's rows start in dst's slot), recv_totals[dst] = rows dst receives
// (dst's slot layout), and this rank's per-local-expert counts. The matrix also
// goes to the host mailbox so the host can size the outputs after one wait.
// A dispatch that reuses a handle's routing (DeepEP's "cached" mode) runs only
// the meeting: the handle holds send_base, recv_totals and the counts already,
// and the meeting is what keeps a rank from writing into a slot its owner may
// still read. Every rank publishes which call's routing it reuses (0: none);
// if they differ, nobody dispatches and every rank reports it.
//
// Dispatch (num_blocks persistent blocks, one warp per token, grid-stride):
// a warp reads its token's row once (16-byte loads, a few in flight per lane)
// and stores it straight to its final row in every destination rank's recv
// slot: row send_base[dst] + send_pos[token][dst], so received rows end up
// ordered by source rank, then token: the reference order. The same warp
// writes the row's local expert ids, weights and source index. With
// kBf16ToFp8* payloads the warp quantises each 128-channel block on the way
// (16 lanes per block, amax by shuffles) with deepcomm/fp8.py's exact formula.
// Each block, when done, adds 1 to its "dispatch_arrived" counter in every
// peer; block 0 then waits until every peer's blocks have arrived here, so the
// kernel ends only when this rank's slot is complete.
//
// Combine: a one-thread kernel publishes where this rank's [R, H] bf16 expert
// rows are and whether it pushes or pulls them, raises "combine_ready" in all
// peers and waits for theirs; then one warp per token of this rank gathers the
// token's row from each rank that received it (every source's units loaded
// before any is summed: the loads in flight set the rate), sums in float32 in
// ascending rank order starting from the first row, and writes the bf16 result
// once. Pull: the warp loads the rows from the peers' regions over NVLink;
// blocks finish with a "combine_done" count in every peer and block 0 waits for
// all peers, so no rank reuses a buffer another is still reading. Push: every
// rank's copy engines have written its rows for this rank into this rank's
// landing area, chunk by chunk (push_rows), and the warp waits for the chunks
// that hold its token's rows. Copy engines move more over NVLink than SM
// stores or loads (tools/peer_copy_rates.py: 385 against 341 and 328 GB/s on
// two H200s) and leave the SMs only the sums, so pushing wins when the combine
// gets few SMs; with 24 the pull was faster (docs/design.md). Pushing is
// opt-in, and small combines pull anyway: a copy costs microseconds to start.
#include "kernels/common/peer_wait.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/rows.cuh"
#include "kernels/intranode.h"
#include "runtime/error.h"

namespace deepcomm::intranode {

namespace {

constexpr int kThreads = 512;  // 16 warps: enough loads in flight per SM to approach copy bandwidth
constexpr int kWarps = kThreads / 32;
// Combine pulls rows: each lane keeps this many 16-byte loads in flight (spread over the sources a
// token can have, kRankBound, and the units of each). Over NVLink a round trip is about a
// microsecond, so the bytes in flight per warp, not the adds, set combine's rate.
constexpr int kCombineLoadsInFlight = 8;

__device__ __forceinline__ SignalRegion* signals_of(const Context& ctx, int rank) {
  return reinterpret_cast<SignalRegion*>(ctx.regions[rank]);
}

// End of a kernel that touched peers' memory: every block adds 1 to its counter (this rank's entry of
// `counter`) in every peer, then block 0 waits until every peer's blocks have counted here, so the
// kernel ends only when no peer still writes into or reads from this rank. Every thread calls this.
__device__ __forceinline__ void count_blocks_everywhere(const Context& ctx, uint64_t (SignalRegion::*counter)[kMaxRanks],
                                                        uint64_t expected, int64_t stage) {
  __syncthreads();
  if (threadIdx.x != 0) return;
  __threadfence_system();
  for (int peer = 0; peer < ctx.num_ranks; ++peer)
    ptx::add_release_sys(&(signals_of(ctx, peer)->*counter)[ctx.rank], 1);
  if (blockIdx.x == 0)
    wait_for_peers(signals_of(ctx, ctx.rank)->*counter, ctx.num_ranks, expected, ctx.timeout_ns, &ctx.mailbox->header,
                   stage);
}

__device__ __forceinline__ uint8_t* slot_of(const Context& ctx, int rank, int slot) {
  return ctx.regions[rank] + kDataOffset + static_cast<int64_t>(slot) * ctx.slot_bytes;
}

// ---------------------------------------------------------------- notify

__global__ void __launch_bounds__(kThreads, 1) notify_kernel(Context ctx, NotifyArgs args) {
  __shared__ int32_t matrix[kMaxRanks][kMaxRanks];
  __shared__ bool peers_arrived;
  const int parity = static_cast<int>(args.call & 1);
  const int num_ranks = ctx.num_ranks;
  SignalRegion* own = signals_of(ctx, ctx.rank);

  const bool reuses = args.reused_routing != 0;
  if (!reuses) {
    for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) own->tokens_to_rank[parity][i] = args.tokens_per_rank[i];
    if (threadIdx.x == 0) own->invalid_ids[parity] = *args.num_invalid;
    for (int i = threadIdx.x; i < args.num_experts; i += blockDim.x)
      own->tokens_to_expert[parity][i] = args.tokens_per_expert[i];
  }
  if (threadIdx.x == 0) {
    own->reused_routing[parity] = args.reused_routing;
    own->call_shape[parity] = args.call_shape;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    for (int peer = 0; peer < num_ranks; ++peer)
      ptx::store_release_sys(&signals_of(ctx, peer)->notify_arrived[ctx.rank], args.call);
    peers_arrived =
        wait_for_peers(own->notify_arrived, num_ranks, args.call, ctx.timeout_ns, &ctx.mailbox->header, kStageNotify);
    // A rank whose rows another shape would write them where this rank's layout does not read them (silent
    // garbage), or wait for blocks that never come: every rank sees the difference, and nobody dispatches.
    for (int peer = 0; peer < num_ranks && peers_arrived; ++peer) {
      const SignalRegion* theirs = signals_of(ctx, peer);
      if (*reinterpret_cast<const volatile uint64_t*>(&theirs->reused_routing[parity]) != args.reused_routing) {
        report_error(&ctx.mailbox->header, kErrorModeMismatch, kStageNotify, peer);
        peers_arrived = false;
      } else if (*reinterpret_cast<const volatile uint64_t*>(&theirs->call_shape[parity]) != args.call_shape) {
        report_error(&ctx.mailbox->header, kErrorShapeMismatch, kStageNotify, peer);
        peers_arrived = false;
      }
    }
  }
  __syncthreads();
  if (!peers_arrived || reuses) {
    // Dispatch is already queued behind this kernel: it writes nothing after a failed meeting, and
    // reuses the handle's routing after a good one.
    if (threadIdx.x == 0) {
      *args.abort_dispatch = peers_arrived ? 0 : kAbortFailedMeeting;
      if (peers_arrived) {
        __threadfence_system();
        *reinterpret_cast<volatile int64_t*>(&ctx.mailbox->header.notify_done) = static_cast<int64_t>(args.call);
      }
    }
    return;
  }

  // After this loop matrix[s][d] is the number of tokens rank s sends to rank d.
  for (int i = threadIdx.x; i < num_ranks * num_ranks; i += blockDim.x) {
    const int src = i / num_ranks, dst = i % num_ranks;
    const int32_t count = *reinterpret_cast<volatile int32_t*>(&signals_of(ctx, src)->tokens_to_rank[parity][dst]);
    matrix[src][dst] = count;
    ctx.mailbox->tokens_matrix[src][dst] = count;
  }
  if (threadIdx.x == 0) {
    int32_t any_invalid = 0;
    for (int src = 0; src < num_ranks; ++src) {
      const int32_t invalid = *reinterpret_cast<volatile int32_t*>(&signals_of(ctx, src)->invalid_ids[parity]);
      ctx.mailbox->invalid_ids[src] = invalid;
      any_invalid |= invalid;
    }
    *args.abort_dispatch = any_invalid != 0 ? kAbortInvalidIds : 0;
  }
  __syncthreads();
  for (int dst = threadIdx.x; dst < num_ranks; dst += blockDim.x) {
    int32_t before = 0, total = 0;
    for (int src = 0; src < num_ranks; ++src) {
      if (src < ctx.rank) before += matrix[src][dst];
      total += matrix[src][dst];
    }
    args.send_base[dst] = before;
    args.recv_totals[dst] = total;
  }
  const int experts_per_rank = args.num_experts / num_ranks;
  for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
    int32_t total = 0;
    for (int src = 0; src < num_ranks; ++src)
      total += *reinterpret_cast<volatile int32_t*>(
          &signals_of(ctx, src)->tokens_to_expert[parity][ctx.rank * experts_per_rank + e]);
    args.recv_tokens_per_expert[e] = total;
    ctx.mailbox->recv_tokens_per_expert[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    *reinterpret_cast<volatile int64_t*>(&ctx.mailbox->header.notify_done) = static_cast<int64_t>(args.call);
    __threadfence_system();
  }
}

// -------------------------------------------------------------- dispatch

// The ranks a token goes to (bit r of the result) and, for each, the row it
// occupies in that rank's slot: send_base[r] + send_pos[token][r]. Every lane
// of the warp gets both; lanes < num_ranks do the loads.
__device__ __forceinline__ uint32_t token_rows(const bool* is_token_in_rank, const int32_t* send_pos,
                                               const int32_t* send_base, int token, int num_ranks, int lane,
                                               int (&positions)[kMaxRanks]) {
  const int64_t entry = static_cast<int64_t>(token) * num_ranks + lane;
  const uint32_t mask = __ballot_sync(0xffffffffu, lane < num_ranks && is_token_in_rank[entry]);
  const int lane_position = lane < num_ranks ? send_base[lane] + send_pos[entry] : 0;
#pragma unroll
  for (int i = 0; i < kMaxRanks; ++i) positions[i] = __shfl_sync(0xffffffffu, lane_position, i);
  return mask;
}

struct DestinationRows {
  uint8_t* x;
  float* scales;
  int64_t* topk_idx;
  float* topk_weights;
  int64_t* src_idx;
};

template <Payload kPayload>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(Context ctx, DispatchArgs args) {
  constexpr bool kQuantize = kPayload == Payload::kBf16ToFp8 || kPayload == Payload::kBf16ToFp8Pow2;
  constexpr bool kHasScales = kPayload != Payload::kBf16;
  __shared__ DestinationRows dest_rows[kMaxRanks];
  if (*args.abort_dispatch == kAbortFailedMeeting) return;  // notify recorded why; nothing to write or count
  const int num_ranks = ctx.num_ranks;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t source_row_bytes = kPayload == Payload::kFp8 ? args.hidden : 2LL * args.hidden;
  const int64_t recv_row_bytes = kPayload == Payload::kBf16 ? 2LL * args.hidden : args.hidden;
  const int scale_cols = kHasScales ? args.hidden / 128 : 0;

  // Where each destination's fields start in its recv slot (its layout depends on its row count).
  // If any destination's rows would overflow its slot, nobody writes anything: every rank sees
  // the same counts, skips the same way, and the host raises after reading them.
  __shared__ int overflow;
  if (threadIdx.x == 0) overflow = 0;
  __syncthreads();
  for (int dst = threadIdx.x; dst < num_ranks; dst += blockDim.x) {
    uint8_t* slot = slot_of(ctx, dst, args.slot);
    const RecvLayout layout = recv_layout(args.recv_totals[dst], recv_row_bytes, scale_cols, args.num_topk);
    if (layout.total_bytes > ctx.slot_bytes) atomicOr(&overflow, 1);
    dest_rows[dst] = {slot + layout.x, reinterpret_cast<float*>(slot + layout.scales),
                      reinterpret_cast<int64_t*>(slot + layout.topk_idx),
                      reinterpret_cast<float*>(slot + layout.topk_weights),
                      reinterpret_cast<int64_t*>(slot + layout.src_idx)};
  }
  __syncthreads();
  const DestinationRows(&dests)[kMaxRanks] = dest_rows;
  // Invalid expert ids on any rank: nobody dispatches and every rank raises (the host reads why).
  const bool aborted = overflow || *args.abort_dispatch;
  const int num_tokens = aborted ? 0 : args.num_tokens;
  // The host skipped its wait and trusted a caller-given row count: if it is wrong (or the call
  // aborted), say so in the mailbox; the host raises at its next check.
  if (blockIdx.x == 0 && threadIdx.x == 0 && args.expected_recv >= 0) {
    if (*args.abort_dispatch == kAbortInvalidIds)
      report_error(&ctx.mailbox->header, kErrorInvalidIds, kStageDispatch, ctx.rank);
    else if (args.recv_totals[ctx.rank] != args.expected_recv)
      report_error(&ctx.mailbox->header, kErrorSizeMismatch, kStageDispatch, args.recv_totals[ctx.rank]);
  }

  for (int token = blockIdx.x * kWarps + warp; token < num_tokens; token += gridDim.x * kWarps) {
    int positions[kMaxRanks];
    const uint32_t mask = token_rows(args.is_token_in_rank, args.send_pos, args.send_base, token, num_ranks, lane,
                                     positions);

    uint8_t* x_targets[kMaxRanks];
    float* scale_targets[kMaxRanks];
#pragma unroll
    for (int dst = 0; dst < kMaxRanks; ++dst) {
      const bool to_dst = (mask >> dst) & 1u;
      x_targets[dst] = to_dst ? dests[dst].x + positions[dst] * recv_row_bytes : nullptr;
      scale_targets[dst] = to_dst ? dests[dst].scales + static_cast<int64_t>(positions[dst]) * scale_cols : nullptr;
    }
    // Every load of the token is issued before the first store that needs one: routing metadata
    // and scales travel under the row's loads instead of one memory latency each after it.
    const int64_t expert = lane < args.num_topk ? args.topk_idx[static_cast<int64_t>(token) * args.num_topk + lane] : -1;
    const float weight = lane < args.num_topk ? args.topk_weights[static_cast<int64_t>(token) * args.num_topk + lane] : 0.f;
    const int4* source = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(args.x) + token * source_row_bytes);
    if constexpr (kQuantize) {
      rows::quantize_row<kPayload == Payload::kBf16ToFp8Pow2>(source, args.hidden, x_targets, scale_targets, lane);
    } else {
      rows::PendingScales<> scales;
      if constexpr (kPayload == Payload::kFp8)
        scales.load(args.x_scales + static_cast<int64_t>(token) * scale_cols, scale_cols, lane);
      rows::copy_row(source, static_cast<int>(source_row_bytes / 16), x_targets, lane);
      if constexpr (kPayload == Payload::kFp8) scales.store(scale_targets, lane);
    }

    // Routing metadata, rewritten for each destination: local expert ids, -1 and weight 0 elsewhere.
    // Unrolled over ranks so positions[] stays in registers.
#pragma unroll
    for (int dst = 0; dst < kMaxRanks; ++dst) {
      if (!((mask >> dst) & 1u)) continue;
      if (lane < args.num_topk) {
        const bool local = expert >= 0 && expert / args.experts_per_rank == dst;
        const int64_t row = static_cast<int64_t>(positions[dst]) * args.num_topk + lane;
        dests[dst].topk_idx[row] = local ? expert - static_cast<int64_t>(dst) * args.experts_per_rank : -1;
        dests[dst].topk_weights[row] = local ? weight : 0.0f;
      }
      if (lane == 0) dests[dst].src_idx[positions[dst]] = token;
    }
  }

  count_blocks_everywhere(ctx, &SignalRegion::dispatch_arrived, args.arrivals_expected, kStageDispatch);
}

// --------------------------------------------------------------- combine

// One thread: publish where this rank's expert rows are and whether it pushes them, raise
// "combine_ready" in every peer, wait for every peer, and note their row offsets for combine_kernel.
// A kernel of its own so that while a peer is late one thread waits, not num_blocks blocks holding
// SMs that compute kernels could use. For a pushing rank it is also the landing area's all-clear:
// its combine before this one, on the same stream, has read every row peers pushed there.
__global__ void combine_ready_kernel(Context ctx, CombineArgs args) {
  const int parity = static_cast<int>(args.call & 1);
  const int32_t pushes = args.own_rows != nullptr;
  SignalRegion* own = signals_of(ctx, ctx.rank);
  own->combine_source_offset[parity] = args.source_offset;
  own->combine_pushes[parity] = pushes;
  __threadfence_system();
  for (int peer = 0; peer < ctx.num_ranks; ++peer)
    ptx::store_release_sys(&signals_of(ctx, peer)->combine_ready[ctx.rank], args.call);
  bool ready = wait_for_peers(own->combine_ready, ctx.num_ranks, args.call, ctx.timeout_ns, &ctx.mailbox->header,
                              kStageCombineReady);
  for (int peer = 0; ready && peer < ctx.num_ranks; ++peer) {
    if (*reinterpret_cast<volatile int32_t*>(&signals_of(ctx, peer)->combine_pushes[parity]) != pushes) {
      report_error(&ctx.mailbox->header, kErrorCombineModeMismatch, kStageCombineReady, peer);
      ready = false;
    }
  }
  for (int peer = 0; peer < ctx.num_ranks; ++peer)
    own->combine_peer_offset[peer] =
        ready ? *reinterpret_cast<volatile int64_t*>(&signals_of(ctx, peer)->combine_source_offset[parity]) : 0;
  own->combine_peers_ready = ready;
}

// Push: lane `src` (a peer whose row the token has) waits until the chunk holding that row has landed.
// `seen` keeps, per lane, the last count it read: tokens come in ascending order, so most need no read.
// False (and the mailbox says why) when a peer's chunk did not land in time.
__device__ __forceinline__ bool wait_landed(const Context& ctx, const Landing& landing, const int32_t* send_base,
                                            uint32_t mask, const int (&positions)[kMaxRanks], int lane,
                                            uint32_t& seen) {
  bool landed = true;
  if (lane < ctx.num_ranks && lane != ctx.rank && ((mask >> lane) & 1u)) {
    int position = 0;
#pragma unroll
    for (int i = 0; i < kMaxRanks; ++i) position = i == lane ? positions[i] : position;
    const uint32_t needed =
        landing.chunks_before[lane] + static_cast<uint32_t>((position - send_base[lane]) / landing.chunk_rows[lane]) + 1;
    // Counts wrap after 2^32 chunks: compare by difference.
    const auto covers = [needed](uint32_t count) { return static_cast<int32_t>(count - needed) >= 0; };
    if (!covers(seen))
      landed = wait_until(&signals_of(ctx, ctx.rank)->chunks_landed[lane],
                          [&seen, covers](uint32_t count) { return covers(seen = count); }, ctx.timeout_ns,
                          &ctx.mailbox->header, kStageCombineLanded, lane);
  }
  const bool all_landed = __all_sync(0xffffffffu, landed);
  // The other lanes read the rows this lane saw land: the warp barrier orders them after its acquire.
  __syncwarp();
  return all_landed;
}

// kRankBound >= num_ranks: a compile-time bound, so the loops over sources unroll into registers.
template <int kRankBound, bool kPushed>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(Context ctx, CombineArgs args) {
  constexpr int kUnroll = kCombineLoadsInFlight / kRankBound;  // units per source per step
  static_assert(kUnroll >= 1 && kUnroll * kRankBound == kCombineLoadsInFlight, "kRankBound must divide the loads");
  __shared__ const uint8_t* source_rows[kMaxRanks];
  __shared__ bool peers_ready;
  __shared__ int failed;  // push: a peer's rows did not land; every warp stops
  const int num_ranks = ctx.num_ranks;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  SignalRegion* own = signals_of(ctx, ctx.rank);
  const int64_t row_bytes = 2LL * args.hidden;

  // combine_ready_kernel ran just before on this stream: every peer is here (or one timed out).
  // Push: a peer's rows are in the landing area, from its first row there (less send_base[peer], which
  // positions[] include); this rank's own rows are where the caller has them.
  if (threadIdx.x < num_ranks) {
    const int src = threadIdx.x;
    if constexpr (kPushed)
      source_rows[src] = src == ctx.rank ? args.own_rows
                                         : ctx.regions[ctx.rank] + args.landing.offset +
                                               (args.landing.first_row[src] - args.send_base[src]) * row_bytes;
    else
      source_rows[src] = ctx.regions[src] + own->combine_peer_offset[src];
  }
  if (threadIdx.x == 0) {
    peers_ready = own->combine_peers_ready != 0;
    failed = 0;
  }
  __syncthreads();
  if (!peers_ready) return;

  const int num_units = static_cast<int>(row_bytes / 16);
  uint32_t seen = lane < kMaxRanks ? args.landing.chunks_before[lane] : 0;
  for (int token = blockIdx.x * kWarps + warp; token < args.num_tokens; token += gridDim.x * kWarps) {
    int positions[kMaxRanks];
    const uint32_t mask = token_rows(args.is_token_in_rank, args.send_pos, args.send_base, token, num_ranks, lane,
                                     positions);
    if constexpr (kPushed) {
      if (!wait_landed(ctx, args.landing, args.send_base, mask, positions, lane, seen)) failed = 1;
      if (*reinterpret_cast<volatile int*>(&failed)) break;
    }
    int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(args.y) + token * row_bytes);

    for (int base = lane; base < num_units; base += 32 * kUnroll) {
      // Every source's units are loaded before the first is summed: kCombineLoadsInFlight per lane.
      int4 loaded[kRankBound][kUnroll];
#pragma unroll
      for (int src = 0; src < kRankBound; ++src) {
        if (!((mask >> src) & 1u)) continue;
        const int4* row = reinterpret_cast<const int4*>(source_rows[src] + positions[src] * row_bytes);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (base + u * 32 < num_units) loaded[src][u] = ptx::load_cg(row + base + u * 32);
      }
      // Fixed order: ascending source rank, float32, starting from the first row.
      float sums[kUnroll][8];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int i = 0; i < 8; ++i) sums[u][i] = 0.0f;
      bool first = true;
#pragma unroll
      for (int src = 0; src < kRankBound; ++src) {
        if (!((mask >> src) & 1u)) continue;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (base + u * 32 >= num_units) continue;  // not loaded, not stored
          float values[8];
          rows::unpack_bf16x8(loaded[src][u], values);
#pragma unroll
          for (int i = 0; i < 8; ++i) sums[u][i] = first ? values[i] : sums[u][i] + values[i];
        }
        first = false;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int unit = base + u * 32;
        if (unit >= num_units) continue;
        out[unit] = rows::pack_bf16x8(sums[u]);
      }
    }
  }
  // A push reads no peer's memory: nobody waits for it to finish.
  if constexpr (!kPushed) count_blocks_everywhere(ctx, &SignalRegion::combine_done, args.done_expected, kStageCombineDone);
}

template <bool kPushed>
void launch_combine_kernel(const Context& ctx, const CombineArgs& args, cudaStream_t stream) {
  if (ctx.num_ranks <= 2) combine_kernel<2, kPushed><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args);
  else if (ctx.num_ranks <= 4) combine_kernel<4, kPushed><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args);
  else combine_kernel<kMaxRanks, kPushed><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args);
}

void check_context(const Context& ctx) {
  DC_CHECK_ARG(ctx.num_ranks >= 1 && ctx.num_ranks <= kMaxRanks,
               "num_ranks: the intranode path supports 1 to " + std::to_string(kMaxRanks) + " ranks");
  DC_CHECK_ARG(ctx.rank >= 0 && ctx.rank < ctx.num_ranks, "rank: out of range");
  for (int r = 0; r < ctx.num_ranks; ++r) DC_CHECK_ARG(ctx.regions[r] != nullptr, "regions: a peer buffer is missing");
  DC_CHECK_ARG(ctx.mailbox != nullptr, "mailbox: null");
}

}  // namespace

void launch_notify(const Context& ctx, const NotifyArgs& args, cudaStream_t stream) {
  check_context(ctx);
  DC_CHECK_ARG(args.reused_routing != 0 ||
                   (args.num_experts > 0 && args.num_experts <= kMaxExperts && args.num_experts % ctx.num_ranks == 0),
               "num_experts: the intranode path supports up to " + std::to_string(kMaxExperts) +
                   " experts, a multiple of the rank count");
  DC_CHECK_ARG(args.abort_dispatch != nullptr, "abort_dispatch: null");
  notify_kernel<<<1, kThreads, 0, stream>>>(ctx, args);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_dispatch(const Context& ctx, const DispatchArgs& args, cudaStream_t stream) {
  check_context(ctx);
  DC_CHECK_ARG(args.num_blocks > 0, "num_sms: must be > 0");
  DC_CHECK_ARG(args.num_topk > 0 && args.num_topk <= 32, "num_topk: the intranode path supports 1 to 32");
  DC_CHECK_ARG(args.slot >= 0 && args.slot < ctx.num_slots, "slot: out of range");
  switch (args.payload) {
    case Payload::kBf16: dispatch_kernel<Payload::kBf16><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args); break;
    case Payload::kFp8: dispatch_kernel<Payload::kFp8><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args); break;
    case Payload::kBf16ToFp8:
      dispatch_kernel<Payload::kBf16ToFp8><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args);
      break;
    case Payload::kBf16ToFp8Pow2:
      dispatch_kernel<Payload::kBf16ToFp8Pow2><<<args.num_blocks, kThreads, 0, stream>>>(ctx, args);
      break;
  }
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_combine_ready(const Context& ctx, const CombineArgs& args, cudaStream_t stream) {
  check_context(ctx);
  DC_CHECK_ARG(args.num_blocks > 0, "num_sms: must be > 0");
  for (int peer = 0; args.own_rows != nullptr && peer < ctx.num_ranks; ++peer)
    DC_CHECK_ARG(peer == ctx.rank || args.landing.chunk_rows[peer] > 0, "landing: chunk_rows must be > 0 for every peer");
  combine_ready_kernel<<<1, 1, 0, stream>>>(ctx, args);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_combine_sums(const Context& ctx, const CombineArgs& args, cudaStream_t stream) {
  if (args.own_rows != nullptr) launch_combine_kernel<true>(ctx, args, stream);
  else launch_combine_kernel<false>(ctx, args, stream);
  DC_CUDA_CHECK(cudaGetLastError());
}

void launch_combine(const Context& ctx, const CombineArgs& args, cudaStream_t stream) {
  DC_CHECK_ARG(args.own_rows == nullptr, "own_rows: a pushed combine goes through launch_pushed_combine");
  launch_combine_ready(ctx, args, stream);
  launch_combine_sums(ctx, args, stream);
}

}  // namespace deepcomm::intranode
