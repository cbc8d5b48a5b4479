// Internode (hierarchical) dispatch and combine, written once against the
// transport interface (transport.cuh) and instantiated per transport.
//
// Ranks: rank = node * L + local (L = ranks_per_node, N nodes). The partner of
// a rank on node n is the rank of n with the same local index.
//
// Notify (one block): every rank sends every rank, through the transport, its
// token counts per rank and node, its invalid-id count and its counts for the
// receiver's experts; waits for all W messages; derives where its rows start
// in every rank's recv slot (send_base), every rank's row total, and its
// per-expert counts. Messages are double-buffered by call parity.
//
// Dispatch, ceil(B/2) sender blocks and the rest forwarders, concurrently:
// - sender block c owns channel c, a contiguous token range. A warp per token
//   stages the row in shared memory with one bulk (TMA) load and writes it,
//   one bulk store per target issued by its own lane, (a) straight to its
//   final row in the recv slot of every rank of this node that holds one of
//   its experts (NVLink), and (b) once per other destination node, with its
//   routing and the final rows it takes on that node, into the area of the
//   partner there (the transport). Quantising payloads go through registers. After each chunk of 16 tokens the block puts the new
//   rows and adds their count to the partner's tail for (node, channel); the
//   final signal carries the channel's total.
// - forwarder blocks poll the tails of their (source node, channel) pairs,
//   round robin, and as rows land copy each to its final rows in this node's
//   recv slots (NVLink), recording those rows for combine (the forward map).
// Every block then counts itself done at every node peer; the kernel ends when
// all node peers' blocks are done: this rank's slot is complete.
//
// Combine: a one-thread kernel first meets the node peers (their expert rows
// are ready, and where they are); then ceil(B/2) home blocks and the rest
// gateways, concurrently:
// - gateway blocks: for every row forwarded in the dispatch, sum the expert
//   outputs of this node's ranks that received it (ascending rank, float32,
//   from the first row), round to bf16, and send the partial back to the
//   token's home rank (the partner on the source node), chunk by chunk, with
//   tails as in dispatch, a chunk of each of their (home node, channel) pairs
//   in turn. They first wait for the home ranks' credit: each has finished
//   reading the previous combine's partials.
// - home blocks: per token, in ascending node order, take this node's partial
//   (computed from node peers' rows over NVLink, rounded to bf16) or the
//   partial that arrived from the node's gateway, sum in float32 from the first
//   and round to bf16: the reference path's order, bit for bit. Warps take
//   tokens from per-channel counters, and gateways join once their partials
//   are out; the warp that reduces the last token resets the tails and gives
//   each gateway that sent here its credit.
#include "kernels/common/bulk.cuh"
#include "kernels/common/peer_wait.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/rows.cuh"
#include "kernels/internode.h"
#include "kernels/transport.cuh"
#include "runtime/error.h"

namespace deepcomm::internode {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTargets = kMaxLocalRanks + kMaxNodes;  // a sender's row goes to local ranks and remote nodes

template <typename Transport>
struct Context {
  Transport transport;
  TransportLayout layout;
  uint8_t* node_regions[kMaxLocalRanks];
  int rank, num_ranks, ranks_per_node, num_nodes, node, local;
  int num_slots;
  int64_t slot_bytes;
  int64_t max_tokens;
  int32_t* forward_rows;
  int32_t* forward_counts;
  int64_t* traffic;
  MailboxHeader* mailbox;
  HostMailbox* host;
  int64_t timeout_ns;
};

template <typename T>
__device__ __forceinline__ NodeSignals* node_signals(const Context<T>& ctx, int local) {
  return reinterpret_cast<NodeSignals*>(ctx.node_regions[local]);
}

template <typename T>
__device__ __forceinline__ uint8_t* slot_of(const Context<T>& ctx, int local, int slot) {
  return ctx.node_regions[local] + kNodeDataOffset + static_cast<int64_t>(slot) * ctx.slot_bytes;
}

template <typename T>
__device__ __forceinline__ uint64_t* local_signal(const Context<T>& ctx, int64_t offset) {
  return reinterpret_cast<uint64_t*>(ctx.transport.local(offset));
}

// Rows a channel may use in an area; channel c owns [c * rows, (c + 1) * rows).
__device__ __forceinline__ int64_t channel_rows(int64_t max_tokens, int channels) {
  return (max_tokens + channels - 1) / channels;
}

__device__ __forceinline__ int tokens_per_channel(int num_tokens, int channels) {
  const int per = (num_tokens + channels - 1) / channels;
  return per > 0 ? per : 1;
}

constexpr int64_t dispatch_tail_offset(int node, int channel) {
  return offsetof(TransportSignals, dispatch_tail) + (static_cast<int64_t>(node) * kMaxChannels + channel) * 8;
}
constexpr int64_t combine_tail_offset(int node, int channel) {
  return offsetof(TransportSignals, combine_tail) + (static_cast<int64_t>(node) * kMaxChannels + channel) * 8;
}
constexpr int64_t credit_offset(int node) { return offsetof(TransportSignals, combine_credit) + node * 8; }
constexpr int64_t notify_signal_offset(int rank) { return offsetof(TransportSignals, notify) + rank * 8; }

// The token's destination ranks as a 64-bit mask, and for any rank d the row
// the token takes in d's slot: lane j holds it for ranks j and j + 32.
struct TokenRoute {
  uint64_t ranks;
  int position_lo, position_hi;

  // Warp-collective; dst may differ per lane.
  __device__ __forceinline__ int position(int dst) const {
    const int lo = __shfl_sync(0xffffffffu, position_lo, dst & 31);
    const int hi = __shfl_sync(0xffffffffu, position_hi, dst & 31);
    return dst < 32 ? lo : hi;
  }
  __device__ __forceinline__ bool goes_to(int dst) const { return (ranks >> dst) & 1ull; }
};

__device__ __forceinline__ TokenRoute route_of(const bool* is_token_in_rank, const int32_t* send_pos,
                                               const int32_t* send_base, int token, int num_ranks, int lane,
                                               bool active) {
  TokenRoute route;
  const int64_t row = static_cast<int64_t>(token) * num_ranks;
  const bool has_lo = active && lane < num_ranks, has_hi = active && lane + 32 < num_ranks;
  // Positions are loaded with the flags, not after them: one memory latency per token, not two.
  const int position_lo = has_lo ? send_base[lane] + send_pos[row + lane] : -1;
  const int position_hi = has_hi ? send_base[lane + 32] + send_pos[row + lane + 32] : -1;
  const bool lo = has_lo && is_token_in_rank[row + lane];
  const bool hi = has_hi && is_token_in_rank[row + lane + 32];
  route.ranks = static_cast<uint64_t>(__ballot_sync(0xffffffffu, lo)) |
                (static_cast<uint64_t>(__ballot_sync(0xffffffffu, hi)) << 32);
  route.position_lo = lo ? position_lo : -1;
  route.position_hi = hi ? position_hi : -1;
  return route;
}

__device__ __forceinline__ uint32_t nodes_of(uint64_t ranks, int num_nodes, int ranks_per_node) {
  const uint64_t node_mask = (1ull << ranks_per_node) - 1;  // ranks_per_node <= 8
  uint32_t nodes = 0;
  for (int n = 0; n < num_nodes; ++n)
    if ((ranks >> (n * ranks_per_node)) & node_mask) nodes |= 1u << n;
  return nodes;
}

// Per-block byte counts, added to ctx.traffic once per block.
struct BlockTraffic {
  unsigned long long bytes[kNumTrafficCounters];
};

template <typename T>
__device__ __forceinline__ void flush_traffic(const Context<T>& ctx, BlockTraffic* traffic) {
  for (int i = threadIdx.x; i < kNumTrafficCounters; i += blockDim.x)
    if (traffic->bytes[i]) atomicAdd(reinterpret_cast<unsigned long long*>(ctx.traffic + i), traffic->bytes[i]);
}

// Every block counts itself done at each node peer; block 0 then waits for all
// node peers' blocks (cumulative counts, so no reset is needed).
template <typename T>
__device__ __forceinline__ void node_barrier(const Context<T>& ctx, size_t counter_offset, uint64_t expected,
                                             int64_t stage) {
  if (threadIdx.x != 0) return;
  __threadfence_system();
  for (int l = 0; l < ctx.ranks_per_node; ++l) {
    auto* counters = reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(node_signals(ctx, l)) + counter_offset);
    ptx::add_release_sys(counters + ctx.local, 1);
  }
  if (blockIdx.x == 0) {
    auto* own = reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(node_signals(ctx, ctx.local)) + counter_offset);
    wait_for_peers(own, ctx.ranks_per_node, expected, ctx.timeout_ns, ctx.mailbox, stage,
                   ctx.node * ctx.ranks_per_node);
  }
}

// ---------------------------------------------------------------- notify

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) notify_kernel(Context<T> ctx, NotifyArgs args) {
  __shared__ bool peers_arrived;
  const TransportLayout& tl = ctx.layout;
  const int W = ctx.num_ranks, N = ctx.num_nodes;
  const int parity = static_cast<int>(args.call & 1);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int experts_per_rank = args.num_experts / W;
  // Message: tokens per rank [W], per node [N], invalid ids, the call shape (low, high), tokens per expert.
  const int shape_at = W + N + 1, experts_at = W + N + 3;
  const int message_ints = experts_at + experts_per_rank;
  const int64_t message_bytes = tl.notify_ints * 4;
  auto received = [&](int src) {
    return reinterpret_cast<const volatile int32_t*>(
        ctx.transport.local(tl.notify_recv + (static_cast<int64_t>(parity) * W + src) * message_bytes));
  };

  for (int dst = warp; dst < W; dst += kWarps) {
    const int64_t remote = tl.notify_recv + (static_cast<int64_t>(parity) * W + ctx.rank) * message_bytes;
    const int64_t staging = tl.notify_staging + dst * message_bytes;
    int32_t* message = reinterpret_cast<int32_t*>(ctx.transport.window(dst, remote, staging));
    for (int i = lane; i < message_ints; i += 32) {
      int32_t value;
      if (i < W) value = args.tokens_per_rank[i];
      else if (i < W + N) value = args.tokens_per_node[i - W];
      else if (i == W + N) value = *args.num_invalid;
      else if (i < experts_at) value = static_cast<int32_t>(args.call_shape >> (32 * (i - shape_at)));
      else value = args.tokens_per_expert[dst * experts_per_rank + (i - experts_at)];
      message[i] = value;
    }
    __syncwarp();
    ctx.transport.put_signal_warp(dst, remote, staging, message_bytes, notify_signal_offset(ctx.rank),
                                  args.call, SignalOp::kSet, lane);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    ctx.transport.quiet();
    peers_arrived = wait_for_peers(local_signal(ctx, notify_signal_offset(0)), W, args.call, ctx.timeout_ns,
                                   ctx.mailbox, kStageNotify);
    // A rank of another call shape would send rows its receivers read at the wrong width (intranode notify).
    for (int src = 0; src < W && peers_arrived; ++src) {
      const uint64_t shape = static_cast<uint32_t>(received(src)[shape_at]) |
                             static_cast<uint64_t>(static_cast<uint32_t>(received(src)[shape_at + 1])) << 32;
      if (shape != args.call_shape) {
        report_error(ctx.mailbox, kErrorShapeMismatch, kStageNotify, src);
        peers_arrived = false;
      }
    }
  }
  __syncthreads();
  if (!peers_arrived) {
    if (threadIdx.x == 0) *args.abort_dispatch = kAbortFailedMeeting;
    return;
  }

  for (int dst = threadIdx.x; dst < W; dst += blockDim.x) {
    int32_t before = 0, total = 0;
    for (int src = 0; src < W; ++src) {
      const int32_t count = received(src)[dst];
      if (src < ctx.rank) before += count;
      total += count;
    }
    args.send_base[dst] = before;
    args.recv_totals[dst] = total;
    ctx.host->recv_totals[dst] = total;
    ctx.host->recv_from_rank[dst] = received(dst)[ctx.rank];
    ctx.host->invalid_ids[dst] = received(dst)[W + N];
  }
  for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
    int32_t total = 0;
    for (int src = 0; src < W; ++src) total += received(src)[experts_at + e];
    args.recv_tokens_per_expert[e] = total;
    ctx.host->recv_tokens_per_expert[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t any_invalid = 0;
    for (int src = 0; src < W; ++src) any_invalid |= received(src)[W + N];
    *args.abort_dispatch = any_invalid != 0 ? kAbortInvalidIds : 0;
    __threadfence_system();
    *reinterpret_cast<volatile int64_t*>(&ctx.mailbox->notify_done) = static_cast<int64_t>(args.call);
    __threadfence_system();
  }
}

// -------------------------------------------------------------- dispatch

struct SlotRows {
  uint8_t* x;
  float* scales;
  int64_t* topk_idx;
  float* topk_weights;
  int64_t* src_idx;
};

// Writes a token's routing metadata into a recv slot row: its expert ids made
// local to rank dst (-1 elsewhere, weight 0) and its source index. Lanes < K.
__device__ __forceinline__ void write_slot_meta(const SlotRows& dest, int64_t row, int dst, int64_t expert,
                                                float weight, int token, int num_topk, int experts_per_rank,
                                                int lane) {
  if (lane < num_topk) {
    const bool local = expert >= 0 && expert / experts_per_rank == dst;
    dest.topk_idx[row * num_topk + lane] = local ? expert - static_cast<int64_t>(dst) * experts_per_rank : -1;
    dest.topk_weights[row * num_topk + lane] = local ? weight : 0.0f;
  }
  if (lane == 0) dest.src_idx[row] = token;
}

template <typename T, Payload kPayload>
__device__ void send_channel(const Context<T>& ctx, const DispatchArgs& args, const SlotRows* dests,
                             const RowFormat& fmt, int channel, int channels, bulk::WarpStage& stage,
                             BlockTraffic* traffic) {
  constexpr bool kQuantize = kPayload == Payload::kBf16ToFp8 || kPayload == Payload::kBf16ToFp8Pow2;
  __shared__ int32_t running[kMaxNodes];           // rows of this channel already sent to each node
  __shared__ uint32_t chunk_nodes[2][kWarps];      // destination nodes of each warp's token, by chunk parity
  const TransportLayout& tl = ctx.layout;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int L = ctx.ranks_per_node, N = ctx.num_nodes, W = ctx.num_ranks;
  const int64_t source_row_bytes = kPayload == Payload::kFp8 ? args.hidden : 2LL * args.hidden;
  const int64_t slot_x_bytes = kPayload == Payload::kBf16 ? 2LL * args.hidden : args.hidden;
  const int scale_cols = kPayload == Payload::kBf16 ? 0 : args.hidden / 128;
  const int64_t rows_per_channel = channel_rows(ctx.max_tokens, channels);
  const int per_channel = tokens_per_channel(args.num_tokens, channels);
  const int first = channel * per_channel;
  const int last = min(args.num_tokens, first + per_channel);
  const int64_t slot_row = slot_row_bytes(slot_x_bytes, scale_cols, args.num_topk);

  for (int n = threadIdx.x; n < kMaxNodes; n += blockDim.x) running[n] = 0;
  __syncthreads();
  unsigned long long direct_rows = 0;

  int parity = 0;
  for (int chunk = first; chunk < last; chunk += kWarps, parity ^= 1) {
    const int token = chunk + warp;
    const bool active = token < last;
    const TokenRoute route = route_of(args.is_token_in_rank, args.send_pos, args.send_base, token, W, lane, active);
    const uint32_t nodes = nodes_of(route.ranks, N, L) & ~(1u << ctx.node);
    if (lane == 0) chunk_nodes[parity][warp] = nodes;
    __syncthreads();

    if (active) {
      // This token's row in each remote node's area: the rows earlier warps' tokens took first.
      int lane_row = -1;
      if (lane < N && ((nodes >> lane) & 1u)) {
        int before = running[lane];
        for (int w = 0; w < warp; ++w) before += (chunk_nodes[parity][w] >> lane) & 1u;
        lane_row = static_cast<int>(channel * rows_per_channel) + before;
      }
      if (lane < N) args.node_rows[static_cast<int64_t>(token) * N + lane] = lane_row;

      // Each lane holds one target: lanes l < L this node's rank l (its final row, NVLink), lane
      // kMaxLocalRanks + n the area row on remote node n (through the transport).
      const int local_dst = ctx.node * L + (lane < L ? lane : 0);
      const int position = route.position(local_dst);
      const int remote = lane - kMaxLocalRanks;
      const int area_row = __shfl_sync(0xffffffffu, lane_row, remote & 31);
      uint8_t* lane_target = nullptr;
      float* lane_scales = nullptr;
      if (lane < L && route.goes_to(local_dst)) {
        lane_target = dests[lane].x + position * slot_x_bytes;
        lane_scales = dests[lane].scales + static_cast<int64_t>(position) * scale_cols;
      } else if (remote >= 0 && remote < N && ((nodes >> remote) & 1u)) {
        const int64_t remote_offset =
            tl.dispatch_recv + (static_cast<int64_t>(ctx.node) * tl.area_rows + area_row) * fmt.stride;
        const int64_t staging =
            tl.dispatch_staging + (static_cast<int64_t>(remote) * tl.area_rows + area_row) * fmt.stride;
        lane_target = ctx.transport.window(remote * L + ctx.local, remote_offset, staging);
        lane_scales = reinterpret_cast<float*>(lane_target + fmt.scales);
      }

      // Every load of the token is issued before the first store that needs one: metadata and
      // scales travel under the row's load instead of one memory latency each after it.
      const int64_t expert = lane < args.num_topk ? args.topk_idx[static_cast<int64_t>(token) * args.num_topk + lane] : -1;
      const float weight = lane < args.num_topk ? args.topk_weights[static_cast<int64_t>(token) * args.num_topk + lane] : 0.f;
      const uint8_t* source = static_cast<const uint8_t*>(args.x) + token * source_row_bytes;
      if constexpr (kQuantize) {
        // Quantising reads bf16 and writes fp8 through registers: every lane needs every target.
        uint8_t* x_targets[kMaxTargets];
        float* scale_targets[kMaxTargets];
        rows::gather_from_lanes(lane_target, x_targets);
        rows::gather_from_lanes(lane_scales, scale_targets);
        rows::quantize_row<kPayload == Payload::kBf16ToFp8Pow2>(reinterpret_cast<const int4*>(source), args.hidden,
                                                                x_targets, scale_targets, lane);
      } else {
        rows::PendingScales<> scales;
        if constexpr (kPayload == Payload::kFp8)
          scales.load(args.x_scales + static_cast<int64_t>(token) * scale_cols, scale_cols, lane);
        stage.move(source, source_row_bytes, lane_target, lane);
        if constexpr (kPayload == Payload::kFp8) scales.store_to_lane_targets<kMaxTargets>(lane_scales, lane);
      }

      for (int l = 0; l < L; ++l) {
        const int dst = ctx.node * L + l;
        if (!route.goes_to(dst)) continue;
        write_slot_meta(dests[l], route.position(dst), dst, expert, weight, token, args.num_topk,
                        args.experts_per_rank, lane);
        ++direct_rows;
      }
      // Remote rows carry global expert ids and the final rows on their node.
#pragma unroll
      for (int n = 0; n < kMaxNodes; ++n) {
        uint8_t* row = reinterpret_cast<uint8_t*>(
            __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_target), kMaxLocalRanks + n));
        if (row == nullptr) continue;
        if (lane == 0) *reinterpret_cast<int32_t*>(row + fmt.meta) = token;
        const int dst = n * L + (lane < L ? lane : 0);
        const int position = route.position(dst);
        if (lane < L) reinterpret_cast<int32_t*>(row + fmt.dst_rows)[lane] = route.goes_to(dst) ? position : -1;
        if (lane < args.num_topk) {
          reinterpret_cast<int32_t*>(row + fmt.expert_ids)[lane] = static_cast<int32_t>(expert);
          reinterpret_cast<float*>(row + fmt.weights)[lane] = weight;
        }
      }
      // Remote rows go out with warp 0's signal after the barrier below: they must have landed.
      // (This node's rows are published by the end-of-kernel barrier, which waits for them.)
      if constexpr (!kQuantize)
        if (lane >= kMaxLocalRanks && lane_target != nullptr) bulk::WarpStage::complete_stores();
    }
    __syncthreads();

    // Warp 0 ships this chunk's rows to each node and advances the partner's tail.
    if (warp == 0) {
      for (int n = 0; n < N; ++n) {
        const bool took = lane < kWarps && ((chunk_nodes[parity][lane] >> n) & 1u);
        const int added = __popc(__ballot_sync(0xffffffffu, took));
        if (added == 0) continue;
        const int64_t area_row = channel * rows_per_channel + running[n];
        ctx.transport.put_signal_warp(
            n * L + ctx.local, tl.dispatch_recv + (static_cast<int64_t>(ctx.node) * tl.area_rows + area_row) * fmt.stride,
            tl.dispatch_staging + (static_cast<int64_t>(n) * tl.area_rows + area_row) * fmt.stride, added * fmt.stride,
            dispatch_tail_offset(ctx.node, channel), static_cast<uint64_t>(added), SignalOp::kAdd, lane);
        if (lane == 0) {
          running[n] += added;
          traffic->bytes[kDispatchBoundary] += static_cast<unsigned long long>(added) * fmt.stride;
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int n = 0; n < N; ++n)
      if (n != ctx.node)
        ctx.transport.signal(n * L + ctx.local, dispatch_tail_offset(ctx.node, channel), tail_final(running[n]),
                             SignalOp::kAdd);
    ctx.transport.quiet();
  }
  if (lane == 0 && direct_rows) atomicAdd(&traffic->bytes[kDispatchDirect], direct_rows * slot_row);
}

// The (other node, channel) pairs a forwarder or gateway block serves: pair p = block + k * blocks, so
// one block holds a channel of several nodes. A forwarder has at most 2 (N - 1) of them: C = ceil(B / 2)
// channels of N - 1 nodes over floor(B / 2) >= max(1, C - 1) blocks.
constexpr int kMaxForwardPairs = 2 * (kMaxNodes - 1);

__device__ __forceinline__ int pair_node(int pair, int channels, int own_node) {
  const int other = pair / channels;
  return other < own_node ? other : other + 1;
}

// Copies rows that arrive from every (source node, channel) pair of this forwarder block to their
// final rows on this node. The pairs fill at once (a sender ships each chunk to every node), so the
// block serves whichever has rows, round robin: taking them one after another would leave it
// waiting on the first pair's sender while the others' rows sit there.
template <typename T>
__device__ void forward_pairs(const Context<T>& ctx, const DispatchArgs& args, const SlotRows* dests,
                              const RowFormat& fmt, int channels, bulk::WarpStage& stage, BlockTraffic* traffic,
                              bool* failed) {
  __shared__ int64_t heads[kMaxForwardPairs], totals[kMaxForwardPairs];
  __shared__ int picked;             // pair with rows to copy, -1 when every pair is done
  __shared__ int64_t picked_rows;    // rows of that pair in so far
  const TransportLayout& tl = ctx.layout;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int L = ctx.ranks_per_node;
  const int forwarder = blockIdx.x - channels, forwarders = args.num_blocks - channels;
  const int pairs = (ctx.num_nodes - 1) * channels;
  const int mine = forwarder < pairs ? (pairs - forwarder + forwarders - 1) / forwarders : 0;
  const bool has_scales = args.payload != Payload::kBf16;
  const int64_t slot_x_bytes = has_scales ? args.hidden : 2LL * args.hidden;
  const int scale_cols = has_scales ? args.hidden / 128 : 0;
  const int64_t rows_per_channel = channel_rows(ctx.max_tokens, channels);
  const int64_t slot_row = slot_row_bytes(slot_x_bytes, scale_cols, args.num_topk);
  auto tail_of = [&](int k) {
    const int pair = forwarder + k * forwarders;
    return local_signal(ctx, dispatch_tail_offset(pair_node(pair, channels, ctx.node), pair % channels));
  };
  unsigned long long forwarded = 0;

  for (int k = threadIdx.x; k < mine; k += blockDim.x) heads[k] = 0, totals[k] = -1;
  int cursor = 0;  // thread 0: where the next round-robin scan starts
  while (true) {
    __syncthreads();
    if (threadIdx.x == 0) {
      picked = -1;
      const uint64_t start = ptx::global_timer_ns();
      bool open = true;
      while (picked < 0 && open) {
        open = false;
        for (int i = 0; i < mine; ++i) {
          const int k = (cursor + i) % mine;
          if (heads[k] == totals[k]) continue;  // every row of the pair is in and copied
          open = true;
          const uint64_t v = ptx::load_acquire_sys(tail_of(k));
          const int64_t count = static_cast<int64_t>(v & kTailCountMask), total = static_cast<int64_t>(v >> 32) - 1;
          if (count > heads[k] || count == total) {
            picked = k, picked_rows = count, totals[k] = total, cursor = k + 1;
            break;
          }
        }
        if (picked < 0 && open && static_cast<int64_t>(ptx::global_timer_ns() - start) > ctx.timeout_ns) {
          int k = 0;
          while (heads[k] == totals[k]) ++k;
          report_error(ctx.mailbox, kErrorTimeout, kStageForward,
                       pair_node(forwarder + k * forwarders, channels, ctx.node) * L + ctx.local);
          *failed = true;
          break;
        }
      }
    }
    __syncthreads();
    if (*failed || picked < 0) break;
    if (lane == 0) bulk::fence_proxy_global();  // rows a peer wrote (ordinary or bulk stores), seen through the acquire
    // Thread 0 rewrites the shared values only once every thread is past the next barrier.
    const int k = picked;
    const int64_t head = heads[k], rows_in = picked_rows;
    const int pair = forwarder + k * forwarders;
    const int source_node = pair_node(pair, channels, ctx.node), channel = pair % channels;
    int32_t* forward_rows = ctx.forward_rows +
        ((static_cast<int64_t>(args.slot) * ctx.num_nodes + source_node) * tl.area_rows) * L;
    for (int64_t i = head + warp; i < rows_in; i += kWarps) {
      const int64_t area_row = channel * rows_per_channel + i;
      const uint8_t* row =
          ctx.transport.local(tl.dispatch_recv + (static_cast<int64_t>(source_node) * tl.area_rows + area_row) * fmt.stride);
      // All of the row's small fields are loaded together, ahead of the payload copy (one latency).
      const int lane_dst_row = lane < L ? *reinterpret_cast<const volatile int32_t*>(row + fmt.dst_rows + 4 * lane) : -1;
      const int token = *reinterpret_cast<const volatile int32_t*>(row + fmt.meta);
      const int64_t expert =
          lane < args.num_topk ? *reinterpret_cast<const volatile int32_t*>(row + fmt.expert_ids + 4 * lane) : -1;
      const float weight =
          lane < args.num_topk ? *reinterpret_cast<const volatile float*>(row + fmt.weights + 4 * lane) : 0.f;
      rows::PendingScales<true> scales;
      if (has_scales) scales.load(reinterpret_cast<const float*>(row + fmt.scales), scale_cols, lane);
      if (lane < L) forward_rows[area_row * L + lane] = lane_dst_row;
      // Lane l < L forwards to node rank l.
      const bool forwards = lane < L && lane_dst_row >= 0;
      stage.move(row, slot_x_bytes, forwards ? dests[lane].x + lane_dst_row * slot_x_bytes : nullptr, lane);
      if (has_scales)
        scales.store_to_lane_targets<kMaxLocalRanks>(
            forwards ? dests[lane].scales + static_cast<int64_t>(lane_dst_row) * scale_cols : nullptr, lane);
      for (int l = 0; l < L; ++l) {
        const int dst_row = __shfl_sync(0xffffffffu, lane_dst_row, l);
        if (dst_row < 0) continue;
        write_slot_meta(dests[l], dst_row, ctx.node * L + l, expert, weight, token, args.num_topk,
                        args.experts_per_rank, lane);
        ++forwarded;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      heads[k] = rows_in;
      if (rows_in == totals[k]) {
        ctx.forward_counts[(static_cast<int64_t>(args.slot) * ctx.num_nodes + source_node) * kMaxChannels + channel] =
            static_cast<int32_t>(rows_in);
        *tail_of(k) = 0;  // every row is in: the partner writes this word again only after the next notify
      }
    }
  }
  if (lane == 0 && forwarded) atomicAdd(&traffic->bytes[kDispatchForward], forwarded * slot_row);
}

template <typename T, Payload kPayload>
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(Context<T> ctx, DispatchArgs args) {
  extern __shared__ __align__(128) uint8_t staging[];  // kWarps pieces of bulk::kPieceBytes
  __shared__ uint64_t stage_barriers[kWarps];
  __shared__ SlotRows dests[kMaxLocalRanks];
  __shared__ BlockTraffic traffic;
  __shared__ int overflow;
  __shared__ bool failed;
  if (*args.abort_dispatch == kAbortFailedMeeting) return;  // notify recorded why; nothing to write or count
  const int L = ctx.ranks_per_node;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  bulk::WarpStage stage;
  stage.init(staging + warp * bulk::kPieceBytes, &stage_barriers[warp], lane);
  const int channels = num_channels(args.num_blocks);
  const bool has_scales = kPayload != Payload::kBf16;
  const int64_t slot_x_bytes = kPayload == Payload::kBf16 ? 2LL * args.hidden : args.hidden;
  const int scale_cols = has_scales ? args.hidden / 128 : 0;
  const RowFormat fmt = row_format(slot_x_bytes, scale_cols, L, args.num_topk);

  if (threadIdx.x == 0) overflow = 0, failed = false;
  for (int i = threadIdx.x; i < kNumTrafficCounters; i += blockDim.x) traffic.bytes[i] = 0;
  __syncthreads();
  // Any rank's slot too small for its rows: nobody writes (every rank sees the same totals).
  for (int dst = threadIdx.x; dst < ctx.num_ranks; dst += blockDim.x) {
    const auto layout = intranode::recv_layout(args.recv_totals[dst], slot_x_bytes, scale_cols, args.num_topk);
    if (layout.total_bytes > ctx.slot_bytes) atomicOr(&overflow, 1);
  }
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    uint8_t* slot = slot_of(ctx, l, args.slot);
    const auto layout =
        intranode::recv_layout(args.recv_totals[ctx.node * L + l], slot_x_bytes, scale_cols, args.num_topk);
    dests[l] = {slot + layout.x, reinterpret_cast<float*>(slot + layout.scales),
                reinterpret_cast<int64_t*>(slot + layout.topk_idx), reinterpret_cast<float*>(slot + layout.topk_weights),
                reinterpret_cast<int64_t*>(slot + layout.src_idx)};
  }
  __syncthreads();
  const bool aborted = overflow || *args.abort_dispatch;
  if (blockIdx.x == 0 && threadIdx.x == 0 && args.expected_recv >= 0) {
    if (*args.abort_dispatch == kAbortInvalidIds) report_error(ctx.mailbox, kErrorInvalidIds, kStageDispatch, ctx.rank);
    else if (args.recv_totals[ctx.rank] != args.expected_recv)
      report_error(ctx.mailbox, kErrorSizeMismatch, kStageDispatch, args.recv_totals[ctx.rank]);
  }

  if (!aborted) {
    if (static_cast<int>(blockIdx.x) < channels) {
      send_channel<T, kPayload>(ctx, args, dests, fmt, blockIdx.x, channels, stage, &traffic);
    } else {
      forward_pairs(ctx, args, dests, fmt, channels, stage, &traffic, &failed);
    }
  }
  bulk::WarpStage::complete_stores();  // forwarded rows are published by the node barrier below
  __syncthreads();
  flush_traffic(ctx, &traffic);
  node_barrier(ctx, offsetof(NodeSignals, dispatch_arrived), args.arrivals_expected, kStageDispatch);
}

// --------------------------------------------------------------- combine

// 16-byte units a lane reduces per step: independent loads in flight hide the
// NVLink / HBM latency that one unit at a time would wait out. The home
// reduction holds a node partial and a running sum besides its loads: at 4 units
// it outgrows the 128 registers a thread has at 512 threads and spills.
constexpr int kCombineUnroll = 4;  // gateways
constexpr int kHomeUnroll = 2;

// Loads the 16-byte units unit0 + 32 u (u < kUnroll) of a row; units past num_units read as 0.
template <int kUnroll>
__device__ __forceinline__ void load_units(const int4* row, int unit0, int num_units, int4 (&raw)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u)
    raw[u] = unit0 + 32 * u < num_units ? ptx::load_cg(row + unit0 + 32 * u) : make_int4(0, 0, 0, 0);
}

// Sums (float32, ascending local rank, from the first row) the 16-byte units
// unit0 + 32 u (u < kUnroll, those below num_units) of this node's expert
// rows for one token, rounded to bf16 and packed. Lane l holds the row of local
// rank l (-1: none; lanes >= ranks_per_node hold -1). Warp-collective: every
// lane calls it, those past the row's end too. Arrays indexed only by unrolled
// constants stay in registers: the home reduction runs at the limit.
template <int kUnroll>
__device__ __forceinline__ bool node_partial(const uint8_t* const* sources, int lane_row, int64_t row_bytes,
                                             int unit0, int num_units, int4 (&packed)[kUnroll]) {
  float sum[kUnroll][8];
  bool any = false;
#pragma unroll
  for (int l = 0; l < kMaxLocalRanks; ++l) {
    const int row_index = __shfl_sync(0xffffffffu, lane_row, l);
    if (row_index < 0) continue;
    const int4* row = reinterpret_cast<const int4*>(sources[l] + row_index * row_bytes);
    int4 raw[kUnroll];
    load_units(row, unit0, num_units, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float values[8];
      rows::unpack_bf16x8(raw[u], values);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum[u][i] = any ? sum[u][i] + values[i] : values[i];
    }
    any = true;
  }
  if (any)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) packed[u] = rows::pack_bf16x8(sum[u]);
  return any;
}

// Sums the expert outputs of this node's ranks for forwarded rows [chunk, chunk + kWarps) of the
// (home node, channel) pair, a warp per row, and ships them to the home rank with the tail's count.
template <typename T>
__device__ void gateway_chunk(const Context<T>& ctx, const CombineArgs& args, const uint8_t* const* sources,
                              int home_node, int channel, int chunk, int count, BlockTraffic* traffic,
                              unsigned long long* nvlink_rows) {
  const TransportLayout& tl = ctx.layout;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int L = ctx.ranks_per_node;
  const int home = home_node * L + ctx.local;
  const int64_t row_bytes = 2LL * args.hidden;
  const int num_units = static_cast<int>(row_bytes / 16);
  const int64_t rows_per_channel = channel_rows(ctx.max_tokens, args.dispatch_channels);
  const int32_t* forward_rows =
      ctx.forward_rows + ((static_cast<int64_t>(args.slot) * ctx.num_nodes + home_node) * tl.area_rows) * L;
  auto partials = [&](int64_t area_row) {  // this node's partials for the home rank, from area_row
    return ctx.transport.window(
        home, tl.combine_recv + (static_cast<int64_t>(ctx.node) * tl.area_rows + area_row) * row_bytes,
        tl.combine_staging + (static_cast<int64_t>(home_node) * tl.area_rows + area_row) * row_bytes);
  };

  const int i = chunk + warp;
  if (i < count) {
    const int64_t area_row = channel * rows_per_channel + i;
    const int lane_row = lane < L ? forward_rows[area_row * L + lane] : -1;
    int4* out = reinterpret_cast<int4*>(partials(area_row));
    // Warp-uniform trip count: node_partial shuffles across the warp, so no lane may leave early.
    for (int unit0 = lane; unit0 - lane < num_units; unit0 += 32 * kCombineUnroll) {
      int4 packed[kCombineUnroll];
      node_partial(sources, lane_row, row_bytes, unit0, num_units, packed);
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u)
        if (unit0 + 32 * u < num_units) out[unit0 + 32 * u] = packed[u];
    }
    *nvlink_rows += __popc(__ballot_sync(0xffffffffu, lane_row >= 0));
  }
  __syncthreads();
  if (warp == 0) {
    const int added = min(kWarps, count - chunk);
    const int64_t area_row = channel * rows_per_channel + chunk;
    ctx.transport.put_signal_warp(
        home, tl.combine_recv + (static_cast<int64_t>(ctx.node) * tl.area_rows + area_row) * row_bytes,
        tl.combine_staging + (static_cast<int64_t>(home_node) * tl.area_rows + area_row) * row_bytes,
        added * row_bytes, combine_tail_offset(ctx.node, channel), static_cast<uint64_t>(added), SignalOp::kAdd, lane);
    if (lane == 0) traffic->bytes[kCombineBoundary] += static_cast<unsigned long long>(added) * row_bytes;
  }
}

// A gateway block's (home node, channel) pairs, a chunk of each in turn: the home ranks reduce in
// token order and need every node's partials as they go, so no pair may wait for another to finish.
template <typename T>
__device__ void gateway_pairs(const Context<T>& ctx, const CombineArgs& args, const uint8_t* const* sources,
                              int gateway, int gateways, BlockTraffic* traffic, bool* failed) {
  const int lane = threadIdx.x % 32;
  const int channels = args.dispatch_channels;
  const int pairs = (ctx.num_nodes - 1) * channels;
  auto count_of = [&](int home_node, int channel) {
    return ctx.forward_counts[(static_cast<int64_t>(args.slot) * ctx.num_nodes + home_node) * kMaxChannels + channel];
  };
  // Each home rank's credit first: it has finished reading the previous combine's partials.
  if (threadIdx.x == 0) {
    const uint64_t expected = args.credit_expected;
    for (int pair = gateway; pair < pairs && !*failed; pair += gateways) {
      const int home_node = pair_node(pair, channels, ctx.node);
      if (!wait_until(local_signal(ctx, credit_offset(home_node)), [expected](uint64_t v) { return v >= expected; },
                      ctx.timeout_ns, ctx.mailbox, kStageCombineCredit, home_node * ctx.ranks_per_node + ctx.local))
        *failed = true;
    }
  }
  __syncthreads();
  if (*failed) return;

  unsigned long long nvlink_rows = 0;
  for (int chunk = 0;; chunk += kWarps) {
    bool more = false;  // the same for every thread: the counts are the dispatch's
    for (int pair = gateway; pair < pairs; pair += gateways) {
      const int home_node = pair_node(pair, channels, ctx.node), channel = pair % channels;
      const int count = count_of(home_node, channel);
      if (chunk >= count) continue;
      more = true;
      gateway_chunk(ctx, args, sources, home_node, channel, chunk, count, traffic, &nvlink_rows);
    }
    if (!more) break;
  }
  if (lane == 0 && nvlink_rows) atomicAdd(&traffic->bytes[kCombineNvlink], nvlink_rows * 2LL * args.hidden);
}

// The home reduction of one token of `channel`, by one warp: in ascending node order, this node's
// partial (from the node peers' rows over NVLink) or the partial that node's gateway sent, summed in
// float32 from the first and rounded to bf16. Lane n < N remembers in `arrived` the count it last
// saw on node n's tail for this channel, so it polls once per chunk of rows, not per token.
template <typename T>
__device__ bool reduce_home_token(const Context<T>& ctx, const CombineArgs& args, const uint8_t* const* sources,
                                  int channel, int token, int64_t& arrived, unsigned long long* nvlink_rows) {
  const TransportLayout& tl = ctx.layout;
  const int lane = threadIdx.x % 32;
  const int L = ctx.ranks_per_node, N = ctx.num_nodes;
  const int64_t row_bytes = 2LL * args.hidden;
  const int num_units = static_cast<int>(row_bytes / 16);
  const TokenRoute route = route_of(args.is_token_in_rank, args.send_pos, args.send_base, token, ctx.num_ranks, lane, true);
  const uint32_t nodes = nodes_of(route.ranks, N, L);
  // Lane n: the area row of node n's partial; lane l: this token's row at local rank l.
  const int area_row = lane < N ? args.node_rows[static_cast<int64_t>(token) * N + lane] : -1;
  const int local_position = route.position(ctx.node * L + (lane < L ? lane : 0));
  const int local_row = lane < L && route.goes_to(ctx.node * L + lane) ? local_position : -1;
  *nvlink_rows += __popcll((route.ranks >> (ctx.node * L)) & ((1ull << L) - 1));
  // The partials of other nodes for this token must have arrived (tails count rows in order).
  const bool remote_partial = lane < N && lane != ctx.node && ((nodes >> lane) & 1u);
  bool ok = true;
  if (remote_partial) {
    const int64_t needed = area_row - channel * channel_rows(ctx.max_tokens, args.dispatch_channels) + 1;
    if (arrived < needed) {
      int64_t seen = 0;
      ok = wait_until(local_signal(ctx, combine_tail_offset(lane, channel)),
                      [needed, &seen](uint64_t v) {
                        seen = static_cast<int64_t>(v & kTailCountMask);
                        return seen >= needed;
                      },
                      ctx.timeout_ns, ctx.mailbox, kStageCombineRecv, lane * L + ctx.local);
      arrived = seen;
    }
  }
  if (!__all_sync(0xffffffffu, ok)) return false;
  const int4* lane_partial = remote_partial ? reinterpret_cast<const int4*>(ctx.transport.local(
      tl.combine_recv + (static_cast<int64_t>(lane) * tl.area_rows + area_row) * row_bytes)) : nullptr;

  int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(args.y) + static_cast<int64_t>(token) * row_bytes);
  // Warp-uniform trip count: the loop body shuffles across the warp, so no lane may leave early.
  for (int unit0 = lane; unit0 - lane < num_units; unit0 += 32 * kHomeUnroll) {
    // This node's partial first, kept packed: it is bf16 already, and registers are scarce.
    int4 own[kHomeUnroll];
    if ((nodes >> ctx.node) & 1u) node_partial(sources, local_row, row_bytes, unit0, num_units, own);
    float total[kHomeUnroll][8] = {};  // +0 for a token that went nowhere
    bool any = false;
    for (int n = 0; n < N; ++n) {
      if (!((nodes >> n) & 1u)) continue;
      int4 raw[kHomeUnroll];
      if (n == ctx.node) {
#pragma unroll
        for (int u = 0; u < kHomeUnroll; ++u) raw[u] = own[u];
      } else {
        load_units(reinterpret_cast<const int4*>(
                       __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(lane_partial), n)),
                   unit0, num_units, raw);
      }
#pragma unroll
      for (int u = 0; u < kHomeUnroll; ++u) {
        float values[8];
        rows::unpack_bf16x8(raw[u], values);
#pragma unroll
        for (int i = 0; i < 8; ++i) total[u][i] = any ? total[u][i] + values[i] : values[i];
      }
      any = true;
    }
#pragma unroll
    for (int u = 0; u < kHomeUnroll; ++u)
      if (unit0 + 32 * u < num_units) out[unit0 + 32 * u] = rows::pack_bf16x8(total[u]);
  }
  return true;
}

// One thread: this rank has read every partial of its combine; each other node's gateway may write
// the next one's.
template <typename T>
__device__ __forceinline__ void give_credit(const Context<T>& ctx) {
  __threadfence_system();
  for (int n = 0; n < ctx.num_nodes; ++n)
    if (n != ctx.node) ctx.transport.signal(n * ctx.ranks_per_node + ctx.local, credit_offset(ctx.node), 1, SignalOp::kAdd);
}

// Tokens a warp takes from a channel at a time.
constexpr int kHomeGrab = 2;

// Home reductions, shared by every block that has nothing else to do: home blocks from the start,
// gateways once their partials are out (the home side moves more bytes: it reads this node's rows
// and the partials, and writes y). Each warp takes kHomeGrab tokens at a time from a channel's
// counter, starting at `first_channel`, moving on when it is spent. The warp that finishes the
// call's last token resets the tails and gives each other node's gateway its credit: every partial
// has been read.
template <typename T>
__device__ void reduce_home_tokens(const Context<T>& ctx, const CombineArgs& args, const uint8_t* const* sources,
                                   int first_channel, BlockTraffic* traffic, bool* failed) {
  const int lane = threadIdx.x % 32;
  const int C = args.dispatch_channels;
  const int per_channel = tokens_per_channel(args.num_tokens, C);
  NodeSignals* own = node_signals(ctx, ctx.local);
  unsigned long long nvlink_rows = 0;
  int done = 0;  // tokens this warp reduced

  for (int i = 0; i < C && !*failed; ++i) {
    const int channel = (first_channel + i) % C;
    const int first = channel * per_channel, last = min(args.num_tokens, first + per_channel);
    int64_t arrived = 0;
    while (!*failed) {
      int start = 0;
      if (lane == 0) start = first + atomicAdd(&own->home_next[channel], kHomeGrab);
      start = __shfl_sync(0xffffffffu, start, 0);
      if (start >= last) break;
      for (int token = start; token < min(last, start + kHomeGrab); ++token) {
        if (!reduce_home_token(ctx, args, sources, channel, token, arrived, &nvlink_rows)) {
          *failed = true;
          break;
        }
        ++done;
      }
    }
  }
  if (lane == 0 && nvlink_rows) atomicAdd(&traffic->bytes[kCombineNvlink], nvlink_rows * 2LL * args.hidden);
  if (done == 0 || *failed) return;
  __threadfence();  // this warp's reads of the partials are done before it counts them
  int total = 0;
  if (lane == 0) total = atomicAdd(&own->home_done, done) + done;
  if (__shfl_sync(0xffffffffu, total, 0) != args.num_tokens) return;
  for (int k = lane; k < ctx.num_nodes * C; k += 32)
    if (k / C != ctx.node) *local_signal(ctx, combine_tail_offset(k / C, k % C)) = 0;
  __syncwarp();
  if (lane == 0) give_credit(ctx);
}

// One thread: publish where this rank's expert rows are, raise "combine_ready" in every node peer,
// wait for them, and note their row offsets for combine_kernel. A kernel of its own so that while
// a node peer is late one thread waits, not num_blocks blocks holding SMs that compute could use.
template <typename T>
__global__ void combine_ready_kernel(Context<T> ctx, CombineArgs args) {
  const int parity = static_cast<int>(args.call & 1);
  const int L = ctx.ranks_per_node;
  NodeSignals* own = node_signals(ctx, ctx.local);
  own->combine_source_offset[parity] = args.source_offset;
  __threadfence_system();
  for (int l = 0; l < L; ++l) ptx::store_release_sys(&node_signals(ctx, l)->combine_ready[ctx.local], args.call);
  const bool ready = wait_for_peers(own->combine_ready, L, args.call, ctx.timeout_ns, ctx.mailbox, kStageCombineReady,
                                    ctx.node * L);
  for (int l = 0; l < L; ++l)
    own->combine_peer_offset[l] =
        ready ? *reinterpret_cast<volatile int64_t*>(&node_signals(ctx, l)->combine_source_offset[parity]) : 0;
  own->combine_peers_ready = ready;
  for (int c = 0; c < args.dispatch_channels; ++c) own->home_next[c] = 0;
  own->home_done = 0;
  if (ready && args.num_tokens == 0) give_credit(ctx);  // no token, no partial to wait for
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(Context<T> ctx, CombineArgs args) {
  __shared__ const uint8_t* sources[kMaxLocalRanks];
  __shared__ BlockTraffic traffic;
  __shared__ bool failed;
  const int L = ctx.ranks_per_node;
  const int home_blocks = num_channels(args.num_blocks);
  const NodeSignals* own = node_signals(ctx, ctx.local);

  // combine_ready_kernel ran just before on this stream: every node peer is here (or one timed out).
  for (int i = threadIdx.x; i < kNumTrafficCounters; i += blockDim.x) traffic.bytes[i] = 0;
  if (threadIdx.x < L) sources[threadIdx.x] = ctx.node_regions[threadIdx.x] + own->combine_peer_offset[threadIdx.x];
  if (threadIdx.x == 0) failed = own->combine_peers_ready == 0;
  __syncthreads();

  if (!failed) {
    if (static_cast<int>(blockIdx.x) < home_blocks) {
      reduce_home_tokens(ctx, args, sources, blockIdx.x, &traffic, &failed);
    } else {
      const int gateway = blockIdx.x - home_blocks;
      gateway_pairs(ctx, args, sources, gateway, args.num_blocks - home_blocks, &traffic, &failed);
      __syncthreads();
      if (threadIdx.x == 0) ctx.transport.quiet();
      reduce_home_tokens(ctx, args, sources, gateway, &traffic, &failed);
    }
  }
  __syncthreads();
  flush_traffic(ctx, &traffic);
  node_barrier(ctx, offsetof(NodeSignals, combine_done), args.done_expected, kStageCombineDone);
}

// ------------------------------------------------------------------ launch

template <typename T>
Context<T> make_context(const ContextDesc& d, const T& transport) {
  Context<T> ctx{};
  ctx.transport = transport;
  ctx.layout = transport_layout(d.num_ranks, d.ranks_per_node, d.max_tokens, d.hidden, d.num_topk);
  for (int l = 0; l < d.ranks_per_node; ++l) ctx.node_regions[l] = d.node_regions[l];
  ctx.rank = d.rank;
  ctx.num_ranks = d.num_ranks;
  ctx.ranks_per_node = d.ranks_per_node;
  ctx.num_nodes = d.num_ranks / d.ranks_per_node;
  ctx.node = d.rank / d.ranks_per_node;
  ctx.local = d.rank % d.ranks_per_node;
  ctx.num_slots = d.num_slots;
  ctx.slot_bytes = d.slot_bytes;
  ctx.max_tokens = d.max_tokens;
  ctx.forward_rows = d.forward_rows;
  ctx.forward_counts = d.forward_counts;
  ctx.traffic = d.traffic;
  ctx.mailbox = &d.mailbox->header;
  ctx.host = d.mailbox;
  ctx.timeout_ns = d.timeout_ns;
  return ctx;
}

// Every block stages rows in shared memory (bulk.cuh), a piece per warp: forwarders move every
// payload that way, senders all but quantising ones.
constexpr int kStagingBytes = kWarps * bulk::kPieceBytes;

template <typename T, Payload kPayload>
void launch_dispatch_kernel(const Context<T>& ctx, const DispatchArgs& args, cudaStream_t stream) {
  bulk::allow_staging<dispatch_kernel<T, kPayload>>(kStagingBytes);
  dispatch_kernel<T, kPayload><<<args.num_blocks, kThreads, kStagingBytes, stream>>>(ctx, args);
  DC_CUDA_CHECK(cudaGetLastError());
}

// Calls fn(context) with the context of the transport `d` names.
template <typename Fn>
void with_transport(const ContextDesc& d, Fn&& fn) {
  DC_CHECK_ARG(d.ranks_per_node >= 1 && d.ranks_per_node <= kMaxLocalRanks,
               "ranks_per_node: the internode path supports 1 to " + std::to_string(kMaxLocalRanks));
  DC_CHECK_ARG(d.num_ranks % d.ranks_per_node == 0 && d.num_ranks / d.ranks_per_node >= 2 &&
                   d.num_ranks / d.ranks_per_node <= kMaxNodes,
               "ranks_per_node: the internode path needs 2 to " + std::to_string(kMaxNodes) + " nodes");
  DC_CHECK_ARG(d.rank >= 0 && d.rank < d.num_ranks, "rank: out of range");
  DC_CHECK_ARG(d.mailbox != nullptr && d.traffic != nullptr && d.forward_rows != nullptr && d.forward_counts != nullptr,
               "context: a buffer is missing");
  if (d.transport == TransportKind::kIpc) {
    IpcTransport transport{};
    for (int r = 0; r < d.num_ranks; ++r) {
      DC_CHECK_ARG(d.transport_regions[r] != nullptr, "transport_regions: a peer region is missing");
      transport.regions[r] = d.transport_regions[r];
    }
    transport.rank = d.rank;
    transport.staged = d.staged;
    fn(make_context(d, transport));
    return;
  }
#ifdef DEEPCOMM_WITH_NVSHMEM
  NvshmemTransport transport{};
  transport.base = d.transport_regions[d.rank];
  DC_CHECK_ARG(transport.base != nullptr, "transport_regions: this rank's symmetric region is missing");
  for (int r = 0; r < d.num_ranks; ++r) transport.peers[r] = d.staged ? nullptr : d.transport_regions[r];
  transport.rank = d.rank;
  fn(make_context(d, transport));
#else
  throw std::invalid_argument("transport: this build has no NVSHMEM (build with the nvidia-nvshmem-cu13 wheel installed)");
#endif
}

}  // namespace

void launch_notify(const ContextDesc& d, const NotifyArgs& args, cudaStream_t stream) {
  DC_CHECK_ARG(args.num_experts > 0 && args.num_experts <= kMaxExperts && args.num_experts % d.num_ranks == 0,
               "num_experts: the internode path supports up to " + std::to_string(kMaxExperts) +
                   " experts, a multiple of the rank count");
  with_transport(d, [&](auto ctx) {
    notify_kernel<<<1, kThreads, 0, stream>>>(ctx, args);
    DC_CUDA_CHECK(cudaGetLastError());
  });
}

void launch_dispatch(const ContextDesc& d, const DispatchArgs& args, cudaStream_t stream) {
  DC_CHECK_ARG(args.num_blocks >= 2 && num_channels(args.num_blocks) <= kMaxChannels,
               "num_sms: the internode path needs 2 to " + std::to_string(2 * kMaxChannels) +
                   " (half send, half forward)");
  DC_CHECK_ARG(args.num_topk > 0 && args.num_topk <= 32, "num_topk: the internode path supports 1 to 32");
  DC_CHECK_ARG(args.slot >= 0 && args.slot < d.num_slots, "slot: out of range");
  DC_CHECK_ARG(args.num_tokens <= d.max_tokens, "x: more tokens than the buffer's max_tokens_per_rank");
  with_transport(d, [&](auto ctx) {
    // Always holds for ceil(B / 2) channels (see kMaxForwardPairs); forward_pairs' state depends on it.
    const int channels = num_channels(args.num_blocks), forwarders = args.num_blocks - channels;
    DC_CHECK_ARG(((ctx.num_nodes - 1) * channels + forwarders - 1) / forwarders <= kMaxForwardPairs,
                 "num_sms: more (node, channel) pairs per forwarder block than it can track");
    using T = decltype(ctx.transport);
    switch (args.payload) {
      case Payload::kBf16: launch_dispatch_kernel<T, Payload::kBf16>(ctx, args, stream); break;
      case Payload::kFp8: launch_dispatch_kernel<T, Payload::kFp8>(ctx, args, stream); break;
      case Payload::kBf16ToFp8: launch_dispatch_kernel<T, Payload::kBf16ToFp8>(ctx, args, stream); break;
      case Payload::kBf16ToFp8Pow2: launch_dispatch_kernel<T, Payload::kBf16ToFp8Pow2>(ctx, args, stream); break;
    }
  });
}

void launch_combine(const ContextDesc& d, const CombineArgs& args, cudaStream_t stream) {
  DC_CHECK_ARG(args.num_blocks >= 2, "num_sms: the internode path needs at least 2 (half reduce, half gateway)");
  DC_CHECK_ARG(args.dispatch_channels >= 1 && args.dispatch_channels <= kMaxChannels, "handle: bad channel count");
  with_transport(d, [&](auto ctx) {
    combine_ready_kernel<<<1, 1, 0, stream>>>(ctx, args);
    DC_CUDA_CHECK(cudaGetLastError());
    combine_kernel<<<args.num_blocks, kThreads, 0, stream>>>(ctx, args);
    DC_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace deepcomm::internode
