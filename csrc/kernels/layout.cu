// Dispatch layout kernel.
//
// One thread per token (grid-stride). For its token a thread walks the K
// entries of topk_idx once: every valid entry counts for its expert; an entry
// counts for its rank (node) only if no earlier entry of the same token named
// that rank (node), so each token counts once per destination. The token's row
// of is_token_in_rank is zeroed and then marked by the same thread.
//
// Counters live in shared memory per block ([experts | ranks | nodes | invalid])
// and are added to the global outputs once per block at the end, so global
// atomics scale with blocks, not tokens. Integer atomics make the counts exact
// and independent of scheduling.
//
// Send positions (optional): one block per destination rank scans that
// column of is_token_in_rank with a block-wide exclusive sum, chunk by chunk,
// so send_pos[t][r] = tokens before t that go to r. Dispatch writes token t's
// row for r at that index (plus where this rank's rows start at r).
//
// Decode-size calls (every token fits one block) take one launch instead of a
// memset and two kernels: the block stores its counters (no zeroing needed)
// and scans each rank's column itself. A dispatch at that size is bound by its
// host work, and each launch is host work.
#include "kernels/layout.h"

#include <cub/block/block_scan.cuh>

#include "runtime/error.h"

namespace deepcomm {

namespace {

constexpr int kLayoutThreads = 256;

// kOneBlock: the grid is one block and every token has a thread of its own.
template <bool kOneBlock>
__global__ void __launch_bounds__(kLayoutThreads) dispatch_layout_kernel(DispatchLayoutArgs args) {
  extern __shared__ int32_t block_counts[];
  const int num_nodes = args.num_ranks / args.ranks_per_node;
  int32_t* expert_counts = block_counts;
  int32_t* rank_counts = expert_counts + args.num_experts;
  int32_t* node_counts = rank_counts + args.num_ranks;
  int32_t* invalid_count = node_counts + num_nodes;
  const int num_counters = args.num_experts + args.num_ranks + num_nodes + 1;
  for (int i = threadIdx.x; i < num_counters; i += blockDim.x) block_counts[i] = 0;
  __syncthreads();

  const int experts_per_rank = args.num_experts / args.num_ranks;
  for (int token = blockIdx.x * blockDim.x + threadIdx.x; token < args.num_tokens; token += gridDim.x * blockDim.x) {
    const int64_t* token_experts = args.topk_idx + static_cast<int64_t>(token) * args.num_topk;
    bool* token_ranks = args.is_token_in_rank + static_cast<int64_t>(token) * args.num_ranks;
    for (int rank = 0; rank < args.num_ranks; ++rank) token_ranks[rank] = false;

    for (int k = 0; k < args.num_topk; ++k) {
      const int64_t expert = token_experts[k];
      // Invalid ids are counted (the caller turns them into an error without a
      // host sync) and never routed, so they cannot write out of bounds.
      if (expert < 0 || expert >= args.num_experts) {
        if (expert != -1) atomicAdd(invalid_count, 1);
        continue;
      }
      atomicAdd(&expert_counts[expert], 1);
      const int rank = static_cast<int>(expert / experts_per_rank);
      const int node = rank / args.ranks_per_node;
      bool rank_seen = false, node_seen = false;
      for (int j = 0; j < k; ++j) {
        const int64_t other = token_experts[j];
        if (other < 0 || other >= args.num_experts) continue;
        const int other_rank = static_cast<int>(other / experts_per_rank);
        rank_seen |= other_rank == rank;
        node_seen |= other_rank / args.ranks_per_node == node;
      }
      if (!rank_seen) {
        token_ranks[rank] = true;
        atomicAdd(&rank_counts[rank], 1);
      }
      if (!node_seen) atomicAdd(&node_counts[node], 1);
    }
  }
  __syncthreads();

  for (int i = threadIdx.x; i < num_counters; i += blockDim.x) {
    int32_t* out;
    if (i < args.num_experts) {
      out = &args.num_tokens_per_expert[i];
    } else if (i < args.num_experts + args.num_ranks) {
      out = &args.num_tokens_per_rank[i - args.num_experts];
    } else if (i < args.num_experts + args.num_ranks + num_nodes) {
      out = &args.num_tokens_per_node[i - args.num_experts - args.num_ranks];
    } else {
      out = args.num_invalid;
      if (out == nullptr) continue;
    }
    const int32_t count = block_counts[i];
    if (kOneBlock) {
      *out = count;  // the only block: its counts are the totals, zeros included
    } else if (count != 0) {
      atomicAdd(out, count);
    }
  }

  if constexpr (kOneBlock) {
    if (args.send_pos == nullptr) return;
    // The thread of token t reads back its own row of is_token_in_rank (its own writes).
    using BlockScan = cub::BlockScan<int32_t, kLayoutThreads>;
    __shared__ typename BlockScan::TempStorage scan_storage;
    const int token = threadIdx.x;
    const bool has_token = token < args.num_tokens;
    for (int rank = 0; rank < args.num_ranks; ++rank) {
      const int32_t goes = has_token && args.is_token_in_rank[static_cast<int64_t>(token) * args.num_ranks + rank];
      int32_t before = 0;
      BlockScan(scan_storage).ExclusiveSum(goes, before);
      if (has_token) args.send_pos[static_cast<int64_t>(token) * args.num_ranks + rank] = before;
      __syncthreads();  // scan_storage is reused by the next rank's scan
    }
  }
}

constexpr int kScanThreads = 512;
constexpr int kScanItems = 8;  // consecutive tokens per thread per chunk

__global__ void __launch_bounds__(kScanThreads) send_positions_kernel(const bool* is_token_in_rank, int num_tokens,
                                                                      int num_ranks, int32_t* send_pos) {
  using BlockScan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int32_t chunk_total;
  const int rank = blockIdx.x;
  int32_t running = 0;
  for (int chunk = 0; chunk < num_tokens; chunk += kScanThreads * kScanItems) {
    const int first = chunk + threadIdx.x * kScanItems;
    int32_t flags[kScanItems];
    int32_t count = 0;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int token = first + i;
      flags[i] = token < num_tokens && is_token_in_rank[static_cast<int64_t>(token) * num_ranks + rank];
      count += flags[i];
    }
    int32_t before = 0, total = 0;
    BlockScan(scan_storage).ExclusiveSum(count, before, total);
    before += running;
#pragma unroll
    for (int i = 0; i < kScanItems; ++i) {
      const int token = first + i;
      if (token < num_tokens) send_pos[static_cast<int64_t>(token) * num_ranks + rank] = before;
      before += flags[i];
    }
    if (threadIdx.x == 0) chunk_total = total;
    __syncthreads();
    running += chunk_total;
    __syncthreads();
  }
}

}  // namespace

size_t dispatch_layout_shared_bytes(int num_experts, int num_ranks, int ranks_per_node) {
  return sizeof(int32_t) * (static_cast<size_t>(num_experts) + num_ranks + num_ranks / ranks_per_node + 1);
}

void launch_dispatch_layout(const DispatchLayoutArgs& args, int num_blocks, cudaStream_t stream) {
  DC_CHECK_ARG(args.num_tokens >= 0, "num_tokens: must be >= 0");
  DC_CHECK_ARG(args.num_topk > 0, "num_topk: must be > 0");
  DC_CHECK_ARG(args.num_ranks > 0, "num_ranks: must be > 0");
  DC_CHECK_ARG(args.num_experts > 0 && args.num_experts % args.num_ranks == 0,
               "num_experts: must be a positive multiple of num_ranks");
  DC_CHECK_ARG(args.ranks_per_node > 0 && args.num_ranks % args.ranks_per_node == 0,
               "ranks_per_node: must divide num_ranks");
  DC_CHECK_ARG(num_blocks > 0, "num_blocks: must be > 0");
  const int num_nodes = args.num_ranks / args.ranks_per_node;
  const size_t shared_bytes = dispatch_layout_shared_bytes(args.num_experts, args.num_ranks, args.ranks_per_node);
  // 48 KiB is available to every kernel without opting in; less the one-block path's scan storage,
  // that holds ~11k counters, far above any expert count in use.
  DC_CHECK_ARG(shared_bytes <= 44 * 1024, "num_experts: too many experts for the layout kernel's shared counters");

  if (args.num_tokens <= kLayoutThreads) {
    dispatch_layout_kernel<true><<<1, kLayoutThreads, shared_bytes, stream>>>(args);
    DC_CUDA_CHECK(cudaGetLastError());
    return;
  }

  // Several blocks add into the counters, which start at zero. Laid out back to back (rank, node,
  // expert counts, then the invalid count: how a dispatch's scratch holds them) they take one
  // memset, each a host call of its own.
  const bool counters_adjacent = args.num_tokens_per_node == args.num_tokens_per_rank + args.num_ranks &&
                                 args.num_tokens_per_expert == args.num_tokens_per_node + num_nodes &&
                                 args.num_invalid == args.num_tokens_per_expert + args.num_experts;
  if (counters_adjacent) {
    DC_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_rank, 0,
                                  sizeof(int32_t) * (args.num_ranks + num_nodes + args.num_experts + 1), stream));
  } else {
    DC_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_rank, 0, sizeof(int32_t) * args.num_ranks, stream));
    DC_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_node, 0, sizeof(int32_t) * num_nodes, stream));
    DC_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_expert, 0, sizeof(int32_t) * args.num_experts, stream));
    if (args.num_invalid != nullptr) DC_CUDA_CHECK(cudaMemsetAsync(args.num_invalid, 0, sizeof(int32_t), stream));
  }
  const int blocks_needed = (args.num_tokens + kLayoutThreads - 1) / kLayoutThreads;
  const int blocks = blocks_needed < num_blocks ? blocks_needed : num_blocks;
  dispatch_layout_kernel<false><<<blocks, kLayoutThreads, shared_bytes, stream>>>(args);
  DC_CUDA_CHECK(cudaGetLastError());
  if (args.send_pos != nullptr) {
    send_positions_kernel<<<args.num_ranks, kScanThreads, 0, stream>>>(args.is_token_in_rank, args.num_tokens,
                                                                      args.num_ranks, args.send_pos);
    DC_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace deepcomm
