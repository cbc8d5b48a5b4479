// The inter-node transport interface (DESIGN.md decision 7). The hierarchical
// kernels (internode.cu) are templated on it and written once:
//
//   uint8_t* local(offset)                  this rank's transport region
//   uint8_t* window(pe, remote, staging)    where to write bytes bound for pe's
//                                           `remote` offset: the peer's memory
//                                           itself, or local staging that the
//                                           next put carries (a NIC reads memory)
//   put_signal_warp(pe, remote, staging, bytes, signal, value, op, lane)
//                                           warp-collective: deliver the bytes,
//                                           then apply `value` to pe's signal
//                                           word, ordered after the bytes and
//                                           after every earlier put to pe
//   signal(pe, signal, value, op)           one thread, ordered after earlier puts
//   quiet()                                 earlier puts complete (staging reusable)
//
// Signal words live in the transport region and are read locally with
// acquire loads. Offsets are identical on every rank (symmetric layout).
#pragma once

#include <cstdint>

#include "kernels/common/ptx.cuh"
#include "runtime/internode_layout.h"

#ifdef DEEPCOMM_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace deepcomm::internode {

enum class SignalOp : int { kSet = 0, kAdd = 1 };

// CUDA-IPC peer memory standing in for the NIC: every rank's transport region
// is mapped here. `staged` makes senders write local staging and copy it on
// put, exactly the access pattern of a NIC-based transport (tests use it to
// cover that path on one GPU); otherwise senders store straight to the peer.
struct IpcTransport {
  uint8_t* regions[kMaxRanks];
  int rank;
  bool staged;

  __device__ __forceinline__ uint8_t* local(int64_t offset) const { return regions[rank] + offset; }

  __device__ __forceinline__ uint8_t* window(int pe, int64_t remote, int64_t staging) const {
    return staged ? regions[rank] + staging : regions[pe] + remote;
  }

  __device__ __forceinline__ void put_signal_warp(int pe, int64_t remote, int64_t staging, int64_t bytes,
                                                  int64_t signal_offset, uint64_t value, SignalOp op, int lane) const {
    if (staged) {
      const int4* from = reinterpret_cast<const int4*>(regions[rank] + staging);
      int4* to = reinterpret_cast<int4*>(regions[pe] + remote);
      for (int64_t unit = lane; unit < bytes / 16; unit += 32) to[unit] = from[unit];
    }
    __syncwarp();
    if (lane == 0) signal(pe, signal_offset, value, op);
    __syncwarp();
  }

  __device__ __forceinline__ void signal(int pe, int64_t signal_offset, uint64_t value, SignalOp op) const {
    uint64_t* word = reinterpret_cast<uint64_t*>(regions[pe] + signal_offset);
    __threadfence_system();  // this block's row stores (seen through __syncthreads) land first
    if (op == SignalOp::kAdd) ptx::add_release_sys(word, value);
    else ptx::store_release_sys(word, value);
  }

  __device__ __forceinline__ void quiet() const { __threadfence_system(); }
};

#ifdef DEEPCOMM_WITH_NVSHMEM
// NVSHMEM symmetric heap: staging + put-with-signal (RDMA across hosts, P2P
// within one). A fence before each put keeps puts to one PE in order, so a
// tail count of n means the first n rows have landed.
struct NvshmemTransport {
  uint8_t* base;  // the symmetric region (same address on every PE)
  int rank;

  __device__ __forceinline__ uint8_t* local(int64_t offset) const { return base + offset; }

  __device__ __forceinline__ uint8_t* window(int, int64_t, int64_t staging) const { return base + staging; }

  __device__ __forceinline__ void put_signal_warp(int pe, int64_t remote, int64_t staging, int64_t bytes,
                                                  int64_t signal_offset, uint64_t value, SignalOp op, int lane) const {
    if (lane == 0) {
      __threadfence();  // rows written by the block's other warps (seen through __syncthreads) first
      nvshmem_fence();
    }
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(base + remote, base + staging, static_cast<size_t>(bytes),
                                    reinterpret_cast<uint64_t*>(base + signal_offset), value,
                                    op == SignalOp::kAdd ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET, pe);
    __syncwarp();
  }

  __device__ __forceinline__ void signal(int pe, int64_t signal_offset, uint64_t value, SignalOp op) const {
    nvshmem_fence();
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(base + signal_offset), value,
                       op == SignalOp::kAdd ? NVSHMEM_SIGNAL_ADD : NVSHMEM_SIGNAL_SET, pe);
  }

  __device__ __forceinline__ void quiet() const { nvshmem_quiet(); }
};
#endif

}  // namespace deepcomm::internode
